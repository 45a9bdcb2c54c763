"""Scale LLM Engine request and response schemas (`/v1/llm/completions-sync`, `-stream`,
`/v1/llm/model-endpoints`).

Source: scaleapi/llm-engine `clients/python/llmengine/data_types` (`CompletionSyncV1Request`,
`CompletionSyncV1Response`, `CompletionStreamV1Response`, `StreamError`,
`GetLLMEndpointResponse`, ...) and the model-engine server's DTOs; see
../shared/specs/llmengine.md. The client's models are pydantic v1; these are pydantic v2 with
the same field names, types and limits, shared by the server (which builds them) and
`loomlm.client` (which validates requests with them and parses answers into them).

Requests check types and LLM Engine's ranges (temperature in [0, 1], penalties in [0, 2],
top_k >= -1, top_p in (0, 1]); unknown fields are ignored, as the real server ignores them.
Torch-free.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _LLMEngineModel(BaseModel):
    """A schema with the LLM Engine client's `.json()` (pydantic v1's), not v2's deprecated one."""

    def json(self, **kwargs: Any) -> str:  # type: ignore[override]
        """This object as JSON text, every field included (None as null), as the LLM Engine
        client's pydantic v1 models write it. `kwargs` are v1's and v2's common ones
        (`exclude_none`, `exclude_unset`, `include`, `exclude`, `by_alias`, `indent`)."""
        return self.model_dump_json(**kwargs)


# ---------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------


class CompletionV1Request(_LLMEngineModel):
    """The body of `POST /v1/llm/completions-sync` and `-stream` (`CompletionSyncV1Request` and
    `CompletionStreamV1Request` have the same fields). The model is the `model_endpoint_name`
    query parameter, not a body field."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    max_new_tokens: int  # the most tokens to generate (>= 1)
    temperature: float = Field(ge=0.0, le=1.0)  # 0 is greedy decoding
    stop_sequences: list[str] | None = None  # the text is cut before the first one generated
    return_token_log_probs: bool | None = False  # add each generated token with its logprob (natural log)
    presence_penalty: float | None = Field(default=None, ge=0.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=0.0, le=2.0)
    top_k: int | None = Field(default=None, ge=-1)  # -1: all tokens
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # 1.0: all tokens
    include_stop_str_in_output: bool | None = None  # keep the stop sequence at the end of the text
    guided_json: dict[str, Any] | None = None  # a JSON schema the output follows
    guided_regex: str | None = None
    guided_choice: list[str] | None = None  # the output is exactly one of these
    guided_grammar: str | None = None  # a context-free grammar (Lark / EBNF)
    skip_special_tokens: bool | None = True


# The client's names for the two bodies.
CompletionSyncV1Request = CompletionV1Request
CompletionStreamV1Request = CompletionV1Request


class TokenOutput(_LLMEngineModel):
    """One generated token: its text and its log probability (natural log)."""

    token: str
    log_prob: float


class CompletionOutput(_LLMEngineModel):
    """The whole completion of a sync request."""

    text: str
    num_prompt_tokens: int | None = None
    num_completion_tokens: int
    tokens: list[TokenOutput] | None = None  # only with return_token_log_probs


class CompletionSyncV1Response(_LLMEngineModel):
    """The answer of `POST /v1/llm/completions-sync` (the client's `CompletionSyncResponse`)."""

    request_id: str
    output: CompletionOutput


class CompletionStreamOutput(_LLMEngineModel):
    """One stream event's output: the text of one token (what it added to the completion)."""

    text: str
    finished: bool  # true on the last event only
    num_prompt_tokens: int | None = None
    num_completion_tokens: int | None = None  # tokens generated so far, this one included
    token: TokenOutput | None = None  # only with return_token_log_probs


class StreamErrorContent(_LLMEngineModel):
    error: str  # the message
    timestamp: str  # when it happened, ISO 8601


class StreamError(_LLMEngineModel):
    """An error met after the stream started (the HTTP status is already 200)."""

    status_code: int
    content: StreamErrorContent


class CompletionStreamV1Response(_LLMEngineModel):
    """One event of `POST /v1/llm/completions-stream` (the client's `CompletionStreamResponse`):
    `output` for a token, or `error` for a failure mid-stream."""

    request_id: str | None = None
    output: CompletionStreamOutput | None = None
    error: StreamError | None = None


# The client's names for the answers.
CompletionSyncResponse = CompletionSyncV1Response
CompletionStreamResponse = CompletionStreamV1Response


# ---------------------------------------------------------------------------
# Model endpoints
# ---------------------------------------------------------------------------

# The client's enums, by value: loomlm reports its models as Hugging Face-format, ready, and
# `vllm` (the engine LLM Engine names whose semantics and parameters loomlm follows).
LLMSource = Literal["hugging_face"]
ModelEndpointStatus = Literal["READY", "UPDATE_PENDING", "UPDATE_IN_PROGRESS", "UPDATE_FAILED", "DELETE_IN_PROGRESS"]
LLMInferenceFramework = Literal["deepspeed", "text_generation_inference", "vllm", "lightllm", "tensorrt_llm"]


class GetLLMEndpointResponse(_LLMEngineModel):
    """One model endpoint: the served base model or a LoRA adapter (`model_name`: its base)."""

    id: str | None = None
    name: str  # what `model_endpoint_name` takes
    model_name: str | None = None  # the base model (itself for the base model)
    source: LLMSource = "hugging_face"
    status: ModelEndpointStatus = "READY"
    inference_framework: LLMInferenceFramework = "vllm"
    inference_framework_tag: str | None = None
    num_shards: int | None = None
    quantize: str | None = None
    spec: dict[str, Any] | None = None
    chat_template_override: str | None = None


class ListLLMEndpointsResponse(_LLMEngineModel):
    """The answer of `GET /v1/llm/model-endpoints`."""

    model_endpoints: list[GetLLMEndpointResponse]
