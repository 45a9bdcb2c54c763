"""The native fused CPU ops (`CpuNativeFusedOps`, kernels/fused_ops_cpu.cpp) equal the PyTorch
reference (`TorchFusedOps`) and the torch functions both stand for; the runner chooses once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loomlm.layers.forward_context import ForwardBatch, current_fused_ops, forward_context
from loomlm.layers.fused_ops import TORCH_FUSED_OPS, select_fused_ops
from loomlm.layers.kernels import cpu_kernels
from loomlm.layers.norm import RMSNorm

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ toolchain to build the native kernels")

ROWS = [1, 3, 32, 300]  # 300 rows x 576 spans several parallel tasks
NATIVE = select_fused_ops(torch.device("cpu"), torch.float32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_selected_once_for_device_and_dtype():
    assert NATIVE.name == "cpu_native"
    assert select_fused_ops(torch.device("cpu"), torch.bfloat16) is TORCH_FUSED_OPS
    assert select_fused_ops(torch.device("meta"), torch.float32) is TORCH_FUSED_OPS


@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_and_fused_residual_add(rows):
    g = _gen(rows)
    weight = torch.rand(576, generator=g) + 0.5
    x = torch.randn(rows, 576, generator=g) * 3
    residual = torch.randn(rows, 576, generator=g)
    for ops in (NATIVE, TORCH_FUSED_OPS):
        torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5),
                                   rtol=1e-6, atol=1e-6)
        expected_sum = x + residual
        out, new_residual = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
        torch.testing.assert_close(new_residual, expected_sum, rtol=0, atol=0)
        torch.testing.assert_close(out, F.rms_norm(expected_sum, (576,), weight, 1e-5), rtol=1e-6, atol=1e-6)


def test_layers_use_the_forward_contexts_ops():
    """RMSNorm computes with the ops of the forward pass it runs in (the reference outside one)."""
    calls = []

    class Recording(type(NATIVE)):
        def rms_norm(self, x, weight, eps):
            calls.append("rms_norm")
            return super().rms_norm(x, weight, eps)

    norm, x = RMSNorm(64), torch.randn(2, 64, generator=_gen(1))
    assert current_fused_ops() is TORCH_FUSED_OPS
    expected = norm(x)
    empty = torch.zeros(0, dtype=torch.int64)
    with forward_context(ForwardBatch(empty, empty, 0, None, [], ops=Recording(cpu_kernels()))):
        torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    assert calls == ["rms_norm"]


@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul(rows):
    # wide range: large |gate| exercises both branches of the sigmoid and its saturation
    gate_up = torch.randn(rows, 2 * 1536, generator=_gen(rows)) * 12
    gate, up = gate_up.chunk(2, dim=-1)
    for ops in (NATIVE, TORCH_FUSED_OPS):
        torch.testing.assert_close(ops.silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", ROWS)
def test_rotary_in_place_on_leading_heads(rows):
    heads, kv_heads, head_dim = 9, 3, 64
    g = _gen(rows)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g)
    angles = torch.rand(rows, head_dim // 2, generator=g) * 100
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rotated = heads + kv_heads
    x = qkv[:, : rotated * head_dim].view(rows, rotated, head_dim)
    half = head_dim // 2
    expected = x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]
    for ops in (NATIVE, TORCH_FUSED_OPS):
        ours = qkv.clone()
        ops.rotary_(ours, cos, sin, rotated, head_dim)
        torch.testing.assert_close(ours[:, : rotated * head_dim].view_as(x), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(ours[:, rotated * head_dim:], qkv[:, rotated * head_dim:])  # v untouched


def test_partial_rotary_and_float64_match():
    """Layouts the kernels do not take (partial rotary) fall back to the reference inside the
    native ops; float64 through the reference agrees with the float32 kernels."""
    g = _gen(7)
    x, residual, weight = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g), torch.ones(64)
    out64, res64 = TORCH_FUSED_OPS.add_rms_norm(x.double(), residual.double(), weight.double(), 1e-6)
    out32, res32 = NATIVE.add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    torch.testing.assert_close(out64.float(), out32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res64.float(), res32)
    gate_up = torch.randn(5, 32, generator=g) * 5
    torch.testing.assert_close(TORCH_FUSED_OPS.silu_and_mul(gate_up.double()).float(), NATIVE.silu_and_mul(gate_up),
                               rtol=1e-5, atol=1e-5)
    qkv = torch.randn(5, 3 * 16, generator=g)
    cos, sin = torch.rand(5, 16, generator=g), torch.rand(5, 16, generator=g)
    a, b = qkv.double(), qkv.clone()
    TORCH_FUSED_OPS.rotary_(a, cos.double(), sin.double(), 2, 16)
    NATIVE.rotary_(b, cos, sin, 2, 16)
    torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5)
    partial_cos, partial_sin = cos[:, :8], sin[:, :8]  # rotary_dim 8 of head_dim 16
    a, b = qkv.clone(), qkv.clone()
    TORCH_FUSED_OPS.rotary_(a, partial_cos, partial_sin, 2, 16)
    NATIVE.rotary_(b, partial_cos, partial_sin, 2, 16)
    assert torch.equal(a, b) and torch.equal(a[:, 8:16], qkv[:, 8:16])  # channels past rotary_dim untouched


def test_argmax_rows_matches_torch_argmax():
    """The native argmax gives torch.argmax's answer: the first maximum on ties, the first NaN of a
    row holding one, index 0 for an all -inf row, on strided rows and at vocabulary sizes that are
    not a multiple of the vector width."""
    gen = _gen(7)
    for vocab in (1, 5, 63, 64, 65, 1000, 49152):
        x = torch.randn(9, vocab, generator=gen)
        x[1] = 0.0  # all tied: index 0
        x[2, vocab // 2:] = 3.0  # tie between later positions: the first
        x[3, vocab - 1] = float("nan")
        x[4, :] = float("-inf")
        x[5, vocab // 3] = float("nan")
        x[5, 0] = float("inf")
        x[6, vocab - 1] = float("inf")
        x[7] = x[7].round()  # many ties at the max
        torch.testing.assert_close(cpu_kernels().argmax_rows(x), x.argmax(dim=-1), rtol=0, atol=0)
        torch.testing.assert_close(NATIVE.argmax_rows(x), x.argmax(dim=-1), rtol=0, atol=0)
    wide = torch.randn(4, 300, generator=gen)
    strided = wide[:, :257]  # rows 300 apart
    torch.testing.assert_close(NATIVE.argmax_rows(strided), strided.argmax(dim=-1), rtol=0, atol=0)
    column_major = wide.t()  # last dim not contiguous: the torch path
    torch.testing.assert_close(NATIVE.argmax_rows(column_major), column_major.argmax(dim=-1), rtol=0, atol=0)
