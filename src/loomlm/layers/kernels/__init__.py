"""Optional native kernels, compiled on first use with torch's cpp_extension (cached on disk).

`paged_decode_cpu()` returns the compiled module, or None when it cannot be built
(no compiler, no ninja, `LOOMLM_NATIVE_KERNELS=0`): callers then use the pure
PyTorch path, which computes the same thing.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


@functools.cache
def paged_decode_cpu():
    if os.environ.get("LOOMLM_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        source = Path(__file__).with_name("paged_decode_cpu.cpp")
        logger.info("loading the native paged decode kernel (compiled on first use, about a minute)")
        return load(name="loomlm_paged_decode_cpu", sources=[str(source)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # any build failure falls back to the PyTorch path
        logger.warning("native paged decode kernel unavailable (%s); using the PyTorch path", exc)
        return None
