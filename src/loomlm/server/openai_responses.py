"""OpenAI responses from a `Generation`: the whole response, or the SSE stream of chunks.

Source: the OpenAI API reference for the shapes (choices, logprobs, usage, `[DONE]`), vLLM's
`serving_completion.py` / `serving_chat.py` for the extras (`stop_reason`, `prompt_logprobs`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from loomlm.protocol.openai import (
    TGI_CLIENT_MODEL,
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DeltaToolCall,
    SamplingRequestFields,
    TGIDeltaMessage,
    UsageInfo,
)
from loomlm.server.chat_output import ChatOutputState
from loomlm.server.errors import BadRequestError, error_body
from loomlm.server.openai_generation import Generation
from loomlm.server.openai_logprobs import (
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs_json,
)
from loomlm.server.sse import (
    SSE_DONE,
    TextDelta,
    TextDeltaTracker,
    aclose_shielded,
    first_then_rest,
    sse_event,
)

logger = logging.getLogger(__name__)


def full_response(generation: Generation, created_s: int, is_chat: bool, token_text: Callable[[int], str],
                  chat_output: ChatOutputState | None = None) -> BaseModel:
    """The whole (non-streamed) completion or chat completion of `generation`, OpenAI's shape;
    with `chat_output` (a chat's tools and reasoning parser) each choice's text is read into
    reasoning, content and tool calls; without, it is the content."""
    params = generation.params[0]
    views = [generation.view(i, generation.latest[i]) for i in range(len(generation.prompts))]
    results = [
        (prompt_index * params.n + c.index, c, view)
        for prompt_index, view in enumerate(views)
        for c in sorted(view.outputs, key=lambda c: c.index)
    ]
    if is_chat:
        chat_choices = []
        for i, c, _ in results:
            state = chat_output.fresh() if chat_output is not None else ChatOutputState()  # one per choice
            reasoning, content, calls = state.message(c.text)
            chat_choices.append(ChatCompletionChoice(
                index=i,
                message=ChatResponseMessage(content=content, reasoning_content=reasoning, tool_calls=calls),
                logprobs=chat_logprobs(c.token_ids, c.logprobs, params.logprobs or 0, token_text)
                if c.logprobs is not None else None,
                finish_reason=state.finish_reason(c.finish_reason),
                stop_reason=c.stop_reason,
            ))
        return ChatCompletionResponse(
            id=generation.request_id, created=created_s, model=generation.model_name, choices=chat_choices,
            usage=generation.usage(),
            prompt_logprobs=prompt_logprobs_json(views[0].prompt_logprobs),
        )
    choices = [
        CompletionChoice(
            index=i, text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            logprobs=completion_logprobs(c.token_ids, c.logprobs, params.logprobs or 0, token_text)
            if c.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs_json(view.prompt_logprobs),
        )
        for i, c, view in results
    ]
    return CompletionResponse(
        id=generation.request_id, created=created_s, model=generation.model_name, choices=choices,
        usage=generation.usage())

async def stream_response(
    body: SamplingRequestFields,
    raw_request: Request,
    generation: Generation,
    created_s: int,
    is_chat: bool,
    token_text: Callable[[int], str],
    chat_output: ChatOutputState | None = None,
) -> StreamingResponse:
    """`generation` as OpenAI's SSE stream of chunks (completion or chat), after its first output
    (so that input the engine rejects is still a plain HTTP 400): the opening chunks (chat), one
    chunk per text delta of a choice (its last one with the finish_reason), the usage chunk if
    asked for, then `[DONE]`; closing the stream aborts the generation. With `chat_output` (a
    chat's tools and reasoning parser), each choice's text is read as it grows: reasoning_content
    and content deltas (none while a part is held back), then per tool call one chunk with its id
    and name and one with its arguments (argument fragments as generated for a named function),
    reassembling to the non-streamed message."""
    chunk_cls = ChatCompletionStreamResponse if is_chat else CompletionStreamResponse
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # Per OpenAI, with include_usage every chunk carries "usage": null except the last.
    exclude = None if include_usage else {"usage"}

    def chunk_event(choices: list[Any], usage: UsageInfo | None = None) -> str:
        chunk = chunk_cls(id=generation.request_id, created=created_s, model=generation.model_name, choices=choices,
                          usage=usage)
        return sse_event(chunk.model_dump_json(exclude=exclude))

    num_top = generation.params[0].logprobs or 0
    # TGI's client gets its own delta shape, and the text as content (no tool or reasoning parsing).
    tgi_client = is_chat and getattr(body, "model", None) == TGI_CLIENT_MODEL
    if chat_output is None or tgi_client:
        chat_output = ChatOutputState()
    states: dict[int, ChatOutputState] = {}
    texts: dict[int, str] = {}

    def make_choice(delta: TextDelta) -> BaseModel | None:
        if not is_chat:
            logprobs = None if delta.logprobs is None else completion_logprobs(
                delta.token_ids, delta.logprobs, num_top, token_text, delta.text_offset)
            return CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                                    finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
        state = states.setdefault(delta.index, chat_output.fresh())
        texts[delta.index] = texts.get(delta.index, "") + delta.text
        finished = delta.finish_reason is not None
        reasoning, content, fragments = state.delta(texts[delta.index], finished)
        if not reasoning and not content and not fragments and not finished:
            return None  # held back: nothing to show yet
        # The finishing chunk of a choice carries an empty delta `{}` when no text is left, as OpenAI's.
        message = TGIDeltaMessage(content=content) if tgi_client else DeltaMessage(
            reasoning_content=reasoning or None, content=content or None,
            tool_calls=[DeltaToolCall.model_validate(f) for f in fragments] or None)
        logprobs = None if delta.logprobs is None else chat_logprobs(
            delta.token_ids, delta.logprobs, num_top, token_text)
        return ChatCompletionStreamChoice(index=delta.index, delta=message, logprobs=logprobs,
                                          finish_reason=state.finish_reason(delta.finish_reason),
                                          stop_reason=delta.stop_reason)

    outputs = await first_then_rest(raw_request, generation.outputs())

    async def events() -> AsyncGenerator[str, None]:
        tracker = TextDeltaTracker(generation.params[0].n)
        try:
            try:
                if is_chat:  # OpenAI opens each chat choice with the role and an empty content.
                    opening = TGIDeltaMessage(content="") if tgi_client else DeltaMessage(role="assistant", content="")
                    for i in range(len(generation.prompts) * generation.params[0].n):
                        yield chunk_event([ChatCompletionStreamChoice(index=i, delta=opening)])
                async for item in outputs:
                    for delta in tracker.deltas(*item):
                        choice = make_choice(delta)
                        if choice is not None:
                            yield chunk_event([choice])
            finally:
                await aclose_shielded(outputs)
            if include_usage:
                yield chunk_event([], generation.usage())
        except BadRequestError as exc:
            yield sse_event(error_body(exc.message, 400).model_dump_json())
        except Exception as exc:  # headers are sent: the error can only travel inside the stream
            logger.exception("stream %s failed", generation.request_id)
            yield sse_event(error_body(f"{type(exc).__name__}: {exc}", 500).model_dump_json())
        if not tgi_client:  # TGI's client parses every `data:` line as JSON: no `[DONE]` (TGI 2.0 sent none)
            yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
