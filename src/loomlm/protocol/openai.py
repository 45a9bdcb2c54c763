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

import importlib.metadata
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loomlm.outputs import MIN_JSON_LOGPROB


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
    # vLLM extra: with --scheduling-policy priority, lower values are scheduled first.
    priority: int = 0
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
    spaces_between_special_tokens: bool | None = True
    logit_bias: dict[str, float] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    use_beam_search: bool | None = False
    length_penalty: float | None = None
    # Structured output: OpenAI's response_format, or vLLM's guided_* fields.
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingRequestFields):
    """`POST /v1/completions`.

    `prompt` is one text, a batch of texts, one token-id prompt, or a batch of
    token-id prompts; each prompt gets `n` choices, indexed `prompt_index * n + i`.
    `max_tokens` defaults to 16 as in OpenAI; an explicit null means "up to the
    context window".
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    # Accepted so that it can be rejected clearly instead of silently ignored.
    suffix: str | None = None


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


class FunctionDefinition(BaseModel):
    """A function the model may call: its name, description and JSON-schema `parameters`."""

    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatCompletionToolsParam(BaseModel):
    """One entry of `tools`: `{"type": "function", "function": {...}}`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(BaseModel):
    name: str


class ChatCompletionNamedToolChoiceParam(BaseModel):
    """`tool_choice` naming one function: `{"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"] = "function"
    function: ChatCompletionNamedFunction


class ChatCompletionRequest(SamplingRequestFields):
    """`POST /v1/chat/completions`.

    `max_completion_tokens` is OpenAI's newer name for `max_tokens` and wins
    when both are given; with neither, generation may run to the context window.
    `tool_choice` left out is "auto" when `tools` are given (vLLM), else "none".
    """

    messages: list[ChatMessage]
    tools: list[ChatCompletionToolsParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChatCompletionNamedToolChoiceParam | None = None
    parallel_tool_calls: bool | None = True
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # vLLM extras for the chat template.
    chat_template: str | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


class UsageInfo(BaseModel):
    """Token counts of one request: prompts counted once each, completions summed over choices."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    """Completions `logprobs`: per token its text, logprob (None for the first prompt token
    when echoed), top alternatives {text: logprob}, and character offset in the choice's text."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float = MIN_JSON_LOGPROB
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    """Chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    content: list[ChatCompletionLogProbsContent] | None = None


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry for one token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    # vLLM extra: the stop string or stop token id that ended the choice.
    stop_reason: int | str | None = None
    # vLLM extra, only when asked for: per prompt token {token_id: logprob} (None for the first).
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = Field(default=None, exclude_if=_omit_none)


def _system_fingerprint() -> str:
    try:
        return f"fp_loomlm_{importlib.metadata.version('loomlm')}"
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "fp_loomlm"


# The model name `text_generation.Client.chat` (TGI's client) hard-codes in its chat requests:
# it selects the served model, and TGI's chunk shape (`TGIDeltaMessage`).
TGI_CLIENT_MODEL = "tgi"

# OpenAI's `system_fingerprint` of chat completions (the backend configuration); TGI's client
# (`text_generation.types.ChatComplete`) requires it as a string.
SYSTEM_FINGERPRINT = _system_fingerprint()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of a streamed completion; `usage` is set on the final usage chunk only."""

    usage: UsageInfo | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call the model made: `{"id", "type": "function", "function": {"name", "arguments"}}`."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    """The assistant's message; `content` None when it only called tools. `reasoning_content`
    (vLLM / DeepSeek's field) appears only with a reasoning parser."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now_s)
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    # vLLM extra, only when asked for.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = Field(default=None, exclude_if=_omit_none)


class DeltaFunctionCall(BaseModel):
    name: str | None = Field(default=None, exclude_if=_omit_none)
    arguments: str | None = Field(default=None, exclude_if=_omit_none)


class DeltaToolCall(BaseModel):
    """A tool-call fragment of a stream, as OpenAI sends them: the first of a call carries its
    `index`, `id`, `type` and function name; the next ones argument text to append."""

    index: int
    id: str | None = Field(default=None, exclude_if=_omit_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_omit_none)
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    """A chat stream delta; unset keys are left out (`{}` on the finishing chunk), as OpenAI does."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)
    reasoning_content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=_omit_none)


class TGIDeltaMessage(BaseModel):
    """A chat stream delta as TGI sends it: `role` and `tool_calls` on every chunk, which TGI's
    client (`text_generation.types.ChoiceDelta`) requires."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage | TGIDeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now_s)
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One served model in `GET /v1/models`; `max_model_len` (tokens) is vLLM's extra field."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now_s)
    owned_by: str = "loomlm"
    max_model_len: int | None = None
    # vLLM's: where the weights come from, and for an adapter the base model it applies to.
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM): a `prompt`, or chat `messages` rendered with the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, exclude_if=_omit_none)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter` body."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter` body (`lora_int_id` accepted, unused: names are unique)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_int_id: int | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
