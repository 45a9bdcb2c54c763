"""Running a loomlm app under a real uvicorn server for the tests that drive it with real clients."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    engine: Any  # AsyncLLMEngine
    tokenizer: Any


@contextmanager
def serve_app(app: Any, engine: Any) -> Iterator[RunningServer]:
    """Serve `app` on a free loopback port in a thread; stops the server (not the engine) on exit."""
    # Bind first and hand uvicorn the socket: no race for a "free" port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv_server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", engine, engine.tokenizer)
    finally:
        uv_server.should_exit = True
        thread.join(timeout=60)
        sock.close()
