"""LoRAX / TGI request and response schemas (`/`, `/generate`, `/generate_stream`, `/tokenize`, `/info`).

Source: predibase/lorax `clients/python/lorax/types.py` and `router/src/lib.rs`, and
huggingface/text-generation-inference's `clients/python/text_generation/types.py`;
see ../shared/specs/lorax-tgi.md. One superset of both families' parameters: LoRAX's
adapter fields and `return_k_alternatives`, TGI's `top_n_tokens` and `grammar`.

Requests only check *types* here (every field may be an explicit `null`, which the
clients send for everything unset); value ranges are checked once, by
`loomlm.server.tgi_params` and `SamplingParams`. The response models are shared by the
server (which builds them) and `loomlm.client` (which parses them). Torch-free.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def _omit_none(value: Any) -> bool:
    return value is None


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


class MergedAdaptersSpec(BaseModel):
    """LoRAX's `merged_adapters`: a weighted merge of several adapters, made and cached on first use."""

    model_config = ConfigDict(extra="ignore")

    ids: list[str]
    weights: list[float]
    merge_strategy: str | None = None  # linear | ties | dare_linear | dare_ties (default linear)
    density: float | None = None  # fraction of each delta kept by ties / dare (default 1.0)
    majority_sign_method: str | None = None  # total | frequency (default total)


class GenerateParameters(BaseModel):
    """`parameters` of a generate request; `None` everywhere means "not given"."""

    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = None
    adapter_source: str | None = None  # hub | local | s3 | pbase
    merged_adapters: MergedAdaptersSpec | None = None
    api_token: str | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    ignore_eos_token: bool | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    return_full_text: bool | None = None
    stop: list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    return_k_alternatives: int | None = None
    top_n_tokens: int | None = None
    response_format: dict[str, Any] | None = None  # LoRAX: {"type": "json_object", "schema": {...}}
    grammar: dict[str, Any] | None = None  # TGI: {"type": "json" | "regex", "value": ...}
    apply_chat_template: bool | None = None


class GenerateRequest(BaseModel):
    """The body of `POST /`, `/generate` and `/generate_stream`."""

    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool | None = False


class TokenizeRequest(BaseModel):
    """TGI's `POST /tokenize` body (the vLLM form has `prompt` instead)."""

    model_config = ConfigDict(extra="ignore")

    inputs: str
    add_special_tokens: bool | None = True


class SimpleToken(BaseModel):
    """One token of `/tokenize`'s answer; `start` / `stop` are character offsets in the input."""

    id: int
    text: str
    start: int
    stop: int


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


class FinishReason(str, Enum):
    length = "length"  # max_new_tokens reached
    eos_token = "eos_token"  # the model's end-of-sequence token (or a completed constraint)
    stop_sequence = "stop_sequence"  # one of `stop` was generated
    # The same members under lorax-client's names (`lorax.types.FinishReason`): aliases.
    Length = "length"
    EndOfSequenceToken = "eos_token"
    StopSequence = "stop_sequence"


class InputToken(BaseModel):
    """A prompt token with its logprob (None for the first, which has no context)."""

    id: int
    text: str
    logprob: float | None = None


class AlternativeToken(BaseModel):
    """One of a generated token's k most likely alternatives (LoRAX's return_k_alternatives)."""

    id: int
    text: str
    logprob: float


class Token(BaseModel):
    """A generated token. `logprob` is the natural log of its probability under the model's raw
    next-token distribution; `special` marks tokenizer special tokens (skip them when joining)."""

    id: int
    text: str
    logprob: float | None = None
    special: bool = False
    skipped: bool = False
    # LoRAX's return_k_alternatives.
    alternative_tokens: list[AlternativeToken] | None = Field(default=None, exclude_if=_omit_none)


class BestOfSequence(BaseModel):
    """A sequence best_of generated but did not answer with (`details.best_of_sequences`)."""

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = Field(default=None, exclude_if=_omit_none)


class Details(BaseModel):
    """`details` of a non-streamed answer; token logprobs are natural logs."""

    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int = 0
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    # TGI's top_n_tokens: per generated token, the n most likely tokens.
    top_tokens: list[list[Token]] | None = Field(default=None, exclude_if=_omit_none)
    best_of_sequences: list[BestOfSequence] | None = Field(default=None, exclude_if=_omit_none)


class GenerateResponse(BaseModel):
    """The answer of `/generate` (`POST /` wraps it in a one-element list)."""

    generated_text: str
    details: Details | None = Field(default=None, exclude_if=_omit_none)


class StreamDetails(BaseModel):
    """`details` of a stream's last event."""

    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    """One SSE event of a stream: a token; the last event also has the text and details."""

    token: Token
    top_tokens: list[Token] | None = Field(default=None, exclude_if=_omit_none)
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    """LoRAX / TGI's error body; `error_type` is validation | generation | overloaded | incomplete_generation."""

    error: str
    error_type: str


class Info(BaseModel):
    """`GET /info`: the served model and the router's limits (LoRAX's `Info`)."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_length: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_active_adapters: int
    adapter_source: str = "hub"
    loaded_adapters: list[str] = Field(default_factory=list)
    router: str = "loomlm"
    version: str
    sha: str | None = None
    docker_label: str | None = None
    request_logger_url: str | None = None
    eager_prefill: bool = False
