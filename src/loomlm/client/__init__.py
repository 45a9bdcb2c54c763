"""Python clients for a loomlm server: LoRAX-compatible `Client` / `AsyncClient` and Scale LLM
Engine-compatible `Completion`.

`Client` / `AsyncClient` keep the signatures of predibase/lorax's `lorax.Client` /
`lorax.AsyncClient` and return `loomlm.protocol.tgi`'s response models; `Completion` keeps
those of scaleapi/llm-engine's `llmengine.Completion` and returns `loomlm.protocol.llmengine`'s.
Torch-free.

Layout (one concept per file):
    sync_client.py   `Client`: builds the request, calls `SyncTransport`, parses the answer.
    async_client.py  `AsyncClient`: the same, with `AsyncTransport` and `await`.
    generate.py      LoRAX's generate API: request body + client-side validation, answer parsing.
    completion.py    `Completion`: LLM Engine's `create` / `acreate`, on either transport.
    llmengine.py     LLM Engine's completion API: request + client-side validation, answer parsing.
    core.py          API-independent: `ApiRequest`, JSON / error decoding of answers and events.
    transport.py     `SyncTransport` / `AsyncTransport`: httpx and httpx-sse I/O, nothing else.
    errors.py        the typed exceptions and `parse_error` (LoRAX's `lorax.errors`).
"""

from __future__ import annotations

from loomlm.client.async_client import AsyncClient
from loomlm.client.completion import Completion
from loomlm.client.errors import (
    AuthenticationError,
    BadRequestError,
    GenerationError,
    IncompleteGenerationError,
    LoomlmClientError,
    NotFoundError,
    OverloadedError,
    RateLimitExceededError,
    ServerError,
    ShardNotReadyError,
    ShardTimeoutError,
    UnknownError,
    UnprocessableEntityError,
    ValidationError,
)
from loomlm.client.sync_client import Client
from loomlm.protocol.tgi import MergedAdaptersSpec as MergedAdapters

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Completion",
    "GenerationError",
    "IncompleteGenerationError",
    "LoomlmClientError",
    "MergedAdapters",
    "NotFoundError",
    "OverloadedError",
    "RateLimitExceededError",
    "ServerError",
    "ShardNotReadyError",
    "ShardTimeoutError",
    "UnknownError",
    "UnprocessableEntityError",
    "ValidationError",
]
