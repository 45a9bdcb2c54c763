"""The Scale LLM Engine-compatible routes driven by the real `scale-llm-engine` client (`llmengine`)
and by `loomlm.Completion`: sync, stream and async completions, stop sequences, token logprobs,
guided decoding, adapters as model endpoints, the model-endpoints listing, and the errors each
client raises. Expected outputs come from the offline `LLM` on the same weights."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import httpx
import pytest
from openai import OpenAI
from server_utils import RunningServer, make_adapter, offline, serve_app, serve_engine

import loomlm
from loomlm import SamplingParams
from loomlm.client import BadRequestError, NotFoundError, ValidationError
from loomlm.server.llmengine_router import LLMEngineServing, split_text
from loomlm.server.metrics import ServerMetrics

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapter(smollm2_reference_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("llmengine-adapter")
    return str(make_adapter(smollm2_reference_dir, root / "attn-r8", 8, 16, ["q_proj", "v_proj"], 1))


@pytest.fixture(scope="module")
def le_server(adapter: str) -> Iterator[RunningServer]:
    with serve_engine(model=MODEL, enable_lora=True, max_loras=2, lora_adapter_ids=(adapter,)) as running:
        yield running


@pytest.fixture(scope="module")
def le(le_server: RunningServer) -> Iterator[ModuleType]:
    """The `llmengine` package, pointed at the server (a base path with a trailing slash: urljoin)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_ENGINE_DISABLE_VERSION_CHECK", "1")  # no call to PyPI on import
        llmengine = importlib.import_module("llmengine")
        llmengine.api_engine.set_base_path(le_server.base_url + "/")
        try:
            yield llmengine
        finally:
            llmengine.api_engine.set_base_path(None)



def without_request_id(response) -> dict:
    data = json.loads(response.json())
    data.pop("request_id")
    return data


# ---------------------------------------------------------------------------
# The real client


def test_create_matches_the_offline_engine_with_token_logprobs(le, llm):
    expected = offline(llm, PROMPT, 10)
    response = le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=10, temperature=0,
                                    return_token_log_probs=True)
    output = response.output
    assert response.request_id and output.text == expected.text
    assert output.num_completion_tokens == len(expected.token_ids)
    assert output.num_prompt_tokens == len(llm.get_tokenizer().encode(PROMPT))
    assert [t.token for t in output.tokens] == [p[t].decoded_token for t, p in zip(expected.token_ids,
                                                                                     expected.logprobs, strict=True)]
    for token, token_id, position in zip(output.tokens, expected.token_ids, expected.logprobs, strict=True):
        assert token.log_prob == pytest.approx(position[token_id].logprob, abs=1e-4)
    plain = le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=10, temperature=0)
    assert plain.output.text == expected.text and plain.output.tokens is None


def test_stream_events_add_up_to_the_sync_completion(le):
    sync = le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=12, temperature=0,
                                return_token_log_probs=True)
    # The client json-parses every `data:` line: a `[DONE]` would raise ValueError here.
    chunks = list(le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=12, temperature=0,
                                       return_token_log_probs=True, stream=True))
    n = sync.output.num_completion_tokens
    assert len(chunks) == n and all(c.error is None for c in chunks)
    assert "".join(c.output.text for c in chunks) == sync.output.text
    assert [c.output.num_completion_tokens for c in chunks] == list(range(1, n + 1))
    assert [c.output.finished for c in chunks] == [False] * (n - 1) + [True]
    assert [c.output.token for c in chunks] == sync.output.tokens
    assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id != sync.request_id


def test_acreate_sync_and_stream(le):
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0}

    async def run():
        response = await le.Completion.acreate(**kwargs)
        chunks = [chunk async for chunk in await le.Completion.acreate(**kwargs, stream=True)]
        return response, chunks

    response, chunks = asyncio.run(run())
    assert response.output.text == le.Completion.create(**kwargs).output.text
    assert "".join(c.output.text for c in chunks) == response.output.text and chunks[-1].output.finished


def test_stop_sequences_cut_the_text_unless_included(le):
    base = le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=16, temperature=0).output.text
    stop = base.split()[1]  # a word the greedy completion reaches after its first one
    cut = base[:base.index(stop)]
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_new_tokens": 16, "temperature": 0,
              "stop_sequences": [stop, "@@"]}
    assert le.Completion.create(**kwargs).output.text == cut
    assert le.Completion.create(**kwargs, include_stop_str_in_output=True).output.text == cut + stop
    streamed = le.Completion.create(**kwargs, include_stop_str_in_output=False, stream=True)
    assert "".join(c.output.text for c in streamed) == cut


def test_guided_regex_choice_and_json(le):
    pattern = r"[0-9]{3}-[0-9]{4}"
    response = le.Completion.create(model=MODEL, prompt="A phone number:", max_new_tokens=12, temperature=0,
                                    guided_regex=pattern)
    assert re.fullmatch(pattern, response.output.text)
    choices = ["Paris", "London", "Berlin"]
    response = le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=8, temperature=0,
                                    guided_choice=choices)
    assert response.output.text in choices
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    response = le.Completion.create(model=MODEL, prompt="Is Paris in France? Answer in JSON:", max_new_tokens=24,
                                    temperature=0, guided_json=schema)
    assert json.loads(response.output.text)["answer"] in ("yes", "no")


def test_adapter_as_model_endpoint_matches_openai_model_selection(le, le_server, adapter):
    kwargs = {"prompt": PROMPT, "max_new_tokens": 10, "temperature": 0}
    base = le.Completion.create(model=MODEL, **kwargs).output.text
    tuned = le.Completion.create(model=adapter, **kwargs).output.text
    openai = OpenAI(base_url=f"{le_server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    completion = openai.completions.create(model=adapter, prompt=PROMPT, max_tokens=10, temperature=0)
    assert tuned == completion.choices[0].text and tuned != base


def test_model_endpoints_list_the_base_model_and_adapters_as_v1_models(le, le_server, adapter):
    listed = le.Model.list().model_endpoints
    assert [m.name for m in listed] == [MODEL, adapter]
    assert all(m.status == "READY" and m.source == "hugging_face" and m.inference_framework == "vllm"
               for m in listed)
    assert [m.model_name for m in listed] == [MODEL, MODEL]
    openai = OpenAI(base_url=f"{le_server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    assert [m.id for m in openai.models.list().data] == [m.name for m in listed]
    assert le.Model.get(MODEL).name == MODEL
    # An absolute path: the route takes slashes, and the client's urljoin drops the leading one.
    assert le.Model.get(adapter).name == adapter and le.Model.get(adapter).model_name == MODEL
    with pytest.raises(le.errors.NotFoundError, match="no-such-model"):
        le.Model.get("no-such-model")


def test_unknown_model_is_the_clients_not_found_error(le):
    with pytest.raises(le.errors.NotFoundError, match="no-such-model"):
        le.Completion.create(model="no-such-model", prompt=PROMPT, max_new_tokens=2)
    with pytest.raises(le.errors.NotFoundError):
        list(le.Completion.create(model="no-such-model", prompt=PROMPT, max_new_tokens=2, stream=True))


def test_bad_input_is_400_with_detail(le, le_server):
    with pytest.raises(le.errors.BadRequestError, match="max_new_tokens"):
        le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=0)
    with pytest.raises(le.errors.BadRequestError, match="guided"):
        le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=2, guided_regex="a+", guided_choice=["a"])
    with pytest.raises(le.errors.BadRequestError, match="context length"):
        list(le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=10**6, stream=True))
    url = f"{le_server.base_url}/v1/llm/completions-sync"
    good = {"prompt": PROMPT, "max_new_tokens": 2, "temperature": 0}
    cases = [
        ({"model_endpoint_name": MODEL}, {**good, "temperature": 1.5}, "temperature"),  # LLM Engine: [0, 1]
        ({"model_endpoint_name": MODEL}, {**good, "top_p": 0}, "top_p"),
        ({"model_endpoint_name": MODEL}, {**good, "presence_penalty": -1}, "presence_penalty"),
        ({"model_endpoint_name": MODEL}, {"prompt": PROMPT, "temperature": 0}, "max_new_tokens"),
        ({"model_endpoint_name": MODEL}, {**good, "prompt": ""}, "empty"),
        ({}, good, "model_endpoint_name"),
        # A constraint the compiler rejects: its message, as a 400 (issue 4).
        ({"model_endpoint_name": MODEL}, {**good, "guided_regex": "([a-z"}, "regex"),
        ({"model_endpoint_name": MODEL}, {**good, "guided_json": {"type": "no-such-type"}}, "no-such-type"),
    ]
    for params, body, word in cases:
        answer = httpx.post(url, params=params, json=body, timeout=60)
        assert answer.status_code == 400 and word in answer.json()["detail"], (body, answer.text)
    answer = httpx.post(url, params={"model_endpoint_name": MODEL}, content=b'{"prompt": ',
                        headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 400 and "Invalid JSON" in answer.json()["detail"]
    answer = httpx.get(f"{le_server.base_url}/v1/llm/no-such-route", timeout=60)
    assert answer.status_code == 404 and set(answer.json()) == {"detail"}


def test_an_error_after_the_stream_started_is_an_error_event(le, le_server, llm):
    """The route's event generator, fed one real output then a failing engine stream."""
    done = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    completion = done.outputs[0]
    first = dataclasses.replace(done, finished=False, outputs=[dataclasses.replace(
        completion, token_ids=completion.token_ids[:1], text=llm.get_tokenizer().decode(completion.token_ids[:1]),
        finish_reason=None)])

    async def failing():  # first_then_rest's shape: the first output, then the engine fails
        yield first
        raise RuntimeError("engine step failed: out of memory")

    async def events() -> list[str]:
        serving = LLMEngineServing(le_server.engine, ServerMetrics())
        return [e async for e in serving._events(failing(), SamplingParams(), "req-1", SimpleNamespace(scope={}))]

    lines = asyncio.run(events())
    assert len(lines) == 2 and all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    chunks = [le.CompletionStreamResponse.parse_obj(json.loads(line[len("data: "):])) for line in lines]
    assert chunks[0].output.text == first.outputs[0].text and not chunks[0].output.finished
    assert chunks[1].output is None and chunks[1].request_id == "req-1"
    assert chunks[1].error.status_code == 500 and "out of memory" in chunks[1].error.content.error


def test_split_text_gives_each_token_its_text_or_the_last_all_of_it():
    assert split_text(" Paris.", [" Paris", "."]) == [" Paris", "."]
    assert split_text("", [" Par"]) == [""]  # held back: it might become a stop sequence
    assert split_text(" Paris", [" Par", "is", "."]) == ["", "", " Paris"]  # a stop sequence cut the text
    assert split_text("", []) == []


# ---------------------------------------------------------------------------
# loomlm.Completion: the same answers as the real client


@pytest.mark.parametrize("kwargs", [
    {},
    {"return_token_log_probs": True},
    {"stop_sequences": ["answer"], "include_stop_str_in_output": True},
    {"guided_choice": ["Paris", "Lyon"]},
])
def test_loomlm_completion_matches_the_llmengine_client(le, le_server, kwargs):
    call = {"model": MODEL, "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0, **kwargs}
    expected = le.Completion.create(**call)
    response = loomlm.Completion.create(**call, base_url=le_server.base_url)
    assert without_request_id(response) == without_request_id(expected)
    assert response.output.text == expected.output.text
    assert response.output.num_completion_tokens == expected.output.num_completion_tokens
    chunks = list(loomlm.Completion.create(**call, stream=True, base_url=le_server.base_url))
    expected_chunks = list(le.Completion.create(**call, stream=True))
    assert [without_request_id(c) for c in chunks] == [without_request_id(c) for c in expected_chunks]


def test_loomlm_acreate_matches_the_llmengine_client(le, le_server):
    call = {"model": MODEL, "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0, "return_token_log_probs": True,
            "stop_sequences": ["answer"]}

    async def run(create, **kwargs):
        response = await create(**call, **kwargs)
        stream = await create(**call, stream=True, **kwargs)
        return without_request_id(response), [without_request_id(chunk) async for chunk in stream]

    expected = asyncio.run(run(le.Completion.acreate))
    assert asyncio.run(run(loomlm.Completion.acreate, base_url=le_server.base_url)) == expected
    assert "".join(chunk["output"]["text"] for chunk in expected[1]) == expected[0]["output"]["text"]


def test_loomlm_completion_base_url_from_env_and_errors(le_server, monkeypatch):
    monkeypatch.setenv("LOOMLM_BASE_URL", le_server.base_url)
    response = loomlm.Completion.create(MODEL, PROMPT, max_new_tokens=2, temperature=0)
    assert response.output.num_completion_tokens == 2 and json.loads(response.json())["output"]["text"]
    with pytest.raises(NotFoundError, match="no-such-model") as err:
        loomlm.Completion.create("no-such-model", PROMPT, max_new_tokens=2)
    assert err.value.status_code == 404 and set(err.value.payload) == {"detail"}
    with pytest.raises(NotFoundError):
        list(loomlm.Completion.create("no-such-model", PROMPT, max_new_tokens=2, stream=True))
    with pytest.raises(BadRequestError, match="max_new_tokens"):
        loomlm.Completion.create(MODEL, PROMPT, max_new_tokens=0)
    with pytest.raises(ValidationError, match="temperature"):  # LLM Engine's limits, checked before sending
        loomlm.Completion.create(MODEL, PROMPT, temperature=1.5)
    with pytest.raises(TypeError, match="no_such_parameter"):
        loomlm.Completion.create(MODEL, PROMPT, no_such_parameter=1)


def test_llmengine_dropin_reads_llm_engines_variables_and_names(le, le_server, adapter, monkeypatch):
    """`import loomlm.llmengine as llmengine` code: the server from LLM_ENGINE_BASE_PATH and the key
    from SCALE_API_KEY (LLM Engine's own variables), LLM Engine's names for results and errors."""
    import loomlm.llmengine as ours
    from loomlm.server.app import build_app

    monkeypatch.delenv("LOOMLM_BASE_URL", raising=False)
    monkeypatch.delenv("LOOMLM_API_KEY", raising=False)
    monkeypatch.setenv("LLM_ENGINE_BASE_PATH", le_server.base_url + "/")
    kwargs = {"prompt": PROMPT, "max_new_tokens": 6, "temperature": 0}
    mine = ours.Completion.create(model=MODEL, **kwargs)
    assert isinstance(mine, ours.CompletionSyncResponse)
    assert mine.output.text == le.Completion.create(model=MODEL, **kwargs).output.text
    assert [m.name for m in ours.Model.list().model_endpoints] == [MODEL, adapter]
    assert ours.Model.get(MODEL).name == MODEL
    with pytest.raises(ours.errors.NotFoundError):
        ours.Model.get("no-such-model")
    with pytest.raises(NotImplementedError):
        ours.Model.create(name="x", model="y")
    # A server that wants a key: SCALE_API_KEY is sent, a wrong one is LLM Engine's UnauthorizedError.
    guarded = build_app(le_server.engine, api_keys=["s3cret"])
    with serve_app(guarded, le_server.engine) as locked:
        monkeypatch.setenv("LLM_ENGINE_BASE_PATH", locked.base_url + "/")
        monkeypatch.setenv("SCALE_API_KEY", "wrong")
        with pytest.raises(ours.errors.UnauthorizedError):
            ours.Completion.create(model=MODEL, **kwargs)
        monkeypatch.setenv("SCALE_API_KEY", "s3cret")
        assert ours.Completion.create(model=MODEL, **kwargs).output.text == mine.output.text
    for name in ("BadRequestError", "NotFoundError", "RateLimitExceededError", "ServerError", "UnauthorizedError",
                 "UnknownError"):
        assert hasattr(le.errors, name) and hasattr(ours.errors, name)
    from loomlm.client.errors import parse_error

    assert isinstance(parse_error(503, {"detail": "down"}), ours.errors.ServerError)


# ---------------------------------------------------------------------------
# The model zoo from the command line


def test_loomlm_models_lists_the_zoo():
    from loomlm.models.zoo import list_models

    script = Path(sys.executable).with_name("loomlm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "loomlm.cli"]
    result = subprocess.run([*command, "models"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [entry.alias for entry in list_models()]
    assert "(default)" in lines[0] and "installed" in lines[0]
