"""`Completion`: Scale LLM Engine's Python completion API (`llmengine.Completion`), for a loomlm server.

Source: scaleapi/llm-engine `clients/python/llmengine/completion.py` (`Completion.create`,
`Completion.acreate`); the signatures are LLM Engine's, plus `base_url` and `api_key` (the
LLM Engine client reads its server and key from module state and the environment). Each call
is three steps: build the request (`llmengine.completion_request`), move it (`SyncTransport`
/ `AsyncTransport`, I/O only), parse the answer (`llmengine.parse_*`). Torch-free.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from typing import Any

from loomlm.client.core import ApiRequest
from loomlm.client.llmengine import (
    completion_request,
    parse_stream_event,
    parse_sync_response,
    request_headers_for,
    resolve_base_url,
)
from loomlm.client.transport import AsyncTransport, SyncTransport
from loomlm.protocol.llmengine import (
    CompletionStreamV1Response,
    CompletionSyncV1Response,
)

COMPLETION_TIMEOUT_S = 300


class Completion:
    """Text completions from a loomlm server's LLM Engine API (`llmengine.Completion`'s calls).

    Example:

        >>> from loomlm import Completion
        >>> response = Completion.create(model="smollm2-135m-instruct", prompt="Hello, my name is",
        ...                              max_new_tokens=10, temperature=0, base_url="http://127.0.0.1:8000")
        >>> response.output.text, response.output.num_completion_tokens
        >>> for chunk in Completion.create(model="smollm2-135m-instruct", prompt="Why is the sky blue?",
        ...                                max_new_tokens=16, stream=True):
        ...     if chunk.output:
        ...         print(chunk.output.text, end="")

    The server is `base_url`, else `$LOOMLM_BASE_URL`, else LLM Engine's `$LLM_ENGINE_BASE_PATH`,
    else `http://127.0.0.1:8000`; the key is `api_key`, else `$LOOMLM_API_KEY`, else LLM Engine's
    `$SCALE_API_KEY`, sent as `Authorization: Bearer` (none: no header).
    """

    @classmethod
    def create(
        cls,
        model: str,
        prompt: str,
        max_new_tokens: int = 20,
        temperature: float = 0.2,
        stop_sequences: list[str] | None = None,
        return_token_log_probs: bool | None = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        include_stop_str_in_output: bool | None = None,
        guided_json: dict[str, Any] | None = None,
        guided_regex: str | None = None,
        guided_choice: list[str] | None = None,
        guided_grammar: str | None = None,
        timeout: float = COMPLETION_TIMEOUT_S,
        stream: bool = False,
        request_headers: dict[str, str] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        **kwargs: Any,
    ) -> CompletionSyncV1Response | Iterator[CompletionStreamV1Response]:
        """Complete `prompt` with `model` (LLM Engine's `Completion.create`).

        Sends `POST {base_url}/v1/llm/completions-sync?model_endpoint_name={model}` (or
        `completions-stream` when `stream`) with the parameters below that are set.

        Args:
            model: the served model's name, or a LoRA adapter id the server knows.
            prompt: the text to complete.
            max_new_tokens: the most tokens to generate (prompt + these must fit the context).
            temperature: in [0, 1]; 0 is greedy decoding.
            stop_sequences: stop when one is generated; the text ends before it.
            return_token_log_probs: add each generated token with its logprob (natural log):
                `output.tokens` (sync) or each chunk's `output.token` (stream).
            presence_penalty, frequency_penalty: in [0, 2] (OpenAI's penalties).
            top_k: keep the k most likely tokens (>= 1; -1: all).
            top_p: nucleus sampling mass, in (0, 1].
            include_stop_str_in_output: keep the stop sequence at the end of the text.
            guided_json, guided_regex, guided_choice, guided_grammar: constrain the output to a
                JSON schema, a regex, one of the choices, or a context-free grammar (at most one).
            timeout: seconds, for each of connecting, sending, and waiting for the next bytes.
            stream: return an iterator of chunks, one per token, instead of the response.
            request_headers: extra HTTP headers (they win over the API key header).
            base_url: the server's root URL (see the class docstring).
            api_key: the server's API key (see the class docstring).
            kwargs: other LLM Engine request fields (`skip_special_tokens`).

        Returns:
            `CompletionSyncV1Response` (`.request_id`, `.output.text`, `.output.num_prompt_tokens`,
            `.output.num_completion_tokens`, `.output.tokens`, `.json()`); with `stream`, an
            iterator of `CompletionStreamV1Response` (`.output.text` the token's text,
            `.output.finished`, `.output.num_completion_tokens` so far; `.error` set, and
            `.output` None, on a failure after the stream started, as LLM Engine's client
            yields it). The stream's request is sent on the first `next()`; leaving the loop
            early closes the connection (the server then stops generating).

        Raises:
            ValidationError: a parameter of the wrong type or out of range (before sending).
            TypeError: an unknown keyword argument.
            LoomlmClientError: the server's error answer, typed by its status (`errors.parse_error`):
                `BadRequestError` (400), `AuthenticationError` (401), `NotFoundError` (404, an
                unknown model), `UnknownError` (an unreadable answer); from the iterator when streaming.
            httpx.HTTPError: the connection failed or timed out.
        """
        request, base_url, headers = _call(locals())
        if stream:
            return _stream_chunks(base_url, headers, timeout, request)
        with closing(SyncTransport(base_url, headers, timeout=timeout)) as transport:
            return parse_sync_response(transport.request_json(request))

    @classmethod
    async def acreate(
        cls,
        model: str,
        prompt: str,
        max_new_tokens: int = 20,
        temperature: float = 0.2,
        stop_sequences: list[str] | None = None,
        return_token_log_probs: bool | None = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        include_stop_str_in_output: bool | None = None,
        guided_json: dict[str, Any] | None = None,
        guided_regex: str | None = None,
        guided_choice: list[str] | None = None,
        guided_grammar: str | None = None,
        timeout: float = COMPLETION_TIMEOUT_S,
        stream: bool = False,
        request_headers: dict[str, str] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        **kwargs: Any,
    ) -> CompletionSyncV1Response | AsyncIterator[CompletionStreamV1Response]:
        """`create`, awaited (LLM Engine's `Completion.acreate`): the same request, result and errors.

        With `stream`, the awaited result is an async iterator of chunks:
        `async for chunk in await Completion.acreate(..., stream=True)`.
        """
        request, base_url, headers = _call(locals())
        if stream:
            return _astream_chunks(base_url, headers, timeout, request)
        async with aclosing(AsyncTransport(base_url, headers, timeout=timeout)) as transport:
            return parse_sync_response(await transport.request_json(request))


# `create` / `acreate` arguments that say how to send the call, not what it asks.
_CALL_OPTIONS = ("cls", "timeout", "stream", "request_headers", "base_url", "api_key", "kwargs")


def _call(call_locals: dict[str, Any]) -> tuple[ApiRequest, str, dict[str, str]]:
    """The request, the server's root URL and the headers of a `create` / `acreate` call, from
    its `locals()` taken before anything else (LLM Engine's signature, kept by both methods)."""
    fields = {name: value for name, value in call_locals.items() if name not in _CALL_OPTIONS}
    request = completion_request(stream=call_locals["stream"], **fields, **call_locals["kwargs"])
    headers = request_headers_for(call_locals["api_key"], call_locals["request_headers"])
    return request, resolve_base_url(call_locals["base_url"]), headers


def _stream_chunks(base_url: str, headers: dict[str, str], timeout: float, request: ApiRequest
                   ) -> Iterator[CompletionStreamV1Response]:
    """The chunks of a stream request, sent on the first `next()` over a transport of its own;
    closing the iterator closes the HTTP stream and the transport."""
    with closing(SyncTransport(base_url, headers, timeout=timeout)) as transport:
        yield from transport.stream_json(request, parse_stream_event)


async def _astream_chunks(base_url: str, headers: dict[str, str], timeout: float, request: ApiRequest
                          ) -> AsyncIterator[CompletionStreamV1Response]:
    """As `_stream_chunks`, asynchronously (the connection pool belongs to the iterating event loop)."""
    async with aclosing(AsyncTransport(base_url, headers, timeout=timeout)) as transport:
        async with aclosing(transport.stream_json(request, parse_stream_event)) as chunks:
            async for chunk in chunks:
                yield chunk
