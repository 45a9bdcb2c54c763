#!/usr/bin/env python
"""Soak-fuzz a loomlm server with schemathesis (not part of `make test`).

Starts `loomlm serve` (default model `smollm2-135m-instruct`, `--max-model-len 512`,
`--enable-lora`, an empty temporary `--adapter-root`, a free port on 127.0.0.1), or uses an
already running server (`--url`), loads its `/openapi.json` into schemathesis and sends, for
every POST operation:

* `coverage`: schemathesis' deterministic boundary / wrong-type / missing-field cases (positive
  and negative), sampled evenly down to `--coverage-max-cases` per operation (default: the
  `--max-examples` value; -1 = all of them, about 2,000 in total);
* `fuzzing`: `--max-examples` hypothesis-generated cases per operation and per generation mode
  (`positive`: schema-valid bodies with huge / negative numbers, unicode junk, empty strings...;
  `negative`: schema-invalid ones: wrong types, missing required fields, extra nesting...).

Checks: every answer is < 500 (schemathesis' `not_a_server_error`), no request times out
(`--request-timeout`, also for server-sent-event streams, whose total duration is bounded) or
loses its connection; meanwhile a separate process polls `GET /health` every 200 ms (max latency, failures)
and samples the server's resident memory (psutil, or /proc/<pid>/statm). Prints a summary and
exits 1 on any 5xx, timeout, connection error, failed health poll or peak RSS > 2x the idle RSS
(`--max-rss-ratio`); 2 when the server could not be started; 130 on Ctrl-C.

Each distinct failure (route, kind, status, server-side exception) is printed with the request
body, the response text and the server's traceback (from the server log, `--server-log`,
default /tmp/fuzz_server.log), and all of them are written to `--failures-file` (JSON) with a
curl reproducer.

Generated bodies are post-processed so that legitimate requests stay short (`--max-gen-tokens`,
default 8; 0 = off): `max_tokens` / `max_completion_tokens` / `max_new_tokens` (top level and in
TGI's `parameters`) that are ints in (cap, max-model-len] become the cap, and absent / null ones
are set to the cap (a null one otherwise means "up to the context window"). Everything else is
kept as generated: huge numbers beyond the context window, negatives, wrong types, junk text.
Two cases in three whose `model` or LLM Engine's `model_endpoint_name` is a generated string get
the served model's name instead (otherwise nearly every request is a 404 before its body is
looked at), and `/tokenize`, whose route reads the raw body, is given a request body schema
(TGI's `{"inputs"}` or vLLM's `{"prompt" | "messages"}`); `--no-schema-patches` turns both off.

Usage (from the repository root; schemathesis is the optional `fuzz` extra, not in `make test`):

    .venv/bin/pip install -e '.[fuzz]'    # schemathesis
    .venv/bin/python scripts/fuzz_server.py --max-examples 20
    .venv/bin/python scripts/fuzz_server.py --max-examples 100 --seed 1
    .venv/bin/python scripts/fuzz_server.py --url http://127.0.0.1:8000 --operations /tokenize /score
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import math
import multiprocessing
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

try:
    import psutil
except ImportError:  # pragma: no cover - /proc fallback
    psutil = None

POST_ROUTES = [
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/score",
    "/",
    "/generate",
    "/generate_stream",
    "/v1/llm/completions-sync",
    "/v1/llm/completions-stream",
]
LENGTH_KEYS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
# Routes whose bodies generate text, and the length fields each reads (None: TGI's `parameters`).
GENERATING_ROUTES = {
    "/v1/completions": ("max_tokens",),
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/": None,
    "/generate": None,
    "/generate_stream": None,
    "/v1/llm/completions-sync": ("max_new_tokens",),
    "/v1/llm/completions-stream": ("max_new_tokens",),
}
HEALTH_PERIOD_S = 0.2
MIB = 1024 * 1024


class BudgetExceeded(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Machine / process helpers
# --------------------------------------------------------------------------------------------


def cpu_description() -> tuple[str, str]:
    """(model name, best vector ISA) from /proc/cpuinfo."""
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "none (no avx2/avx512f)"
    extras = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    if extras:
        isa += " (+" + ", ".join(extras) + ")"
    return model, isa


def machine_counters() -> dict[str, float]:
    """Kernel OOM kills and pressure-stall totals (seconds), to tell a noisy machine from a slow server."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                out["oom_kills"] = float(line.split()[1])
    for res in ("memory", "cpu", "io"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/pressure/{res}").read_text().splitlines():
                kind, *fields = line.split()
                total = dict(f.split("=") for f in fields)["total"]
                out[f"{res}_{kind}_stall_s"] = int(total) / 1e6
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    """Resident memory of `pid` and its children (bytes), None if it is gone."""
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return total
        except psutil.Error:
            return None
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class Server:
    """`loomlm serve` as a subprocess in its own process group, stderr+stdout to a log file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = args.port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.adapter_root = tempfile.mkdtemp(prefix="fuzz_adapters_")
        self.log_path = Path(args.server_log)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        exe = self.args.loomlm or shutil.which("loomlm", path=str(Path(sys.executable).parent)) or shutil.which("loomlm")
        if not exe:
            raise SystemExit("cannot find the `loomlm` executable (pass --loomlm PATH)")
        cmd = [exe, "serve", self.args.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", str(self.args.max_model_len), "--enable-lora",
               "--adapter-root", self.adapter_root]
        return cmd + shlex.split(self.args.server_args or "")

    def start(self) -> None:
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        print(f"[fuzz] starting: {shlex.join(cmd)}  (log: {self.log_path})", flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before /health answered; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"/health did not answer 200 within {timeout:.0f} s; see {self.log_path}")

    def log_offset(self) -> int:
        with contextlib.suppress(OSError):
            return self.log_path.stat().st_size
        return 0

    def log_since(self, offset: int, limit: int = 400_000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read(limit).decode("utf-8", "replace")
        return ""

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-n:])
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.adapter_root, ignore_errors=True)


def poll_health(base_url: str, timeout: float, stop, results) -> None:
    """Child process: GET /health every HEALTH_PERIOD_S; put (latency_s, error or None, oversleep_s) on `results`.

    In its own process, at a raised priority where allowed, so that the fuzzer's own GIL and CPU use
    (schemathesis is busy) do not show up as server latency: polled from a thread of the fuzzer, the
    poller itself woke up to 200 ms late while a separate process saw the server answer in < 40 ms.
    """
    with contextlib.suppress(OSError):
        os.nice(-5)
    session = requests.Session()
    while not stop.is_set():
        start = time.monotonic()
        error = None
        try:
            r = session.get(base_url + "/health", timeout=timeout)
            if r.status_code != 200:
                error = f"{time.strftime('%H:%M:%S')} /health -> {r.status_code}"
        except requests.RequestException as exc:
            error = f"{time.strftime('%H:%M:%S')} /health: {type(exc).__name__}: {exc}"
        latency = time.monotonic() - start
        pause = max(0.0, HEALTH_PERIOD_S - latency)
        before = time.monotonic()
        stop.wait(pause)
        results.put((latency, error, time.monotonic() - before - pause))
    session.close()


class Monitor(threading.Thread):
    """Collects the /health polls of a separate poller process (latency, failures); samples the server's RSS."""

    def __init__(self, base_url: str, pid: int | None, health_timeout: float, slow_s: float) -> None:
        super().__init__(daemon=True, name="health-monitor")
        self.base_url = base_url
        self.pid = pid
        self.health_timeout = health_timeout
        self.stop_event = threading.Event()
        self.polls = 0
        self.failures: list[str] = []
        self.max_latency_s = 0.0
        self.latencies: list[float] = []
        self.peak_rss = 0
        self.slow_s = slow_s
        self.current: str | None = None  # the fuzz request in flight (set by the Fuzzer)
        self.slow_polls: list[tuple[float, str]] = []  # (latency, the requests in flight meanwhile)
        self.max_oversleep_s = 0.0  # how late the poller itself woke up: the client machine stalling

    def sample_rss(self) -> None:
        if self.pid is not None:
            rss = rss_bytes(self.pid)
            if rss:
                self.peak_rss = max(self.peak_rss, rss)

    def run(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        stop, results = ctx.Event(), ctx.Queue()
        poller = ctx.Process(target=poll_health, args=(self.base_url, self.health_timeout, stop, results),
                             daemon=True, name="health-poller")
        poller.start()
        in_flight_before = self.current
        while not self.stop_event.is_set():
            self.sample_rss()
            try:
                latency, error, oversleep = results.get(timeout=HEALTH_PERIOD_S)
            except queue.Empty:
                continue
            self.polls += 1
            self.latencies.append(latency)
            self.max_latency_s = max(self.max_latency_s, latency)
            self.max_oversleep_s = max(self.max_oversleep_s, oversleep)
            if error:
                self.failures.append(error)
            if latency >= self.slow_s:
                during = {x for x in (in_flight_before, self.current) if x}
                self.slow_polls.append((latency, " | then: ".join(sorted(during)) or "(no fuzz request in flight)"))
            in_flight_before = self.current
        stop.set()
        poller.join(self.health_timeout + 5)
        if poller.is_alive():
            poller.kill()


# --------------------------------------------------------------------------------------------
# Schema preparation and case post-processing
# --------------------------------------------------------------------------------------------


def patch_schema(raw: dict[str, Any], served_model: str | None) -> dict[str, Any]:
    """Give `/tokenize` (whose route reads the raw body) a request body schema."""
    raw = copy.deepcopy(raw)
    schemas = raw.setdefault("components", {}).setdefault("schemas", {})
    tokenize = raw.get("paths", {}).get("/tokenize", {}).get("post")
    if tokenize is not None and "requestBody" not in tokenize:
        opt_bool = {"anyOf": [{"type": "boolean"}, {"type": "null"}]}
        opt_str = {"anyOf": [{"type": "string"}, {"type": "null"}]}
        model = opt_str
        messages = {"type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}} \
            if "ChatMessage" in schemas else {"type": "array", "items": {"type": "object"}}
        body = {"anyOf": [
            {"type": "object", "title": "TGITokenizeRequest", "required": ["inputs"],
             "properties": {"inputs": {"type": "string"}, "add_special_tokens": opt_bool}},
            {"type": "object", "title": "TokenizePromptRequest", "required": ["prompt"],
             "properties": {"model": model, "prompt": {"type": "string"}, "add_special_tokens": {"type": "boolean"},
                            "return_token_strs": {"type": "boolean"}}},
            {"type": "object", "title": "TokenizeChatRequest", "required": ["messages"],
             "properties": {"model": model, "messages": messages, "add_special_tokens": {"type": "boolean"},
                            "add_generation_prompt": {"type": "boolean"},
                            "continue_final_message": {"type": "boolean"}, "chat_template": opt_str,
                            "return_token_strs": {"type": "boolean"}}},
        ]}
        tokenize["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return raw


def use_served_model(case, served_model: str | None, counter: int) -> bool:
    """Two cases in three whose `model` / `model_endpoint_name` is some other string get the served
    model's name instead (the rest keep theirs, for the 404 paths). A schema `anyOf: [{const}, string]`
    would not do: hypothesis-jsonschema merges it into plain `string`."""
    if not served_model or counter % 3 == 0:
        return False
    changed = False
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and case.body["model"] != served_model:
        case.body["model"] = served_model
        changed = True
    query = case.query
    if isinstance(query, dict) and isinstance(query.get("model_endpoint_name"), str) \
            and query["model_endpoint_name"] != served_model:
        query["model_endpoint_name"] = served_model
        changed = True
    return changed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def clamp_lengths(path: str, body: Any, cap: int, max_model_len: int) -> list[str]:
    """Cap generation lengths in place; returns what was changed (for the record)."""
    if cap <= 0 or path not in GENERATING_ROUTES or not isinstance(body, dict):
        return []
    changes = []

    def fix(container: dict, key: str, set_missing: bool) -> None:
        if key not in container or container[key] is None:
            if set_missing:
                changes.append(f"{key}: {'null' if key in container else 'absent'} -> {cap}")
                container[key] = cap
        elif _is_int(container[key]) and cap < container[key] <= max_model_len:
            changes.append(f"{key}: {container[key]} -> {cap}")
            container[key] = cap

    keys = GENERATING_ROUTES[path]
    if keys is None:  # TGI / LoRAX: parameters.max_new_tokens
        params = body.get("parameters")
        if params is None:
            body["parameters"] = params = {}
        if isinstance(params, dict):
            fix(params, "max_new_tokens", True)
    else:
        for key in keys:
            # chat: max_completion_tokens wins when set; fill in max_tokens only
            fix(body, key, key == keys[0])
    return changes


# --------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------


@dataclass
class Failure:
    key: tuple
    route: str
    kind: str  # "5xx", "timeout", "connection", "server-died"
    status: int | None
    phase: str
    mode: str
    body: Any
    query: Any
    sent_bytes: bytes | None
    response_text: str
    server_log: str
    elapsed_s: float
    count: int = 1
    curl: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route, "kind": self.kind, "status": self.status, "phase": self.phase, "mode": self.mode,
            "occurrences": self.count, "body": _jsonable(self.body), "query": _jsonable(self.query),
            "sent_body": None if self.sent_bytes is None else self.sent_bytes.decode("utf-8", "replace"),
            "response_text": self.response_text, "server_log": self.server_log, "elapsed_s": round(self.elapsed_s, 3),
            "curl": self.curl,
        }


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _short(value: Any, n: int = 1200) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= n else text[:n] + f"... [{len(text)} chars]"


def _error_message(content: bytes) -> str:
    """The gist of a 4xx answer in any of the route families' formats, digits and quotes normalized."""
    try:
        data = json.loads(content)
        msg = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        if isinstance(msg, list) and msg and isinstance(msg[0], dict):
            msg = f"{msg[0].get('msg', '')} at {msg[0].get('loc', '')}"
    except (ValueError, AttributeError):
        msg = content[:200].decode("utf-8", "replace")
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'..'", str(msg))
    return re.sub(r"\d+", "N", msg)[:90]


TRACEBACK_RE = re.compile(r"^Traceback \(most recent call last\):", re.M)
HEALTH_ACCESS_RE = re.compile(r'"GET /health HTTP/1\.[01]" 200|GET /health 200 ')


def server_error_excerpt(log: str) -> tuple[str, str]:
    """(the log lines a failing request left, minus /health access lines; the exception line)."""
    lines = [ln for ln in log.splitlines() if not HEALTH_ACCESS_RE.search(ln)]
    text = "\n".join(lines)
    signature = ""
    m = None
    for m in TRACEBACK_RE.finditer(text):
        pass
    if m is not None:
        tb_lines = text[m.start():].splitlines()
        # the exception line: first non-indented line after the traceback header
        for ln in tb_lines[1:]:
            if ln and not ln.startswith((" ", "\t")) and not ln.startswith("Traceback"):
                signature = ln.strip()
                if not ln.startswith(("The above exception", "During handling")):
                    break
    elif lines:
        errs = [ln for ln in lines if " ERROR " in ln or "Exception" in ln]
        signature = errs[-1].strip() if errs else ""
    if len(text) > 20_000:
        text = text[:4000] + "\n[...]\n" + text[-15000:]
    return text, re.sub(r"0x[0-9a-f]+|\d+", "N", signature)[:300]


class Fuzzer:
    def __init__(self, args: argparse.Namespace, base_url: str, server: Server | None, monitor: Monitor) -> None:
        self.args = args
        self.base_url = base_url
        self.server = server
        self.monitor = monitor
        self.session = requests.Session()
        self.requests_per_op: collections.Counter = collections.Counter()
        self.status_per_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.statuses: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()  # 5xx / timeout / connection / client-side
        self.failures: dict[tuple, Failure] = {}
        self.client_errors: collections.Counter = collections.Counter()
        self.clamped = 0
        self.served_model: str | None = None
        self.model_counter = 0
        self.model_swapped = 0
        self.max_latency: dict[str, float] = collections.defaultdict(float)
        self.reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # 4xx messages
        self.slowest: dict[str, Any] = {}
        self.deadline = time.monotonic() + args.max_time if args.max_time else None
        self.server_died = False
        self.lock = threading.Lock()

    # -- one case ------------------------------------------------------------------------------
    def run_case(self, case, phase: str) -> None:
        if self.server_died:
            raise BudgetExceeded("server died")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BudgetExceeded("--max-time reached")
        path = case.operation.path
        label = f"{case.method.upper()} {path}"
        mode = case.meta.generation.mode.value if case.meta is not None else "?"
        if clamp_lengths(path, case.body, self.args.max_gen_tokens, self.args.max_model_len):
            self.clamped += 1
        if not self.args.no_schema_patches:
            self.model_counter += 1
            self.model_swapped += use_served_model(case, self.served_model, self.model_counter)
        body = copy.deepcopy(case.body) if isinstance(case.body, (dict, list)) else case.body
        query = dict(case.query) if case.query else None
        offset = self.server.log_offset() if self.server else 0
        start = time.monotonic()
        self.requests_per_op[label] += 1
        self.monitor.current = f"{label} ({phase}/{mode}) {_short(body, 100_000)}"
        try:
            response = case.call(base_url=self.base_url, session=self.session, timeout=self.args.request_timeout)
        except requests.Timeout as exc:
            self._record_problem(label, "timeout", None, phase, mode, body, query, exc, offset, start)
            return
        except requests.ConnectionError as exc:
            kind = "connection"
            if self.server is not None and not self.server.alive():
                kind, self.server_died = "server-died", True
            self._record_problem(label, kind, None, phase, mode, body, query, exc, offset, start)
            return
        except Exception as exc:  # noqa: BLE001 - a client-side problem (serialization...), not the server's
            self.client_errors[f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"] += 1
            return
        elapsed = time.monotonic() - start
        self.monitor.current = None
        status = response.status_code
        self.statuses[status] += 1
        self.status_per_op[label][status] += 1
        if elapsed > self.max_latency[label]:
            self.max_latency[label] = elapsed
            self.slowest[label] = (round(elapsed, 2), status, _short(body, 300))
        if 400 <= status < 500:
            self.reasons[label][f"{status} {_error_message(response.content)}"] += 1
        cut_short = getattr(response, "stream_cut_short", False)
        if status >= 500:
            self._record_problem(label, "5xx", status, phase, mode, body, query, response, offset, start)
        elif elapsed >= self.args.request_timeout or (cut_short and elapsed >= self.args.request_timeout * 0.95):
            self._record_problem(label, "timeout", status, phase, mode, body, query, response, offset, start)

    def _record_problem(self, label, kind, status, phase, mode, body, query, obj, offset, start) -> None:
        elapsed = time.monotonic() - start
        self.monitor.current = None
        if kind != "5xx":
            self.statuses[kind] += 1
            self.status_per_op[label][kind] += 1
        self.kinds[kind] += 1
        if self.server is not None:
            time.sleep(0.3)  # let the server's log catch up
            log_text, signature = server_error_excerpt(self.server.log_since(offset))
        else:
            log_text, signature = "", ""
        request = getattr(obj, "request", None)
        sent = getattr(request, "body", None)
        if isinstance(sent, str):
            sent = sent.encode()
        if hasattr(obj, "status_code"):
            text = obj.content.decode("utf-8", "replace") if obj.content else ""
        else:
            text = f"{type(obj).__name__}: {obj}"
        if not signature:
            signature = re.sub(r"\d+", "N", text[:200])
        key = (label, kind, status, signature)
        url = getattr(request, "url", None) or self.base_url + label.split(" ", 1)[1]
        method = getattr(request, "method", None) or label.split(" ", 1)[0]
        curl = (f"curl -sS -m {int(self.args.request_timeout)} -X {method} {shlex.quote(url)} "
                f"-H 'Content-Type: application/json' --data-binary {shlex.quote((sent or b'').decode('utf-8', 'replace'))}")
        with self.lock:
            old = self.failures.get(key)
            if old is None:
                self.failures[key] = Failure(key, label, kind, status, phase, mode, body, query, sent, text[:4000],
                                             log_text, elapsed, curl=curl)
                print(f"\n[fuzz] NEW FAILURE {kind} {status or ''} {label} ({phase}/{mode}, {elapsed:.1f} s): "
                      f"{signature or text[:200]}\n       body: {_short(body, 600)}", flush=True)
            else:
                old.count += 1
                # keep the smallest reproducer
                if sent is not None and (old.sent_bytes is None or len(sent) < len(old.sent_bytes)):
                    old.body, old.query, old.sent_bytes, old.response_text, old.server_log, old.curl = (
                        body, query, sent, text[:4000], log_text, curl)

    # -- phases ----------------------------------------------------------------------------------
    def coverage(self, schema, op) -> None:
        from schemathesis import GenerationMode

        limit = self.args.coverage_max_cases
        if limit == 0:
            return
        modes = [GenerationMode(m) for m in self.args.modes]
        gen_config = schema.config.generation_for(operation=op, phase="coverage")
        cases = list(schema.iter_coverage_cases(op, generation_modes=modes, generation_config=gen_config))
        if limit is not None and limit > 0 and len(cases) > limit:
            step = len(cases) / limit
            cases = [cases[int(i * step)] for i in range(limit)]
        for case in cases:
            self.run_case(case, "coverage")

    def fuzz(self, op, mode_name: str) -> None:
        from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
        from schemathesis import GenerationMode

        strategy = op.as_strategy(generation_mode=GenerationMode(mode_name))
        deco = settings(max_examples=self.args.max_examples, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
                        verbosity=Verbosity.quiet, report_multiple_bugs=False)

        @deco
        @given(case=strategy)
        def test(case) -> None:
            self.run_case(case, "fuzzing")

        if self.args.seed is not None:
            test = seed(self.args.seed)(test)
        test()


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--url", help="fuzz an already running server (http://host:port) instead of starting one "
                                 "(then RSS is not measured)")
    p.add_argument("--max-examples", type=int, default=100,
                   help="hypothesis examples per POST operation and per generation mode (default: 100)")
    p.add_argument("--coverage-max-cases", type=int, default=None,
                   help="coverage-phase cases per operation, sampled evenly (default: --max-examples; "
                        "-1: all; 0: skip the coverage phase)")
    p.add_argument("--modes", default="positive,negative", help="generation modes (default: positive,negative)")
    p.add_argument("--operations", nargs="*", default=None,
                   help="only these POST paths (default: all of them: " + " ".join(POST_ROUTES) + ")")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    p.add_argument("--max-gen-tokens", type=int, default=8,
                   help="cap on generated tokens of legitimate requests (default: 8; 0 = leave bodies alone)")
    p.add_argument("--no-schema-patches", action="store_true",
                   help="fuzz /openapi.json as served (no /tokenize body schema) and leave generated model "
                        "names alone")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    p.add_argument("--max-time", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--max-rss-ratio", type=float, default=2.0, help="fail if peak RSS > this x idle RSS (default: 2)")
    p.add_argument("--health-timeout", type=float, default=10.0, help="timeout of each /health poll (default: 10 s)")
    p.add_argument("--slow-health-ms", type=float, default=1000.0,
                   help="list /health polls slower than this with the request in flight (default: 1000)")
    p.add_argument("--show-reasons", type=int, default=3, metavar="N",
                   help="print the N most frequent 4xx messages per operation (default: 3; 0: none)")
    p.add_argument("--failures-file", default="/tmp/fuzz_server_failures.json")
    g = p.add_argument_group("the server this script starts (without --url)")
    g.add_argument("--model", default="smollm2-135m-instruct")
    g.add_argument("--max-model-len", type=int, default=512)
    g.add_argument("--port", type=int, default=0, help="default: a free port")
    g.add_argument("--server-args", default="", help="extra `loomlm serve` arguments (one shell-quoted string)")
    g.add_argument("--server-log", default="/tmp/fuzz_server.log", help="the server's stdout+stderr")
    g.add_argument("--loomlm", default=None, help="the loomlm executable (default: next to this python)")
    g.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health (default: 600)")
    g.add_argument("--no-warmup", action="store_true",
                   help="skip the uncounted warm-up completion sent before fuzzing (first-use kernel compilation)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.coverage_max_cases is None:
        args.coverage_max_cases = args.max_examples
    elif args.coverage_max_cases < 0:
        args.coverage_max_cases = -1
    return args


def served_model_name(base_url: str) -> str | None:
    with contextlib.suppress(Exception):
        data = requests.get(base_url + "/v1/models", timeout=30).json()
        return data["data"][0]["id"]
    return None


def warmup(base_url: str, model: str | None) -> None:
    body = {"prompt": "Hello", "max_tokens": 2}
    if model:
        body["model"] = model
    start = time.monotonic()
    try:
        r = requests.post(base_url + "/v1/completions", json=body, timeout=600)
        print(f"[fuzz] warm-up completion: {r.status_code} in {time.monotonic() - start:.1f} s", flush=True)
    except requests.RequestException as exc:
        print(f"[fuzz] warm-up failed: {exc}", flush=True)


def print_summary(args, fuzzer: Fuzzer, monitor: Monitor, idle_rss: int | None, wall_s: float,
                  interrupted: str | None, counters: tuple[dict, dict]) -> int:
    model, isa = cpu_description()
    total = sum(fuzzer.requests_per_op.values())
    print("\n" + "=" * 100)
    print("fuzz_server summary" + (f"  (stopped early: {interrupted})" if interrupted else ""))
    print("=" * 100)
    print(f"command:       {shlex.join([sys.executable] + sys.argv)}")
    print(f"CPU:           {model}; vector ISA: {isa}; {os.cpu_count()} logical CPUs")
    print(f"target:        {fuzzer.base_url}; modes {','.join(args.modes)}; --max-examples {args.max_examples}; "
          f"coverage cases/op {'all' if args.coverage_max_cases < 0 else args.coverage_max_cases}; "
          f"seed {args.seed}; timeout {args.request_timeout:g} s; length cap {args.max_gen_tokens} "
          f"({fuzzer.clamped} bodies capped); served model name put in {fuzzer.model_swapped}")
    print(f"\n{'operation':34} {'requests':>8} {'max s':>7}  statuses")
    for label in sorted(fuzzer.requests_per_op):
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(fuzzer.status_per_op[label].items(), key=lambda kv: str(kv[0])))
        print(f"{label:34} {fuzzer.requests_per_op[label]:8d} {fuzzer.max_latency.get(label, 0):7.2f}  {hist}")
    print(f"{'TOTAL':34} {total:8d}")
    if args.show_reasons:
        print(f"\nmost frequent 4xx answers per operation (top {args.show_reasons}):")
        for label in sorted(k for k in fuzzer.reasons if k.startswith("POST ")):
            print(f"  {label}")
            for msg, n in fuzzer.reasons[label].most_common(args.show_reasons):
                print(f"    {n:5d}  {msg}")
    print("\nstatus histogram: " + ", ".join(f"{k}: {v}" for k, v in sorted(fuzzer.statuses.items(), key=lambda kv: str(kv[0]))))
    n5xx, ntimeout = fuzzer.kinds["5xx"], fuzzer.kinds["timeout"]
    nconn = fuzzer.kinds["connection"] + fuzzer.kinds["server-died"]
    print(f"5xx answers:   {n5xx}")
    print(f"timeouts:      {ntimeout}")
    print(f"conn. errors:  {nconn}" + ("  (THE SERVER DIED)" if fuzzer.server_died else ""))
    if fuzzer.client_errors:
        print(f"client-side errors (not counted against the server): {sum(fuzzer.client_errors.values())}")
        for msg, n in fuzzer.client_errors.most_common(10):
            print(f"    {n:5d}  {msg}")
    lat = sorted(monitor.latencies)
    p99 = lat[min(len(lat) - 1, int(math.ceil(0.99 * len(lat))) - 1)] * 1000 if lat else 0.0
    print(f"/health:       {monitor.polls} polls, max latency {monitor.max_latency_s * 1000:.1f} ms, "
          f"p99 {p99:.1f} ms, {len(monitor.failures)} failed")
    for f in monitor.failures[:10]:
        print(f"    {f}")
    if monitor.slow_polls:
        print(f"slow /health polls (>= {monitor.slow_s * 1000:.0f} ms): {len(monitor.slow_polls)}; the slowest, "
              "with the fuzz request(s) in flight meanwhile:")
        for latency, during in sorted(monitor.slow_polls, reverse=True)[:5]:
            print(f"    {latency * 1000:7.0f} ms  {during[:2000]}")
    rss_failed = False
    if idle_rss:
        peak = max(monitor.peak_rss, idle_rss)
        ratio = peak / idle_rss
        rss_failed = ratio > args.max_rss_ratio
        print(f"RSS:           idle {idle_rss / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, ratio {ratio:.2f}"
              + (f"  (> {args.max_rss_ratio:g}: FAIL)" if rss_failed else ""))
    else:
        print("RSS:           not measured (--url)")
    print(f"wall time:     {wall_s:.0f} s ({total / wall_s if wall_s else 0:.1f} requests/s)")
    before, after = counters
    delta = {k: after[k] - before[k] for k in after if k in before}
    if delta:
        print("machine:       " + ", ".join(
            f"{k} {v:.0f}" if k == "oom_kills" else f"{k} {v:.1f}" for k, v in delta.items()
            if k == "oom_kills" or k.endswith("_stall_s")) + f"; health poller woke up to "
              f"{monitor.max_oversleep_s * 1000:.0f} ms late")
        if delta.get("oom_kills", 0) > 0 or delta.get("memory_full_stall_s", 0) > 1 or monitor.max_oversleep_s > 1:
            print("WARNING:       this machine stalled during the run (kernel OOM kills / memory pressure / the "
                  "client itself descheduled):\n               slow or failed /health polls and timeouts may not "
                  "be the server's fault (see dmesg)")
    if fuzzer.failures:
        print(f"\n{len(fuzzer.failures)} distinct failure(s) (details in {args.failures_file}):")
        for i, f in enumerate(sorted(fuzzer.failures.values(), key=lambda f: (f.route, f.kind)), 1):
            print(f"\n--- #{i} {f.kind} {f.status or ''} {f.route}  x{f.count}  ({f.phase}/{f.mode}, {f.elapsed_s:.1f} s)")
            if f.query:
                print(f"query:    {_short(f.query, 400)}")
            print(f"body:     {_short(f.body, 1500)}")
            print(f"response: {f.response_text[:800]}")
            if f.server_log:
                tb = f.server_log
                m = None
                for m in TRACEBACK_RE.finditer(tb):
                    pass
                excerpt = tb[m.start():] if m else tb
                print("server log:\n    " + "\n    ".join(excerpt.splitlines()[-30:]))
            print(f"reproduce: {f.curl[:3000]}")
    with contextlib.suppress(OSError):
        Path(args.failures_file).write_text(json.dumps({
            "failures": [f.to_json() for f in fuzzer.failures.values()],
            "slow_health_polls": [{"latency_ms": round(lat * 1000), "in_flight": during}
                                  for lat, during in sorted(monitor.slow_polls, reverse=True)],
        }, indent=2, ensure_ascii=False))
    failed = bool(n5xx or ntimeout or nconn or monitor.failures or rss_failed)
    print("\nRESULT: " + ("FAIL" if failed else "PASS") + (" (incomplete run)" if interrupted else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import schemathesis
    except ImportError:
        print("schemathesis is not installed: .venv/bin/pip install schemathesis", file=sys.stderr)
        return 2

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    server: Server | None = None
    monitor: Monitor | None = None
    fuzzer: Fuzzer | None = None
    idle_rss = None
    interrupted = None
    t0 = time.monotonic()
    try:
        if args.url:
            base_url = args.url.rstrip("/")
        else:
            server = Server(args)
            server.start()
            try:
                server.wait_healthy(args.startup_timeout)
            except RuntimeError as exc:
                print(f"[fuzz] {exc}", file=sys.stderr)
                return 2
            base_url = server.base_url
            time.sleep(1.0)
            idle_rss = rss_bytes(server.proc.pid)
            print(f"[fuzz] server up on {base_url} (pid {server.proc.pid}) after {time.monotonic() - t0:.0f} s; "
                  f"idle RSS {idle_rss / MIB if idle_rss else 0:.0f} MiB", flush=True)
        served = served_model_name(base_url)
        raw = requests.get(base_url + "/openapi.json", timeout=30).json()
        if not args.no_schema_patches:
            raw = patch_schema(raw, served)
        schema = schemathesis.openapi.from_dict(raw)
        schema.config.max_stream_events = 1_000_000  # read streams to their end (bounded by the timeout)
        schema.config.request_timeout = args.request_timeout
        schema.config.output.sanitization.update(enabled=False)
        ops = []
        for result in schema.get_all_operations():
            op = result.ok()
            if op.method.upper() == "POST" and (args.operations is None or op.path in args.operations):
                ops.append(op)
        missing = [r for r in (args.operations or POST_ROUTES) if r not in {op.path for op in ops}]
        if missing:
            print(f"[fuzz] WARNING: not in /openapi.json as POST operations: {missing}", flush=True)
        if not args.no_warmup:
            warmup(base_url, served)
        monitor = Monitor(base_url, server.proc.pid if server else None, args.health_timeout,
                          args.slow_health_ms / 1000)
        monitor.sample_rss()
        monitor.start()
        fuzzer = Fuzzer(args, base_url, server, monitor)
        fuzzer.served_model = served
        counters_before = machine_counters()
        t0 = time.monotonic()
        for op in ops:
            label = f"POST {op.path}"
            t_op = time.monotonic()
            print(f"[fuzz] {label}: coverage", end="", flush=True)
            try:
                fuzzer.coverage(schema, op)
                for mode in args.modes:
                    print(f", {mode} fuzzing", end="", flush=True)
                    fuzzer.fuzz(op, mode)
            except BudgetExceeded as exc:
                interrupted = str(exc)
            sent = sum(n for k, n in fuzzer.requests_per_op.items() if k.split(" ", 1)[1] == op.path)
            print(f" -> {sent} requests in {time.monotonic() - t_op:.0f} s", flush=True)
            if interrupted:
                break
    except KeyboardInterrupt:
        interrupted = "interrupted"
        print("\n[fuzz] interrupted", flush=True)
    finally:
        wall = time.monotonic() - t0
        if monitor is not None:
            monitor.stop_event.set()
            monitor.join(5)
        if server is not None:
            if server.alive() and monitor is not None:
                monitor.sample_rss()
            elif not server.alive() and fuzzer is not None:
                fuzzer.server_died = True
            print(f"[fuzz] stopping the server (log: {server.log_path})", flush=True)
            server.stop()
    if fuzzer is None or monitor is None:
        return 130 if interrupted == "interrupted" else 2
    code = print_summary(args, fuzzer, monitor, idle_rss, wall, interrupted, (counters_before, machine_counters()))
    return 130 if interrupted == "interrupted" and code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
