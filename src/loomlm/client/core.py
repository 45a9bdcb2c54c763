"""The API-independent half of the clients' shared core: what a call sends, and how an
HTTP answer's bytes become a JSON payload or a typed error.

The transports (`transport.py`) only move bytes; every decision about an answer's
content is made here (and, per API, in `generate.py` and `llmengine.py`), once for the
sync and the async client. Nothing here is specific to one API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic

from loomlm.client.errors import LoomlmClientError, UnknownError, parse_error


@dataclass(frozen=True)
class ApiRequest:
    """One HTTP call, as the API modules describe it and the transports perform it."""

    method: str  # "POST", "GET", ...
    path: str  # appended to the client's base_url; "" means base_url itself (LoRAX's `POST /`)
    json_body: dict[str, Any] | None  # sent as the JSON request body; None sends no body


def join_url(base_url: str, path: str) -> str:
    """`base_url` with `path` appended; `base_url` unchanged (no added slash) when `path` is ""."""
    if not path:
        return base_url
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def decode_payload(status_code: int, content: bytes) -> Any:
    """The JSON payload of an answer with HTTP `status_code` and body `content`.

    Raises:
        LoomlmClientError: the typed error of a non-2xx answer (`error_from_answer`).
        UnknownError: the body of a 2xx answer is not JSON (LoRAX's client reports this as a 500).
    """
    if not 200 <= status_code < 300:
        raise error_from_answer(status_code, content)
    try:
        return json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnknownError(f"the server's answer is not JSON ({exc})", 500, {"error": _preview(content)}) from exc


def error_from_answer(status_code: int, content: bytes) -> LoomlmClientError:
    """The typed exception for a non-2xx answer with body `content`.

    A JSON body is read by `errors.parse_error`; any other body (an HTML page from a
    proxy, a plain-text 500) becomes `{"error": <its text>}`, so the status alone still
    picks the exception class.
    """
    try:
        payload = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = {"error": _preview(content)}
    return parse_error(status_code, payload)


def error_from_non_event_stream(status_code: int, headers: Mapping[str, str], content: bytes) -> LoomlmClientError:
    """The error for a 2xx answer (with `headers`) to a stream request that is not an SSE stream."""
    message = f"expected a text/event-stream answer, got {headers.get('content-type', '')!r}"
    return UnknownError(message, status_code, {"error": _preview(content)})


def decode_event(status_code: int, data: str) -> Any:
    """The JSON document carried by one server-sent event's `data` field.

    Raises:
        UnknownError: the event's data is not JSON.
    """
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise UnknownError(f"a stream event is not JSON ({exc})", status_code, {"error": data}) from exc


def _preview(content: bytes, max_chars: int = 2000) -> str:
    """A bounded, always-decodable text of a body, for error messages."""
    return content.decode("utf-8", errors="replace")[:max_chars]


ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


def describe(exc: pydantic.ValidationError) -> str:
    """pydantic's errors as one line: "`top_k`: Input should be a valid integer; ..."."""
    return "; ".join(f"`{'.'.join(str(part) for part in error['loc'])}`: {error['msg']}" for error in exc.errors())


def validated(model: type[ModelT], payload: Any, status_code: int) -> ModelT:
    """`payload` parsed as `model`; an answer of the wrong shape raises UnknownError."""
    try:
        return model.model_validate(payload)
    except pydantic.ValidationError as exc:
        raise UnknownError(f"unexpected answer for {model.__name__}: {describe(exc)}", status_code, payload) from exc
