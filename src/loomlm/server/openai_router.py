"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

Each HTTP request becomes one engine request per prompt (`n` completions
each), run concurrently. The route does the translation only: prompt ->
token ids (the model's chat template for chat), body -> `SamplingParams`,
context-window checks, then `RequestOutput`s -> OpenAI responses or SSE chunks.

Source: the OpenAI API reference and vLLM's `vllm/entrypoints/openai/`
(`serving_completion.py`, `serving_chat.py`) for the behaviour of the extra
fields, the error messages and the usage accounting; see
../shared/specs/vllm-openai.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from loomlm.outputs import RequestOutput
from loomlm.protocol.openai import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    SamplingRequestFields,
    UsageInfo,
)
from loomlm.sampling_params import SamplingParams
from loomlm.server.errors import BadRequestError, ModelNotFoundError, error_body
from loomlm.server.metrics import ServerMetrics, record_usage
from loomlm.server.sse import (
    SSE_DONE,
    ClientDisconnected,
    TextDelta,
    TextDeltaTracker,
    merge_async_iterators,
    run_until_disconnect,
    sse_event,
)

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)

# nginx's "client closed request": logged for requests whose client went away.
_STATUS_CLIENT_CLOSED = 499

# Sampling fields passed to SamplingParams only when the client set them (else its defaults apply).
_OPTIONAL_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
)


class _Generation:
    """The engine requests of one HTTP request: one per prompt, streamed together.

    `latest[i]` is the newest RequestOutput of prompt `i` (cumulative text).
    Closing `outputs()` early (client gone) aborts the unfinished engine requests.
    """

    def __init__(
        self,
        serving: OpenAIServing,
        raw_request: Request,
        prompts: list[list[int]],
        params: list[SamplingParams],
        request_id: str,
    ) -> None:
        self.serving = serving
        self.raw_request = raw_request
        self.prompts = prompts
        self.params = params
        self.request_id = request_id
        # One engine request per prompt.
        self.request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self.latest: dict[int, RequestOutput] = {}

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for out in self.latest.values() for c in out.outputs)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def outputs(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Yield `(prompt_index, RequestOutput)` as the engine produces them.

        Raises:
            BadRequestError: the engine rejected a prompt (its ValueError).
        """
        engine = self.serving.engine
        metrics = self.serving.metrics
        metrics.requests_running.inc()
        try:
            streams = [
                engine.generate(prompt, params, rid)
                for prompt, params, rid in zip(self.prompts, self.params, self.request_ids, strict=True)
            ]
            async with aclosing(merge_async_iterators(streams)) as merged:
                async for prompt_index, output in merged:
                    self.latest[prompt_index] = output
                    yield prompt_index, output
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        finally:
            metrics.requests_running.dec()
            # Closing the streams already aborts them (engine contract); abort again by id
            # in case a stream never started, so nothing keeps running for a gone client.
            unfinished = [rid for i, rid in enumerate(self.request_ids) if not self._is_finished(i)]
            if unfinished:
                with anyio.CancelScope(shield=True):
                    for rid in unfinished:
                        try:
                            await engine.abort(rid)
                        except Exception:  # an unknown id is not worth failing the clean-up
                            logger.debug("abort of %s failed", rid, exc_info=True)
            usage = self.usage()
            record_usage(self.raw_request, metrics, usage.prompt_tokens, usage.completion_tokens)

    def _is_finished(self, prompt_index: int) -> bool:
        output = self.latest.get(prompt_index)
        return output is not None and output.finished


class OpenAIServing:
    """Serves the OpenAI routes for one engine (its served model name, tokenizer, context window)."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.served_model_name: str = engine.served_model_name
        self.max_model_len: int = engine.max_model_len
        self.created_s = int(time.time())

    # -- routes ---------------------------------------------------------------------------

    async def list_models(self) -> ModelList:
        """`GET /v1/models`: the one served model, with its context window in tokens."""
        card = ModelCard(id=self.served_model_name, created=self.created_s, max_model_len=self.max_model_len)
        return ModelList(data=[card])

    async def create_completion(self, body: CompletionRequest, raw_request: Request) -> Response:
        """`POST /v1/completions`. Errors: 400 invalid input, 404 unknown model."""
        self._check_model(body.model)
        if body.echo:
            raise BadRequestError("echo is not supported.", "echo")
        if body.logprobs is not None:
            raise BadRequestError("logprobs is not supported.", "logprobs")
        if body.suffix:
            raise BadRequestError("suffix is not supported.", "suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise BadRequestError("best_of is not supported.", "best_of")
        params = self._sampling_params(body, body.max_tokens)
        prompts = self._completion_prompts(body.prompt)
        return await self._serve(body, raw_request, prompts, params, f"cmpl-{uuid.uuid4().hex}", is_chat=False)

    async def create_chat_completion(self, body: ChatCompletionRequest, raw_request: Request) -> Response:
        """`POST /v1/chat/completions`, prompt from the model's chat template. Errors: 400, 404."""
        self._check_model(body.model)
        if body.logprobs or body.top_logprobs:
            raise BadRequestError("logprobs is not supported.", "logprobs")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise BadRequestError("response_format is not supported.", "response_format")
        params = self._sampling_params(body, body.requested_max_tokens)
        prompt_text = self._render_chat(body)
        # The template already wrote the special tokens (vLLM chat: add_special_tokens=False).
        prompts = [self.tokenizer.encode(prompt_text, add_special_tokens=False)]
        return await self._serve(body, raw_request, prompts, params, f"chatcmpl-{uuid.uuid4().hex}", is_chat=True)

    # -- request -> engine ----------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise ModelNotFoundError(model)

    def _sampling_params(self, body: SamplingRequestFields, max_tokens: int | None) -> SamplingParams:
        kwargs: dict[str, Any] = {
            name: getattr(body, name) for name in _OPTIONAL_SAMPLING_FIELDS if getattr(body, name) is not None
        }
        try:
            return SamplingParams(
                n=1 if body.n is None else body.n,
                max_tokens=max_tokens,
                stop=body.stop,
                stop_token_ids=body.stop_token_ids,
                ignore_eos=bool(body.ignore_eos),
                min_tokens=body.min_tokens or 0,
                include_stop_str_in_output=bool(body.include_stop_str_in_output),
                skip_special_tokens=body.skip_special_tokens is not False,
                **kwargs,
            )
        except ValueError as exc:
            # SamplingParams messages start with the offending field's name.
            words = str(exc).split(maxsplit=1)
            param = words[0] if words and words[0] in SamplingParams.__dataclass_fields__ else None
            raise BadRequestError(str(exc), param) from exc

    def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Token ids of each prompt; text is tokenized with special tokens, as vLLM does."""
        if isinstance(prompt, str):
            batch: list[str] | list[list[int]] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            batch = [prompt]  # type: ignore[list-item]  # one token-id prompt
        else:
            batch = prompt  # type: ignore[assignment]
        if not batch:
            raise BadRequestError("prompt must not be empty.", "prompt")
        vocab_size = len(self.tokenizer)
        prompts = []
        for item in batch:
            if isinstance(item, str):
                if not item:
                    raise BadRequestError("prompt must not be empty.", "prompt")
                token_ids = self.tokenizer.encode(item)
            else:
                token_ids = list(item)
                bad = [t for t in token_ids if not 0 <= t < vocab_size]
                if bad:
                    raise BadRequestError(f"Token id {bad[0]} is out of vocabulary (size {vocab_size}).", "prompt")
            if not token_ids:
                raise BadRequestError("prompt must not be empty.", "prompt")
            prompts.append(token_ids)
        return prompts

    def _render_chat(self, body: ChatCompletionRequest) -> str:
        if not body.messages:
            raise BadRequestError("messages must not be empty.", "messages")
        messages = [_message_for_template(m) for m in body.messages]
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt is not False and not body.continue_final_message,
                continue_final_message=bool(body.continue_final_message),
                chat_template=body.chat_template,
            )
        except Exception as exc:  # jinja errors and template-raised exceptions are the client's input
            raise BadRequestError(f"Cannot apply the chat template: {exc}", "messages") from exc

    def _fit_max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """The completion budget of a prompt of `prompt_len` tokens (vLLM's messages on overflow)."""
        if prompt_len >= self.max_model_len:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request "
                f"has {prompt_len} input tokens. Please reduce the length of the input messages.",
                "prompt",
            )
        if requested is None:
            return self.max_model_len - prompt_len
        if prompt_len + requested > self.max_model_len:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
                "Please reduce the length of the messages or completion.",
                "max_tokens",
            )
        return requested

    # -- engine -> response ---------------------------------------------------------------

    async def _serve(
        self,
        body: SamplingRequestFields,
        raw_request: Request,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        is_chat: bool,
    ) -> Response:
        per_prompt_params = []
        for prompt in prompts:
            max_tokens = self._fit_max_tokens(len(prompt), params.max_tokens)
            try:
                per_prompt_params.append(params.clone(max_tokens=max_tokens))
            except ValueError as exc:  # e.g. min_tokens above what the context window leaves
                raise BadRequestError(str(exc)) from exc
        generation = _Generation(self, raw_request, prompts, per_prompt_params, request_id)
        created_s = int(time.time())
        try:
            if body.stream:
                return await self._stream_response(body, raw_request, generation, created_s, is_chat)
            await run_until_disconnect(raw_request, _drain(generation))
        except ClientDisconnected:
            return Response(status_code=_STATUS_CLIENT_CLOSED)
        return JSONResponse(self._full_response(generation, created_s, is_chat).model_dump())

    def _full_response(self, generation: _Generation, created_s: int, is_chat: bool) -> BaseModel:
        request_id = generation.request_id
        n = generation.params[0].n
        results = [
            (prompt_index * n + c.index, c)
            for prompt_index in range(len(generation.prompts))
            for c in sorted(generation.latest[prompt_index].outputs, key=lambda c: c.index)
        ]
        usage = generation.usage()
        if is_chat:
            chat_choices = [
                ChatCompletionChoice(
                    index=i,
                    message=ChatResponseMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for i, c in results
            ]
            return ChatCompletionResponse(
                id=request_id, created=created_s, model=self.served_model_name, choices=chat_choices, usage=usage
            )
        choices = [
            CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in results
        ]
        return CompletionResponse(
            id=request_id, created=created_s, model=self.served_model_name, choices=choices, usage=usage
        )

    async def _stream_response(
        self,
        body: SamplingRequestFields,
        raw_request: Request,
        generation: _Generation,
        created_s: int,
        is_chat: bool,
    ) -> StreamingResponse:
        chunk_cls = ChatCompletionStreamResponse if is_chat else CompletionStreamResponse

        def make_chunk(choices: list[Any], usage: UsageInfo | None = None) -> BaseModel:
            return chunk_cls(
                id=generation.request_id, created=created_s, model=self.served_model_name, choices=choices, usage=usage
            )

        def make_choice(delta: TextDelta) -> BaseModel:
            if not is_chat:
                return CompletionChoice(
                    index=delta.index, text=delta.text, finish_reason=delta.finish_reason, stop_reason=delta.stop_reason
                )
            # The finishing chunk of a choice carries an empty delta `{}` when no text is left, as OpenAI's.
            message = DeltaMessage(content=delta.text) if delta.text or delta.finish_reason is None else DeltaMessage()
            return ChatCompletionStreamChoice(
                index=delta.index, delta=message, finish_reason=delta.finish_reason, stop_reason=delta.stop_reason
            )

        opening: list[BaseModel] = []
        if is_chat:
            # OpenAI opens each chat choice with the role and an empty content.
            num_choices = len(generation.prompts) * generation.params[0].n
            opening = [
                make_chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(num_choices)
            ]
        outputs = generation.outputs()
        # Wait for the first output before answering, so that an input the engine rejects
        # still gets a plain HTTP 400 instead of an error inside a 200 stream.
        try:
            first = await run_until_disconnect(raw_request, anext(outputs, None))
        except BaseException:
            await outputs.aclose()
            raise
        events = _sse_events(outputs, first, generation, opening, make_chunk, make_choice, body.include_usage_in_stream)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _drain(generation: _Generation) -> None:
    async with aclosing(generation.outputs()) as outputs:
        async for _ in outputs:
            pass


async def _sse_events(
    outputs: AsyncGenerator[tuple[int, RequestOutput], None],
    first: tuple[int, RequestOutput] | None,
    generation: _Generation,
    opening: list[BaseModel],
    make_chunk: Callable[..., BaseModel],
    make_choice: Callable[[TextDelta], BaseModel],
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    """SSE text of a stream: the opening chunks, one chunk per text delta of a
    choice (its last one with the finish_reason), the usage chunk if asked
    for, then `[DONE]`. Closing it aborts the generation.
    """
    # Per OpenAI, with include_usage every chunk carries "usage": null except the last.
    exclude = None if include_usage else {"usage"}
    tracker = TextDeltaTracker(generation.params[0].n)
    try:
        async with aclosing(outputs):
            for chunk in opening:
                yield sse_event(chunk.model_dump_json(exclude=exclude))
            item = first
            while item is not None:
                for delta in tracker.deltas(*item):
                    yield sse_event(make_chunk([make_choice(delta)]).model_dump_json(exclude=exclude))
                item = await anext(outputs, None)
        if include_usage:
            yield sse_event(make_chunk([], generation.usage()).model_dump_json())
    except BadRequestError as exc:
        yield sse_event(error_body(exc.message, 400).model_dump_json())
    except Exception as exc:  # headers are sent: the error can only travel inside the stream
        logger.exception("stream %s failed", generation.request_id)
        yield sse_event(error_body(f"{type(exc).__name__}: {exc}", 500).model_dump_json())
    yield SSE_DONE


def _message_for_template(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: `content` a string (text parts joined)."""
    data = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise BadRequestError(f"Content parts of type {part.type!r} are not supported.", "messages")
            texts.append(part.text)
        data["content"] = "\n".join(texts)
    elif content is None:
        data["content"] = ""
    return data


def build_openai_router(engine: AsyncLLMEngine, metrics: ServerMetrics) -> APIRouter:
    """The OpenAI routes for `engine`, counting tokens into `metrics`."""
    serving = OpenAIServing(engine, metrics)
    router = APIRouter()
    router.add_api_route("/v1/models", serving.list_models, methods=["GET"], response_model=ModelList)
    router.add_api_route("/v1/completions", serving.create_completion, methods=["POST"], response_model=None)
    router.add_api_route("/v1/chat/completions", serving.create_chat_completion, methods=["POST"], response_model=None)
    return router
