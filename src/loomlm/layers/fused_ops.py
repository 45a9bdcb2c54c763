"""The model's small fused operations (RMSNorm, SwiGLU, rotary, the KV write, row argmax) as one
object chosen once at load, as vLLM's `CustomOp` picks `forward_cpu` / `forward_cuda` at construction.

`TorchFusedOps` is the reference: PyTorch ops, any device and dtype. `CpuNativeFusedOps` runs the
float32 CPU kernels of `kernels/fused_ops_cpu.cpp` and `paged_decode_cpu.cpp` (one pass per row,
no temporaries), falling back to the reference only for layouts the kernels do not take (a strided
row, partial rotary). `select_fused_ops` picks one for the model runner's device and dtype; the
runner hands it to the layers in the forward context (`ForwardBatch.ops`) and to the sampler, so no
layer looks at a tensor's device to choose a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loomlm.layers.kernels import cpu_kernels


class TorchFusedOps:
    """PyTorch implementations; the semantics every other implementation must reproduce."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [num_tokens, hidden] -> x / rms(x) * weight, computed in float32 (transformers' LlamaRMSNorm)."""
        # In float32, torch's fused rms_norm is bit-identical to LlamaRMSNorm; other dtypes
        # normalize in float32 as it does.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [num_tokens, hidden] -> (rms_norm(x + residual), x + residual), vLLM's
        fused_add_rms_norm. Implementations may write the results into x's and residual's storage."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: [num_tokens, 2 * I] (gate, then up) -> silu(gate) * up, [num_tokens, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int) -> None:
        """Rotate in place the first num_heads heads of each row of x [num_tokens, >= num_heads * head_dim]
        by cos/sin [num_tokens, rotary_dim] (rotate-half convention; rotary_dim < head_dim turns only
        the first rotary_dim channels of each head, transformers' partial rotary)."""
        rotary_dim = cos.shape[-1]
        heads = x[:, : num_heads * head_dim].unflatten(1, (num_heads, head_dim))[..., :rotary_dim]  # a view
        half = rotary_dim // 2
        rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
        heads.copy_(heads * cos.unsqueeze(1) + rotated * sin.unsqueeze(1))

    def reshape_and_cache(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write key, value [T, num_kv_heads, head_dim] into the pools [num_kv_heads, num_blocks,
        block_size, head_dim] at slot_mapping [T] int64 (slot = block * block_size + offset), vLLM's
        reshape_and_cache. A slot outside the pool raises IndexError (RuntimeError natively)."""
        num_kv_heads, num_blocks, block_size, head_dim = k_cache.shape
        pool_shape = (num_kv_heads, num_blocks * block_size, head_dim)
        k_cache.view(pool_shape).index_copy_(1, slot_mapping, key.transpose(0, 1))
        v_cache.view(pool_shape).index_copy_(1, slot_mapping, value.transpose(0, 1))

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_rows, vocab] -> [num_rows] int64, exactly `x.argmax(dim=-1)` (first maximal index; NaN wins)."""
        return x.argmax(dim=-1)


class CpuNativeFusedOps(TorchFusedOps):
    """The native float32 CPU kernels (`kernels/`); the same results as `TorchFusedOps` within float
    rounding (argmax and the KV write exactly). Only for float32 tensors on the CPU."""

    name = "cpu_native"

    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def rms_norm(self, x, weight, eps):
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        self.kernels.add_rms_norm_(x, residual, weight, eps)  # in place: x <- normed, residual <- sum
        return x, residual

    def silu_and_mul(self, gate_up):
        return self.kernels.silu_and_mul(gate_up)

    def rotary_(self, x, cos, sin, num_heads, head_dim):
        if x.stride(-1) != 1 or cos.shape[-1] != head_dim:  # the kernel turns whole, contiguous heads
            super().rotary_(x, cos, sin, num_heads, head_dim)
            return
        self.kernels.rotary_(x, cos, sin, num_heads, head_dim)

    def reshape_and_cache(self, key, value, k_cache, v_cache, slot_mapping):
        self.kernels.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)

    def argmax_rows(self, x):
        # ATen's CPU argmax is a scalar loop: ~2 ms per 32 rows of a 49K vocabulary.
        if x.dim() != 2 or x.shape[-1] == 0 or x.stride(-1) != 1:
            return super().argmax_rows(x)
        return self.kernels.argmax_rows(x)


TORCH_FUSED_OPS = TorchFusedOps()


def select_fused_ops(device: torch.device, dtype: torch.dtype) -> TorchFusedOps:
    """The native CPU ops for float32 on the CPU when the kernels are built (see `cpu_kernels`:
    LOOMLM_NATIVE_KERNELS=0 turns them off), else the PyTorch reference."""
    kernels = cpu_kernels() if device.type == "cpu" and dtype == torch.float32 else None
    return CpuNativeFusedOps(kernels) if kernels is not None else TORCH_FUSED_OPS
