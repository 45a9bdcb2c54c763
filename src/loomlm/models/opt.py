"""OPT decoder (Zhang et al. 2022, facebook/opt-*) in plain PyTorch.

Follows transformers' `models/opt/modeling_opt.py`: learned absolute positions read at
position + 2 (`OPTLearnedPositionalEmbedding`), LayerNorm, biases on every projection
(`enable_bias`), a ReLU MLP (`activation_function`), pre-norm blocks (`do_layer_norm_before`,
125m and most sizes) or post-norm blocks (350m), embeddings narrower than the decoder
(`word_embed_proj_dim`, 350m: `project_in` / `project_out`) and a head tied to them. Tokens of
many requests arrive as one flat batch `[num_tokens]` with explicit positions; attention reads
the paged KV cache through the forward context.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from loomlm.layers.activation import activation_fn
from loomlm.layers.attention import MultiHeadAttention, PagedAttention
from loomlm.layers.linear import Linear
from loomlm.models.weight_utils import LinearTarget, load_hf_weights

# OPTLearnedPositionalEmbedding's offset: row 0 and 1 of the table precede position 0 (a fairseq legacy).
_POSITION_OFFSET = 2


class OPTDecoderLayer(nn.Module):
    """One block; module and parameter names are transformers' (`self_attn_layer_norm`, `fc1`, ...)."""

    def __init__(self, config) -> None:
        super().__init__()
        hidden, affine = config.hidden_size, bool(config.layer_norm_elementwise_affine)
        self.is_pre_norm = bool(config.do_layer_norm_before)
        # transformers scales q by head_dim**-0.5 before q k^T (and attends with scale 1); scaling
        # the scores instead is the same up to rounding.
        head_dim = hidden // config.num_attention_heads
        self.self_attn = MultiHeadAttention(hidden, config.num_attention_heads, bias=bool(config.enable_bias),
                                            scale=head_dim**-0.5)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = Linear(hidden, {"fc1": config.ffn_dim}, bias=bool(config.enable_bias))
        self.fc2 = Linear(config.ffn_dim, {"fc2": hidden}, bias=bool(config.enable_bias))
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.act = activation_fn(config.activation_function, "OPT")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden_size]
        if self.is_pre_norm:  # 125m, 1.3b, ...: h = h + attn(norm(h)); h = h + mlp(norm(h))
            x = x + self.self_attn(self.self_attn_layer_norm(x))
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        # 350m: h = norm(h + attn(h)); h = norm(h + mlp(h))
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTForCausalLM(nn.Module):
    """OPT decoder with its LM head.

    forward(input_ids [num_tokens], positions [num_tokens]) -> hidden [num_tokens, word_embed_proj_dim]
    (= hidden_size except in 350m-like checkpoints); compute_logits(hidden [n, word_embed_proj_dim])
    -> float32 logits [n, vocab_size].

    Raises ValueError at construction when `max_position` exceeds the learned position table
    (`max_position_embeddings`) or the activation is unknown.
    """

    # HF module suffix inside a layer -> (our Linear's path in the layer, shard); the LoRA manager
    # finds adapter targets through it.
    _FUSED: ClassVar[dict[str, LinearTarget]] = {
        "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
        "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
        "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
        "self_attn.out_proj": ("self_attn.o_proj", "o"),
        "fc1": ("fc1", "fc1"),
        "fc2": ("fc2", "fc2"),
    }
    # Linears outside the layers: HF module -> shard (our path is the HF one)
    _TOP_LINEARS: ClassVar[dict[str, LinearTarget]] = {
        "project_in": ("project_in", "project_in"), "project_out": ("project_out", "project_out"),
        "lm_head": ("lm_head", "lm_head"),
    }

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        if max_position > config.max_position_embeddings:
            raise ValueError(f"max_position {max_position} exceeds OPT's learned position table "
                             f"(max_position_embeddings={config.max_position_embeddings})")
        activation_fn(config.activation_function, "OPT")  # refuses an unknown one now
        self.config = config
        hidden, embed_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + _POSITION_OFFSET, hidden)
        # 350m embeds in 512 dims and runs the decoder in 1024: projections on the way in and out
        self.project_in = Linear(embed_dim, {"project_in": hidden}) if embed_dim != hidden else None
        self.project_out = Linear(hidden, {"project_out": embed_dim}) if embed_dim != hidden else None
        self.layers = nn.ModuleList([OPTDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        # post-norm blocks end normalized already; `_remove_final_layer_norm` keeps pre-v4.20 fine-tunes loading
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = (nn.LayerNorm(hidden, elementwise_affine=bool(config.layer_norm_elementwise_affine))
                                 if has_final_norm else None)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        # Its own pre-transposed copy even when tied (as llama.py: `x @ w_t` is the fast path).
        self.lm_head = Linear(embed_dim, {"lm_head": config.vocab_size})
        for p in self.parameters():
            p.requires_grad_(False)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, word_embed_proj_dim]
        if self.project_in is not None:
            x = self.project_in(x)  # [num_tokens, hidden_size]
        x = x + self.embed_positions(positions + _POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x  # [num_tokens, word_embed_proj_dim]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [n, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (transformers' names, nn.Linear [out, in] layouts).

        Accepts `model.decoder.*` and the hub's prefix-less `decoder.*` names. Raises ValueError
        naming the tensor for an unexpected name or shape, and naming what is missing when the
        checkpoint lacks a parameter.
        """
        load_hf_weights(self, weights, prefixes=("model.", "decoder."), layers_name="layers",
                        layer_linears=self._FUSED, top_linears=self._TOP_LINEARS, embed_key="embed_tokens.weight")
