"""MKL packed GEMM (layers/packed_gemm.py): packed linears equal plain `x @ w_t (+ b)` at every row count."""

from __future__ import annotations

import pytest
import torch

from loomlm.layers.linear import Linear
from loomlm.layers.packed_gemm import packed_gemm_available

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packed_gemm_available(CPU, torch.float32),
                                reason="MKL packed GEMM not available in this PyTorch build")


def _linear(bias: bool) -> Linear:
    gen = torch.Generator().manual_seed(0)
    layer = Linear(48, {"q": 32, "k": 16, "v": 32}, bias=bias)
    for shard, (start, end) in layer.shard_offsets.items():
        layer.load_shard(shard, weight=torch.randn(end - start, 48, generator=gen),
                         bias=torch.randn(end - start, generator=gen) if bias else None)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_plain_at_every_row_count(bias):
    layer = _linear(bias)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(rows, 48, generator=gen) for rows in (1, 2, 5, 31, 32, 128, 129, 700)]
    plain = [layer(x) for x in inputs]
    layer.pack()
    assert layer.packed_weight is not None
    for x, expected in zip(inputs, plain):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_packing_releases_the_plain_weight_and_refuses_later_loads():
    layer = _linear(bias=True)
    layer.pack()
    assert layer.weight_t.shape == (48, 80) and layer.weight_t.untyped_storage().nbytes() == 4
    with pytest.raises(RuntimeError, match="packed"):
        layer.load_shard("k", weight=torch.zeros(16, 48))


def test_packing_is_off_where_it_does_not_apply(monkeypatch):
    assert not packed_gemm_available(CPU, torch.float64)
    assert not packed_gemm_available(torch.device("meta"), torch.float32)
    monkeypatch.setenv("LOOMLM_PACKED_GEMM", "0")
    assert not packed_gemm_available(CPU, torch.float32)


def test_engine_packs_its_linears_on_cpu(llm):
    runner = llm.llm_engine.model_runner
    assert runner.packed_gemm
    assert all(m.packed_weight is not None for m in runner.model.modules() if isinstance(m, Linear))
