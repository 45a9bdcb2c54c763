"""Optional native CPU kernels (float32), compiled on first use with torch's cpp_extension.

`cpu_kernels()` returns the compiled module, or None when it cannot be built (no
compiler, no ninja, `LOOMLM_NATIVE_KERNELS=0`): callers then use the pure
PyTorch path, which computes the same thing. The module holds:
- `paged_decode_attention` (paged_decode_cpu.cpp), the "cpu_native" decode backend, and
  `reshape_and_cache` (the KV write);
- `rms_norm`, `add_rms_norm_`, `silu_and_mul`, `rotary_`, `argmax_rows` (fused_ops_cpu.cpp);
  these and the KV write are `CpuNativeFusedOps` (layers/fused_ops.py), chosen once at load;
- `pack_f32`, `gemm_f32`, `gemm_isa` (gemm_cpu.cpp): float32 GEMM on panel-packed weights,
  the "native" linear method (layers/linear_method.py);
- `quant_gemm`, `quant_dequantize`, `quant_isa` (quant_cpu.cpp): GEMM/GEMV on GGUF-quantized
  weight blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) with 8- or 16-bit activations.
`simde_quant_kernels()` (tests only) builds quant_cpu.cpp a second time with SIMDe emulating the
x86 intrinsics, so that its AVX-512BW kernels are tested on CPUs without AVX-512.
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

logger = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = ("paged_decode_cpu.cpp", "fused_ops_cpu.cpp", "gemm_cpu.cpp", "quant_cpu.cpp", "decoder_stack_cpu.cpp")
_HEADERS = ("vec_math.h", "float_tile.h", "simde_x86.h")
# SIMDe's headers (Debian's libsimde-dev), for simde_quant_kernels only.
SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")
# -fno-trapping-math: lets GCC turn the branches of vec_math.h's exp/sigmoid (clamps, sign
# selects) into blends, so the loops that call them vectorize; without it they ran scalar
# (silu_and_mul 9 ns per element). Results are unchanged: no FP exception is ever inspected.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]


def _build(prefix: str, sources: tuple[str, ...], cflags: list[str]):
    """Compiles (or loads the cached build of) `sources` into a module named after their digest."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256()
    for name in _SOURCES + ("quant_simde.cpp",) + _HEADERS:  # quant_simde.cpp includes quant_cpu.cpp
        digest.update((_DIR / name).read_bytes())
    digest.update(" ".join(cflags).encode())
    # -march=native targets the building CPU: a build cached on a shared disk by another CPU
    # kind (AVX-512 vs AVX2 hosts) must not be loaded here.
    digest.update(cpuinfo_field("flags").encode())
    return load(name=f"{prefix}_{digest.hexdigest()[:12]}", sources=[str(_DIR / s) for s in sources],
                extra_include_paths=[str(_DIR)], extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def cpu_kernels():
    if os.environ.get("LOOMLM_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        logger.info("loading the native CPU kernels (compiled on first use, about a minute)")
        return _build("loomlm_cpu_kernels", _SOURCES, _CFLAGS)
    except Exception as exc:  # any build failure falls back to the PyTorch path
        logger.warning("native CPU kernels unavailable (%s); using the PyTorch path", exc)
        return None


@functools.cache
def simde_quant_kernels():
    """Tests only: `quant_gemm` / `quant_dequantize` / `quant_isa` of quant_cpu.cpp built with SIMDe
    emulating every x86 intrinsic (quant_simde.cpp), its "auto" ISA AVX-512BW on any CPU.

    Returns the module, or None where SIMDe's headers (Debian's libsimde-dev) are not installed
    or the build fails. Built for the baseline x86-64 ISA, not -march=native: with the host's AVX2
    enabled, SIMDe would mix its emulated types with the native ones. Slow (portable code): for
    correctness tests only.
    """
    if not SIMDE_HEADER.exists():
        return None
    try:
        return _build("loomlm_quant_simde", ("quant_simde.cpp",), ["-O2", "-fopenmp"])
    except Exception as exc:
        logger.warning("SIMDe build of the quantized kernels failed (%s)", exc)
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
