"""The clients' two transports: an `ApiRequest` in, a JSON payload (or an iterator of
stream-event JSON documents, each handed to the caller's `parse`) out. They only do I/O, on
httpx and httpx-sse; reading an answer's bytes into a payload or a typed error is `core.py`'s
job, shared by both.

Each transport owns one `httpx.Client` / `httpx.AsyncClient` (connection pooling across
calls). Tests inject an `httpx.MockTransport` (or, async, an `httpx.ASGITransport`)
through `transport=`; without one, the client talks to `base_url` over the network,
e.g. a live `http://127.0.0.1:PORT`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, TypeVar

import httpx
from httpx_sse import SSEError, aconnect_sse, connect_sse

from loomlm.client.core import (
    ApiRequest,
    decode_event,
    decode_payload,
    error_from_answer,
    error_from_non_event_stream,
    join_url,
)

Timeout = float | httpx.Timeout | None
T = TypeVar("T")


class _Transport:
    """What both transports hold: the server's `base_url` and one httpx client (the connection
    pool), made by the subclass's `_http_class` with `transport` (an `httpx.BaseTransport` for
    `SyncTransport`, an `httpx.AsyncBaseTransport` for `AsyncTransport`) instead of the network."""

    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None,
        timeout: Timeout = 60,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self._http = self._http_class(headers=headers, cookies=cookies, timeout=timeout, transport=transport)


class SyncTransport(_Transport):
    """Blocking I/O for `Client`, on `httpx.Client`."""

    _http: httpx.Client
    _http_class = httpx.Client

    def request_json(self, request: ApiRequest) -> Any:
        """Perform `request`; return its answer's JSON payload.

        Raises:
            LoomlmClientError: the typed error for a non-2xx answer or a non-JSON body.
            httpx.HTTPError: the connection failed or timed out.
        """
        answer = self._http.request(request.method, join_url(self.base_url, request.path), json=request.json_body)
        return decode_payload(answer.status_code, answer.content)

    def stream_json(self, request: ApiRequest, parse: Callable[[Any], T]) -> Generator[T, None, None]:
        """Perform `request`; yield `parse` of the JSON document of each server-sent event as it arrives.

        The request is sent on the first `next()`; leaving the loop early, or an error `parse`
        raises, closes the stream.

        Raises:
            LoomlmClientError: the typed error for a non-2xx answer; `UnknownError` for an
                answer that is not an event stream or an event that is not JSON.
            httpx.HTTPError: the connection failed or timed out.
        """
        url = join_url(self.base_url, request.path)
        with connect_sse(self._http, request.method, url, json=request.json_body) as event_source:
            answer = event_source.response
            if not answer.is_success:
                raise error_from_answer(answer.status_code, answer.read())
            try:
                for event in event_source.iter_sse():
                    yield parse(decode_event(answer.status_code, event.data))
            except SSEError as exc:  # raised before the first event: the answer is not an SSE stream
                raise error_from_non_event_stream(answer.status_code, answer.headers, answer.read()) from exc

    def close(self) -> None:
        self._http.close()


class AsyncTransport(_Transport):
    """Non-blocking I/O for `AsyncClient`, on `httpx.AsyncClient` (the same steps as `SyncTransport`)."""

    _http: httpx.AsyncClient
    _http_class = httpx.AsyncClient

    async def request_json(self, request: ApiRequest) -> Any:
        """As `SyncTransport.request_json`, awaited."""
        answer = await self._http.request(request.method, join_url(self.base_url, request.path), json=request.json_body)
        return decode_payload(answer.status_code, answer.content)

    async def stream_json(self, request: ApiRequest, parse: Callable[[Any], T]) -> AsyncGenerator[T, None]:
        """As `SyncTransport.stream_json`, as an async iterator."""
        url = join_url(self.base_url, request.path)
        async with aconnect_sse(self._http, request.method, url, json=request.json_body) as event_source:
            answer = event_source.response
            if not answer.is_success:
                raise error_from_answer(answer.status_code, await answer.aread())
            try:
                async for event in event_source.aiter_sse():
                    yield parse(decode_event(answer.status_code, event.data))
            except SSEError as exc:  # raised before the first event: the answer is not an SSE stream
                raise error_from_non_event_stream(answer.status_code, answer.headers, await answer.aread()) from exc

    async def aclose(self) -> None:
        await self._http.aclose()
