"""API keys for every route of the app: one ASGI middleware in front of all the routers.

A request passes when any credential it presents is one of the server's keys, in any of the
three forms the clients of the API families send:

- `Authorization: Bearer KEY`: the `openai` client (`api_key=`), vLLM's `--api-key`, TGI's;
- `x-api-key: KEY`: Scale's `llmengine` client (which also sends the next one);
- HTTP Basic with the key as the user name (the password is ignored; UTF-8, else latin-1):
  `llmengine`'s `auth=(key, "")`.

Anything else gets a 401 in the error format of the path's API family (`errors.error_builder_for`:
OpenAI `{"error": {...}}`, LoRAX / TGI `{"error", "error_type"}`, LLM Engine `{"detail"}`),
before routing, so an unknown path answers 401 too and reveals nothing. `OPEN_PATHS` (the
liveness probe) stay open. Keys are compared with `hmac.compare_digest`, against every key,
so the time taken says nothing about how much of a key was right.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from loomlm.server.errors import error_builder_for

logger = logging.getLogger("loomlm.server")

# Paths answered without a key: the liveness probe load balancers and orchestrators poll, and
# the Prometheus scrape (vLLM's --api-key also leaves /metrics open: counts, no content).
OPEN_PATHS = frozenset({"/health", "/metrics"})

UNAUTHORIZED_MESSAGE = ("Invalid or missing API key: send it as `Authorization: Bearer <key>`, "
                        "`x-api-key: <key>`, or HTTP Basic with the key as the user name.")


def load_api_keys(keys: Iterable[str] = (), key_file: str | Path | None = None) -> tuple[str, ...]:
    """The server's keys: `keys` (e.g. repeated `--api-key`) then the lines of `key_file`.

    In the file, one key per line; surrounding whitespace, blank lines and lines starting
    with `#` are ignored. Duplicates are dropped, order kept.

    Raises:
        ValueError: an empty key, or a `key_file` that cannot be read.
    """
    found: list[str] = []
    for key in keys:
        if not key.strip():
            raise ValueError("an API key cannot be empty.")
        found.append(key.strip())
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the API key file {str(key_file)!r}: {exc.strerror or exc}") from exc
        found.extend(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return tuple(dict.fromkeys(found))


def presented_keys(headers: Headers) -> list[str]:
    """Every key a request presents: its Bearer token, its `x-api-key`, its Basic user name.

    A malformed `Authorization` header presents nothing (the request then gets a 401, not a 500).
    """
    keys = []
    api_key = headers.get("x-api-key")
    if api_key:
        keys.append(api_key.strip())
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        keys.append(credentials)
    elif scheme.lower() == "basic" and credentials:
        try:
            raw = base64.b64decode(credentials, validate=True)
        except binascii.Error:
            raw = b""
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:  # RFC 7617 leaves the charset open; `requests` sends latin-1
            decoded = raw.decode("latin-1")
        user, _, _password = decoded.partition(":")
        if user:
            keys.append(user)
    return keys


class APIKeyChecker:
    """Whether a presented key is one of the server's keys, in time independent of the keys' content."""

    def __init__(self, api_keys: Iterable[str]) -> None:
        self._keys = [key.encode("utf-8") for key in api_keys]
        if not self._keys:
            raise ValueError("APIKeyChecker needs at least one key.")

    def is_valid(self, presented: str) -> bool:
        candidate = presented.encode("utf-8")
        is_valid = False
        for key in self._keys:  # no early exit: every key is compared
            is_valid |= hmac.compare_digest(candidate, key)
        return is_valid

    def is_any_valid(self, presented: Iterable[str]) -> bool:
        is_valid = False
        for key in presented:  # no early exit: every credential is compared
            is_valid |= self.is_valid(key)
        return is_valid


class APIKeyMiddleware:
    """ASGI middleware: HTTP requests to paths outside `OPEN_PATHS` need a valid key (see the
    module docstring); others get a 401 in their API family's format. WebSocket and lifespan
    scopes pass through."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str]) -> None:
        self.app = app
        self.checker = APIKeyChecker(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.checker.is_any_valid(presented_keys(Headers(scope=scope))):
            await self.app(scope, receive, send)
            return
        # scope["app"] is the FastAPI app (set by Starlette before its middleware runs).
        builder, _ = error_builder_for(scope["app"], scope["path"])
        response = builder(UNAUTHORIZED_MESSAGE, 401, None)
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)


def install_api_keys(app, api_keys: Iterable[str] | None) -> None:
    """Require one of `api_keys` on every route of `app` but `OPEN_PATHS`; with no keys, leave
    the app open and log a warning saying so. Raises ValueError for an empty key. Call before
    adding middleware that should see the 401s (the request accounting), since the middleware
    added last runs first."""
    keys = tuple(api_keys or ())
    if any(not key for key in keys):
        raise ValueError("an API key cannot be empty.")
    if not keys:
        logger.warning("No API key set: the server accepts every request. Start it with --api-key KEY "
                       "(or --api-key-file) to require one.")
        return
    app.add_middleware(APIKeyMiddleware, api_keys=keys)
    logger.info("API keys required on every route but %s (%d key%s).", ", ".join(sorted(OPEN_PATHS)), len(keys),
                "" if len(keys) == 1 else "s")
