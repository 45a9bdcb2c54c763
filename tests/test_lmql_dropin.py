"""`import loomlm.lmql as lmql`: LMQL's Generations API names, signatures and ScoringResult
semantics (lmql 0.7.3 `lmql.api`), on loomlm's engine, against loomlm's own API on the same model."""

from __future__ import annotations

import numpy as np
import pytest

import loomlm
import loomlm.lmql as lmql
from loomlm.models.zoo import DEFAULT_MODEL

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def handle():
    return lmql.model(DEFAULT_MODEL)


def test_positional_model_and_handles(handle):
    expected = loomlm.generate_sync(PROMPT, 4, model=DEFAULT_MODEL)
    assert lmql.generate_sync(PROMPT, 4, handle) == expected  # lmql's (prompt, max_tokens, model)
    assert lmql.generate_sync(PROMPT, 4, DEFAULT_MODEL) == expected
    assert lmql.model(handle) is handle and lmql.LLM.from_descriptor(handle) is handle
    assert handle.generate_sync(PROMPT, max_tokens=4) == expected
    sampled = lmql.generate_sync(PROMPT, 4, handle, decoder="sample", n=2, seed=1, temperature=0.7)
    assert isinstance(sampled, list) and len(sampled) == 2


def test_kwargs_lmql_passes_are_ignored_with_a_warning(handle):
    expected = lmql.generate_sync(PROMPT, 3, handle)
    with pytest.warns(UserWarning, match="chunksize"):
        assert lmql.generate_sync(PROMPT, 3, handle, chunksize=4) == expected
    with pytest.warns(UserWarning, match="verbose"):
        lmql.score_sync(PROMPT, [" Paris"], handle, verbose=True)


def test_models_load_lazily_and_the_default_comes_from_lmqls_variable(monkeypatch):
    missing = lmql.model("no-such-model-alias")  # lmql loads on first use, not here
    with pytest.raises(ValueError):
        missing.generate_sync(PROMPT, 2)
    lmql.set_default_model(None)
    monkeypatch.setenv("LMQL_DEFAULT_MODEL", "another-missing-alias")
    with pytest.raises(ValueError, match="another-missing-alias"):
        lmql.generate_sync(PROMPT, 2)
    monkeypatch.setenv("LMQL_DEFAULT_MODEL", DEFAULT_MODEL)
    assert lmql.generate_sync(PROMPT, 3) == loomlm.generate_sync(PROMPT, 3, model=DEFAULT_MODEL)


def test_scoring_result_aggregates_over_prompt_and_value_as_lmql(handle):
    values = [" Paris", " Berlin in Germany"]
    ours = loomlm.score_sync(PROMPT, values, model=DEFAULT_MODEL)
    result = lmql.score_sync(PROMPT, values, handle)
    assert result.continuations == values and result.num_value_tokens == ours.num_value_tokens
    for seq, ids, full in zip(result.seqs, ours.value_token_ids, ours.full_token_scores):
        assert len(seq) == len(ours.prompt_token_ids) + len(ids)
        # Two scoring calls: the second finds the prompt in the prefix cache, so its chunks (and the
        # quantized kernels' row paths) differ from the first's: equal to float rounding, not bitwise.
        np.testing.assert_allclose(seq.logprobs, np.concatenate([[0.0], full]), rtol=0, atol=1e-4)
    sums = np.array([s.logprobs.sum() for s in result.seqs])
    np.testing.assert_allclose(result.scores("sum"), sums)
    np.testing.assert_allclose(result.scores("mean"), [s.logprobs.mean() for s in result.seqs])
    lengths = np.array([len(s) for s in result.seqs])
    np.testing.assert_allclose(result.scores("normalized"), sums / lengths ** 0.7)
    np.testing.assert_allclose(result.scores("normalized_1", alpha=1.0), sums / lengths)
    assert result.argmax() == ours.argmax("sum")
    np.testing.assert_allclose(result.probs().sum(), 1.0)
    text = str(result)
    assert text.splitlines()[0] == f"lmql.ScoringResult(model='{result.model_identifier}')"
    assert text.splitlines()[1] == f"- Paris: {result.scores()[0]}"  # full precision, as lmql prints
    with pytest.raises(ValueError, match="invalid aggregation"):
        result.scores("max")
