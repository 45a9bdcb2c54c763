"""Quantized GGUF kernels (layers/kernels/quant_cpu.cpp) against gguf-py's reference dequantization.

- `quant_dequantize` equals `gguf.quants.dequantize` bit for bit, on random blocks (every bit
  pattern of the quants, valid fp16 scales), on `gguf.quants.quantize` output and on real GGUF rows.
- `quant_gemm` quantizes each activation block to 8 bits: x ~ d_x * q, d_x = max|x_block| / 127
  (blocks of 32 for Q4_0/Q4_1/Q5_0/Q8_0, of 256 for the K-quants), |x - d_x q| <= d_x / 2 per
  element. So against float64 x @ dequant(w).T, output (m, n) is off by at most
      sum_k |w[n, k]| * d_x[m, k] / 2   (activation quantization)
    + 1e-5 * sum_k (|w[n, k]| + |o[n, k]|) * (|x[m, k]| + d_x[m, k])   (fp32 rounding)
  where o is the weight's float offset that the kernel applies separately from its integer sums
  (Q4_1's m, the K-quants' dmin * min; 0 for the other types). With the activation quantization
  emulated here exactly (same fp32 ops), only the fp32 rounding term remains: that tight check
  catches any layout or scale slip that the loose bound would hide at large K.
- The AVX-512BW, AVX2 and scalar paths compute the same integer block sums; their outputs differ
  only by fp32 accumulation order (within the rounding term above). Where the CPU has no AVX-512,
  the AVX-512BW kernels run under SIMDe's emulation of the intrinsics (isa "avx512bw-simde", the
  module `simde_quant_kernels()` builds; `apt-get install libsimde-dev`, as .ci/run does).
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from loomlm.layers.kernels import cpu_kernels, simde_quant_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ toolchain to build the native kernels")

QT = GGMLQuantizationType
QTYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
CAN_QUANTIZE = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q8_0}  # gguf-py has only dequantize for the K-quants
# Byte ranges of each block's fp16 scales (d, and dmin / m where present), per gguf quants.py.
FP16_FIELDS = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q8_0: (0,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2),
               QT.Q6_K: (208,)}
# Byte ranges holding the quants: zeroed, the block dequantizes to its float offset o (see above).
QUANT_BYTES = {QT.Q4_1: (4, 20), QT.Q4_K: (16, 144), QT.Q5_K: (16, 176)}
M_VALUES = (1, 2, 3, 5, 17, 64)
N_VALUES = (1, 7, 33)
RFLOAT = 1e-5  # fp32 rounding allowance, relative to the magnitudes summed (<= 72 blocks at K = 2304)

_NATIVE_ISA = cpu_kernels().quant_isa() if cpu_kernels() is not None else "scalar"
_ISAS = ["scalar"] + (["avx2"] if _NATIVE_ISA in ("avx2", "avx512bw") else []) + \
    (["avx512bw"] if _NATIVE_ISA == "avx512bw" else ["avx512bw-simde"] if simde_quant_kernels() is not None else [])
_VECTOR_ISAS = [isa for isa in _ISAS if isa != "scalar"]


def _quant_gemm(x, w, qtype, n, bias=None, isa="auto", **kwargs) -> torch.Tensor:
    """quant_gemm of the native module, or of the SIMDe build for isa "avx512bw-simde"."""
    if isa == "avx512bw-simde":
        return simde_quant_kernels().quant_gemm(x, w, qtype, n, bias, "avx512bw", **kwargs)
    return cpu_kernels().quant_gemm(x, w, qtype, n, bias, isa, **kwargs)


def test_simde_build_emulates_avx512bw():
    """The emulated AVX-512BW kernels must run here: where the CPU has no AVX-512, only SIMDe tests them."""
    if _NATIVE_ISA == "avx512bw":
        pytest.skip("this CPU runs the AVX-512BW kernels natively")
    if simde_quant_kernels() is None:
        message = "SIMDe is not installed (`apt-get install libsimde-dev`): the AVX-512BW kernels go untested here"
        if os.environ.get("LOOMLM_REQUIRE_SIMDE") == "1":  # .ci/run installs it and sets this
            pytest.fail(message)
        pytest.skip(message)
    assert simde_quant_kernels().quant_isa() == "avx512bw"


def _k_values(qtype: GGMLQuantizationType) -> list[int]:
    block = GGML_QUANT_SIZES[qtype][0]
    return [block, 2 * block, 3 * block, 2304]


def _random_blocks(qtype: GGMLQuantizationType, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, row_bytes] uint8: random bytes for every quant bit, small finite fp16 scales."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n * k // block, block_bytes), dtype=np.uint8)
    for i, offset in enumerate(FP16_FIELDS[qtype]):
        scale = rng.uniform(1e-3, 2e-2, size=len(blocks)) * (rng.choice([-1, 1], size=len(blocks)) if i else 1)
        blocks[:, offset:offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


def _weights(qtype: GGMLQuantizationType, n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in CAN_QUANTIZE and seed % 2 == 0:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, qtype)
    return _random_blocks(qtype, n, k, rng)


def _offsets(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """[n, k] float64: the float offset o of each weight (0 where the kernel folds it into integers)."""
    if qtype not in QUANT_BYTES:
        return np.zeros(gguf.quants.quant_shape_from_byte_shape(w.shape, qtype))
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    lo, hi = QUANT_BYTES[qtype]
    blocks = w.reshape(-1, block_bytes).copy()
    blocks[:, lo:hi] = 0
    return gguf.quants.dequantize(blocks.reshape(w.shape), qtype).astype(np.float64)


def _act_scale(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """[M, K] float64: d_x of each element's activation block."""
    block = 256 if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K) else 32
    m, k = x.shape
    amax = np.abs(x.astype(np.float64)).reshape(m, k // block, block).max(axis=-1) / 127
    return np.repeat(amax, block, axis=1)


def _emulated_activations(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """[M, K] float64: d_x * q exactly as the kernel forms them (fp32 ops, round half to even)."""
    block = 256 if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K) else 32
    m, k = x.shape
    blocks = x.astype(np.float32).reshape(m, k // block, block)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -127, 127)
    d = (amax / np.float32(127)).astype(np.float32)
    return (d.astype(np.float64) * q).reshape(m, k)


def _gemm(x: torch.Tensor, w: np.ndarray, qtype: GGMLQuantizationType, bias: torch.Tensor | None = None,
          isa: str = "auto") -> np.ndarray:
    out = _quant_gemm(x, torch.from_numpy(w), int(qtype), w.shape[0], bias=bias, isa=isa)
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], w.shape[0])
    return out.numpy().astype(np.float64)


def _check_gemm(x: torch.Tensor, w: np.ndarray, qtype: GGMLQuantizationType, isa: str,
                bias: torch.Tensor | None = None) -> np.ndarray:
    """Asserts both checks of the module docstring; returns the kernel's output."""
    got = _gemm(x, w, qtype, bias, isa)
    x64 = x.numpy().astype(np.float64)
    w64 = gguf.quants.dequantize(w, qtype).astype(np.float64)
    b64 = bias.numpy().astype(np.float64) if bias is not None else 0.0
    dx = _act_scale(x64, qtype)
    rounding = RFLOAT * ((np.abs(x64) + dx) @ (np.abs(w64) + np.abs(_offsets(w, qtype))).T + np.abs(b64)) + 1e-30
    # Tight: activation quantization emulated, only fp32 rounding left.
    exact_acts = _emulated_activations(x.numpy(), qtype) @ w64.T + b64
    assert np.all(np.abs(got - exact_acts) <= rounding), f"{qtype.name} {isa}: max excess " \
        f"{np.max(np.abs(got - exact_acts) - rounding):.3g} over the fp32 rounding allowance"
    # The stated bound against the float64 product of the true activations.
    bound = 0.5 * (1 + 1e-4) * (dx @ np.abs(w64).T) + rounding
    assert np.all(np.abs(got - (x64 @ w64.T + b64)) <= bound), f"{qtype.name} {isa}: activation bound exceeded"
    return got


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_bit_for_bit(qtype):
    kernels = cpu_kernels()
    for seed, (n, k) in enumerate([(1, GGML_QUANT_SIZES[qtype][0]), (7, 768), (33, 2304), (64, 256 * 5)]):
        w = _weights(qtype, n, k, seed)
        got = kernels.quant_dequantize(torch.from_numpy(w), int(qtype), k).numpy()
        expected = gguf.quants.dequantize(w, qtype)
        assert got.shape == expected.shape == (n, k)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), f"{qtype.name} n={n} k={k}"
        # The float path's AVX2 dequantizer: the K-quants bit for bit; the 32-element blocks as
        # d * q + (zero point or m) in one FMA: equal values (d * q - 8 d gives +0 where gguf's
        # d * (q - 8) gives -0 for a negative d), Q4_1 within 1 ulp (gguf rounds twice).
        if "avx2" in _ISAS:
            fast = kernels.quant_dequantize(torch.from_numpy(w), int(qtype), k, isa="avx2").numpy()
            if qtype == QT.Q4_1:
                assert np.all(np.abs(fast - expected) <= np.spacing(np.abs(expected))), f"Q4_1 n={n} k={k}"
            elif GGML_QUANT_SIZES[qtype][0] == 32:
                assert np.array_equal(fast, expected), f"{qtype.name} avx2 n={n}"
            else:
                assert np.array_equal(fast.view(np.uint32), expected.view(np.uint32)), f"{qtype.name} avx2 n={n}"


@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_gemm_within_activation_quantization_bound(qtype, isa):
    gen = torch.Generator().manual_seed(int(qtype))
    for k in _k_values(qtype):
        for n in N_VALUES:
            w = _weights(qtype, n, k, seed=k + n)
            for m in M_VALUES:
                x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
                _check_gemm(x, w, qtype, isa)


@pytest.mark.parametrize("isa", _VECTOR_ISAS)
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_vector_and_scalar_paths_agree(qtype, isa):
    gen = torch.Generator().manual_seed(100 + int(qtype))
    # n = 517: several tasks on the thread pool and a ragged last panel; m = 7: row groups 4 + 3;
    # k = 96 / 768: an odd number of 32-element blocks (AVX-512BW pairs them in one zmm).
    for m, n, k in [(1, 517, 2304), (7, 517, 512), (64, 33, 256), (2, 9, 96 if qtype < QT.Q4_K else 768)]:
        w = _weights(qtype, n, k, seed=n + m)
        x = torch.randn(m, k, generator=gen)
        vector = _gemm(x, w, qtype, isa=isa)
        scalar = _gemm(x, w, qtype, isa="scalar")
        magnitude = (np.abs(x.numpy().astype(np.float64)) + _act_scale(x.numpy(), qtype)) @ \
            (np.abs(gguf.quants.dequantize(w, qtype)) + np.abs(_offsets(w, qtype))).T
        assert np.all(np.abs(vector - scalar) <= 2 * RFLOAT * magnitude + 1e-30), f"{qtype.name} {isa} m={m}"
        if isa == _NATIVE_ISA:
            assert np.array_equal(_gemm(x, w, qtype, isa="auto"), vector)  # auto picks the CPU's best


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_two_activation_planes_within_the_residual_bound(qtype):
    """activation_planes=2. K-quants: x ~ d1 q1 + d2 q2 (q2 the residual's 8-bit code), so each
    element is at most d2 / 2 <= d1 / 254 off: the one-plane bound / 254. 32-element blocks: one
    16-bit plane, d = max / 32767, at most d / 2 = d1 / 516 off. Plus fp32 rounding. Both ISAs, bias
    added once, and AVX2 and scalar agree."""
    gen = torch.Generator().manual_seed(200 + int(qtype))
    block = GGML_QUANT_SIZES[qtype][0]
    ratio = 254 if block == 256 else 2 * 32767 / 127
    # m = 6: plane pairs across row groups; m = 2: the 4-weight-row tile with 2 rows; n = 37: ragged tiles.
    for m, n, k in [(1, 33, 2 * block), (2, 37, 2 * block), (3, 7, 2304), (6, 17, block)]:
        w = _weights(qtype, n, k, seed=m + n + k)
        x = torch.randn(m, k, generator=gen) * 3
        bias = torch.randn(n, generator=gen)
        x64 = x.numpy().astype(np.float64)
        w64 = gguf.quants.dequantize(w, qtype).astype(np.float64)
        dx = _act_scale(x64, qtype)
        rounding = 2 * RFLOAT * ((np.abs(x64) + dx) @ (np.abs(w64) + np.abs(_offsets(w, qtype))).T + np.abs(
            bias.numpy())) + 1e-30
        bound = 0.5 * (1 + 1e-4) * (dx @ np.abs(w64).T) / ratio + rounding
        outs = {}
        for isa in _ISAS:
            got = _quant_gemm(x, torch.from_numpy(w), int(qtype), n, bias, isa,
                              activation_planes=2).numpy().astype(np.float64)
            assert np.all(np.abs(got - (x64 @ w64.T + bias.numpy())) <= bound), f"{qtype.name} {isa} m={m}"
            outs[isa] = got
        for isa in _VECTOR_ISAS:
            assert np.all(np.abs(outs[isa] - outs["scalar"]) <= rounding), f"{qtype.name} {isa}"
    with pytest.raises(RuntimeError, match="activation_planes"):
        cpu_kernels().quant_gemm(x, torch.from_numpy(w), int(qtype), n, activation_planes=3)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_float_path_matches_float_product(qtype):
    """float_rows: from that many activation rows the weights are dequantized and transposed per
    16-row panel (AVX2 for the 32-blocks) and met by float32 activations in the float GEMM's tiles,
    so only fp32 rounding separates it from x @ dequant(w).T. Ragged shapes: N not a multiple of the
    16-row panel, M not of the 6-row tile, strided rows."""
    gen = torch.Generator().manual_seed(11)
    block = GGML_QUANT_SIZES[qtype][0]
    # m = 13: two 6-row tiles and a 1-row tail per panel; n = 18 / 33: a ragged last panel.
    for m, n, k in [(1, 1, block), (3, 7, 2 * block), (4, 33, 2304), (9, 18, 3 * block), (13, 33, 2 * block)]:
        w = _weights(qtype, n, k, seed=m + n + k)
        wide = torch.randn(m, k + 32, generator=gen) * 3
        x = wide[:, 16:16 + k]
        bias = torch.randn(n, generator=gen)
        x64 = x.numpy().astype(np.float64)
        w64 = gguf.quants.dequantize(w, qtype).astype(np.float64)
        rounding = 2 * RFLOAT * (np.abs(x64) @ np.abs(w64).T + np.abs(bias.numpy())) + 1e-30
        outs = {}
        for isa in _ISAS:
            got = _quant_gemm(x, torch.from_numpy(w), int(qtype), n, bias, isa, activation_planes=2,
                              float_rows=m).numpy().astype(np.float64)
            assert np.all(np.abs(got - (x64 @ w64.T + bias.numpy())) <= rounding), f"{qtype.name} {isa} m={m}"
            outs[isa] = got
        # Below float_rows the integer path runs: it differs by the activation quantization.
        integer = cpu_kernels().quant_gemm(x, torch.from_numpy(w), int(qtype), n, bias, activation_planes=1,
                                           float_rows=m + 1).numpy().astype(np.float64)
        assert not np.array_equal(integer, outs["scalar"])
        for isa in _VECTOR_ISAS:
            assert np.all(np.abs(outs[isa] - outs["scalar"]) <= rounding), f"{qtype.name} {isa}"


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0, QT.Q6_K], ids=lambda q: q.name)
def test_gemm_bias_and_strided_rows(qtype):
    gen = torch.Generator().manual_seed(7)
    k = 512
    w = _weights(qtype, 45, k, seed=3)
    bias = torch.randn(45, generator=gen)
    wide = torch.randn(5, k + 64, generator=gen)
    x = wide[:, 32:32 + k]  # rows contiguous, stride(0) = k + 64
    for isa in _ISAS:
        with_bias = _check_gemm(x, w, qtype, isa, bias=bias)
        np.testing.assert_array_equal(with_bias, _gemm(x.contiguous(), w, qtype, bias, isa))
    empty = cpu_kernels().quant_gemm(torch.zeros(0, k), torch.from_numpy(w), int(qtype), 45)
    assert empty.shape == (0, 45)


def _gguf_rows(path, wanted: set[GGMLQuantizationType], rows: int = 48) -> dict:
    """{qtype: (name, [rows, row_bytes] uint8, K)}: the first rows of one 2-D tensor per wanted type."""
    found = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.tensor_type in wanted and tensor.tensor_type not in found and len(tensor.data.shape) == 2:
            data = np.array(tensor.data[:rows])  # a writable copy
            found[tensor.tensor_type] = (tensor.name, data, int(tensor.shape[0]))
    return found


@pytest.mark.parametrize("alias,qtypes", [
    ("gemma-3-270m", {QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.Q8_0}),
    ("smollm2-135m-instruct", {QT.Q4_1, QT.Q8_0}),
])
def test_real_gguf_rows(alias, qtypes):
    from loomlm.models.loader import resolve_model

    try:
        path = resolve_model(alias).weights_path
    except ValueError as e:  # the package is installed by `make test`; say how when it is not
        pytest.fail(f"{alias} is not available: {e}")
    found = _gguf_rows(path, qtypes)
    assert set(found) == qtypes, f"{alias}: found only {sorted(q.name for q in found)}"
    gen = torch.Generator().manual_seed(11)
    for qtype, (name, w, k) in found.items():
        got = cpu_kernels().quant_dequantize(torch.from_numpy(w), int(qtype), k).numpy()
        assert np.array_equal(got.view(np.uint32), gguf.quants.dequantize(w, qtype).view(np.uint32)), name
        x = torch.randn(3, k, generator=gen)
        for isa in _ISAS:
            _check_gemm(x, w, qtype, isa)


def test_errors_name_the_problem():
    kernels = cpu_kernels()
    w = torch.from_numpy(_weights(QT.Q4_0, 4, 64, seed=0))  # [4, 36]
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="K=48 is not a positive multiple of the Q4_0 block size 32"):
        kernels.quant_gemm(torch.randn(2, 48), w, int(QT.Q4_0), 4)
    with pytest.raises(RuntimeError, match="w has 36 bytes per row, but K=64 in Q4_1 takes 40"):
        kernels.quant_gemm(x, w, int(QT.Q4_1), 4)
    with pytest.raises(RuntimeError, match="K=64 is not a positive multiple of the Q4_K block size 256"):
        kernels.quant_gemm(x, w, int(QT.Q4_K), 4)
    with pytest.raises(RuntimeError, match="unsupported GGML type 1"):
        kernels.quant_gemm(x, w, int(QT.F16), 4)
    with pytest.raises(RuntimeError, match="unsupported GGML type 7"):
        kernels.quant_dequantize(w, int(QT.Q5_1), 64)
    with pytest.raises(RuntimeError, match="w has 4 rows, but n=5"):
        kernels.quant_gemm(x, w, int(QT.Q4_0), 5)
    with pytest.raises(RuntimeError, match="bias has 3 elements, expected 4"):
        kernels.quant_gemm(x, w, int(QT.Q4_0), 4, bias=torch.zeros(3))
    with pytest.raises(RuntimeError, match="unknown isa 'avx512'"):
        kernels.quant_gemm(x, w, int(QT.Q4_0), 4, isa="avx512")
    if _NATIVE_ISA != "avx512bw":
        with pytest.raises(RuntimeError, match="this CPU has no AVX-512F\\+AVX-512BW"):
            kernels.quant_gemm(x, w, int(QT.Q4_0), 4, isa="avx512bw")
    with pytest.raises(RuntimeError, match="uint8"):
        kernels.quant_gemm(x, w.to(torch.int8), int(QT.Q4_0), 4)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.quant_gemm(x.double(), w, int(QT.Q4_0), 4)
    with pytest.raises(RuntimeError, match="w has 36 bytes per row, but K=32"):
        kernels.quant_dequantize(w, int(QT.Q4_0), 32)
