"""Scale LLM Engine's Python client under its own names: code written for scaleapi/llm-engine's
`llmengine` package (`scale-llm-engine`) runs on a loomlm server with `import loomlm.llmengine as
llmengine` (or `from loomlm.llmengine import Completion`).

`Completion.create` / `acreate` and `Model.get` / `list` with LLM Engine's signatures; the server
from `LLM_ENGINE_BASE_PATH` and the key from `SCALE_API_KEY` as LLM Engine's client reads them
(loomlm's `LOOMLM_BASE_URL` / `LOOMLM_API_KEY` first when set); the response types under LLM
Engine's names (`CompletionSyncResponse`, `CompletionStreamResponse`, `CompletionOutput`, ...);
`llmengine.errors` with LLM Engine's exception names (`UnauthorizedError`, `ServerError`,
`BadRequestError`, `NotFoundError`, `RateLimitExceededError`, `UnknownError`). Torch-free.
"""

from __future__ import annotations

import sys
import types as _module_types

from loomlm.client.completion import Completion
from loomlm.client.errors import AuthenticationError as UnauthorizedError
from loomlm.client.errors import (
    BadRequestError,
    NotFoundError,
    RateLimitExceededError,
    ServerError,
    UnknownError,
    ValidationError,
    parse_error,
)
from loomlm.client.model import Model
from loomlm.protocol.llmengine import (
    CompletionOutput,
    CompletionStreamOutput,
    GetLLMEndpointResponse,
    ListLLMEndpointsResponse,
)
from loomlm.protocol.llmengine import (
    CompletionStreamV1Response as CompletionStreamResponse,
)
from loomlm.protocol.llmengine import CompletionSyncV1Response as CompletionSyncResponse

CompletionStreamV1Response = CompletionStreamResponse
CompletionSyncV1Response = CompletionSyncResponse

# `llmengine.errors`, as a submodule of this one.
errors = _module_types.ModuleType(f"{__name__}.errors", "LLM Engine's exception names (see loomlm.llmengine).")
for _name, _value in (("BadRequestError", BadRequestError), ("NotFoundError", NotFoundError),
                      ("RateLimitExceededError", RateLimitExceededError), ("ServerError", ServerError),
                      ("UnauthorizedError", UnauthorizedError), ("UnknownError", UnknownError),
                      ("ValidationError", ValidationError), ("parse_error", parse_error)):
    setattr(errors, _name, _value)
sys.modules[errors.__name__] = errors

__all__ = [
    "Completion",
    "CompletionOutput",
    "CompletionStreamOutput",
    "CompletionStreamResponse",
    "CompletionStreamV1Response",
    "CompletionSyncResponse",
    "CompletionSyncV1Response",
    "GetLLMEndpointResponse",
    "ListLLMEndpointsResponse",
    "Model",
    "errors",
]
