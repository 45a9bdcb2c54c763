"""OpenAI-convention HTTP errors: `{"error": {"message", "type", "param", "code"}}`.

Source: the OpenAI API error shape, with vLLM's type names (`BadRequestError`
for 400, `NotFoundError` for 404). Invalid input of any kind, including
bodies FastAPI cannot parse or validate (FastAPI's default is 422), is a 400,
so the official `openai` client raises `openai.BadRequestError`.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loomlm.protocol.openai import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# OpenAI client exception class names by status, which vLLM also uses as `type`.
_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
}


class OpenAIHTTPError(Exception):
    """An error the OpenAI routes answer with `status_code` and the OpenAI error body."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param


class BadRequestError(OpenAIHTTPError):
    """400: the request is invalid (bad values, too long for the context window, ...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, 400, param)


class ModelNotFoundError(OpenAIHTTPError):
    """404: `model` names a model this server does not serve."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", 404, "model")


def error_body(message: str, status_code: int, param: str | None = None) -> ErrorResponse:
    """The OpenAI error body for `status_code` (type from the status, `code` = the status)."""
    error_type = _TYPE_BY_STATUS.get(status_code) or HTTPStatus(status_code).phrase.replace(" ", "") + "Error"
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=status_code))


def error_response(message: str, status_code: int, param: str | None = None) -> JSONResponse:
    """A JSONResponse carrying `error_body(...)` with HTTP status `status_code`."""
    return JSONResponse(error_body(message, status_code, param).model_dump(), status_code=status_code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the first offending field from FastAPI's validation errors."""
    parts = []
    param = None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            # loc holds a character offset here, not a field.
            detail = (error.get("ctx") or {}).get("error", "")
            return f"Invalid JSON body: {error.get('msg', 'JSON decode error')} ({detail}).", None
        # loc is ("body", "field", ...); the "body" prefix says nothing to a client.
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if param is None and loc:
            param = loc[0]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid value')}")
    return "; ".join(parts) or "Invalid request body.", param


async def _handle_openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIHTTPError)
    return error_response(exc.message, exc.status_code, exc.param)


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_message(exc)
    return error_response(message, 400, param)


async def _handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(str(exc.detail), exc.status_code)


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug or an engine failure: the client gets a 500 in the usual shape, the log gets the traceback.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(f"{type(exc).__name__}: {exc}", 500)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error `app` returns use the OpenAI error body.

    Handles `OpenAIHTTPError` (raised by the routes), FastAPI's
    `RequestValidationError` (malformed JSON, wrong types: 400 instead of 422),
    Starlette's `HTTPException` (unknown path 404, wrong method 405), and any
    other exception (500, logged with its traceback).
    """
    app.add_exception_handler(OpenAIHTTPError, _handle_openai_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)
