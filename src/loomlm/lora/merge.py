"""Merging LoRA adapters into one (LoRAX's `merged_adapters`), with peft's arithmetic.

A request may name several adapters, weights and a merge strategy instead of one adapter
(LoRAX: `parameters.merged_adapters = {"ids", "weights", "merge_strategy", "density",
"majority_sign_method"}`). The merged adapter is computed as
`peft.tuners.lora.LoraModel.add_weighted_adapter(ids, weights, name, combination_type=strategy,
density=..., majority_sign_method=...)` computes it (peft 0.21), using peft's own merge
utilities (`peft.utils.merge_utils`):

- per target module, only the adapters that target it take part;
- adapter i's weight w_i absorbs its scaling s_i and is split evenly between the factors:
  lora_A is weighted by sign(w_i s_i) sqrt(|w_i s_i|), lora_B by sqrt(|w_i s_i|);
- the lora_A tensors and the lora_B tensors are merged separately (task arithmetic, TIES,
  DARE; Ilharco et al. 2023, Yadav et al. 2023, Yu et al. 2024), and the merged adapter's
  scaling is 1.

This is not LoRAX's own arithmetic: LoRAX (`lorax_server/utils/merges/strategies.py`) weights
lora_A and lora_B both by w_i and keeps the first adapter's scaling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loomlm.lora.adapter import LoRAAdapter, LoRAWeights

# A strategy merges one factor of every participating adapter: task tensors (all [rank, in] or
# all [out, rank]) and their weights ([num_adapters], float32) -> the merged factor.
MergeFn = Callable[[list[torch.Tensor], torch.Tensor, "MergeConfig"], torch.Tensor]

def _peft(name: str) -> Callable:
    """One of peft's merge utilities, imported on first use: importing peft takes seconds, and
    servers parse merge definitions on the event loop (merging itself runs in a worker thread)."""
    from peft.utils import merge_utils

    return getattr(merge_utils, name)


_STRATEGIES: dict[str, MergeFn] = {
    "linear": lambda tensors, weights, config: _peft("task_arithmetic")(tensors, weights),
    "ties": lambda tensors, weights, config: _peft("ties")(tensors, weights, config.density,
                                                           config.majority_sign_method),
    "dare_linear": lambda tensors, weights, config: _peft("dare_linear")(tensors, weights, config.density),
    "dare_ties": lambda tensors, weights, config: _peft("dare_ties")(tensors, weights, config.density,
                                                                     config.majority_sign_method),
}
# LoRAX's set (`MERGE_STRATEGIES` in its client); peft has more (svd, cat, magnitude_prune).
MERGE_STRATEGIES = tuple(_STRATEGIES)
MAJORITY_SIGN_METHODS = ("total", "frequency")
# ties / dare_ties over adapters of different ranks merge the dense deltas (their sign election and
# trimming need one shape); the served result then holds a rank-min(in, out) update per module.
_DENSE_STRATEGIES = ("ties", "dare_ties")
MAX_DENSE_MERGE_BYTES = 256 << 20

# peft merges module by module in `named_modules()` order: layer by layer, and within a layer
# in the order HF's Llama-family decoder registers its projections. dare_* draw from torch's
# global RNG per tensor, so this order is what makes a seeded merge equal peft's.
_MODULE_ORDER = {module: i for i, module in enumerate((
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
))}
_LORAX_FIELDS = ("ids", "weights", "merge_strategy", "density", "majority_sign_method")


def _as_tuple(value: Any, field: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        # ValueError, not TypeError: invalid user input, which the server maps to a 400.
        raise ValueError(f"merged adapters: `{field}` must be a list, got {type(value).__name__}.")  # noqa: TRY004
    return tuple(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MergeConfig:
    """Which adapters to merge and how: LoRAX's `merged_adapters` parameters.

    `ids[i]` is weighted by `weights[i]`; lists are accepted and stored as tuples.

    Raises ValueError: empty `ids`, ids that are not non-empty strings or repeat, `weights` of
    another length or not finite numbers, an unknown `merge_strategy` (one of MERGE_STRATEGIES)
    or `majority_sign_method` (one of MAJORITY_SIGN_METHODS), `density` outside [0, 1], or
    density 0 with dare_* (DARE rescales the kept values by 1 / density: peft returns NaN).
    Negative weights are valid: peft subtracts such an adapter.
    """

    ids: tuple[str, ...]  # adapter names, in merge order (order decides dare_*'s random draws)
    weights: tuple[float, ...]  # one per id; any finite value
    merge_strategy: str = "linear"  # one of MERGE_STRATEGIES
    density: float = 1.0  # ties / dare_*: fraction of each factor's values kept, in [0, 1]
    majority_sign_method: str = "total"  # ties / dare_ties: sign election by sum ("total") or by count

    def __post_init__(self) -> None:
        ids, weights = _as_tuple(self.ids, "ids"), _as_tuple(self.weights, "weights")
        if not ids:
            raise ValueError("merged adapters: `ids` cannot be empty.")
        if not all(isinstance(i, str) and i for i in ids):
            raise ValueError(f"merged adapters: every id must be a non-empty string, got {list(ids)}.")
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"merged adapters: ids repeat: {duplicates} (weight one adapter once instead).")
        if len(weights) != len(ids):
            raise ValueError(f"merged adapters: {len(ids)} ids but {len(weights)} weights; give one weight per id.")
        if not all(_is_number(w) and math.isfinite(w) for w in weights):
            raise ValueError(f"merged adapters: weights must be finite numbers, got {list(weights)}.")
        if self.merge_strategy not in _STRATEGIES:
            raise ValueError(f"merged adapters: unknown merge_strategy {self.merge_strategy!r} "
                             f"(one of {', '.join(MERGE_STRATEGIES)}).")
        if not _is_number(self.density) or not 0.0 <= self.density <= 1.0:
            raise ValueError(f"merged adapters: density must be a number in [0, 1], got {self.density!r}.")
        if self.density == 0.0 and self.merge_strategy.startswith("dare"):
            raise ValueError(f"merged adapters: {self.merge_strategy} needs density > 0 (it rescales the kept "
                             "values by 1 / density).")
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise ValueError(f"merged adapters: unknown majority_sign_method {self.majority_sign_method!r} "
                             f"(one of {', '.join(MAJORITY_SIGN_METHODS)}).")
        # Floats, so that equal definitions (weight 1 or 1.0) share one `key`.
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        object.__setattr__(self, "density", float(self.density))

    @property
    def key(self) -> str:
        """A deterministic name for the merged adapter, for caching it by its definition.

        Two configs have the same key iff all their fields are equal. dare_* merges are random,
        so one key stands for one draw.
        """
        return "merged:" + json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_lorax(cls, d: Mapping[str, Any]) -> MergeConfig:
        """LoRAX's wire form: `{"ids": [...], "weights": [...], "merge_strategy": "ties",
        "density": 0.2, "majority_sign_method": "total"}`.

        `merge_strategy`, `density` and `majority_sign_method` may be null or absent (then
        "linear", 1.0, "total"); so may `weights` (then 1.0 each, as LoRAX's server does).

        Raises ValueError: not an object, a missing `ids`, an unknown field, or any error of
        MergeConfig.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"merged_adapters must be an object, got {type(d).__name__}.")  # noqa: TRY004
        unknown = sorted(set(d) - set(_LORAX_FIELDS))
        if unknown:
            raise ValueError(f"merged_adapters: unknown field(s) {unknown} (known: {', '.join(_LORAX_FIELDS)}).")
        options = {k: v for k, v in d.items() if v is not None}
        if "ids" not in options:
            raise ValueError("merged_adapters: `ids` is required.")
        options.setdefault("weights", (1.0,) * len(_as_tuple(options["ids"], "ids")))
        return cls(**options)


def _adapter_rank(adapter: LoRAAdapter) -> int:
    """peft's rank of an adapter for merging: the largest of its modules' (r and rank_pattern)."""
    if not adapter.weights:
        raise ValueError(f"adapter {adapter.name!r} has no LoRA weights to merge.")
    return max(w.rank for w in adapter.weights.values())


def _split_weight(weight: float, scaling: float) -> tuple[float, float]:
    """peft's split of adapter weight w, with its scaling s, over the factors: (sign(w s) sqrt(|w s|)
    for lora_A, sqrt(|w s|) for lora_B). The sign goes on one factor only: on both it would cancel."""
    weight_with_scaling = weight * scaling
    root = math.sqrt(abs(weight_with_scaling))
    return (root if weight_with_scaling >= 0 else -root), root


def _merge_module(members: list[tuple[float, LoRAWeights]], merge: MergeFn, config: MergeConfig,
                  mixed_ranks: bool = False) -> LoRAWeights:
    """peft's `LoraModel._generalized_task_arithmetic_weighted_adapter` for one module; with
    `mixed_ranks` (adapters of different ranks), or different ranks there, the exact
    concatenation (`_concatenate`: linear, dare_linear) or the dense deltas (`_dense`: ties, dare_ties)."""
    ranks = {w.rank for _, w in members}
    if mixed_ranks or len(ranks) > 1:
        if config.merge_strategy in _DENSE_STRATEGIES:
            return _dense(members, merge, config)
        return _concatenate(members, config)
    weights_a, weights_b = zip(*(_split_weight(weight, w.scaling) for weight, w in members))
    # peft's shapes: dare_*'s bernoulli mask is drawn in row-major order of the tensor's
    # shape (and ties's top-k ranks the flattened tensor), so [in, rank] would prune other
    # values than peft under the same seed. Contiguous, as peft's parameters are.
    tensors_a = [w.a_t.t().contiguous() for _, w in members]  # [rank, in_features]
    tensors_b = [w.b_t.t().contiguous() for _, w in members]  # [out_features, rank]
    dtype, device = tensors_a[0].dtype, tensors_a[0].device
    # peft's weights are float32 tensors (torch.tensor of Python floats); a half-precision
    # factor is promoted to float32 by the weighting, and the result cast back, as in peft.
    merged_a = merge(tensors_a, torch.tensor(weights_a).to(device), config).to(dtype)  # [rank, in_features]
    merged_b = merge(tensors_b, torch.tensor(weights_b).to(device), config).to(dtype)  # [out_features, rank]
    return LoRAWeights(merged_a.t().contiguous(), merged_b.t().contiguous(), scaling=1.0)


def _concatenate(members: list[tuple[float, LoRAWeights]], config: MergeConfig) -> LoRAWeights:
    """"linear" / "dare_linear" over adapters of different ranks, exactly: sum_i w_i s_i B_i A_i is
    the rank-(sum r_i) update [B_1 .. B_n] [A_1; ..; A_n] (peft's "cat" combination), with
    sqrt(|w_i s_i|) on each factor and the sign on A's, as peft splits a weight. dare_linear
    first prunes each factor at random to `density`, rescaled, as peft's `dare_linear` does.
    """
    parts_a, parts_b = [], []
    for weight, w in members:
        a, b = w.a_t.t().float(), w.b_t.t().float()  # [rank, in], [out, rank]: peft's shapes, as pruned there
        if config.merge_strategy == "dare_linear":
            prune = _peft("prune")
            a, b = prune(a, config.density, "random", rescale=True), prune(b, config.density, "random", rescale=True)
        weight_a, weight_b = _split_weight(weight, w.scaling)
        parts_a.append(a * weight_a)
        parts_b.append(b * weight_b)
    dtype = members[0][1].a_t.dtype
    a_t = torch.cat(parts_a, dim=0).t().contiguous().to(dtype)  # [in_features, sum of ranks]
    b_t = torch.cat(parts_b, dim=1).t().contiguous().to(dtype)  # [sum of ranks, out_features]
    return LoRAWeights(a_t, b_t, scaling=1.0)


def _dense(members: list[tuple[float, LoRAWeights]], merge: MergeFn, config: MergeConfig) -> LoRAWeights:
    """ties / dare_ties over adapters of different ranks, on the dense deltas: peft's "ties_svd" /
    "dare_ties_svd" (`_svd_generalized_task_arithmetic_weighted_adapter`: each adapter's delta
    s_i B_i A_i [out, in], weighted by w_i, merged by the strategy) without its final truncated
    SVD, so nothing is lost. Served exactly as a rank-min(in, out) update: an identity factor
    and the merged delta."""
    deltas = [(w.a_t.float() @ w.b_t.float()).t().contiguous() * w.scaling for _, w in members]  # [out, in]
    weights = torch.tensor([weight for weight, _ in members], device=deltas[0].device)
    merged = merge(deltas, weights, config)  # [out, in]
    out_features, in_features = merged.shape
    dtype = members[0][1].a_t.dtype
    eye = torch.eye(min(in_features, out_features), dtype=dtype, device=merged.device)  # the dense update's rank
    if in_features <= out_features:  # x @ I @ merged^T
        return LoRAWeights(eye, merged.t().contiguous().to(dtype), scaling=1.0)
    return LoRAWeights(merged.t().contiguous().to(dtype), eye, scaling=1.0)  # x @ merged^T @ I


@torch.no_grad()
def merge_adapters(name: str, adapters: list[LoRAAdapter], config: MergeConfig) -> LoRAAdapter:
    """One adapter from `adapters` (adapters[i] weighted by config.weights[i]), as peft's
    `add_weighted_adapter` computes it (module docstring).

    The result targets every module any adapter targets, has each module's rank and the
    adapters' dtype and device, and scaling 1.0. As in peft, a single adapter is always merged
    "linear" (so w=1 gives back the adapter's update), and ties / dare_* keep `density` of each
    factor's values. dare_* prune at random from torch's global RNG, in peft's module order and
    tensor shapes: from one RNG state the draws equal peft's merge step (peft's
    add_weighted_adapter first draws the init of the merged adapter's new layers, so seed it
    after that to compare).

    Where this differs from peft 0.21, by design: the merged scaling is 1 even when adapters[0]
    uses rsLoRA (peft inherits `use_rslora` and scales by sqrt(r): huggingface/peft#3449), and
    the result covers the union of the modules present (peft keeps adapters[0]'s
    `layers_to_transform`, which a `LoRAAdapter` does not record).

    Beyond peft's add_weighted_adapter with these strategies (it refuses adapters of different
    ranks; with rank_pattern the largest rank counts): "linear" and "dare_linear" then serve every
    module's weighted sum of the updates exactly, as one update of the summed rank
    (`_concatenate`); "ties" and "dare_ties" merge the dense deltas as peft's "ties_svd" /
    "dare_ties_svd" do, without the truncating SVD (`_dense`).

    Raises ValueError: not one adapter per id, an adapter without weights, a dense merge larger
    than MAX_DENSE_MERGE_BYTES, or a module other than the seven decoder projections.
    """
    if len(adapters) != len(config.ids):
        raise ValueError(f"merge {name!r}: {len(adapters)} adapters for {len(config.ids)} ids.")
    strategy = "linear" if len(adapters) == 1 else config.merge_strategy
    ranks = [_adapter_rank(adapter) for adapter in adapters]
    mixed_ranks = len(set(ranks)) > 1
    keys = {key for adapter in adapters for key in adapter.weights}
    unsupported = sorted(module for _, module in keys if module not in _MODULE_ORDER)
    if unsupported:
        raise ValueError(f"merge {name!r}: cannot merge modules {unsupported} (only {', '.join(_MODULE_ORDER)}).")
    if mixed_ranks and strategy in _DENSE_STRATEGIES:
        size = 0
        for key in keys:
            w = next(adapter.weights[key] for adapter in adapters if key in adapter.weights)
            in_features, out_features = w.a_t.shape[0], w.b_t.shape[1]
            size += min(in_features, out_features) * (in_features + out_features) * w.a_t.element_size()
        if size > MAX_DENSE_MERGE_BYTES:
            listing = ", ".join(f"{adapter.name!r} (r={rank})" for adapter, rank in zip(adapters, ranks))
            raise ValueError(f"merge {name!r}: merge_strategy {strategy!r} over adapters of different ranks ({listing}) "
                             f"is computed on the dense deltas, {size / 2**20:.0f} MiB here (at most "
                             f"{MAX_DENSE_MERGE_BYTES // 2**20} MiB); 'linear' and 'dare_linear' merge any ranks "
                             "exactly at the summed rank, and ties needs no dense deltas for adapters of one rank.")
    merge = _STRATEGIES[strategy]
    merged = {}
    with warnings.catch_warnings():
        # peft warns on every tensor that density 1 prunes nothing; that is what was asked for.
        warnings.filterwarnings("ignore", message=r"The density .* no pruning will be performed")
        for layer, module in sorted(keys, key=lambda key: (key[0], _MODULE_ORDER[key[1]])):
            members = [(weight, adapter.weights[(layer, module)])
                       for adapter, weight in zip(adapters, config.weights) if (layer, module) in adapter.weights]
            merged[(layer, module)] = _merge_module(members, merge, config, mixed_ranks=mixed_ranks)
    return LoRAAdapter(name, merged)
