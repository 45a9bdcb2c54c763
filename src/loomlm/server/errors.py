"""HTTP errors in each API family's own format.

- OpenAI (the default): `{"error": {"message", "type", "param", "code"}}`, with vLLM's type
  names (`BadRequestError` for 400, `NotFoundError` for 404). Invalid input of any kind,
  including bodies FastAPI cannot parse or validate (FastAPI's default is 422), is a 400, so
  the official `openai` client raises `openai.BadRequestError`.
- LoRAX / TGI (`TGIError`, and every error on the paths a router registers with
  `register_error_format`): `{"error", "error_type"}`; unparsable bodies are 422 validation.
- Scale LLM Engine (the `/v1/llm/` paths): FastAPI's `{"detail": "..."}`; unparsable bodies
  are 400, which the `llmengine` client raises as `BadRequestError`.

`error_builder_for` tells code outside the routes (the API-key middleware) which format a
path uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException

from loomlm.protocol.openai import ErrorInfo, ErrorResponse
from loomlm.server.sse import STATUS_CLIENT_CLOSED, ClientDisconnected

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


@contextmanager
def bad_request_on_value_error(param: str | None = None) -> Iterator[None]:
    """A ValueError raised inside becomes a `BadRequestError` (400) naming `param`."""
    try:
        yield
    except ValueError as exc:
        raise BadRequestError(str(exc), param) from exc


class ModelNotFoundError(OpenAIHTTPError):
    """404: `model` names a model this server does not serve."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", 404, "model")


class TGIError(Exception):
    """An error the LoRAX / TGI routes answer with `{"error", "error_type"}`.

    error_type: validation (422), generation (424), overloaded (429), incomplete_generation (500).
    """

    def __init__(self, message: str, status_code: int = 422, error_type: str = "validation") -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type


# LoRAX / TGI's error_type by status. "authentication" is not one of LoRAX's types, so clients
# choose the exception by the status (loomlm's client: AuthenticationError; lorax-client has no
# 401 class and raises UnknownError).
_TGI_TYPE_BY_STATUS = {401: "authentication", 424: "generation", 429: "overloaded"}


def tgi_error_response(message: str, status_code: int, param: str | None = None) -> JSONResponse:
    """LoRAX / TGI's error body; other 5xx are `incomplete_generation`, other 4xx (bad input) `validation`,
    as the routers say."""
    error_type = _TGI_TYPE_BY_STATUS.get(status_code, "incomplete_generation" if status_code >= 500 else "validation")
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status_code)


def llmengine_error_response(message: str, status_code: int, param: str | None = None) -> JSONResponse:
    """Scale LLM Engine's error body, `{"detail": message}` (the model-engine server's
    FastAPI `HTTPException`s); the `llmengine` client reads `detail` and picks its exception
    by the status (400 BadRequestError, 401 UnauthorizedError, 404 NotFoundError, 5xx ServerError)."""
    return JSONResponse({"detail": message}, status_code=status_code)


# Builds an error response from (message, HTTP status, offending parameter or None).
ErrorBuilder = Callable[[str, int, "str | None"], JSONResponse]


def register_error_format(app: FastAPI, paths: tuple[str, ...], builder: ErrorBuilder,
                          validation_status: int, prefixes: tuple[str, ...] = ()) -> None:
    """Errors on `paths` (exact paths) and on every path starting with one of `prefixes` use
    `builder`; bodies FastAPI cannot parse get `validation_status`. An exact path wins over a
    prefix, a longer prefix over a shorter one. Unregistered paths use the OpenAI format (400
    for bad bodies)."""
    if not hasattr(app.state, "error_formats"):
        app.state.error_formats = {}
        app.state.error_format_prefixes = {}
    for path in paths:
        app.state.error_formats[path] = (builder, validation_status)
    for prefix in prefixes:
        app.state.error_format_prefixes[prefix] = (builder, validation_status)


def error_builder_for(app: Starlette, path: str) -> tuple[ErrorBuilder, int]:
    """The error builder and the bad-body status that `path` uses in `app` (see `register_error_format`)."""
    state = app.state
    exact = getattr(state, "error_formats", None) or {}
    if path in exact:
        return exact[path]
    prefixes = getattr(state, "error_format_prefixes", None) or {}
    matches = [prefix for prefix in prefixes if path.startswith(prefix)]
    if matches:
        return prefixes[max(matches, key=len)]
    return error_response, 400


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


async def _handle_tgi_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TGIError)
    return JSONResponse({"error": exc.message, "error_type": exc.error_type}, status_code=exc.status_code)


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_message(exc)
    builder, status = error_builder_for(request.app, request.url.path)
    return builder(message, status, param)


async def _handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    builder, _ = error_builder_for(request.app, request.url.path)
    return builder(str(exc.detail), exc.status_code, None)


async def _handle_client_disconnected(request: Request, exc: Exception) -> Response:
    # The client left before the response started: nobody reads it; the access log records 499.
    return Response(status_code=STATUS_CLIENT_CLOSED)


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug or an engine failure: the client gets a 500 in the usual shape, the log gets the traceback.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    builder, _ = error_builder_for(request.app, request.url.path)
    return builder(f"{type(exc).__name__}: {exc}", 500, None)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error `app` returns use the OpenAI error body.

    Handles `OpenAIHTTPError` (raised by the routes), FastAPI's
    `RequestValidationError` (malformed JSON, wrong types: 400 instead of 422),
    Starlette's `HTTPException` (unknown path 404, wrong method 405), a client that
    left before the response started (`ClientDisconnected`: an empty 499, every route
    alike), and any other exception (500, logged with its traceback).
    """
    app.add_exception_handler(OpenAIHTTPError, _handle_openai_error)
    app.add_exception_handler(TGIError, _handle_tgi_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(ClientDisconnected, _handle_client_disconnected)
    app.add_exception_handler(Exception, _handle_unexpected)
