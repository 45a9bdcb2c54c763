"""Streaming plumbing shared by the API families: SSE framing, text deltas from
cumulative outputs, merging engine streams, and stopping work when the client goes away.

Cancellation matters here: a client that disconnects must not leave its
requests running in the engine. Every helper closes the engine streams it was
given (`aclose()`), which aborts their requests inside the engine, and does so
under a shielded cancel scope, because Starlette cancels a streaming response
with an anyio cancel scope that would otherwise cancel the clean-up too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from starlette.requests import Request

from loomlm.outputs import Logprob, RequestOutput

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
# nginx's "client closed request": the status logged for a request whose client went away.
STATUS_CLIENT_CLOSED = 499


def sse_event(data: str) -> str:
    """One server-sent event carrying `data` (a JSON document), as OpenAI streams it."""
    return f"data: {data}\n\n"


@dataclass(frozen=True)
class TextDelta:
    """The text a choice gained since its previous chunk.

    Attributes:
        index: choice index in the response, `prompt_index * n + completion index`.
        text: the new characters ("" on a finishing delta with nothing new).
        finish_reason: "stop" / "length" on the choice's last delta, else None.
        stop_reason: the stop string or token id that ended it (vLLM's extra), else None.
    """

    index: int
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    text_offset: int = 0  # characters of this choice sent before `text`
    token_ids: list[int] = field(default_factory=list)  # tokens generated since the previous delta
    logprobs: list[dict[int, Logprob]] | None = None  # their logprob entries, when asked for


@dataclass
class TextDeltaTracker:
    """Turns the engine's cumulative RequestOutputs into per-choice text deltas.

    The engine reports each completion's whole text so far; a stream sends only
    what is new. This relies on the text only growing: the detokenizer holds back
    text that may still become a stop string, so nothing sent is ever retracted.
    `n` is the number of completions per prompt.
    """

    n: int
    _sent_len: dict[int, int] = field(default_factory=dict)
    _sent_tokens: dict[int, int] = field(default_factory=dict)
    _finished: set[int] = field(default_factory=set)

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[TextDelta]:
        """The deltas of `output` (prompt `prompt_index`) not sent yet; each choice finishes once."""
        deltas = []
        for completion in output.outputs:
            index = prompt_index * self.n + completion.index
            if index in self._finished:
                continue
            text = completion.text[self._sent_len.get(index, 0) :]
            if not text and completion.finish_reason is None:
                continue  # a token that added no text yet (e.g. part of a multi-byte character)
            offset, first_token = self._sent_len.get(index, 0), self._sent_tokens.get(index, 0)
            self._sent_len[index] = len(completion.text)
            self._sent_tokens[index] = len(completion.token_ids)
            if completion.finish_reason is not None:
                self._finished.add(index)
            logprobs = completion.logprobs[first_token:] if completion.logprobs is not None else None
            deltas.append(TextDelta(index, text, completion.finish_reason, completion.stop_reason, offset,
                                    completion.token_ids[first_token:], logprobs))
        return deltas


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the response was ready."""


async def aclose_shielded(iterator: AsyncIterator[object]) -> None:
    """Close `iterator` (an engine stream: its request is aborted) even inside a cancelled scope."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


_END = object()


async def first_then_rest(request: Request, outputs: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """Wait for the first item of `outputs` (an engine stream), then return a generator of that
    item and the rest: every family's streaming route in one shape.

    Waiting before the response starts keeps an input the engine rejects a plain 4xx in the
    family's own format instead of an error inside a 200 stream. Closing the returned generator
    (or its end, or an error) closes `outputs` under a shielded scope, aborting the request if it
    still runs, however the response ended: the one close path of every stream.

    Raises: what the first item raised (ValueError and the like: the route's 4xx), or
    ClientDisconnected when the client left first; `outputs` is closed then.
    """
    try:
        first = await run_until_disconnect(request, anext(outputs, _END))
    except BaseException:
        await aclose_shielded(outputs)
        raise
    return _chain(first, outputs)


async def _chain(first: object, outputs: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    try:
        if first is _END:
            return
        yield first  # type: ignore[misc]  # a T: not the end marker
        async for item in outputs:
            yield item
    finally:
        await aclose_shielded(outputs)


async def merge_async_iterators(iterators: list[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several async iterators, yielding `(iterator_index, item)` as items arrive.

    Used to run the prompts of a batched request concurrently in the engine.
    An exception from any iterator is re-raised here; closing the merged
    generator (or an exception) closes every source iterator.
    """
    if len(iterators) == 1:
        # The common case (one prompt) needs no tasks.
        only = iterators[0]
        try:
            async for item in only:
                yield 0, item
        finally:
            await aclose_shielded(only)
        return

    queue: asyncio.Queue[tuple[int, T | None, BaseException | None, bool]] = asyncio.Queue()

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((index, item, None, False))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((index, None, exc, False))
            return
        finally:
            await aclose_shielded(iterator)
        await queue.put((index, None, None, True))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        num_running = len(tasks)
        while num_running:
            index, item, exc, is_done = await queue.get()
            if exc is not None:
                raise exc
            if is_done:
                num_running -= 1
                continue
            yield index, item  # type: ignore[misc]  # item is a T when neither exc nor is_done
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    # After the body is read, the server's receive() blocks until the client disconnects.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first.

    Raises:
        ClientDisconnected: the client went away; `work` was cancelled (which
            closes the engine streams it was iterating, aborting their requests).
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()


async def last_output(request: Request, outputs: AsyncIterator[T]) -> T | None:
    """The last item of `outputs` (an engine stream: the final RequestOutput), or None if it
    yields nothing; the stream is closed (its request aborted) if the client disconnects first.

    Raises:
        ClientDisconnected: the client went away.
    """
    async def drain() -> T | None:
        last = None
        async with aclosing(outputs) as stream:
            async for item in stream:
                last = item
        return last

    return await run_until_disconnect(request, drain())
