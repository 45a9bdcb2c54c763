"""Optional native CPU kernels (float32), compiled on first use with torch's cpp_extension.

`cpu_kernels()` returns the compiled module, or None when it cannot be built (no
compiler, no ninja, `LOOMLM_NATIVE_KERNELS=0`): callers then use the pure
PyTorch path, which computes the same thing. The module holds:
- `paged_decode_attention` (paged_decode_cpu.cpp), the "cpu_native" decode backend, and
  `reshape_and_cache` (the KV write, attention.py);
- `rms_norm`, `add_rms_norm_`, `silu_and_mul`, `rotary_`, `argmax_rows` (fused_ops_cpu.cpp),
  reached through layers/norm.py, activation.py, rotary.py and sampler.py;
- `pack_f32`, `gemm_f32`, `gemm_isa` (gemm_cpu.cpp): float32 GEMM on panel-packed weights,
  the "native" linear method (layers/linear_method.py);
- `quant_gemm`, `quant_dequantize`, `quant_isa` (quant_cpu.cpp): GEMM/GEMV on GGUF-quantized
  weight blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) with 8-bit activations.
The build is cached on disk under a name that carries a digest of the sources
and of the CPU's flags, so an edited kernel (or header), or another CPU kind, is
rebuilt rather than loaded stale.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = ("paged_decode_cpu.cpp", "fused_ops_cpu.cpp", "gemm_cpu.cpp", "quant_cpu.cpp", "decoder_stack_cpu.cpp")
_HEADERS = ("vec_math.h", "float_tile.h")
# -fno-trapping-math: lets GCC turn the branches of vec_math.h's exp/sigmoid (clamps, sign
# selects) into blends, so the loops that call them vectorize; without it they ran scalar
# (silu_and_mul 9 ns per element). Results are unchanged: no FP exception is ever inspected.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]


@functools.cache
def cpu_kernels():
    if os.environ.get("LOOMLM_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        digest = hashlib.sha256()
        for name in _SOURCES + _HEADERS:
            digest.update((_DIR / name).read_bytes())
        digest.update(" ".join(_CFLAGS).encode())
        # -march=native targets the building CPU: a build cached on a shared disk by another CPU
        # kind (AVX-512 vs AVX2 hosts) must not be loaded here.
        digest.update(cpuinfo_field("flags").encode())
        logger.info("loading the native CPU kernels (compiled on first use, about a minute)")
        return load(name=f"loomlm_cpu_kernels_{digest.hexdigest()[:12]}", sources=[str(_DIR / s) for s in _SOURCES],
                    extra_include_paths=[str(_DIR)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # any build failure falls back to the PyTorch path
        logger.warning("native CPU kernels unavailable (%s); using the PyTorch path", exc)
        return None


@functools.cache
def cpuinfo_field(key: str) -> str:
    """The first value of `key` in /proc/cpuinfo ("flags", "vendor_id", ...); "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_kernels_for(x: torch.Tensor):
    """The native module when tensor `x` is float32 on the CPU and the kernels are built, else None."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    return cpu_kernels()
