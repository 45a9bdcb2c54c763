"""`Client`: LoRAX's blocking Python client API, for a loomlm (or LoRAX / TGI) server.

Source: predibase/lorax `clients/python/lorax/client.py`; the public signatures are
LoRAX's (a keyword-only `transport=` and TGI's `frequency_penalty`, `presence_penalty`,
`top_n_tokens` and `grammar` are loomlm's additions). Each method is three steps: build
the request (`generate.client_call_request`, shared), move it (`SyncTransport`, I/O only),
parse the answer (`generate.parse_*`, shared). `async_client.AsyncClient` is the same
three steps with `await`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from loomlm.client.generate import ClientBase, client_call_request, parse_generate_response, parse_stream_event
from loomlm.client.transport import SyncTransport
from loomlm.protocol.tgi import GenerateResponse, MergedAdaptersSpec, StreamResponse


class Client(ClientBase, AbstractContextManager):
    """Blocking client of a LoRAX-compatible server (LoRAX's `lorax.Client`).

    Example:

        >>> from loomlm import Client
        >>> client = Client("http://127.0.0.1:8000")
        >>> client.generate("Why is the sky blue?", max_new_tokens=16).generated_text
        >>> for response in client.generate_stream("Why is the sky blue?", max_new_tokens=16):
        ...     if not response.token.special:
        ...         print(response.token.text, end="")

    Args:
        base_url: the server's URL; generate calls POST to it as it is.
        headers: extra headers sent with every request (e.g. `Authorization: Bearer ...`).
        cookies: cookies sent with every request.
        timeout: seconds to wait for a connection and for each read (a stream's next event).
        transport: an httpx transport to use instead of the network (keyword-only;
            `httpx.MockTransport` in tests).

    The client keeps one connection pool; `close()` it, or use it as a context manager.
    Connection failures and timeouts raise httpx's own `httpx.HTTPError`s.
    """

    _transport: SyncTransport
    _transport_class = SyncTransport

    def close(self) -> None:
        """Close the connection pool."""
        self._transport.close()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(
        self,
        prompt: str,
        adapter_id: str | None = None,
        adapter_source: str | None = None,
        merged_adapters: MergedAdaptersSpec | dict[str, Any] | None = None,
        api_token: str | None = None,
        do_sample: bool = False,
        max_new_tokens: int | None = None,
        ignore_eos_token: bool = False,
        best_of: int | None = None,
        repetition_penalty: float | None = None,
        return_full_text: bool = False,
        seed: int | None = None,
        stop_sequences: list[str] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        truncate: int | None = None,
        typical_p: float | None = None,
        watermark: bool = False,
        response_format: dict[str, Any] | Any | None = None,
        decoder_input_details: bool = False,
        return_k_alternatives: int | None = None,
        details: bool = True,
        *,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        top_n_tokens: int | None = None,
        grammar: dict[str, Any] | Any | None = None,
    ) -> GenerateResponse:
        """Generate a continuation of `prompt` (LoRAX's `Client.generate`).

        Sends `POST base_url` with `{"inputs": prompt, "parameters": {...}, "stream": false}`:
        every parameter below that is set (not None), `stop_sequences` as `stop`, and
        LoRAX's booleans (`do_sample`, `ignore_eos_token`, `return_full_text`,
        `watermark`, `details`, `decoder_input_details`) always.

        Args:
            prompt: the input text (not empty).
            adapter_id: the LoRA adapter to apply; exclusive with `merged_adapters`.
            adapter_source: where `adapter_id` lives: "hub", "local", "s3" or "pbase".
            merged_adapters: a weighted merge of adapters (`MergedAdapters` or its dict:
                ids, weights, merge_strategy, density, majority_sign_method).
            api_token: token for private adapters, sent as `parameters.api_token`.
            do_sample: sample instead of greedy decoding.
            max_new_tokens: the most tokens to generate (> 0).
            ignore_eos_token: keep generating past the end-of-sequence token.
            best_of: generate this many sequences and return the most likely (> 1 needs
                sampling and no seed).
            repetition_penalty: > 0; 1.0 is none (Keskar et al. 2019, CTRL).
            return_full_text: prepend the prompt to the generated text.
            seed: the sampling seed (>= 0).
            stop_sequences: stop when one of these is generated.
            temperature: >= 0; scales the logits.
            top_k: keep only the k most likely tokens (> 0).
            top_p: nucleus sampling mass, 0 < top_p < 1.
            truncate: keep only the last `truncate` prompt tokens (> 0).
            typical_p: typical decoding mass, 0 < typical_p < 1 (Meister et al. 2022).
            watermark: watermark the output (Kirchenbauer et al. 2023).
            response_format: `{"type": "json_object", "schema": {...}}`: constrain the
                output to JSON matching the schema (a dict or LoRAX's `ResponseFormat`).
            decoder_input_details: return the prompt tokens' logprobs (`details.prefill`).
            return_k_alternatives: return the k most likely alternatives of each token (> 0).
            details: return per-token details (ids, logprobs, finish reason, counts).
            frequency_penalty, presence_penalty: TGI's / OpenAI's penalties.
            top_n_tokens: TGI's: the n most likely tokens at each step (> 0).
            grammar: TGI's `{"type": "json" | "regex", "value": ...}` constraint.

        Returns:
            The `GenerateResponse` (from `loomlm.protocol.tgi`) in the server's one-element list.

        Raises:
            ValidationError: found before sending (LoRAX's client-side checks), or the
                server's 422 `validation` error.
            LoomlmClientError: the subclass the server's error answer maps to
                (`errors.parse_error`); `UnknownError` for an unreadable answer.
            httpx.HTTPError: the connection failed or timed out.
        """
        request = client_call_request(locals(), stream=False)
        return parse_generate_response(self._transport.request_json(request))

    def generate_stream(
        self,
        prompt: str,
        adapter_id: str | None = None,
        adapter_source: str | None = None,
        merged_adapters: MergedAdaptersSpec | dict[str, Any] | None = None,
        api_token: str | None = None,
        do_sample: bool = False,
        max_new_tokens: int | None = None,
        ignore_eos_token: bool = False,
        repetition_penalty: float | None = None,
        return_full_text: bool = False,
        seed: int | None = None,
        stop_sequences: list[str] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        truncate: int | None = None,
        typical_p: float | None = None,
        watermark: bool = False,
        response_format: dict[str, Any] | Any | None = None,
        details: bool = True,
        *,
        return_k_alternatives: int | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        top_n_tokens: int | None = None,
        grammar: dict[str, Any] | Any | None = None,
    ) -> Iterator[StreamResponse]:
        """Stream a continuation of `prompt`, one token per item (LoRAX's `Client.generate_stream`).

        Sends what `generate` sends with `"stream": true` (no `best_of`;
        `decoder_input_details` false) and reads the server-sent events: one
        `StreamResponse` per token, the last also carrying `generated_text` and
        `details`. Arguments as `generate`.

        The arguments are checked here, when called; the request is sent on the first
        `next()`. Leaving the loop early closes the connection (the server then stops
        the generation).

        Raises:
            ValidationError: found when called, before anything is sent.
            LoomlmClientError: from the iterator, for an error answer or an error event
                mid-stream (`{"error", "error_type"}`, typed by `errors.parse_error`).
            httpx.HTTPError: from the iterator, when the connection fails or times out.
        """
        request = client_call_request(locals(), stream=True)
        return self._transport.stream_json(request, parse_stream_event)

