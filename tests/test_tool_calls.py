"""Tool calling on `/v1/chat/completions` (vLLM's: `tools`, `tool_choice` none / auto / required /
named, `parallel_tool_calls`, `--enable-auto-tool-choice --tool-call-parser`): the parsers on fixed
model outputs, streamed deltas reassembling to the whole message, and the real `openai` client
against the server on the default model (forced calls valid against their schema every time)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import BadRequestError, OpenAI
from server_utils import RunningServer, serve_app

from loomlm.chat_utils import render_chat
from loomlm.server.app import build_app
from loomlm.server.openai_router import _message_for_template
from loomlm.protocol.openai import ChatMessage
from loomlm.server.tool_parsers import ToolCallState, parse_hermes, parse_llama3_json, parse_mistral, required_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris, and the time in Tokyo?"}]

HERMES_OUTPUT = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                 '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>')
LLAMA3_OUTPUT = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                 '{"name": "get_time", "parameters": {"zone": "Asia/Tokyo"}}')
MISTRAL_OUTPUT = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                  '{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}]')
EXPECTED_CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "Asia/Tokyo"})]


def calls_of(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


@pytest.mark.parametrize(("parse", "text", "content"), [
    (parse_hermes, HERMES_OUTPUT, "Let me look.\n"),
    (parse_llama3_json, LLAMA3_OUTPUT, ""),
    (parse_mistral, MISTRAL_OUTPUT, ""),
])
def test_parsers_read_calls_from_fixed_outputs(parse, text, content):
    parsed = parse(text, finished=True)
    assert parsed.content == content and calls_of(parsed) == EXPECTED_CALLS


@pytest.mark.parametrize("parse", [parse_hermes, parse_llama3_json, parse_mistral])
def test_text_without_calls_is_content(parse):
    text = "Paris is sunny today; no tool needed."
    assert parse(text, finished=True).content == text and not parse(text, finished=True).tool_calls
    broken = {parse_hermes: "<tool_call>{not json</tool_call>", parse_llama3_json: "{not json",
              parse_mistral: "[TOOL_CALLS] [{not json"}[parse]
    assert parse(broken, finished=True).content == broken  # nothing parsed: all of it is content (vLLM)


def test_partial_markers_are_held_back_then_released():
    assert parse_hermes("Sure <tool_", finished=False).content == "Sure "
    assert parse_hermes("Sure <tool_", finished=True).content == "Sure <tool_"
    assert parse_hermes("a < b", finished=False).content == "a < b"
    assert parse_mistral("ok [TOOL", finished=False).content == "ok "


def stream(state: ToolCallState, text: str, cuts: list[int]) -> tuple[str | None, list[dict]]:
    """Feed `text` in pieces through `state.delta`, then reassemble as OpenAI's clients do."""
    content, calls = "", {}
    bounds = sorted(set(cuts)) + [len(text)]
    for i, end in enumerate(bounds):
        piece_content, fragments = state.delta(text[:end], finished=i == len(bounds) - 1)
        content += piece_content
        for f in fragments:
            call = calls.setdefault(f["index"], {"id": None, "type": "function",
                                                 "function": {"name": "", "arguments": ""}})
            call["id"] = f.get("id") or call["id"]
            call["function"]["name"] += f["function"].get("name") or ""
            call["function"]["arguments"] += f["function"].get("arguments") or ""
    return content or None, [calls[i] for i in sorted(calls)]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([("auto", "hermes", HERMES_OUTPUT), ("auto", "llama3_json", LLAMA3_OUTPUT),
                        ("auto", "mistral", MISTRAL_OUTPUT), ("auto", "hermes", "No tools, just text <b>."),
                        ("required", None, '[{"name": "get_time", "parameters": {"zone": "UTC"}}]'),
                        ("named", None, '{"zone": "Europe/Paris"}')]),
       st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_streamed_deltas_reassemble_to_the_whole_message(case, cuts):
    mode, parser, text = case
    whole = ToolCallState(mode, parser, "get_time" if mode == "named" else None)
    content, calls = whole.message(text)
    streamed_content, streamed_calls = stream(whole.fresh(), text, [c for c in cuts if c < len(text)])
    assert streamed_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed_calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert all(c["id"].startswith("chatcmpl-tool-") for c in streamed_calls)


def test_required_schema_accepts_calls_and_rejects_others():
    schema = required_schema(TOOLS, parallel_tool_calls=True)
    jsonschema.validate([{"name": "get_time", "parameters": {"zone": "UTC"}},
                         {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}], schema)
    for bad in ([], [{"name": "get_time", "parameters": {"city": "Oslo"}}], [{"name": "rm", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "parameters": {"zone": "A"}}] * 2,
                            required_schema(TOOLS, parallel_tool_calls=False))


def test_history_tool_calls_reach_the_template_decoded(server: RunningServer):
    """An assistant turn with tool_calls and a tool turn render through a template that reads them
    (arguments decoded from their JSON text, as vLLM hands them to templates); tools reach it too."""
    template = ("{% for t in tools or [] %}TOOL {{ t.function.name }}{{ '\\n' }}{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
                "{{ '\\n' }}{% endfor %}")
    history = [ChatMessage(role="user", content="Weather in Paris?"),
               ChatMessage(role="assistant", content=None, tool_calls=[{"id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]),
               ChatMessage(role="tool", content="18 C", tool_call_id="call_1")]
    text = render_chat(server.tokenizer, [_message_for_template(m) for m in history], template,
                       add_generation_prompt=False, tools=TOOLS)
    assert text == ("TOOL get_weather\nTOOL get_time\nuser: Weather in Paris?\nassistant: CALL get_weather(Paris)\n"
                    "tool: 18 C\n")


@pytest.fixture(scope="module")
def tool_client(server: RunningServer):
    """The module's engine behind an app with `--enable-auto-tool-choice --tool-call-parser hermes`."""
    with serve_app(build_app(server.engine, enable_auto_tool_choice=True, tool_call_parser="hermes"),
                   server.engine) as running:
        yield OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0, timeout=300)


def test_required_calls_always_parse_and_validate(tool_client, server):
    """tool_choice "required" at temperature 1.0: 100 of 100 choices call one tool of `tools` with
    arguments valid against its schema, finish_reason "tool_calls"; with parallel calls allowed,
    every call returned is valid too (a choice cut by max_tokens keeps its complete calls)."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def check(call):
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])

    response = tool_client.chat.completions.create(
        model=server.engine.served_model_name, messages=MESSAGES, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, temperature=1.0, n=100, max_tokens=200, seed=7)
    assert len(response.choices) == 100
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        check(choice.message.tool_calls[0])
    parallel = tool_client.chat.completions.create(
        model=server.engine.served_model_name, messages=MESSAGES, tools=TOOLS, tool_choice="required",
        temperature=1.0, n=20, max_tokens=120, seed=7)
    assert all(choice.message.tool_calls or choice.finish_reason == "length" for choice in parallel.choices)
    for choice in parallel.choices:
        assert choice.finish_reason in ("tool_calls", "length")
        for call in choice.message.tool_calls:
            check(call)


def reassembled(chunks) -> tuple[str | None, list[tuple[str, str]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, ["", ""])
                if call.function.name:
                    assert not entry[1], "the name comes before the arguments"
                    entry[0] += call.function.name
                entry[1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}},
                                         "auto", "none"])
def test_streamed_call_equals_the_whole_one(tool_client, server, tool_choice):
    kwargs = dict(model=server.engine.served_model_name, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                  temperature=0, max_tokens=80)
    whole = tool_client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = reassembled(tool_client.chat.completions.create(stream=True, **kwargs))
    assert content == whole.message.content
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert finish == whole.finish_reason
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in whole.message.tool_calls] == ["get_weather"]
        assert whole.finish_reason in ("stop", "length")
        jsonschema.validate(json.loads(whole.message.tool_calls[0].function.arguments),
                            WEATHER["function"]["parameters"])
    if tool_choice == "none":
        assert whole.message.tool_calls == [] and whole.message.content


def test_tool_choice_errors_are_openai_400s(tool_client, server, client):
    name = server.engine.served_model_name
    cases = [
        (tool_client, dict(tool_choice="required"), "`tools` must be set"),
        (client, dict(tools=TOOLS, tool_choice="auto"), "--enable-auto-tool-choice"),
        (client, dict(tools=TOOLS), "--enable-auto-tool-choice"),  # vLLM: tools imply "auto"
        (tool_client, dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "rm"}}),
         "Tool 'rm' has not been passed"),
        (tool_client, dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
         "cannot be combined"),
    ]
    for c, kwargs, message in cases:
        with pytest.raises(BadRequestError, match=message):
            c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4, **kwargs)
