"""Build (or load) the native CPU kernels now: `python -m loomlm.layers.kernels`.

`make install` runs this, so the first request of `loomlm serve` does not wait about a minute
for the compiler. Exits 0 either way: without a toolchain loomlm runs the PyTorch path.
"""

from __future__ import annotations

import logging

from loomlm.layers.kernels import cpu_kernels

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernels = cpu_kernels()
    if kernels is None:
        print("native CPU kernels not built (see the warning above): the PyTorch path will be used")
    else:
        print(f"native CPU kernels ready: float32 GEMM {kernels.gemm_isa()}, quantized GEMM {kernels.quant_isa()}")
