"""RMSNorm (Zhang & Sennrich 2019), as in Llama: x / rms(x) * weight, computed in float32.

`forward(x)` normalizes; `forward(x, residual)` first adds x into the residual
stream and normalizes the sum, returning both (vLLM's `fused_add_rms_norm`
interface), which a float32 CPU run does in one pass per row with the native
kernel (`kernels/fused_ops_cpu.cpp`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loomlm.layers.kernels import cpu_kernels_for


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [num_tokens, hidden_size].

        Without residual: returns rms_norm(x). With it: returns (rms_norm(x + residual), x + residual);
        the native path computes both in place, in x's and residual's storage, so callers must not reuse them.
        """
        native = cpu_kernels_for(x)
        if native is not None:
            if residual is None:
                return native.rms_norm(x, self.weight, self.eps)
            native.add_rms_norm_(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # In float32, torch's fused rms_norm is bit-identical to transformers' LlamaRMSNorm;
        # other dtypes normalize in float32 as it does.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
