"""The Generations API (LMQL's `lmql.model(...)`, `generate`, `score`) on loomlm's engine.

Source: LMQL's `lmql.LLM` / `lmql.model` / `lmql.generate` / `lmql.score`
(`lmql/api/llm.py`, `lmql/api/scoring.py`); ../shared/specs/lmql-generations.md. LMQL
calls the handle `lmql.LLM`; in loomlm it is `loomlm.Model` (`loomlm.LLM` is the
vLLM-style offline engine).

- `model(identifier, **engine_kwargs)` -> `Model`: a zoo alias or a local path runs in
  this process; an `http://` / `https://` URL is a loomlm server (then every call goes
  over HTTP, see `loomlm.remote_model`). Handles of the same local model with the same
  engine arguments share one engine (a process-wide registry), so their concurrent calls
  batch together.
- Each engine runs in a private event loop on a daemon thread. Async calls hand their
  coroutine to that loop and await the result from whatever loop they run in; the
  `_sync` twins block on it. So `generate_sync` works inside a running loop (Jupyter)
  and shares its engine with async callers; `asyncio.gather` of many calls batches them
  in the engine's step loop.
- `generate` returns only the generated text (LMQL's code does so; its docs say
  prompt + completion): a string, or a list of n strings when the decoder yields n > 1.
- The default model of the top-level functions: `set_default_model(...)`, else the
  environment variable `LOOMLM_DEFAULT_MODEL`, else the zoo's default
  (`smollm2-135m-instruct`).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from loomlm.background_loop import BackgroundLoop
from loomlm.chat_utils import render_chat
from loomlm.decoders import Decoder
from loomlm.scoring import ScoringResult, last_output, normalize_values, score_on_engine

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)
ENV_DEFAULT_MODEL = "LOOMLM_DEFAULT_MODEL"
REMOTE_KWARGS = ("model", "api_key", "timeout")  # what `model(server_url, ...)` takes


class PartialCompletion(NamedTuple):
    """One completion as it grows (cumulative: each report holds everything so far)."""

    text: str  # the generated text so far (stop strings held back until they cannot match)
    num_tokens: int  # tokens generated so far
    finish_reason: str | None  # None while running, then "stop" or "length"


class _Backend(Protocol):
    """What a Model handle runs on: an in-process engine or a loomlm server.

    Prompts are text (tokenized with the tokenizer's special tokens) or token ids.
    """

    identifier: str

    async def generate(self, prompt: str | list[int], decoder: Decoder) -> list[str]: ...

    def stream(self, prompt: str | list[int], decoder: Decoder) -> AsyncIterator[PartialCompletion]: ...

    async def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...

    async def score(self, prompt: str, values: list[str]) -> ScoringResult: ...

    async def aclose(self) -> None: ...


class LocalModel:
    """An in-process AsyncLLMEngine as a Model backend."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.identifier = engine.served_model_name

    async def generate(self, prompt: str | list[int], decoder: Decoder) -> list[str]:
        engine = self.engine
        if decoder.is_beam:
            prompt_ids = (await engine.encode(prompt)).token_ids
            result = await engine.beam_search(prompt_ids, decoder.beam_search_params(engine.max_model_len))
            return [_beam_text(engine, seq.tokens[len(prompt_ids):], seq.finish_reason) for seq in result.sequences]
        final = await last_output(engine.generate(prompt, decoder.sampling_params()))
        return [completion.text for completion in final.outputs]

    async def stream(self, prompt: str | list[int], decoder: Decoder) -> AsyncIterator[PartialCompletion]:
        async for output in self.engine.generate(prompt, decoder.sampling_params()):
            completion = output.outputs[0]
            yield PartialCompletion(completion.text, len(completion.token_ids), completion.finish_reason)

    async def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes the special tokens itself; the last message stays open.
        tokenizer = self.engine.tokenizer
        text = render_chat(tokenizer, messages, add_generation_prompt=False, continue_final_message=True)
        return tokenizer.encode(text, add_special_tokens=False)

    async def score(self, prompt: str, values: list[str]) -> ScoringResult:
        return await score_on_engine(self.engine, prompt, values)

    async def aclose(self) -> None:
        await self.engine.aclose()


def _beam_text(engine: AsyncLLMEngine, generated: list[int], finish_reason: str | None) -> str:
    """A beam's generated text without its final EOS (as the OpenAI route's `use_beam_search`)."""
    shown = generated[:-1] if finish_reason == "stop" else generated
    return engine.tokenizer.decode(shown, skip_special_tokens=True)


@dataclass(frozen=True)
class _Runtime:
    """One backend and the event loop it lives in; shared by every handle on it."""

    backend: _Backend  # every call on it runs in `loop`
    loop: BackgroundLoop


_registry: dict[tuple, _Runtime] = {}
_open_handles: dict[tuple, int] = {}  # registry key -> handles not yet closed
_registry_lock = threading.Lock()


def is_server_url(identifier: str) -> bool:
    return identifier.startswith(("http://", "https://"))


def _registry_key(identifier: str, kwargs: dict[str, Any]) -> tuple:
    if not is_server_url(identifier) and Path(identifier).expanduser().exists():
        identifier = str(Path(identifier).expanduser().resolve())
    return identifier, tuple(sorted((name, repr(value)) for name, value in kwargs.items()))


def _make_runtime(identifier: str, kwargs: dict[str, Any]) -> _Runtime:
    if is_server_url(identifier):
        from loomlm.remote_model import RemoteModel

        unknown = sorted(set(kwargs) - set(REMOTE_KWARGS))
        if unknown:
            raise ValueError(f"a server URL takes only {', '.join(REMOTE_KWARGS)} (engine arguments belong to "
                             f"the server), got {', '.join(unknown)}.")
        return _Runtime(RemoteModel(identifier, **kwargs), BackgroundLoop(f"loomlm-remote-{identifier}"))
    if "model" in kwargs:
        raise ValueError("the model is the identifier: `model=` is for server URLs (a served model or adapter).")
    # torch and the model load only here
    from loomlm.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(model=identifier, **kwargs)
    return _Runtime(LocalModel(engine), BackgroundLoop(f"loomlm-engine-{identifier}"))


def model(identifier: str, **kwargs: Any) -> Model:
    """A handle on `identifier`: a zoo alias, a local HF directory or .gguf file, or a loomlm
    server URL (`http://host:port`).

    kwargs: engine arguments for a local model (`max_model_len`, `kv_cache_memory_bytes`,
    `max_num_seqs`, `dtype`, ...; see `EngineConfig.from_kwargs`); for a URL only `model` (the
    served model's name or an adapter id), `api_key` and `timeout` (seconds). The local model
    is loaded now, once per (identifier, kwargs) in this process: later handles share its engine.

    Raises ValueError: an unknown model or engine argument.
    """
    if not isinstance(identifier, str) or not identifier:
        raise ValueError(f"the model identifier must be a non-empty string, got {identifier!r}.")
    key = _registry_key(identifier, kwargs)
    with _registry_lock:
        runtime = _registry.get(key)
        if runtime is None:
            runtime = _registry[key] = _make_runtime(identifier, kwargs)
        _open_handles[key] = _open_handles.get(key, 0) + 1
    return Model(identifier, runtime, key)


def _stop_runtime(runtime: _Runtime) -> None:
    """Shut the backend down (engine memory freed, HTTP client closed), then its event loop."""
    if threading.current_thread() is runtime.loop.thread:  # cannot wait on our own loop
        runtime.loop.submit(runtime.backend.aclose())
    else:
        try:
            runtime.loop.submit(runtime.backend.aclose()).result(timeout=5)
        except Exception:  # a stuck loop must not block the caller
            logger.debug("closing %s failed", runtime.backend.identifier, exc_info=True)
    runtime.loop.close()


class Model:
    """A handle on one model, in-process or on a loomlm server (made by `loomlm.model`).

    Calls are safe from any thread and any event loop; concurrent calls batch in the engine.
    """

    def __init__(self, identifier: str, runtime: _Runtime, registry_key: tuple) -> None:
        self.identifier = identifier
        self._shared: _Runtime | None = runtime
        self._registry_key = registry_key

    @property
    def _runtime(self) -> _Runtime:
        if self._shared is None:
            raise RuntimeError(f"this handle on {self.identifier!r} is closed; call loomlm.model(...) again")
        return self._shared

    def close(self) -> None:
        """Release this handle. The engine it shares (or its HTTP client) stops when the last open
        handle on it closes, which frees the engine's weights and KV cache; a later
        `loomlm.model(...)` loads the model again. Calls on a closed handle raise RuntimeError.
        Closing twice does nothing. Also `with loomlm.model(...) as m:`.
        """
        runtime, self._shared = self._shared, None
        if runtime is None:
            return
        key = self._registry_key
        with _registry_lock:
            if key not in _open_handles:  # everything was shut down at exit
                return
            _open_handles[key] -= 1
            last = _open_handles[key] == 0
            if last:
                del _open_handles[key]
                del _registry[key]
        if last:
            _stop_runtime(runtime)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_remote(self) -> bool:
        return is_server_url(self.identifier)

    @property
    def engine(self) -> AsyncLLMEngine | None:
        """The shared in-process engine (None for a server URL)."""
        backend = self._runtime.backend
        return backend.engine if isinstance(backend, LocalModel) else None

    def __repr__(self) -> str:
        return f"loomlm.Model({self.identifier!r})"

    # -- generate ---------------------------------------------------------------------

    def _generate(self, prompt: str, max_tokens: int | None, decoder: str, kwargs: dict[str, Any]
                  ) -> Coroutine[Any, Any, str | list[str]]:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}.")
        spec = Decoder.from_kwargs(decoder, max_tokens, **kwargs)
        return _one_or_list(self._runtime.backend.generate(prompt, spec), spec.n)

    async def generate(self, prompt: str, max_tokens: int | None = None, decoder: str = "argmax",
                       **kwargs: Any) -> str | list[str]:
        """Continue `prompt`; returns the generated text only (not the prompt).

        max_tokens: tokens to generate at most; None = until end-of-sequence or the context
            window (the beam decoders have no early stop: they then run to the window).
        decoder: "argmax" (greedy), "sample" (n=1, temperature=1, seed, top_k, top_p),
            "beam" / "beam_search" (n=4 beams), "beam_sample" (n=4, temperature=1);
            argmax and sample also take repetition_penalty, frequency_penalty, presence_penalty.
        Returns a string, or a list of n strings (best first for the beam decoders) when n > 1.
        Raises ValueError: an empty prompt, an unknown decoder or keyword, a value out of
        range, a prompt too long for the context window.
        """
        return await self._runtime.loop.run(self._generate(prompt, max_tokens, decoder, kwargs))

    def generate_sync(self, prompt: str, max_tokens: int | None = None, decoder: str = "argmax",
                      **kwargs: Any) -> str | list[str]:
        """`generate`, blocking (works inside a running event loop too)."""
        return self._runtime.loop.run_sync(self._generate(prompt, max_tokens, decoder, kwargs))

    # -- score ------------------------------------------------------------------------

    def _score(self, prompt: str, values: str | Sequence[str]) -> Coroutine[Any, Any, ScoringResult]:
        values = normalize_values(values)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}.")
        return self._runtime.backend.score(prompt, values)

    async def score(self, prompt: str, values: str | Sequence[str]) -> ScoringResult:
        """Score each value as a continuation of `prompt` (see `loomlm.scoring.ScoringResult`).

        The prompt is prefilled once and all values run as one batch reusing its KV blocks.
        Raises ValueError: an empty prompt, an empty values list or value, a prompt + value
        beyond the context window.
        """
        return await self._runtime.loop.run(self._score(prompt, values))

    def score_sync(self, prompt: str, values: str | Sequence[str]) -> ScoringResult:
        """`score`, blocking (works inside a running event loop too)."""
        return self._runtime.loop.run_sync(self._score(prompt, values))

    # -- for queries (loomlm.query) -----------------------------------------------------

    def _stream(self, prompt: str | list[int], decoder: Decoder) -> AsyncIterator[PartialCompletion]:
        """One completion (decoder.n == 1) as it grows, iterable from any event loop."""
        return self._runtime.loop.stream(self._runtime.backend.stream(prompt, decoder))

    async def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of `messages` in the model's chat template, the last message left open."""
        return await self._runtime.loop.run(self._runtime.backend.chat_prompt(messages))


async def _one_or_list(completions: Coroutine[Any, Any, list[str]], n: int) -> str | list[str]:
    texts = await completions
    return texts[0] if n == 1 else texts


# -- the default model and the top-level functions ---------------------------------------

_default_model: Model | str | None = None


def set_default_model(model_or_identifier: Model | str | None) -> None:
    """The model of the top-level functions when they get `model=None`: a handle, or an
    identifier loaded on first use (None: back to `LOOMLM_DEFAULT_MODEL`, else the zoo default).

    Raises ValueError for anything else.
    """
    global _default_model
    if model_or_identifier is not None and not isinstance(model_or_identifier, (Model, str)):
        raise ValueError(f"expected a loomlm.Model or a model identifier, got {model_or_identifier!r}.")
    _default_model = model_or_identifier


def get_default_model() -> Model:
    """The default model (see `set_default_model`), loaded if needed."""
    chosen = _default_model
    if isinstance(chosen, Model):
        return chosen
    from loomlm.models.zoo import DEFAULT_MODEL

    return model(chosen or os.environ.get(ENV_DEFAULT_MODEL) or DEFAULT_MODEL)


def as_model(model_or_identifier: Model | str | None) -> Model:
    """A handle: `model_or_identifier` itself, `model(identifier)`, or the default model for None."""
    if model_or_identifier is None:
        return get_default_model()
    if isinstance(model_or_identifier, Model):
        return model_or_identifier
    if isinstance(model_or_identifier, str):
        return model(model_or_identifier)
    raise ValueError(f"model must be a loomlm.Model, an identifier or None, got {model_or_identifier!r}.")


async def generate(prompt: str, max_tokens: int | None = None, decoder: str = "argmax",
                   model: Model | str | None = None, **kwargs: Any) -> str | list[str]:
    """`Model.generate` on `model` (a handle, an identifier, or None: the default model)."""
    return await as_model(model).generate(prompt, max_tokens, decoder, **kwargs)


def generate_sync(prompt: str, max_tokens: int | None = None, decoder: str = "argmax",
                  model: Model | str | None = None, **kwargs: Any) -> str | list[str]:
    """`Model.generate_sync` on `model` (None: the default model)."""
    return as_model(model).generate_sync(prompt, max_tokens, decoder, **kwargs)


async def score(prompt: str, values: str | Sequence[str], model: Model | str | None = None) -> ScoringResult:
    """`Model.score` on `model` (None: the default model)."""
    return await as_model(model).score(prompt, values)


def score_sync(prompt: str, values: str | Sequence[str], model: Model | str | None = None) -> ScoringResult:
    """`Model.score_sync` on `model` (None: the default model)."""
    return as_model(model).score_sync(prompt, values)


@atexit.register
def _shutdown_all() -> None:
    """Stop every engine and close every HTTP client at interpreter exit."""
    with _registry_lock:
        runtimes = list(_registry.values())
        _registry.clear()
        _open_handles.clear()
    for runtime in runtimes:
        _stop_runtime(runtime)
