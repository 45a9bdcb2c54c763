"""The FastAPI app factory and the uvicorn runner behind `loomlm serve`.

The app does not own the engine: whoever built the engine (`run_server`, a
test fixture) shuts it down after the server stops.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from loomlm.protocol.openai import TokenizeRequest as OpenAITokenizeRequest
from loomlm.protocol.tgi import TokenizeRequest as TGITokenizeRequest
from loomlm.server.auth import install_api_keys
from loomlm.server.errors import (
    BadRequestError,
    install_error_handlers,
    llmengine_error_response,
    register_error_format,
    tgi_error_response,
)
from loomlm.server.limits import RequestLimitsMiddleware, ServerLimits
from loomlm.server.llmengine_router import LLMENGINE_PATH_PREFIX, build_llmengine_router
from loomlm.server.embeddings_router import EMBED_PATH, build_embeddings_router
from loomlm.server.lmtp import build_lmtp_router
from loomlm.server.metrics import (
    RequestAccountingMiddleware,
    ServerMetrics,
    register_engine_metrics,
)
from loomlm.server.openai_router import build_openai_router
from loomlm.server.responses_router import build_responses_router
from loomlm.server.score_router import build_score_router
from loomlm.server.tgi_router import TGI_PATHS, build_tgi_router

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger("loomlm.server")


def build_app(engine: AsyncLLMEngine, chat_template: str | None = None, max_concurrent_requests: int = 128,
              api_keys: Sequence[str] | None = None, limits: ServerLimits | None = None,
              enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
              reasoning_parser: str | None = None) -> FastAPI:
    """An app serving `engine` through the OpenAI-, LoRAX / TGI- and Scale LLM Engine-compatible APIs.

    Routes: OpenAI `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
    `POST /detokenize`, `POST /v1/responses` (`loomlm.server.responses_router`); LoRAX / TGI
    `POST /`, `/generate`, `/generate_stream`, `GET /info`
    (`loomlm.server.tgi_router`); LLM Engine `POST /v1/llm/completions-sync`, `-stream`,
    `GET /v1/llm/model-endpoints[/{name}]` (`loomlm.server.llmengine_router`); loomlm's
    continuation scoring `POST /score` (`loomlm.server.score_router`); embeddings, OpenAI's
    `POST /v1/embeddings` and LoRAX's `POST /embed` (`loomlm.server.embeddings_router`); LMQL's model transport
    protocol, the websocket `ws://HOST:PORT/` (`loomlm.server.lmtp`); `POST /tokenize`
    in either family's form (TGI's when the body has `inputs`, vLLM's otherwise); `GET /health`
    (200 while serving), `GET /metrics` (Prometheus text, from a registry owned by this app).
    `chat_template` (Jinja text) replaces the model's. With `api_keys`, every route but
    `/health` and `/metrics` needs one of them (`loomlm.server.auth`); without, the app is open and a warning
    says so. Errors use each family's body (see `loomlm.server.errors`). Each request is
    counted, timed and logged in one line on the `loomlm.server` logger. `limits` bound every
    request (body size, JSON depth, counts, memory ceiling; `loomlm.server.limits`), default
    `ServerLimits()`. `enable_auto_tool_choice` / `tool_call_parser`: vLLM's tool-calling flags
    (`loomlm.server.tool_parsers`); `reasoning_parser`: vLLM's `--reasoning-parser`
    (`loomlm.server.chat_output`).

    Raises:
        ValueError: an empty API key, an unknown tool-call parser, auto tool choice without one.
    """
    app = FastAPI(title="loomlm",
                  summary=f"OpenAI-, LoRAX- and LLM Engine-compatible server for {engine.served_model_name}")
    metrics = ServerMetrics()
    register_engine_metrics(metrics, engine.engine)
    limits = limits or ServerLimits()
    engine.warm_structured_outputs()
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.limits = limits
    install_error_handlers(app)
    register_error_format(app, (*TGI_PATHS, EMBED_PATH), tgi_error_response, 422)
    register_error_format(app, (), llmengine_error_response, 400, prefixes=(LLMENGINE_PATH_PREFIX,))
    # Middleware added last runs first: accounting, then API keys, then the limits.
    app.add_middleware(RequestLimitsMiddleware, limits=limits, metrics=metrics)
    install_api_keys(app, api_keys)  # before the accounting middleware, which then logs the 401s too
    app.add_middleware(RequestAccountingMiddleware, metrics=metrics)
    openai_router, openai = build_openai_router(engine, metrics, chat_template, limits, enable_auto_tool_choice,
                                                tool_call_parser, reasoning_parser)
    app.include_router(openai_router)
    app.include_router(build_responses_router(openai))
    tgi_router, tgi = build_tgi_router(engine, metrics, max_concurrent_requests, limits, chat_template)
    app.include_router(tgi_router)
    app.state.tgi = tgi  # its limits (max_concurrent_requests) can be changed while serving
    llmengine_router, _ = build_llmengine_router(engine, metrics, limits)
    app.include_router(llmengine_router)
    app.include_router(build_score_router(engine, metrics, limits))  # errors in the OpenAI format (the default)
    app.include_router(build_embeddings_router(engine, metrics, limits))
    # LMQL's transport, a websocket on "/" (LoRAX's `POST /` is HTTP: the two do not meet).
    app.include_router(build_lmtp_router(engine, metrics, limits, tuple(api_keys or ())))

    @app.post("/tokenize", response_model=None)
    async def tokenize(raw_request: Request):
        """TGI's `{"inputs"}` -> `[{id, text, start, stop}]`, or vLLM's `{"prompt" | "messages"}`."""
        try:
            body = json.loads(await raw_request.body())
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"Invalid JSON body: {exc}") from exc
        try:
            if isinstance(body, dict) and "inputs" in body:
                payload: Any = await tgi.tokenize(TGITokenizeRequest.model_validate(body))
            else:
                payload = (await openai.tokenize(OpenAITokenizeRequest.model_validate(body))).model_dump()
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        # Up to a million tokens: serialized off the event loop too.
        content = await asyncio.to_thread(_json_bytes, payload)
        return Response(content=content, media_type="application/json")

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


def _json_bytes(payload: Any) -> bytes:
    """`payload` as JSONResponse writes it (compact UTF-8, no NaN)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def freeze_gc_heap() -> None:
    """Move every object alive now (the model, tokenizer, libraries: ~500k objects) into the
    garbage collector's permanent generation, as vLLM's `freeze_gc_heap()` does after warm-up
    and SGLang's `freeze_gc`: a full collection then walks only what serving allocates. Without it
    a gen-2 collection under load took ~390 ms holding the GIL (`/health` and every step stalled)."""
    gc.collect()
    gc.freeze()


def log_lmtp_usage(engine: AsyncLLMEngine, host: str, port: int) -> None:
    """Log how `lmql` reaches this server: its model line, with the tokenizer saved where lmql
    can load it (`export_tokenizer`); a tokenizer that cannot be saved only gets a warning."""
    from loomlm.query.lmql_program import export_tokenizer

    try:
        tokenizer_dir = export_tokenizer(engine.tokenizer)
    except Exception as exc:  # noqa: BLE001  # a slow tokenizer without a JSON form: LMTP still works
        logger.warning("LMTP: could not save the tokenizer for lmql (%s)", exc)
        return
    logger.info("LMQL (LMTP) on ws://%s:%d/: lmql.model(%r, endpoint='%s:%d', tokenizer=%r)", host, port,
                engine.served_model_name, host, port, str(tokenizer_dir))


def run_server(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    log_level: str = "info",
    chat_template: str | None = None,
    max_concurrent_requests: int = 128,
    api_keys: Sequence[str] | None = None,
    limits: ServerLimits | None = None,
    enable_auto_tool_choice: bool = False,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    **engine_kwargs: Any,
) -> None:
    """Load `model` into an AsyncLLMEngine and serve it with uvicorn until interrupted.

    `chat_template` is a Jinja chat template (text) replacing the model's. `api_keys`: the keys
    every route but `/health` and `/metrics` requires (none: the server is open, and logs a warning saying so).
    `limits`: what one request may ask for (`loomlm.server.limits.ServerLimits`).
    `engine_kwargs` are engine arguments as in `EngineConfig.from_kwargs`
    (`max_model_len`, `kv_cache_memory_bytes`, `max_num_seqs`, ...).

    Raises:
        ValueError: an engine argument or an API key is invalid.
    """
    from loomlm.engine.async_engine import AsyncLLMEngine  # torch and the model load only here

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if served_model_name is not None:
        engine_kwargs["served_model_name"] = served_model_name
    engine = AsyncLLMEngine.from_engine_args(model=model, **engine_kwargs)
    try:
        app = build_app(engine, chat_template, max_concurrent_requests, api_keys, limits, enable_auto_tool_choice,
                        tool_call_parser, reasoning_parser)
        freeze_gc_heap()
        # uvicorn's access log would duplicate the accounting middleware's line.
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        logger.info("loomlm serving model %s (from %s) on http://%s:%d/v1", engine.served_model_name, model, host, port)
        log_lmtp_usage(engine, host, port)
        uvicorn.Server(config).run()
    finally:
        engine.shutdown()
