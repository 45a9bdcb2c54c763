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
from loomlm.layers.attention import PagedAttention
from loomlm.layers.linear import Linear
from loomlm.models.weight_utils import default_weight_loader

# OPTLearnedPositionalEmbedding's offset: row 0 and 1 of the table precede position 0 (a fairseq legacy).
_POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    """Multi-head attention (no GQA), q/k/v fused: [num_tokens, hidden] -> [num_tokens, hidden]."""

    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        bias = bool(config.enable_bias)
        self.qkv_proj = Linear(hidden, {"q": hidden, "k": hidden, "v": hidden}, bias=bias)
        self.o_proj = Linear(hidden, {"o": hidden}, bias=bias)
        # transformers scales q by head_dim**-0.5 before q k^T (and attends with scale 1); scaling
        # the scores instead is the same up to rounding.
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=self.head_dim**-0.5)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.hidden, dim=-1)  # each [T, hidden]
        heads = (self.num_heads, self.head_dim)
        out = self.attn(q.unflatten(1, heads), k.unflatten(1, heads), v.unflatten(1, heads))  # [T, H, D]
        return self.o_proj(out.reshape(-1, self.hidden))


class OPTDecoderLayer(nn.Module):
    """One block; module and parameter names are transformers' (`self_attn_layer_norm`, `fc1`, ...)."""

    def __init__(self, config) -> None:
        super().__init__()
        hidden, affine = config.hidden_size, bool(config.layer_norm_elementwise_affine)
        self.is_pre_norm = bool(config.do_layer_norm_before)
        self.self_attn = OPTAttention(config)
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
    _FUSED: ClassVar[dict[str, tuple[str, str]]] = {
        "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
        "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
        "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
        "self_attn.out_proj": ("self_attn.o_proj", "o"),
        "fc1": ("fc1", "fc1"),
        "fc2": ("fc2", "fc2"),
    }
    # Linears outside the layers: HF module -> shard (our path is the HF one)
    _TOP_LINEARS: ClassVar[dict[str, str]] = {"project_in": "project_in", "project_out": "project_out", "lm_head": "lm_head"}

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
        linears = {n: m for n, m in self.named_modules() if isinstance(m, Linear)}
        params = {n: p for n, p in self.named_parameters() if n.rpartition(".")[0] not in linears}
        loaded: set[str] = set()  # keys as below: HF names without "model.decoder."
        for name, tensor in weights:
            key = name.removeprefix("model.").removeprefix("decoder.")
            if key == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: some checkpoints still carry a copy
            module, _, leaf = key.rpartition(".")
            target = self._linear_target(module)
            if target is not None:
                path, shard = target
                if leaf not in ("weight", "bias"):
                    raise ValueError(f"unexpected parameter {name!r} for OPTForCausalLM")
                try:
                    linears[path].load_shard(shard, **{leaf: tensor})
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
            elif key in params:
                default_weight_loader(params[key], tensor, name)
            else:
                raise ValueError(f"unexpected parameter {name!r} for OPTForCausalLM")
            loaded.add(key)
        if self.tie_word_embeddings and "embed_tokens.weight" in loaded:
            self.lm_head.load_shard("lm_head", weight=self.embed_tokens.weight.data)
            loaded.add("lm_head.weight")
        missing = [n for n in self._expected_keys(params) if n not in loaded]
        if missing:
            names = [n if n.startswith("lm_head") else f"model.decoder.{n}" for n in missing]
            raise ValueError(f"checkpoint lacks {len(missing)} of the model's tensors: {', '.join(names[:5])}"
                             + (", ..." if len(names) > 5 else ""))

    def _linear_target(self, module: str) -> tuple[str, str] | None:
        """Our (Linear path, shard) for an HF module name ("layers.0.self_attn.q_proj"), or None."""
        if module in self._TOP_LINEARS and getattr(self, module) is not None:
            return module, self._TOP_LINEARS[module]
        parts = module.split(".", 2)
        if (len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) < len(self.layers)
                and parts[2] in self._FUSED):
            path, shard = self._FUSED[parts[2]]
            return f"layers.{parts[1]}.{path}", shard
        return None

    def _expected_keys(self, params: dict[str, torch.Tensor]) -> list[str]:
        """Every HF key (without "model.decoder.") the checkpoint must hold."""
        keys = list(params)
        top = [m for m in self._TOP_LINEARS if getattr(self, m) is not None]
        for module in top:
            keys.append(f"{module}.weight")  # no biases on these
        for i, layer in enumerate(self.layers):
            for hf, (path, _) in self._FUSED.items():
                keys.append(f"layers.{i}.{hf}.weight")
                if layer.get_submodule(path).bias is not None:
                    keys.append(f"layers.{i}.{hf}.bias")
        return keys
