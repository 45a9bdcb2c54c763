"""RMSNorm (Zhang & Sennrich 2019), as in Llama: x / rms(x) * weight, computed in float32.

`forward(x)` normalizes; `forward(x, residual)` first adds x into the residual
stream and normalizes the sum, returning both (vLLM's `fused_add_rms_norm`
interface). The arithmetic is the forward pass's fused ops (`layers/fused_ops.py`),
chosen by the model runner at load.
"""

from __future__ import annotations

import torch
from torch import nn

from loomlm.layers.forward_context import current_fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [num_tokens, hidden_size].

        Without residual: returns rms_norm(x). With it: returns (rms_norm(x + residual), x + residual),
        possibly computed in place in x's and residual's storage, so callers must not reuse them.
        """
        ops = current_fused_ops()
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
