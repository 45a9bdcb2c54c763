"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

Each HTTP request becomes one engine request per prompt (`n` completions
each), run concurrently. The route does the translation only: prompt ->
token ids (the model's chat template for chat), body -> `SamplingParams`,
context-window checks, then `RequestOutput`s -> OpenAI responses or SSE chunks.

Source: the OpenAI API reference and vLLM's `vllm/entrypoints/openai/`
(`serving_completion.py`, `serving_chat.py`) for the behaviour of the extra
fields, the error messages and the usage accounting; see
../shared/specs/vllm-openai.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loomlm.beam_search import BeamSearchParams
from loomlm.chat_utils import render_chat
from loomlm.engine.input_processor import ContextWindowError
from loomlm.lora.request import LoRARequest
from loomlm.outputs import CompletionOutput, RequestOutput
from loomlm.protocol.openai import (
    TGI_CLIENT_MODEL,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    SamplingRequestFields,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from loomlm.protocol.structured_outputs import from_openai
from loomlm.sampling_params import SamplingParams, StructuredOutputsParams
from loomlm.server.errors import (
    BadRequestError,
    ModelNotFoundError,
    OpenAIHTTPError,
    bad_request_on_value_error,
)
from loomlm.server.limits import ServerLimits
from loomlm.server.metrics import ServerMetrics, record_usage
from loomlm.server.openai_generation import Generation, drain
from loomlm.server.chat_output import REASONING_PARSERS, ChatOutputState
from loomlm.server.openai_responses import full_response, stream_response
from loomlm.server.sse import run_until_disconnect
from loomlm.server.tool_parsers import (
    TOOL_CALL_PARSERS,
    ToolCallState,
    named_schema,
    required_schema,
)

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine
    from loomlm.engine.input_processor import EncodedPrompt

logger = logging.getLogger(__name__)

# Body fields passed to SamplingParams (same names) only when the client set them: None leaves
# SamplingParams' default, which is also the OpenAI / vLLM default of each.
_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "include_stop_str_in_output",
    "skip_special_tokens", "spaces_between_special_tokens", "prompt_logprobs", "truncate_prompt_tokens",
    "allowed_token_ids", "bad_words",
)


class OpenAIServing:
    """Serves the OpenAI routes for one engine (its served model name, tokenizer, context window)."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, chat_template: str | None = None,
                 limits: ServerLimits | None = None, enable_auto_tool_choice: bool = False,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> None:
        for name, parser, choices in (("reasoning_parser", reasoning_parser, REASONING_PARSERS),
                                      ("tool_call_parser", tool_call_parser, TOOL_CALL_PARSERS)):
            if parser is not None and parser not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {parser!r}.")
        self.reasoning_parser = reasoning_parser
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser.")
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.tool_call_parser = tool_call_parser
        self.engine = engine
        self.chat_template = chat_template  # the server default (--chat-template); None: the model's
        self.metrics = metrics
        self.limits = limits or ServerLimits()
        self.tokenizer = engine.tokenizer
        self.served_model_name: str = engine.served_model_name
        self.max_model_len: int = engine.max_model_len
        self.created_s = int(time.time())
        self._token_text = engine.token_text  # one token's text (logprob entries)

    # -- routes ---------------------------------------------------------------------------

    async def list_models(self) -> ModelList:
        """`GET /v1/models`: the served model, with its context window in tokens, then the adapters
        named so far (preloaded with --adapter-ids or used by a request), each with `parent` set
        to the base model (vLLM's listing)."""
        card = ModelCard(id=self.served_model_name, created=self.created_s, max_model_len=self.max_model_len)
        adapters = [ModelCard(id=lora.lora_name, created=self.created_s, max_model_len=self.max_model_len,
                              root=lora.lora_path, parent=self.served_model_name)
                    for lora in self.engine.registered_loras()]
        return ModelList(data=[card, *adapters])

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        """`POST /v1/load_lora_adapter` (vLLM's): load `lora_path` (under --adapter-root, or a
        Hugging Face id in the local cache) as the model `lora_name`. Errors: 400 (LoRA disabled,
        name taken, path not allowed, bad adapter)."""
        with bad_request_on_value_error("lora_path"):
            self.limits.check_name("lora_name", body.lora_name)
            self.limits.check_name("lora_path", body.lora_path)
            await self.engine.load_lora_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        """`POST /v1/unload_lora_adapter` (vLLM's): requests can no longer name `lora_name`; those
        running finish with it. Errors: 404 for a name not loaded."""
        with bad_request_on_value_error("lora_name"):
            self.limits.check_name("lora_name", body.lora_name)
        if not self.engine.unload_lora_adapter(body.lora_name):
            raise OpenAIHTTPError(f"The lora adapter '{body.lora_name}' cannot be found.", 404, "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def create_completion(self, body: CompletionRequest, raw_request: Request) -> Response:
        """`POST /v1/completions`. Errors: 400 invalid input, 404 unknown model."""
        lora = await lora_for_openai_model(self.engine, self.limits, body.model)
        batch = prompt_batch(body.prompt)
        with bad_request_on_value_error("prompt"):
            self.limits.check_count("prompt", len(batch), self.limits.max_prompts_per_request, "prompts")
        if body.suffix:
            raise BadRequestError("suffix is not supported.", "suffix")
        if body.stream and body.best_of is not None and body.best_of != (body.n or 1):
            raise BadRequestError("best_of must equal n when streaming.", "best_of")
        # lm-evaluation-harness scores with echo + max_tokens 0: one token is generated and dropped.
        echo_only = bool(body.echo) and body.max_tokens == 0
        prompt_logprobs = body.prompt_logprobs
        if body.echo and body.logprobs is not None:
            prompt_logprobs = max(body.logprobs, prompt_logprobs or 0)
        params = self._sampling_params(body, 1 if echo_only else body.max_tokens, logprobs=body.logprobs,
                                       best_of=body.best_of, prompt_logprobs=prompt_logprobs)
        prompts, texts = await self._completion_prompts(batch, params, need_texts=bool(body.echo))
        generation = self.generation(raw_request, prompts, params, f"cmpl-{uuid.uuid4().hex}", lora, body.priority,
                                     texts if body.echo else None, keep_generated=not echo_only)
        return await self._serve(body, raw_request, generation, is_chat=False)

    async def create_chat_completion(self, body: ChatCompletionRequest, raw_request: Request) -> Response:
        """`POST /v1/chat/completions`, prompt from the model's chat template. Errors: 400, 404."""
        prompts, params, lora, chat_output = await self.prepare_chat(body)
        generation = self.generation(raw_request, prompts, params, f"chatcmpl-{uuid.uuid4().hex}", lora, body.priority)
        return await self._serve(body, raw_request, generation, is_chat=True, chat_output=chat_output)

    async def prepare_chat(self, body: ChatCompletionRequest
                           ) -> tuple[list[list[int]], SamplingParams, LoRARequest | None, ChatOutputState]:
        """A chat request checked and turned into engine input: the prompt's token ids (rendered by
        the chat template, tools included), the sampling params (tool calls forced by structured
        output where asked), the adapter, and how the text is read back (tools, reasoning).
        Shared with the Responses API. Errors: 400, 404."""
        lora = await lora_for_openai_model(self.engine, self.limits, body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequestError("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
        tools, tool_state = self._tool_choice(body)
        structured = None
        if tool_state.mode in ("required", "named"):
            schema = (required_schema(tools, body.parallel_tool_calls is not False) if tool_state.mode == "required"
                      else named_schema(next(t for t in tools if t["function"]["name"] == tool_state.function_name)))
            structured = StructuredOutputsParams(json=schema)
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        # Auto tool choice keeps special tokens in the text: markers such as [TOOL_CALLS] are some (vLLM).
        params = self._sampling_params(body, max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                       structured_outputs=structured,
                                       skip_special_tokens=False if tool_state.mode == "auto" else None)
        prompt_text = await self._render_chat(body, tools)
        # The template already wrote the special tokens (vLLM chat: add_special_tokens=False).
        encoded = await self._encode(prompt_text, params, add_special_tokens=False, param="messages")
        return [encoded.token_ids], params, lora, ChatOutputState(tool_state, self.reasoning_parser)

    def _tool_choice(self, body: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, ToolCallState]:
        """The request's tools (as the chat template takes them) and how its output is read, with
        vLLM's rules and messages; 400 for a tool_choice without tools, "auto" on a server without
        --enable-auto-tool-choice, a named function not in `tools`, or forced tool calls together
        with another structured output."""
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        if tools is not None:
            with bad_request_on_value_error("tools"):
                self.limits.check_count("tools", len(tools), self.limits.max_tools, "tools")
        choice = body.tool_choice
        if choice is None:
            choice = "auto" if tools else "none"
        if choice == "none":
            return tools, ToolCallState("none")
        if not tools:
            raise BadRequestError("When using `tool_choice`, `tools` must be set.", "tool_choice")
        if choice == "auto":
            if not self.enable_auto_tool_choice:
                raise BadRequestError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                      "to be set", "tool_choice")
            return tools, ToolCallState("auto", parser=self.tool_call_parser)
        if any(getattr(body, name) is not None for name in ("response_format", "guided_json", "guided_regex",
                                                             "guided_choice", "guided_grammar")):
            raise BadRequestError("tool_choice 'required' or a named function cannot be combined with "
                                  "response_format or guided decoding.", "tool_choice")
        if choice == "required":
            return tools, ToolCallState("required")
        name = choice.function.name
        if name not in {tool["function"]["name"] for tool in tools}:
            raise BadRequestError(f"Tool '{name}' has not been passed in `tools`.", "tool_choice")
        return tools, ToolCallState("named", function_name=name)

    # -- request -> engine ----------------------------------------------------------------


    async def _encode(self, prompt: str | list[int], params: SamplingParams | None, add_special_tokens: bool = True,
                      param: str = "prompt") -> EncodedPrompt:
        """The prompt tokenized and checked in a worker thread; ValueError -> 400 naming `param`."""
        try:
            return await self.engine.encode(prompt, params, add_special_tokens)
        except ValueError as exc:
            raise BadRequestError(str(exc), _param_of(exc, param)) from exc

    def _check_model(self, model: str | None) -> None:
        """404 unless `model` is the served model or an adapter named so far (same tokenizer)."""
        with bad_request_on_value_error("model"):
            self.limits.check_name("model", model)
        if model is not None and model != self.served_model_name and not self.engine.is_registered_lora(model):
            raise ModelNotFoundError(model)

    def _sampling_params(self, body: SamplingRequestFields, max_tokens: int | None, **extra: Any) -> SamplingParams:
        kwargs: dict[str, Any] = {name: value for name in _SAMPLING_FIELDS
                                  if (value := getattr(body, name)) is not None}
        kwargs.update({k: v for k, v in extra.items() if v is not None})
        with bad_request_on_value_error("response_format"):
            structured = from_openai(body.response_format, body.guided_json, body.guided_regex, body.guided_choice,
                                     body.guided_grammar)
        if structured is not None:
            kwargs["structured_outputs"] = structured
        if body.logit_bias:
            try:  # OpenAI's range; vLLM clamps the same way
                kwargs["logit_bias"] = {k: min(100.0, max(-100.0, float(v))) for k, v in body.logit_bias.items()}
            except (TypeError, ValueError):
                raise BadRequestError("logit_bias values must be numbers.", "logit_bias") from None
        try:
            params = SamplingParams(max_tokens=max_tokens, **kwargs)
            self.limits.check_params(params)
            return params
        except ValueError as exc:
            raise BadRequestError(str(exc), _param_of(exc)) from exc

    async def _completion_prompts(self, batch: list[str | list[int]], params: SamplingParams,
                                  need_texts: bool) -> tuple[list[list[int]], list[str]]:
        """Token ids of each prompt, and with `need_texts` (echo) their text; text is tokenized with
        special tokens, as vLLM does (token-id prompts get their decoded text). Tokenizing runs in
        worker threads, after each prompt's length was checked against the context window."""
        if not batch:
            raise BadRequestError("prompt must not be empty.", "prompt")
        prompts, texts = [], []
        for item in batch:
            encoded = await self._encode(item, params)  # truncated, if asked; 400 for an empty one
            prompts.append(encoded.token_ids)
            if need_texts:
                texts.append(item if isinstance(item, str)
                             else await asyncio.to_thread(self.tokenizer.decode, encoded.token_ids))
        return prompts, texts

    async def _render_chat(self, body: ChatCompletionRequest | TokenizeRequest,
                           tools: list[dict[str, Any]] | None = None) -> str:
        """The conversation rendered (in a worker thread) by the request's chat template, else the
        server's (--chat-template), else the model's own. A request's own template needs
        `--trust-request-chat-template` and gets `chat_template_timeout_s` to render."""
        with bad_request_on_value_error("messages"):
            self.limits.check_count("messages", len(body.messages or ()), self.limits.max_messages, "messages")
        messages = [_message_for_template(m) for m in body.messages or []]
        timeout_s = None
        if body.chat_template is not None:
            if not self.limits.trust_request_chat_template:
                raise BadRequestError("Chat templates in requests are not accepted by this server (start it with "
                                      "--trust-request-chat-template to allow them).", "chat_template")
            timeout_s = self.limits.chat_template_timeout_s
        with bad_request_on_value_error("messages" if timeout_s is None else "chat_template"):
            return await asyncio.to_thread(
                render_chat, self.tokenizer, messages, body.chat_template or self.chat_template,
                body.add_generation_prompt is not False, bool(body.continue_final_message), timeout_s, tools)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """`POST /tokenize` (vLLM): token ids of a prompt, or of chat messages through the chat template
        (tokenized in a worker thread)."""
        self._check_model(body.model)
        if body.messages is not None:
            # The template writes the special tokens itself.
            text, add_special_tokens = await self._render_chat(body), False
        elif body.prompt is not None:
            text, add_special_tokens = body.prompt, body.add_special_tokens
        else:
            raise BadRequestError("either prompt or messages must be given.", "prompt")
        def run() -> TokenizeResponse:  # a 4 MiB prompt is a million tokens: all of it off the event loop
            tokens = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            token_strs = self.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
            return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens,
                                    token_strs=token_strs)

        return await asyncio.to_thread(run)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """`POST /detokenize` (vLLM): the text of token ids. 400 for an id outside the vocabulary."""
        self._check_model(body.model)
        with bad_request_on_value_error("tokens"):
            self.engine.input_processor.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=await asyncio.to_thread(self.tokenizer.decode, body.tokens))

    def generation(self, raw_request: Request, prompts: list[list[int]], params: SamplingParams, request_id: str,
                   lora: LoRARequest | None = None, priority: int = 0, echo_texts: list[str] | None = None,
                   keep_generated: bool = True) -> Generation:
        """The engine requests of `prompts`, each with `params` whose max_tokens is fitted to the
        context window its prompt leaves (InputProcessor's rule, vLLM's messages); 400 when it
        leaves none or too little."""
        per_prompt_params = []
        for prompt in prompts:
            prompt_len = min(len(prompt), params.truncate_prompt_tokens or len(prompt))
            try:
                max_tokens = self.engine.input_processor.completion_budget(prompt_len, params.max_tokens)
            except ContextWindowError as exc:
                raise BadRequestError(str(exc), "prompt" if exc.requested is None else "max_tokens") from None
            with bad_request_on_value_error():  # e.g. min_tokens above what the context window leaves
                per_prompt_params.append(params.clone(max_tokens=max_tokens))
        return Generation(self, raw_request, prompts, per_prompt_params, request_id, echo_texts, keep_generated, lora,
                          priority)

    # -- engine -> response ---------------------------------------------------------------

    async def _serve(self, body: SamplingRequestFields, raw_request: Request, generation: Generation, is_chat: bool,
                     chat_output: ChatOutputState | None = None) -> Response:
        """`generation` run to its end (or beam-searched) and answered whole, or streamed."""
        created_s = int(time.time())
        if body.use_beam_search:
            if generation.lora_request is not None:
                raise BadRequestError("beam search with an adapter is not supported.", "use_beam_search")
            if body.stream:
                raise BadRequestError("Streaming is not supported with beam search.", "use_beam_search")
            await run_until_disconnect(raw_request, self._beam_search(body, generation))
            chat_output = None  # beams are answered as plain content
        elif body.stream:
            return await stream_response(body, raw_request, generation, created_s, is_chat, self._token_text,
                                         chat_output)
        else:
            await run_until_disconnect(raw_request, drain(generation))
        return JSONResponse(full_response(generation, created_s, is_chat, self._token_text, chat_output).model_dump())

    async def _beam_search(self, body: SamplingRequestFields, generation: Generation) -> None:
        """vLLM's `use_beam_search`: beam_width = n, one search per prompt, run concurrently;
        choices carry the generated text (without a final EOS) and the cumulative logprob."""
        with bad_request_on_value_error():
            beam_params = [BeamSearchParams(beam_width=p.n, max_tokens=p.max_tokens, ignore_eos=p.ignore_eos,
                                            temperature=body.temperature or 0.0,
                                            length_penalty=1.0 if body.length_penalty is None else body.length_penalty,
                                            include_stop_str_in_output=p.include_stop_str_in_output)
                           for p in generation.params]
            results = await asyncio.gather(*(
                self.engine.beam_search(prompt, bp, rid)
                for prompt, bp, rid in zip(generation.prompts, beam_params, generation.request_ids)))
        for i, (prompt, result) in enumerate(zip(generation.prompts, results)):
            completions = []
            for index, seq in enumerate(result.sequences):
                generated = seq.tokens[len(prompt):]
                shown = generated[:-1] if seq.finish_reason == "stop" else generated
                completions.append(CompletionOutput(
                    index=index, text=self.tokenizer.decode(shown, skip_special_tokens=True), token_ids=generated,
                    cumulative_logprob=seq.cum_logprob, finish_reason=seq.finish_reason))
            generation.latest[i] = RequestOutput(generation.request_ids[i], None, prompt, None, completions, True)
        usage = generation.usage()
        record_usage(generation.raw_request, self.metrics, usage.prompt_tokens, usage.completion_tokens)

async def lora_for_openai_model(engine: AsyncLLMEngine, limits: ServerLimits, model: str | None
                                ) -> LoRARequest | None:
    """The adapter `model` names (LoRAX / vLLM: `model=<adapter id>`), loaded; None for the
    served model. 404 for a name that is no model and no adapter, 400 for an adapter that
    fails to load (or a name too long to be one), in OpenAI's format."""
    with bad_request_on_value_error("model"):
        limits.check_name("model", model)
    if model == TGI_CLIENT_MODEL and not engine.is_registered_lora(model):
        model = None  # TGI's clients send this name on every chat; TGI serves its model whatever it is
    try:
        return await engine.lora_for_model(model)
    except LookupError as exc:
        raise ModelNotFoundError(model or "") from exc
    except ValueError as exc:
        raise BadRequestError(str(exc), "model") from exc


def _message_for_template(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: `content` a string (text parts joined), and the
    arguments of an assistant's `tool_calls` decoded from their JSON text (vLLM does the same:
    templates index into them)."""
    data = message.model_dump(exclude_none=True)
    for call in data.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass  # left as the client wrote it
    content = message.content
    if isinstance(content, list):
        for part in content:
            if part.type != "text" or part.text is None:
                raise BadRequestError(f"Content parts of type {part.type!r} are not supported.", "messages")
        data["content"] = "\n".join(part.text for part in content)
    elif content is None:
        data["content"] = ""
    return data


def _param_of(exc: ValueError, default: str | None = None) -> str | None:
    """The field a SamplingParams / ServerLimits message names: its first word ("n must be ...") or,
    in the engine's "Requested logprobs of ..." form, its second; else `default`."""
    words = str(exc).split(maxsplit=2)
    for word in words[:2]:
        if word in SamplingParams.__dataclass_fields__:
            return word
    return default


def prompt_batch(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completions `prompt` or an embeddings `input`: one text, one token-id list,
    or a batch of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]  # one text or one token-id prompt
    return list(prompt)  # type: ignore[arg-type]


def build_openai_router(engine: AsyncLLMEngine, metrics: ServerMetrics, chat_template: str | None = None,
                        limits: ServerLimits | None = None, enable_auto_tool_choice: bool = False,
                        tool_call_parser: str | None = None, reasoning_parser: str | None = None
                        ) -> tuple[APIRouter, OpenAIServing]:
    """The OpenAI routes for `engine`, counting tokens into `metrics`; `chat_template` overrides the
    model's; `limits` bound each request (default `ServerLimits()`); `enable_auto_tool_choice` and
    `tool_call_parser` (vLLM's flags) let `tool_choice: "auto"` read tool calls out of the text
    (`loomlm.server.tool_parsers`); `reasoning_parser` splits `<think>` reasoning into
    `reasoning_content` (`loomlm.server.chat_output`). (vLLM's `/tokenize` form is dispatched by
    the app, through the returned serving object.) Raises ValueError for an unknown parser, or auto
    tool choice without one."""
    serving = OpenAIServing(engine, metrics, chat_template, limits, enable_auto_tool_choice, tool_call_parser,
                            reasoning_parser)
    router = APIRouter()
    router.add_api_route("/v1/models", serving.list_models, methods=["GET"], response_model=ModelList)
    router.add_api_route("/v1/load_lora_adapter", serving.load_lora_adapter, methods=["POST"], response_model=None)
    router.add_api_route("/v1/unload_lora_adapter", serving.unload_lora_adapter, methods=["POST"],
                         response_model=None)
    router.add_api_route("/v1/completions", serving.create_completion, methods=["POST"], response_model=None)
    router.add_api_route("/v1/chat/completions", serving.create_chat_completion, methods=["POST"], response_model=None)
    router.add_api_route("/detokenize", serving.detokenize, methods=["POST"], response_model=DetokenizeResponse)
    return router, serving
