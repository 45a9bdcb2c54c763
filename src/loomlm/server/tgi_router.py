"""LoRAX / TGI-compatible routes: `POST /`, `/generate`, `/generate_stream`, `GET /info`, and the
TGI form of `POST /tokenize`.

One HTTP request is one engine request (`best_of` sequences), optionally with an adapter
(`adapter_id` + `adapter_source`, or `merged_adapters`), loaded in a worker thread before the
request is queued so a bad adapter is a 422 and decoding never stalls. The route translates
only: parameters -> `SamplingParams` (`loomlm.server.tgi_params`), `RequestOutput` -> LoRAX's
response, details and SSE events.

Source: predibase/lorax `router/src/server.rs` and `lib.rs`, huggingface/text-generation-inference
`router/src/server.rs`; ../shared/specs/lorax-tgi.md. Errors: 422 validation, 424 generation,
429 overloaded, with `{"error", "error_type"}`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loomlm.chat_utils import render_chat
from loomlm.engine.input_processor import ContextWindowError
from loomlm.lora.request import LoRARequest
from loomlm.outputs import CompletionOutput, Logprob, RequestOutput
from loomlm.protocol.tgi import (
    AlternativeToken,
    BestOfSequence,
    Details,
    FinishReason,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Info,
    InputToken,
    SimpleToken,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizeRequest,
)
from loomlm.server.errors import TGIError
from loomlm.server.limits import ServerLimits
from loomlm.server.metrics import ServerMetrics, counted_outputs
from loomlm.server.sse import aclose_shielded, first_then_rest, last_output, sse_event
from loomlm.server.tgi_params import (
    MAX_BEST_OF,
    MAX_STOP_SEQUENCES,
    TGIPlan,
    plan_generation,
)

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine

TGI_PATHS = ("/", "/generate", "/generate_stream", "/info")


def _finish_reason(completion: CompletionOutput) -> FinishReason:
    if completion.finish_reason == "length":
        return FinishReason.length
    if completion.finish_reason == "abort":
        raise TGIError("the request was aborted (its adapter failed to load)", 424, "generation")
    return FinishReason.stop_sequence if isinstance(completion.stop_reason, str) else FinishReason.eos_token


class TGIServing:
    """Serves the LoRAX / TGI routes for one engine (see the module docstring).

    Args:
        max_concurrent_requests: requests in flight beyond which a new one gets 429 (LoRAX's
            --max-concurrent-requests, default 128).
    """

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, max_concurrent_requests: int = 128,
                 limits: ServerLimits | None = None, chat_template: str | None = None) -> None:
        self.engine = engine
        self.chat_template = chat_template  # the server's (--chat-template), as the OpenAI face; None: the model's
        self.metrics = metrics
        self.limits = limits or ServerLimits()
        self.max_concurrent_requests = max_concurrent_requests
        self.num_in_flight = 0
        self.special_ids = set(engine.tokenizer.all_special_ids)
        self.max_logprobs = engine.config.model_config.max_logprobs

    # ------------------------------------------------------------------ routes
    async def compat_generate(self, body: GenerateRequest, raw_request: Request) -> Response:
        """`POST /`: a one-element JSON list, or SSE when `stream` is true (what both clients call)."""
        if body.stream:
            return await self.generate_stream(body, raw_request)
        response = await self.generate(body, raw_request)
        response.body = b"[" + response.body + b"]"
        response.headers["content-length"] = str(len(response.body))
        return response

    async def generate(self, body: GenerateRequest, raw_request: Request) -> JSONResponse:
        """`POST /generate`: the response object with LoRAX's timing and token headers."""
        start = time.time()
        plan, prompt, lora = await self._prepare(body, raw_request, stream=False)
        validated = time.time()
        self._admit()
        stream = self.engine.generate(prompt, plan.params, uuid.uuid4().hex, lora)
        try:
            final = await last_output(raw_request, counted_outputs(raw_request, self.metrics, stream))
        except ValueError as exc:
            raise TGIError(str(exc), 422, "validation") from exc
        except RuntimeError as exc:
            raise TGIError(str(exc), 424, "generation") from exc
        finally:
            self.num_in_flight -= 1
        if final is None:
            raise TGIError("the request ended without an output", 500, "incomplete_generation")
        response = self._response(final, plan, body.inputs)
        return JSONResponse(response.model_dump(mode="json"), headers=self._headers(final, start, validated, lora))

    async def generate_stream(self, body: GenerateRequest, raw_request: Request) -> StreamingResponse:
        """`POST /generate_stream`: one `data:` event per token, the last with the text and details."""
        plan, prompt, lora = await self._prepare(body, raw_request, stream=True)
        self._admit()
        try:
            outputs = await first_then_rest(raw_request, self.engine.generate(prompt, plan.params, uuid.uuid4().hex,
                                                                              lora))
        except ValueError as exc:
            self.num_in_flight -= 1
            raise TGIError(str(exc), 422, "validation") from exc
        except BaseException:
            self.num_in_flight -= 1
            raise
        return StreamingResponse(self._events(outputs, plan, body.inputs, raw_request),
                                 media_type="text/event-stream", headers=self._model_headers(lora))

    async def info(self) -> Info:
        """`GET /info`: the model and the router's limits (LoRAX's fields)."""
        import loomlm

        config = self.engine.config
        return Info(
            model_id=self.engine.served_model_name,
            model_dtype=str(config.model_config.torch_dtype).removeprefix("torch."),
            model_device_type=config.model_config.torch_device.type,
            max_concurrent_requests=self.max_concurrent_requests,
            max_best_of=MAX_BEST_OF,
            max_stop_sequences=MAX_STOP_SEQUENCES,
            max_input_length=self.engine.max_model_len - 1,
            max_total_tokens=self.engine.max_model_len,
            max_batch_total_tokens=config.scheduler_config.max_num_batched_tokens,
            max_active_adapters=config.lora_config.max_loras if config.lora_config.enable_lora else 0,
            loaded_adapters=self.engine.loaded_adapters(),
            version=loomlm.__version__,
        )

    async def tokenize(self, body: TokenizeRequest) -> list[dict]:
        """TGI's `POST /tokenize` (`{"inputs"}`): tokens with their character offsets, as `SimpleToken`
        dicts (built in a worker thread: a 4 MiB input is a million tokens)."""
        def run() -> list[dict]:
            encoding = self.engine.tokenizer(body.inputs, add_special_tokens=body.add_special_tokens is not False,
                                             return_offsets_mapping=True)
            return [SimpleToken(id=token_id, text=body.inputs[start:stop], start=start, stop=stop).model_dump()
                    for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"],
                                                       strict=True)]

        return await asyncio.to_thread(run)

    # --------------------------------------------------------------- translation
    async def _prepare(self, body: GenerateRequest, raw_request: Request, stream: bool
                       ) -> tuple[TGIPlan, object, LoRARequest | None]:
        """Validate everything (422 on failure): the plan, the encoded prompt, the loaded adapter."""
        p = body.parameters or GenerateParameters()
        try:
            if not body.inputs:
                raise ValueError("`inputs` cannot be empty")
            plan = plan_generation(p, stream, self.max_logprobs)
            self.limits.check_params(plan.params, max_best_of=MAX_BEST_OF)
            self.limits.check_name("adapter_id", p.adapter_id)
            if p.merged_adapters is not None:
                self.limits.check_count("merged_adapters.ids", len(p.merged_adapters.ids or ()),
                                        self.limits.max_merged_adapters)
                for adapter_id in p.merged_adapters.ids or ():
                    self.limits.check_name("merged_adapters.ids", adapter_id)
            prompt = await asyncio.to_thread(self._render, body.inputs) if p.apply_chat_template else body.inputs
            encoded = await self.engine.encode(prompt, plan.params)
            if p.max_new_tokens is not None:
                try:
                    self.engine.input_processor.completion_budget(len(encoded.token_ids), p.max_new_tokens)
                except ContextWindowError as exc:  # TGI's words for InputProcessor's rule
                    raise ValueError(f"`inputs` tokens + `max_new_tokens` must be <= {exc.max_model_len}. Given: "
                                     f"{exc.prompt_tokens} `inputs` tokens and {p.max_new_tokens} `max_new_tokens`"
                                     ) from None
            # LoRAX: the token for private adapters is `api_token`, or the request's Bearer token.
            scheme, _, bearer = raw_request.headers.get("authorization", "").partition(" ")
            token = p.api_token or (bearer.strip() if scheme.lower() == "bearer" and bearer.strip() else None)
            lora = await self._lora_request(p, token)
            if lora is not None:
                await self.engine.load_lora(lora)
        except ValueError as exc:
            raise TGIError(str(exc), 422, "validation") from exc
        return plan, encoded, lora

    def _render(self, inputs: str) -> str:
        """LoRAX's apply_chat_template: `inputs` is a JSON list of messages (or plain user text).
        Blocking: call it in a worker thread."""
        try:
            messages = json.loads(inputs)
        except (json.JSONDecodeError, RecursionError):
            messages = None
        if not isinstance(messages, list):
            messages = [{"role": "user", "content": inputs}]
        self.limits.check_count("inputs", len(messages), self.limits.max_messages, "messages")
        return render_chat(self.engine.tokenizer, messages, self.chat_template, add_generation_prompt=True)

    async def _lora_request(self, p: GenerateParameters, api_token: str | None) -> LoRARequest | None:
        if p.adapter_id is not None and p.merged_adapters is not None:
            raise ValueError("you must specify at most one of `adapter_id` or `merged_adapters`")
        if p.merged_adapters is not None:
            from loomlm.lora.merge import MergeConfig

            config = MergeConfig.from_lorax(p.merged_adapters.model_dump())
            parts = [await self.engine.lora_request_for(adapter_id, p.adapter_source, api_token)
                     for adapter_id in config.ids]
            return LoRARequest.merged(parts, config)
        if p.adapter_id is None or p.adapter_id == self.engine.served_model_name:
            return None  # LoRAX: no adapter, or the base model's own id
        return await self.engine.lora_request_for(p.adapter_id, p.adapter_source, api_token)

    def _admit(self) -> None:
        if self.num_in_flight >= self.max_concurrent_requests:
            raise TGIError("Model is overloaded", 429, "overloaded")
        self.num_in_flight += 1

    def _token(self, token_id: int, entry: Logprob | None) -> Token:
        text = entry.decoded_token if entry is not None and entry.decoded_token is not None \
            else self.engine.token_text(token_id)
        return Token(id=token_id, text=text, logprob=entry.logprob if entry is not None else None,
                     special=token_id in self.special_ids)

    def _top(self, logprobs: dict[int, Logprob], k: int | None) -> list[tuple[int, Logprob]]:
        """The k most likely tokens of a position, most likely first."""
        if not k:
            return []
        ranked = sorted(logprobs.items(), key=lambda item: item[1].rank or 0)
        return [(tid, lp) for tid, lp in ranked if lp.rank is not None and lp.rank <= k][:k]

    def _generated_token(self, completion: CompletionOutput, i: int, plan: TGIPlan) -> tuple[Token, list[Token]]:
        """Token i of a completion, with its LoRAX alternatives, and its TGI top tokens."""
        token_id = completion.token_ids[i]
        position = completion.logprobs[i] if completion.logprobs is not None and i < len(completion.logprobs) else {}
        token = self._token(token_id, position.get(token_id))
        if plan.num_alternatives:
            token.alternative_tokens = [AlternativeToken(id=tid, text=self._token(tid, lp).text, logprob=lp.logprob)
                                        for tid, lp in self._top(position, plan.num_alternatives)]
        top = [self._token(tid, lp) for tid, lp in self._top(position, plan.top_n_tokens)]
        return token, top

    def _sequence(self, output: RequestOutput, completion: CompletionOutput, plan: TGIPlan, inputs: str) -> dict:
        """The fields shared by `details` and a best_of sequence."""
        tokens, tops = [], []
        if plan.details:
            for i in range(len(completion.token_ids)):
                token, top = self._generated_token(completion, i, plan)
                tokens.append(token)
                tops.append(top)
        prefill = []
        if plan.decoder_input_details and output.prompt_logprobs is not None:
            for token_id, position in zip(output.prompt_token_ids, output.prompt_logprobs, strict=True):
                entry = (position or {}).get(token_id)
                prefill.append(InputToken(id=token_id, text=self.engine.token_text(token_id),
                                          logprob=entry.logprob if entry is not None else None))
        return {
            "generated_text": (inputs if plan.return_full_text else "") + completion.text,
            "finish_reason": _finish_reason(completion),
            "generated_tokens": len(completion.token_ids),
            "seed": None if plan.seed is None else plan.seed + completion.index,
            "prefill": prefill,
            "tokens": tokens,
            "top_tokens": tops if plan.top_n_tokens else None,
        }

    def _response(self, output: RequestOutput, plan: TGIPlan, inputs: str) -> GenerateResponse:
        completions = output.outputs
        # best_of: the sequence with the highest cumulative logprob answers; the others are listed.
        best = max(completions, key=lambda c: c.cumulative_logprob or 0.0) if len(completions) > 1 else completions[0]
        fields = self._sequence(output, best, plan, inputs)
        text = fields.pop("generated_text")
        if not plan.details:  # an aborted request raised in _sequence already
            return GenerateResponse(generated_text=text)
        others = [BestOfSequence(**self._sequence(output, c, plan, inputs)) for c in completions if c is not best]
        details = Details(prompt_tokens=len(output.prompt_token_ids), best_of_sequences=others or None, **fields)
        return GenerateResponse(generated_text=text, details=details)

    def _headers(self, output: RequestOutput, start: float, validated: float, lora: LoRARequest | None
                 ) -> dict[str, str]:
        """LoRAX's response headers; times in milliseconds except x-compute-time (seconds)."""
        now = time.time()
        m = output.metrics
        scheduled = (m.first_scheduled_time if m is not None and m.first_scheduled_time else validated)
        generated = sum(len(c.token_ids) for c in output.outputs)
        inference_ms = (now - scheduled) * 1000
        return {
            "x-compute-type": "cpu" if self.engine.config.model_config.torch_device.type == "cpu" else "gpu",
            "x-compute-time": f"{now - start:.6f}",
            "x-total-time": str(round((now - start) * 1000)),
            "x-validation-time": str(round((validated - start) * 1000)),
            "x-queue-time": str(round(max(scheduled - validated, 0.0) * 1000)),
            "x-inference-time": str(round(inference_ms)),
            "x-time-per-token": str(round(inference_ms / max(generated, 1))),
            "x-prompt-tokens": str(len(output.prompt_token_ids)),
            "x-generated-tokens": str(generated),
            "x-total-tokens": str(len(output.prompt_token_ids) + generated),
            **self._model_headers(lora),
        }

    def _model_headers(self, lora: LoRARequest | None) -> dict[str, str]:
        """The model answering (x-model-id), and its adapter when one was asked for (x-adapter-id)."""
        headers = {"x-model-id": self.engine.served_model_name}
        if lora is not None:
            headers["x-adapter-id"] = lora.lora_name
        return headers

    async def _events(self, outputs: AsyncIterator[RequestOutput], plan: TGIPlan, inputs: str,
                      raw_request: Request) -> AsyncIterator[str]:
        """SSE events of `outputs` (first_then_rest's): one per generated token; errors as
        `{"error", "error_type"}` events."""
        sent = 0
        counted = counted_outputs(raw_request, self.metrics, outputs)
        try:
            async for output in counted:
                completion = output.outputs[0]
                if output.finished:
                    _finish_reason(completion)  # raises for an aborted request
                ids = completion.token_ids
                for i in range(sent, len(ids)):
                    token, top = self._generated_token(completion, i, plan)
                    is_last = output.finished and i == len(ids) - 1
                    event = StreamResponse(token=token, top_tokens=top if plan.top_n_tokens else None)
                    if is_last:
                        event.generated_text = (inputs if plan.return_full_text else "") + completion.text
                        event.details = StreamDetails(finish_reason=_finish_reason(completion),
                                                      prompt_tokens=len(output.prompt_token_ids),
                                                      generated_tokens=len(ids), seed=plan.seed)
                    yield sse_event(event.model_dump_json())
                sent = len(ids)
        except TGIError as exc:
            yield sse_event(json.dumps({"error": exc.message, "error_type": exc.error_type}))
        except Exception as exc:  # the engine failed mid-stream: say so in the stream's own format
            yield sse_event(json.dumps({"error": str(exc), "error_type": "generation"}))
        finally:
            self.num_in_flight -= 1
            await aclose_shielded(counted)  # aborts the request if the client went away


def build_tgi_router(engine: AsyncLLMEngine, metrics: ServerMetrics, max_concurrent_requests: int = 128,
                     limits: ServerLimits | None = None,
                     chat_template: str | None = None) -> tuple[APIRouter, TGIServing]:
    """The LoRAX / TGI routes for `engine` (TGI's `/tokenize` form is dispatched by the app);
    `chat_template` (the server's) renders LoRAX's `apply_chat_template` inputs."""
    serving = TGIServing(engine, metrics, max_concurrent_requests, limits, chat_template)
    router = APIRouter()
    router.add_api_route("/", serving.compat_generate, methods=["POST"], response_model=None)
    router.add_api_route("/generate", serving.generate, methods=["POST"], response_model=None)
    router.add_api_route("/generate_stream", serving.generate_stream, methods=["POST"], response_model=None)
    router.add_api_route("/info", serving.info, methods=["GET"], response_model=Info)
    return router, serving
