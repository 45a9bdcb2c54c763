"""loomlm's native continuation-scoring API, `POST /score` (torch-free).

The request names a prompt and the values to score after it; the answer holds, for the
prompt and for each value, the token ids and their logprobs (natural log, clamped at
-9999.0 so that -inf never reaches JSON), which is everything `loomlm.ScoringResult`
is made of: a remote `loomlm.model("http://...")` rebuilds the same result from it.
Prompt and values are tokenized separately and their ids concatenated (LMQL's scoring;
values without special tokens).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ScoreRequest(BaseModel):
    """`POST /score`: score each of `values` after `prompt`.

    `model` is the served model's name or an adapter id (as OpenAI's `model=`); None: the
    served model. An empty values list, an empty value or prompt, or a prompt + value
    beyond the context window is a 400.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str
    values: str | list[str]
    model: str | None = None


class ScoredValue(BaseModel):
    """One value's tokens and their logprobs after the prompt."""

    value: str
    token_ids: list[int]
    logprobs: list[float]  # one per token in token_ids, each given the prompt and the tokens before it
    num_cached_tokens: int  # prompt tokens the prefix cache served for this value


class ScoreUsage(BaseModel):
    prompt_tokens: int  # the prompt's tokens (prefilled once)
    value_tokens: int  # all values' tokens together


class ScoreResponse(BaseModel):
    """The answer of `POST /score`; `values` in the order of the request."""

    object: Literal["score"] = "score"
    model: str  # the model (or adapter) that scored
    prompt_token_ids: list[int]
    prompt_logprobs: list[float]  # of prompt tokens 1.. (the first has no context): len(prompt_token_ids) - 1
    values: list[ScoredValue]
    usage: ScoreUsage
