"""HTTP servers in front of the engine: the FastAPI app factory and one router per API family."""

from __future__ import annotations

from loomlm.server.app import build_app, run_server

__all__ = ["build_app", "run_server"]
