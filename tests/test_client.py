"""`loomlm.Client` / `loomlm.AsyncClient` against canned LoRAX wire answers (httpx.MockTransport).

Each handler checks the exact request the client sends (method, URL, body, headers)
and answers with the bytes a LoRAX / loomlm server sends: a one-element JSON list for
generate, SSE `data:` events for streams, and error bodies with each status and
`error_type`. Async code runs under `asyncio.run` (pytest-asyncio is not a dependency).
Tests against the live server pass `base_url="http://127.0.0.1:PORT"` and no transport.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

import loomlm
from loomlm.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    GenerationError,
    IncompleteGenerationError,
    LoomlmClientError,
    MergedAdapters,
    NotFoundError,
    OverloadedError,
    RateLimitExceededError,
    ServerError,
    ShardNotReadyError,
    ShardTimeoutError,
    UnknownError,
    UnprocessableEntityError,
    ValidationError,
)
from loomlm.client.core import ApiRequest
from loomlm.client.transport import SyncTransport
from loomlm.protocol.tgi import FinishReason, GenerateResponse, StreamResponse

BASE_URL = "http://loom.test"
LORAX_BOOLEANS = {
    "do_sample": False,
    "ignore_eos_token": False,
    "return_full_text": False,
    "watermark": False,
    "details": True,
    "decoder_input_details": False,
}

GENERATE_ANSWER = [
    {
        "generated_text": " Paris.",
        "details": {
            "finish_reason": "length",
            "prompt_tokens": 5,
            "generated_tokens": 2,
            "skipped_tokens": 0,
            "seed": None,
            "prefill": [{"id": 1, "text": "<s>", "logprob": None}, {"id": 415, "text": " The", "logprob": -2.5}],
            "tokens": [
                {
                    "id": 5465,
                    "text": " Paris",
                    "logprob": -0.25,
                    "special": False,
                    "skipped": False,
                    "alternative_tokens": [{"id": 7, "text": " Lyon", "logprob": -3.0}],
                },
                {"id": 29889, "text": ".", "logprob": -0.5, "special": False, "skipped": False},
            ],
        },
    }
]

STREAM_EVENTS = [
    {"token": {"id": 5465, "text": " Paris", "logprob": -0.25, "special": False, "skipped": False},
     "generated_text": None, "details": None},
    {"token": {"id": 29889, "text": ".", "logprob": -0.5, "special": False, "skipped": False},
     "generated_text": None, "details": None},
    {"token": {"id": 2, "text": "</s>", "logprob": -0.125, "special": True, "skipped": False},
     "generated_text": " Paris.",
     "details": {"finish_reason": "eos_token", "prompt_tokens": 5, "generated_tokens": 3, "seed": 42}},
]


def sse(events: list[dict[str, Any]]) -> bytes:
    """The server's SSE framing: `data:<json>` and a blank line per event, no `[DONE]`."""
    return "".join(f"data:{json.dumps(event)}\n\n" for event in events).encode()


def sse_answer(content: bytes | httpx.SyncByteStream | httpx.AsyncByteStream) -> httpx.Response:
    headers = {"content-type": "text/event-stream"}
    if isinstance(content, bytes):
        return httpx.Response(200, headers=headers, content=content)
    return httpx.Response(200, headers=headers, stream=content)


class Recorder:
    """A MockTransport handler: records each request, answers with `answer(request)`."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    @property
    def body(self) -> dict[str, Any]:
        (request,) = self.requests
        return json.loads(request.content)


def sync_client(answer: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> tuple[Client, Recorder]:
    recorder = Recorder(answer)
    return Client(kwargs.pop("base_url", BASE_URL), transport=httpx.MockTransport(recorder), **kwargs), recorder


def async_client(answer: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> tuple[AsyncClient, Recorder]:
    recorder = Recorder(answer)
    return AsyncClient(kwargs.pop("base_url", BASE_URL), transport=httpx.MockTransport(recorder), **kwargs), recorder


def json_answer(payload: Any, status_code: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status_code, json=payload)


def check_generate_response(response: GenerateResponse) -> None:
    assert isinstance(response, GenerateResponse)
    assert response.generated_text == " Paris."
    details = response.details
    assert details is not None
    assert details.finish_reason is FinishReason.length
    assert (details.prompt_tokens, details.generated_tokens) == (5, 2)
    assert [(t.id, t.text, t.logprob) for t in details.prefill] == [(1, "<s>", None), (415, " The", -2.5)]
    assert [(t.id, t.text, t.logprob) for t in details.tokens] == [(5465, " Paris", -0.25), (29889, ".", -0.5)]
    assert details.tokens[0].alternative_tokens is not None
    assert [(a.id, a.text, a.logprob) for a in details.tokens[0].alternative_tokens] == [(7, " Lyon", -3.0)]
    assert details.tokens[1].alternative_tokens is None


def check_stream_responses(responses: list[StreamResponse]) -> None:
    assert all(isinstance(r, StreamResponse) for r in responses)
    assert [(r.token.id, r.token.text, r.token.special) for r in responses] == [
        (5465, " Paris", False), (29889, ".", False), (2, "</s>", True)]
    assert [r.generated_text for r in responses] == [None, None, " Paris."]
    assert responses[0].details is None and responses[1].details is None
    final = responses[2].details
    assert final is not None
    assert (final.finish_reason, final.prompt_tokens, final.generated_tokens, final.seed) == (
        FinishReason.eos_token, 5, 3, 42)


# ----------------------------------------------------------------------------- public API


def test_exported_from_loomlm() -> None:
    assert loomlm.Client is Client
    assert loomlm.AsyncClient is AsyncClient
    assert loomlm.MergedAdapters is MergedAdapters


def test_client_import_is_torch_free() -> None:
    code = "import sys, loomlm, loomlm.client; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# Copied from predibase/lorax clients/python/lorax/client.py (lorax-client 0.6.1), in order.
LORAX_GENERATE = [
    "prompt", "adapter_id", "adapter_source", "merged_adapters", "api_token", "do_sample", "max_new_tokens",
    "ignore_eos_token", "best_of", "repetition_penalty", "return_full_text", "seed", "stop_sequences",
    "temperature", "top_k", "top_p", "truncate", "typical_p", "watermark", "response_format",
    "decoder_input_details", "return_k_alternatives", "details",
]
LORAX_GENERATE_STREAM = [
    name for name in LORAX_GENERATE if name not in ("best_of", "decoder_input_details", "return_k_alternatives")
]
LORAX_ASYNC_GENERATE_STREAM = [*LORAX_GENERATE_STREAM, "return_k_alternatives"]
LORAX_DEFAULTS = {
    "adapter_id": None, "do_sample": False, "ignore_eos_token": False, "return_full_text": False,
    "watermark": False, "decoder_input_details": False, "details": True, "stop_sequences": None,
}
TGI_EXTRAS = {"frequency_penalty", "presence_penalty", "top_n_tokens", "grammar"}


@pytest.mark.parametrize(
    ("method", "lorax_names"),
    [
        (Client.generate, LORAX_GENERATE),
        (AsyncClient.generate, LORAX_GENERATE),
        (Client.generate_stream, LORAX_GENERATE_STREAM),
        (AsyncClient.generate_stream, LORAX_ASYNC_GENERATE_STREAM),
    ],
)
def test_signatures_match_lorax(method: Callable[..., Any], lorax_names: list[str]) -> None:
    parameters = list(inspect.signature(method).parameters.values())[1:]  # drop self
    positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword_only = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert positional == lorax_names
    assert TGI_EXTRAS <= keyword_only
    assert keyword_only - TGI_EXTRAS <= {"return_k_alternatives"}
    defaults = {p.name: p.default for p in parameters}
    expected = {name: default for name, default in LORAX_DEFAULTS.items() if name in lorax_names}
    assert {name: defaults[name] for name in expected} == expected


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_constructor_matches_lorax(client_class: type) -> None:
    parameters = inspect.signature(client_class).parameters
    assert [n for n, p in parameters.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD] == [
        "base_url", "headers", "cookies", "timeout"]
    assert (parameters["headers"].default, parameters["cookies"].default, parameters["timeout"].default) == (
        None, None, 60)
    assert parameters["transport"].kind is inspect.Parameter.KEYWORD_ONLY


def test_async_methods_are_coroutine_and_async_generator() -> None:
    assert inspect.iscoroutinefunction(AsyncClient.generate)
    assert inspect.isasyncgenfunction(AsyncClient.generate_stream)


# ----------------------------------------------------------------------------- requests sent


def test_generate_sends_only_set_parameters_plus_lorax_booleans() -> None:
    client, recorder = sync_client(json_answer(GENERATE_ANSWER))
    check_generate_response(client.generate("The capital of France is"))
    (request,) = recorder.requests
    assert request.method == "POST"
    assert (request.url.host, request.url.path) == ("loom.test", "/")  # `POST /`: base_url itself
    assert request.headers["content-type"] == "application/json"
    assert recorder.body == {"inputs": "The capital of France is", "parameters": LORAX_BOOLEANS, "stream": False}


def test_generate_sends_every_parameter_by_its_wire_name() -> None:
    client, recorder = sync_client(json_answer(GENERATE_ANSWER))
    client.generate(
        "Hi",
        adapter_id="org/adapter",
        adapter_source="hub",
        api_token="hf_secret",
        do_sample=True,
        max_new_tokens=16,
        ignore_eos_token=True,
        best_of=2,
        repetition_penalty=1.1,
        return_full_text=True,
        stop_sequences=["\n", "###"],
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        truncate=128,
        typical_p=0.95,
        watermark=True,
        response_format={"type": "json_object", "schema": {"type": "object", "default": None}},
        decoder_input_details=True,
        return_k_alternatives=3,
        details=False,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        top_n_tokens=2,
    )
    assert recorder.body == {
        "inputs": "Hi",
        "parameters": {
            "adapter_id": "org/adapter",
            "adapter_source": "hub",
            "api_token": "hf_secret",
            "do_sample": True,
            "max_new_tokens": 16,
            "ignore_eos_token": True,
            "best_of": 2,
            "repetition_penalty": 1.1,
            "return_full_text": True,
            "stop": ["\n", "###"],
            "temperature": 0.7,
            "top_k": 40,
            "top_p": 0.9,
            "truncate": 128,
            "typical_p": 0.95,
            "watermark": True,
            # a schema's own nulls are kept: only unset parameters are left out
            "response_format": {"type": "json_object", "schema": {"type": "object", "default": None}},
            "decoder_input_details": True,
            "return_k_alternatives": 3,
            "details": False,
            "frequency_penalty": 0.5,
            "presence_penalty": -0.5,
            "top_n_tokens": 2,
        },
        "stream": False,
    }


def test_tgi_grammar_is_sent_as_given() -> None:
    client, recorder = sync_client(json_answer(GENERATE_ANSWER))
    client.generate("Hi", grammar={"type": "json", "value": {"type": "object", "required": ["a"]}})
    assert recorder.body["parameters"]["grammar"] == {"type": "json", "value": {"type": "object", "required": ["a"]}}
    assert "response_format" not in recorder.body["parameters"]


@pytest.mark.parametrize(
    "merged_adapters",
    [
        MergedAdapters(ids=["a/x", "b/y"], weights=[0.75, 0.25], merge_strategy="ties", density=0.5),
        {"ids": ["a/x", "b/y"], "weights": [0.75, 0.25], "merge_strategy": "ties", "density": 0.5},
    ],
)
def test_merged_adapters_sent_without_unset_fields(merged_adapters: Any) -> None:
    client, recorder = sync_client(json_answer(GENERATE_ANSWER))
    client.generate("Hi", merged_adapters=merged_adapters)
    assert recorder.body["parameters"]["merged_adapters"] == {
        "ids": ["a/x", "b/y"], "weights": [0.75, 0.25], "merge_strategy": "ties", "density": 0.5}
    assert "adapter_id" not in recorder.body["parameters"]


def test_response_format_pydantic_model_sent_by_alias() -> None:
    """LoRAX's `ResponseFormat` names its field `schema_spec` with the wire alias `schema`."""
    import pydantic

    class ResponseFormat(pydantic.BaseModel):
        type: str
        schema_spec: dict[str, Any] = pydantic.Field(alias="schema")

    client, recorder = sync_client(json_answer(GENERATE_ANSWER))
    client.generate("Hi", response_format=ResponseFormat(type="json_object", schema={"type": "string"}))
    assert recorder.body["parameters"]["response_format"] == {"type": "json_object", "schema": {"type": "string"}}


def test_headers_and_cookies_are_sent() -> None:
    client, recorder = sync_client(
        json_answer(GENERATE_ANSWER), headers={"Authorization": "Bearer sk-test", "X-Trace": "t1"},
        cookies={"session": "abc"})
    client.generate("Hi")
    (request,) = recorder.requests
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["x-trace"] == "t1"
    assert request.headers["cookie"] == "session=abc"


def test_base_url_with_a_path_is_posted_to_as_it_is() -> None:
    client, recorder = sync_client(json_answer(GENERATE_ANSWER), base_url="http://loom.test/deployments/llama")
    client.generate("Hi")
    assert str(recorder.requests[0].url) == "http://loom.test/deployments/llama"


def test_generate_accepts_a_bare_object_as_generate_route_answers() -> None:
    client, _ = sync_client(json_answer(GENERATE_ANSWER[0]))
    check_generate_response(client.generate("Hi"))


def test_generate_stream_sends_stream_true_and_parses_events() -> None:
    client, recorder = sync_client(lambda request: sse_answer(sse(STREAM_EVENTS)))
    check_stream_responses(list(client.generate_stream("Hi", max_new_tokens=3, api_token="hf_secret")))
    (request,) = recorder.requests
    assert (request.method, request.url.host, request.url.path) == ("POST", "loom.test", "/")
    assert request.headers["accept"] == "text/event-stream"
    assert recorder.body == {
        "inputs": "Hi",
        "parameters": {**LORAX_BOOLEANS, "max_new_tokens": 3, "api_token": "hf_secret"},
        "stream": True,
    }


def test_async_generate_and_stream_send_the_same_bodies_as_sync() -> None:
    kwargs = {"adapter_id": "org/a", "max_new_tokens": 8, "stop_sequences": ["\n"], "temperature": 0.5,
              "return_k_alternatives": 2}
    sync_gen, sync_gen_recorder = sync_client(json_answer(GENERATE_ANSWER), headers={"X-Key": "k"})
    sync_stream, sync_stream_recorder = sync_client(lambda r: sse_answer(sse(STREAM_EVENTS)), headers={"X-Key": "k"})
    async_gen, async_gen_recorder = async_client(json_answer(GENERATE_ANSWER), headers={"X-Key": "k"})
    async_stream, async_stream_recorder = async_client(lambda r: sse_answer(sse(STREAM_EVENTS)), headers={"X-Key": "k"})

    sync_gen.generate("Hi", **kwargs)
    list(sync_stream.generate_stream("Hi", **kwargs))

    async def main() -> tuple[GenerateResponse, list[StreamResponse]]:
        async with async_gen, async_stream:
            response = await async_gen.generate("Hi", **kwargs)
            stream = [r async for r in async_stream.generate_stream("Hi", **kwargs)]
        return response, stream

    response, stream = asyncio.run(main())
    check_generate_response(response)
    check_stream_responses(stream)
    assert async_gen_recorder.body == sync_gen_recorder.body
    assert async_stream_recorder.body == sync_stream_recorder.body
    assert async_stream_recorder.body["stream"] is True
    assert async_gen_recorder.requests[0].headers["x-key"] == "k"


# ----------------------------------------------------------------------------- client-side validation

INVALID_ARGUMENTS = [
    ({"prompt": ""}, "`inputs` cannot be empty"),
    ({"adapter_id": "a", "merged_adapters": {"ids": ["a"], "weights": [1.0]}}, "at most one of"),
    ({"adapter_source": "ftp"}, "`adapter_source=ftp` must be one of"),
    ({"merged_adapters": {"ids": [], "weights": []}}, "`ids` cannot be empty"),
    ({"merged_adapters": {"ids": ["a", "b"], "weights": [1.0]}}, "same length"),
    ({"merged_adapters": {"ids": ["a"], "weights": [1.0], "merge_strategy": "avg"}}, "`merge_strategy`"),
    ({"merged_adapters": {"ids": ["a"], "weights": [1.0], "density": 1.5}}, "`density`"),
    ({"merged_adapters": {"ids": ["a"], "weights": [1.0], "majority_sign_method": "x"}}, "`majority_sign_method`"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"seed": -1}, "`seed` must be positive"),
    ({"temperature": -0.1}, "`temperature` must be non-negative"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"truncate": 0}, "`truncate` must be strictly positive"),
    ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_n_tokens": 0}, "`top_n_tokens` must be strictly positive"),
    ({"top_k": "many"}, "`top_k`"),
    ({"stop_sequences": "\n"}, "`stop`"),
    ({"response_format": {"type": "text"}}, "`response_format`"),
    ({"response_format": {"type": "json_object"}, "grammar": {"type": "regex", "value": "a+"}}, "not both"),
    ({"grammar": {"type": "ebnf", "value": "x"}}, "`grammar.type`"),
    ({"grammar": {"type": "json", "value": ""}}, "`value` cannot be empty for `json` grammar"),
]
INVALID_GENERATE_ONLY = [
    ({"best_of": 0}, "`best_of` must be strictly positive"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` is > 1"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"return_k_alternatives": 0}, "`return_k_alternatives` must be strictly positive"),
]


def _never_called(request: httpx.Request) -> httpx.Response:
    raise AssertionError("an invalid request must not be sent")


@pytest.mark.parametrize(("kwargs", "message"), INVALID_ARGUMENTS + INVALID_GENERATE_ONLY)
def test_generate_validates_before_sending(kwargs: dict[str, Any], message: str) -> None:
    client, recorder = sync_client(_never_called)
    kwargs = {"prompt": "Hi", **kwargs}
    with pytest.raises(ValidationError, match=message) as caught:
        client.generate(**kwargs)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, LoomlmClientError)
    assert (caught.value.status_code, caught.value.payload) == (None, None)
    assert recorder.requests == []


@pytest.mark.parametrize(("kwargs", "message"), INVALID_ARGUMENTS)
def test_generate_stream_validates_when_called(kwargs: dict[str, Any], message: str) -> None:
    client, recorder = sync_client(_never_called)
    with pytest.raises(ValidationError, match=message):
        client.generate_stream(**{"prompt": "Hi", **kwargs})  # raises before any iteration
    assert recorder.requests == []


@pytest.mark.parametrize(("kwargs", "message"), INVALID_ARGUMENTS[:3] + INVALID_GENERATE_ONLY[1:2])
def test_async_client_validates_before_sending(kwargs: dict[str, Any], message: str) -> None:
    client, recorder = async_client(_never_called)
    kwargs = {"prompt": "Hi", **kwargs}
    stream_kwargs = {k: v for k, v in kwargs.items() if k not in ("best_of", "do_sample", "seed")}

    async def main() -> None:
        with pytest.raises(ValidationError, match=message):
            await client.generate(**kwargs)
        if stream_kwargs != {"prompt": "Hi"}:
            with pytest.raises(ValidationError, match=message):
                async for _ in client.generate_stream(**stream_kwargs):
                    pass

    asyncio.run(main())
    assert recorder.requests == []


# ----------------------------------------------------------------------------- errors

ERROR_CASES = [
    # (status, body, exception class, message) — error_type decides first, then the status.
    (422, {"error": "`top_k` must be strictly positive", "error_type": "validation"}, ValidationError,
     "`top_k` must be strictly positive"),
    (424, {"error": "CUDA error", "error_type": "generation"}, GenerationError, "CUDA error"),
    (429, {"error": "Model is overloaded", "error_type": "overloaded"}, OverloadedError, "Model is overloaded"),
    (500, {"error": "Incomplete generation", "error_type": "incomplete_generation"}, IncompleteGenerationError,
     "Incomplete generation"),
    (400, {"error": "bad json"}, BadRequestError, "bad json"),
    (401, {"error": {"message": "Invalid API key", "type": "AuthenticationError", "param": None, "code": 401}},
     AuthenticationError, "Invalid API key"),
    (403, {"error": "forbidden"}, ShardNotReadyError, "forbidden"),
    (424, {"error": "shard not ready"}, ShardNotReadyError, "shard not ready"),
    (404, {"detail": "Not Found"}, NotFoundError, "Not Found"),
    (422, {"detail": [{"loc": ["body", "inputs"], "msg": "Field required"}]}, UnprocessableEntityError, "Field required"),
    (429, {"error": "slow down"}, RateLimitExceededError, "slow down"),
    (504, {"error": "timeout"}, ShardTimeoutError, "timeout"),
    (503, {"error": "unavailable"}, ServerError, "Error status 503: unavailable"),  # an UnknownError too
]


@pytest.mark.parametrize(("status", "body", "error_class", "message"), ERROR_CASES)
def test_error_answers_raise_typed_exceptions(status: int, body: Any, error_class: type, message: str) -> None:
    client, _ = sync_client(json_answer(body, status))
    stream_client, _ = sync_client(json_answer(body, status))
    aclient, _ = async_client(json_answer(body, status))

    async def async_errors() -> list[LoomlmClientError]:
        caught = []
        for call in (aclient.generate("Hi"), _drain(aclient.generate_stream("Hi"))):
            with pytest.raises(error_class) as info:
                await call
            caught.append(info.value)
        return caught

    with pytest.raises(error_class) as from_generate:
        client.generate("Hi")
    responses = stream_client.generate_stream("Hi")
    with pytest.raises(error_class) as from_stream:
        next(responses)
    for error in [from_generate.value, from_stream.value, *asyncio.run(async_errors())]:
        assert type(error) is error_class
        assert error.status_code == status
        assert error.payload == body
        assert message in str(error)


async def _drain(responses: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    return [r async for r in responses]


@pytest.mark.parametrize(
    ("status", "body", "error_class"),
    [
        (500, b"Internal Server Error", UnknownError),
        (502, b"<html><body>Bad Gateway</body></html>", UnknownError),
        (404, b"no such route", NotFoundError),
        (429, b"\xff\xfe not utf-8", RateLimitExceededError),
    ],
)
def test_non_json_error_bodies_still_raise_typed_errors(status: int, body: bytes, error_class: type) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": "text/plain"})

    client, _ = sync_client(answer)
    with pytest.raises(error_class) as caught:
        client.generate("Hi")
    assert caught.value.status_code == status
    assert caught.value.payload == {"error": body.decode("utf-8", errors="replace")}
    with pytest.raises(error_class):
        list(client.generate_stream("Hi"))


def test_success_status_with_a_non_json_body_is_an_unknown_error() -> None:
    client, _ = sync_client(lambda request: httpx.Response(200, content=b"<html>oops</html>"))
    with pytest.raises(UnknownError, match="not JSON") as caught:
        client.generate("Hi")
    assert caught.value.status_code == 500  # as LoRAX's client, which reports it as a 500


def test_success_status_with_a_wrong_payload_is_an_unknown_error() -> None:
    client, _ = sync_client(json_answer([{"text": "no generated_text"}]))
    with pytest.raises(UnknownError, match="GenerateResponse") as caught:
        client.generate("Hi")
    assert caught.value.payload == {"text": "no generated_text"}


def test_stream_answered_without_sse_is_an_unknown_error() -> None:
    client, _ = sync_client(json_answer(GENERATE_ANSWER))
    with pytest.raises(UnknownError, match="text/event-stream"):
        list(client.generate_stream("Hi"))


class ClosingStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """An SSE body that records whether the client closed it."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.is_closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.content.splitlines(keepends=True)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for line in self.content.splitlines(keepends=True):
            yield line

    def close(self) -> None:
        self.is_closed = True

    async def aclose(self) -> None:
        self.is_closed = True


MID_STREAM_ERROR = {"error": "Request failed during generation: out of memory", "error_type": "generation"}


def test_error_event_mid_stream_raises_from_the_iterator_and_closes_the_stream() -> None:
    body = ClosingStream(sse([STREAM_EVENTS[0], MID_STREAM_ERROR, STREAM_EVENTS[1]]))
    client, _ = sync_client(lambda request: sse_answer(body))
    responses = client.generate_stream("Hi")
    assert next(responses).token.text == " Paris"
    assert not body.is_closed
    with pytest.raises(GenerationError, match="out of memory") as caught:
        next(responses)
    assert (caught.value.status_code, caught.value.payload) == (200, MID_STREAM_ERROR)
    assert body.is_closed


def test_async_error_event_mid_stream_raises_from_the_iterator_and_closes_the_stream() -> None:
    body = ClosingStream(sse([STREAM_EVENTS[0], MID_STREAM_ERROR, STREAM_EVENTS[1]]))
    client, _ = async_client(lambda request: sse_answer(body))
    received: list[str] = []

    async def main() -> None:
        with pytest.raises(GenerationError, match="out of memory"):
            async for response in client.generate_stream("Hi"):
                received.append(response.token.text)
        assert body.is_closed  # at once, not when the event loop finalizes leftover generators

    asyncio.run(main())
    assert received == [" Paris"]


def test_mid_stream_error_without_error_type_is_unknown() -> None:
    client, _ = sync_client(lambda request: sse_answer(sse([{"error": "boom"}])))
    with pytest.raises(UnknownError, match="boom"):
        list(client.generate_stream("Hi"))


def test_leaving_a_stream_early_closes_it() -> None:
    body = ClosingStream(sse(STREAM_EVENTS))
    client, _ = sync_client(lambda request: sse_answer(body))
    responses = client.generate_stream("Hi")
    next(responses)
    responses.close()
    assert body.is_closed


# ----------------------------------------------------------------------------- the generic transport


def test_transport_is_generic_over_method_path_and_body() -> None:
    """A later client (e.g. Scale's `/v1/llm/completions-sync`) reuses the transport unchanged."""
    recorder = Recorder(json_answer({"output": {"text": "ok"}}))
    transport = SyncTransport("http://loom.test/api/", transport=httpx.MockTransport(recorder))
    payload = transport.request_json(ApiRequest("POST", "/v1/llm/completions-sync", {"prompt": "Hi"}))
    assert payload == {"output": {"text": "ok"}}
    assert str(recorder.requests[0].url) == "http://loom.test/api/v1/llm/completions-sync"
    assert recorder.body == {"prompt": "Hi"}
