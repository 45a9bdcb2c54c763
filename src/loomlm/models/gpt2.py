"""GPT-2 (Radford et al. 2019, openai-community/gpt2*) in plain PyTorch.

Follows transformers' `models/gpt2/modeling_gpt2.py`: learned absolute positions (`wpe`),
pre-norm blocks with LayerNorm (`layer_norm_epsilon`), biases everywhere, a gelu_new MLP
(`activation_function`), attention scaled by head_dim**-0.5 (`scale_attn_weights`) and by
1 / (layer index + 1) (`scale_attn_by_inverse_layer_idx`), and a head tied to the token
embeddings. HF stores the projections as Conv1D, weight [in, out]: the layout of our
pre-transposed `Linear.weight_t`, so each loads with one transpose back. Tokens of many
requests arrive as one flat batch `[num_tokens]` with explicit positions; attention reads the
paged KV cache through the forward context.
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


class GPT2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        inner = config.n_inner if config.n_inner is not None else 4 * hidden
        self.c_fc = Linear(hidden, {"c_fc": inner}, bias=True)
        self.c_proj = Linear(inner, {"c_proj": hidden}, bias=True)
        self.act = activation_fn(config.activation_function, "GPT-2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))  # [num_tokens, hidden_size]


class GPT2Block(nn.Module):
    """h = h + attn(ln_1(h)); h = h + mlp(ln_2(h)). Norm names are transformers'."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        # GPT2Attention.scaling. `reorder_and_upcast_attn` changes only how HF's eager path reaches
        # the same float32 result (scaling k inside baddbmm); it needs nothing here.
        num_heads = config.num_attention_heads
        scale = (hidden // num_heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.attn = MultiHeadAttention(hidden, num_heads, bias=True, scale=scale)  # HF c_attn, attn.c_proj
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden_size]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its LM head.

    forward(input_ids [num_tokens], positions [num_tokens]) -> hidden [num_tokens, hidden_size];
    compute_logits(hidden [n, hidden_size]) -> float32 logits [n, vocab_size].

    Raises ValueError at construction when `max_position` exceeds the learned position table
    (`n_positions`), for an unknown activation, or for cross-attention (`add_cross_attention`).
    """

    # HF Conv1D module inside a block -> our Linear's path in the block (all its shards, in order)
    _CONV1D: ClassVar[dict[str, LinearTarget]] = {
        "attn.c_attn": ("attn.qkv_proj", None), "attn.c_proj": ("attn.o_proj", None),
        "mlp.c_fc": ("mlp.c_fc", None), "mlp.c_proj": ("mlp.c_proj", None),
    }
    # HF module -> (our path, shard), for the LoRA manager. c_attn is missing: one HF module over
    # three shards, which the manager's one-shard targets cannot express.
    _FUSED: ClassVar[dict[str, tuple[str, str]]] = {
        "attn.c_proj": ("attn.o_proj", "o"),
        "mlp.c_fc": ("mlp.c_fc", "c_fc"),
        "mlp.c_proj": ("mlp.c_proj", "c_proj"),
    }

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        if max_position > config.max_position_embeddings:
            raise ValueError(f"max_position {max_position} exceeds GPT-2's learned position table "
                             f"(n_positions={config.max_position_embeddings})")
        activation_fn(config.activation_function, "GPT-2")  # refuses an unknown one now
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention) is an encoder-decoder part; "
                             "not supported")
        self.config = config
        hidden = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, hidden)
        self.wpe = nn.Embedding(config.max_position_embeddings, hidden)
        self.h = nn.ModuleList([GPT2Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        # Its own pre-transposed copy even when tied (as llama.py: `x @ w_t` is the fast path).
        self.lm_head = Linear(hidden, {"lm_head": config.vocab_size})
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        """The blocks, under the name the LoRA manager reads (HF's `h` keeps the parameter names)."""
        return self.h

    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn.attn for block in self.h]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # [num_tokens, hidden_size]
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [n, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (transformers' names; Conv1D weights [in, out], lm_head [vocab, hidden]).

        Accepts `transformer.*` and the original checkpoint's prefix-less names, and skips the
        causal-mask buffers (`attn.bias`, `attn.masked_bias`) old checkpoints store. Raises
        ValueError naming the tensor for an unexpected name or shape, and naming what is missing
        when the checkpoint lacks a parameter.
        """
        weights = ((name, tensor) for name, tensor in weights  # GPT2Attention's causal-mask buffers
                   if not name.removeprefix("transformer.").endswith((".attn.bias", ".attn.masked_bias")))
        # lm_head is an nn.Linear [vocab, hidden], not a Conv1D
        load_hf_weights(self, weights, prefixes=("transformer.",), layers_name="h", layer_linears=self._CONV1D,
                        top_linears={"lm_head": ("lm_head", "lm_head")}, embed_key="wte.weight")
