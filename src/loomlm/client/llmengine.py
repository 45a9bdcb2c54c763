"""Scale LLM Engine's completion API in the clients' shared core: the request a
`Completion.create` / `acreate` call sends, its client-side validation, and the parsing of answers.

Source: scaleapi/llm-engine `clients/python/llmengine/completion.py` (the paths, the
`model_endpoint_name` query parameter) and `data_types/completion.py` (the bodies and their
limits); ../shared/specs/llmengine.md. The wire models are `loomlm.protocol.llmengine`'s,
shared with the server. `completion.Completion` calls these functions for both its sync and
async calls; the transports (`transport.py`) do the I/O, `core.py` turns error answers into
typed exceptions (by status; the message from LLM Engine's `{"detail"}`).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlencode

import pydantic

from loomlm.client.core import ApiRequest, describe, validated
from loomlm.client.errors import ValidationError
from loomlm.protocol.llmengine import (
    CompletionStreamV1Response,
    CompletionSyncV1Response,
    CompletionV1Request,
)

COMPLETIONS_SYNC_PATH = "v1/llm/completions-sync"
COMPLETIONS_STREAM_PATH = "v1/llm/completions-stream"

# Where `Completion` finds the server and its key when the call names neither: loomlm's
# variables, then LLM Engine's own (its client's `get_base_path` / `get_api_key`).
BASE_URL_ENV = "LOOMLM_BASE_URL"
API_KEY_ENV = "LOOMLM_API_KEY"
LLMENGINE_BASE_URL_ENV = "LLM_ENGINE_BASE_PATH"
LLMENGINE_API_KEY_ENV = "SCALE_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"  # `loomlm serve`'s default address


def resolve_base_url(base_url: str | None) -> str:
    """`base_url`, else `$LOOMLM_BASE_URL`, else `$LLM_ENGINE_BASE_PATH`, else `DEFAULT_BASE_URL`:
    the server's root (the `/v1/llm/...` paths are appended to it)."""
    return base_url or os.environ.get(BASE_URL_ENV) or os.environ.get(LLMENGINE_BASE_URL_ENV) or DEFAULT_BASE_URL


def request_headers_for(api_key: str | None, request_headers: dict[str, str] | None) -> dict[str, str]:
    """The headers of a call: `Authorization: Bearer <api_key, else $LOOMLM_API_KEY, else
    $SCALE_API_KEY>` when there is a key, then `request_headers` (which win, e.g. to send
    another `Authorization`)."""
    key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or os.environ.get(LLMENGINE_API_KEY_ENV))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return {**headers, **(request_headers or {})}


def completion_request(model: str, *, stream: bool, **fields: Any) -> ApiRequest:
    """The `POST <base_url>/v1/llm/completions-sync` (or `-stream`) call, `?model_endpoint_name=<model>`.

    `fields` are `CompletionV1Request` fields by name (prompt, max_new_tokens, temperature,
    stop_sequences, ...); unset (None) ones are left out of the body.

    Raises:
        ValidationError: an empty model name, or a field of the wrong type or out of LLM
            Engine's range (temperature in [0, 1], penalties in [0, 2], top_k >= -1, top_p in
            (0, 1]); the LLM Engine client raises pydantic's error for these.
        TypeError: an unknown field name (a programming error in the caller).
    """
    unknown = fields.keys() - CompletionV1Request.model_fields.keys()
    if unknown:
        raise TypeError(f"unknown completion parameters: {sorted(unknown)}")
    if not model:
        raise ValidationError("`model` cannot be empty")
    try:
        body = CompletionV1Request.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise ValidationError(describe(exc)) from exc
    path = COMPLETIONS_STREAM_PATH if stream else COMPLETIONS_SYNC_PATH
    query = urlencode({"model_endpoint_name": model})
    return ApiRequest("POST", f"{path}?{query}", body.model_dump(mode="json", exclude_none=True))


def parse_sync_response(payload: Any) -> CompletionSyncV1Response:
    """The `CompletionSyncV1Response` of a completions-sync answer.

    Raises:
        UnknownError: the payload is not one.
    """
    return validated(CompletionSyncV1Response, payload, 200)


def parse_stream_event(event: Any, status_code: int = 200) -> CompletionStreamV1Response:
    """The `CompletionStreamV1Response` of one stream event's JSON. An error event (`error` set,
    `output` null) is returned as it is, as the LLM Engine client returns it, not raised.

    Raises:
        UnknownError: the event is not a stream response.
    """
    return validated(CompletionStreamV1Response, event, status_code)

