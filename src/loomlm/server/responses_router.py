"""OpenAI's Responses API, `POST /v1/responses`, stateless subset, as a translation of the chat path.

Source: the OpenAI API reference (Responses: create, the Response object, streaming events) and
vLLM's `serving_responses.py`. A request becomes one chat completion (`OpenAIServing.prepare_chat`:
chat template, tools, structured output, the server's tool and reasoning parsers) and its text
is read back into output items: `reasoning`, `message` (`output_text`), `function_call`.

Supported: `input` as text or items (`message` with text or `input_text` parts, roles user /
assistant / system / developer; `function_call` and `function_call_output` for tool round trips),
`instructions`, `max_output_tokens`, `temperature`, `top_p`, `text.format` (`text`, `json_object`,
`json_schema`), function `tools` with `tool_choice` and `parallel_tool_calls`, `stream` (typed
events: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta / .done, response.content_part.done,
response.function_call_arguments.delta / .done, response.output_item.done, response.completed;
each with `sequence_number`). Stateless: `previous_response_id` and built-in tools (web search,
file search, ...) are refused with a 400; nothing is stored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from itertools import count
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from loomlm.protocol.openai import ChatCompletionRequest
from loomlm.server.chat_output import ChatOutputState
from loomlm.server.errors import BadRequestError
from loomlm.server.openai_generation import Generation, drain
from loomlm.server.sse import (
    TextDeltaTracker,
    aclose_shielded,
    first_then_rest,
    run_until_disconnect,
)

if TYPE_CHECKING:
    from loomlm.server.openai_router import OpenAIServing

RESPONSES_PATH = "/v1/responses"


class ResponsesRequest(BaseModel):
    """`POST /v1/responses` (the fields served; unknown ones such as `user` are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    stream: bool | None = False
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None


def _text_of(content: Any) -> str:
    """A message's content as text: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise BadRequestError(f"content parts of type {part.get('type') if isinstance(part, dict) else part!r} "
                                      "are not supported (text only).", "input")
        return "\n".join(str(part.get("text", "")) for part in content)
    raise BadRequestError("a message's content must be text or a list of text parts.", "input")


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion a Responses request is. Raises BadRequestError (400) for what is not served."""
    if body.previous_response_id is not None:
        raise BadRequestError("previous_response_id is not supported: this server stores no responses "
                              "(send the conversation in `input`).", "previous_response_id")
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    items = [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequestError(f"unsupported message role {role!r}.", "input")
            messages.append({"role": "system" if role == "developer" else role, "content": _text_of(item.get("content"))})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": str(item.get("output", ""))})
        elif kind == "reasoning":
            continue  # earlier reasoning is not fed back to the model
        else:
            raise BadRequestError(f"input items of type {kind!r} are not supported.", "input")
    for tool in body.tools or []:
        if tool.get("type") != "function":
            raise BadRequestError(f"tools of type {tool.get('type')!r} are not supported (functions only).", "tools")
    tools = [{"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                               if tool.get(k) is not None}} for tool in body.tools or []] or None
    tool_choice = body.tool_choice
    if isinstance(tool_choice, dict):
        if tool_choice.get("type") != "function" or not tool_choice.get("name"):
            raise BadRequestError("tool_choice must be none, auto, required or {'type': 'function', 'name': ...}.",
                                  "tool_choice")
        tool_choice = {"type": "function", "function": {"name": tool_choice["name"]}}
    response_format = None
    text_format = (body.text or {}).get("format")
    if text_format:
        kind = text_format.get("type")
        if kind == "json_schema":
            response_format = {"type": "json_schema", "json_schema": {
                "name": text_format.get("name", "response"), "schema": text_format.get("schema")}}
        elif kind == "json_object":
            response_format = {"type": "json_object"}
        elif kind != "text":
            raise BadRequestError(f"text.format type {kind!r} is not supported.", "text")
    try:
        return ChatCompletionRequest.model_validate({
            "model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "tools": tools, "tool_choice": tool_choice,
            "parallel_tool_calls": body.parallel_tool_calls, "response_format": response_format})
    except ValidationError as exc:
        raise BadRequestError(f"invalid request: {exc.errors()[0]['msg']}", "input") from exc


def _output_items(reasoning: str | None, content: str | None, calls: list[dict]) -> list[dict]:
    """The completed output items of a whole response."""
    items = [_reasoning_item(reasoning, "completed")] if reasoning else []
    if content or not calls:
        items.append(_message_item(content or "", "completed"))
    items.extend(_call_item(call, "completed") for call in calls)
    return items


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


# An item's content parts are left out while it is in progress with no text yet.
def _message_item(text: str, status: str, item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" or text else []}


def _reasoning_item(text: str, status: str, item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or f"rs_{uuid.uuid4().hex}", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if status == "completed" or text else []}


def _call_item(call: dict, status: str, item_id: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id or f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


def _streamed_item(open_item: dict, status: str) -> dict:
    """The output item of `_events`' open item {"kind", "id", "index", "text", "call"}."""
    if open_item["kind"] == "function_call":
        return _call_item(open_item["call"], status, open_item["id"])
    build = _message_item if open_item["kind"] == "message" else _reasoning_item
    return build(open_item["text"], status, open_item["id"])


class _Responder:
    """Builds Response objects (OpenAI's shape) for one request."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.body = body
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())

    def response(self, status: str, output: list[dict], usage: dict | None, incomplete: str | None = None) -> dict:
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "tools": body.tools or [], "tool_choice": body.tool_choice or ("auto" if body.tools else "none"),
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "text": body.text or {"format": {"type": "text"}}, "metadata": body.metadata or {},
            "previous_response_id": None, "store": False, "truncation": "disabled", "usage": usage,
        }

    def final(self, output: list[dict], generation: Generation, finish_reason: str | None) -> dict:
        """The finished response: "incomplete" when it ran out of max_output_tokens, else "completed";
        its usage (already counted into the metrics by the Generation)."""
        incomplete = "max_output_tokens" if finish_reason == "length" else None
        usage = generation.usage()
        return self.response("incomplete" if incomplete else "completed", output, {
            "input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}, incomplete)


def build_responses_router(serving: OpenAIServing) -> APIRouter:
    """`POST /v1/responses` on the OpenAI serving object (its engine, limits, parsers); errors in
    OpenAI's format (400 bad input, 404 unknown model)."""
    router = APIRouter()

    @router.post(RESPONSES_PATH, response_model=None)
    async def create_response(body: ResponsesRequest, raw_request: Request) -> Response:
        prompts, params, lora, state = await serving.prepare_chat(to_chat_request(body))
        generation = serving.generation(raw_request, prompts, params, f"resp-{uuid.uuid4().hex}", lora)
        responder = _Responder(body, generation.model_name)
        if body.stream:
            outputs = await first_then_rest(raw_request, generation.outputs())
            return StreamingResponse(_events(outputs, generation, responder, state), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        await run_until_disconnect(raw_request, drain(generation))
        completion = generation.latest[0].outputs[0]
        return JSONResponse(responder.final(_output_items(*state.message(completion.text)), generation,
                                            completion.finish_reason))

    return router


async def _events(outputs: AsyncGenerator, generation: Generation, responder: _Responder,
                  state: ChatOutputState) -> AsyncGenerator[str, None]:
    """The typed SSE events of a streamed response, in OpenAI's order (module docstring)."""
    sequence = count()
    output: list[dict] = []  # finished items

    def event(kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(sequence), **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    open_item: dict | None = None  # the item being streamed: {"kind", "id", "index", "text" | "call"}

    def close() -> list[str]:
        nonlocal open_item
        if open_item is None:
            return []
        item, open_item = open_item, None
        done = _streamed_item(item, "completed")
        where = {"item_id": item["id"], "output_index": item["index"]}
        if item["kind"] == "message":
            events = [event("response.output_text.done", **where, content_index=0, text=item["text"], logprobs=[]),
                      event("response.content_part.done", **where, content_index=0, part=done["content"][0])]
        elif item["kind"] == "reasoning":
            events = [event("response.reasoning_text.done", **where, content_index=0, text=item["text"])]
        else:
            events = [event("response.function_call_arguments.done", **where,
                            arguments=item["call"]["function"]["arguments"])]
        output.append(done)
        return [*events, event("response.output_item.done", output_index=item["index"], item=done)]

    def open_new(kind: str, call: dict | None = None) -> list[str]:
        nonlocal open_item
        events = close()
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        open_item = {"kind": kind, "id": f"{prefix}_{uuid.uuid4().hex}", "index": len(output), "text": "", "call": call}
        events.append(event("response.output_item.added", output_index=open_item["index"],
                            item=_streamed_item(open_item, "in_progress")))
        if kind == "message":
            events.append(event("response.content_part.added", item_id=open_item["id"],
                                output_index=open_item["index"], content_index=0, part=_text_part("")))
        return events

    def append_text(kind: str, piece: str) -> list[str]:
        """`piece` appended to the open item of `kind` ("reasoning" or "message"), opened first if
        another item (or none) is open: its events."""
        if not piece:
            return []
        events = [] if open_item is not None and open_item["kind"] == kind else open_new(kind)
        open_item["text"] += piece
        where = {"item_id": open_item["id"], "output_index": open_item["index"], "content_index": 0, "delta": piece}
        if kind == "reasoning":
            return [*events, event("response.reasoning_text.delta", **where)]
        return [*events, event("response.output_text.delta", **where, logprobs=[])]

    yield event("response.created", response=responder.response("in_progress", [], None))
    yield event("response.in_progress", response=responder.response("in_progress", [], None))
    tracker, text, finish_reason = TextDeltaTracker(1), "", None
    try:
        try:
            async for item in outputs:
                for delta in tracker.deltas(*item):
                    text += delta.text
                    finish_reason = delta.finish_reason or finish_reason
                    reasoning, content, fragments = state.delta(text, delta.finish_reason is not None)
                    for kind, piece in (("reasoning", reasoning), ("message", content)):
                        for chunk in append_text(kind, piece):
                            yield chunk
                    for fragment in fragments:
                        if "id" in fragment:  # a new call: its name
                            call = {"id": fragment["id"], "function": {"name": fragment["function"]["name"],
                                                                       "arguments": ""}}
                            for chunk in open_new("function_call", call):
                                yield chunk
                        if arguments := fragment["function"].get("arguments"):
                            open_item["call"]["function"]["arguments"] += arguments
                            yield event("response.function_call_arguments.delta", item_id=open_item["id"],
                                        output_index=open_item["index"], delta=arguments)
        finally:
            await aclose_shielded(outputs)
        if not output and open_item is None:  # nothing was said: an empty message, as the whole response
            for chunk in open_new("message"):
                yield chunk
        for chunk in close():
            yield chunk
        final = responder.final(output, generation, finish_reason)
        yield event(f"response.{final['status']}", response=final)
    except Exception as exc:  # headers are sent: the error travels as an event
        yield event("error", code="server_error" if not isinstance(exc, BadRequestError) else "invalid_request",
                    message=str(exc), param=None)
