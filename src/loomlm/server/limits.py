"""Bounds on what one request may ask of the server, checked before any expensive work.

Two layers:
- `RequestLimitsMiddleware` (ASGI, before FastAPI reads anything): refuses new work while the
  process is near its memory ceiling (503, or 429 on the LoRAX / TGI routes, with
  `Retry-After`), caps the body while it is being read (413), and checks that a body is
  strict JSON (RFC 8259: UTF-8, no NaN / Infinity / overflowing numbers, no lone surrogates,
  nested at most `max_json_depth` deep) before any route parses it. Each refusal is in the
  path's API family format (`loomlm.server.errors.error_builder_for`).
- `ServerLimits.check_params` / `check_count`: the per-field caps (n, best_of, stop strings,
  logit_bias entries, structured-output size, prompts / values / messages per request), one
  rule set under every face, each a ValueError whose message starts with the field's name.

Sources for the numbers: OpenAI's API reference (n <= 128, best_of <= 20, top_logprobs <= 20),
vLLM's `max_logprobs` (20), TGI's launcher flags (`--max-best-of 2`, `--max-stop-sequences 4`,
`--max-top-n-tokens 5`; those stay on the TGI routes, `loomlm.server.tgi_params`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loomlm.server.errors import error_builder_for

if TYPE_CHECKING:
    from loomlm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

# Bodies larger than this are checked in a worker thread (parsing 4 MiB takes ~30 ms).
_INLINE_CHECK_BYTES = 64 << 10
# An oversized body is read and dropped up to this many times the limit before the 413.
_DRAIN_FACTOR = 8
# Seconds a refused client is told to wait before retrying (Retry-After).
_RETRY_AFTER_S = 5


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine, or of its cgroup when that is smaller (bytes); None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cgroup = f.read().strip()
        if cgroup.isdigit():
            total = min(total, int(cgroup))
    except OSError:
        pass
    return total


def process_rss_bytes() -> int:
    """This process's resident set size in bytes (Linux `/proc/self/statm`; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _default_memory_ceiling() -> int | None:
    total = machine_memory_bytes()
    return int(total * 0.9) if total else None


def parse_memory_size(value: str) -> int:
    """`--max-process-memory` values: bytes (`21474836480`; 0: no ceiling), with a unit (`20GiB`,
    `20G`, `512MB`), or a share of the machine's memory (`90%`). Raises ValueError for anything else."""
    text = value.strip().lower().replace(" ", "")
    if text.endswith("%"):
        share = float(text[:-1])
        total = machine_memory_bytes()
        if not 0 < share <= 100 or total is None:
            raise ValueError(f"memory size {value!r}: a share must be in (0, 100] on a machine whose memory is known.")
        return int(total * share / 100)
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "b": 1}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, scale = text, 1
    try:
        size = float(number) * scale
    except ValueError:
        raise ValueError(f"memory size {value!r}: expected bytes, a size like 20GiB, or a share like 90%.") from None
    if not math.isfinite(size) or size < 0:
        raise ValueError(f"memory size {value!r} must be non-negative (0: no ceiling).")
    return int(size)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; every field has a `loomlm serve` flag of the same name
    (`max_process_memory_bytes`: `--max-process-memory`, which also takes `20GiB` or `90%`).

    Attributes:
        max_request_body_bytes: a larger body is refused with 413 while it is read.
        max_json_depth: arrays / objects nested deeper are a 400 (JSON schemas nest ~2 levels per level).
        max_name_chars: longest model name or adapter id.
        max_n: choices per prompt (OpenAI's limit).
        max_best_of: sequences sampled per prompt to pick from (OpenAI's limit; TGI routes: 2).
        max_prompts_per_request: prompts in one batched `/v1/completions` body.
        max_score_values: continuations in one `/score` body.
        max_messages: chat messages in one body.
        max_tools: `tools` in one chat body.
        max_merged_adapters: adapters in one LoRAX `merged_adapters`.
        max_stop_sequences: stop strings (and `bad_words`) per request.
        max_stop_chars: longest stop string / bad word.
        max_token_id_list: entries of `stop_token_ids`, `allowed_token_ids` and `logit_bias`.
        max_structured_output_chars: a JSON schema (serialized), regex, grammar or choice list.
        chat_template_timeout_s: rendering time allowed to a request-supplied chat template.
        trust_request_chat_template: accept `chat_template` in request bodies (vLLM's
            `--trust-request-chat-template`); off, such a request is a 400.
        max_process_memory_bytes: resident memory above which new requests are refused
            (None: 90 % of the machine's memory; 0: no ceiling).
    """

    max_request_body_bytes: int = 4 << 20
    max_json_depth: int = 64
    max_name_chars: int = 256
    max_n: int = 128
    max_best_of: int = 20
    max_prompts_per_request: int = 256
    max_score_values: int = 256
    max_messages: int = 1024
    max_tools: int = 128
    max_merged_adapters: int = 16
    max_stop_sequences: int = 64
    max_stop_chars: int = 1024
    max_token_id_list: int = 4096
    max_structured_output_chars: int = 128 << 10
    chat_template_timeout_s: float = 1.0
    trust_request_chat_template: bool = False
    max_process_memory_bytes: int | None = field(default_factory=_default_memory_ceiling)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "int" and getattr(self, f.name) < 1:  # the counts and sizes
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)}.")
        if not self.chat_template_timeout_s > 0:
            raise ValueError(f"chat_template_timeout_s must be positive, got {self.chat_template_timeout_s}.")
        if self.max_process_memory_bytes is not None and self.max_process_memory_bytes < 0:
            raise ValueError("max_process_memory_bytes must be non-negative (0: no ceiling).")

    # ------------------------------------------------------------------ fields
    def check_count(self, name: str, count: int, maximum: int, what: str = "entries") -> None:
        """ValueError `"{name} has {count} {what}; at most {maximum} are allowed."` when count > maximum."""
        if count > maximum:
            raise ValueError(f"{name} has {count} {what}; at most {maximum} are allowed.")

    def check_name(self, name: str, value: str | None) -> None:
        """A model name or adapter id: at most `max_name_chars`, no NUL. Raises ValueError."""
        if value is None:
            return
        if len(value) > self.max_name_chars:
            raise ValueError(f"{name} is {len(value)} characters long; at most {self.max_name_chars} are allowed.")
        if "\x00" in value:
            raise ValueError(f"{name} must not contain NUL characters.")

    def check_params(self, params: SamplingParams, max_best_of: int | None = None) -> None:
        """Per-request caps on sampling parameters; `max_best_of` overrides the default (TGI: 2).

        Raises ValueError whose message starts with the offending field's name.
        """
        if params.n > self.max_n:
            raise ValueError(f"n must be at most {self.max_n}, got {params.n}.")
        best_of_cap = self.max_best_of if max_best_of is None else max_best_of
        if params.best_of is not None and params.best_of > best_of_cap:
            raise ValueError(f"best_of must be at most {best_of_cap}, got {params.best_of}.")
        for name, strings in (("stop", params.stop or []), ("bad_words", params.bad_words or [])):
            self.check_count(name, len(strings), self.max_stop_sequences, "strings")
            longest = max((len(s) for s in strings), default=0)
            if longest > self.max_stop_chars:
                raise ValueError(f"{name} has a string of {longest} characters; at most {self.max_stop_chars} "
                                 "are allowed.")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                          ("logit_bias", params.logit_bias)):
            self.check_count(name, len(ids or ()), self.max_token_id_list)
        structured = params.structured_outputs
        if structured is not None:
            size = _structured_output_chars(structured)
            if size > self.max_structured_output_chars:
                raise ValueError(f"structured_outputs is {size} characters long; at most "
                                 f"{self.max_structured_output_chars} are allowed.")


def _structured_output_chars(structured: StructuredOutputsParams) -> int:
    """The size of a structured-output constraint in characters (the schema serialized)."""
    total = 0
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(structured, name, None)
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(str(v)) for v in value)
        elif value is not None:
            total += len(json.dumps(value))
    return total


# ---------------------------------------------------------------------- body checks
class BodyProblem(ValueError):
    """A request body that is not strict JSON (the message says why)."""


def _reject_constant(name: str) -> Any:
    raise BodyProblem(f"Invalid JSON body: {name} is not a JSON number.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyProblem(f"Invalid JSON body: the number {text[:32]} is out of range.")
    return value


def check_json_body(body: bytes, max_depth: int) -> None:
    """Raise BodyProblem unless `body` is strict JSON: UTF-8, no NaN / Infinity, finite numbers, no
    lone surrogates in any string, at most `max_depth` nested arrays / objects. A body that is not
    JSON at all passes (FastAPI's own parse then reports it in the family's format)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyProblem(f"The request body is not valid UTF-8 (invalid byte at offset {exc.start}).") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BodyProblem(f"Invalid JSON body: nested more than {max_depth} levels deep.") from None
    except BodyProblem:
        raise
    except json.JSONDecodeError:
        return  # not JSON at all: FastAPI's parse reports it
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise BodyProblem(f"Invalid JSON body: {exc}") from None
    # Depth without recursion: (value, depth) pairs.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise BodyProblem(f"Invalid JSON body: nested more than {max_depth} levels deep.")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    try:
        # A lone surrogate ("\ud800" escaped in the JSON) cannot be encoded; this finds one anywhere.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BodyProblem("Invalid JSON body: a string contains a lone UTF-16 surrogate (invalid Unicode).") from None


class RequestLimitsMiddleware:
    """ASGI middleware enforcing `ServerLimits` on request bodies and memory (see the module docstring).

    Refusals are counted in `metrics.requests_refused{reason}` (memory, body_too_large, invalid_body).
    """

    def __init__(self, app: ASGIApp, limits: ServerLimits, metrics: Any = None) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics

    def _refuse(self, scope: Scope, reason: str, message: str, status: int | None = None,
                headers: dict[str, str] | None = None):
        builder, validation_status = error_builder_for(scope["app"], scope["path"])
        response = builder(message, status or validation_status, None)
        for key, value in (headers or {}).items():
            response.headers[key] = value
        if self.metrics is not None:
            self.metrics.requests_refused.labels(reason).inc()
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        ceiling = self.limits.max_process_memory_bytes
        if ceiling and (rss := process_rss_bytes()) > ceiling:
            # TGI's word for "no capacity now" is 429 overloaded (its family's bad bodies are 422);
            # the others say 503.
            _, validation_status = error_builder_for(scope["app"], scope["path"])
            status = 429 if validation_status == 422 else 503
            message = (f"The server is near its memory ceiling ({rss >> 20} MiB resident of "
                       f"{ceiling >> 20} MiB): retry later.")
            response = self._refuse(scope, "memory", message, status, {"retry-after": str(_RETRY_AFTER_S)})
            await response(scope, receive, send)
            return
        limit = self.limits.max_request_body_bytes
        too_large = f"The request body is larger than {limit} bytes (--max-request-body-bytes)."
        declared = Headers(scope=scope).get("content-length")
        chunks: list[bytes] = []
        size = 0
        is_too_large = declared is not None and declared.isdigit() and int(declared) > limit
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            more_body = message.get("more_body", False)
            size += len(chunk)
            is_too_large = is_too_large or size > limit
            if is_too_large:
                # Read on (and drop) a moderately oversized body, so the client, still sending,
                # gets to read the 413 rather than a reset connection; a huge one is cut off.
                if size > _DRAIN_FACTOR * limit:
                    break
                continue
            chunks.append(chunk)
        if is_too_large:
            await self._refuse(scope, "body_too_large", too_large, 413)(scope, receive, send)
            return
        body = b"".join(chunks)
        if body:
            try:
                if len(body) > _INLINE_CHECK_BYTES:
                    await anyio.to_thread.run_sync(check_json_body, body, self.limits.max_json_depth)
                else:
                    check_json_body(body, self.limits.max_json_depth)
            except BodyProblem as exc:
                await self._refuse(scope, "invalid_body", str(exc))(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            # The body once, then the real channel (the routes watch it for the client's disconnect).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
