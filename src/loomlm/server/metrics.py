"""Request accounting: Prometheus metrics and the one log line per request.

Every app owns its own `CollectorRegistry`, so several apps in one process (as
in the tests) keep separate counts and never clash on metric names.

Metric names (Prometheus text at `GET /metrics`):
- `loomlm_http_requests_total{method, route, status}`: finished HTTP requests.
- `loomlm_http_request_duration_seconds{method, route}`: latency histogram, from
  the request's arrival to the last byte of the response (streams included).
- `loomlm_prompt_tokens_total`, `loomlm_generation_tokens_total`: tokens of
  generation requests (prompts counted once each; generated tokens summed over choices).
- `loomlm_requests_running`: generation requests in flight.
- `loomlm_prefix_cache_queries_total`, `loomlm_prefix_cache_hits_total` (tokens),
  `loomlm_prefix_cache_hit_rate`, `loomlm_num_preemptions_total`: the engine's counters.
- `loomlm_requests_refused_total{reason}`: requests refused by the limits before any work
  (`memory`: the process was near its memory ceiling; `body_too_large`; `invalid_body`).
- `loomlm_process_resident_memory_bytes`: this process's resident memory, read at scrape time.
- `loomlm_spec_decode_num_drafts_total`, `loomlm_spec_decode_num_draft_tokens_total`,
  `loomlm_spec_decode_num_accepted_tokens_total`, `loomlm_spec_decode_num_accepted_tokens_per_pos_total{position}`:
  speculative decoding (vLLM's `spec_decode_*` counters), when a speculative_config is set.
- `loomlm_tensor_parallel_size`, `loomlm_tp_collective_seconds_total{rank}`: tensor parallelism,
  when on (each rank's time in collectives; the workers' as of their last exchange, every 64 steps).
- `loomlm_lora_loads_total`, `loomlm_lora_hits_total`, `loomlm_lora_evictions_total`,
  `loomlm_lora_active_adapters`: the adapter cache (`LoRAManager` counters), when LoRA is on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loomlm.outputs import RequestOutput
from loomlm.server.limits import process_rss_bytes
from loomlm.server.sse import aclose_shielded

logger = logging.getLogger("loomlm.server")

# Seconds; a 135M-parameter model on 2 CPU cores takes from ~50 ms (one short
# completion) to minutes (long batched generations).
_LATENCY_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

# Key under which a request's scope carries its `RequestUsage` record.
_USAGE_SCOPE_KEY = "loomlm.usage"


@dataclass
class RequestUsage:
    """Token counts of one HTTP request, filled by the route once known (None: not a generation)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ServerMetrics:
    """The Prometheus metrics of one app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests_total = Counter("loomlm_http_requests_total",
                                      "Finished HTTP requests by method, route template and status code.",
                                      ["method", "route", "status"], registry=registry)
        self.request_duration_s = Histogram("loomlm_http_request_duration_seconds",
                                            "HTTP request latency in seconds, arrival to last response byte.",
                                            ["method", "route"], buckets=_LATENCY_BUCKETS_S, registry=registry)
        self.prompt_tokens_total = Counter("loomlm_prompt_tokens_total", "Prompt tokens of generation requests.",
                                           registry=registry)
        self.generation_tokens_total = Counter("loomlm_generation_tokens_total",
                                               "Generated tokens, summed over choices.", registry=registry)
        self.requests_running = Gauge("loomlm_requests_running", "Generation requests in flight.", registry=registry)
        self.requests_refused = Counter("loomlm_requests_refused_total",
                                        "Requests refused by the server's limits before any work, by reason.",
                                        ["reason"], registry=registry)
        self.process_rss_bytes = Gauge("loomlm_process_resident_memory_bytes",
                                       "Resident memory of the server process in bytes.", registry=registry)
        self.process_rss_bytes.set_function(process_rss_bytes)

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Reads the engine's own counters at scrape time (they live in the engine, not here)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        bm = self.engine.block_manager
        yield CounterMetricFamily("loomlm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=bm.num_query_tokens)
        yield CounterMetricFamily("loomlm_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=bm.num_hit_tokens)
        yield GaugeMetricFamily("loomlm_prefix_cache_hit_rate", "Hit tokens / queried tokens since start.",
                                value=bm.num_hit_tokens / bm.num_query_tokens if bm.num_query_tokens else 0.0)
        yield CounterMetricFamily("loomlm_num_preemptions", "Requests preempted (recomputed later).",
                                  value=self.engine.scheduler.num_preemptions)
        tp = self.engine.tp
        if tp is not None:
            yield GaugeMetricFamily("loomlm_tensor_parallel_size", "Ranks the model is cut across.",
                                    value=tp.world_size)
            seconds = CounterMetricFamily("loomlm_tp_collective_seconds", "Seconds each tensor-parallel rank "
                                          "spent in collectives (all-reduce, all-gather); the other ranks' as of "
                                          "their last exchange (every 64 steps).", labels=["rank"])
            per_rank = list(tp.rank_seconds) or [0.0] * tp.world_size
            per_rank[tp.rank] = tp.stats.seconds
            for rank, value in enumerate(per_rank):
                seconds.add_metric([str(rank)], value)
            yield seconds
        spec = self.engine.spec_decode
        if spec is not None:
            st = spec.stats
            yield CounterMetricFamily("loomlm_spec_decode_num_drafts", "Speculative verifications "
                                      "(requests x steps with proposed tokens).", value=st.num_drafts)
            yield CounterMetricFamily("loomlm_spec_decode_num_draft_tokens", "Proposed tokens verified.",
                                      value=st.num_draft_tokens)
            yield CounterMetricFamily("loomlm_spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                                      value=st.num_accepted_tokens)
            per_pos = CounterMetricFamily("loomlm_spec_decode_num_accepted_tokens_per_pos",
                                          "Proposed tokens accepted at each position of the proposals.",
                                          labels=["position"])
            for position, count in enumerate(st.num_accepted_tokens_per_pos):
                per_pos.add_metric([str(position)], count)
            yield per_pos
        m = self.engine.lora_manager
        if m is None:
            return
        yield CounterMetricFamily("loomlm_lora_loads", "Adapters installed into a slot.", value=m.num_loads)
        yield CounterMetricFamily("loomlm_lora_hits", "Requests that found their adapter installed.",
                                  value=m.num_hits)
        yield CounterMetricFamily("loomlm_lora_evictions", "Adapters evicted from a slot (LRU).",
                                  value=m.num_evictions)
        yield GaugeMetricFamily("loomlm_lora_active_adapters", "Adapters installed now.", value=len(m.loaded))


def register_engine_metrics(metrics: ServerMetrics, engine) -> None:
    """Expose an `LLMEngine`'s counters in `metrics`: prefix cache, preemptions, speculative
    decoding when on, and the adapter cache (`LoRAManager` loads / hits / evictions) when LoRA is on."""
    metrics.registry.register(_EngineCollector(engine))


def record_usage(request: Request, metrics: ServerMetrics, prompt_tokens: int, completion_tokens: int) -> None:
    """Count a generation request's tokens in `metrics` and in its log line.

    Call once per request, when its token counts are final (end of a
    stream included, even if the client went away).
    """
    metrics.prompt_tokens_total.inc(prompt_tokens)
    metrics.generation_tokens_total.inc(completion_tokens)
    usage = request.scope.get(_USAGE_SCOPE_KEY)
    if isinstance(usage, RequestUsage):
        usage.prompt_tokens = prompt_tokens
        usage.completion_tokens = completion_tokens


async def counted_outputs(request: Request, metrics: ServerMetrics, outputs: AsyncIterator[RequestOutput]
                          ) -> AsyncGenerator[RequestOutput, None]:
    """`outputs` (one engine request's stream) counted in `metrics`: in `requests_running` while it
    runs, and its tokens recorded (`record_usage`: the last output's prompt, every completion's
    tokens) however it ends, the client gone included. Closing it closes `outputs` (shielded),
    which aborts the request if it still runs."""
    last: RequestOutput | None = None
    metrics.requests_running.inc()
    try:
        async for last in outputs:
            yield last
    finally:
        metrics.requests_running.dec()
        await aclose_shielded(outputs)
        if last is not None:
            record_usage(request, metrics, len(last.prompt_token_ids), sum(len(c.token_ids) for c in last.outputs))


class RequestAccountingMiddleware:
    """ASGI middleware: per request, count it, time it, and log one line.

    A plain ASGI middleware rather than `@app.middleware("http")`, so that a
    streamed response is timed to its last byte and its token counts, set by
    the route at the end of the stream, are in the log line.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start_s = time.perf_counter()
        usage = RequestUsage()
        scope[_USAGE_SCOPE_KEY] = usage
        status_code = 500  # what the client sees if the app raises before answering

        async def send_and_watch(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._account(scope, status_code, time.perf_counter() - start_s, usage)

    def _account(self, scope: Scope, status_code: int, latency_s: float, usage: RequestUsage) -> None:
        method = scope["method"]
        route = scope.get("route")
        # The route template, not the raw path, keeps the label set small; unknown paths share one label.
        route_label = getattr(route, "path", None) or "unmatched"
        self.metrics.requests_total.labels(method, route_label, str(status_code)).inc()
        self.metrics.request_duration_s.labels(method, route_label).observe(latency_s)
        tokens = ""
        if usage.prompt_tokens is not None:
            tokens = f" prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}"
        logger.info("%s %s %d %.3fs%s", method, scope["path"], status_code, latency_s, tokens)
