"""Linear methods: how a linear layer keeps its weight and computes y = x @ w_t (+ bias).

One method is chosen per model at load (`select_linear_method`) and every `Linear` and MoE
expert uses it, as vLLM's `LinearMethodBase` (`process_weights_after_loading`, `apply`) does
per quantization config. After loading, `process_weights` turns the plain weight
`weight_t` [in_features, out_features] into the method's own form (a packed copy), and the
layer releases the plain storage; `apply` then reads only that form.

Methods (CPU float32 unless noted):
- "torch": `x @ weight_t`, any device and dtype (the fallback).
- "mkl_packed": MKL's packed GEMM (packed_gemm.py). Fast on Intel CPUs.
- "native": our AVX2/FMA kernel on weights packed into 16-column panels
  (kernels/gemm_cpu.cpp). MKL runs its generic code path on AMD CPUs and reads a large weight
  several times at decode sizes; the native kernel streams each weight once per step, and with
  2 threads it also beats BLAS on prefill chunks. From `NATIVE_LARGE_M` rows up it unpacks
  panels chunk by chunk into a BLAS GEMM (benchmarks/gemm.py measures both).

"auto" picks "mkl_packed" on Intel CPUs and "native" elsewhere (AMD), each when available,
else the next one that is. The environment variable LOOMLM_LINEAR_METHOD overrides the choice
(auto, torch, mkl_packed, native); LOOMLM_PACKED_GEMM=0 means "torch".

- "gguf" (`GGUFLinearMethod`, `quantization="gguf"`, vLLM's name): layers whose weights came
  from a GGUF file as `QuantizedWeight` blocks keep them (kernels/quant_cpu.cpp). Below
  `float_rows` activation rows (decode), activations are quantized per block and meet the weight
  blocks in integer dot products, as llama.cpp: by default 16-bit activations for the 32-element
  block types and two 8-bit planes for the K-quants (LOOMLM_GGUF_ACTIVATION_PLANES=1 for
  llama.cpp's single 8-bit plane). From `float_rows` rows on (prefill, large batches), each panel
  of 16 weight rows is dequantized into cache and meets float32 activations in the float GEMM's
  micro-kernel (the fp32 result); the other layers use the float method.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from loomlm.layers.kernels import cpu_kernels, cpuinfo_field
from loomlm.layers.packed_gemm import pack_weight, packed_gemm_available, packed_linear

logger = logging.getLogger(__name__)

# Row count from which the native method hands the product to BLAS. Measured on an AMD EPYC
# (Zen 3, AVX2), 2 threads, since the micro-kernel keeps its accumulators in registers: the panel
# kernel beats the unpacked-BLAS path 1.1-2.7x from 96 to 1024 rows (e.g. [512] -> [1536] at 128
# rows, an MoE expert in a 512-token prefill chunk: 117 vs 76 GFLOP/s; [2048] -> [8192] at 512:
# 121 vs 97) and ties it at 2048 (benchmarks/gemm.py prints both per shape).
NATIVE_LARGE_M = 2048
METHOD_NAMES = ("auto", "torch", "mkl_packed", "native")


class LinearMethod:
    """y = x @ weight_t (+ bias) on the plain weight; the base of the packed methods.

    `process_weights(weight_t [in, out]) -> state`; `apply(state, x [T, in], weight_t, bias [out] | None)
    -> [T, out]`. `releases_plain`: the layer may drop weight_t's storage after processing.
    """

    name = "torch"
    releases_plain = False

    def process_weights(self, weight_t: torch.Tensor) -> Any:
        return weight_t

    def apply(self, state: Any, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = x @ weight_t
        return y if bias is None else y + bias


class MklPackedLinearMethod(LinearMethod):
    """MKL's packed GEMM (`cblas_sgemm_pack`): see packed_gemm.py."""

    name = "mkl_packed"
    releases_plain = True

    def process_weights(self, weight_t: torch.Tensor) -> Any:
        return pack_weight(weight_t)

    def apply(self, state: Any, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return packed_linear(x, state, weight_t, bias)


class NativeLinearMethod(LinearMethod):
    """Our panel-packed float32 GEMM (kernels/gemm_cpu.cpp), AVX2+FMA or scalar by the CPU's flags.

    `large_m`: from this row count on, BLAS on unpacked chunks (0: the panel kernel at every size).
    """

    name = "native"
    releases_plain = True

    def __init__(self, large_m: int = NATIVE_LARGE_M) -> None:
        kernels = cpu_kernels()
        if kernels is None:
            raise RuntimeError("the native CPU kernels are not built (see loomlm.layers.kernels)")
        self._kernels = kernels
        self.large_m = large_m

    def process_weights(self, weight_t: torch.Tensor) -> Any:
        return self._kernels.pack_f32(weight_t.contiguous())  # [ceil(out / 16), in, 16]

    def apply(self, state: Any, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self._kernels.gemm_f32(x, state, weight_t.shape[1], bias, large_m=self.large_m)


TORCH_METHOD = LinearMethod()

# GGML types quant_gemm computes on directly (gguf.GGMLQuantizationType values).
GGUF_KERNEL_TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field
class QuantizedWeight:
    """A linear weight kept in GGML blocks: `data` uint8 [out_features, row_bytes], row n = output n.

    `qtype`: the GGML type id (a key of GGUF_KERNEL_TYPES); `shape`: the logical (out, in), as
    the float weight's HF layout would be.
    """

    data: torch.Tensor
    qtype: int
    shape: tuple[int, int]

    def split(self, sizes: list[int], dim: int = 0) -> tuple[QuantizedWeight, ...]:
        """Split along the output rows (a fused checkpoint tensor into its shards), as Tensor.split."""
        if dim != 0:
            raise ValueError("GGML blocks split along the output rows only")
        parts = self.data.split(sizes, dim=0)
        return tuple(QuantizedWeight(part, self.qtype, (part.shape[0], self.shape[1])) for part in parts)


@dataclass(frozen=True, eq=False)
class _QuantGroup:
    start: int  # first output column of the group
    end: int
    data: torch.Tensor  # uint8 [end - start, row_bytes]
    qtype: int
    float_rows: int  # quant_gemm's float_rows for this group


def gguf_activation_planes() -> int:
    """LOOMLM_GGUF_ACTIVATION_PLANES: 2 (default) or 1. Raises ValueError for anything else.

    1 is llama.cpp's scheme, one 8-bit plane per activation block: on the default model (Q4_1)
    4-5 of 8 greedy continuations of 16 tokens equal the float32 path's and prompt log-probabilities
    differ by up to 0.63 nats (mean 0.07). 2 is the precision of a second 8-bit plane for the
    residual: 16-bit activations for the 32-element block types (the integer work of one plane),
    two 8-bit planes for the K-quants (twice the work): 8 of 8 equal, within 0.003 nats.
    """
    value = os.environ.get("LOOMLM_GGUF_ACTIVATION_PLANES", "2")
    if value not in ("1", "2"):
        raise ValueError(f"LOOMLM_GGUF_ACTIVATION_PLANES must be 1 or 2, got {value!r}")
    return int(value)


# The row count from which the float path beats the integer kernels, per GGML block family:
# AMD EPYC (AVX2), 2 threads, 16-bit activations, ms (integer vs float path):
# - the default model's 120 Q4_1 projections from memory: 8 rows 20.7 vs 22.9 (the former 4-row dot tiles),
#   12 rows 30.7 vs 28.3 (panels), 16 rows 41.2 vs 37.1, 32 rows 81 vs 54;
# - 12 [640, 2048] weights (Gemma 3's down projection), two 8-bit planes, AVX2 dequantizer:
#   Q4_K 2.7 vs 4.0 at 4 rows, 3.7 vs 3.4 at 6, 9.3 vs 5.8 at 16; Q6_K 3.2 vs 4.3 at 4, 5.0 vs 3.9 at 6.
FLOAT_ROWS_32 = 12
FLOAT_ROWS_K = 6
K_QUANT_TYPES = (12, 13, 14)


def default_float_rows(qtype: int) -> int:
    """The float path's row threshold for GGML type `qtype` when LOOMLM_GGUF_FLOAT_ROWS is unset."""
    return FLOAT_ROWS_K if qtype in K_QUANT_TYPES else FLOAT_ROWS_32


def gguf_float_rows() -> int | None:
    """LOOMLM_GGUF_FLOAT_ROWS: from this many activation rows (tokens in the step) every GGUF layer
    runs the float path (dequantized weight panels x float32 activations); 0 never; unset (None)
    `default_float_rows` per type. Raises ValueError for a negative or non-integer value.
    """
    value = os.environ.get("LOOMLM_GGUF_FLOAT_ROWS")
    if value is None:
        return None
    if not value.isdigit():
        raise ValueError(f"LOOMLM_GGUF_FLOAT_ROWS must be an integer >= 0, got {value!r}")
    return int(value)


class GGUFLinearMethod(LinearMethod):
    """GGUF blocks where a layer has them (`QuantizedWeight` shards), `float_method` elsewhere.

    `activation_planes` (None: `gguf_activation_planes()`): the activation precision of the integer
    kernels, see kernels/quant_cpu.cpp's quant_gemm. `float_rows` (None: `gguf_float_rows()`, and
    where that is unset `default_float_rows` of each shard's type): from this many rows of x the
    dequantized-panel float path runs instead (0: never).

    Adjacent shards of one type (q, k and v of one GGML type) are joined into one block matrix
    at load, so a fused layer is one kernel call; shards of different types (Q5_0 q and k,
    Q8_0 v in Gemma 3's Q4_K_M file) run one call each into their columns.
    """

    name = "gguf"
    releases_plain = True

    def __init__(self, float_method: LinearMethod, activation_planes: int | None = None,
                 float_rows: int | None = None) -> None:
        activation_planes = gguf_activation_planes() if activation_planes is None else activation_planes
        float_rows = gguf_float_rows() if float_rows is None else float_rows
        if float_rows is not None and float_rows < 0:
            raise ValueError(f"float_rows must be >= 0, got {float_rows}")
        kernels = cpu_kernels()
        if kernels is None:
            raise RuntimeError("quantization='gguf' needs the native CPU kernels (see loomlm.layers.kernels)")
        if activation_planes not in (1, 2):
            raise ValueError(f"activation_planes must be 1 or 2, got {activation_planes}")
        self._kernels = kernels
        self.float_method = float_method
        self.activation_planes = activation_planes
        self.float_rows = float_rows

    def process_weights(self, weight_t: torch.Tensor) -> Any:
        return ("float", self.float_method.process_weights(weight_t))

    def process_quantized(self, shards: list[tuple[int, int, QuantizedWeight]]) -> Any:
        """shards: (start column, end column, weight) in column order, covering the whole output."""
        groups: list[_QuantGroup] = []
        for start, end, weight in shards:
            last = groups[-1] if groups else None
            float_rows = default_float_rows(weight.qtype) if self.float_rows is None else self.float_rows
            if last is not None and last.qtype == weight.qtype and last.end == start:
                groups[-1] = _QuantGroup(last.start, end, torch.cat([last.data, weight.data]), weight.qtype,
                                         float_rows)
            else:
                groups.append(_QuantGroup(start, end, weight.data.contiguous(), weight.qtype, float_rows))
        return ("gguf", groups)

    def apply(self, state: Any, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kind, inner = state
        if kind == "float":
            return self.float_method.apply(inner, x, weight_t, bias)
        if x.stride(-1) != 1:
            x = x.contiguous()
        if len(inner) == 1:
            return self._group_gemm(x, inner[0], bias)
        y = torch.cat([self._group_gemm(x, g) for g in inner], dim=1)
        return y if bias is None else y + bias

    def _group_gemm(self, x: torch.Tensor, group: _QuantGroup, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [M, in] -> [M, group.end - group.start]
        # Positional: pybind11's keyword matching costs ~2 us a call, 121 calls a decode step.
        return self._kernels.quant_gemm(x, group.data, group.qtype, group.end - group.start, bias, "auto",
                                        self.activation_planes, group.float_rows)


def select_linear_method(device: torch.device, dtype: torch.dtype, name: str | None = None) -> LinearMethod:
    """The linear method for a model on `device` in `dtype` (module docstring for the rule).

    `name`: auto | torch | mkl_packed | native; None reads LOOMLM_LINEAR_METHOD (default auto).
    A named method that cannot run here (not the CPU, not float32, not built) falls back to
    "auto"'s choice with a warning. Raises ValueError for an unknown name.
    """
    if name is None:
        name = os.environ.get("LOOMLM_LINEAR_METHOD", "auto")
        if os.environ.get("LOOMLM_PACKED_GEMM", "1") == "0":
            name = "torch"
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown linear method {name!r}; expected one of {', '.join(METHOD_NAMES)}")
    if name == "torch" or device.type != "cpu" or dtype != torch.float32:
        return TORCH_METHOD
    available = {"native": cpu_kernels() is not None, "mkl_packed": packed_gemm_available(device, dtype)}
    methods = {"native": NativeLinearMethod, "mkl_packed": MklPackedLinearMethod}
    if name != "auto":
        if available[name]:
            return methods[name]()
        logger.warning("linear method %r is unavailable here; choosing automatically", name)
    order = ("mkl_packed", "native") if cpuinfo_field("vendor_id") == "GenuineIntel" else ("native", "mkl_packed")
    return next((methods[method]() for method in order if available[method]), TORCH_METHOD)

