"""Asynchronous front of the engine for servers: one step thread, per-request queues.

Design (as vLLM's AsyncLLMEngine over v1's EngineCore busy loop): `generate()`
registers the request and yields its cumulative RequestOutputs from an
asyncio.Queue. New requests and aborts go through a thread-safe inbox to one
dedicated step thread, which applies them and runs `LLMEngine.step()` back to
back while anything is unfinished, handing each step's outputs to the requests'
event loops (`call_soon_threadsafe`) without waiting for them; it sleeps on the
inbox when idle. Always the same thread, because torch's OpenMP pool is per
calling thread and hopping between pool threads left idle teams spinning (steps
ran 2x slower). The step thread is the
only one that touches the engine's scheduler, KV cache, LoRA slots and model
(`LLMEngine` checks it with LOOMLM_CHECK_ENGINE_THREAD=1, as the tests run);
routes use the thread-safe views below and `InputProcessor`. A consumer that
stops iterating (client disconnect -> CancelledError / aclose) aborts its request.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import queue
import threading
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loomlm.beam_search import BeamSearchOutput, BeamSearchParams
from loomlm.config import EngineConfig
from loomlm.engine.input_processor import EncodedPrompt, EngineRequest, InputProcessor
from loomlm.engine.llm_engine import LLMEngine
from loomlm.lora.request import LoRARequest
from loomlm.outputs import EmbeddingRequestOutput, RequestOutput
from loomlm.pooling_params import PoolingParams, embedding_sampling_params
from loomlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_STOP = object()  # the step thread's inbox: shut down
# Live step threads and their inboxes, stopped and joined at interpreter exit.
_STEP_THREADS: weakref.WeakKeyDictionary[threading.Thread, queue.SimpleQueue] = weakref.WeakKeyDictionary()


def _step_loop(engine_ref: weakref.ref, inbox: queue.SimpleQueue) -> None:
    """The step thread (vLLM v1's EngineCore busy loop): take what the routes queued, step while
    anything is unfinished, and hand the outputs to the requests' event loops without waiting for
    them, so the next step runs while the event loop streams this one's tokens. Sleeps on the
    inbox when idle; ends on _STOP or once the engine is gone."""
    has_unfinished = False
    while True:
        items = [inbox.get()] if not has_unfinished else []  # idle: sleep until work arrives
        while True:
            try:
                items.append(inbox.get_nowait())
            except queue.Empty:
                break
        engine = engine_ref()
        if engine is None:
            return
        result = engine._step_once(items)
        del engine  # between turns, only the weak reference: a dropped engine can be collected
        if result is None:
            return
        has_unfinished = result


def _lower_priority(niceness: int) -> None:
    """Raise this thread's nice value by `niceness` (Linux: per thread; the OpenMP workers it starts
    inherit it). Must run before the thread's first parallel region. Where the OS has no per-thread
    priority, nothing changes."""
    if niceness and hasattr(os, "setpriority"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
        except OSError as exc:  # a sandbox without the call: serve anyway
            logger.warning("could not lower the step thread's priority (%s)", exc)


def _build_then_step(cls: type[AsyncLLMEngine], config: EngineConfig, handoff: queue.SimpleQueue) -> None:
    """The step thread of `AsyncLLMEngine.from_engine_args`: load the model here, hand the engine
    (or the error) to the caller through `handoff`, then serve it."""
    _lower_priority(config.scheduler_config.step_thread_niceness)
    try:
        engine = cls(LLMEngine(config))
        engine._adopt_step_thread(threading.current_thread())
    except BaseException as exc:  # the caller re-raises it
        handoff.put(exc)
        return
    ref, inbox = weakref.ref(engine), engine._inbox
    handoff.put(engine)
    del engine
    _step_loop(ref, inbox)


@atexit.register
def _stop_step_threads() -> None:
    """At exit, stop every step thread after its step in flight (a daemon killed inside a native
    kernel aborted the process: "terminate called without an active exception")."""
    for thread, inbox in list(_STEP_THREADS.items()):
        inbox.put(_STOP)
        thread.join(timeout=30)


@dataclass
class _PendingAdd:
    """A request for the step thread to add: a processed generation, or a beam search."""

    request_id: str
    queue: asyncio.Queue  # where its outputs go
    loop: asyncio.AbstractEventLoop  # the queue's event loop
    request: EngineRequest | None = None
    beam: tuple[EncodedPrompt, BeamSearchParams] | None = None


class AsyncLLMEngine:
    """Serves many concurrent `generate()` streams from one LLMEngine (see the module docstring)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}  # live requests (event-loop side)
        # To the step thread: a _PendingAdd, a request id to abort, or _STOP.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, _PendingAdd] = {}  # requests in the engine (step-thread side)
        self._finished_beams: list[tuple[_PendingAdd, BeamSearchOutput]] = []  # this step's (step thread)
        self._stopped = False
        self._lock = threading.Lock()
        self._step_thread: threading.Thread | None = None

    @classmethod
    def from_engine_args(cls, **kwargs) -> AsyncLLMEngine:
        """Build from flat vLLM-style engine args (see `EngineConfig.from_kwargs`). Loads the model
        on the step thread, which then serves it.

        Why there: libgomp cuts its barrier spin to ~1000 turns once it manages more threads than
        CPUs, and a model loaded on this thread leaves this thread's OpenMP team alive beside the
        step thread's. On 2 cores the step thread's workers then slept and woke at every parallel
        region (44k context switches in a 32-stream run, 17% fewer tokens/s than the same steps
        on the thread that loaded the model).

        Raises ValueError as `EngineConfig.from_kwargs` and `LLMEngine` do.
        """
        config = EngineConfig.from_kwargs(**kwargs)
        # A queue, not a Future: the thread's arguments live as long as it runs, and a Future
        # would keep the engine from ever being collected.
        handoff: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_build_then_step, args=(cls, config, handoff), name="loomlm-step", daemon=True).start()
        engine = handoff.get()
        if isinstance(engine, BaseException):
            raise engine
        return engine

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

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> LoRARequest:
        """`LLMEngine.register_lora` in a worker thread. Raises ValueError as it does."""
        return await asyncio.to_thread(self.engine.register_lora, lora_name, lora_path)

    def unload_lora_adapter(self, lora_name: str) -> bool:
        """`LLMEngine.unregister_lora` (thread-safe): False for an unknown name."""
        return self.engine.unregister_lora(lora_name)

    def warm_structured_outputs(self) -> None:
        """Build the grammar compiler now (~0.5 s holding the GIL) rather than on the first structured
        request, when every other request would wait for it."""
        _ = self.engine.structured_outputs

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._queues)

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

    async def embed(self, prompt: str | list[int], pooling_params: PoolingParams | None = None,
                    request_id: str | None = None, lora_request: LoRARequest | None = None
                    ) -> EmbeddingRequestOutput:
        """The prompt's embedding (see `LLM.embed`), its prefill batched with everything else.
        Raises ValueError for a bad prompt, params or adapter; cancelling aborts it."""
        final = None
        async for final in self.generate(prompt, embedding_sampling_params(), request_id, lora_request,
                                         pooling_params=pooling_params or PoolingParams()):
            pass
        if final is None:
            raise asyncio.CancelledError("the embedding request was aborted")
        return final

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str | None = None, lora_request: LoRARequest | None = None,
                       prompt_logprobs_from: int = 0, pooling_params: PoolingParams | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs for one request; the last has `finished=True`.

        With `lora_request`, the adapter is loaded first (`load_lora`). `prompt_logprobs_from`,
        `pooling_params` (an embedding request: see `embed`) and `priority` (vLLM's; needs
        scheduling_policy="priority"): see `LLMEngine.add_request`. Raises ValueError before yielding anything when the
        prompt, the parameters or the adapter are invalid.
        """
        request_id = request_id or uuid.uuid4().hex
        # Validate here, in the caller's task (a worker thread: never the event loop or the step
        # thread), so bad input is reported to this caller only; the engine queues it unchecked.
        request = await asyncio.to_thread(self.input_processor.process, request_id, prompt, sampling_params,
                                          lora_request, prompt_logprobs_from, None, pooling_params, priority)
        if pooling_params is not None:  # dimensions: checked here, so that it is this caller's 400
            pooling_params.resolved(self.engine.pooler_config, self.engine.hf_config.hidden_size)
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

    def _start_step_thread(self) -> None:
        """Start a step thread for an engine built elsewhere (see `_adopt_step_thread`)."""
        thread = threading.Thread(target=_step_loop, args=(weakref.ref(self), self._inbox),
                                  name="loomlm-step", daemon=True)
        self._adopt_step_thread(thread)
        thread.start()

    def _adopt_step_thread(self, thread: threading.Thread) -> None:
        """Make `thread` (running `_step_loop` on this engine) the step thread. It holds the engine
        only weakly between turns, so an engine nobody shut down is still collected (its finalizer
        stops the thread); a daemon, stopped and joined at interpreter exit (`_stop_step_threads`)
        rather than killed inside a kernel."""
        weakref.finalize(self, self._inbox.put, _STOP)
        _STEP_THREADS[thread] = self._inbox
        self._step_thread = thread

    def _release(self, request_id: str, finished: bool) -> None:
        """The caller stopped listening: forget its queue, and abort the request if it still runs."""
        self._queues.pop(request_id, None)
        if not finished:
            self._inbox.put(request_id)

    def _submit(self, request_id: str, request: EngineRequest | None = None,
                beam: tuple[EncodedPrompt, BeamSearchParams] | None = None) -> asyncio.Queue:
        """Queue an add for the step loop; returns the queue its outputs will arrive on."""
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use.")
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:  # so that no add lands in the inbox behind the stop
            if self._stopped:
                raise RuntimeError("the engine has been shut down")
            if self._step_thread is None:
                self._start_step_thread()
            self._queues[request_id] = outputs
            self._inbox.put(_PendingAdd(request_id, outputs, asyncio.get_running_loop(), request, beam))
        return outputs

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
        self._inbox.put(request_id)
        outputs = self._queues.pop(request_id, None)
        if outputs is not None:
            outputs.put_nowait(None)

    def _step_once(self, items: list) -> bool | None:
        """On the step thread: handle what the inbox held, step, deliver. Returns whether the
        engine has unfinished requests, or None once told to stop (the model then released)."""
        if any(item is _STOP for item in items):
            self._fail_all(RuntimeError("the engine has been shut down"))
            self.engine.model_runner.release()
            return None
        try:
            return self._step_and_deliver(items)
        except Exception as exc:  # a bug here must fail the requests in flight, not hang them
            logger.exception("the step loop failed")
            self.engine.abort_all()
            self._fail_all(RuntimeError(f"engine step failed: {exc}"))
            return False

    def _step_and_deliver(self, items: list) -> bool:
        """On the step thread, the only one that touches the engine: apply the adds and aborts the
        inbox held, run one step if anything is unfinished, and deliver the outputs. Returns
        whether the engine has unfinished requests."""
        engine = self.engine
        deliveries: list[tuple[_PendingAdd, object]] = []
        for add in items:
            if not isinstance(add, _PendingAdd):
                continue
            try:
                if add.beam is not None:  # its result comes through the hook, during a step
                    engine.add_beam_search_request(add.request_id, *add.beam,
                                                   on_finish=functools.partial(self._beam_finished, add))
                else:
                    engine.add_engine_request(add.request)
                self._routes[add.request_id] = add
            except ValueError as exc:
                deliveries.append((add, exc))
            except Exception as exc:  # a bug must fail its request, not stop the loop serving the others
                logger.exception("adding request %s failed", add.request_id)
                deliveries.append((add, RuntimeError(f"the engine could not add the request: {exc}")))
        aborts = [item for item in items if isinstance(item, str)]
        if aborts:
            engine.abort_request(aborts)
            for request_id in aborts:
                self._routes.pop(request_id, None)
        if engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as exc:  # a failed step fails its requests, not the server
                logger.exception("engine step failed")
                engine.abort_all()
                self._fail_all(RuntimeError(f"engine step failed: {exc}"))
                outputs = []
            for output in outputs:
                add = self._routes.get(output.request_id)
                if add is not None:
                    deliveries.append((add, output))
                    if output.finished:
                        del self._routes[output.request_id]
        deliveries += self._finished_beams
        self._finished_beams = []
        self._deliver(deliveries)
        return engine.has_unfinished_requests()

    def _fail_all(self, exc: BaseException) -> None:
        """On the step thread: end every routed request with `exc`."""
        routes, self._routes = self._routes, {}
        self._deliver([(add, exc) for add in routes.values()])

    def _deliver(self, deliveries: list[tuple[_PendingAdd, object]]) -> None:
        """On the step thread: put each item on its request's queue, one callback per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_PendingAdd, object]]] = {}
        for add, item in deliveries:
            by_loop.setdefault(add.loop, []).append((add, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _put_all(self, items: list[tuple[_PendingAdd, object]]) -> None:
        """On the requests' event loop: outputs of a request whose caller stopped listening are dropped."""
        for add, item in items:
            if self._queues.get(add.request_id) is add.queue:
                add.queue.put_nowait(item)

    def _beam_finished(self, add: _PendingAdd, result: BeamSearchOutput) -> None:
        """On the step thread: the engine's hook for a finished beam search (delivered after the step)."""
        if self._routes.pop(add.request_id, None) is not None:
            self._finished_beams.append((add, result))

    async def aclose(self) -> None:
        """`shutdown()`, then wait (in a worker thread) for the step thread to finish its step and end."""
        self.shutdown()
        thread = self._step_thread
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def shutdown(self) -> None:
        """Stop the step thread and free the model's weights and KV cache; safe from any thread.
        Requests still running end with RuntimeError("the engine has been shut down").

        The release runs on the step thread after any step in flight, so no step loses its tensors.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._step_thread
        if self.engine.lora_manager is not None:
            self.engine.lora_manager.shutdown()
        if thread is None:
            self.engine.model_runner.release()
        else:
            self._inbox.put(_STOP)
