"""Gated MLP activations on a fused gate+up projection: SwiGLU (Shazeer 2020, Llama) and GeGLU (Gemma)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from loomlm.layers.forward_context import current_fused_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (gate, then up) -> silu(gate) * up, [num_tokens, intermediate].

    The forward pass's fused ops compute it (the native kernel in float32 on the CPU: one pass,
    no temporaries).
    """
    return current_fused_ops().silu_and_mul(gate_up)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (gate, then up) -> gelu_tanh(gate) * up, [num_tokens, intermediate].

    GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`, modeling_gemma.py).
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation (GPT-2), written as it is (not F.gelu(approximate="tanh")) for parity."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# transformers' ACT2FN names of the plain (ungated) MLP activations OPT and GPT-2 checkpoints use
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation_fn(name: str, model: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation transformers' ACT2FN[name] computes. Raises ValueError (naming `model`) for others."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {model} activation_function {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
