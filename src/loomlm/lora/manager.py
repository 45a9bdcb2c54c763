"""Adapter slots: which adapters are installed in the model, loaded on demand, evicted LRU.

An adapter is loaded (PEFT format, `loomlm.lora.adapter`) the first time a
request names it and installed in a free slot of every targeted `Linear`;
`max_loras` slots exist. A slot whose adapter no unfinished request uses may
be reused: the least recently used such adapter is evicted. Requests hold
their adapter with `acquire` / `release`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from loomlm.lora.adapter import load_peft_adapter
from loomlm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    """Owns the model's adapter slots (see the module docstring).

    Args:
        model: a Llama-family model (`layers[i].self_attn.qkv_proj`, ... and `_FUSED`).
        max_loras: adapters installed at once.
    """

    def __init__(self, model, max_loras: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.max_loras = max_loras
        self.dtype, self.device = dtype, device
        self.num_layers = len(model.layers)
        self._slots: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recently used first
        self._paths: dict[str, str] = {}
        self._users: dict[str, int] = {}  # adapter name -> unfinished requests using it
        self.num_loads = 0
        self.num_hits = 0
        self.num_evictions = 0

    def _target(self, layer: int, module: str):
        """The Linear and shard holding HF projection `module` ("self_attn.q_proj") of a layer."""
        path, shard = self.model._FUSED[module]
        linear = self.model.layers[layer]
        for attr in path.split("."):
            linear = getattr(linear, attr)
        return linear, shard

    def acquire(self, request: LoRARequest) -> int:
        """The slot of the request's adapter, loading it (and evicting an idle one) if needed.

        Raises ValueError: a bad adapter, a name reused for another path, or every slot in use.
        """
        name = request.lora_name
        if name in self._slots:
            if self._paths[name] != str(request.lora_path):
                raise ValueError(f"adapter {name!r} is already loaded from {self._paths[name]}.")
            self._slots.move_to_end(name)
            self.num_hits += 1
        else:
            adapter = load_peft_adapter(name, request.lora_path, self.num_layers, self.dtype)
            slot = self._free_slot()
            installed = []
            try:
                for (layer, module), w in adapter.weights.items():
                    linear, shard = self._target(layer, module)
                    linear.set_lora(slot, shard, w.a_t.to(self.device), w.b_t.to(self.device))
                    installed.append(linear)
            except ValueError:
                for linear in installed:
                    linear.clear_lora(slot)
                raise
            self._slots[name], self._paths[name] = slot, str(request.lora_path)
            self.num_loads += 1
            logger.info("loaded adapter %s (%d parameters) into slot %d", name, adapter.num_params, slot)
        self._users[name] = self._users.get(name, 0) + 1
        return self._slots[name]

    def release(self, name: str) -> None:
        """One request using `name` has finished."""
        self._users[name] -= 1

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        for name, slot in self._slots.items():  # least recently used first
            if self._users.get(name, 0) == 0:
                self._evict(name)
                return slot
        raise ValueError(f"all {self.max_loras} adapter slots are in use by running requests (max_loras).")

    def _evict(self, name: str) -> None:
        slot = self._slots.pop(name)
        self._paths.pop(name)
        self._users.pop(name, None)
        for module in self.model.modules():
            if hasattr(module, "clear_lora"):
                module.clear_lora(slot)
        self.num_evictions += 1
        logger.info("evicted adapter %s from slot %d", name, slot)

    @property
    def loaded(self) -> list[str]:
        """Names of the installed adapters, least recently used first."""
        return list(self._slots)
