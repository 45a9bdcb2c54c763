"""SparseMoeBlock against transformers' own Mixtral / Qwen3-MoE sparse MoE blocks.

The weights reach SparseMoeBlock under the names a checkpoint written by
transformers' `save_pretrained` holds (read back from its safetensors file), so
these tests also pin the on-disk naming.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    PretrainedConfig,
    Qwen3MoeConfig,
)

from loomlm.layers.moe import SparseMoeBlock
from loomlm.layers.kernels import cpu_kernels
from loomlm.layers.linear_method import MklPackedLinearMethod, NativeLinearMethod
from loomlm.layers.packed_gemm import packed_gemm_available

HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K = 64, 32, 8, 2
# Scales applied to the N(0, 0.02) init: router logits of std ~1.6 (routing neither
# uniform nor one-hot), expert projections that keep activations O(1), so a 1e-5
# tolerance is tight relative to the outputs.
ROUTER_SCALE, GATE_UP_SCALE, DOWN_SCALE = 10.0, 6.0, 9.0


@dataclass
class MoeCase:
    reference: torch.nn.Module  # transformers' sparse MoE block of layer 0 (eager experts)
    saved: dict[str, torch.Tensor]  # layer 0's MoE tensors from the saved safetensors, names relative to the block
    renormalize: bool  # what the config implies for SparseMoeBlock


def _config(kind: str) -> PretrainedConfig:
    common = {"vocab_size": 128, "hidden_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_experts_per_tok": TOP_K}
    if kind == "mixtral":
        return MixtralConfig(**common, intermediate_size=INTERMEDIATE, num_local_experts=NUM_EXPERTS)
    norm = kind == "qwen3_moe_norm"
    return Qwen3MoeConfig(**common, intermediate_size=4 * INTERMEDIATE, moe_intermediate_size=INTERMEDIATE,
                          num_experts=NUM_EXPERTS, norm_topk_prob=norm)


def _build_case(kind: str, out_dir: Path) -> MoeCase:
    config = _config(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager").eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
        block.gate.weight.mul_(ROUTER_SCALE)
        block.experts.gate_up_proj.mul_(GATE_UP_SCALE)
        block.experts.down_proj.mul_(DOWN_SCALE)
    model.save_pretrained(str(out_dir))
    # On disk, Mixtral's block is "block_sparse_moe" (transformers renames it "mlp" in memory).
    prefix = "model.layers.0.block_sparse_moe." if kind == "mixtral" else "model.layers.0.mlp."
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        names = f.keys()
        saved = {k.removeprefix(prefix): f.get_tensor(k) for k in names if k.startswith(prefix)}
    renormalize = True if kind == "mixtral" else config.norm_topk_prob
    return MoeCase(block, saved, renormalize)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe_norm", "qwen3_moe_no_norm"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MoeCase:
    return _build_case(request.param, tmp_path_factory.mktemp(request.param))


def _block(renormalize: bool) -> SparseMoeBlock:
    return SparseMoeBlock(HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K, renormalize)


def _loaded_block(case: MoeCase, renormalize: bool | None = None) -> SparseMoeBlock:
    block = _block(case.renormalize if renormalize is None else renormalize)
    for name, tensor in case.saved.items():
        block.load_weight(name, tensor)
    return block


@torch.no_grad()
def _reference(case: MoeCase, x: torch.Tensor) -> torch.Tensor:
    out = case.reference(x.unsqueeze(0))  # the block takes [batch, seq, hidden]
    if isinstance(out, tuple):  # some versions also return the router logits
        out = out[0]
    return out.squeeze(0)


def _inputs(num_tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_saved_names_are_per_expert(case: MoeCase) -> None:
    expert_names = {name.split(".")[2] for name in case.saved if name.startswith("experts.")}
    assert expert_names in ({"w1", "w2", "w3"}, {"gate_proj", "up_proj", "down_proj"})
    assert len(case.saved) == 1 + 3 * NUM_EXPERTS
    block = _loaded_block(case)
    assert set(block.expected_weights()) == block.loaded_weights()


@torch.no_grad()
def test_matches_transformers(case: MoeCase) -> None:
    x = _inputs(37)
    block = _loaded_block(case)
    expected = _reference(case, x)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    # The routing is non-trivial: the other renormalisation choice changes the output.
    flipped = _loaded_block(case, renormalize=not case.renormalize)(x)
    assert (flipped - expected).abs().max() > 1e-2


@torch.no_grad()
def test_single_token(case: MoeCase) -> None:
    x = _inputs(1, seed=2)
    torch.testing.assert_close(_loaded_block(case)(x), _reference(case, x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_idle_experts(case: MoeCase) -> None:
    x = _inputs(3, seed=3)  # 3 tokens x top-2: at most 6 of the 8 experts get any token
    block = _loaded_block(case)
    _, expert_ids = block.route(x)
    assert expert_ids.unique().numel() < NUM_EXPERTS
    torch.testing.assert_close(block(x), _reference(case, x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fused_in_memory_names(case: MoeCase) -> None:
    """transformers 5's in-memory layout: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]."""
    block = _block(case.renormalize)
    for name, tensor in case.reference.state_dict().items():
        block.load_weight(name, tensor)
    assert set(block.expected_weights()) == block.loaded_weights()
    x = _inputs(37)
    torch.testing.assert_close(block(x), _reference(case, x), atol=1e-5, rtol=1e-5)


def _packing_methods():
    methods = []
    if packed_gemm_available(torch.device("cpu"), torch.float32):
        methods.append(pytest.param(MklPackedLinearMethod, id="mkl_packed"))
    if cpu_kernels() is not None:
        methods.append(pytest.param(NativeLinearMethod, id="native"))
    return methods


@pytest.mark.parametrize("make_method", _packing_methods())
@torch.no_grad()
def test_packed_matches_transformers(case: MoeCase, make_method) -> None:
    block = _loaded_block(case)
    method = make_method()
    block.gate.process_weights(method)
    block.process_weights(method)
    x = _inputs(37)
    torch.testing.assert_close(block(x), _reference(case, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="packed"):
        block.load_weight("gate.weight", torch.zeros(NUM_EXPERTS, HIDDEN))


def test_missing_expert_weight_is_reported(case: MoeCase) -> None:
    block = _block(case.renormalize)
    skipped = next(name for name in case.saved if name.startswith("experts.5.") and ("w2" in name or "down" in name))
    for name, tensor in case.saved.items():
        if name != skipped:
            block.load_weight(name, tensor)
    assert set(block.expected_weights()) - block.loaded_weights() == {"experts.5.down"}


@pytest.mark.parametrize("name, shape", [
    ("gate.weight", (NUM_EXPERTS, HIDDEN + 1)),
    ("experts.3.w1.weight", (HIDDEN, INTERMEDIATE)),  # transposed
    ("experts.3.down_proj.weight", (HIDDEN, INTERMEDIATE + 1)),
    ("experts.gate_up_proj", (NUM_EXPERTS, INTERMEDIATE, HIDDEN)),  # gate only, no up
])
def test_wrong_shape_names_the_tensor(name: str, shape: tuple[int, ...]) -> None:
    block = _block(True)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        block.load_weight(name, torch.zeros(shape))
    assert block.loaded_weights() == set()


@pytest.mark.parametrize("name", ["experts.3.w4.weight", "experts.8.w1.weight", "router.weight", "experts.3.w1.bias"])
def test_unknown_name_raises(name: str) -> None:
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        _block(True).load_weight(name, torch.zeros(INTERMEDIATE, HIDDEN))


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="top_k"):
        SparseMoeBlock(HIDDEN, INTERMEDIATE, num_experts=4, top_k=5, renormalize=True)
    with pytest.raises(ValueError, match="positive"):
        SparseMoeBlock(HIDDEN, 0, num_experts=4, top_k=2, renormalize=True)


@torch.no_grad()
def test_bfloat16_follows_float32(case: MoeCase) -> None:
    """In bf16 the routing weights are cast to bf16 before the weighted sum (transformers' Qwen3-MoE order)."""
    block = _loaded_block(case)
    x = _inputs(37)
    expected = block(x)
    _, ids_fp32 = block.route(x)
    block.to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    out = block(x_bf16)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    _, ids_bf16 = block.route(x_bf16)
    same_route = (ids_fp32.sort(dim=-1).values == ids_bf16.sort(dim=-1).values).all(dim=-1)  # [T]
    assert same_route.sum() >= 30  # a near-tie may flip a token's experts in bf16; most keep theirs
    torch.testing.assert_close(out[same_route].float(), expected[same_route], atol=0.05, rtol=0.05)
