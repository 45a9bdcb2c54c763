"""Scale LLM Engine-compatible routes: `POST /v1/llm/completions-sync`, `POST /v1/llm/completions-stream`
(both `?model_endpoint_name=...`), `GET /v1/llm/model-endpoints` and `GET /v1/llm/model-endpoints/{name}`.

One HTTP request is one engine request. `model_endpoint_name` is the served model's name, or
an adapter id (a LoRA, loaded in a worker thread before the request is queued, as the OpenAI
routes' `model=<adapter>`). The route translates only: the body -> `SamplingParams`,
`RequestOutput` -> LLM Engine's response or stream events. The stream sends one event per
generated token (`num_completion_tokens` counting up, `finished` on the last), never `[DONE]`
(the `llmengine` client parses every `data:` line as JSON); a failure after the stream started
is an event with `error: {status_code, content: {error, timestamp}}`.

Source: scaleapi/llm-engine `clients/python/llmengine` (`completion.py`, `model.py`,
`data_types`) and the model-engine server's vLLM translation; ../shared/specs/llmengine.md.
Errors: 400 bad input, 404 unknown model endpoint, 500 engine failure, each `{"detail": "..."}`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loomlm.engine.input_processor import ContextWindowError
from loomlm.lora.request import LoRARequest
from loomlm.outputs import CompletionOutput, RequestOutput, json_logprob
from loomlm.protocol.llmengine import (
    CompletionOutput as LLMEngineCompletionOutput,
)
from loomlm.protocol.llmengine import (
    CompletionStreamOutput,
    CompletionSyncV1Response,
    CompletionV1Request,
    GetLLMEndpointResponse,
    ListLLMEndpointsResponse,
    StreamError,
    StreamErrorContent,
    TokenOutput,
)
from loomlm.protocol.structured_outputs import from_llmengine
from loomlm.sampling_params import SamplingParams
from loomlm.server.limits import ServerLimits
from loomlm.server.metrics import ServerMetrics, counted_outputs
from loomlm.server.sse import aclose_shielded, first_then_rest, last_output, sse_event

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine
    from loomlm.engine.input_processor import EncodedPrompt

# Every error under this prefix (unknown paths included) is LLM Engine's `{"detail"}`.
LLMENGINE_PATH_PREFIX = "/v1/llm/"


def _not_found(name: str) -> HTTPException:
    return HTTPException(404, f"The specified model endpoint {name!r} could not be found.")


def _check_finished(completion: CompletionOutput) -> None:
    if completion.finish_reason == "abort":
        raise HTTPException(500, "The request was aborted by the engine (its adapter failed to load).")


def split_text(new_text: str, token_texts: list[str]) -> list[str]:
    """`new_text` (what a completion gained in one engine output) split over the output's new tokens.

    Each token gets its own decoded text when those add up to `new_text`; otherwise (text held
    back while it might become a stop sequence, a cut stop sequence, a character spanning
    tokens) the last token carries all of it and the others "", so the events' texts always
    add up to the completion's text.
    """
    if not token_texts:
        return []
    if "".join(token_texts) == new_text:
        return list(token_texts)
    return [""] * (len(token_texts) - 1) + [new_text]


class LLMEngineServing:
    """Serves the LLM Engine routes for one engine (see the module docstring)."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, limits: ServerLimits | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.limits = limits or ServerLimits()

    # ------------------------------------------------------------------ routes
    async def completions_sync(self, body: CompletionV1Request, raw_request: Request,
                               model_endpoint_name: str) -> Response:
        """`POST /v1/llm/completions-sync`: the whole completion, `CompletionSyncV1Response`."""
        prompt, params, lora = await self._prepare(body, model_endpoint_name)
        request_id = str(uuid.uuid4())
        stream = self.engine.generate(prompt, params, request_id, lora)
        try:
            final = await last_output(raw_request, counted_outputs(raw_request, self.metrics, stream))
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        if final is None:
            raise HTTPException(500, "The request ended without an output.")
        completion = final.outputs[0]
        _check_finished(completion)
        tokens = None
        if params.logprobs is not None:
            tokens = [self._token(completion, i) for i in range(len(completion.token_ids))]
        output = LLMEngineCompletionOutput(text=completion.text, num_prompt_tokens=len(final.prompt_token_ids),
                                           num_completion_tokens=len(completion.token_ids), tokens=tokens)
        response = CompletionSyncV1Response(request_id=request_id, output=output)
        return JSONResponse(response.model_dump(mode="json", exclude_none=True))

    async def completions_stream(self, body: CompletionV1Request, raw_request: Request,
                                 model_endpoint_name: str) -> StreamingResponse:
        """`POST /v1/llm/completions-stream`: SSE, one `CompletionStreamV1Response` per token."""
        prompt, params, lora = await self._prepare(body, model_endpoint_name)
        request_id = str(uuid.uuid4())
        try:
            outputs = await first_then_rest(raw_request, self.engine.generate(prompt, params, request_id, lora))
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        return StreamingResponse(self._events(outputs, params, request_id, raw_request),
                                 media_type="text/event-stream")

    async def list_model_endpoints(self) -> ListLLMEndpointsResponse:
        """`GET /v1/llm/model-endpoints`: the served model, then the adapters named so far
        (preloaded with --adapter-ids or used by a request), as `GET /v1/models` lists them."""
        base = self.engine.served_model_name
        names = [base, *(lora.lora_name for lora in self.engine.registered_loras())]
        return ListLLMEndpointsResponse(model_endpoints=[self._endpoint(name) for name in names])

    async def get_model_endpoint(self, name: str) -> GetLLMEndpointResponse:
        """`GET /v1/llm/model-endpoints/{name}`: one of the listed endpoints; 404 for any other name.

        An adapter named by an absolute path is found without its leading "/" too: the
        `llmengine` client builds URLs with `urljoin`, which drops it (`endpoints//tmp/a` ->
        `endpoints/tmp/a`).
        """
        is_known = self.engine.is_registered_lora
        if name == self.engine.served_model_name or is_known(name):
            return self._endpoint(name)
        if is_known("/" + name):
            return self._endpoint("/" + name)
        raise _not_found(name)

    # --------------------------------------------------------------- translation
    async def _prepare(self, body: CompletionV1Request, model_endpoint_name: str
                       ) -> tuple[EncodedPrompt, SamplingParams, LoRARequest | None]:
        """Resolve the endpoint (404), then validate the parameters and the prompt (400)."""
        try:
            self.limits.check_name("model_endpoint_name", model_endpoint_name)
            lora = await self._lora_for(model_endpoint_name)  # raises HTTPException, not ValueError
            params = self._sampling_params(body)
            self.limits.check_params(params)
            encoded = await self.engine.encode(body.prompt, params)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        try:
            self.engine.input_processor.completion_budget(len(encoded.token_ids), body.max_new_tokens)
        except ContextWindowError as exc:  # LLM Engine's words for InputProcessor's rule
            raise HTTPException(400, f"The prompt's {exc.prompt_tokens} tokens plus max_new_tokens "
                                     f"({body.max_new_tokens}) exceed the model's context length "
                                     f"({exc.max_model_len} tokens).") from None
        return encoded, params, lora

    async def _lora_for(self, name: str) -> LoRARequest | None:
        """The adapter `name` names, loaded; None for the served model. 404 for a name that is no
        model and no adapter, 400 for an adapter that fails to load."""
        try:
            return await self.engine.lora_for_model(name)
        except LookupError as exc:
            raise _not_found(name) from exc
        except ValueError as exc:
            raise HTTPException(400, f"The adapter {name!r} failed to load: {exc}") from exc

    @staticmethod
    def _sampling_params(body: CompletionV1Request) -> SamplingParams:
        """LLM Engine's parameters as vLLM's (model-engine's vLLM translation). Raises ValueError."""
        if body.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {body.max_new_tokens}.")
        optional = {name: getattr(body, name) for name in ("presence_penalty", "frequency_penalty", "top_k", "top_p")
                    if getattr(body, name) is not None}
        return SamplingParams(
            max_tokens=body.max_new_tokens,
            temperature=body.temperature,  # 0: greedy
            stop=body.stop_sequences or None,
            include_stop_str_in_output=bool(body.include_stop_str_in_output),
            logprobs=0 if body.return_token_log_probs else None,  # 0: the chosen token's logprob only
            skip_special_tokens=body.skip_special_tokens is not False,
            structured_outputs=from_llmengine(body.guided_json, body.guided_regex, body.guided_choice,
                                              body.guided_grammar),
            **optional,
        )

    def _token(self, completion: CompletionOutput, i: int) -> TokenOutput:
        """Generated token i with its logprob (natural log), from a request that asked for logprobs."""
        token_id = completion.token_ids[i]
        entry = completion.logprobs[i].get(token_id) if completion.logprobs is not None else None
        if entry is None:  # cannot happen with logprobs=0, which always holds the chosen token
            raise HTTPException(500, f"no logprob for generated token {i}.")
        text = entry.decoded_token if entry.decoded_token is not None else self.engine.token_text(token_id)
        return TokenOutput(token=text, log_prob=json_logprob(entry.logprob))

    def _endpoint(self, name: str) -> GetLLMEndpointResponse:
        import loomlm

        return GetLLMEndpointResponse(id=name, name=name, model_name=self.engine.served_model_name,
                                      inference_framework_tag=f"loomlm-{loomlm.__version__}", num_shards=1)

    def stream_outputs(self, completion: CompletionOutput, num_prompt_tokens: int, num_sent_tokens: int,
                       num_sent_chars: int, is_finished: bool, with_logprobs: bool) -> list[CompletionStreamOutput]:
        """The events for the tokens `completion` gained since `num_sent_tokens` tokens and
        `num_sent_chars` characters were sent: one per token (see `split_text` for their texts),
        or one empty event to carry `finished` when the last output brought no token."""
        new_ids = completion.token_ids[num_sent_tokens:]
        new_text = completion.text[num_sent_chars:]
        texts = split_text(new_text, [self.engine.token_text(token_id) for token_id in new_ids])
        events = []
        for k, text in enumerate(texts):
            i = num_sent_tokens + k
            events.append(CompletionStreamOutput(
                text=text, finished=is_finished and k == len(texts) - 1, num_prompt_tokens=num_prompt_tokens,
                num_completion_tokens=i + 1, token=self._token(completion, i) if with_logprobs else None))
        if is_finished and not events:
            events.append(CompletionStreamOutput(text=new_text, finished=True, num_prompt_tokens=num_prompt_tokens,
                                                 num_completion_tokens=len(completion.token_ids)))
        return events

    async def _events(self, outputs: AsyncIterator[RequestOutput], params: SamplingParams, request_id: str,
                      raw_request: Request) -> AsyncIterator[str]:
        """SSE events of `outputs` (first_then_rest's): one per generated token; a failure as an
        `error` event, which ends the stream."""
        num_sent_tokens = num_sent_chars = 0
        counted = counted_outputs(raw_request, self.metrics, outputs)
        try:
            async for output in counted:
                completion = output.outputs[0]
                if output.finished:
                    _check_finished(completion)
                for event in self.stream_outputs(completion, len(output.prompt_token_ids), num_sent_tokens,
                                                 num_sent_chars, output.finished, params.logprobs is not None):
                    yield stream_event(request_id, event)
                num_sent_tokens, num_sent_chars = len(completion.token_ids), len(completion.text)
        except HTTPException as exc:
            yield stream_event(request_id, error=stream_error(exc.status_code, str(exc.detail)))
        except Exception as exc:  # noqa: BLE001  # the engine failed mid-stream: say so in the stream's own format
            yield stream_event(request_id, error=stream_error(500, f"{type(exc).__name__}: {exc}"))
        finally:
            await aclose_shielded(counted)  # aborts the request if it still runs


def stream_error(status_code: int, message: str) -> StreamError:
    """LLM Engine's mid-stream error object, stamped now (UTC, ISO 8601)."""
    return StreamError(status_code=status_code,
                       content=StreamErrorContent(error=message, timestamp=datetime.now(UTC).isoformat()))


def stream_event(request_id: str, output: CompletionStreamOutput | None = None, error: StreamError | None = None
                 ) -> str:
    """One SSE event: `{"request_id", "output", "error"}`, both of the last always present (null
    when absent), the output's unset fields (`token` without logprobs) left out."""
    data = {
        "request_id": request_id,
        "output": output.model_dump(mode="json", exclude_none=True) if output is not None else None,
        "error": error.model_dump(mode="json") if error is not None else None,
    }
    return sse_event(json.dumps(data))


def build_llmengine_router(engine: AsyncLLMEngine, metrics: ServerMetrics, limits: ServerLimits | None = None
                          ) -> tuple[APIRouter, LLMEngineServing]:
    """The LLM Engine routes for `engine`; `limits` bound each request (default `ServerLimits()`)."""
    serving = LLMEngineServing(engine, metrics, limits)
    router = APIRouter()
    router.add_api_route("/v1/llm/completions-sync", serving.completions_sync, methods=["POST"], response_model=None)
    router.add_api_route("/v1/llm/completions-stream", serving.completions_stream, methods=["POST"],
                         response_model=None)
    router.add_api_route("/v1/llm/model-endpoints", serving.list_model_endpoints, methods=["GET"],
                         response_model=ListLLMEndpointsResponse, response_model_exclude_none=True)
    # `:path`: adapter ids may be paths or Hugging Face ids with slashes.
    router.add_api_route("/v1/llm/model-endpoints/{name:path}", serving.get_model_endpoint, methods=["GET"],
                         response_model=GetLLMEndpointResponse, response_model_exclude_none=True)
    return router, serving
