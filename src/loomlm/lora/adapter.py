"""Loading a PEFT LoRA adapter into per-projection (A, B, scaling) weights.

Format: PEFT's `adapter_config.json` (`r`, `lora_alpha`, `use_rslora`, `target_modules`,
`rank_pattern`, `alpha_pattern`) and `adapter_model.safetensors` with keys like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]). The update is y += scaling * x A^T B^T with
scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), as
`peft.tuners.lora.LoraLayer.update_layer` computes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

# HF projection names LoRA may target in a Llama-family decoder.
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAWeights:
    """One projection's low-rank update: delta = scaling * x @ a_t @ b_t.

    `a_t` and `b_t` are PEFT's lora_A / lora_B weights transposed, unscaled (merging needs
    them so: `loomlm.lora.merge`); `b_t_scaled` is what a slot holds.
    """

    a_t: torch.Tensor  # [in_features, rank]
    b_t: torch.Tensor  # [rank, out_features]
    scaling: float

    @property
    def rank(self) -> int:
        """r, the update's rank."""
        return self.a_t.shape[1]

    def b_t_scaled(self) -> torch.Tensor:
        """[rank, out_features]: b_t times the scaling (what a slot holds)."""
        return self.b_t * self.scaling


@dataclass
class LoRAAdapter:
    """A loaded adapter: `weights[(layer index, "self_attn.q_proj")]`."""

    name: str
    weights: dict[tuple[int, str], LoRAWeights]

    @property
    def num_params(self) -> int:
        return sum(w.a_t.numel() + w.b_t.numel() for w in self.weights.values())


def _pattern_value(pattern: dict, module_key: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that the module name ends with."""
    for key, value in (pattern or {}).items():
        if module_key.endswith(key) or re.search(key, module_key):
            return value
    return default


def load_peft_adapter(name: str, path: str | Path, num_layers: int, dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Read a PEFT LoRA adapter directory.

    Raises ValueError: no adapter files, not a LoRA adapter, targets other than the seven
    decoder projections, a layer index outside the model, or A/B shapes that disagree.
    """
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"adapter {name!r}: no adapter_config.json + adapter_model.safetensors in {path}.")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"adapter {name!r}: adapter_config.json is not valid JSON: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA.")
    alpha, use_rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise ValueError(f"adapter {name!r}: cannot read {weights_file.name}: {exc}") from exc
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise ValueError(f"adapter {name!r}: unsupported weight {key!r} (LoRA on {', '.join(SUPPORTED_TARGETS)} "
                             "only).")
        layer, block, proj, which = int(match[1]), match[2], match[3], match[4]
        if proj not in SUPPORTED_TARGETS:
            raise ValueError(f"adapter {name!r}: target {proj!r} is not supported (only {', '.join(SUPPORTED_TARGETS)}).")
        if layer >= num_layers:
            raise ValueError(f"adapter {name!r}: layer {layer} does not exist (the model has {num_layers}).")
        pairs.setdefault((layer, f"{block}.{proj}"), {})[which] = tensor
    weights = {}
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(f"adapter {name!r}: layer {layer} {module}: lora_A / lora_B missing or mismatched.")
        rank = ab["A"].shape[0]
        module_key = f"layers.{layer}.{module}"
        r = _pattern_value(config.get("rank_pattern"), module_key, config.get("r", rank))
        a = _pattern_value(config.get("alpha_pattern"), module_key, alpha)
        scaling = a / math.sqrt(r) if use_rslora else a / r
        weights[(layer, module)] = LoRAWeights(ab["A"].t().contiguous().to(dtype),
                                               ab["B"].t().contiguous().to(dtype), scaling)
    if not weights:
        raise ValueError(f"adapter {name!r}: no LoRA weights found.")
    return LoRAAdapter(name, weights)
