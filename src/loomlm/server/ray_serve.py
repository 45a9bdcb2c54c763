"""loomlm on Ray Serve: N replicas, each a whole loomlm engine and server, behind a prefix-aware router.

`loomlm serve --ray --num-replicas N` starts (or joins, with RAY_ADDRESS) a Ray cluster and runs
`build_application(...)`: N deployments `loomlm-replica-i` of one replica each (a Ray actor
process holding an AsyncLLMEngine and the full loomlm app, every API face, on a loopback port),
and the ingress deployment `LoomlmRouter` on Ray Serve's HTTP proxy. On an existing cluster:
`serve run loomlm.server.ray_serve:app_builder model=smollm2-135m-instruct num_replicas=2`, or
in a Serve config file `import_path: loomlm.server.ray_serve:app_builder` with those `args`.

Routing (as SGLang's router and Ray Serve LLM's prefix-aware router): a request's affinity key is
its session id (the `X-Session-Id` header, or OpenAI's `user` field) or else the first
`AFFINITY_PREFIX_CHARS` characters of its prompt (`prompt`, `messages`, `inputs`, `input`);
rendezvous hashing maps the key to a replica, which gets the request while it holds fewer than
`IMBALANCE` more requests in flight than the least loaded replica; otherwise the least loaded one
does. Requests without a prompt go to the least loaded. Ray Serve checks each replica's health
(`check_health`: its engine's `/health`) and restarts a dead one; a request it held fails with a
502 in its API family's error format (a stream already started ends), and the router asks the
restarted replica for its new address. The router logs one line per request naming the replica;
its `/metrics` is every replica's, each series labelled `replica="i"`, plus the router's own
per-replica counters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from fastapi import Request  # module level: the routes' annotations are resolved in these globals
from fastapi.responses import PlainTextResponse

logger = logging.getLogger("loomlm.server")

AFFINITY_PREFIX_CHARS = 128
IMBALANCE = 4
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class ReplicaServer:
    """One replica: an AsyncLLMEngine and loomlm's app (`build_app`) under uvicorn on a loopback port."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], app_kwargs: dict[str, Any], index: int) -> None:
        import uvicorn

        from loomlm.engine.async_engine import AsyncLLMEngine
        from loomlm.server.app import build_app

        self.index = index
        self.engine = AsyncLLMEngine.from_engine_args(model=model, **engine_kwargs)
        app = build_app(self.engine, **app_kwargs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the replica's server did not start")
            time.sleep(0.05)
        logger.info("loomlm replica %d serving %s at %s (pid %d)", index, model, self.url, os.getpid())

    def address(self) -> str:
        """This replica's server, "http://127.0.0.1:PORT" (the router proxies to it; a restarted
        replica has a new port)."""
        return self.url

    def pid(self) -> int:
        """The replica's process id (tests kill it to see Ray Serve restart the replica)."""
        return os.getpid()

    def check_health(self) -> None:
        """Ray Serve's health check: raises when the engine's /health does not answer 200."""
        import httpx

        httpx.get(self.url + "/health", timeout=10).raise_for_status()


def affinity_key(headers, body: bytes) -> str | None:
    """A request's session id or prompt prefix (module docstring); None when it has neither."""
    session = headers.get("x-session-id")
    if session:
        return "session:" + session
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("user"), str) and payload["user"]:
        return "session:" + payload["user"]
    for field in ("prompt", "messages", "inputs", "input"):
        if field in payload:
            text = payload[field] if isinstance(payload[field], str) else json.dumps(payload[field])
            return "prefix:" + text[:AFFINITY_PREFIX_CHARS]
    return None


def choose_replica(key: str | None, in_flight: list[int]) -> int:
    """The replica for a request (module docstring): the key's rendezvous-hash winner unless it
    holds IMBALANCE more requests than the least loaded, else the least loaded."""
    least = min(range(len(in_flight)), key=lambda i: in_flight[i])
    if key is None:
        return least
    preferred = max(range(len(in_flight)),
                    key=lambda i: hashlib.blake2b(f"{i}:{key}".encode(), digest_size=8).digest())
    return preferred if in_flight[preferred] < in_flight[least] + IMBALANCE else least


def family_error(path: str, message: str, status: int):
    """An error response in the API family `path` belongs to (loomlm.server.errors)."""
    from loomlm.server.errors import error_response, llmengine_error_response, tgi_error_response

    if path.startswith("/v1/llm/"):
        return llmengine_error_response(message, status)
    if path in ("/", "/generate", "/generate_stream", "/embed", "/info"):
        return tgi_error_response(message, status)
    return error_response(message, status)


def build_router_app(replicas: list, max_body_bytes: int | None = None):
    """The router's FastAPI app over `replicas` (DeploymentHandles of ReplicaServer deployments).
    A body over `max_body_bytes` (default: `ServerLimits().max_request_body_bytes`, as each
    replica's) is refused with 413 in its family's format while it is read."""
    from loomlm.server.limits import ServerLimits

    limit = max_body_bytes or ServerLimits().max_request_body_bytes
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))
    in_flight = [0] * len(replicas)
    served = [0] * len(replicas)
    failed = [0] * len(replicas)
    addresses: list[str | None] = [None] * len(replicas)

    async def address(i: int, refresh: bool = False) -> str:
        if addresses[i] is None or refresh:
            addresses[i] = await replicas[i].address.remote()
        return addresses[i]

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from prometheus_client.parser import text_string_to_metric_families

        lines = ["# TYPE loomlm_router_requests_total counter"]
        lines += [f'loomlm_router_requests_total{{replica="{i}"}} {n}' for i, n in enumerate(served)]
        lines += ["# TYPE loomlm_router_failed_requests_total counter"]
        lines += [f'loomlm_router_failed_requests_total{{replica="{i}"}} {n}' for i, n in enumerate(failed)]
        lines += ["# TYPE loomlm_router_requests_in_flight gauge"]
        lines += [f'loomlm_router_requests_in_flight{{replica="{i}"}} {n}' for i, n in enumerate(in_flight)]
        for i in range(len(replicas)):
            try:
                text = (await client.get(await address(i) + "/metrics", timeout=10)).text
            except (httpx.HTTPError, OSError):
                continue  # restarting: its series are missing from this scrape
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels = {**sample.labels, "replica": str(i)}
                    rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
                    lines.append(f"{sample.name}{{{rendered}}} {sample.value}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT"])
    async def proxy(path: str, request: Request):
        path = "/" + path
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return family_error(path, f"request body larger than {limit} bytes", 413)
        body = bytes(body)
        i = choose_replica(affinity_key(request.headers, body), in_flight)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        in_flight[i] += 1
        started = time.perf_counter()
        try:
            for attempt in range(2):  # a restarted replica has a new address: ask once more
                try:
                    upstream = await client.send(client.build_request(
                        request.method, await address(i, refresh=attempt > 0) + path, params=request.query_params,
                        headers=headers, content=body), stream=True)
                    break
                except (httpx.ConnectError, httpx.RemoteProtocolError, OSError):
                    if attempt:
                        raise
        except Exception as exc:  # the replica is down (or restarting): only this request fails
            in_flight[i] -= 1
            failed[i] += 1
            logger.warning("router: %s %s -> replica %d failed: %s", request.method, path, i, exc)
            return family_error(path, f"replica {i} is unavailable: {type(exc).__name__}", 502)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except (httpx.HTTPError, OSError) as exc:  # the replica died mid-stream: the stream ends
                failed[i] += 1
                logger.warning("router: %s %s -> replica %d broke off: %s", request.method, path, i, exc)
            finally:
                await upstream.aclose()
                in_flight[i] -= 1
                served[i] += 1
                logger.info("router: %s %s -> replica %d %d %.3fs", request.method, path, i, upstream.status_code,
                            time.perf_counter() - started)

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        out_headers["x-loomlm-replica"] = str(i)
        return StreamingResponse(relay(), status_code=upstream.status_code, headers=out_headers)

    app.state.in_flight = in_flight
    return app


def build_application(model: str, num_replicas: int, engine_kwargs: dict[str, Any] | None = None,
                      app_kwargs: dict[str, Any] | None = None, replica_cpus: float = 0.0):
    """The Ray Serve application: `num_replicas` single-replica deployments of ReplicaServer and the
    router as ingress. `replica_cpus`: Ray CPUs reserved per replica (0: none, so N replicas fit
    a small machine; each engine still uses the threads torch gives it)."""
    from ray import serve

    replica_deployment = serve.deployment(
        ReplicaServer, num_replicas=1, max_ongoing_requests=100000, health_check_period_s=2,
        health_check_timeout_s=30, ray_actor_options={"num_cpus": replica_cpus})
    replicas = [replica_deployment.options(name=f"loomlm-replica-{i}").bind(model, engine_kwargs or {},
                                                                           app_kwargs or {}, i)
                for i in range(num_replicas)]
    router = serve.deployment(serve.ingress()(LoomlmRouter), name="LoomlmRouter", max_ongoing_requests=100000,
                              ray_actor_options={"num_cpus": 0})
    limits = (app_kwargs or {}).get("limits")
    return router.bind(replicas, limits.max_request_body_bytes if limits is not None else None)


class LoomlmRouter:
    """The ingress deployment: holds the replicas' handles; its ASGI app is `build_router_app`."""

    def __init__(self, replicas: list, max_body_bytes: int | None = None) -> None:
        self.replicas = replicas
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        return build_router_app(self.replicas, self.max_body_bytes)


def run_local(model: str, num_replicas: int, engine_kwargs: dict[str, Any] | None = None,
              num_cpus: int = 4) -> str:
    """Start a local Ray (`num_cpus` logical CPUs) and the application on a free loopback port;
    returns its base URL. For tests and benchmarks; `stop_local` ends it."""
    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(model, num_replicas, engine_kwargs), route_prefix="/", name="loomlm")
    return f"http://127.0.0.1:{port}"


def stop_local() -> None:
    """End what `run_local` started: Serve's applications, then the local Ray."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def app_builder(args: dict[str, str]):
    """`serve run loomlm.server.ray_serve:app_builder model=... num_replicas=2 engine_args='{"max_model_len": 2048}'`."""
    engine_kwargs = json.loads(args.get("engine_args", "{}"))
    return build_application(args.get("model", "smollm2-135m-instruct"), int(args.get("num_replicas", 2)),
                             engine_kwargs)


def run_ray_server(model: str, num_replicas: int, host: str, port: int, engine_kwargs: dict[str, Any],
                   app_kwargs: dict[str, Any]) -> None:
    """`loomlm serve --ray`: start or join Ray (RAY_ADDRESS), run the application on Serve's HTTP
    proxy at host:port, and block until interrupted."""
    import ray
    from ray import serve

    try:
        ray.init(ignore_reinit_error=True)
    except Exception as exc:  # noqa: BLE001 - Ray reports a bad RAY_ADDRESS in several types
        raise ValueError(f"could not start or join Ray: {exc}") from exc
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(model, num_replicas, engine_kwargs, app_kwargs), route_prefix="/", name="loomlm")
    logger.info("loomlm on Ray Serve: %d replicas of %s at http://%s:%d/v1", num_replicas, model, host, port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
