"""Continuation scoring (`Model.score`, `ScoringResult`, `POST /score`): parity with
transformers, prefix-cache reuse, local vs remote, the OpenAI echo route, bad input."""

from __future__ import annotations

from collections.abc import Iterator

import asyncio

import httpx
import numpy as np
import pytest
import torch

import loomlm
from loomlm.models.zoo import DEFAULT_MODEL

# 40+ tokens: the prompt fills full KV blocks (16 tokens) that the continuations reuse.
PROMPT = ("Review: The plot was thin, the acting wooden and the soundtrack far too loud. "
          "I left the cinema halfway through and asked for my money back.\nSentiment:")
VALUES = [" negative", " positive", " neutral", " terrible, a waste of an evening"]
BATCH_OF_20 = [" " + word for word in (
    "bad", "good", "awful", "great", "boring", "fun", "sad", "happy", "dull", "bright",
    "mixed feelings", "not my taste", "a masterpiece", "forgettable", "loud", "thin", "wooden",
    "so-so", "disappointing", "excellent")]


@pytest.fixture(scope="module")
def model() -> Iterator[loomlm.Model]:
    with loomlm.model(DEFAULT_MODEL) as handle:
        yield handle


def reference_value_scores(reference, tokenizer, prompt: str, value: str) -> np.ndarray:
    """transformers' log_softmax at each value token, prompt and value tokenized separately (as LMQL)."""
    ids = tokenizer.encode(prompt) + tokenizer.encode(value, add_special_tokens=False)
    num_value = len(tokenizer.encode(value, add_special_tokens=False))
    with torch.inference_mode():
        logprobs = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return np.array([logprobs[i - 1, ids[i]].item() for i in range(len(ids) - num_value, len(ids))])


def test_scores_equal_transformers_and_reuse_the_prompt_blocks(model, reference):
    result = model.score_sync(PROMPT, VALUES)
    tokenizer = model.engine.tokenizer
    assert result.continuations == VALUES and result.prompt == PROMPT
    assert result.model_identifier == DEFAULT_MODEL
    assert result.prompt_token_ids == tokenizer.encode(PROMPT)
    prompt_len = len(result.prompt_token_ids)
    assert result.num_value_tokens == [len(tokenizer.encode(v, add_special_tokens=False)) for v in VALUES]
    assert result.num_value_tokens[-1] > 1
    for value, scores in zip(VALUES, result.token_scores, strict=True):
        np.testing.assert_allclose(scores, reference_value_scores(reference, tokenizer, PROMPT, value), atol=1e-4)
    # Every continuation reused the prompt's full blocks but the one holding its last token.
    assert result.num_cached_tokens == [(prompt_len - 1) // 16 * 16] * len(VALUES)
    assert min(result.num_cached_tokens) >= 32
    # full_token_scores: prompt tokens 1.. then the value's, all equal to transformers' too.
    ids = result.prompt_token_ids + result.value_token_ids[0]
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    full = result.full_token_scores[0]
    assert full.shape == (len(ids) - 1,)
    np.testing.assert_allclose(full, [ref[i - 1, ids[i]].item() for i in range(1, len(ids))], atol=1e-4)
    np.testing.assert_array_equal(full[prompt_len - 1:], result.token_scores[0])


def test_a_batch_of_20_values_equals_transformers(model, reference):
    result = asyncio.run(model.score(PROMPT, BATCH_OF_20))
    tokenizer = model.engine.tokenizer
    assert len(result.token_scores) == 20
    sums = result.scores("sum")
    expected = [reference_value_scores(reference, tokenizer, PROMPT, value).sum() for value in BATCH_OF_20]
    np.testing.assert_allclose(sums, expected, atol=1e-4)
    assert all(cached > 0 for cached in result.num_cached_tokens)


def test_aggregations_and_str(model):
    result = model.score_sync("The capital of France is", [" Paris", " the city of London"])
    token_scores = result.token_scores
    lengths = np.array(result.num_value_tokens)
    assert lengths[1] > 1
    sums = np.array([s.sum() for s in token_scores])
    np.testing.assert_allclose(result.scores(), sums)
    np.testing.assert_allclose(result.scores("mean"), sums / lengths)
    np.testing.assert_allclose(result.scores("normalized"), sums / lengths ** 0.7)
    np.testing.assert_allclose(result.scores("normalized", alpha=1.0), sums / lengths)
    logprobs = result.logprobs()
    np.testing.assert_allclose(logprobs, sums - np.log(np.exp(sums).sum()))
    np.testing.assert_allclose(result.probs().sum(), 1.0)
    assert result.argmax() == " Paris"
    assert result.argmax("mean") == result.continuations[int(np.argmax(sums / lengths))]
    assert str(result).splitlines() == [
        f"loomlm.ScoringResult(model='{DEFAULT_MODEL}')",
        f"- Paris: {sums[0]:.2f}",
        f"- the city of London: {sums[1]:.2f}",
    ]
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        result.scores("max")


def test_a_single_value_string_is_one_value(model):
    result = model.score_sync("The capital of France is", " Paris")
    assert result.continuations == [" Paris"] and len(result.scores()) == 1


@pytest.mark.parametrize(("prompt", "values", "message"), [
    ("Hello", [], "values must not be empty"),
    ("Hello", [" a", ""], "every value must be a non-empty string"),
    ("Hello", [" a", 3], "every value must be a non-empty string"),
    ("", [" a"], "prompt must be a non-empty string"),
    ("Hello", " word" * 9000, "maximum context length"),
])
def test_bad_input_is_a_value_error(model, prompt, values, message):
    with pytest.raises(ValueError, match=message):
        model.score_sync(prompt, values)


# ---------------------------------------------------------------------------------------
# Over HTTP: the native POST /score, a remote handle, and the OpenAI echo route


def test_remote_handle_scores_like_the_local_one(model, server):
    local = model.score_sync(PROMPT, VALUES)
    remote = loomlm.model(server.base_url).score_sync(PROMPT, VALUES)
    assert remote.model_identifier == local.model_identifier == DEFAULT_MODEL
    assert remote.prompt_token_ids == local.prompt_token_ids
    assert remote.value_token_ids == local.value_token_ids
    np.testing.assert_allclose(remote.prompt_token_scores, local.prompt_token_scores, atol=1e-4)
    for r, loc in zip(remote.token_scores, local.token_scores, strict=True):
        np.testing.assert_allclose(r, loc, atol=1e-4)
    assert all(cached > 0 for cached in remote.num_cached_tokens)
    assert str(remote) == str(local)


def test_score_route_body(server):
    response = httpx.post(f"{server.base_url}/score", json={"prompt": PROMPT, "values": [" yes", " no"]},
                          timeout=120)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "score" and body["model"] == DEFAULT_MODEL
    prompt_len = len(body["prompt_token_ids"])
    assert len(body["prompt_logprobs"]) == prompt_len - 1
    assert [v["value"] for v in body["values"]] == [" yes", " no"]
    for value in body["values"]:
        assert len(value["logprobs"]) == len(value["token_ids"]) >= 1
        assert all(lp <= 0 for lp in value["logprobs"])
    assert body["usage"] == {"prompt_tokens": prompt_len,
                             "value_tokens": sum(len(v["token_ids"]) for v in body["values"])}


def test_openai_echo_route_scores_like_the_score_route(server):
    """lm-evaluation-harness's call: the prompt + value token ids, echo, max_tokens 0, logprobs 1."""
    tokenizer = server.tokenizer
    scored = httpx.post(f"{server.base_url}/score", json={"prompt": PROMPT, "values": VALUES}, timeout=120).json()
    for value in scored["values"]:
        ids = scored["prompt_token_ids"] + value["token_ids"]
        assert ids == tokenizer.encode(PROMPT) + tokenizer.encode(value["value"], add_special_tokens=False)
        response = httpx.post(f"{server.base_url}/v1/completions", timeout=120, json={
            "model": DEFAULT_MODEL, "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0})
        assert response.status_code == 200, response.text
        logprobs = response.json()["choices"][0]["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids)
        echoed = logprobs["token_logprobs"][-len(value["token_ids"]):]
        np.testing.assert_allclose(echoed, value["logprobs"], atol=1e-4)
        np.testing.assert_allclose(logprobs["token_logprobs"][1:len(scored["prompt_token_ids"])],
                                   scored["prompt_logprobs"], atol=1e-4)


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"prompt": "Hello", "values": []}, 400, "values must not be empty"),
    ({"prompt": "", "values": [" a"]}, 400, "prompt must be a non-empty string"),
    ({"prompt": "Hello"}, 400, "values"),
    ({"prompt": "Hello", "values": [" a"], "model": "no-such-model"}, 404, "does not exist"),
])
def test_score_route_errors_use_the_openai_format(server, body, status, message):
    response = httpx.post(f"{server.base_url}/score", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status


def test_remote_errors_are_value_errors(server):
    remote = loomlm.model(server.base_url)
    with pytest.raises(ValueError, match="values must not be empty"):
        remote.score_sync("Hello", [])  # checked before any request
    with pytest.raises(ValueError, match="404.*does not exist"):
        loomlm.model(server.base_url, model="no-such-model").score_sync("Hello", [" a"])
    with pytest.raises(ValueError, match="400.*maximum context length"):
        remote.score_sync("Hello", " word" * 9000)
