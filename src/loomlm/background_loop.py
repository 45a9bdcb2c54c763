"""A private asyncio event loop on a daemon thread, usable from any thread and any event loop.

The Generations API runs each engine (or HTTP client) in one of these: an `AsyncLLMEngine`
must be driven from a single event loop, while its callers may live in other loops (a
server, a notebook) or in none (scripts calling the `_sync` methods). Coroutines are handed
over with `asyncio.run_coroutine_threadsafe`; cancelling the caller cancels the coroutine
in this loop (which aborts its engine request).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    """A private asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` run in this loop, from any event loop; cancelling the caller cancels it."""
        if threading.current_thread() is self.thread:
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Block the calling thread until `coro` has run in this loop (an interrupt cancels it)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a _sync call from inside the model's own event loop would deadlock; await the "
                               "async method instead.")
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def stream(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Iterate `items` (an async generator bound to this loop) from any event loop; closing
        this iterator early closes `items` in its loop (aborting its request)."""
        if threading.current_thread() is self.thread:
            async for item in items:
                yield item
            return
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()  # (is_last, item or exception or None)

        async def pump() -> None:
            try:
                async for item in items:
                    caller.call_soon_threadsafe(queue.put_nowait, (False, item))
            except Exception as exc:  # noqa: BLE001  # handed to the consumer, raised there
                caller.call_soon_threadsafe(queue.put_nowait, (True, exc))
            else:
                caller.call_soon_threadsafe(queue.put_nowait, (True, None))

        pumping = self.submit(pump())
        try:
            while True:
                is_last, item = await queue.get()
                if is_last:
                    if item is not None:
                        raise item
                    return
                yield item
        finally:
            pumping.cancel()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
