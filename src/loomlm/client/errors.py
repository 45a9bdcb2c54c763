"""Typed client exceptions, chosen from a server's error answer.

Source: predibase/lorax `clients/python/lorax/errors.py` (`parse_error`), itself
huggingface/text-generation-inference's client errors. The classes and the order in
which they are chosen (the body's `error_type` first, then the HTTP status) follow
LoRAX; loomlm adds a common base class carrying the status and the decoded body, and
`AuthenticationError` for 401.
"""

from __future__ import annotations

from typing import Any


class LoomlmClientError(Exception):
    """Base of every error the loomlm clients raise for a server's (or the caller's) fault.

    Attributes:
        status_code: the HTTP status of the answer; the stream's status (200) for an error
            event sent mid-stream; None for errors found client-side, before any request.
        payload: the decoded error body (a dict for JSON bodies, `{"error": <text>}` for
            bodies that are not JSON); None for client-side errors.
    """

    def __init__(self, message: str, status_code: int | None = None, payload: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.payload = payload


# LoRAX errors, chosen by the body's `error_type`.


class ValidationError(LoomlmClientError, ValueError):
    """The request's parameters are invalid: found client-side, or the server's 422 `validation`."""


class GenerationError(LoomlmClientError):
    """The model failed while generating (`error_type: generation`, usually 424)."""


class OverloadedError(LoomlmClientError):
    """The server's queue is full (`error_type: overloaded`, usually 429)."""


class IncompleteGenerationError(LoomlmClientError):
    """The generation stopped before finishing (`error_type: incomplete_generation`, usually 500)."""


# Inference API errors, chosen by the HTTP status when the body has no known `error_type`.


class BadRequestError(LoomlmClientError):
    """HTTP 400."""


class AuthenticationError(LoomlmClientError):
    """HTTP 401: a missing or wrong API key (loomlm's addition to LoRAX's set)."""


class ShardNotReadyError(LoomlmClientError):
    """HTTP 403 or 424 without an `error_type`."""


class NotFoundError(LoomlmClientError):
    """HTTP 404."""


class UnprocessableEntityError(LoomlmClientError):
    """HTTP 422 without an `error_type` (e.g. a request body the server's schema rejects)."""


class RateLimitExceededError(LoomlmClientError):
    """HTTP 429 without an `error_type`."""


class ShardTimeoutError(LoomlmClientError):
    """HTTP 504."""


class NotSupportedError(LoomlmClientError):
    """LoRAX's error for a model its client cannot run (`lorax.errors.NotSupportedError`, same
    constructor); loomlm's clients never raise it, it is here so that LoRAX code catching it runs."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"Model `{model_id}` is not available for inference with this client.")


class UnknownError(LoomlmClientError):
    """Any other failure: another status, or an answer the client cannot read."""

    def __init__(self, message: str, status_code: int | None = None, payload: Any = None) -> None:
        super().__init__(f"Error status {status_code}: {message}", status_code, payload)


class ServerError(UnknownError):
    """A 5xx answer other than LoRAX's 504 (`ShardTimeoutError`): LLM Engine's `ServerError`; an
    `UnknownError` still, as LoRAX's client reports these."""


_ERROR_BY_TYPE: dict[str, type[LoomlmClientError]] = {
    "generation": GenerationError,
    "incomplete_generation": IncompleteGenerationError,
    "overloaded": OverloadedError,
    "validation": ValidationError,
}

_ERROR_BY_STATUS: dict[int, type[LoomlmClientError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: ShardNotReadyError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    424: ShardNotReadyError,
    429: RateLimitExceededError,
    504: ShardTimeoutError,
}


def error_message(payload: Any) -> str:
    """The human-readable message of an error body.

    Understands LoRAX/TGI (`{"error": "..."}`), OpenAI (`{"error": {"message": "..."}}`)
    and FastAPI (`{"detail": ...}`) bodies; anything else is shown as it is.
    """
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if error is not None:
            return str(error)
        for key in ("detail", "message"):
            if key in payload:
                return str(payload[key])
    return "" if payload is None else str(payload)


def parse_error(status_code: int, payload: Any) -> LoomlmClientError:
    """The typed exception for an error answer with `status_code` and decoded body `payload`.

    The body's `error_type` decides first (validation, generation, overloaded,
    incomplete_generation), then the status; `UnknownError` otherwise. As LoRAX's
    `parse_error`, plus 401 -> `AuthenticationError` and other 5xx -> `ServerError` (an
    `UnknownError`), as LLM Engine's.
    """
    message = error_message(payload)
    error_type = payload.get("error_type") if isinstance(payload, dict) else None
    error_class = _ERROR_BY_TYPE.get(error_type) if isinstance(error_type, str) else None
    if error_class is None:
        error_class = _ERROR_BY_STATUS.get(status_code, ServerError if 500 <= status_code < 600 else UnknownError)
    return error_class(message, status_code, payload)
