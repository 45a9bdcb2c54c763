"""server/sse.py's stream plumbing without a model: `first_then_rest`, the one shape of every
family's streaming route, and its one close path."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from loomlm.server.sse import ClientDisconnected, first_then_rest


class _Request:
    """A Starlette request whose client stays (or leaves after `leave_after` seconds)."""

    def __init__(self, leave_after: float | None = None) -> None:
        self.leave_after = leave_after

    async def receive(self) -> dict:
        if self.leave_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.leave_after)
        return {"type": "http.disconnect"}


class _Source:
    """An engine stream: yields `items` (an Exception item is raised), records whether it was closed."""

    def __init__(self, items: list, delay: float = 0.0) -> None:
        self.items, self.delay, self.closed = items, delay, False

    async def gen(self):
        try:
            for item in self.items:
                await asyncio.sleep(self.delay)
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            await asyncio.sleep(0)  # a clean-up that awaits, as the engine's abort does
            self.closed = True


def test_first_then_rest_yields_everything_and_closes():
    async def main():
        source = _Source([1, 2, 3])
        outputs = await first_then_rest(_Request(), source.gen())
        assert not source.closed  # the route returns the generator; the response iterates it
        assert [x async for x in outputs] == [1, 2, 3]
        assert source.closed

        empty = _Source([])
        assert [x async for x in await first_then_rest(_Request(), empty.gen())] == []
        assert empty.closed

    asyncio.run(main())


def test_an_error_before_the_first_output_raises_in_the_route():
    async def main():
        source = _Source([ValueError("bad input")])
        with pytest.raises(ValueError, match="bad input"):
            await first_then_rest(_Request(), source.gen())
        assert source.closed

    asyncio.run(main())


def test_a_client_that_leaves_before_the_first_output():
    async def main():
        source = _Source([1], delay=10)
        with pytest.raises(ClientDisconnected):
            await first_then_rest(_Request(leave_after=0.01), source.gen())
        assert source.closed

    asyncio.run(main())


def test_closing_inside_a_cancelled_scope_still_closes_the_source():
    """Starlette cancels a streaming response whose client left with an anyio cancel scope: the
    close must still reach the engine stream (the hazard sse.py's docstring names)."""
    async def main():
        source = _Source([1, 2, 3])
        outputs = await first_then_rest(_Request(), source.gen())
        with anyio.CancelScope() as scope:
            assert [await anext(outputs), await anext(outputs)] == [1, 2]  # the source waits at a yield
            scope.cancel()
            await outputs.aclose()  # its awaiting clean-up runs shielded
        assert source.closed

    asyncio.run(main())


def test_a_client_gone_before_the_response_is_an_empty_499_on_every_route(caplog):
    # Every route lets ClientDisconnected (from first_then_rest / run_until_disconnect) propagate:
    # the app's one handler answers 499, not the unexpected-error 500 with its logged traceback.
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from loomlm.server.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/generate_stream")
    async def route() -> None:
        raise ClientDisconnected()

    with caplog.at_level("ERROR"), TestClient(app) as client:
        answer = client.post("/generate_stream", json={})
    assert answer.status_code == 499 and answer.content == b""
    assert "unhandled error" not in caplog.text
