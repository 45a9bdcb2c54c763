"""Rotary position embedding (Su et al. 2021, "RoFormer"), Hugging Face's rotate-half layout.

Inverse frequencies: the default formula here; scaled variants (llama3, linear,
yarn, ...) come from transformers' `ROPE_INIT_FUNCTIONS` so they match the
reference implementation exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from loomlm.layers.kernels import cpu_kernels_for


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The rope settings of an HF config as one dict with at least `rope_type` and `rope_theta`.

    transformers >= 5 keeps them in `config.rope_parameters` (Gemma 3: one dict per layer type,
    picked by `layer_type`); older configs use `rope_theta` and `rope_scaling`.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type])
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [rotary_dim // 2], attention_scaling) for the config's rope type.

    rotary_dim = head_dim * `partial_rotary_factor` (Phi-3 variants rotate part of each head).
    Scaled types come from transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py) called
    without a sequence length: "dynamic" and "longrope" then give the frequencies transformers
    uses while a sequence stays within `original_max_position_embeddings`.
    """
    params = rope_parameters(config, layer_type)
    if params["rope_type"] == "default":
        base = float(params["rope_theta"])
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if fn is None:
        raise ValueError(f"unsupported rope_type {params['rope_type']!r}")
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, scaling = fn(config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Rotary tables shared by all layers: `cos_sin(positions)` once per step, `apply` per layer."""

    def __init__(self, config, head_dim: int, max_position: int, layer_type: str | None = None) -> None:
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim, layer_type)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, rotary_dim]
        self.register_buffer("cos_cached", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin_cached", emb.sin() * scaling, persistent=False)
        self.max_position = max_position

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> (cos, sin), each [num_tokens, rotary_dim]."""
        return self.cos_cached[positions].to(dtype), self.sin_cached[positions].to(dtype)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first num_heads heads of each row of x: [num_tokens, >= num_heads * head_dim].

    x is typically a fused QKV projection (q and k heads side by side, then v, left alone);
    cos/sin from `cos_sin`, [num_tokens, rotary_dim]: with rotary_dim < head_dim only the first
    rotary_dim channels of each head turn (transformers' partial rotary, modeling_phi3.py).
    float32 on the CPU runs the native kernel; elsewhere PyTorch ops.
    """
    rotary_dim = cos.shape[-1]
    native = cpu_kernels_for(x)
    if native is not None and x.stride(-1) == 1 and rotary_dim == head_dim:
        native.rotary_(x, cos, sin, num_heads, head_dim)
        return
    heads = x[:, : num_heads * head_dim].unflatten(1, (num_heads, head_dim))[..., :rotary_dim]  # a view
    heads.copy_(heads * cos.unsqueeze(1) + _rotate_half(heads) * sin.unsqueeze(1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
