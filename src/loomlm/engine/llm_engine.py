"""The synchronous engine: requests in, RequestOutputs out, one `step()` at a time.

`step()` is the whole architecture in three calls:
`scheduler.schedule()` -> `model_runner.execute()` -> `scheduler.update_from_output()`,
followed by the OutputProcessor turning the updated sequences' token ids and logprobs into
RequestOutputs (text, stop strings, n gathering). A user request with `n > 1` fans out into n
sequences (ids `"{i}_{request_id}"`, seeds `seed + i`, as vLLM v1's ParentRequest), gathered back
into one RequestOutput.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import torch

from loomlm.beam_search import BeamSearchOutput, BeamSearchParams
from loomlm.config import LOAD_TIME_QUANTIZATION, EngineConfig, ModelConfig
from loomlm.engine.beam_search_group import BeamSearchGroup
from loomlm.engine.block_manager import BlockManager
from loomlm.engine.input_processor import EncodedPrompt, EngineRequest, InputProcessor
from loomlm.engine.model_runner import ModelRunner, PositionLogprobs
from loomlm.engine.output_processor import OutputProcessor
from loomlm.engine.request import Request, RequestStatus
from loomlm.engine.scheduler import Scheduler
from loomlm.engine.structured_output import StructuredOutputManager
from loomlm.lora.request import LoRARequest
from loomlm.lora.source import resolve_adapter
from loomlm.models.loader import (
    checkpoint_dtype,
    iter_weights,
    load_tokenizer,
    resolve_model,
)
from loomlm.outputs import RequestOutput
from loomlm.pooling_params import PoolerConfig, PoolingParams
from loomlm.sampling_params import SamplingParams
from loomlm.spec_decode.draft_model_proposer import DraftModelProposer
from loomlm.spec_decode.manager import SpecDecodeManager
from loomlm.spec_decode.ngram_proposer import NgramProposer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Synchronous engine over one model: `add_request`, then `step()` until no request is unfinished.

    Loading raises ValueError for an unknown model, a bad engine argument or a checkpoint that
    does not fit its config. Not thread-safe: `add_request`, `add_beam_search_request`,
    `abort_request` and `step` belong to one thread (AsyncLLMEngine's step thread); with the
    environment variable LOOMLM_CHECK_ENGINE_THREAD=1 (the tests set it) a call from any other
    thread than the first caller's raises RuntimeError. `encode_prompt`, `input_processor`,
    `token_text` and the LoRA registry views are thread-safe.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.source = resolve_model(mc.model, revision=mc.revision, tokenizer=mc.tokenizer,
                                    tokenizer_revision=mc.tokenizer_revision)
        # dtype "auto" depends on the checkpoint: pin it now, so every later reader of
        # model_config.torch_dtype (model runner, LoRA manager, /info) sees the dtype the model runs in.
        mc = mc.with_checkpoint_dtype(checkpoint_dtype(self.source))
        self.config = config = replace(config, model_config=mc)
        self.hf_config = self.source.hf_config
        self.tokenizer = load_tokenizer(self.source)
        self.served_model_name = mc.served_model_name or self.source.name
        max_len = resolve_max_model_len(mc, self.hf_config)
        # Tensor parallelism: the other ranks start now and load their shards alongside this one.
        self.tp, self._tp_workers = None, []
        if config.parallel_config.tensor_parallel_size > 1:
            from loomlm.distributed.tensor_parallel import check_tensor_parallel
            from loomlm.distributed.worker import start_tensor_parallel

            check_tensor_parallel(self.hf_config, config.parallel_config.tensor_parallel_size)  # before spawning
            self.tp, self._tp_workers = start_tensor_parallel(config)
        self.model_runner = ModelRunner(mc, config.cache_config, self.hf_config,
                                        model_weights(self.source, mc), max_len, config.kernel_config,
                                        config.lora_config, self.tp)
        capacity = self.model_runner.num_blocks * config.cache_config.block_size
        if capacity < max_len:
            logger.warning("KV cache holds %d tokens < context window %d: capping max_model_len", capacity, max_len)
            max_len = capacity
        self.max_model_len = max_len
        self.block_manager = BlockManager(self.model_runner.num_blocks, config.cache_config.block_size,
                                          config.cache_config.enable_prefix_caching)
        lc = config.lora_config
        self.lora_manager = self.model_runner.lora_manager  # None without enable_lora
        self.spec_decode = self._spec_decode_manager()  # None without a speculative_config
        lookahead = config.speculative_config.num_speculative_tokens \
            if self.spec_decode is not None and config.speculative_config.method == "draft_model" else 0
        self.scheduler = Scheduler(config.scheduler_config, self.block_manager, self.lora_manager, lc.max_loras,
                                   lookahead, self.max_model_len)
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.hf_config)
        # Adapter id -> its request, for adapters loaded so far (least recently used first): what
        # /v1/models lists. Bounded by max_cpu_loras; the preloaded ones are pinned.
        self.lora_requests: OrderedDict[str, LoRARequest] = OrderedDict()
        self._lora_lock = threading.Lock()  # lora_request_for / check_lora run in worker threads
        self._lora_int_ids = itertools.count(1)
        self._pinned_loras: set[str] = set()
        for adapter_id in lc.lora_adapter_ids:  # LoRAX's --adapter-ids: loaded and installed now
            lora = self._new_lora_request(adapter_id, resolve_adapter(adapter_id))  # the operator's: any path
            self._pinned_loras.add(adapter_id)
            self.check_lora(lora)
            # Installed now while slots are free (across ranks, by the first step that uses it:
            # every rank's slots follow rank 0's installs step by step).
            if len(self.lora_manager.loaded) < lc.max_loras and self.tp is None:
                self.lora_manager.activate({lora.lora_name: lora})
        self.output_processor = OutputProcessor(self.tokenizer)
        self.pooler_config = PoolerConfig.from_override(config.model_config.override_pooler_config)
        self._check_thread = os.environ.get("LOOMLM_CHECK_ENGINE_THREAD") == "1"
        self._owner_thread: threading.Thread | None = None
        self._structured_outputs: StructuredOutputManager | None = None
        self._structured_outputs_lock = threading.Lock()
        self.beam_searches: dict[str, BeamSearchGroup] = {}
        # Beam search id -> the hook its result goes to (add_beam_search_request's on_finish).
        self._beam_hooks: dict[str, Callable[[BeamSearchOutput], None]] = {}
        # The request rules every face shares (thread-safe): faces call it in worker threads.
        self.input_processor = InputProcessor(self.tokenizer, self.hf_config.vocab_size, self.max_model_len,
                                              mc.max_logprobs, lambda: self.structured_outputs, lc.enable_lora,
                                              config.scheduler_config.scheduling_policy == "priority")

    def _spec_decode_manager(self) -> SpecDecodeManager | None:
        """The speculative decoding manager and its proposer, per `config.speculative_config`.

        A draft model is loaded into a second ModelRunner whose KV pool has the target's block
        count (it follows the target's block tables). Raises ValueError for a draft model whose
        vocabulary differs from the target's."""
        spec = self.config.speculative_config
        if spec is None:
            return None
        if spec.method == "ngram":
            return SpecDecodeManager(spec, NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max,
                                                         self.max_model_len), self.max_model_len)
        mc = self.config.model_config
        draft_mc = replace(mc, model=spec.model, revision=spec.revision, quantization=spec.quantization,
                           tokenizer=None, tokenizer_revision=None, served_model_name=None)
        source = resolve_model(draft_mc.model, revision=draft_mc.revision)
        if source.hf_config.vocab_size != self.hf_config.vocab_size:
            raise ValueError(f"the draft model {spec.model!r} has a vocabulary of {source.hf_config.vocab_size} "
                             f"tokens, the target {self.hf_config.vocab_size}: it must share the target's tokenizer.")
        draft_len = min(self.max_model_len, model_context_window(source.hf_config))
        cache = replace(self.config.cache_config, num_gpu_blocks_override=self.model_runner.num_blocks)
        runner = ModelRunner(draft_mc, cache, source.hf_config, model_weights(source, draft_mc), draft_len,
                             self.config.kernel_config)
        logger.info("speculative decoding: draft model %s, %d tokens per step", source.name,
                    spec.num_speculative_tokens)
        return SpecDecodeManager(spec, DraftModelProposer(runner, self.block_manager), draft_len)

    @property
    def structured_outputs(self) -> StructuredOutputManager:
        """The constraint compiler, made on first use (converting the tokenizer takes ~0.5 s)."""
        with self._structured_outputs_lock:  # encode_prompt runs in worker threads
            if self._structured_outputs is None:
                self._structured_outputs = StructuredOutputManager(self.tokenizer, self.hf_config.vocab_size)
        return self._structured_outputs

    @classmethod
    def from_engine_args(cls, **kwargs) -> LLMEngine:
        """Build from flat vLLM-style args (`model=`, `max_model_len=`, `block_size=`, ...)."""
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ----------------------------------------------------------------- requests
    def encode_prompt(self, prompt: str | list[int] | EncodedPrompt,
                      params: SamplingParams | None = None, add_special_tokens: bool = True) -> EncodedPrompt:
        """`InputProcessor.encode` (thread-safe): `add_request` accepts the result as is.

        Raises ValueError: empty prompt, token ids outside the vocabulary, a prompt that leaves
        no room to generate within `max_model_len` (ContextWindowError), or invalid parameters.
        """
        return self.input_processor.encode(prompt, params, add_special_tokens)

    def lora_request_for(self, adapter_id: str, adapter_source: str | None = None,
                         api_token: str | None = None) -> LoRARequest:
        """The LoRARequest for an adapter id sent in a request (LoRAX's adapter_id / adapter_source;
        see `loomlm.lora.source`): local ids only under `LoRAConfig.adapter_roots`. Not listed in
        `lora_requests` until `check_lora` has loaded it. Blocking (may read the Hugging Face cache
        or download from S3); thread-safe.

        Raises ValueError: LoRA not enabled, or an id that resolves to no allowed adapter.
        """
        if self.lora_manager is None:
            raise ValueError("LoRA adapters need the engine argument enable_lora=True (loomlm serve --enable-lora).")
        with self._lora_lock:
            known = self.lora_requests.get(adapter_id)
            is_pinned = adapter_id in self._pinned_loras
        # A preloaded adapter is the operator's: named as local, it needs no root.
        if known is not None and (adapter_source is None or (adapter_source == "local" and is_pinned)):
            return known
        path = resolve_adapter(adapter_id, adapter_source, api_token,
                               allowed_roots=self.config.lora_config.adapter_roots)
        if known is not None and known.lora_path == path:
            return known
        return self._new_lora_request(adapter_id, path)

    def register_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        """Load an adapter at run time under `lora_name` (vLLM's `/v1/load_lora_adapter`): a
        directory under `LoRAConfig.adapter_roots` or a Hugging Face id in the local cache, read
        into the host cache now (blocking; thread-safe), then listed and kept (not trimmed from
        the registry) until `unregister_lora`. Requests select it by its name.

        Raises ValueError: LoRA not enabled, an empty name or path, a name already registered, or
        a path that resolves to no allowed adapter or to a bad one.
        """
        if self.lora_manager is None:
            raise ValueError("LoRA adapters need the engine argument enable_lora=True (loomlm serve --enable-lora).")
        if not lora_name or not lora_path:
            raise ValueError("Both 'lora_name' and 'lora_path' must be provided.")
        with self._lora_lock:  # reserve the name at once: two loads of one name cannot both succeed
            if lora_name in self.lora_requests or lora_name in self._pinned_loras or lora_name == self.served_model_name:
                raise ValueError(f"The lora adapter '{lora_name}' has already been loaded.")
            self._pinned_loras.add(lora_name)
        try:
            path = resolve_adapter(lora_path, None, allowed_roots=self.config.lora_config.adapter_roots)
            lora = self._new_lora_request(lora_name, path)
            self.check_lora(lora)
        except BaseException:
            with self._lora_lock:
                self._pinned_loras.discard(lora_name)
            raise
        return lora

    def unregister_lora(self, lora_name: str) -> bool:
        """Forget a registered adapter (vLLM's `/v1/unload_lora_adapter`): requests can no longer
        name it; those already running finish with it (its slot is freed by LRU eviction once
        unused). Returns False for a name not registered. Thread-safe."""
        with self._lora_lock:
            if self.lora_requests.pop(lora_name, None) is None:
                return False
            self._pinned_loras.discard(lora_name)
        return True

    def _new_lora_request(self, adapter_id: str, path: str) -> LoRARequest:
        with self._lora_lock:
            return LoRARequest(adapter_id, next(self._lora_int_ids), path)

    def registered_loras(self) -> list[LoRARequest]:
        """The adapters loaded so far (a snapshot, least recently used first); thread-safe."""
        with self._lora_lock:
            return list(self.lora_requests.values())

    def is_registered_lora(self, adapter_id: str | None) -> bool:
        """Whether `adapter_id` names an adapter loaded so far; thread-safe."""
        with self._lora_lock:
            return adapter_id in self.lora_requests

    def check_lora(self, lora_request: LoRARequest | None) -> None:
        """Read the adapter into the host cache now (blocking; thread-safe), so a bad one raises
        ValueError before anything is queued, then list it in `lora_requests` (a failed one
        never is). Servers call it in a worker thread."""
        if lora_request is None:
            return
        if self.lora_manager is None:
            raise ValueError("LoRA adapters need the engine argument enable_lora=True.")
        self.lora_manager.load(lora_request)
        with self._lora_lock:
            for lora in lora_request.merged_from or (lora_request,):  # a merge itself is per request
                self.lora_requests.setdefault(lora.lora_name, lora)
                self.lora_requests.move_to_end(lora.lora_name)
            limit = max(self.lora_manager.max_cpu_loras, len(self._pinned_loras))
            for name in list(self.lora_requests):
                if len(self.lora_requests) <= limit:
                    break
                if name not in self._pinned_loras:
                    del self.lora_requests[name]

    def _assert_owner_thread(self) -> None:
        """Debug check (LOOMLM_CHECK_ENGINE_THREAD=1): the engine's state has one owner thread."""
        if not self._check_thread:
            return
        current = threading.current_thread()
        if self._owner_thread is None:
            self._owner_thread = current
        elif self._owner_thread is not current:
            raise RuntimeError(f"LLMEngine used from thread {current.name!r}; it belongs to "
                               f"{self._owner_thread.name!r} (the step thread alone may touch it).")

    def add_request(self, request_id: str, prompt: str | list[int] | EncodedPrompt, params: SamplingParams,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                    prompt_logprobs_from: int = 0, pooling_params: PoolingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request. Raises ValueError for bad input or a duplicate id (nothing is queued then).

        `prompt_logprobs_from`: with `params.prompt_logprobs`, only positions from this one on
        need logprobs (the others come back None), so the prefix cache may serve the prompt
        before it: continuation scoring prefills a shared prompt once.

        `best_of > n` runs best_of sequences and returns the n with the highest cumulative
        logprob once all have finished (vLLM v0's semantics); no intermediate outputs then.

        `pooling_params`: an embedding request (use `EMBEDDING_PARAMS` as `params`): its prompt is
        prefilled with the rest of the batch and it finishes with one `EmbeddingRequestOutput`.
        """
        self._assert_owner_thread()
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use.")
        self.add_engine_request(self.input_processor.process(request_id, prompt, params, lora_request,
                                                             prompt_logprobs_from, arrival_time, pooling_params,
                                                             priority))

    def add_engine_request(self, request: EngineRequest) -> None:
        """Queue a request `InputProcessor.process` made, without checking it again (the async
        engine processes requests in worker threads and queues them on the step thread).
        Raises ValueError for a request id in use (nothing is queued then)."""
        self._assert_owner_thread()
        request_id, params, lora_request = request.request_id, request.params, request.lora_request
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use.")
        text, token_ids = request.prompt
        arrival = request.arrival_time
        pooling = None
        if request.pooling_params is not None:
            if max(params.n, params.best_of or 0) != 1:
                raise ValueError("an embedding request is one sequence (n=1).")
            pooling = request.pooling_params.resolved(self.pooler_config, self.hf_config.hidden_size)
        max_tokens = self.input_processor.room_for(len(token_ids), params.max_tokens)
        num_sequences = max(params.n, params.best_of or 0)
        sequences = []
        for i in range(num_sequences):
            seq_params = params.clone(n=1, best_of=None, seed=None if params.seed is None else params.seed + i,
                                      prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            seq_params.all_stop_token_ids = set(seq_params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            seq_params.bad_words_token_ids = request.bad_words_token_ids
            seq_id = request_id if num_sequences == 1 else f"{i}_{request_id}"
            seq = Request(seq_id, token_ids, seq_params, max_tokens, request_id, i, arrival)
            if params.structured_outputs is not None:
                seq.structured_output = self.structured_outputs.request_state(params.structured_outputs)
            seq.needs_logprobs = params.needs_sampled_logprob
            seq.lora_request = lora_request  # counted by the scheduler, installed by the runner
            seq.prompt_logprobs_from = request.prompt_logprobs_from
            seq.pooling_params = pooling
            seq.priority = request.priority
            sequences.append(seq)
        self.output_processor.add_request(request_id, text, token_ids, sequences, params, lora_request, arrival,
                                          pooling)
        for seq in sequences:
            self.scheduler.add_request(seq)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop requests (and beam searches) and free their blocks; unknown ids are ignored."""
        self._assert_owner_thread()
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.beam_searches.pop(rid, None)
            if group is not None:
                self._beam_hooks.pop(rid, None)
                group.abort(self.scheduler)
                continue
            parent = self.output_processor.pop(rid)
            if parent is None:
                continue
            for seq in parent.sequences:
                self.scheduler.abort(seq)

    def abort_all(self) -> None:
        """Stop every request and beam search (a failed step, a shutdown, an interrupted batch)."""
        self.abort_request(list(self.output_processor.requests) + list(self.beam_searches))

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.requests or self.beam_searches)

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests) + len(self.beam_searches)

    # --------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every user request that got new tokens."""
        self._assert_owner_thread()
        scheduler_output = self.scheduler.schedule()
        failed = scheduler_output.finished_requests  # an adapter that failed to load
        if scheduler_output.is_empty:
            if not failed:
                # Everything waits on a background adapter load or grammar compile: do not spin.
                time.sleep(0.002)
            return self.output_processor.make_outputs(failed)
        if self._structured_outputs is not None:  # made by the first constrained request
            scheduler_output.grammar_bitmask = self._structured_outputs.grammar_bitmask(scheduler_output)
        started = time.perf_counter()
        runner_output = self.model_runner.execute(scheduler_output)
        step_seconds = time.perf_counter() - started
        # Beams do not take their sampled token: their group chooses it from the candidates.
        beam_owner = {beam.request_id: group for group in self.beam_searches.values() for beam in group.beams}
        beam_candidates = {rid: runner_output.logprobs.pop(rid)[0] for rid in list(runner_output.logprobs)
                           if rid in beam_owner}
        for rid in beam_candidates:
            runner_output.sampled_token_ids.pop(rid, None)
        self.output_processor.record_logprobs(scheduler_output, runner_output)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output.sampled_token_ids)
        for seq in self.output_processor.detokenize(updated):  # a stop string ended it
            self.scheduler.finish(seq, RequestStatus.FINISHED_STOPPED)
        if self.spec_decode is not None:
            self.spec_decode.record(scheduler_output, runner_output.sampled_token_ids, step_seconds)
            self.spec_decode.propose([r for r in updated if not r.is_finished and r.pooling_params is None],
                                     self.get_num_unfinished_requests(), len(self.scheduler.running))
        if beam_candidates:
            self._advance_beam_searches(beam_candidates, beam_owner)
        return self.output_processor.make_outputs(failed + updated)

    # -------------------------------------------------------------- beam search
    def add_beam_search_request(self, request_id: str, prompt: str | list[int] | EncodedPrompt,
                                params: BeamSearchParams, on_finish: Callable[[BeamSearchOutput], None]) -> None:
        """Queue a beam search; `on_finish(result)` is called with its BeamSearchOutput by the
        `step()` that completes it (not if it is aborted).

        The prompt is prefilled once; beams then share its KV blocks (see
        `engine/beam_search_group.py`). Raises ValueError for bad input (nothing queued).
        """
        self._assert_owner_thread()
        if request_id in self.output_processor.requests or request_id in self.beam_searches:
            raise ValueError(f"request id {request_id!r} is already in use.")
        width = params.beam_width
        if 2 * width > self.config.model_config.max_logprobs:
            raise ValueError(f"beam_width {width} needs {2 * width} logprobs per step, more than max_logprobs "
                             f"({self.config.model_config.max_logprobs}).")
        _, token_ids = self.encode_prompt(prompt)
        max_tokens = self.input_processor.room_for(len(token_ids), params.max_tokens)
        sampling = SamplingParams(temperature=params.temperature, logprobs=2 * width, max_tokens=max_tokens,
                                  ignore_eos=True, detokenize=False)
        root = Request(request_id, token_ids, sampling, max_tokens, None)
        self.beam_searches[request_id] = BeamSearchGroup(request_id, root, params, self.tokenizer.eos_token_id,
                                                         max_tokens)
        self._beam_hooks[request_id] = on_finish
        self.scheduler.add_request(root)

    def _advance_beam_searches(self, candidates: dict[str, PositionLogprobs],
                               owner: dict[str, BeamSearchGroup]) -> None:
        """Give each live beam's candidates to its group (`owner`: beam request id -> group) and
        run a round of every group whose beams have all reported."""
        touched: dict[str, BeamSearchGroup] = {}
        for beam_id, entry in candidates.items():
            group = owner[beam_id]
            group.add_candidates(beam_id, entry)
            touched[group.request_id] = group
        for group in touched.values():
            if not group.is_ready:
                continue
            result = group.advance(self.scheduler, self.output_processor.logprob_dict)
            if result is not None:
                for seq in result:
                    seq.text = self.tokenizer.decode(seq.tokens)  # prompt included, as vLLM
                del self.beam_searches[group.request_id]
                self._beam_hooks.pop(group.request_id)(BeamSearchOutput(result))

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own, special tokens kept (vLLM's decoded_token); thread-safe."""
        return self.output_processor.token_text(token_id)


def _eos_token_ids(tokenizer, hf_config) -> set[int]:
    """The tokenizer's EOS id and the model config's (an int or a list of them)."""
    cfg = getattr(hf_config, "eos_token_id", None)
    ids = set(cfg) if isinstance(cfg, (list, tuple)) else {cfg}
    return {i for i in ids | {tokenizer.eos_token_id} if isinstance(i, int)}


def resolve_max_model_len(model_config: ModelConfig, hf_config) -> int:
    """The context window the engine runs: `max_model_len`, or the model's own.
    Raises ValueError for a max_model_len beyond the model's window."""
    model_max = model_context_window(hf_config)
    if model_config.max_model_len is not None and model_config.max_model_len > model_max:
        raise ValueError(f"max_model_len ({model_config.max_model_len}) is larger than the model's context window "
                         f"({model_max}).")
    return model_config.max_model_len or model_max


def model_context_window(hf_config) -> int:
    """The longest context the model supports, as vLLM derives it (`_get_and_verify_max_len`).

    `max_position_embeddings` (2048 when absent); RoPE scaling that stretches positions
    ("linear", "dynamic") multiplies it by the scaling factor, "yarn" multiplies
    `original_max_position_embeddings`; "llama3" and "longrope" configs already state the
    stretched length.
    """
    from loomlm.layers.rotary import rope_parameters

    model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
    try:
        params = rope_parameters(hf_config)
    except (KeyError, TypeError):  # per-layer-type parameters (Gemma 3): no scaling of the window
        return model_max
    rope_type, factor = params.get("rope_type"), params.get("factor")
    if factor is None or rope_type not in ("linear", "dynamic", "yarn"):
        return model_max
    if rope_type == "yarn":
        model_max = params.get("original_max_position_embeddings") or model_max
    return int(model_max * float(factor))


def model_weights(source, model_config: ModelConfig):
    """The (HF name, tensor) pairs the model loads: float, or for quantization="gguf" the GGUF
    file's linear weights as `QuantizedWeight` blocks (kernel-supported types; the rest float).

    Raises ValueError for quantization="gguf" on a checkpoint that is not a GGUF file, or off the CPU.
    """
    method = model_config.quantization
    if method is None:
        return iter_weights(source, model_config.torch_dtype)
    if method == "gguf" and source.format != "gguf":
        raise ValueError(f"quantization='gguf' needs a GGUF file; {source.name!r} is a {source.format} checkpoint "
                         "(quantization='q8_0' or 'q4_0' quantizes it at load).")
    if model_config.torch_device.type != "cpu" or model_config.torch_dtype != torch.float32:
        raise ValueError(f"quantization={method!r} runs on the CPU in float32 (the native quantized kernels); "
                         f"got device {model_config.torch_device} and dtype {model_config.torch_dtype}.")
    if method in LOAD_TIME_QUANTIZATION:
        from loomlm.models.quantize import quantize_projections
        from loomlm.models.registry import MODEL_REGISTRY

        model_type = getattr(source.hf_config, "model_type", None)
        if model_type not in MODEL_REGISTRY or MODEL_REGISTRY[model_type].module != "loomlm.models.llama":
            raise ValueError(f"quantization={method!r} runs the Llama-family models (llama, mistral, qwen2/3, "
                             f"gemma 1-3, phi3, olmo2, granite, smollm3, MoE); {model_type!r} is not one of them.")

        return quantize_projections(iter_weights(source, model_config.torch_dtype), LOAD_TIME_QUANTIZATION[method])
    from loomlm.layers.linear_method import GGUF_KERNEL_TYPES
    from loomlm.models import gguf_loader

    return gguf_loader.iter_gguf_weights(source.weights_path, source.hf_config, keep_quantized=GGUF_KERNEL_TYPES)
