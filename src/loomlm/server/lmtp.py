"""LMQL's model transport protocol (LMTP) on the loomlm server, so that the unmodified `lmql`
package runs its programs on loomlm: `lmql.model("<served model>", endpoint="HOST:PORT",
tokenizer=<the model's tokenizer>)`.

The protocol is the websocket one of `lmql serve-model` (lmql 0.7.3:
lmql/models/lmtp/lmtp_inference_server.py, lmtp_scheduler.py, and the client, lmtp_client.py),
on the server's root path `ws://HOST:PORT/`. Every message is `"<COMMAND> <json>"`:

- client -> server: `GENERATE {"stream_id", "model", "prompt": [token ids], "max_tokens" (32),
  "temperature" (0.0), "top_logprobs" (1), "logit_bias": {id: bias}, top_p, top_k,
  repetition_penalty, presence_penalty, frequency_penalty}`; `SCORE {"stream_id", "model",
  "prompt": [ids], "scored": [ids]}`; `MODEL_INFO {"stream_id", "model"}`.
- server -> client: `TOKEN [{"stream_id", "token", "logprob", "finish_reason", "top_logprobs":
  {id: logprob}}, ...]` (one entry per generated or scored token; the stream's last carries
  finish_reason "stop" at EOS or "length", and a failed stream one `{"stream_id", "error"}`),
  and `MSG [{"stream_id", "model_info" | "error"}]` answering MODEL_INFO.

As `lmql serve-model`'s transformers backend, log-probabilities are those of the distribution
sampled from (after `logit_bias`, LMQL's token masks of +-100, and temperature:
`logprobs_mode="processed_logprobs"`), the generation stops at EOS, and a score is the
log-probability of each scored token after everything before it (0.0 for a first token with
nothing before it). Each stream is one engine request, batched with every other request of the
server. Bounds: a message is at most `ServerLimits.max_request_body_bytes`, a connection runs at
most `MAX_STREAMS_PER_CONNECTION` streams at once, prompts and parameters pass the engine's
`InputProcessor`; a bad command fails only its stream. With API keys configured, the websocket
handshake must present one (`Authorization: Bearer KEY`), else it is refused (close code 1008).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.datastructures import Headers

from loomlm import __version__
from loomlm.outputs import json_logprob
from loomlm.sampling_params import SamplingParams
from loomlm.server.auth import APIKeyChecker, presented_keys
from loomlm.server.limits import ServerLimits

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine
    from loomlm.lora.request import LoRARequest
    from loomlm.server.metrics import ServerMetrics

logger = logging.getLogger("loomlm.server")

LMTP_PATH = "/"
MAX_STREAMS_PER_CONNECTION = 1024
# lmql's scheduler defaults (lmtp_scheduler.py: GenerateBatch.from_calls, TokenStreamer).
DEFAULT_MAX_TOKENS = 32
DEFAULT_TEMPERATURE = 0.0
# GENERATE's decoding arguments beyond the protocol's own (lmtp_dcmodel.py's EXTRA_DECODING_PARAMETERS);
# length_penalty only matters to beam search in transformers' generate, so it is accepted and unused.
_PASSED_ON = ("top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty")
_IGNORED = ("length_penalty",)
_POLICY_VIOLATION = 1008  # websocket close code: the handshake lacked a valid API key
_MESSAGE_TOO_BIG = 1009


class LMTPError(ValueError):
    """A command that cannot run; its message goes back to the client on the command's stream."""


def _token_ids(name: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise LMTPError(f"{name} must be a list of token ids.")
    return value


def generate_params(data: dict[str, Any]) -> SamplingParams:
    """GENERATE's arguments (the prompt, stream_id and model taken out) -> SamplingParams.

    Raises LMTPError for an unknown argument or a bad value.
    """
    data = dict(data)
    kwargs: dict[str, Any] = {
        "max_tokens": data.pop("max_tokens", DEFAULT_MAX_TOKENS),
        "temperature": data.pop("temperature", DEFAULT_TEMPERATURE),
        "logprobs": data.pop("top_logprobs", 1),
        "logprobs_mode": "processed_logprobs",
        "detokenize": False,  # LMQL detokenizes on its side
    }
    bias = data.pop("logit_bias", None)
    if bias:
        if not isinstance(bias, dict):
            raise LMTPError("logit_bias must map token ids to biases.")
        kwargs["logit_bias"] = bias
    kwargs.update({name: data.pop(name) for name in _PASSED_ON if name in data})
    for name in _IGNORED:
        data.pop(name, None)
    if data:
        raise LMTPError(f"unsupported GENERATE arguments: {sorted(data)}; supported: max_tokens, temperature, "
                        f"top_logprobs, logit_bias, {', '.join(_PASSED_ON + _IGNORED)}.")
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as exc:
        raise LMTPError(str(exc)) from exc


def token_payload(stream_id: int, token: int, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    """One TOKEN entry: the token, its logprob and the top alternatives (the token's own included)."""
    top = {str(t): json_logprob(lp.logprob) for t, lp in (logprobs or {}).items()}
    return {"token": token, "stream_id": stream_id, "logprob": top.get(str(token), 0.0),
            "finish_reason": finish_reason, "top_logprobs": top}


def model_info(engine: AsyncLLMEngine) -> dict[str, Any]:
    """MODEL_INFO's answer (lmql's transformers backend sends model, model_type, constructor, versions)."""
    name = engine.served_model_name
    return {"model": name, "model_type": "loomlm", "constructor": f"loomlm.AsyncLLMEngine({name!r})",
            "loomlm": __version__}


async def resolve_model(engine: AsyncLLMEngine, limits: ServerLimits, model: Any) -> LoRARequest | None:
    """The adapter a command's `model` names (None: the served model, or no name). Raises LMTPError
    for any other name, as `lmql serve-model` refuses a model it has not loaded."""
    if model is not None and not isinstance(model, str):
        raise LMTPError("model must be a string.")
    try:
        limits.check_name("model", model)
        return await engine.lora_for_model(model)
    except LookupError:
        raise LMTPError(f"The requested model {model!r} is not loaded; this server serves "
                        f"{engine.served_model_name!r}.") from None
    except ValueError as exc:
        raise LMTPError(str(exc)) from exc


async def generate_entries(engine: AsyncLLMEngine, stream_id: Any, data: dict[str, Any], request_id: str,
                           lora: LoRARequest | None = None) -> AsyncIterator[dict[str, Any]]:
    """GENERATE: one TOKEN entry per generated token, the last with its finish_reason.

    `data`: the command's arguments without stream_id and model. Raises LMTPError or ValueError
    (from the engine's checks) before the first entry for bad input.
    """
    data = dict(data)
    prompt = _token_ids("prompt", data.pop("prompt", None))
    params = generate_params(data)
    if params.logit_bias and len(params.logit_bias) > len(engine.tokenizer):
        raise LMTPError("logit_bias has more entries than the vocabulary.")
    # lmql asks for a chunk (16, or 128 for "no limit") without knowing the window: generate what fits.
    room = engine.max_model_len - len(prompt)
    if params.max_tokens is not None and 1 <= room < params.max_tokens:
        params.max_tokens = room
    sent = 0
    async for output in engine.generate(prompt, params, request_id, lora_request=lora):
        completion = output.outputs[0]
        ids, logprobs = completion.token_ids, completion.logprobs or []
        for i in range(sent, len(ids)):
            reason = completion.finish_reason if output.finished and i == len(ids) - 1 else None
            yield token_payload(stream_id, ids[i], logprobs[i] if i < len(logprobs) else None, reason)
        sent = len(ids)
        if output.finished and completion.finish_reason not in ("stop", "length"):
            raise LMTPError(f"generation ended: {completion.finish_reason}")


async def score_entries(engine: AsyncLLMEngine, stream_id: Any, data: dict[str, Any], request_id: str,
                        lora: LoRARequest | None = None) -> AsyncIterator[dict[str, Any]]:
    """SCORE: one TOKEN entry per scored token, its log-probability after everything before it
    (the prompt and the scored tokens before it); 0.0 for a first token with nothing before it.
    Raises LMTPError or ValueError before the first entry for bad input."""
    prompt = _token_ids("prompt", data.get("prompt"))
    scored = _token_ids("scored", data.get("scored"))
    if not scored:
        raise LMTPError("scored must hold at least one token.")
    # The log-probabilities of the positions from the first scored one on, in one prefill.
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    final = None
    async for final in engine.generate(prompt + scored, params, request_id, lora_request=lora,
                                       prompt_logprobs_from=len(prompt)):
        pass
    if final is None or final.prompt_logprobs is None:
        raise LMTPError("scoring was aborted.")
    for j, token in enumerate(scored):
        entry = final.prompt_logprobs[len(prompt) + j]
        yield {"token": token, "stream_id": stream_id, "logprob": json_logprob(entry[token].logprob) if entry else 0.0,
               "finish_reason": "stop" if j == len(scored) - 1 else None}


class LMTPSession:
    """One websocket connection: reads commands, runs each stream as an engine request in its own
    task, and sends what they produce through one writer (websocket sends must not interleave)."""

    def __init__(self, engine: AsyncLLMEngine, websocket: WebSocket, limits: ServerLimits,
                 metrics: ServerMetrics | None) -> None:
        self.engine = engine
        self.websocket = websocket
        self.limits = limits
        self.metrics = metrics
        self.outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.streams: set[asyncio.Task] = set()
        self.connection_id = uuid.uuid4().hex[:12]

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        try:
            while True:
                received = await self.websocket.receive()
                if received["type"] == "websocket.disconnect":
                    break
                message = received.get("text")
                if message is None:  # a binary frame: LMTP is text; decode it, or drop it
                    try:
                        message = (received.get("bytes") or b"").decode("utf-8")
                    except UnicodeDecodeError:
                        logger.warning("LMTP %s: a binary message that is not UTF-8 was dropped", self.connection_id)
                        continue
                if len(message) > self.limits.max_request_body_bytes:
                    await self.websocket.close(_MESSAGE_TOO_BIG, "LMTP message too large")
                    return
                await self._dispatch(message)
        except WebSocketDisconnect:
            pass
        finally:
            for task in self.streams:
                task.cancel()  # each stream's engine request is aborted as its generator closes
            await asyncio.gather(*self.streams, return_exceptions=True)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _write(self) -> None:
        """Send queued entries, those of one kind that are ready together in one message."""
        while True:
            kind, entry = await self.outbox.get()
            batch = [entry]
            pending: list[tuple[str, dict[str, Any]]] = []
            while not self.outbox.empty():
                item = self.outbox.get_nowait()
                (batch.append(item[1]) if item[0] == kind else pending.append(item))
            await self.websocket.send_text(f"{kind} {json.dumps(batch)}")
            for other_kind, other in pending:  # rare: MSG and TOKEN entries ready at once
                await self.websocket.send_text(f"{other_kind} {json.dumps([other])}")

    async def _dispatch(self, message: str) -> None:
        command, _, body = message.partition(" ")
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            logger.warning("LMTP %s: unreadable %s command dropped", self.connection_id, command[:32])
            return
        stream_id = data.pop("stream_id", None)
        if command == "MODEL_INFO":
            try:
                await resolve_model(self.engine, self.limits, data.get("model"))
                self.outbox.put_nowait(("MSG", {"stream_id": stream_id, "model_info": model_info(self.engine)}))
            except LMTPError as exc:
                self.outbox.put_nowait(("MSG", {"stream_id": stream_id, "error": str(exc)}))
        elif command not in ("GENERATE", "SCORE"):
            self.outbox.put_nowait(("TOKEN", {"stream_id": stream_id, "error": f"Unknown command: {command[:32]}"}))
        elif len(self.streams) >= MAX_STREAMS_PER_CONNECTION:
            self.outbox.put_nowait(("TOKEN", {"stream_id": stream_id, "error": (
                f"too many streams on this connection; at most {MAX_STREAMS_PER_CONNECTION} run at once.")}))
        else:
            task = asyncio.create_task(self._stream(command, stream_id, data))
            self.streams.add(task)
            task.add_done_callback(self.streams.discard)

    async def _stream(self, command: str, stream_id: Any, data: dict[str, Any]) -> None:
        start = time.perf_counter()
        num_tokens, status = 0, "ok"
        try:
            lora = await resolve_model(self.engine, self.limits, data.pop("model", None))
            request_id = f"lmtp-{self.connection_id}-{stream_id}-{uuid.uuid4().hex[:8]}"
            entries = (generate_entries if command == "GENERATE" else score_entries)(
                self.engine, stream_id, data, request_id, lora)
            async with aclosing(entries):
                async for entry in entries:
                    self.outbox.put_nowait(("TOKEN", entry))
                    num_tokens += 1
        except asyncio.CancelledError:
            status = "closed"
            raise
        except ValueError as exc:  # LMTPError, or the engine's checks of the prompt and parameters
            status = "error"
            self.outbox.put_nowait(("TOKEN", {"stream_id": stream_id, "error": str(exc)}))
        except Exception as exc:  # an engine failure ends this stream, not the connection
            status = "error"
            logger.exception("LMTP %s stream %s failed", self.connection_id, stream_id)
            self.outbox.put_nowait(("TOKEN", {"stream_id": stream_id, "error": f"failed to generate tokens: {exc}"}))
        finally:
            elapsed = time.perf_counter() - start
            prompt = data.get("prompt")
            num_prompt = len(prompt) if isinstance(prompt, list) else 0
            logger.info("LMTP %s %s stream %s %s %.3fs prompt_tokens=%d tokens=%d", self.connection_id, command,
                        stream_id, status, elapsed, num_prompt, num_tokens)
            if self.metrics is not None:
                self.metrics.requests_total.labels("LMTP", command, status).inc()
                self.metrics.request_duration_s.labels("LMTP", command).observe(elapsed)
                self.metrics.prompt_tokens_total.inc(num_prompt + (0 if command == "GENERATE" else num_tokens))
                self.metrics.generation_tokens_total.inc(num_tokens if command == "GENERATE" else 0)


def build_lmtp_router(engine: AsyncLLMEngine, metrics: ServerMetrics | None = None,
                      limits: ServerLimits | None = None, api_keys: tuple[str, ...] = ()) -> APIRouter:
    """The LMTP websocket endpoint (`ws://HOST:PORT/`) for `engine`; see the module docstring."""
    router = APIRouter()
    limits = limits or ServerLimits()
    checker = APIKeyChecker(api_keys) if api_keys else None

    @router.websocket(LMTP_PATH)
    async def lmtp(websocket: WebSocket) -> None:
        if checker is not None and not checker.is_any_valid(presented_keys(Headers(scope=websocket.scope))):
            await websocket.close(_POLICY_VIOLATION, "a valid API key is required")
            return
        await websocket.accept()
        await LMTPSession(engine, websocket, limits, metrics).run()

    return router
