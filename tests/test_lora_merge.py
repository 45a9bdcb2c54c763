"""Merged LoRA adapters against peft's `add_weighted_adapter` on a tiny random Llama: every
strategy (dare_* under one seed) gives peft's merged lora_A / lora_B; a single adapter comes
back unchanged; different ranks merge exactly (linear by concatenation, ties on the dense
deltas as peft's ties_svd); MergeConfig validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from loomlm.lora.adapter import LoRAAdapter, LoRAWeights, load_peft_adapter
from loomlm.lora.merge import MergeConfig, merge_adapters

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    # name: (rank, alpha, targets, rsLoRA); the first three share a rank, as peft's merges demand,
    # and overlap on v_proj / the MLP with different scalings.
    "attn": (8, 16, ATTN, False),
    "mlp-rs": (8, 4, ["v_proj"] + MLP, True),
    "all": (8, 8, ATTN + MLP, False),
    "attn-r4": (4, 8, ["q_proj", "v_proj"], False),
}
NUM_LAYERS = 2
SEED = 1234
_MODULE = re.compile(r"layers\.(\d+)\.((?:self_attn|mlp)\.\w+)$")


@pytest.fixture(scope="module")
def base_dir(make_tiny_model_dir) -> Path:
    return make_tiny_model_dir("llama")


@pytest.fixture(scope="module")
def adapter_dirs(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ADAPTERS made with peft, every LoRA weight from N(0, 0.3) (peft's default B is zero)."""
    out_root = tmp_path_factory.mktemp("merge-adapters")
    dirs = {}
    for i, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(200 + i)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                use_rslora=rslora, init_lora_weights=False))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.normal_(0.0, 0.3)
        dirs[name] = out_root / name
        model.save_pretrained(str(dirs[name]))
    return dirs


def load(adapter_dirs: dict[str, Path], names: tuple[str, ...], dtype: torch.dtype = torch.float32
         ) -> list[LoRAAdapter]:
    return [load_peft_adapter(name, adapter_dirs[name], NUM_LAYERS, dtype) for name in names]


def peft_model_with(base_dir: Path, adapter_dirs: dict[str, Path], names: tuple[str, ...]) -> PeftModel:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                      str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model


@torch.no_grad()
def peft_merge(base_dir: Path, adapter_dirs: dict[str, Path], config: MergeConfig, seed: int
               ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """peft's merged adapter: {(layer, "self_attn.q_proj"): (lora_A [r, in], lora_B [out, r], scaling)}."""
    lora_model = peft_model_with(base_dir, adapter_dirs, config.ids).base_model
    inject = lora_model.inject_adapter

    def inject_then_seed(*args, **kwargs):
        # peft creates the merged adapter's layers (nn.Linear draws its init from the RNG)
        # before merging: seed here so that its dare_* pruning starts from `seed` as ours does.
        inject(*args, **kwargs)
        torch.manual_seed(seed)

    lora_model.inject_adapter = inject_then_seed
    lora_model.add_weighted_adapter(list(config.ids), list(config.weights), "merged",
                                    combination_type=config.merge_strategy, density=config.density,
                                    majority_sign_method=config.majority_sign_method)
    merged = {}
    for module_name, module in lora_model.model.named_modules():
        if isinstance(module, LoraLayer) and "merged" in module.lora_A:
            match = _MODULE.search(module_name)
            merged[(int(match[1]), match[2])] = (module.lora_A["merged"].weight.clone(),
                                                 module.lora_B["merged"].weight.clone(), module.scaling["merged"])
    return merged


def ours_merge(adapter_dirs: dict[str, Path], config: MergeConfig, seed: int) -> LoRAAdapter:
    adapters = load(adapter_dirs, config.ids)
    torch.manual_seed(seed)
    return merge_adapters("merged", adapters, config)


@pytest.mark.parametrize(("strategy", "density", "sign_method"), [
    ("linear", 1.0, "total"),
    ("ties", 0.5, "total"),
    ("ties", 0.5, "frequency"),
    ("dare_linear", 0.5, "total"),
    ("dare_ties", 0.5, "total"),
    ("dare_ties", 0.5, "frequency"),
])
def test_merge_matches_peft_add_weighted_adapter(base_dir, adapter_dirs, strategy, density, sign_method):
    # A negative weight (peft subtracts that adapter) and an rsLoRA adapter (not first: peft
    # would then scale its merged adapter by sqrt(r), huggingface/peft#3449).
    config = MergeConfig(ids=("attn", "mlp-rs", "all"), weights=(0.7, -0.4, 1.3), merge_strategy=strategy,
                         density=density, majority_sign_method=sign_method)
    reference = peft_merge(base_dir, adapter_dirs, config, SEED)
    ours = ours_merge(adapter_dirs, config, SEED)
    # Union of the targets: all seven projections in both layers.
    assert sorted(ours.weights) == sorted(reference) and len(reference) == 7 * NUM_LAYERS
    for key, (lora_a, lora_b, scaling) in reference.items():
        w = ours.weights[key]
        assert w.scaling == scaling == 1.0
        assert w.a_t.shape == (lora_a.shape[1], 8) and w.b_t.shape == (8, lora_b.shape[0])
        torch.testing.assert_close(w.a_t.t(), lora_a, rtol=0, atol=1e-6, msg=f"{key} lora_A")
        torch.testing.assert_close(w.b_t.t(), lora_b, rtol=0, atol=1e-6, msg=f"{key} lora_B")
    if strategy != "linear":
        # The strategy did prune: not the plain weighted sum.
        linear = ours_merge(adapter_dirs, MergeConfig(ids=config.ids, weights=config.weights), SEED)
        assert any(not torch.equal(ours.weights[k].a_t, linear.weights[k].a_t) for k in reference)
    if strategy.startswith("dare"):
        # The seed matters (random pruning), so the parity above is not vacuous.
        other = ours_merge(adapter_dirs, config, SEED + 1)
        assert any(not torch.equal(ours.weights[k].a_t, other.weights[k].a_t) for k in reference)


@pytest.mark.parametrize("strategy", ["linear", "dare_ties"])
def test_single_adapter_merges_linearly_to_its_own_update(adapter_dirs, strategy):
    # As in peft, one adapter is always merged "linear": weight w gives w times its update,
    # with no pruning and no random draw, whatever the strategy.
    (adapter,) = load(adapter_dirs, ("mlp-rs",))
    rng_before = torch.get_rng_state()
    merged = merge_adapters("m", [adapter], MergeConfig(ids=("mlp-rs",), weights=(-0.5,), merge_strategy=strategy,
                                                        density=0.5))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert sorted(merged.weights) == sorted(adapter.weights)
    for key, w in adapter.weights.items():
        m = merged.weights[key]
        assert m.scaling == 1.0
        torch.testing.assert_close(m.scaling * m.a_t @ m.b_t, -0.5 * w.scaling * w.a_t @ w.b_t, rtol=0, atol=1e-6)


def test_merge_keeps_the_adapters_dtype(adapter_dirs):
    # bfloat16 factors are weighted and summed in float32 (peft's weights are float32) and
    # rounded once: exactly the float32 merge of the same values, cast to bfloat16.
    config = MergeConfig(ids=("attn", "mlp-rs", "all"), weights=(0.7, -0.4, 1.3))
    bf16 = load(adapter_dirs, config.ids, torch.bfloat16)
    upcast = [LoRAAdapter(a.name, {k: LoRAWeights(w.a_t.float(), w.b_t.float(), w.scaling)
                                   for k, w in a.weights.items()}) for a in bf16]
    merged = merge_adapters("m", bf16, config)
    reference = merge_adapters("m", upcast, config)
    for key, w in merged.weights.items():
        assert w.a_t.dtype == w.b_t.dtype == torch.bfloat16
        assert torch.equal(w.a_t, reference.weights[key].a_t.bfloat16())
        assert torch.equal(w.b_t, reference.weights[key].b_t.bfloat16())


@pytest.mark.parametrize(("strategy", "sign_method"), [("ties", "total"), ("ties", "frequency"),
                                                      ("dare_ties", "total")])
def test_ties_over_different_ranks_merges_the_dense_deltas_as_peft_svd(base_dir, adapter_dirs, strategy, sign_method):
    """r=8 with r=4 (peft's plain ties refuses): our update equals peft's "ties_svd" /
    "dare_ties_svd" before its truncating SVD, dare's pruning under one seed included."""
    config = MergeConfig(ids=("attn", "attn-r4"), weights=(1.0, -0.6), merge_strategy=strategy, density=0.5,
                         majority_sign_method=sign_method)
    with pytest.raises(ValueError, match="same r"):
        peft_model_with(base_dir, adapter_dirs, config.ids).base_model.add_weighted_adapter(
            list(config.ids), list(config.weights), "merged", combination_type=strategy, density=0.5)
    # peft's "ties_svd" merges each module's get_delta_weight()s with merge_utils.ties / dare_ties,
    # then truncates by SVD; the reference is that merge before the SVD, module by module in peft's order.
    from peft.utils import merge_utils

    peft_model = peft_model_with(base_dir, adapter_dirs, config.ids)
    ours = ours_merge(adapter_dirs, config, SEED)
    torch.manual_seed(SEED)
    compared = 0
    for module_name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            names = [n for n in config.ids if n in module.lora_A]
            weights = torch.tensor([w for n, w in zip(config.ids, config.weights) if n in module.lora_A])
            with torch.no_grad():
                deltas = [module.get_delta_weight(n) for n in names]
                if strategy == "ties":
                    theirs = merge_utils.ties(deltas, weights, 0.5, sign_method)
                else:
                    theirs = merge_utils.dare_ties(deltas, weights, 0.5, sign_method)
            match = _MODULE.search(module_name)
            w = ours.weights[(int(match[1]), match[2])]
            torch.testing.assert_close((w.a_t @ w.b_t).t() * w.scaling, theirs, rtol=1e-5, atol=1e-6, msg=module_name)
            assert w.rank == min(theirs.shape)
            compared += 1
    assert compared == 2 * 4  # q, k, v, o in both layers (attn-r4 only on q and v)


def test_dense_merge_too_large_is_refused(adapter_dirs, monkeypatch):
    import loomlm.lora.merge as merge_module

    monkeypatch.setattr(merge_module, "MAX_DENSE_MERGE_BYTES", 1024)
    config = MergeConfig(ids=("attn", "attn-r4"), weights=(1.0, 1.0), merge_strategy="ties", density=0.5)
    with pytest.raises(ValueError, match=r"dense deltas.*'attn' \(r=8\), 'attn-r4' \(r=4\)|"
                                         r"'attn' \(r=8\), 'attn-r4' \(r=4\).*dense deltas"):
        merge_adapters("m", load(adapter_dirs, config.ids), config)
    with pytest.raises(ValueError, match="2 ids"):
        merge_adapters("m", load(adapter_dirs, ("attn",)), config)


@pytest.mark.parametrize("weights", [(0.6, 0.4), (1.0, -0.5)])
def test_linear_merge_of_different_ranks_is_the_exact_weighted_sum(adapter_dirs, weights):
    """r=8 with r=4 (peft refuses): every module's update is sum_i w_i s_i B_i A_i exactly, one
    update of rank 12 where both adapters take part; dare_linear at density 1 is the same."""
    names = ("attn", "attn-r4")
    parts = load(adapter_dirs, names)
    merged = merge_adapters("m", parts, MergeConfig(ids=names, weights=weights))
    assert set(merged.weights) == set(parts[0].weights) | set(parts[1].weights)
    for key, w in merged.weights.items():
        expected = sum(weight * p.weights[key].scaling * (p.weights[key].a_t @ p.weights[key].b_t)
                       for weight, p in zip(weights, parts) if key in p.weights)
        torch.testing.assert_close(w.scaling * (w.a_t @ w.b_t), expected, rtol=1e-5, atol=1e-6)
        assert w.rank == sum(p.weights[key].rank for p in parts if key in p.weights)
    dare = merge_adapters("m", parts, MergeConfig(ids=names, weights=weights, merge_strategy="dare_linear",
                                                 density=1.0))
    for key, w in dare.weights.items():
        torch.testing.assert_close(w.a_t @ w.b_t, merged.weights[key].a_t @ merged.weights[key].b_t)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ids": (), "weights": ()}, "cannot be empty"),
    ({"ids": "attn", "weights": (1.0,)}, "must be a list"),
    ({"ids": ("a", "b"), "weights": (1.0,)}, "2 ids but 1 weights"),
    ({"ids": ("a", "a"), "weights": (1.0, 1.0)}, r"repeat: \['a'\]"),
    ({"ids": ("a", ""), "weights": (1.0, 1.0)}, "non-empty string"),
    ({"ids": ("a",), "weights": (float("nan"),)}, "finite numbers"),
    ({"ids": ("a",), "weights": ("1",)}, "finite numbers"),
    ({"ids": ("a",), "weights": (1.0,), "merge_strategy": "svd"}, "unknown merge_strategy 'svd'"),
    ({"ids": ("a",), "weights": (1.0,), "density": 1.5}, r"density must be a number in \[0, 1\]"),
    ({"ids": ("a",), "weights": (1.0,), "density": -0.1}, r"density must be a number in \[0, 1\]"),
    ({"ids": ("a",), "weights": (1.0,), "merge_strategy": "dare_linear", "density": 0.0}, "needs density > 0"),
    ({"ids": ("a",), "weights": (1.0,), "majority_sign_method": "mean"}, "unknown majority_sign_method 'mean'"),
])
def test_merge_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeConfig(**kwargs)


def test_merge_config_from_lorax_and_key():
    config = MergeConfig.from_lorax({"ids": ["a", "b"], "weights": [2, 0.5], "merge_strategy": None,
                                     "density": None, "majority_sign_method": None})
    assert config == MergeConfig(ids=("a", "b"), weights=(2.0, 0.5))
    assert config.ids == ("a", "b") and config.weights == (2.0, 0.5) and isinstance(config.weights[0], float)
    assert (config.merge_strategy, config.density, config.majority_sign_method) == ("linear", 1.0, "total")
    assert MergeConfig.from_lorax({"ids": ["a", "b"]}).weights == (1.0, 1.0)
    ties = MergeConfig.from_lorax({"ids": ["a", "b"], "weights": [2.0, 0.5], "merge_strategy": "ties",
                                   "density": 0.2, "majority_sign_method": "frequency"})
    assert (ties.merge_strategy, ties.density, ties.majority_sign_method) == ("ties", 0.2, "frequency")
    # The key: equal definitions share it (weight 2 == 2.0, lists == tuples), any change alters it.
    assert config.key == MergeConfig(ids=["a", "b"], weights=[2.0, 0.5]).key
    assert config.key.startswith("merged:")
    variants = [MergeConfig(ids=("b", "a"), weights=(2.0, 0.5)), MergeConfig(ids=("a", "b"), weights=(2.0, 0.6)),
                MergeConfig(ids=("a", "b"), weights=(2.0, 0.5), merge_strategy="ties"),
                MergeConfig(ids=("a", "b"), weights=(2.0, 0.5), density=0.5),
                MergeConfig(ids=("a", "b"), weights=(2.0, 0.5), majority_sign_method="frequency")]
    assert len({config.key} | {v.key for v in variants}) == 1 + len(variants)
    with pytest.raises(ValueError, match="`ids` is required"):
        MergeConfig.from_lorax({"weights": [1.0]})
    with pytest.raises(ValueError, match="unknown field"):
        MergeConfig.from_lorax({"ids": ["a"], "weights": [1.0], "merge_stratgy": "ties"})
    with pytest.raises(ValueError, match="unknown merge_strategy"):
        MergeConfig.from_lorax({"ids": ["a"], "weights": [1.0], "merge_strategy": "cat"})
