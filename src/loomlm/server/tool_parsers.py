"""Tool calls of `/v1/chat/completions`: what the model wrote, turned into OpenAI's `tool_calls`.

vLLM's design (vllm/entrypoints/openai/tool_parsers/, serving_chat.py), in one place for the
whole and the streamed response:

- `tool_choice: "none"`: the text is the content.
- `"auto"` (needs `--enable-auto-tool-choice`): the server's `--tool-call-parser` reads the calls
  out of the text: `hermes` (`<tool_call>{"name", "arguments"}</tool_call>` blocks: Hermes 2 Pro,
  Qwen 2.5/3, SmolLM3), `llama3_json` (`{"name", "parameters"}` objects, `;`-separated, after an
  optional `<|python_tag|>`: Llama 3.1/3.2), `mistral` (`[TOOL_CALLS]` then a JSON array of
  `{"name", "arguments"}`). Text before the calls is the content.
- `"required"`: structured output forces a JSON array of `{"name", "parameters"}` (one tool's
  name and its `parameters` schema per item; one item without `parallel_tool_calls`), as vLLM's
  `_get_json_schema_from_tool` builds it.
- a named function: structured output forces its `parameters` schema; the text is the arguments.

`parse(text, finished)` is pure and monotone: what it returns for a prefix of the text is a
prefix of what it returns for the whole (content held back while it may still turn into a call;
a call only once complete), so a stream is the diffs of successive parses and reassembles to
exactly the non-streamed message.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ParsedMessage:
    """What a prefix of the text holds so far: the content safe to show, the complete calls."""

    content: str
    tool_calls: tuple[ParsedToolCall, ...] = ()


def held_back(text: str, marker: str) -> str:
    """`text` less its longest suffix that could be the start of `marker` (not yet decidable)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return text[:-size]
    return text


def _json_objects(text: str, pos: int, separators: str) -> list[Any]:
    """The complete JSON values from `pos` on, separated by whitespace and `separators`; stops at
    the first that is incomplete or invalid."""
    decoder = json.JSONDecoder()
    values = []
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos >= len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return values
        values.append(value)


def _calls(objects: list[Any], arguments_key: str) -> tuple[ParsedToolCall, ...]:
    """Tool calls from decoded objects `{"name": str, arguments_key: object}`; others are skipped."""
    calls = []
    for obj in objects:
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            arguments = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
            calls.append(ParsedToolCall(obj["name"], arguments if isinstance(arguments, str)
                                        else json.dumps(arguments, ensure_ascii=False)))
    return tuple(calls)


def parse_hermes(text: str, finished: bool) -> ParsedMessage:
    """Hermes 2 Pro / Qwen / SmolLM3 calls: `<tool_call>{"name", "arguments"}</tool_call>` blocks; the
    text before the first is the content (vLLM's `Hermes2ProToolParser`)."""
    start_tag, end_tag = "<tool_call>", "</tool_call>"
    first = text.find(start_tag)
    if first < 0:
        return ParsedMessage(text if finished else held_back(text, start_tag))
    objects, pos = [], first
    while (start := text.find(start_tag, pos)) >= 0:
        end = text.find(end_tag, start)
        if end < 0:
            if not finished:
                break
            end = len(text)  # a finished text's last block may lack its end tag
        objects.extend(_json_objects(text[start + len(start_tag):end], 0, "")[:1])
        pos = end + len(end_tag)
    calls = _calls(objects, "arguments")
    # A finished text whose blocks hold no call at all is plain content (vLLM).
    return ParsedMessage(text if finished and not calls else text[:first], calls)


def parse_llama3_json(text: str, finished: bool) -> ParsedMessage:
    """Llama 3.1/3.2 JSON calls: `{"name", "parameters"}` objects separated by `;`, optionally after
    `<|python_tag|>`; text that does not open with one is content (vLLM's `Llama3JsonToolParser`)."""
    tag = "<|python_tag|>"
    stripped = text.lstrip()
    if not stripped.startswith(("{", tag)):
        if not finished and tag.startswith(stripped):
            return ParsedMessage("")  # nothing yet, or may still be the tag
        return ParsedMessage(text)
    calls = _calls(_json_objects(stripped.removeprefix(tag), 0, ";"), "parameters")
    return ParsedMessage(text if finished and not calls else "", calls)


def parse_mistral(text: str, finished: bool) -> ParsedMessage:
    """Mistral calls: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`; the text before the
    marker is content (vLLM's `MistralToolParser`)."""
    marker = "[TOOL_CALLS]"
    at = text.find(marker)
    if at < 0:
        return ParsedMessage(text if finished else held_back(text, marker))
    calls = _calls(_json_objects(text, at + len(marker), "[,"), "arguments")
    return ParsedMessage(text if finished and not calls else text[:at], calls)


# The --tool-call-parser choices, by vLLM's names.
TOOL_CALL_PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral}


def required_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool) -> dict[str, Any]:
    """The JSON schema that forces tool calls (vLLM's `_get_json_schema_from_tool`): an array of
    one or more (one only without `parallel_tool_calls`) `{"name": <a tool>, "parameters": <its schema>}`
    objects with no other keys."""
    variants = [{
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [tool["function"]["name"]]},
            "parameters": named_schema(tool),
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,  # a call is its name and arguments: no room to ramble
    } for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def named_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The arguments schema of a named tool choice (an object without properties when it has none)."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


@dataclass
class ToolCallState:
    """How one choice's text becomes content and tool calls, whole or streamed.

    mode: "none", "auto" (with `parser`), "required", or "named" (with `function_name`).
    """

    mode: str
    parser: str | None = None
    function_name: str | None = None
    ids: list[str] = field(default_factory=list)  # one per call seen, in order
    sent_content: int = 0  # characters of content streamed
    sent_calls: int = 0  # calls streamed whole
    sent_arguments: int = 0  # named mode: characters of the arguments streamed

    def fresh(self) -> ToolCallState:
        """A new state of the same mode, for another choice."""
        return ToolCallState(self.mode, self.parser, self.function_name)

    def parse(self, text: str, finished: bool) -> ParsedMessage:
        """The text so far read under this mode (monotone: see the module docstring)."""
        if self.mode == "none":
            return ParsedMessage(text)
        if self.mode == "named":
            return ParsedMessage("", (ParsedToolCall(self.function_name or "", text),))
        if self.mode == "required":  # the forced JSON array of {"name", "parameters"}
            return ParsedMessage("", _calls(_json_objects(text, 0, "[,"), "parameters"))
        return TOOL_CALL_PARSERS[self.parser or "hermes"](text, finished)

    def _id(self, index: int) -> str:
        while len(self.ids) <= index:
            self.ids.append(f"chatcmpl-tool-{uuid.uuid4().hex}")
        return self.ids[index]

    def message(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The finished text -> (content, OpenAI tool_calls); content None when only tools were called."""
        parsed = self.parse(text, finished=True)
        calls = [{"id": self._id(i), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for i, c in enumerate(parsed.tool_calls)]
        content = parsed.content if parsed.content or not calls else None
        return content, calls

    def delta(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        """The text so far -> (content to append, OpenAI DeltaToolCall dicts) since the last call."""
        parsed = self.parse(text, finished)
        content = parsed.content[self.sent_content:]
        self.sent_content = len(parsed.content)
        fragments: list[dict[str, Any]] = []
        if self.mode == "named":
            if not self.ids:
                fragments.append({"index": 0, "id": self._id(0), "type": "function",
                                  "function": {"name": self.function_name, "arguments": ""}})
            arguments = parsed.tool_calls[0].arguments
            if len(arguments) > self.sent_arguments:
                fragments.append({"index": 0, "function": {"arguments": arguments[self.sent_arguments:]}})
                self.sent_arguments = len(arguments)
            return content, fragments
        for i in range(self.sent_calls, len(parsed.tool_calls)):
            call = parsed.tool_calls[i]
            # Name first, then the arguments (whole: a call is parsed once complete).
            fragments.append({"index": i, "id": self._id(i), "type": "function",
                              "function": {"name": call.name, "arguments": ""}})
            fragments.append({"index": i, "function": {"arguments": call.arguments}})
        self.sent_calls = len(parsed.tool_calls)
        return content, fragments

    @property
    def called(self) -> bool:
        """Whether any call was produced so far (for finish_reason "tool_calls")."""
        return bool(self.ids)
