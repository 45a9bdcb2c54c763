"""LoRA adapters: requests, PEFT-format loading, and the slots that batch them in the model."""

from loomlm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
