"""`LoRARequest`: which adapter a request runs with (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter in PEFT format (`adapter_config.json` + `adapter_model.safetensors`).

    Attributes:
        lora_name: the adapter's name (LoRAX's adapter id); identifies it in the cache.
        lora_int_id: a positive integer id (vLLM's; kept for compatibility).
        lora_path: the adapter directory.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must not be empty.")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be positive, got {self.lora_int_id}.")
