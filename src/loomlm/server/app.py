"""The FastAPI app factory and the uvicorn runner behind `loomlm serve`.

The app does not own the engine: whoever built the engine (`run_server`, a
test fixture) shuts it down after the server stops.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

from loomlm.server.errors import install_error_handlers
from loomlm.server.metrics import RequestAccountingMiddleware, ServerMetrics
from loomlm.server.openai_router import build_openai_router

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger("loomlm.server")


def build_app(engine: AsyncLLMEngine, chat_template: str | None = None) -> FastAPI:
    """An app serving `engine` through the OpenAI-compatible API.

    Routes: `POST /v1/completions`, `POST /v1/chat/completions`,
    `GET /v1/models`, `GET /health` (200 while serving), `GET /metrics`
    (Prometheus text, from a registry owned by this app), `POST /tokenize`,
    `POST /detokenize`. `chat_template` (Jinja text) replaces the model's. Every error uses the
    OpenAI error body (see `loomlm.server.errors`). Each request is counted,
    timed and logged in one line on the `loomlm.server` logger.
    """
    app = FastAPI(title="loomlm", summary=f"OpenAI-compatible server for {engine.served_model_name}")
    metrics = ServerMetrics()
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(RequestAccountingMiddleware, metrics=metrics)
    app.include_router(build_openai_router(engine, metrics, chat_template))

    @app.get("/health")
    async def health() -> Response:
        """200 with an empty body while the server is up (vLLM's liveness probe)."""
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """This app's metrics in Prometheus text format."""
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    return app


def run_server(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    log_level: str = "info",
    chat_template: str | None = None,
    **engine_kwargs: Any,
) -> None:
    """Load `model` into an AsyncLLMEngine and serve it with uvicorn until interrupted.

    `chat_template` is a Jinja chat template (text) replacing the model's.
    `engine_kwargs` are engine arguments as in `EngineConfig.from_kwargs`
    (`max_model_len`, `kv_cache_memory_bytes`, `max_num_seqs`, ...).

    Raises:
        ValueError: an engine argument is invalid.
    """
    from loomlm.engine.async_engine import AsyncLLMEngine  # torch and the model load only here

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if served_model_name is not None:
        engine_kwargs["served_model_name"] = served_model_name
    engine = AsyncLLMEngine.from_engine_args(model=model, **engine_kwargs)
    try:
        app = build_app(engine, chat_template)
        # uvicorn's access log would duplicate the accounting middleware's line.
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        logger.info(
            "loomlm serving model %s (from %s) on http://%s:%d/v1",
            engine.served_model_name,
            model,
            host,
            port,
        )
        uvicorn.Server(config).run()
    finally:
        engine.shutdown()
