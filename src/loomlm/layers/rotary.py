"""Rotary position embedding (Su et al. 2021, "RoFormer"), Hugging Face's rotate-half layout.

Inverse frequencies: the default formula here; scaled variants (llama3, linear,
yarn, ...) come from transformers' `ROPE_INIT_FUNCTIONS` so they match the
reference implementation exactly. "dynamic" and "longrope" change their
frequencies once a sequence outgrows the pretraining length
(`LengthDependentFrequencies`), decided per sequence of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from loomlm.layers.forward_context import current_fused_ops

if TYPE_CHECKING:
    from loomlm.layers.forward_context import ForwardBatch


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
    uses while a sequence stays within its original length (`LengthDependentFrequencies` gives
    those beyond).

    A config carrying `rope_freq_factors` (llama.cpp's `rope_freqs` tensor, which GGUF files of
    Llama 3.1-style models hold instead of the llama3 scaling parameters) divides each default
    frequency by its factor, as ggml's rope does (theta / freq_factor). Raises ValueError for an
    unknown rope_type or factors of the wrong length.
    """
    params = rope_parameters(config, layer_type)
    if params["rope_type"] == "default":
        base = float(params["rope_theta"])
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        factors = getattr(config, "rope_freq_factors", None)
        if factors is not None:
            if len(factors) != inv_freq.numel():
                raise ValueError(f"rope_freq_factors has {len(factors)} entries, expected {inv_freq.numel()} "
                                 f"(rotary dimension {dim} / 2)")
            inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if fn is None:
        raise ValueError(f"unsupported rope_type {params['rope_type']!r}")
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, scaling = fn(config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scaling)


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field
class LengthDependentFrequencies:
    """Frequencies of a sequence longer than `original_max_len`, as transformers' `dynamic_rope_update`.

    - "dynamic" (NTK-aware, `_compute_dynamic_ntk_parameters`): the base grows with the
      sequence length L: theta * (factor * L / original_max_len - (factor - 1)) ** (dim / (dim - 2)),
      with original_max_len = `max_position_embeddings`.
    - "longrope" (`_compute_longrope_parameters`): `long_factor` instead of `short_factor`
      for any L > `original_max_position_embeddings`; the attention scaling is unchanged.

    A sequence with L <= original_max_len keeps the precomputed table.
    """

    rope_type: str  # "dynamic" or "longrope"
    original_max_len: int  # tokens: the frequencies change for sequences longer than this
    rope_theta: float  # dynamic only
    factor: float  # dynamic only
    rotary_dim: int
    long_inv_freq: torch.Tensor | None  # longrope: [rotary_dim // 2] float32 on the CPU; None for dynamic

    @classmethod
    def from_config(cls, config, head_dim: int, layer_type: str | None = None) -> LengthDependentFrequencies | None:
        """None for rope types whose frequencies do not depend on the sequence length."""
        params = rope_parameters(config, layer_type)
        rope_type = params["rope_type"]
        if rope_type not in ("dynamic", "longrope"):
            return None
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if rope_type == "dynamic":
            return cls("dynamic", int(config.max_position_embeddings), float(params["rope_theta"]),
                       float(params["factor"]), rotary_dim, None)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        # Phi-3 keeps the pretraining length outside the rope dict (transformers' standardize_rope_params)
        original = (getattr(config, "original_max_position_embeddings", None) if layer_type is None else None) \
            or params.get("original_max_position_embeddings") or config.max_position_embeddings
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"), seq_len=int(original) + 1,
                                                           **kwargs)
        return cls("longrope", int(original), 0.0, 1.0, rotary_dim, long_inv_freq.float())

    def inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """seq_lens: [num_tokens] int64, each token's sequence length -> [num_tokens, rotary_dim // 2] float32.

        Rows of tokens with seq_len <= original_max_len are not meaningful (the caller keeps its table).
        """
        if self.long_inv_freq is not None:
            return self.long_inv_freq.to(seq_lens.device).expand(seq_lens.shape[0], -1)
        # transformers' op order, in float32, so the numbers match its forward
        seq_len = seq_lens.clamp(min=self.original_max_len)[:, None]  # [T, 1]
        base = self.rope_theta * ((self.factor * seq_len / self.original_max_len) - (self.factor - 1)) \
            ** (self.rotary_dim / (self.rotary_dim - 2))  # [T, 1]
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=seq_lens.device).float()
        return 1.0 / (base ** (exponents / self.rotary_dim))


def max_sequence_len(batch: ForwardBatch) -> int:
    """The longest sequence of the step, in tokens (host int: no device sync).

    A sequence's length in a step is its largest position in it + 1, which is the context
    length the model runner gives its decode token or its prefill span.
    """
    longest = batch.decode.max_context_len if batch.decode is not None else 0
    return max([longest] + [span.context_len for span in batch.prefill_spans])


def sequence_lens(batch: ForwardBatch) -> torch.Tensor:
    """[num_tokens] int64: the length (largest position in this step + 1) of each token's sequence.

    Decode tokens come first, one per sequence; then the prefill spans, in order.
    """
    positions = batch.positions
    num_decode = batch.num_decode_tokens
    parts = [positions[:num_decode] + 1]
    spans = batch.prefill_spans
    if spans:
        lens = torch.tensor([s.context_len for s in spans], dtype=torch.int64, device=positions.device)
        counts = torch.tensor([s.token_end - s.token_start for s in spans], dtype=torch.int64,
                              device=positions.device)
        num_prefill = positions.shape[0] - num_decode
        assert spans[0].token_start == num_decode and spans[-1].token_end == positions.shape[0], \
            "prefill spans must follow the decode tokens and cover the rest of the batch"
        parts.append(lens.repeat_interleave(counts, output_size=num_prefill))  # output_size: no device sync
    return torch.cat(parts)


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
        self.attention_scaling = scaling
        # A plain attribute, not a buffer: `model.to(dtype)` must not round its frequencies.
        self.length_dependent = LengthDependentFrequencies.from_config(config, head_dim, layer_type)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                batch: ForwardBatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> (cos, sin), each [num_tokens, rotary_dim].

        batch: the step's sequences (its `positions` are these). For "dynamic" and "longrope",
        each token takes the frequencies of its own sequence's length in this step (largest
        position + 1), as transformers does for one sequence per forward; a sequence prefilled in
        chunks thus takes each chunk's length (vLLM decides per batch). Without a batch, or
        while every sequence of the step is within the original length, the precomputed table.
        """
        cos, sin = self.cos_cached[positions], self.sin_cached[positions]
        scaled = self.length_dependent
        if scaled is None or batch is None or max_sequence_len(batch) <= scaled.original_max_len:
            return cos.to(dtype), sin.to(dtype)
        # Some sequence is past the original length: recompute every token's angles (cheap,
        # elementwise) and keep the table's rows for tokens of the sequences within it.
        seq_lens = sequence_lens(batch)  # [T]
        freqs = positions[:, None].float() * scaled.inv_freq(seq_lens)  # [T, rotary_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, rotary_dim]
        is_long = (seq_lens > scaled.original_max_len)[:, None]  # [T, 1]
        cos = torch.where(is_long, emb.cos() * self.attention_scaling, cos)
        sin = torch.where(is_long, emb.sin() * self.attention_scaling, sin)
        return cos.to(dtype), sin.to(dtype)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first num_heads heads of each row of x: [num_tokens, >= num_heads * head_dim].

    x is typically a fused QKV projection (q and k heads side by side, then v, left alone);
    cos/sin from `cos_sin`, [num_tokens, rotary_dim]: with rotary_dim < head_dim only the first
    rotary_dim channels of each head turn (transformers' partial rotary, modeling_phi3.py).
    The forward pass's fused ops compute it (the native kernel in float32 on the CPU).
    """
    current_fused_ops().rotary_(x, cos, sin, num_heads, head_dim)
