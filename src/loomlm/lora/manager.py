"""Adapter slots and the adapter cache: which adapters are installed in the model, loaded off
the step thread, evicted LRU.

Two levels, as in vLLM (`max_loras` on the device, `max_cpu_loras` in host memory) and LoRAX
(`--max-active-adapters`):
- host cache: adapters read from disk (PEFT format, `loomlm.lora.adapter`) or merged
  (`loomlm.lora.merge`), LRU-bounded. `load()` fills it; it is thread-safe and is what the
  server calls in a worker thread (`AsyncLLMEngine.load_lora`), so reading a file never
  stalls decoding.
- slots: `max_loras` adapters installed in every targeted `Linear`. As in vLLM v1, the
  scheduler only counts: it admits a request when its adapter is in the host cache
  (`is_ready`; one not cached yet is loaded in a background thread while the request waits
  and the others keep running) and the running requests then use at most `max_loras`
  distinct adapters. The model runner installs them (`activate`, every step, on the step
  thread): an installed adapter is a hit; another goes into a free slot or evicts the least
  recently used adapter that no running request uses.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loomlm.lora.adapter import LoRAAdapter, load_peft_adapter
from loomlm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    """Owns the model's adapter slots and the host cache (see the module docstring).

    Args:
        model: a Llama-family model (`layers[i].self_attn.qkv_proj`, ... and `_FUSED`).
        max_loras: adapters installed at once (slots).
        max_cpu_loras: adapters kept in host memory (at least max_loras).

    Counters (read by /metrics): `num_loads` adapters installed into a slot, `num_hits`
    requests that found their adapter installed, `num_evictions` adapters removed from a slot.
    """

    def __init__(self, model, max_loras: int, dtype: torch.dtype, device: torch.device,
                 max_cpu_loras: int | None = None, tp=None) -> None:
        self.model = model
        self.tp = tp  # a tensor-parallel rank: slots hold its share of each adapter (shard_lora)
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras or 0, max_loras)
        self.dtype, self.device = dtype, device
        self.num_layers = len(model.layers)
        self._slots: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recently used first
        self._lock = threading.Lock()  # guards the host cache and the sources (load() runs in threads)
        self._cache: OrderedDict[str, LoRAAdapter] = OrderedDict()  # host cache, least recently used first
        self._sources: dict[str, str] = {}  # adapter name -> the path (or merge definition) it came from
        self._loading: dict[str, Future] = {}  # background loads started by is_ready()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loomlm-lora-load")
        self.num_loads = 0
        self.num_hits = 0
        self.num_evictions = 0

    # ------------------------------------------------------------------ host cache
    def load(self, request: LoRARequest) -> None:
        """Read (or merge) the request's adapter into the host cache unless it is there already.

        Thread-safe; blocking (reads files). Raises ValueError: a bad adapter, a merge peft
        refuses, or a name already used for a different source.
        """
        name, source = request.lora_name, request.source
        with self._lock:
            known = self._sources.get(name)
            if known is not None and known != source:
                raise ValueError(f"adapter {name!r} is already loaded from {known}; use another name.")
            if name in self._cache:
                self._cache.move_to_end(name)
                return
        if request.merge_config is not None:
            from loomlm.lora.merge import merge_adapters  # peft's merge utilities load only when merging

            for part in request.merged_from:
                self.load(part)
            with self._lock:
                parts = [self._cache[part.lora_name] for part in request.merged_from]
            # dare_* prune at random: seed from the definition so a merge evicted and redone is identical.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_stable_seed(source))
                adapter = merge_adapters(name, parts, request.merge_config)
        else:
            adapter = load_peft_adapter(name, request.lora_path, self.num_layers, self.dtype)
        self._check_fits(adapter)
        with self._lock:
            self._sources[name] = source
            self._cache[name] = adapter
            self._cache.move_to_end(name)
            while len(self._cache) > self.max_cpu_loras:
                evicted, _ = self._cache.popitem(last=False)  # a request that needs it again reloads it
                if evicted not in self._slots:
                    self._sources.pop(evicted, None)  # bounded with the cache: merged names are unbounded

    def _check_fits(self, adapter: LoRAAdapter) -> None:
        """ValueError unless every projection's A / B shapes fit the model (checked at load time,
        so a mismatched adapter is refused before its request is queued)."""
        for (layer, module), w in adapter.weights.items():
            linear, shard = self._target(layer, module)
            try:
                linear.check_lora(shard, *self._factors(module, w.a_t, w.b_t))
            except ValueError as exc:
                raise ValueError(f"adapter {adapter.name!r}: layer {layer} {module}: {exc}") from exc

    def _cached(self, name: str) -> LoRAAdapter | None:
        with self._lock:
            adapter = self._cache.get(name)
            if adapter is not None:
                self._cache.move_to_end(name)
            return adapter

    def is_ready(self, request: LoRARequest) -> bool:
        """Whether the request's adapter is in the host cache, ready to install; if not, its load
        starts in the background (once) and the request waits. The scheduler's check (step thread).

        Raises ValueError when the background load failed.
        """
        name = request.lora_name
        if self._cached(name) is not None:
            return True
        future = self._loading.get(name)
        if future is None:
            self._loading[name] = self._executor.submit(self.load, request)
            return False
        if not future.done():
            return False
        del self._loading[name]
        future.result()  # re-raises a failed load
        return self._cached(name) is not None  # evicted from the host cache meanwhile: the next call reloads

    # ----------------------------------------------------------------------- slots
    def activate(self, loras: dict[str, LoRARequest], new_requests: list[str] = ()) -> dict[str, int]:
        """Install the adapters `loras` (name -> request) in slots and return name -> slot. The
        model runner's call, each step, with the adapters of every running request (the scheduler
        admits at most `max_loras` distinct ones, so they always fit); an idle adapter is evicted
        least recently used first. `new_requests`: the adapters of the requests scheduled for
        the first time this step (counted in `num_hits` when already installed).

        Raises RuntimeError for more adapters than slots; ValueError when an adapter evicted from
        the host cache since the scheduler's check no longer loads.
        """
        if len(loras) > self.max_loras:
            raise RuntimeError(f"{len(loras)} adapters scheduled at once; only {self.max_loras} slots.")
        self.num_hits += sum(1 for name in new_requests if name in self._slots)
        for name, request in loras.items():
            if name in self._slots:
                self._slots.move_to_end(name)
                continue
            adapter = self._cached(name)
            if adapter is None:  # evicted from the host cache after the scheduler's check: read it again
                self.load(request)
                adapter = self._cached(name)
            slot = self._free_slot(keep=loras)
            for (layer, module), w in adapter.weights.items():
                linear, shard = self._target(layer, module)
                a_t, b_t = self._factors(module, w.a_t, w.b_t_scaled())
                linear.set_lora(slot, shard, a_t.to(self.device), b_t.to(self.device))
            self._slots[name] = slot
            self.num_loads += 1
            logger.info("installed adapter %s (%d parameters) in slot %d", name, adapter.num_params, slot)
        return {name: self._slots[name] for name in loras}

    def _factors(self, module: str, a_t: torch.Tensor, b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors a slot holds: the whole adapter's, or this tensor-parallel rank's share
        (the host cache keeps whole adapters, so merges see them whole)."""
        if self.tp is None:
            return a_t, b_t
        from loomlm.distributed.tensor_parallel import shard_lora

        return shard_lora(module, a_t, b_t, self.tp)

    def _target(self, layer: int, module: str):
        """The Linear and shard holding HF projection `module` ("self_attn.q_proj") of a layer."""
        path, shard = self.model._FUSED[module]
        return self.model.layers[layer].get_submodule(path), shard

    def _free_slot(self, keep: dict[str, LoRARequest]) -> int:
        """An empty slot, or the slot of the least recently used adapter not in `keep` (evicted)."""
        free = set(range(self.max_loras)) - set(self._slots.values())
        if free:
            return min(free)
        name = next(name for name in self._slots if name not in keep)  # activate() checked that one exists
        slot = self._slots.pop(name)
        for module in self.model.modules():
            if hasattr(module, "clear_lora"):
                module.clear_lora(slot)
        self.num_evictions += 1
        logger.info("evicted adapter %s from slot %d", name, slot)
        return slot

    @property
    def loaded(self) -> list[str]:
        """Names of the installed adapters, least recently used first."""
        return list(self._slots)

    @property
    def known(self) -> dict[str, str]:
        """Every adapter loaded so far (installed, cached or evicted): name -> its source."""
        with self._lock:
            return dict(self._sources)

    def shutdown(self) -> None:
        """Stop the background loader (loads not started are dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _stable_seed(text: str) -> int:
    """A seed that depends only on `text` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
