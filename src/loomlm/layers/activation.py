"""SwiGLU activation on a fused gate+up projection (Shazeer 2020, as in Llama's MLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loomlm.layers.kernels import cpu_kernels_for


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * intermediate] (gate, then up) -> silu(gate) * up, [num_tokens, intermediate].

    float32 on the CPU runs the native kernel (one pass, no temporaries); elsewhere PyTorch ops.
    """
    native = cpu_kernels_for(gate_up)
    if native is not None:
        return native.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
