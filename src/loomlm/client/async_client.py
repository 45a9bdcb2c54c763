"""`AsyncClient`: LoRAX's asynchronous Python client API, for a loomlm (or LoRAX / TGI) server.

Source: predibase/lorax `clients/python/lorax/client.py` (`AsyncClient`). The same three
steps as `sync_client.Client` (shared request building and parsing in `generate.py`),
with the I/O done by `AsyncTransport`; arguments are documented on `Client`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

from loomlm.client.generate import ClientBase, client_call_request, parse_generate_response, parse_stream_event
from loomlm.client.transport import AsyncTransport
from loomlm.protocol.tgi import GenerateResponse, MergedAdaptersSpec, StreamResponse


class AsyncClient(ClientBase, AbstractAsyncContextManager):
    """Asynchronous client of a LoRAX-compatible server (LoRAX's `lorax.AsyncClient`).

    The same calls as `Client`, awaited; see `Client` for the arguments.

        >>> client = AsyncClient("http://127.0.0.1:8000")
        >>> (await client.generate("Why is the sky blue?")).generated_text
        >>> async for response in client.generate_stream("Why is the sky blue?"):
        ...     print(response.token.text, end="")

    `timeout` is in seconds (LoRAX's aiohttp client multiplies it by 60). `transport`
    takes an `httpx.AsyncBaseTransport` (`httpx.MockTransport`, `httpx.ASGITransport`).
    The connection pool belongs to the event loop of its first use: `await aclose()` it
    (or use `async with`) before that loop ends.
    """

    _transport: AsyncTransport
    _transport_class = AsyncTransport

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._transport.aclose()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def generate(
        self,
        prompt: str,
        adapter_id: str | None = None,
        adapter_source: str | None = None,
        merged_adapters: MergedAdaptersSpec | dict[str, Any] | None = None,
        api_token: str | None = None,
        do_sample: bool = False,
        max_new_tokens: int | None = None,
        ignore_eos_token: bool = False,
        best_of: int | None = None,
        repetition_penalty: float | None = None,
        return_full_text: bool = False,
        seed: int | None = None,
        stop_sequences: list[str] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        truncate: int | None = None,
        typical_p: float | None = None,
        watermark: bool = False,
        response_format: dict[str, Any] | Any | None = None,
        decoder_input_details: bool = False,
        return_k_alternatives: int | None = None,
        details: bool = True,
        *,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        top_n_tokens: int | None = None,
        grammar: dict[str, Any] | Any | None = None,
    ) -> GenerateResponse:
        """`Client.generate`, awaited (LoRAX's `AsyncClient.generate`): same request, result and errors."""
        request = client_call_request(locals(), stream=False)
        return parse_generate_response(await self._transport.request_json(request))

    async def generate_stream(
        self,
        prompt: str,
        adapter_id: str | None = None,
        adapter_source: str | None = None,
        merged_adapters: MergedAdaptersSpec | dict[str, Any] | None = None,
        api_token: str | None = None,
        do_sample: bool = False,
        max_new_tokens: int | None = None,
        ignore_eos_token: bool = False,
        repetition_penalty: float | None = None,
        return_full_text: bool = False,
        seed: int | None = None,
        stop_sequences: list[str] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        truncate: int | None = None,
        typical_p: float | None = None,
        watermark: bool = False,
        response_format: dict[str, Any] | Any | None = None,
        details: bool = True,
        return_k_alternatives: int | None = None,
        *,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        top_n_tokens: int | None = None,
        grammar: dict[str, Any] | Any | None = None,
    ) -> AsyncIterator[StreamResponse]:
        """`Client.generate_stream` as an async iterator (LoRAX's `AsyncClient.generate_stream`,
        whose trailing positional `return_k_alternatives` it keeps).

        Use `async for response in client.generate_stream(...)`. Being an async
        generator, it checks the arguments (raising `ValidationError`) on the first
        iteration, as LoRAX's does, not when called.
        """
        request = client_call_request(locals(), stream=True)
        # aclosing: an error event (or the caller leaving) closes the HTTP stream at once, not at GC.
        async with aclosing(self._transport.stream_json(request, parse_stream_event)) as responses:
            async for response in responses:
                yield response
