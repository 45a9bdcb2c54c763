"""Architecture registry: HF `model_type` -> model class."""

from __future__ import annotations

from torch import nn

from loomlm.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def model_class_for(config) -> type[nn.Module]:
    """Raises ValueError for an architecture loomlm does not implement."""
    try:
        return MODEL_REGISTRY[config.model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {config.model_type!r}; supported: {sorted(MODEL_REGISTRY)}") from None
