"""Reasoning output (`--reasoning-parser`, vLLM's deepseek_r1 and qwen3): `<think>` text becomes
`reasoning_content`, the rest `content`, whole and streamed alike; tool calls read after it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI
from server_utils import RunningServer, serve_app

from loomlm.server.app import build_app
from loomlm.server.chat_output import ChatOutputState, split_reasoning
from loomlm.server.tool_parsers import ToolCallState

THOUGHT = "<think>\nThe user greets me. Be brief.\n</think>\n\nHello! How can I help?"


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), [
    ("deepseek_r1", THOUGHT, "\nThe user greets me. Be brief.\n", "\n\nHello! How can I help?"),
    ("deepseek_r1", "Opened in the prompt.</think>Answer.", "Opened in the prompt.", "Answer."),
    ("deepseek_r1", "Still thinking when cut off", "Still thinking when cut off", None),
    ("qwen3", THOUGHT, "\nThe user greets me. Be brief.\n", "\n\nHello! How can I help?"),
    ("qwen3", "No thinking today.", None, "No thinking today."),
    ("qwen3", "<think>cut off", "cut off", None),
])
def test_reasoning_is_split_from_content(parser, text, reasoning, content):
    assert ChatOutputState(None, parser).message(text) == (reasoning, content, [])


def test_tool_calls_are_read_after_the_reasoning():
    text = '<think>Need the weather.</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    reasoning, content, calls = ChatOutputState(ToolCallState("auto", "hermes"), "qwen3").message(text)
    assert reasoning == "Need the weather." and content == "\n"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_weather", '{"city": "Oslo"}')]


def test_a_partial_closing_tag_is_held_back():
    assert split_reasoning("deepseek_r1", "<think>abc</thi", finished=False) == ("abc", "")
    assert split_reasoning("qwen3", "<thi", finished=False) == ("", "")
    assert split_reasoning("qwen3", "<thi", finished=True) == ("", "<thi")


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["deepseek_r1", "qwen3"]),
       st.sampled_from([THOUGHT, "plain answer", "<think>never closed", "x</think>y", "<think></think>",
                        "<think>a</think>b<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"]),
       st.lists(st.integers(min_value=0, max_value=120), max_size=10), st.booleans())
def test_streamed_deltas_reassemble_to_the_whole_message(parser, text, cuts, with_tools):
    tools = ToolCallState("auto", "hermes") if with_tools else None
    reasoning, content, calls = ChatOutputState(tools, parser).message(text)
    state = ChatOutputState(tools.fresh() if tools else None, parser)
    bounds = sorted({c for c in cuts if c < len(text)}) + [len(text)]
    got_reasoning, got_content, got_calls = "", "", []
    for i, end in enumerate(bounds):
        r, c, fragments = state.delta(text[:end], finished=i == len(bounds) - 1)
        got_reasoning, got_content = got_reasoning + r, got_content + c
        got_calls += [f["function"]["name"] for f in fragments if f["function"].get("name")]
    assert (got_reasoning or None) == reasoning
    assert got_content == (content or "")
    assert got_calls == [c["function"]["name"] for c in calls]


@pytest.fixture(scope="module")
def reasoning_client(server: RunningServer):
    with serve_app(build_app(server.engine, reasoning_parser="deepseek_r1"), server.engine) as running:
        yield OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0, timeout=300)


def test_server_separates_reasoning_whole_and_streamed(reasoning_client, client, server):
    """The default model never closes a `<think>`: under deepseek_r1 all it writes is reasoning,
    exactly the text the plain server answers, and the stream carries it as reasoning_content deltas."""
    kwargs = dict(model=server.engine.served_model_name, messages=[{"role": "user", "content": "Say hi."}],
                  temperature=0, max_tokens=24)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    message = reasoning_client.chat.completions.create(**kwargs).choices[0].message
    assert message.reasoning_content == plain and message.content is None
    streamed = ""
    for chunk in reasoning_client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            assert not choice.delta.content
            streamed += getattr(choice.delta, "reasoning_content", None) or ""
    assert streamed == plain
