"""MKL packed GEMM for the linear layers on CPU (float32): the weight is packed once, at load.

Why: a plain `x @ w_t` makes MKL re-pack the weight panels on every call. At
decode sizes (tens of rows) that packing costs about as much as the multiply
itself; with the weight packed ahead of time, a [32, 576] x [576, 3072]
product runs 1.8x faster and the [32, 576] x [576, 49152] LM head 1.9x on this
CPU (benchmarks/throughput.py measures the end-to-end effect). It is the same
MKL routine pair (`cblas_sgemm_pack` / `cblas_sgemm_compute`) that PyTorch's
inductor uses for frozen float32 linears, reached through the ops it
registers: `torch.ops.mkl._mkl_reorder_linear_weight` and `_mkl_linear`.

MKL documents a packed matrix for the row count it was packed with; PyTorch
passes that count with every call and falls back to an unpacked GEMM when the
input's differs. We pack once for `PACK_ROWS` and pass each call's own row
count, which MKL computes correctly because its packed buffer describes its
own layout. As that is not a documented promise, `packed_gemm_available`
checks it once per process against `x @ w_t` over a spread of row counts (on a
small weight: the check is about this MKL build's packed format, and costs
milliseconds), and the layers keep their plain weights when it fails (or when MKL is absent, the
device is not the CPU, the dtype is not float32, or LOOMLM_PACKED_GEMM=0).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

# The row count weights are packed for. Any count runs on the packed weight;
# this one measured as fast as any other from 4 to 512 rows here.
PACK_ROWS = 128
# Row counts checked: a single decode, odd sizes, and prefill-chunk sizes.
_CHECK_ROWS = (1, 3, 17, 32, 100, 513)


def pack_weight(weight_t: torch.Tensor) -> torch.Tensor:
    """weight_t: [in_features, out_features] float32 on CPU -> MKL's opaque packed copy of the weight."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight_t.t().contiguous(), PACK_ROWS)


def release_storage(weight_t: torch.Tensor) -> torch.Tensor:
    """A tensor of weight_t's shape and dtype backed by one element: the placeholder `_mkl_linear` takes
    for the plain weight it never reads when given the input's own row count."""
    return torch.empty(1, dtype=weight_t.dtype, device=weight_t.device).expand(weight_t.shape)


def return_freed_memory() -> None:
    """Hand the pages freed by `release_storage` back to the OS (glibc's malloc_trim; no-op elsewhere).

    Why: the released plain weights (a few MB each) sit in the malloc heap between packed
    copies, where glibc keeps them: without this, a packed model holds twice its size.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight_t: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x: [num_rows, in_features] -> [num_rows, out_features], equal to `x @ weight_t (+ bias)`."""
    # The row count passed is the input's own, so MKL always computes on the packed weight;
    # weight_t ([in, out], seen as [out, in]) is only read by PyTorch's fallback path.
    return torch.ops.mkl._mkl_linear(x, packed, weight_t.t(), bias, x.shape[0])


@functools.cache
def _packing_matches() -> bool:
    gen = torch.Generator().manual_seed(0)
    weight_t = torch.randn(96, 200, generator=gen)
    bias = torch.randn(weight_t.shape[1], generator=gen)
    packed = pack_weight(weight_t)
    for rows in _CHECK_ROWS:
        x = torch.randn(rows, weight_t.shape[0], generator=gen)
        if not torch.allclose(packed_linear(x, packed, weight_t, bias), x @ weight_t + bias, rtol=1e-4, atol=1e-4):
            return False
    return True


def packed_gemm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True when linears on this device and dtype may use packed weights.

    Needs the CPU, float32, a PyTorch built with MKL and oneDNN, LOOMLM_PACKED_GEMM not "0",
    and the start-up check above to pass.
    """
    if os.environ.get("LOOMLM_PACKED_GEMM", "1") == "0":
        return False
    if device.type != "cpu" or dtype != torch.float32:
        return False
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        return False
    try:
        ok = _packing_matches()
    except (RuntimeError, AttributeError) as exc:  # ops missing from this build
        logger.warning("MKL packed GEMM unavailable (%s); using plain matmuls", exc)
        return False
    if not ok:
        logger.warning("MKL packed GEMM disagrees with x @ w at some row count; using plain matmuls")
    return ok
