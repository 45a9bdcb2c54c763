"""Architecture registry: HF `model_type` -> the loomlm model class that runs it.

Each entry names the module and class lazily (importing every model file at start-up
costs time for nothing) and the `architectures` values of `config.json` it accepts.
Every model class has the same interface:
`__init__(hf_config, max_position)`, `forward(input_ids [T], positions [T]) -> hidden [T, H]`,
`compute_logits(hidden [n, H]) -> float32 [n, vocab]`, `load_weights(iterable of (HF name, tensor))`,
`attention_layers() -> list[PagedAttention]` (one per layer, in order).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelArchitecture:
    """One supported `model_type`.

    Attributes:
        module: the loomlm module holding the class.
        class_name: the class in it.
        hf_architectures: the `config.json` "architectures" values accepted for this model_type.
    """

    module: str
    class_name: str
    hf_architectures: tuple[str, ...]


_LLAMA = "loomlm.models.llama"  # the Llama family: one block with config-driven switches, MoE included
MODEL_REGISTRY: dict[str, ModelArchitecture] = {
    "llama": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("LlamaForCausalLM",)),
    "mistral": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("MistralForCausalLM",)),
    "qwen2": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("Qwen2ForCausalLM",)),
    "qwen3": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("Qwen3ForCausalLM",)),
    "qwen3_moe": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("Qwen3MoeForCausalLM",)),
    "mixtral": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("MixtralForCausalLM",)),
    "gemma": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("GemmaForCausalLM",)),
    "gemma2": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("Gemma2ForCausalLM",)),
    "gemma3_text": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("Gemma3ForCausalLM",)),
    # a Gemma 3 checkpoint with its vision tower: the loader keeps the text part (`text_config`)
    "gemma3": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")),
    "phi3": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("Phi3ForCausalLM",)),
    "olmo2": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("Olmo2ForCausalLM",)),
    "granite": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("GraniteForCausalLM",)),
    "smollm3": ModelArchitecture(_LLAMA, "LlamaForCausalLM", ("SmolLM3ForCausalLM",)),
    # learned positions, LayerNorm, biases: their own files
    "opt": ModelArchitecture("loomlm.models.opt", "OPTForCausalLM", ("OPTForCausalLM",)),
    "gpt2": ModelArchitecture("loomlm.models.gpt2", "GPT2LMHeadModel", ("GPT2LMHeadModel",)),
}


def supported_model_types() -> str:
    """A one-line list for error messages: "LlamaForCausalLM (llama), ..."."""
    return ", ".join(f"{'/'.join(a.hf_architectures)} ({mt})" for mt, a in sorted(MODEL_REGISTRY.items()))


def architecture_for(model_type: str | None, origin: str) -> ModelArchitecture:
    """Raises ValueError naming `origin` and listing what is supported when model_type is not."""
    arch = MODEL_REGISTRY.get(model_type or "")
    if arch is None:
        raise ValueError(f"Unsupported model_type {model_type!r} in {origin}; supported: {supported_model_types()}.")
    return arch


def model_class_for(config) -> type[nn.Module]:
    """The class for `config.model_type`. Raises ValueError for an architecture loomlm does not implement."""
    arch = architecture_for(getattr(config, "model_type", None), "the model config")
    return getattr(importlib.import_module(arch.module), arch.class_name)
