"""Asynchronous front of the engine for servers: one background step loop, per-request queues.

Design (as vLLM's AsyncLLMEngine): `generate()` registers the request and
yields its cumulative RequestOutputs from an asyncio.Queue; a single
background task hands new requests and aborts to one dedicated step thread,
which applies them and runs `LLMEngine.step()` (the event loop keeps serving
HTTP meanwhile; always the same thread, because torch's OpenMP pool is per
calling thread and hopping between pool threads left idle teams spinning: steps
ran 2x slower), and routes each output to its queue. The step thread is the
only one that touches the engine's scheduler, KV cache, LoRA slots and model
(`LLMEngine` checks it with LOOMLM_CHECK_ENGINE_THREAD=1, as the tests run);
routes use the thread-safe views below and `InputProcessor`. A consumer that
stops iterating (client disconnect -> CancelledError / aclose) aborts its request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loomlm.beam_search import BeamSearchOutput, BeamSearchParams
from loomlm.config import EngineConfig
from loomlm.engine.input_processor import EncodedPrompt, EngineRequest, InputProcessor
from loomlm.engine.llm_engine import LLMEngine
from loomlm.lora.request import LoRARequest
from loomlm.outputs import RequestOutput
from loomlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _PendingAdd:
    """A request for the step thread to add: a processed generation, or a beam search."""

    request_id: str
    queue: asyncio.Queue  # where its outputs go
    request: EngineRequest | None = None
    beam: tuple[EncodedPrompt, BeamSearchParams] | None = None


@dataclass
class _StepResult:
    """What one `_engine_step` hands back to the event loop."""

    rejected: list[tuple[_PendingAdd, BaseException]]  # adds the engine refused, with the error for their queue
    outputs: list[RequestOutput]
    beam_results: dict[str, BeamSearchOutput]  # finished beam searches by request id
    failure: Exception | None  # the step raised: every request fails
    has_unfinished: bool


class AsyncLLMEngine:
    """Serves many concurrent `generate()` streams from one LLMEngine (see the module docstring)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list[_PendingAdd] = []
        self._pending_aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._step_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loomlm-step")

    @classmethod
    def from_engine_args(cls, **kwargs) -> AsyncLLMEngine:
        """Build from flat vLLM-style engine args (see `EngineConfig.from_kwargs`). Loads the model."""
        return cls(LLMEngine(EngineConfig.from_kwargs(**kwargs)))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def served_model_name(self) -> str:
        return self.engine.served_model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def input_processor(self) -> InputProcessor:
        """The request rules every face shares; thread-safe, so routes may call it off the step thread."""
        return self.engine.input_processor

    # Thread-safe views for the routes: the event loop never reaches into `self.engine` itself.
    @property
    def config(self) -> EngineConfig:
        """The engine's configuration (frozen)."""
        return self.engine.config

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (vLLM's decoded_token); a thread-safe cache."""
        return self.engine.token_text(token_id)

    def registered_loras(self) -> list[LoRARequest]:
        """The adapters loaded so far, least recently used first (a snapshot)."""
        return self.engine.registered_loras()

    def is_registered_lora(self, adapter_id: str | None) -> bool:
        """Whether `adapter_id` names an adapter loaded so far (what `/v1/models` lists)."""
        return self.engine.is_registered_lora(adapter_id)

    def loaded_adapters(self) -> list[str]:
        """The adapters installed in the model's slots now, least recently used first (LoRAX's /info
        `loaded_adapters`); [] without LoRA. A snapshot: the step thread may change the slots."""
        manager = self.engine.lora_manager
        return list(manager.loaded) if manager is not None else []

    async def lora_request_for(self, adapter_id: str, adapter_source: str | None = None,
                               api_token: str | None = None) -> LoRARequest:
        """`LLMEngine.lora_request_for` in a worker thread (it may read the disk or the network).

        Raises ValueError: LoRA not enabled, or an id that resolves to no allowed adapter."""
        return await asyncio.to_thread(self.engine.lora_request_for, adapter_id, adapter_source, api_token)

    def warm_structured_outputs(self) -> None:
        """Build the grammar compiler now (~0.5 s holding the GIL) rather than on the first structured
        request, when every other request would wait for it."""
        _ = self.engine.structured_outputs

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._queues)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._event_loop = asyncio.get_running_loop()
            self._loop_task = self._event_loop.create_task(self._run_loop())

    async def lora_for_model(self, name: str | None) -> LoRARequest | None:
        """What a request's model name selects (OpenAI `model=`, LLM Engine's endpoint name):
        None for the served model (or no name), else the adapter of that id, resolved and
        loaded in worker threads.

        Raises LookupError: neither the served model nor an adapter; ValueError: the adapter
        exists but fails to load.
        """
        if name is None or name == self.served_model_name:
            return None
        if self.engine.lora_manager is None:
            raise LookupError(f"The model `{name}` does not exist.")
        try:
            lora = await self.lora_request_for(name)
        except ValueError as exc:
            raise LookupError(f"The model `{name}` does not exist.") from exc
        await self.load_lora(lora)
        return lora

    async def encode(self, prompt: str | list[int] | EncodedPrompt, params: SamplingParams | None = None,
                     add_special_tokens: bool = True) -> EncodedPrompt:
        """`LLMEngine.encode_prompt` in a worker thread: tokenizing a long prompt or compiling a new
        grammar never blocks the event loop. Raises ValueError as `encode_prompt` does."""
        return await asyncio.to_thread(self.engine.encode_prompt, prompt, params, add_special_tokens)

    async def load_lora(self, lora_request: LoRARequest) -> None:
        """Read the adapter into the engine's host cache in a worker thread (decoding goes on).

        Raises ValueError: LoRA not enabled, or a bad adapter (see `LoRAManager.load`).
        """
        await asyncio.to_thread(self.engine.check_lora, lora_request)

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str | None = None, lora_request: LoRARequest | None = None,
                       prompt_logprobs_from: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs for one request; the last has `finished=True`.

        With `lora_request`, the adapter is loaded first (`load_lora`). `prompt_logprobs_from`:
        see `LLMEngine.add_request`. Raises ValueError before yielding anything when the
        prompt, the parameters or the adapter are invalid.
        """
        request_id = request_id or uuid.uuid4().hex
        # Validate here, in the caller's task (a worker thread: never the event loop or the step
        # thread), so bad input is reported to this caller only; the engine queues it unchecked.
        request = await asyncio.to_thread(self.input_processor.process, request_id, prompt, sampling_params,
                                          lora_request, prompt_logprobs_from)
        if lora_request is not None:
            await self.load_lora(lora_request)
        queue = self._submit(request_id, request=request)
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is None:  # aborted through abort(): the stream just ends
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._release(request_id, finished)

    def _release(self, request_id: str, finished: bool) -> None:
        """The caller stopped listening: forget its queue, and abort the request if it still runs."""
        self._queues.pop(request_id, None)
        if not finished:
            self._pending_aborts.append(request_id)
            if self._wakeup is not None:
                self._wakeup.set()

    def _submit(self, request_id: str, request: EngineRequest | None = None,
                beam: tuple[EncodedPrompt, BeamSearchParams] | None = None) -> asyncio.Queue:
        """Queue an add for the step loop; returns the queue its outputs will arrive on."""
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use.")
        self._ensure_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append(_PendingAdd(request_id, queue, request, beam))
        self._wakeup.set()
        return queue

    async def beam_search(self, prompt: str | list[int], params: BeamSearchParams,
                          request_id: str | None = None) -> BeamSearchOutput:
        """Beam-search one prompt (see `LLMEngine.add_beam_search_request`), batched with everything else.

        Raises ValueError for bad input; cancelling the call aborts the search.
        """
        request_id = request_id or uuid.uuid4().hex
        queue = self._submit(request_id, beam=(await self.encode(prompt), params))
        finished = False
        try:
            item = await queue.get()
            finished = True
            if item is None:
                raise asyncio.CancelledError(f"beam search {request_id} was aborted")
            if isinstance(item, BaseException):
                raise item
            return item
        finally:
            self._release(request_id, finished)

    async def abort(self, request_id: str) -> None:
        """Abort a request: the engine frees it and its generate() iterator simply ends."""
        self._pending_aborts.append(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(None)
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run_loop(self) -> None:
        """Hands the pending adds and aborts to the step thread, which applies them and runs a step
        (`_engine_step`), then routes what came back to the requests' queues. The event loop only
        moves data: it never touches the engine."""
        loop = asyncio.get_running_loop()
        has_unfinished = False
        while not self._stopped:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, []
            if not (adds or aborts or has_unfinished):
                self._wakeup.clear()
                if not (self._pending_adds or self._pending_aborts):
                    await self._wakeup.wait()
                continue
            result = await loop.run_in_executor(self._step_executor, self._engine_step, adds, aborts)
            for add, exc in result.rejected:
                add.queue.put_nowait(exc)
            if result.failure is not None:  # a failed step fails its requests, not the server
                for queue in list(self._queues.values()):
                    queue.put_nowait(RuntimeError(f"engine step failed: {result.failure}"))
            for output in result.outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
            for request_id, beam_result in result.beam_results.items():
                queue = self._queues.get(request_id)
                if queue is not None:
                    queue.put_nowait(beam_result)
            has_unfinished = result.has_unfinished

    def _engine_step(self, adds: list[_PendingAdd], aborts: list[str]) -> _StepResult:
        """On the step thread, the only one that touches the engine: apply the adds and aborts
        queued since the last step, then run one step if anything is unfinished."""
        engine = self.engine
        rejected: list[tuple[_PendingAdd, BaseException]] = []
        for add in adds:
            try:
                if add.beam is not None:
                    engine.add_beam_search_request(add.request_id, *add.beam)
                else:
                    engine.add_engine_request(add.request)
            except ValueError as exc:
                rejected.append((add, exc))
            except Exception as exc:  # a bug must fail its request, not stop the loop serving the others
                logger.exception("adding request %s failed", add.request_id)
                rejected.append((add, RuntimeError(f"the engine could not add the request: {exc}")))
        if aborts:
            engine.abort_request(aborts)
        outputs: list[RequestOutput] = []
        failure: Exception | None = None
        if engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as exc:
                logger.exception("engine step failed")
                failure = exc
                engine.abort_request(list(engine.user_requests) + list(engine.beam_searches))
        beam_results = {rid: engine.finished_beam_searches.pop(rid) for rid in list(engine.finished_beam_searches)}
        return _StepResult(rejected, outputs, beam_results, failure, engine.has_unfinished_requests())

    async def aclose(self) -> None:
        """`shutdown()`, then, from the event loop the step loop runs in, wait for it to end."""
        self.shutdown()
        task = self._loop_task
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            await asyncio.gather(task, return_exceptions=True)

    def shutdown(self) -> None:
        """Stop the background loop and free the model's weights and KV cache; safe from any thread.

        The release runs on the step thread after any step in flight, so no step loses its tensors.
        """
        if self._stopped:
            return
        self._stopped = True
        if self.engine.lora_manager is not None:
            self.engine.lora_manager.shutdown()
        loop, task = self._event_loop, self._loop_task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop stopped meanwhile
        try:
            self._step_executor.submit(self.engine.model_runner.release)
        except RuntimeError:
            pass  # interpreter exit: executors take no more work, and the memory goes with the process
        self._step_executor.shutdown(wait=False)
