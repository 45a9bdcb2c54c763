"""OpenAI-compatible request and response schemas (completions, chat, models, errors).

Source: the OpenAI API reference (`/v1/completions`, `/v1/chat/completions`,
`/v1/models`) and vLLM's `vllm/entrypoints/openai/protocol.py` for the extra
sampling fields vLLM accepts in the body (`top_k`, `min_p`, `ignore_eos`, ...);
see ../shared/specs/vllm-openai.md.

Requests only check *types* here; value ranges (temperature >= 0, top_p in
(0, 1], ...) are checked once, by `SamplingParams`, so the server and the
offline API reject the same values with the same messages. Unknown body fields
are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _now_s() -> int:
    """Unix time in whole seconds, OpenAI's `created` unit."""
    return int(time.time())


def _omit_none(value: Any) -> bool:
    return value is None


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    """The body of an OpenAI error: `{"error": {"message", "type", "param", "code"}}`."""

    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class SamplingRequestFields(BaseModel):
    """Body fields shared by completions and chat completions.

    `None` means "not given": the `SamplingParams` default applies.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequestFields):
    """`POST /v1/completions`.

    `prompt` is one text, a batch of texts, one token-id prompt, or a batch of
    token-id prompts; each prompt gets `n` choices, indexed `prompt_index * n + i`.
    `max_tokens` defaults to 16 as in OpenAI; an explicit null means "up to the
    context window".
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    # Accepted so that we can reject them clearly instead of silently ignoring them.
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatContentPart(BaseModel):
    """One part of a multi-part message content; only `{"type": "text"}` parts are served."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat message as sent by the client; extra keys reach the chat template unchanged."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequestFields):
    """`POST /v1/chat/completions`.

    `max_completion_tokens` is OpenAI's newer name for `max_tokens` and wins
    when both are given; with neither, generation may run to the context window.
    """

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    # vLLM extras for the chat template.
    chat_template: str | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


class UsageInfo(BaseModel):
    """Token counts of one request: prompts counted once each, completions summed over choices."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    # vLLM extra: the stop string or stop token id that ended the choice.
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One SSE chunk of a streamed completion; `usage` is set on the final usage chunk only."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """A chat stream delta; unset keys are left out (`{}` on the finishing chunk), as OpenAI does."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One served model in `GET /v1/models`; `max_model_len` (tokens) is vLLM's extra field."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now_s)
    owned_by: str = "loomlm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
