"""OpenAI's Responses API (`POST /v1/responses`, stateless) with the real `openai` client: text,
instructions, JSON-schema output, function calls and tool round trips, streamed events in OpenAI's
order reassembling to the whole response."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from server_utils import RunningServer, serve_app

from loomlm.server.app import build_app

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def responses_client(server: RunningServer):
    with serve_app(build_app(server.engine, enable_auto_tool_choice=True, tool_call_parser="hermes"),
                   server.engine) as running:
        yield OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0, timeout=300)


def chat_text(client: OpenAI, model: str, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    choice = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                            max_tokens=max_tokens).choices[0]
    return choice.message.content, choice.finish_reason


def test_text_response_equals_the_chat_completion(responses_client, server):
    model = server.engine.served_model_name
    response = responses_client.responses.create(model=model, input="Name a colour.", instructions="Be brief.",
                                                 max_output_tokens=12, temperature=0)
    text, finish = chat_text(responses_client, model, [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Name a colour."}], 12)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == text
    assert response.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens <= 12 and response.usage.input_tokens > 0
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    # input items (a conversation) render like the same chat messages
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
             {"type": "message", "role": "user", "content": "Name a fruit."}]
    conversation = responses_client.responses.create(model=model, input=items, max_output_tokens=8, temperature=0)
    text, _ = chat_text(responses_client, model, [{"role": "user", "content": "Hi!"},
                                                  {"role": "assistant", "content": "Hello."},
                                                  {"role": "user", "content": "Name a fruit."}], 8)
    assert conversation.output_text == text


def test_json_schema_output(responses_client, server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    response = responses_client.responses.create(
        model=server.engine.served_model_name, input="Invent a person.", max_output_tokens=60, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)


def test_function_calls_and_a_tool_round_trip(responses_client, server):
    model = server.engine.served_model_name
    response = responses_client.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER],
                                                 tool_choice="required", max_output_tokens=60, temperature=0)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(call.name == "get_weather" for call in calls)
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    # The call and its output go back as input items; the model answers in text.
    follow_up = responses_client.responses.create(
        model=model, tools=[WEATHER], tool_choice="none", max_output_tokens=16, temperature=0,
        input=[{"type": "message", "role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C and sunny"}])
    assert follow_up.output[0].type == "message" and follow_up.output_text
    named = responses_client.responses.create(model=model, input="Weather?", tools=[WEATHER],
                                              tool_choice={"type": "function", "name": "get_weather"},
                                              max_output_tokens=40, temperature=0)
    assert [item.type for item in named.output] == ["function_call"]


@pytest.mark.parametrize("kind", ["text", "function_call"])
def test_stream_events_in_openai_order(responses_client, server, kind):
    kwargs = dict(model=server.engine.served_model_name, input="Tell me about Paris.", max_output_tokens=20,
                  temperature=0)
    if kind == "function_call":
        kwargs.update(tools=[WEATHER], tool_choice="required", max_output_tokens=60)
    whole = responses_client.responses.create(**kwargs)
    events = list(responses_client.responses.create(stream=True, **kwargs))
    types = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    if kind == "text":
        deltas = [i for i, t in enumerate(types) if t == "response.output_text.delta"]
        assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
        assert deltas == list(range(4, 4 + len(deltas)))
        assert types[4 + len(deltas):-1] == ["response.output_text.done", "response.content_part.done",
                                              "response.output_item.done"]
        assert "".join(events[i].delta for i in deltas) == whole.output_text == events[-1].response.output_text
    else:
        assert types[2] == "response.output_item.added" and events[2].item.type == "function_call"
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        whole_calls = [item for item in whole.output if item.type == "function_call"]
        assert [e.arguments for e in done] == [c.arguments for c in whole_calls]
        assert streamed == "".join(c.arguments for c in whole_calls)


def test_stateless_and_unsupported_requests_are_400(responses_client, server):
    model = server.engine.served_model_name
    with pytest.raises(BadRequestError, match="previous_response_id"):
        responses_client.responses.create(model=model, input="Hi", previous_response_id="resp_123")
    with pytest.raises(BadRequestError, match="web_search"):
        responses_client.responses.create(model=model, input="Hi", tools=[{"type": "web_search"}])
    with pytest.raises(BadRequestError):
        responses_client.responses.create(model=model, input=[{"type": "image_generation_call", "id": "x"}])
