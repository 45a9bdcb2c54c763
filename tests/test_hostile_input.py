"""Hostile input never kills, stalls or pries (issue 13).

One server (the default model, LoRA on, one allowed adapter root, a 512-token context) takes
hand-made hostile requests and property-based fuzz (hypothesis) on every API family:

- OpenAI (`/v1/completions`, `/v1/chat/completions`, `/tokenize`, `/detokenize`, `/score`):
  errors are `{"error": {"message", "type", "param", "code"}}`;
- LoRAX / TGI (`/`, `/generate`, `/generate_stream`, TGI's `/tokenize`): `{"error", "error_type"}`;
- Scale LLM Engine (`/v1/llm/completions-sync`, `-stream`): `{"detail"}`.

Every answer must be a 200 or a 4xx in the family's format, never a 5xx or a timeout; after
each hostile request or fuzz batch the server still serves a normal request, and its memory
(this process: the server runs in a thread here) stays bounded. Adapter ids may only name
directories under the allowed root, and the answer for a path outside it is the same whether
or not that path exists. A second app on the same engine with a 1-byte memory ceiling shows
the memory guard (503 / 429 with Retry-After, counted in `/metrics`); a third, trusting request
chat templates, shows that a runaway template is cut off while `/health` stays responsive.

Generations are 1-4 tokens everywhere, so the whole module takes about a minute or two.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from server_utils import RunningServer, make_adapter, serve_app

from loomlm.server.limits import ServerLimits, process_rss_bytes

MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 512
LLMENGINE_QUERY = {"model_endpoint_name": MODEL}
TGI_PATHS = ("/", "/generate", "/generate_stream")
FIVE_MB = 5 * 1024 * 1024
TIMEOUT_S = 30.0

# A normal request of each family: what a server that survived must still answer with 200.
NORMAL: dict[str, tuple[str, dict[str, Any], dict[str, str] | None]] = {
    "openai": ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}, None),
    "chat": ("/v1/chat/completions",
             {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0},
             None),
    "tgi": ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, None),
    "llmengine": ("/v1/llm/completions-sync", {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0},
                  LLMENGINE_QUERY),
}


# ---------------------------------------------------------------------------------------------
# Fixtures: one engine, served by a default app, a trusting app and (in one test) a guarded app


@pytest.fixture(scope="module")
def adapter_root(smollm2_reference_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed adapter root: `good` (a real adapter) and `escape`, a symlink to a copy of that
    adapter outside the root (valid, but not under the root)."""
    base = tmp_path_factory.mktemp("hostile-adapters")
    root = base / "root"
    root.mkdir()
    make_adapter(smollm2_reference_dir, root / "good", 4, 8, ["q_proj", "v_proj"], seed=13)
    outside = base / "outside-adapter"
    shutil.copytree(root / "good", outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def engine(adapter_root: Path) -> Iterator[Any]:
    from loomlm.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(model=MODEL, enable_lora=True, adapter_roots=(str(adapter_root),),
                                             max_model_len=MAX_MODEL_LEN)
    try:
        yield engine
    finally:
        engine.shutdown()


@contextmanager
def serve(engine: Any, limits: ServerLimits) -> Iterator[RunningServer]:
    """Serve `engine` with an app built with `limits` (the engine outlives the server)."""
    from loomlm.server.app import build_app

    with serve_app(build_app(engine, limits=limits), engine) as running:
        yield running


@pytest.fixture(scope="module")
def server(engine: Any) -> Iterator[RunningServer]:
    with serve(engine, ServerLimits()) as running:
        yield running


@pytest.fixture(scope="module")
def baseline_rss(server: RunningServer) -> int:
    """This process's RSS right after the server came up and answered one request of each family
    (measured before any hostile request)."""
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as client:
        assert_still_serves(client, *NORMAL)
    return process_rss_bytes()


@pytest.fixture(scope="module")
def http(server: RunningServer, baseline_rss: int) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def trusting_server(engine: Any) -> Iterator[RunningServer]:
    with serve(engine, ServerLimits(trust_request_chat_template=True)) as running:
        yield running


# ---------------------------------------------------------------------------------------------
# Requests and the families' error formats


def post_raw(http: httpx.Client, path: str, body: Any, params: dict[str, str] | None = None) -> httpx.Response:
    """POST `body` (bytes, or an iterator of bytes: sent chunked) as JSON."""
    return http.post(path, content=body, params=params, headers={"content-type": "application/json"})


def dumps(obj: Any) -> bytes:
    """JSON as Python writes it with NaN / Infinity allowed and lone surrogates escaped (\\ud800),
    with `raw(...)` markers replaced by their literal text (numbers Python cannot write)."""
    text = json.dumps(obj, allow_nan=True)
    return _RAW_MARKER.sub(lambda m: m.group(1), text).encode()


_RAW_PREFIX = "\x00raw:"
_RAW_MARKER = re.compile(r'"\\u0000raw:([^"\\]*)"')


def raw(text: str) -> str:
    """A value written literally into the JSON text by `dumps` (e.g. `1e400`)."""
    return _RAW_PREFIX + text


def post_json(http: httpx.Client, path: str, obj: Any, params: dict[str, str] | None = None) -> httpx.Response:
    return post_raw(http, path, dumps(obj), params)


def family(path: str) -> str:
    if path.startswith("/v1/llm/"):
        return "llmengine"
    if path in TGI_PATHS:
        return "tgi"
    if path == "/tokenize":
        return "tokenize"  # one path for vLLM's and TGI's forms
    return "openai"


def describe(response: httpx.Response) -> str:
    return f"{response.request.method} {response.request.url.path} -> {response.status_code}: {response.text[:500]}"


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of an OpenAI error answer with `status`."""
    assert response.status_code == status, describe(response)
    body = response.json()
    assert list(body) == ["error"], describe(response)
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], describe(response)
    assert isinstance(error.get("type"), str) and error["type"], describe(response)
    assert "param" in error and (error["param"] is None or isinstance(error["param"], str)), describe(response)
    assert error.get("code") == status, describe(response)
    return error


def tgi_error(response: httpx.Response, status: int, error_type: str = "validation") -> str:
    """The message of a LoRAX / TGI error answer with `status` and `error_type`."""
    assert response.status_code == status, describe(response)
    body = response.json()
    assert set(body) == {"error", "error_type"}, describe(response)
    assert isinstance(body["error"], str) and body["error"], describe(response)
    assert body["error_type"] == error_type, describe(response)
    return body["error"]


def llmengine_error(response: httpx.Response, status: int) -> str:
    """The message of a Scale LLM Engine error answer with `status`."""
    assert response.status_code == status, describe(response)
    body = response.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str) and body["detail"], describe(response)
    return body["detail"]


def family_error(path: str, response: httpx.Response, status: int | None = None) -> str:
    """The message of an error answer in `path`'s family format; `status` None: the family's
    bad-input status (400, or 422 on the TGI routes)."""
    kind = family(path)
    if kind == "tgi":
        return tgi_error(response, status or 422)
    if kind == "llmengine":
        return llmengine_error(response, status or 400)
    if kind == "tokenize" and "error_type" in response.json():  # TGI's form of the body
        return tgi_error(response, status or 422)
    return openai_error(response, status or 400)["message"]


def format_problem(path: str, response: httpx.Response) -> str | None:
    """Why `response` breaks the rule "200, or a 4xx in the family's format" (None: it does not)."""
    status = response.status_code
    if status == 200:
        if "text/event-stream" in response.headers.get("content-type", ""):
            return None  # a stream may carry an error event; it ended, which is what counts
        try:
            response.json()
        except ValueError:
            return f"200 whose body is not JSON: {response.text[:200]!r}"
        return None
    if not 400 <= status < 500:
        return f"status {status}: {response.text[:300]}"
    try:
        body = response.json()
    except ValueError:
        return f"{status} whose body is not JSON: {response.text[:200]!r}"
    kind = family(path)
    if kind == "tokenize":
        kind = "tgi" if isinstance(body, dict) and "error_type" in body else "openai"
    try:
        if kind == "tgi":
            tgi_error(response, status, "overloaded" if status == 429 else "validation")
        elif kind == "llmengine":
            llmengine_error(response, status)
        else:
            openai_error(response, status)
    except (AssertionError, TypeError, KeyError, AttributeError):
        return f"{status} not in the {kind} error format: {response.text[:300]}"
    return None


def still_serving_problems(http: httpx.Client, *kinds: str) -> list[str]:
    problems = []
    for kind in kinds:
        path, body, params = NORMAL[kind]
        try:
            response = post_json(http, path, body, params)
        except httpx.HTTPError as exc:
            problems.append(f"normal {kind} request failed: {type(exc).__name__}: {exc}")
            continue
        if response.status_code != 200:
            problems.append(f"normal {kind} request: {describe(response)}")
    return problems


def assert_still_serves(http: httpx.Client, *kinds: str) -> None:
    problems = still_serving_problems(http, *kinds)
    assert not problems, "\n".join(problems)


def normal_kind(path: str) -> str:
    return {"tgi": "tgi", "llmengine": "llmengine"}.get(family(path), "openai")


def names(error: dict[str, Any], field: str) -> bool:
    """Whether an OpenAI error names `field` (its `param`, or the message's first word)."""
    return error["param"] == field or error["message"].split(maxsplit=1)[0].strip("`'\":") == field


# ---------------------------------------------------------------------------------------------
# Bodies too large


def _oversized(path: str) -> bytes:
    filler = b"a" * FIVE_MB
    if path == "/tokenize":
        return b'{"prompt": "' + filler + b'"}'
    if path == "/generate_stream":
        return b'{"inputs": "' + filler + b'", "parameters": {"max_new_tokens": 1}}'
    if path.startswith("/v1/llm/"):
        return b'{"prompt": "' + filler + b'", "max_new_tokens": 1, "temperature": 0}'
    return b'{"model": "' + MODEL.encode() + b'", "prompt": "' + filler + b'", "max_tokens": 1}'


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions", "/generate_stream", "/v1/llm/completions-sync"])
def test_a_5mb_body_is_refused_with_413(http, path, chunked):
    body = _oversized(path)
    if chunked:  # no Content-Length: the limit must hold while the body is read
        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 64 << 10):
                yield body[start:start + (64 << 10)]
        content: Any = chunks()
    else:
        content = body
    params = LLMENGINE_QUERY if path.startswith("/v1/llm/") else None
    response = post_raw(http, path, content, params)
    family_error(path, response, 413)
    assert_still_serves(http, normal_kind(path))


# ---------------------------------------------------------------------------------------------
# Counts: n, best_of, prompts, values, stop strings, messages, token-id lists


def _body(path: str, **fields: Any) -> dict[str, Any]:
    if path == "/v1/chat/completions":
        base = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 1.0}
    else:
        base = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 1.0}
    return base | fields


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field,value", [("n", 1_000_000), ("n", 9223372036854775808), ("best_of", 1_000_000)],
                         ids=["n=1e6", "n=2**63", "best_of=1e6"])
def test_huge_n_and_best_of_are_400(http, path, field, value):
    started = time.perf_counter()
    response = post_json(http, path, _body(path, **{field: value}))
    elapsed = time.perf_counter() - started
    if path == "/v1/chat/completions" and field == "best_of" and response.status_code == 200:
        # Chat completions have no best_of (OpenAI's): ignoring it is fine, running it is not.
        assert len(response.json()["choices"]) == 1
    else:
        error = openai_error(response, 400)
        assert names(error, field), error
    assert elapsed < 10, f"answered after {elapsed:.1f} s"
    assert_still_serves(http, "openai")


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"model": MODEL, "prompt": ["Hello"] * 10_000, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2]] * 10_000, "max_tokens": 1}, "prompt"),
    ("/score", {"model": MODEL, "prompt": "The sky is", "values": [" blue"] * 10_000}, "values"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "stop": [f"s{i}" for i in range(10_000)]},
     "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "stop": ["x" * 5000]}, "stop"),
    ("/v1/completions",
     {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "bad_words": [f"w{i}" for i in range(10_000)]},
     "bad_words"),
    ("/v1/completions",
     {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "stop_token_ids": list(range(10_000))}, "stop_token_ids"),
    ("/v1/completions",
     {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "logit_bias": {str(i): 1 for i in range(10_000)}},
     "logit_bias"),
    ("/v1/completions",
     {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "allowed_token_ids": list(range(10_000))},
     "allowed_token_ids"),
    ("/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}] * 2000, "max_tokens": 1}, "messages"),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}] * 2000}, "messages"),
], ids=["10k-prompts", "10k-token-prompts", "10k-score-values", "10k-stop", "5000-char-stop", "10k-bad-words",
        "10k-stop-token-ids", "10k-logit-bias", "10k-allowed-token-ids", "2000-messages", "2000-messages-tokenize"])
def test_too_many_items_are_400(http, path, body, field):
    error = openai_error(post_json(http, path, body), 400)
    assert names(error, field), error
    assert_still_serves(http, "openai")


_COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}
_SAMPLED_TGI = {"max_new_tokens": 1, "do_sample": True}


# (path, body, the field a refusal must name, whether a 200 is also right)
OUT_OF_RANGE_IDS = {
    "prompt-id-1e9": ("/v1/completions", _COMPLETION | {"prompt": [10**9]}, "prompt", False),
    "prompt-id-negative": ("/v1/completions", _COMPLETION | {"prompt": [-1]}, "prompt", False),
    "prompt-id-2**70": ("/v1/completions", _COMPLETION | {"prompt": [[1], [2**70]]}, "prompt", False),
    "logit-bias-1e9": ("/v1/completions", _COMPLETION | {"logit_bias": {"999999999": 5}}, "logit_bias", False),
    "logit-bias-2**70": ("/v1/completions", _COMPLETION | {"logit_bias": {str(2**70): 5}}, "logit_bias", False),
    "allowed-token-id-1e9": ("/v1/completions", _COMPLETION | {"allowed_token_ids": [10**9]}, "allowed_token_ids",
                             False),
    "stop-token-id-1e9": ("/v1/completions", _COMPLETION | {"stop_token_ids": [10**9]}, "stop_token_ids", False),
    "stop-token-id-2**70": ("/v1/completions", _COMPLETION | {"stop_token_ids": [2**70]}, "stop_token_ids", False),
    "stop-token-id-negative": ("/v1/completions", _COMPLETION | {"stop_token_ids": [-1]}, "stop_token_ids", True),
    "detokenize-1e9": ("/detokenize", {"tokens": [10**9]}, "tokens", False),
    "detokenize-2**70": ("/detokenize", {"tokens": [2**70]}, "tokens", False),
    "max-tokens-2**70": ("/v1/completions", _COMPLETION | {"max_tokens": 2**70}, "max_tokens", False),
    "logprobs-2**70": ("/v1/completions", _COMPLETION | {"logprobs": 2**70}, "logprobs", False),
    "seed-2**64": ("/v1/completions", _COMPLETION | {"seed": 2**64, "temperature": 1}, "seed", True),
    "seed-2**70": ("/v1/completions", _COMPLETION | {"seed": 2**70, "temperature": 1}, "seed", True),
    "seed-negative": ("/v1/completions", _COMPLETION | {"seed": -2**70, "temperature": 1}, "seed", True),
    "top-k-2**70": ("/v1/completions", _COMPLETION | {"top_k": 2**70, "temperature": 1}, "top_k", True),
    "truncate-2**70": ("/v1/completions", _COMPLETION | {"truncate_prompt_tokens": 2**70}, "truncate_prompt_tokens",
                       True),
    "tgi-seed-2**70": ("/generate", {"inputs": "Hello", "parameters": _SAMPLED_TGI | {"seed": 2**70}}, "seed", True),
    "tgi-top-k-2**70": ("/generate", {"inputs": "Hello", "parameters": _SAMPLED_TGI | {"top_k": 2**70}}, "top_k",
                        True),
    "tgi-max-new-tokens-2**70": ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2**70}},
                                 "max_new_tokens", False),
    "llmengine-max-new-tokens-2**70": ("/v1/llm/completions-sync",
                                       {"prompt": "Hello", "max_new_tokens": 2**70, "temperature": 0},
                                       "max_new_tokens", False),
    "llmengine-top-k-2**70": ("/v1/llm/completions-sync",
                              {"prompt": "Hello", "max_new_tokens": 1, "temperature": 0.5, "top_k": 2**70}, "top_k",
                              True),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE_IDS))
def test_token_ids_and_integers_out_of_range_are_refused_or_harmless(http, case):
    path, body, field, may_succeed = OUT_OF_RANGE_IDS[case]
    params = LLMENGINE_QUERY if path.startswith("/v1/llm/") else None
    response = post_json(http, path, body, params)
    if not (may_succeed and response.status_code == 200):
        message = family_error(path, response)
        param = response.json()["error"]["param"] if family(path) == "openai" else None
        assert param == field or field in message, (param, message)
    assert_still_serves(http, normal_kind(path))


def test_too_many_stop_sequences_on_tgi_and_llmengine(http):
    stops = [f"s{i}" for i in range(10_000)]
    tgi_error(post_json(http, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 1, "stop": stops}}),
              422)
    llmengine_error(post_json(http, "/v1/llm/completions-sync",
                              {"prompt": "Hello", "max_new_tokens": 1, "temperature": 0, "stop_sequences": stops},
                              LLMENGINE_QUERY), 400)
    assert_still_serves(http, "tgi", "llmengine")


# ---------------------------------------------------------------------------------------------
# Bodies that are not strict JSON: lone surrogates, other encodings, deep nesting, NaN


_M = MODEL.encode()
LONE_SURROGATE_BODIES = {
    "completions-prompt": ("/v1/completions", b'{"model": "' + _M + b'", "prompt": "abc\\ud800def", "max_tokens": 1}'),
    "completions-model": ("/v1/completions", b'{"model": "\\ud800", "prompt": "Hello", "max_tokens": 1}'),
    "completions-bad-words": ("/v1/completions",
                              b'{"model": "' + _M + b'", "prompt": "Hello", "max_tokens": 1, '
                              b'"bad_words": ["\\udfff"]}'),
    "chat-content": ("/v1/chat/completions",
                     b'{"model": "' + _M + b'", "messages": [{"role": "user", "content": "\\udc00\\ud800"}], '
                     b'"max_tokens": 1}'),
    "tokenize-prompt": ("/tokenize", b'{"prompt": "x\\ud800"}'),
    "score-values": ("/score", b'{"prompt": "The sky is", "values": [" blue\\ud800"]}'),
    "tgi-inputs": ("/generate", b'{"inputs": "Hello \\ud800", "parameters": {"max_new_tokens": 1}}'),
    "tgi-stream-inputs": ("/generate_stream", b'{"inputs": "\\ud800", "parameters": {"max_new_tokens": 1}}'),
    "llmengine-prompt": ("/v1/llm/completions-sync", b'{"prompt": "\\ud800", "max_new_tokens": 1, "temperature": 0}'),
}


@pytest.mark.parametrize("case", list(LONE_SURROGATE_BODIES))
def test_a_lone_surrogate_is_bad_input(http, case):
    assert_raw_body_refused(http, *LONE_SURROGATE_BODIES[case])


def assert_raw_body_refused(http: httpx.Client, path: str, body: bytes) -> None:
    """`body` sent to `path` is a 4xx in the family's format, and the server still serves."""
    params = LLMENGINE_QUERY if path.startswith("/v1/llm/") else None
    family_error(path, post_raw(http, path, body, params))
    assert_still_serves(http, normal_kind(path))


def _valid_text(path: str) -> str:
    """A valid body of `path`'s family whose prompt is "café"."""
    if path == "/generate":
        return json.dumps({"inputs": "café", "parameters": {"max_new_tokens": 1}}, ensure_ascii=False)
    if path.startswith("/v1/llm/"):
        return json.dumps({"prompt": "café", "max_new_tokens": 1, "temperature": 0}, ensure_ascii=False)
    if path == "/tokenize":
        return json.dumps({"prompt": "café"}, ensure_ascii=False)
    return json.dumps({"model": MODEL, "prompt": "café", "max_tokens": 1}, ensure_ascii=False)


NOT_UTF8 = {
    "latin-1": lambda text: text.encode("latin-1"),
    "utf-16-bom": lambda text: text.encode("utf-16"),  # Python's json.loads(bytes) would accept it
    "utf-16-le": lambda text: text.encode("utf-16-le"),
    "utf-32": lambda text: text.encode("utf-32"),
    "overlong-utf-8": lambda text: text.encode().replace("é".encode(), b"\xc0\xaf"),
    "encoded-surrogate": lambda text: text.encode().replace("é".encode(), b"\xed\xa0\x80"),
}


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/generate", "/v1/llm/completions-sync"])
@pytest.mark.parametrize("encoding", list(NOT_UTF8))
def test_a_body_that_is_not_utf8_is_bad_input(http, path, encoding):
    body = NOT_UTF8[encoding](_valid_text(path))
    params = LLMENGINE_QUERY if path.startswith("/v1/llm/") else None
    family_error(path, post_raw(http, path, body, params))
    assert_still_serves(http, normal_kind(path))


def _deep_list(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


def _deep_object(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


DEEP = 10_000
DEEP_BODIES = {
    "prompt-lists": ("/v1/completions",
                     b'{"model": "' + _M + b'", "max_tokens": 1, "prompt": ' + _deep_list(DEEP) + b"}"),
    "model-objects": ("/v1/completions", b'{"prompt": "Hello", "max_tokens": 1, "model": ' + _deep_object(DEEP) + b"}"),
    "top-level-list": ("/v1/chat/completions", _deep_list(DEEP)),
    "unclosed": ("/v1/completions", b'{"prompt": ' + b"[" * DEEP),
    "score-values": ("/score", b'{"prompt": "x", "values": ' + _deep_list(DEEP) + b"}"),
    "tgi-parameters": ("/generate", b'{"inputs": "Hello", "parameters": {"max_new_tokens": 1, "grammar": '
                       + _deep_object(DEEP) + b"}}"),
    "tgi-tokenize": ("/tokenize", b'{"inputs": ' + _deep_list(DEEP) + b"}"),
    "llmengine-guided-json": ("/v1/llm/completions-sync", b'{"prompt": "Hello", "max_new_tokens": 1, "temperature": 0, '
                              b'"guided_json": ' + _deep_object(DEEP) + b"}"),
}


@pytest.mark.parametrize("case", list(DEEP_BODIES))
def test_json_nested_10000_deep_is_bad_input(http, case):
    assert_raw_body_refused(http, *DEEP_BODIES[case])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate", "/v1/llm/completions-sync"])
def test_nan_and_infinite_temperature_are_bad_input(http, path, literal):
    if path == "/generate":
        template = {"inputs": "Hello", "parameters": {"max_new_tokens": 1, "temperature": raw(literal)}}
    elif path.startswith("/v1/llm/"):
        template = {"prompt": "Hello", "max_new_tokens": 1, "temperature": raw(literal)}
    else:
        template = _body(path, temperature=raw(literal))
    body = dumps(template)
    assert literal.encode() in body
    params = LLMENGINE_QUERY if path.startswith("/v1/llm/") else None
    family_error(path, post_raw(http, path, body, params))
    assert_still_serves(http, normal_kind(path))


def test_an_integer_of_5000_digits_is_bad_input(http):
    body = b'{"model": "' + _M + b'", "prompt": "Hello", "max_tokens": ' + b"9" * 5000 + b"}"
    openai_error(post_raw(http, "/v1/completions", body), 400)
    assert_still_serves(http, "openai")


# ---------------------------------------------------------------------------------------------
# Names: long model names and adapter ids


LONG_NAMES = ["a" * 2000, "/" + "a/" * 1000, "../" * 700]


@pytest.mark.parametrize("name", LONG_NAMES, ids=["plain", "absolute-path", "parent-dirs"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/score", "/tokenize", "/detokenize"])
def test_a_2000_character_model_name_is_400_or_404(http, path, name):
    body = {"/score": {"prompt": "The sky is", "values": [" blue"]}, "/tokenize": {"prompt": "Hello"},
            "/detokenize": {"tokens": [1, 2]}}.get(path) or _body(path)
    response = post_json(http, path, body | {"model": name})
    assert response.status_code in (400, 404), describe(response)
    error = openai_error(response, response.status_code)
    assert error["param"] == "model", error
    assert_still_serves(http, "openai")


@pytest.mark.parametrize("name", LONG_NAMES, ids=["plain", "absolute-path", "parent-dirs"])
def test_a_2000_character_adapter_id_is_422_on_tgi_and_4xx_on_llmengine(http, name):
    parameters = {"max_new_tokens": 1, "adapter_id": name}
    tgi_error(post_json(http, "/generate", {"inputs": "Hello", "parameters": parameters}), 422)
    response = post_json(http, "/v1/llm/completions-sync", NORMAL["llmengine"][1], {"model_endpoint_name": name})
    assert response.status_code in (400, 404), describe(response)
    llmengine_error(response, response.status_code)
    assert_still_serves(http, "tgi", "llmengine")


# ---------------------------------------------------------------------------------------------
# Prompts far beyond the context window, request chat templates


def test_a_300000_character_prompt_is_refused_quickly(http):
    prompt = "hello " * 50_000  # 300,000 characters, ~50,000 tokens; the context holds 512
    cases = [
        ("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}, None),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1},
         None),
        ("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 1}}, None),
        ("/v1/llm/completions-sync", {"prompt": prompt, "max_new_tokens": 1, "temperature": 0}, LLMENGINE_QUERY),
    ]
    for path, body, params in cases:
        started = time.perf_counter()
        response = post_json(http, path, body, params)
        elapsed = time.perf_counter() - started
        family_error(path, response)
        assert elapsed < 5.0, f"{path} answered after {elapsed:.1f} s"
    assert_still_serves(http, "openai", "tgi", "llmengine")


SLOW_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"


def test_a_request_chat_template_needs_trust(http):
    messages = [{"role": "user", "content": "Hi"}]
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}),
                       ("/tokenize", {"model": MODEL, "messages": messages})):
        for template in ("{{ 'x' }}", SLOW_TEMPLATE):
            error = openai_error(post_json(http, path, body | {"chat_template": template}), 400)
            assert "--trust-request-chat-template" in error["message"], error
    assert_still_serves(http, "chat")


# ---------------------------------------------------------------------------------------------
# Adapters: only under the allowed root; no oracle for paths outside it


def _normalized(message: str, adapter_id: str) -> str:
    return message.replace(adapter_id, "<ID>")


def _models(http: httpx.Client) -> list[str]:
    response = http.get("/v1/models")
    assert response.status_code == 200, describe(response)
    return [card["id"] for card in response.json()["data"]]


def _endpoints(http: httpx.Client) -> list[str]:
    response = http.get("/v1/llm/model-endpoints")
    assert response.status_code == 200, describe(response)
    return [endpoint["name"] for endpoint in response.json()["model_endpoints"]]


def test_adapter_ids_outside_the_root_are_refused_alike(http, adapter_root):
    models_before, endpoints_before = _models(http), _endpoints(http)
    outside_adapter = adapter_root.parent / "outside-adapter"  # what root/escape points to
    # Pairs of ids of the same shape, the first naming something that exists outside the root (a
    # directory, a file, /proc, a symlink out of the root to a valid adapter), the second nothing:
    # the answers must not tell them apart.
    pairs = [
        ("/etc", "/nonexistent-dir-xyz"),
        ("/etc/passwd", "/etc/nonexistent-xyz"),
        ("/proc/self/cwd", "/proc/self/nonexistent-xyz"),
        ("/tmp", "/nonexistent-xyz"),
        (str(adapter_root / "escape"), str(adapter_root / "nonexistent-xyz")),
        (str(adapter_root / "escape" / ".." / "outside-adapter"), str(adapter_root / "escape" / ".." / "nonexistent")),
        ("../../../../etc", "../../../../nonexistent-xyz"),
        ("~", "~nonexistent-user-xyz"),
        ("~root", "~nonexistent-user-xyz"),
        ("escape", "nonexistent-xyz"),
        ("good/../../outside-adapter", "good/../../nonexistent-xyz"),
    ]
    for source in (None, "local"):
        for existing, missing in pairs:
            answers = []
            for adapter_id in (existing, missing):
                parameters = {"max_new_tokens": 1, "adapter_id": adapter_id}
                if source is not None:
                    parameters["adapter_source"] = source
                message = tgi_error(post_json(http, "/generate", {"inputs": "Hello", "parameters": parameters}), 422)
                assert str(outside_adapter) not in message and os.getcwd() not in message, (adapter_id, message)
                answers.append(_normalized(message, adapter_id))
            assert answers[0] == answers[1], (source, existing, missing, answers)
    # model=<path> on the OpenAI routes and the LLM Engine endpoint name: refused alike too.
    for path, body in (("/v1/completions", _body("/v1/completions")),
                       ("/v1/chat/completions", _body("/v1/chat/completions")),
                       ("/score", {"prompt": "The sky is", "values": [" blue"]}),
                       ("/tokenize", {"prompt": "Hello"})):
        answers = set()
        for name in ("/etc", "/nonexistent-dir-xyz", str(adapter_root / "escape"), str(adapter_root / "nonexistent")):
            response = post_json(http, path, body | {"model": name})
            assert 400 <= response.status_code < 500, describe(response)
            error = openai_error(response, response.status_code)
            answers.add((response.status_code, error["param"], _normalized(error["message"], name)))
        assert len(answers) == 1, (path, answers)
    answers = set()
    for name in ("/etc", "/nonexistent-dir-xyz", str(adapter_root / "escape"), str(adapter_root / "nonexistent")):
        response = post_json(http, "/v1/llm/completions-sync", NORMAL["llmengine"][1], {"model_endpoint_name": name})
        assert 400 <= response.status_code < 500, describe(response)
        answers.add((response.status_code, _normalized(llmengine_error(response, response.status_code), name)))
    assert len(answers) == 1, answers
    # Nothing refused was registered as a model.
    assert _models(http) == models_before
    assert _endpoints(http) == endpoints_before
    assert_still_serves(http, "openai", "tgi", "llmengine")


def test_an_adapter_under_the_root_is_served_and_listed(http, adapter_root):
    good = str(adapter_root / "good")
    response = post_json(http, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2,
                                                                                 "adapter_id": good}})
    assert response.status_code == 200, describe(response)
    assert response.headers.get("x-adapter-id") == good
    assert isinstance(response.json()["generated_text"], str)
    completion = post_json(http, "/v1/completions", {"model": good, "prompt": "Hello", "max_tokens": 2})
    assert completion.status_code == 200, describe(completion)
    listed = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert good in listed and listed[good]["parent"] == MODEL, listed


# ---------------------------------------------------------------------------------------------
# The memory guard


def test_over_the_memory_ceiling_new_work_is_refused_but_health_answers(engine):
    openai_like = [
        ("/v1/completions", NORMAL["openai"][1], None),
        ("/v1/chat/completions", NORMAL["chat"][1], None),
        ("/score", {"prompt": "The sky is", "values": [" blue"]}, None),
        ("/v1/llm/completions-sync", NORMAL["llmengine"][1], LLMENGINE_QUERY),
        ("/v1/llm/completions-stream", NORMAL["llmengine"][1], LLMENGINE_QUERY),
    ]
    tgi_like = [(path, NORMAL["tgi"][1]) for path in TGI_PATHS]
    with serve(engine, ServerLimits(max_process_memory_bytes=1)) as guarded, \
            httpx.Client(base_url=guarded.base_url, timeout=TIMEOUT_S) as http:
        for path, body, params in openai_like:
            response = post_json(http, path, body, params)
            family_error(path, response, 503)
            assert int(response.headers["retry-after"]) > 0, describe(response)
        for path, body in tgi_like:
            response = post_json(http, path, body)
            tgi_error(response, 429, "overloaded")
            assert int(response.headers["retry-after"]) > 0, describe(response)
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        text = metrics.text
    refused = re.search(r'^loomlm_requests_refused_total\{[^}]*reason="memory"[^}]*\} (\S+)$', text, re.M)
    assert refused is not None, text
    assert float(refused.group(1)) == len(openai_like) + len(tgi_like)
    resident = re.search(r"^loomlm_process_resident_memory_bytes(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert resident is not None, text
    assert float(resident.group(1)) > 0


# ---------------------------------------------------------------------------------------------
# Property-based fuzz: every answer is a 200 or a 4xx in the family's format


@dataclass
class Case:
    path: str
    body: bytes
    params: dict[str, str] | None = None

    def __str__(self) -> str:
        query = f"?{self.params}" if self.params else ""
        text = self.body.decode("utf-8", "replace")
        return f"POST {self.path}{query} {text[:400]}{'...' if len(text) > 400 else ''}"


def _nest(depth: int, kind: str) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800", "x\ud83d"])
TEXT_JUNK = st.one_of(
    st.text(max_size=16),
    SURROGATES,
    st.sampled_from(["", " ", "\x00", "\u202e\u0000\ufeff", "\U0001f999" * 40, "<|im_end|>", "<|endoftext|>",
                     "{{ 7 * 7 }}", "%s%n%x", "../../../../etc/passwd", "\r\n\r\nHTTP/1.1 200 OK"]),
)
BIG_INTS = st.sampled_from([-1, 0, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**70, -2**63 - 1, -2**70])
INTS = st.one_of(st.integers(-5, 5), BIG_INTS, st.integers(-2**70, 2**70))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-300, 1e308, -0.0]))
RAW_NUMBERS = st.sampled_from([raw("1e400"), raw("-1e400"), raw("1" + "0" * 5000), raw("NaN"), raw("-Infinity")])
DEEP_JUNK = st.builds(_nest, st.integers(2, 120), st.sampled_from(["list", "dict"]))
JUNK = st.one_of(
    st.none(), st.booleans(), INTS, FLOATS, RAW_NUMBERS, TEXT_JUNK, DEEP_JUNK,
    st.lists(st.integers(-3, 10**6), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(-3, 3), max_size=3),
    st.sampled_from([[], {}, [None], [[]], {"": ""}, ["x"] * 100]),
)

OUT_OF_VOCAB = [[10**9], [-1], [2**70], [49152], [0, -5]]
MODEL_NAMES = [MODEL, MODEL, "", "nope", MODEL.upper(), "/etc", "../../../../etc", "~", "~nobody-xyz",
               "/proc/self/cwd", "a" * 300, "\ud800", "\x00", None, 5, ["x"]]
STOPS = [None, "", "x", [""], ["\n"], ["a"] * 65, ["x" * 1025], [1, 2], "\ud800", ["the", "a"], ["x"] * 10_000]
SAMPLING_FIELDS: dict[str, list[Any]] = {
    "model": MODEL_NAMES,
    "temperature": [0, 0.5, 1, 2, -1, 1e-9, 1e300, float("nan"), float("inf"), raw("1e400"), "0.5"],
    "top_p": [0, 1e-300, 0.5, 1, 1.0000001, -1, 2],
    "top_k": [-2, -1, 0, 1, 50, 49152, 10**6, 2**70],
    "min_p": [-0.1, 0, 0.5, 1, 1.5],
    "n": [-1, 0, 1, 2, 3, 129, 10**6, 2**63, 2**70, "2", 2.5, None],
    "stop": STOPS,
    "stop_token_ids": [*OUT_OF_VOCAB, [0], [], [0] * 5000, None, "x"],
    "seed": [None, -1, 0, 2**63 - 1, 2**63, 2**64, 2**70, -2**70, 1.5],
    "presence_penalty": [-3, -2, 0, 2, 3, 1e300],
    "frequency_penalty": [-3, -2, 0, 2, 3, 1e300],
    "repetition_penalty": [-1, 0, 1e-300, 1, 1.2, 1e300],
    "logit_bias": [{"999999999": 5}, {"-1": 1}, {"abc": 1}, {"1": 1e300}, {"1": float("nan")}, {"0": -100},
                   {"1": "x"}, {str(i): 1 for i in range(5000)}, [], {str(2**70): 1}],
    "prompt_logprobs": [-1, 0, 1, 20, 21, 2**70],
    "truncate_prompt_tokens": [-1, 0, 1, 5, 1000, 2**70],
    "allowed_token_ids": [[], *OUT_OF_VOCAB, [0, 1], None],
    "bad_words": [[], [""], [" "], ["\ud800"], ["a"] * 65, ["x" * 2000], ["hello"], "hello", [5]],
    "ignore_eos": [True, False, "yes", 2],
    "min_tokens": [-1, 0, 2, 5, 2**70],
    "skip_special_tokens": [True, False, None],
    "include_stop_str_in_output": [True, False],
    "use_beam_search": [True, False],
    "length_penalty": [-1e300, 0, 1, float("inf")],
    "stream": [True, False, "yes"],
    "stream_options": [{"include_usage": True}, {"include_usage": "x"}, "x"],
    "response_format": [{"type": "json_object"}, {"type": "json_schema"}, {"type": "bogus"}, {"type": 5}, {},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": _nest(40, "dict")}}],
    "guided_json": [{"type": "integer"}, {"type": "nonsense"}, "not json", "{", {"$ref": "#/definitions/x"},
                    {"type": "string", "pattern": "("}],
    "guided_regex": ["[a-z]{1,3}", "(", "a{2,1}", "\\", "[", "x{1000000}"],
    "guided_choice": [[], [""], ["a", "b"], [1, 2], ["x"] * 1000],
    "guided_grammar": ['start: "a"', "start:", "(((", ""],
    "suffix": ["x", None],
    "user": TEXT_JUNK,
}
COMPLETION_FIELDS: dict[str, list[Any]] = SAMPLING_FIELDS | {
    "prompt": ["Hello", "", [], [[]], *OUT_OF_VOCAB, [1, 2, 3], [[1, 2], [3]], ["a", "b"], ["hi"] * 300,
               "hello " * 200, "hello " * 1000, "\ud800", "\x00", 5, None, {"a": 1}, [1.5], ["x", 1], [[10**9]]],
    "max_tokens": [0, 1, 2, 3, 4, -1, 2**70, 10**6, 511, 512, "3", 2.0, 2.5, None],
    "echo": [True, False],
    "logprobs": [-1, 0, 5, 20, 21, 2**70, True],
    "best_of": [None, 0, 1, 2, 3, 21, 10**6, 2**70, -1],
}
MESSAGES = [
    [], [{"role": "user", "content": "Hi"}], [{"role": "user"}], [{"role": "user", "content": None}],
    [{"role": 5, "content": "x"}], [{"content": "x"}], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "x"}] * 1100, [{"role": "user", "content": "\ud800"}],
    [{"role": "user", "content": "x", "name": 5}], [{"role": "system", "content": "{{ 7 * 7 }}"}],
    [{"role": "user", "content": "{% for i in range(10**9) %}x{% endfor %}"}],
    [{"role": "tool", "content": "x", "tool_call_id": ["x"]}], "x", [None], [[]], [{"role": "user", "content": 5}],
]
CHAT_FIELDS: dict[str, list[Any]] = SAMPLING_FIELDS | {
    "messages": MESSAGES,
    "max_tokens": COMPLETION_FIELDS["max_tokens"],
    "max_completion_tokens": COMPLETION_FIELDS["max_tokens"],
    "logprobs": [True, False, 5],
    "top_logprobs": [-1, 0, 5, 20, 21, 2**70],
    # Refused unrendered on a server that does not trust request templates (the runaway one is
    # tested by itself, last: without that refusal it would hold a CPU for minutes).
    "chat_template": ["{{ 7 * 7 }}", "{% for i in range(1000) %}x{% endfor %}", None, 5],
    "add_generation_prompt": [True, False, "x"],
    "continue_final_message": [True, False],
}
TOKENIZE_FIELDS: dict[str, list[Any]] = {
    "model": MODEL_NAMES, "prompt": COMPLETION_FIELDS["prompt"], "messages": MESSAGES,
    "add_special_tokens": [True, False, "x"], "return_token_strs": [True, False], "add_generation_prompt": [True, 5],
    "chat_template": ["{{ 7 * 7 }}", None],
}
DETOKENIZE_FIELDS: dict[str, list[Any]] = {
    "model": MODEL_NAMES, "tokens": [[], *OUT_OF_VOCAB, [1, 2, 3], "x", [1.5], [None], [0] * 10_000],
}
SCORE_FIELDS: dict[str, list[Any]] = {
    "model": MODEL_NAMES, "prompt": ["The sky is", "", "\ud800", "hello " * 1000, 5, None, ["x"]],
    "values": [[], [""], [" blue"], [" blue"] * 300, " blue", [1], ["\ud800"], ["hello " * 600], None],
}

OPENAI_BASES: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "/v1/completions": ({"model": MODEL, "prompt": "Hello there", "max_tokens": 2, "temperature": 0},
                        COMPLETION_FIELDS),
    "/v1/chat/completions": ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                             CHAT_FIELDS),
    "/tokenize": ({"model": MODEL, "prompt": "Hello"}, TOKENIZE_FIELDS),
    "/detokenize": ({"model": MODEL, "tokens": [1, 2, 3]}, DETOKENIZE_FIELDS),
    "/score": ({"model": MODEL, "prompt": "The sky is", "values": [" blue", " green"]}, SCORE_FIELDS),
}
OPENAI_PATHS = ["/v1/completions"] * 4 + ["/v1/chat/completions"] * 3 + ["/tokenize", "/detokenize", "/score"]

TGI_PARAMETERS: dict[str, list[Any]] = {
    "max_new_tokens": [0, -1, 1, 2, 3, 2**70, 10**6, 600, "3", 2.5, None],
    "best_of": [None, 0, 1, 2, 3, -1, 2**70, "2"],
    "do_sample": [True, False, None, "yes"],
    "temperature": [0, 0.5, 1, -1, 1e300, 1e-300, float("nan"), float("inf"), raw("1e400")],
    "top_k": [-1, 0, 1, 5, 10**6, 2**70],
    "top_p": [0, 0.5, 0.99, 1, 2, -1],
    "typical_p": [0, 0.5, 1, 2],
    "repetition_penalty": [-1, 0, 1, 1.2, 1e300],
    "frequency_penalty": [-3, 0, 1, 3],
    "presence_penalty": [-3, 0, 1, 3],
    "stop": [["x"] * 5, [""], ["\ud800"], "x", [1], ["\n"], ["x"] * 10_000],
    "seed": [None, -1, 0, 1, 2**63, 2**64, 2**70],
    "truncate": [-1, 0, 1, 5, 2**70],
    "details": [True, False, "x"],
    "decoder_input_details": [True, False],
    "return_full_text": [True, False],
    "watermark": [True, False, {"gamma": 2}],
    "ignore_eos_token": [True, False],
    "return_k_alternatives": [-1, 0, 1, 3, 20, 21, 10**6, 2**70],
    "top_n_tokens": [-1, 0, 1, 3, 20, 21, 10**6, 2**70],
    "adapter_id": [None, MODEL, "", "/etc", "../../../../etc", "~", "~nonexistent-user-xyz", "/proc/self/cwd",
                   "/nonexistent/x", "a" * 2000, "\x00", "s3://bucket/x", "org/repo", ".", "..", "escape", "good/..",
                   5],
    "adapter_source": [None, "local", "hub", "pbase", "ftp", "", 5],
    "merged_adapters": [{"ids": ["/etc"], "weights": [1.0]}, {"ids": [], "weights": []},
                        {"ids": ["a"], "weights": [float("nan")]}, {"ids": ["a", "b"], "weights": [1]},
                        {"ids": ["x"], "weights": [1], "merge_strategy": "bogus", "density": -1}, "x"],
    "api_token": TEXT_JUNK,
    "response_format": [{"type": "json_object"}, {"type": "json_object", "schema": {"type": "integer"}},
                        {"type": "x"}, {}, {"type": "json_object", "schema": "nonsense"}],
    "grammar": [{"type": "regex", "value": "("}, {"type": "regex", "value": "[a-z]{1,2}"},
                {"type": "json", "value": {"type": "integer"}}, {"type": "regex", "value": 5},
                {"type": "x", "value": "y"}, {}],
    "apply_chat_template": [True, False],
}
TGI_TOP: dict[str, list[Any]] = {
    "inputs": ["Hello", "", "\ud800", "hello " * 1000, '[{"role": "user", "content": "hi"}]', "[1, 2]",
               '[{"role": 5}]', 5, None, ["x"], "\x00"],
    "stream": [True, False, "x", None],
    "parameters": [None, "x", [], 5],
}
TGI_ROUTES = ["/generate"] * 5 + ["/"] * 2 + ["/generate_stream"] * 2 + ["/tokenize"]

LLMENGINE_FIELDS: dict[str, list[Any]] = {
    "prompt": ["Hello", "", "\ud800", "hello " * 1000, 5, None, ["x"], "\x00"],
    "max_new_tokens": [0, -1, 1, 3, 2**70, 10**6, "3", 2.5, None],
    "temperature": [0, 0.5, 1, 1.0001, -0.1, float("nan"), float("inf"), raw("1e400"), "0", None],
    "stop_sequences": [[], [""], ["x"] * 100, ["x" * 2000], "x", [1], ["\ud800"], ["x"] * 10_000],
    "return_token_log_probs": [True, False, "x"],
    "presence_penalty": [-1, 0, 2, 3],
    "frequency_penalty": [-1, 0, 2, 3],
    "top_k": [-2, -1, 0, 1, 2**70],
    "top_p": [0, 0.5, 1, 2],
    "include_stop_str_in_output": [True, False],
    "skip_special_tokens": [True, False, 5],
    "guided_json": [{"type": "integer"}, {"type": "bogus"}, "x", _nest(80, "dict")],
    "guided_regex": ["(", "[a-z]{1,3}", "x{1000000}"],
    "guided_choice": [[], [""], ["a", "b"]],
    "guided_grammar": ['start: "a"', "((("],
}
ENDPOINT_NAMES = [MODEL] * 8 + ["/etc", "", "a" * 2000, "../../../../etc", "~", "nonexistent", "\x00", None]
LLMENGINE_ROUTES = ["/v1/llm/completions-sync"] * 3 + ["/v1/llm/completions-stream"]


def _small(value: Any) -> Any:
    """A token budget that keeps a generation to a few tokens: None (the context window) and values
    from 5 up to a little past the context become 3; larger, negative and ill-typed ones stay
    (they are refused before anything runs)."""
    if value is None:
        return 3
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return value
    return 3 if 5 <= number <= 2 * MAX_MODEL_LEN else value


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], fields: dict[str, list[Any]]) -> dict[str, Any]:
    """`base` with 1-4 fields set (to a near-miss value for that field, or junk), removed, or added."""
    body = dict(base)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "set", "set", "junk", "delete", "extra"]))
        if action == "delete" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif action == "extra":
            body[draw(st.text(min_size=1, max_size=12))] = draw(JUNK)
        else:
            name = draw(st.sampled_from(sorted(fields)))
            pool = fields[name]
            if action == "junk":
                body[name] = draw(JUNK)
            else:
                body[name] = draw(pool if isinstance(pool, st.SearchStrategy) else st.sampled_from(pool))
    return body


TOP_LEVEL_JUNK = st.one_of(JUNK, st.sampled_from([[], "x", None, 5, [{"prompt": "Hello"}]]))


@st.composite
def openai_cases(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from(OPENAI_PATHS))
    base, fields = OPENAI_BASES[path]
    if draw(st.integers(0, 19)) == 19:  # one body in 20 is not an object at all
        return Case(path, dumps(draw(TOP_LEVEL_JUNK)))
    body = draw(mutated(base, fields))
    if path == "/v1/completions":
        body["max_tokens"] = _small(body.get("max_tokens", 16))
    elif path == "/v1/chat/completions":
        if body.get("max_completion_tokens") is not None:
            body["max_completion_tokens"] = _small(body["max_completion_tokens"])
        else:
            body["max_tokens"] = _small(body.get("max_tokens"))
    return Case(path, dumps(body))


@st.composite
def tgi_cases(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from(TGI_ROUTES))
    if path == "/tokenize":
        body = draw(mutated({"inputs": "Hello"}, {"inputs": TGI_TOP["inputs"], "add_special_tokens": [True, False, 5]}))
        return Case(path, dumps(body))
    if draw(st.integers(0, 19)) == 19:  # one body in 20 is not an object at all
        return Case(path, dumps(draw(TOP_LEVEL_JUNK)))
    parameters = draw(mutated({"max_new_tokens": 2}, TGI_PARAMETERS))
    body = draw(mutated({"inputs": "Hello", "parameters": parameters}, TGI_TOP))
    if body.get("parameters") is None:
        body["parameters"] = {}
    if isinstance(body["parameters"], dict):
        body["parameters"]["max_new_tokens"] = _small(body["parameters"].get("max_new_tokens"))
    return Case(path, dumps(body))


@st.composite
def llmengine_cases(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from(LLMENGINE_ROUTES))
    name = draw(st.sampled_from(ENDPOINT_NAMES))
    params = None if name is None else {"model_endpoint_name": name}
    if draw(st.integers(0, 19)) == 19:  # one body in 20 is not an object at all
        return Case(path, dumps(draw(TOP_LEVEL_JUNK)), params)
    body = draw(mutated({"prompt": "Hello", "max_new_tokens": 2, "temperature": 0}, LLMENGINE_FIELDS))
    if "max_new_tokens" in body:
        body["max_new_tokens"] = _small(body["max_new_tokens"])
    return Case(path, dumps(body), params)


FUZZ_SETTINGS = settings(
    max_examples=130,
    deadline=None,
    derandomize=True,  # the same examples on every run
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failing example is reported as found
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)


def run_fuzz(http: httpx.Client, cases: st.SearchStrategy[Case], baseline_rss: int, *normal: str) -> None:
    """Send every generated case; collect the answers that break the rule, then check the server
    still serves `normal` requests and its memory stayed bounded."""
    failures: dict[str, str] = {}  # problem (its first line) -> the first request that showed it
    timings: list[tuple[float, str]] = []

    @FUZZ_SETTINGS
    @given(case=cases)
    def send(case: Case) -> None:
        started = time.perf_counter()
        try:
            response = post_raw(http, case.path, case.body, case.params)
        except httpx.TimeoutException as exc:  # stalled: the next requests would wait as long, stop here
            earlier = "".join(f"\n{problem}\n    request: {request}" for problem, request in failures.items())
            raise AssertionError(f"no answer within {TIMEOUT_S} s (the server stalled): {case}{earlier}") from exc
        except httpx.TransportError as exc:
            failures.setdefault(f"{case.path}: connection failed: {type(exc).__name__}: {exc}", str(case))
            return
        finally:
            timings.append((time.perf_counter() - started, str(case)))
        problem = format_problem(case.path, response)
        if problem is not None:
            failures.setdefault(f"{case.path}: {problem[:160]}", str(case))

    send()
    problems = [f"{problem}\n    request: {request}" for problem, request in failures.items()]
    problems += still_serving_problems(http, *normal)
    rss = process_rss_bytes()
    limit = 2 * baseline_rss + (300 << 20)
    if rss >= limit:
        problems.append(f"RSS {rss >> 20} MiB after the batch; at most {limit >> 20} MiB allowed "
                        f"(baseline {baseline_rss >> 20} MiB)")
    count = len(timings)
    slowest = sorted(timings, reverse=True)[:3]
    print(f"\n{count} fuzz requests in {sum(t for t, _ in timings):.1f} s; RSS {rss >> 20} MiB "
          f"(baseline {baseline_rss >> 20} MiB); slowest:" + "".join(f"\n  {t:.2f} s {c[:150]}" for t, c in slowest))
    assert not problems, f"{len(problems)} problems in {count} requests:\n" + "\n".join(problems[:20])


def test_fuzz_openai_family(http, baseline_rss):
    run_fuzz(http, openai_cases(), baseline_rss, "openai", "chat")


def test_fuzz_lorax_tgi_family(http, baseline_rss):
    run_fuzz(http, tgi_cases(), baseline_rss, "tgi")


def test_fuzz_llmengine_family(http, baseline_rss):
    run_fuzz(http, llmengine_cases(), baseline_rss, "llmengine")


# ---------------------------------------------------------------------------------------------
# Last: a runaway template on a server that trusts request templates (if rendering were not cut
# off, it would hold a CPU for minutes, so nothing runs after it)


def test_a_runaway_trusted_chat_template_is_cut_off_while_health_answers(trusting_server, record_property):
    base_url = trusting_server.base_url
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "chat_template": SLOW_TEMPLATE}
    outcome: dict[str, Any] = {}

    def slow_request() -> None:
        started = time.perf_counter()
        try:
            with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as client:
                outcome["response"] = post_json(client, "/v1/chat/completions", body)
        except httpx.HTTPError as exc:
            outcome["exception"] = exc
        outcome["elapsed"] = time.perf_counter() - started

    latencies = []
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as probe:
        assert probe.get("/health").status_code == 200  # connection set up before timing
        thread = threading.Thread(target=slow_request, daemon=True)
        thread.start()
        while thread.is_alive():
            started = time.perf_counter()
            health = probe.get("/health")
            latencies.append(time.perf_counter() - started)
            assert health.status_code == 200
            time.sleep(0.02)
        thread.join()
        assert "exception" not in outcome, outcome.get("exception")
        worst = max(latencies)
        record_property("health_max_latency_s", round(worst, 4))
        print(f"\n/health during a runaway template: {len(latencies)} probes, max {worst * 1000:.1f} ms; "
              f"template request answered in {outcome['elapsed']:.2f} s")
        openai_error(outcome["response"], 400)
        assert outcome["elapsed"] < 3.0, f"the template request took {outcome['elapsed']:.1f} s"
        if outcome["elapsed"] > 0.3:
            assert len(latencies) >= 2, latencies
        assert worst < 0.5, f"/health took {worst * 1000:.0f} ms while a template rendered"
        # A harmless request template works on this server, and the server still serves.
        fine = post_json(probe, "/v1/chat/completions", body | {"chat_template": "{{ messages[0]['content'] }}"})
        assert fine.status_code == 200, describe(fine)
        assert_still_serves(probe, "chat", "openai")
