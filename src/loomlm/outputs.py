"""Request results, with vLLM's `RequestOutput` / `CompletionOutput` field names.

Source: vLLM `vllm/outputs.py`; see ../shared/specs/vllm-openai.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """One token's log probability (natural log), its rank (1 = most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# JSON has no -inf: every API face clamps logprobs here (vLLM's OpenAI server uses -9999.0).
MIN_JSON_LOGPROB = -9999.0


def json_logprob(logprob: float) -> float:
    """`logprob` (natural log), clamped at MIN_JSON_LOGPROB so that -inf never reaches JSON."""
    return max(float(logprob), MIN_JSON_LOGPROB)


@dataclass
class RequestMetrics:
    """Wall-clock times (seconds since the epoch) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    """One completion of a request.

    Attributes:
        index: position of this completion among the request's `n`.
        text: generated text (stop string removed unless asked to keep it).
        token_ids: generated token ids, including a final EOS / stop token.
        cumulative_logprob: sum of the sampled tokens' logprobs (None unless logprobs were requested).
        logprobs: per generated token, {token_id: Logprob} (None unless requested).
        finish_reason: "stop" (EOS, stop token or stop string), "length", "abort", or None while running.
        stop_reason: the stop string or stop token id that ended it; None for EOS or length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its `n` completions so far.

    `finished` is True once every completion has a finish_reason.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    lora_request: Any = None
    num_cached_tokens: int = 0
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict | None = field(default=None, repr=False)


@dataclass
class EmbeddingOutput:
    """One prompt's embedding (vLLM's `EmbeddingOutput`): `embedding` [hidden_size] floats."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """The result of an embedding request (vLLM's `EmbeddingRequestOutput`, a `PoolingRequestOutput`).

    `outputs.embedding` is empty when the request was aborted before its prompt was prefilled.
    """

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool
