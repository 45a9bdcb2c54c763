"""`LoRARequest`: which adapter a request runs with (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loomlm.lora.merge import MergeConfig


@dataclass(frozen=True)
class LoRARequest:
    """An adapter in PEFT format (`adapter_config.json` + `adapter_model.safetensors`), or a
    merge of several (LoRAX's `merged_adapters`).

    Attributes:
        lora_name: the adapter's name (LoRAX's adapter id); identifies it in the cache.
        lora_int_id: a positive integer id (vLLM's; kept for compatibility).
        lora_path: the adapter directory ("" for a merged adapter).
        merged_from: the adapters a merged adapter is made of (empty otherwise).
        merge_config: how they are merged (None for a plain adapter).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
    merged_from: tuple[LoRARequest, ...] = ()
    merge_config: MergeConfig | None = None

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must not be empty.")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be positive, got {self.lora_int_id}.")
        if (self.merge_config is None) != (not self.merged_from):
            raise ValueError("a merged adapter needs both merged_from and merge_config.")

    @property
    def source(self) -> str:
        """Where the adapter comes from: its path, or its merge definition."""
        if self.merge_config is None:
            return str(self.lora_path)
        return self.merge_config.key + "|" + "|".join(part.source for part in self.merged_from)

    @classmethod
    def merged(cls, parts: list[LoRARequest], config: MergeConfig, lora_int_id: int = 1) -> LoRARequest:
        """The merge of `parts` by `config`, named by its definition (so it is cached by it)."""
        return cls(config.key, lora_int_id, "", tuple(parts), config)
