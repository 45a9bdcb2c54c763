"""Continuation scoring: the log probability of each value after a shared prompt, on the engine.

Source: LMQL's `model.score` / `ScoringResult` (`lmql/api/scoring.py`);
../shared/specs/lmql-generations.md. As LMQL does, the prompt and every value are
tokenized separately (values without special tokens) and their ids concatenated.

On the engine (`score_on_engine`) the prompt is prefilled once, then every
`prompt + value` runs in one batch with `prompt_logprobs_from = len(prompt)`, which
lets the prefix cache serve the prompt's full KV blocks: each continuation computes
only its last partial prompt block and its own tokens (`num_cached_tokens` says how
many it reused). Logprobs are the model's (fp32 on CPU), natural log.

Aggregation differs from LMQL on purpose: LMQL aggregates over the whole sequence,
prompt included, which makes `mean` and `normalized` depend on the prompt's length
and dilutes the differences between values; here every aggregate is over the value's
tokens only (`sum` is the same either way up to a constant shared by all values, so
`argmax("sum")` and `logprobs("sum")` agree with LMQL's).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loomlm.outputs import Logprob, RequestOutput
from loomlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine
    from loomlm.lora.request import LoRARequest

AGGREGATIONS = ("sum", "mean", "normalized")


class ScoreRanking:
    """The values ranked by `scores(agg, alpha=...)`, one per continuation; shared by this module's
    ScoringResult and `loomlm.lmql.ScoringResult`, which aggregate differently."""

    continuations: list[str]

    def logprobs(self, agg: str = "sum", alpha: float = 0.7) -> np.ndarray:
        """log_softmax of `scores(agg)`: the values' log probabilities relative to each other,
        shape [len(continuations)]."""
        scores = self.scores(agg, alpha=alpha)
        shifted = scores - scores.max()
        return shifted - np.log(np.exp(shifted).sum())

    def probs(self, agg: str = "sum", alpha: float = 0.7) -> np.ndarray:
        """softmax of `scores(agg)`, shape [len(continuations)] (sums to 1)."""
        return np.exp(self.logprobs(agg, alpha))

    def argmax(self, agg: str = "sum", alpha: float = 0.7) -> str:
        """The continuation with the highest `scores(agg)` (the first one on ties)."""
        return self.continuations[int(self.scores(agg, alpha=alpha).argmax())]


@dataclass(frozen=True, eq=False)
class ScoringResult(ScoreRanking):
    """The scores of `continuations` (the values) after `prompt`, from `model_identifier`.

    Attributes:
        prompt: the prompt text.
        continuations: the values, in the order given.
        model_identifier: the model that scored them (its served name).
        prompt_token_ids: the prompt's token ids.
        value_token_ids: per value, its token ids (tokenized on its own, no special tokens).
        prompt_token_scores: logprobs of prompt tokens 1.. (the first token has no
            context, hence no logprob), shape [len(prompt_token_ids) - 1].
        token_scores: per value, the logprob of each of its tokens, shape [num_value_tokens[i]].
        num_cached_tokens: per value, the prompt tokens served by the prefix cache (0 over
            the OpenAI-compatible route, unknown there).
    """

    prompt: str
    continuations: list[str]
    model_identifier: str
    prompt_token_ids: list[int]
    value_token_ids: list[list[int]]
    prompt_token_scores: np.ndarray
    token_scores: list[np.ndarray]
    num_cached_tokens: list[int]

    @property
    def num_value_tokens(self) -> list[int]:
        """Per value, its number of tokens."""
        return [len(ids) for ids in self.value_token_ids]

    @property
    def full_token_scores(self) -> list[np.ndarray]:
        """Per value, the logprobs of tokens 1.. of the whole sequence prompt + value,
        shape [len(prompt_token_ids) + num_value_tokens[i] - 1]."""
        return [np.concatenate([self.prompt_token_scores, scores]) for scores in self.token_scores]

    def scores(self, agg: str = "sum", alpha: float = 0.7) -> np.ndarray:
        """One score per value, aggregated over the value's tokens, shape [len(continuations)].

        agg: "sum" (the value's log probability), "mean" (per token), or "normalized"
        (sum / num_value_tokens ** alpha, the length normalisation of Wu et al. 2016).
        Raises ValueError for another agg.
        """
        if agg == "sum":
            return np.array([s.sum() for s in self.token_scores])
        if agg == "mean":
            return np.array([s.mean() for s in self.token_scores])
        if agg == "normalized":
            return np.array([s.sum() / len(s) ** alpha for s in self.token_scores])
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {', '.join(AGGREGATIONS)}.")

    def __str__(self) -> str:
        lines = [f"loomlm.ScoringResult(model='{self.model_identifier}')"]
        lines += [f"-{value}: {score:.2f}" for value, score in zip(self.continuations, self.scores())]
        return "\n".join(lines)


def normalize_values(values: str | Sequence[str]) -> list[str]:
    """`values` as a list of non-empty strings. Raises ValueError otherwise (an empty list included)."""
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Sequence):
        raise ValueError(f"values must be a string or a list of strings, got {type(values).__name__}.")  # noqa: TRY004
    values = list(values)
    if not values:
        raise ValueError("values must not be empty: give at least one continuation to score.")
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"every value must be a non-empty string, got {value!r}.")
    return values


def _token_logprob(entry: dict[int, Logprob] | None, token_id: int) -> float:
    assert entry is not None and token_id in entry, "the engine returned no logprob for a scored position"
    return entry[token_id].logprob


async def last_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The final output of a request's stream (asserting it finished)."""
    final = None
    async for final in outputs:
        pass
    assert final is not None and final.finished
    return final


async def score_on_engine(engine: AsyncLLMEngine, prompt: str, values: str | Sequence[str],
                          lora_request: LoRARequest | None = None) -> ScoringResult:
    """Score every value after `prompt` on `engine` (prompt prefilled once, values in one batch).

    Raises ValueError: an empty prompt or values list, a value that tokenizes to nothing, or a
    prompt + value longer than the context window allows (nothing is run then).
    """
    values = normalize_values(values)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt must be a non-empty string (its first token is the context of the first one scored).")
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)

    def encode_all() -> tuple[list[int], list[list[int]]]:
        # Tokenizing (and the context-window checks) before any work, in a worker thread.
        prompt_ids = engine.input_processor.encode(prompt).token_ids
        value_ids = []
        for value in values:
            ids = engine.input_processor.encode(value, add_special_tokens=False).token_ids if value else []
            if not ids:
                raise ValueError(f"value {value!r} has no tokens.")
            engine.input_processor.encode(prompt_ids + ids, params)
            value_ids.append(ids)
        return prompt_ids, value_ids

    prompt_ids, value_ids = await asyncio.to_thread(encode_all)
    # The prompt alone first, so its full blocks are in the cache when the values arrive;
    # it also yields the prompt's own token logprobs.
    prompt_output = await last_output(engine.generate(prompt_ids, params, lora_request=lora_request))
    outputs = await asyncio.gather(*(
        last_output(engine.generate(prompt_ids + ids, params, lora_request=lora_request,
                                    prompt_logprobs_from=len(prompt_ids)))
        for ids in value_ids))
    prompt_scores = [_token_logprob(entry, token) for entry, token in
                     zip(prompt_output.prompt_logprobs[1:], prompt_ids[1:])]
    token_scores = []
    for ids, output in zip(value_ids, outputs):
        entries = output.prompt_logprobs[len(prompt_ids):]
        token_scores.append(np.array([_token_logprob(entry, token) for entry, token in zip(entries, ids, strict=True)]))
    model_identifier = lora_request.lora_name if lora_request is not None else engine.served_model_name
    return ScoringResult(prompt, values, model_identifier, list(prompt_ids), value_ids,
                         np.array(prompt_scores, dtype=np.float64), token_scores,
                         [output.num_cached_tokens for output in outputs])
