"""Linear methods (layers/linear_method.py): every packed form equals plain `x @ w_t (+ b)` at every row count.

The native panel kernel (kernels/gemm_cpu.cpp) is also checked path against path: its AVX2
and scalar code and its many-rows BLAS path agree with a float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from loomlm.layers.kernels import cpu_kernels
from loomlm.layers.linear import Linear
from loomlm.layers.linear_method import (
    TORCH_METHOD,
    MklPackedLinearMethod,
    NativeLinearMethod,
    select_linear_method,
)
from loomlm.layers.packed_gemm import packed_gemm_available

CPU = torch.device("cpu")
HAS_MKL = packed_gemm_available(CPU, torch.float32)
HAS_NATIVE = cpu_kernels() is not None
ROWS = (1, 2, 5, 6, 7, 31, 32, 95, 96, 128, 129, 700)


def _methods():
    out = []
    if HAS_MKL:
        out.append(pytest.param(MklPackedLinearMethod, id="mkl_packed"))
    if HAS_NATIVE:
        out.append(pytest.param(lambda: NativeLinearMethod(large_m=0), id="native-panels"))
        out.append(pytest.param(NativeLinearMethod, id="native-default"))
        out.append(pytest.param(lambda: NativeLinearMethod(large_m=1), id="native-blas"))
    return out


def _linear(bias: bool, in_features: int = 48, shards: dict[str, int] | None = None) -> Linear:
    gen = torch.Generator().manual_seed(0)
    layer = Linear(in_features, shards or {"q": 32, "k": 16, "v": 35}, bias=bias)  # 83 columns: a ragged panel
    for shard, (start, end) in layer.shard_offsets.items():
        layer.load_shard(shard, weight=torch.randn(end - start, in_features, generator=gen),
                         bias=torch.randn(end - start, generator=gen) if bias else None)
    return layer


@pytest.mark.parametrize("make_method", _methods())
@pytest.mark.parametrize("bias", [False, True])
def test_method_equals_plain_at_every_row_count(make_method, bias):
    layer = _linear(bias)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(rows, 48, generator=gen) for rows in ROWS]
    plain = [layer(x) for x in inputs]
    method = make_method()
    layer.process_weights(method)
    assert layer.method is method and layer.weight_state is not None
    for x, expected in zip(inputs, plain):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # A strided input (a column slice of a wider activation) gives the same result.
    wide = torch.randn(9, 60, generator=gen)
    torch.testing.assert_close(layer(wide[:, 5:53]), wide[:, 5:53] @ _linear(bias).weight_t + (
        _linear(bias).bias if bias else 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_method", _methods())
def test_processing_releases_the_plain_weight_and_refuses_later_loads(make_method):
    layer = _linear(bias=True)
    layer.process_weights(make_method())
    assert layer.weight_t.shape == (48, 83) and layer.weight_t.untyped_storage().nbytes() == 4
    with pytest.raises(RuntimeError, match="packed"):
        layer.load_shard("k", weight=torch.zeros(16, 48))


@pytest.mark.skipif(not HAS_NATIVE, reason="native CPU kernels not built")
@pytest.mark.parametrize("k,n", [(1, 1), (7, 16), (64, 17), (300, 50), (576, 3 * 64 + 5)])
def test_native_kernel_paths_agree_with_float64(k, n):
    kernels = cpu_kernels()
    gen = torch.Generator().manual_seed(k * 1000 + n)
    weight_t = torch.randn(k, n, generator=gen)
    bias = torch.randn(n, generator=gen)
    packed = kernels.pack_f32(weight_t)
    assert packed.shape == ((n + 15) // 16, k, 16)
    isas = ["scalar"] + (["avx2"] if kernels.gemm_isa() == "avx2" else [])
    for rows in (1, 3, 6, 13, 100):
        x = torch.randn(rows, k, generator=gen)
        reference = (x.double() @ weight_t.double() + bias.double()).float()
        # Float32 sums of k products: the error grows like sqrt(k) * eps * |x| |w|.
        tol = 1e-5 * max(1.0, k ** 0.5)
        for isa in isas:
            torch.testing.assert_close(kernels.gemm_f32(x, packed, n, bias, isa=isa), reference, rtol=tol, atol=tol)
        torch.testing.assert_close(kernels.gemm_f32(x, packed, n, bias, large_m=1), reference, rtol=tol, atol=tol)
        assert kernels.gemm_f32(x[:0], packed, n).shape == (0, n)


@pytest.mark.skipif(not HAS_NATIVE, reason="native CPU kernels not built")
def test_native_kernel_rejects_mismatched_inputs():
    kernels = cpu_kernels()
    packed = kernels.pack_f32(torch.randn(8, 20))
    with pytest.raises(RuntimeError, match="K=9"):
        kernels.gemm_f32(torch.randn(2, 9), packed, 20)
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.gemm_f32(torch.randn(2, 8), packed, 40)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.gemm_f32(torch.randn(2, 8, dtype=torch.float64), packed, 20)
    with pytest.raises(RuntimeError, match="unknown isa"):
        kernels.gemm_f32(torch.randn(2, 8), packed, 20, isa="avx9")


def test_selection_follows_device_dtype_and_name(monkeypatch):
    assert select_linear_method(CPU, torch.float64) is TORCH_METHOD
    assert select_linear_method(torch.device("meta"), torch.float32) is TORCH_METHOD
    assert select_linear_method(CPU, torch.float32, "torch") is TORCH_METHOD
    with pytest.raises(ValueError, match="unknown linear method"):
        select_linear_method(CPU, torch.float32, "fastest")
    monkeypatch.setenv("LOOMLM_PACKED_GEMM", "0")
    assert select_linear_method(CPU, torch.float32) is TORCH_METHOD
    monkeypatch.delenv("LOOMLM_PACKED_GEMM")
    if HAS_NATIVE:
        monkeypatch.setenv("LOOMLM_LINEAR_METHOD", "native")
        assert select_linear_method(CPU, torch.float32).name == "native"
    if HAS_MKL:
        assert select_linear_method(CPU, torch.float32, "mkl_packed").name == "mkl_packed"
    if HAS_MKL or HAS_NATIVE:
        assert select_linear_method(CPU, torch.float32, "auto").releases_plain


def test_engine_processes_its_linears_on_cpu(llm):
    runner = llm.llm_engine.model_runner
    assert runner.linear_method.name in ("native", "mkl_packed")
    assert all(m.method is runner.linear_method for m in runner.model.modules() if isinstance(m, Linear))
