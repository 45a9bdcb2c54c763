"""The OpenAI-compatible server, driven by the official `openai` client against the real engine.

One engine (the default model) and one uvicorn server per module; generations
are short (<= 32 tokens) because the model runs on 2 CPU cores.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families
from server_utils import RunningServer

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def greedy(client: OpenAI) -> openai.types.Completion:
    """The greedy 16-token completion of PROMPT (reference for several tests)."""
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)


def _error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    return body["error"]


# ----------------------------------------------------------------------------- basics


def test_models_lists_served_model(client: OpenAI, server: RunningServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0].model_dump()
    assert card["object"] == "model" and card["owned_by"] == "loomlm"
    assert card["max_model_len"] == server.engine.max_model_len
    assert isinstance(card["created"], int)


def test_health(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/health")
    assert response.status_code == 200


# ----------------------------------------------------------------------------- completions


def test_completion_shape_and_usage(greedy: openai.types.Completion, server: RunningServer) -> None:
    assert greedy.id.startswith("cmpl-")
    assert greedy.object == "text_completion"
    assert greedy.model == MODEL
    [choice] = greedy.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    assert greedy.usage.prompt_tokens == len(server.tokenizer.encode(PROMPT))
    if choice.finish_reason == "length":
        assert greedy.usage.completion_tokens == 16
    assert greedy.usage.total_tokens == greedy.usage.prompt_tokens + greedy.usage.completion_tokens


def test_completion_stream_equals_non_stream(client: OpenAI, greedy: openai.types.Completion) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *text_chunks, usage_chunk = chunks
    assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == greedy.choices[0].text
    finish_reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert finish_reasons[-1] == greedy.choices[0].finish_reason
    assert all(reason is None for reason in finish_reasons[:-1])
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage == greedy.usage


def test_stream_without_include_usage_has_no_usage_chunk(client: OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert chunks and all(c.choices and c.usage is None for c in chunks)


def test_token_id_prompt_equals_text_prompt(
    client: OpenAI, server: RunningServer, greedy: openai.types.Completion
) -> None:
    token_ids = server.tokenizer.encode(PROMPT)
    result = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=16, temperature=0)
    assert result.choices[0].text == greedy.choices[0].text
    assert result.usage.prompt_tokens == len(token_ids)


def test_max_tokens_with_ignore_eos(client: OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 7


def test_stop_string(client: OpenAI) -> None:
    base = (
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    words = base.split()
    assert len(words) >= 3, base
    stop = words[len(words) // 2]
    expected = base[: base.index(stop)]

    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert result.choices[0].text == expected
    assert stop not in result.choices[0].text
    assert result.choices[0].finish_reason == "stop"

    streamed = list(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
        )

    first = sample(1234)
    assert sample(1234) == first
    others = {sample(seed) for seed in (1, 2, 3)}
    assert len(others | {first}) >= 2, "different seeds gave the same text every time"


def test_n_and_prompt_list(client: OpenAI, server: RunningServer, greedy: openai.types.Completion) -> None:
    prompts = [PROMPT, "Once upon a time"]
    result = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=16, temperature=0)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    # Choices are prompt-major: 0-1 belong to PROMPT, 2-3 to the second prompt; greedy choices agree.
    assert result.choices[0].text == result.choices[1].text == greedy.choices[0].text
    assert result.choices[2].text == result.choices[3].text
    assert result.usage.prompt_tokens == sum(len(server.tokenizer.encode(p)) for p in prompts)

    sampled = client.completions.create(
        model=MODEL, prompt=PROMPT, n=2, max_tokens=6, temperature=1.0, seed=5, extra_body={"ignore_eos": True}
    )
    assert len(sampled.choices) == 2
    assert sampled.usage.completion_tokens == 2 * 6


# ----------------------------------------------------------------------------- chat


def test_chat_stream_equals_non_stream(client: OpenAI, server: RunningServer) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    [choice] = full.choices
    assert choice.message.role == "assistant" and choice.message.content
    template = server.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert full.usage.prompt_tokens == len(server.tokenizer.encode(template, add_special_tokens=False))

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    opening, *deltas, usage_chunk = chunks
    assert opening.choices[0].delta.role == "assistant" and opening.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == choice.message.content
    assert deltas[-1].choices[0].finish_reason == choice.finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage == full.usage


def test_chat_max_completion_tokens_alias(client: OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 5


# ----------------------------------------------------------------------------- errors

BAD_COMPLETION_BODIES = {
    "empty prompt": {"prompt": ""},
    "empty prompt list": {"prompt": []},
    "max_tokens 0": {"prompt": PROMPT, "max_tokens": 0},
    "max_tokens negative": {"prompt": PROMPT, "max_tokens": -3},
    "temperature -1": {"prompt": PROMPT, "temperature": -1},
    "top_p 0": {"prompt": PROMPT, "top_p": 0},
    "top_p 1.5": {"prompt": PROMPT, "top_p": 1.5},
    "n 0": {"prompt": PROMPT, "n": 0},
    "max_tokens wrong type": {"prompt": PROMPT, "extra_body": {"max_tokens": "many"}},
    "temperature wrong type": {"prompt": PROMPT, "extra_body": {"temperature": "hot"}},
    "prompt wrong type": {"prompt": PROMPT, "extra_body": {"prompt": {"text": PROMPT}}},
    "token id out of vocabulary": {"prompt": [1, 10**9]},
}


@pytest.mark.parametrize("body", BAD_COMPLETION_BODIES.values(), ids=BAD_COMPLETION_BODIES.keys())
def test_bad_completion_request_is_400(client: OpenAI, body: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, **body)
    error = _error_of(info.value)
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["message"]


def test_prompt_longer_than_context_is_400(client: OpenAI, server: RunningServer) -> None:
    max_model_len = server.engine.max_model_len
    long_prompt = "hello " * (max_model_len + 10)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert "maximum context length" in _error_of(info.value)["message"]

    # A prompt that fits, but not together with max_tokens.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_model_len)
    assert f"maximum context length is {max_model_len} tokens" in _error_of(info.value)["message"]


def test_bad_chat_request_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as info:
        no_role = [{"content": "no role"}]
        client.chat.completions.create(model=MODEL, messages=no_role, max_tokens=4)  # type: ignore[arg-type]
    assert _error_of(info.value)["param"] == "messages"


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    error = _error_of(info.value)
    assert error["type"] == "NotFoundError" and error["code"] == 404
    assert error["message"] == "The model `no-such-model` does not exist."
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)


def test_malformed_json_is_400(server: RunningServer) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        content=b'{"model": "smollm2-135m-instruct", "prompt": ',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == ERROR_KEYS
    assert response.json()["error"]["type"] == "BadRequestError"


def test_server_still_serves_after_bad_requests(client: OpenAI, greedy: openai.types.Completion) -> None:
    for body in BAD_COMPLETION_BODIES.values():
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, **body)
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert result.choices[0].text == greedy.choices[0].text


# ----------------------------------------------------------------------------- concurrency, disconnects, metrics

CONCURRENT_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite book is",
    "To make a cup of tea,",
    "The largest planet in the solar system is",
]


def test_concurrent_requests_equal_sequential(client: OpenAI, server: RunningServer) -> None:
    sequential = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
        for p in CONCURRENT_PROMPTS
    ]

    async def run_all() -> list[str]:
        async with AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300) as aclient:
            results = await asyncio.gather(
                *(
                    aclient.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
                    for p in CONCURRENT_PROMPTS
                )
            )
        return [r.choices[0].text for r in results]

    assert asyncio.run(run_all()) == sequential


def _wait_until_idle(server: RunningServer, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.engine.num_unfinished_requests == 0 and not server.engine.engine.has_unfinished_requests():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_aborts_stream(server: RunningServer) -> None:
    # 256 tokens take well over 5 s on this machine; the abort must end the request long before.
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 256, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        data_lines = [line for line in (next(lines) for _ in range(4)) if line.startswith("data:")]
        assert data_lines
    assert _wait_until_idle(server, timeout_s=5.0), "the engine kept generating for a gone client"


def test_client_disconnect_aborts_non_streamed(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 256, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    assert _wait_until_idle(server, timeout_s=5.0), "the engine kept generating for a gone client"


def _scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_and_tokens(client: OpenAI, server: RunningServer) -> None:
    ok_key = (
        "loomlm_http_requests_total",
        (("method", "POST"), ("route", "/v1/completions"), ("status", "200")),
    )
    bad_key = (
        "loomlm_http_requests_total",
        (("method", "POST"), ("route", "/v1/completions"), ("status", "400")),
    )
    latency_key = (
        "loomlm_http_request_duration_seconds_count",
        (("method", "POST"), ("route", "/v1/completions")),
    )
    before = _scrape(server)
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    after = _scrape(server)

    def delta(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(ok_key) == 1
    assert delta(bad_key) == 1
    assert delta(latency_key) == 2
    assert delta(("loomlm_prompt_tokens_total", ())) == len(server.tokenizer.encode(PROMPT))
    assert delta(("loomlm_generation_tokens_total", ())) == 5
    assert after[("loomlm_requests_running", ())] == 0


def test_metrics_count_prefix_cache_hits(client: OpenAI, server: RunningServer) -> None:
    """A prompt sent twice: the second prefill finds its full blocks in the prefix cache."""
    prompt = "Repeat after me: " + " ".join(f"word{i}" for i in range(40))
    queries, hits = ("loomlm_prefix_cache_queries_total", ()), ("loomlm_prefix_cache_hits_total", ())
    before = _scrape(server)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    after = _scrape(server)
    num_prompt_tokens = len(server.tokenizer.encode(prompt))
    assert after[queries] - before[queries] == 2 * num_prompt_tokens
    assert after[hits] - before[hits] == (num_prompt_tokens - 1) // 16 * 16
    assert 0 < after[("loomlm_prefix_cache_hit_rate", ())] <= 1
