"""LoRAX's generate API in the clients' shared core: the request a `generate` /
`generate_stream` call sends, its client-side validation, and the parsing of answers.

Source: predibase/lorax `clients/python/lorax/types.py` (`Parameters`, `Request`,
`MergedAdapters`, `ResponseFormat` and their validators) and
huggingface/text-generation-inference `clients/python/text_generation/types.py`
(`frequency_penalty`, `top_n_tokens`, `grammar`); wire format in
shared/specs/lorax-tgi.md. The wire models are `loomlm.protocol.tgi`'s, shared with the
server. Both `Client` and `AsyncClient` call these functions and share `ClientBase`'s
constructor; neither does any of this itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pydantic

from loomlm.client.core import ApiRequest, describe, validated
from loomlm.client.errors import ValidationError, parse_error
from loomlm.client.transport import AsyncTransport, SyncTransport, Timeout
from loomlm.protocol.tgi import (
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    MergedAdaptersSpec,
    StreamResponse,
)

# LoRAX's clients POST to base_url itself (the server's `POST /`), with `"stream"` choosing
# a JSON list or an SSE answer.
GENERATE_PATH = ""

ADAPTER_SOURCES = ("hub", "local", "s3", "pbase")
MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")
GRAMMAR_TYPES = ("json", "regex")


# A range check: (predicate on a set value, LoRAX's error text when it fails).
_RangeCheck = tuple[Callable[[float], bool], str]
_STRICTLY_POSITIVE: _RangeCheck = (lambda value: value > 0, "must be strictly positive")
_IN_OPEN_UNIT_INTERVAL: _RangeCheck = (lambda value: 0 < value < 1, "must be > 0.0 and < 1.0")

# Per-parameter range checks, made in this order.
_RANGE_CHECKS: dict[str, _RangeCheck] = {
    "max_new_tokens": _STRICTLY_POSITIVE,
    "best_of": _STRICTLY_POSITIVE,
    "repetition_penalty": _STRICTLY_POSITIVE,
    "seed": (lambda value: value >= 0, "must be positive"),
    "temperature": (lambda value: value >= 0, "must be non-negative"),
    "top_k": _STRICTLY_POSITIVE,
    "top_p": _IN_OPEN_UNIT_INTERVAL,
    "truncate": _STRICTLY_POSITIVE,
    "typical_p": _IN_OPEN_UNIT_INTERVAL,
    "return_k_alternatives": _STRICTLY_POSITIVE,
    "top_n_tokens": _STRICTLY_POSITIVE,
}

# Any of these set means the request samples (LoRAX's `best_of` check).
_SAMPLING_PARAMETERS = ("temperature", "top_k", "top_p", "typical_p")


class ClientBase:
    """The constructor `Client` and `AsyncClient` share: LoRAX's `(base_url, headers, cookies,
    timeout)` (documented on `Client`), plus a keyword-only `transport` (an `httpx.BaseTransport`
    for `Client`, an `httpx.AsyncBaseTransport` for `AsyncClient`). `_transport_class` does the I/O."""

    _transport_class: type[SyncTransport] | type[AsyncTransport]

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None,
        timeout: Timeout = 60,
        *,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.headers = headers
        self.cookies = cookies
        self.timeout = timeout
        self._transport = self._transport_class(base_url, headers, cookies, timeout, transport)


def generate_request(
    prompt: str,
    *,
    stream: bool,
    stop_sequences: list[str] | None = None,
    merged_adapters: Any = None,
    response_format: Any = None,
    grammar: Any = None,
    **parameters: Any,
) -> ApiRequest:
    """The `POST <base_url>` call for a generate (`stream=False`) or generate_stream call.

    `parameters` are `GenerateParameters` fields by their wire names; `stop_sequences`
    becomes `stop`. `merged_adapters`, `response_format` and `grammar` may be dicts or
    pydantic models (e.g. `MergedAdaptersSpec`, or lorax-client's `MergedAdapters` /
    `ResponseFormat`). The body is `{"inputs", "parameters", "stream"}` with every unset
    (None) parameter left out; LoRAX's booleans (`do_sample`, `details`, ...) are always
    sent.

    Raises:
        ValidationError: an empty prompt, a parameter of the wrong type or out of range,
            or a forbidden combination, with LoRAX's messages.
        TypeError: an unknown parameter name (a programming error in the caller).
    """
    unknown = parameters.keys() - GenerateParameters.model_fields.keys()
    if unknown:
        raise TypeError(f"unknown generate parameters: {sorted(unknown)}")
    if not prompt:
        raise ValidationError("`inputs` cannot be empty")

    fields = {
        **parameters,
        "stop": stop_sequences,
        "merged_adapters": _as_plain(merged_adapters),
        "response_format": _as_plain(response_format),
        "grammar": _as_plain(grammar),
    }
    try:
        generate_parameters = GenerateParameters.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise ValidationError(describe(exc)) from exc
    _check_parameters(generate_parameters, stream)

    body = GenerateRequest(inputs=prompt, parameters=generate_parameters, stream=stream)
    return ApiRequest("POST", GENERATE_PATH, body.model_dump(mode="json", exclude_none=True))


def client_call_request(call_locals: dict[str, Any], *, stream: bool) -> ApiRequest:
    """`generate_request` for a `Client` / `AsyncClient` `generate` (`stream=False`) or
    `generate_stream` call, from the method's `locals()` taken before anything else: its
    arguments, which keep LoRAX's public signatures, and `self` (dropped). A stream sends
    `decoder_input_details` false (LoRAX's `generate_stream` has no such argument).

    Raises: as `generate_request`.
    """
    arguments = {name: value for name, value in call_locals.items() if name != "self"}
    if stream:
        arguments["decoder_input_details"] = False
    return generate_request(stream=stream, **arguments)


def parse_generate_response(payload: Any) -> GenerateResponse:
    """The `GenerateResponse` in a non-stream answer: `POST /`'s one-element list
    (LoRAX's client reads `payload[0]`) or `/generate`'s bare object.

    Raises:
        UnknownError: the payload is not a generate response.
    """
    item = payload[0] if isinstance(payload, list) and payload else payload
    return validated(GenerateResponse, item, 200)


def parse_stream_event(event: Any, status_code: int = 200) -> StreamResponse:
    """The `StreamResponse` in one stream event's JSON (`status_code`: the stream's HTTP status).

    Raises:
        LoomlmClientError: the subclass `errors.parse_error` picks, for an error event
            (`{"error": "...", "error_type": "..."}`) sent mid-stream.
        UnknownError: the event is neither a token nor an error.
    """
    if isinstance(event, dict) and "error" in event:
        raise parse_error(status_code, event)
    return validated(StreamResponse, event, status_code)


def _check_parameters(parameters: GenerateParameters, stream: bool) -> None:
    """LoRAX's (and TGI's) client-side value checks; types were checked by pydantic."""
    for name, (is_valid, requirement) in _RANGE_CHECKS.items():
        value = getattr(parameters, name)
        if value is not None and not is_valid(value):
            raise ValidationError(f"`{name}` {requirement}")

    if parameters.adapter_id is not None and parameters.merged_adapters is not None:
        raise ValidationError("you must specify at most one of `adapter_id` or `merged_adapters`")
    if parameters.adapter_source is not None and parameters.adapter_source not in ADAPTER_SOURCES:
        raise ValidationError(f"`adapter_source={parameters.adapter_source}` must be one of {list(ADAPTER_SOURCES)}")
    if parameters.merged_adapters is not None:
        check_merged_adapters(parameters.merged_adapters)

    if parameters.best_of is not None and parameters.best_of > 1:
        if parameters.seed is not None:
            raise ValidationError("`seed` must not be set when `best_of` is > 1")
        sets_sampling = (getattr(parameters, name) is not None for name in _SAMPLING_PARAMETERS)
        if not (parameters.do_sample or any(sets_sampling)):
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when `stream` == True")

    if parameters.response_format is not None and parameters.grammar is not None:
        raise ValidationError("give `response_format` (LoRAX) or `grammar` (TGI), not both")
    # No "schema" means any JSON object, as loomlm's server reads it (LoRAX's client requires one).
    if parameters.response_format is not None and parameters.response_format.get("type") != "json_object":
        raise ValidationError('`response_format` must be {"type": "json_object", "schema": {...}}')
    if parameters.grammar is not None:
        if parameters.grammar.get("type") not in GRAMMAR_TYPES:
            raise ValidationError(f"`grammar.type` must be one of {list(GRAMMAR_TYPES)}")
        if not parameters.grammar.get("value"):
            raise ValidationError(f"`value` cannot be empty for `{parameters.grammar['type']}` grammar")


def check_merged_adapters(merged_adapters: MergedAdaptersSpec) -> None:
    """LoRAX's `MergedAdapters` validators (lorax-client's `lorax.types.MergedAdapters`).

    Raises ValidationError: empty ids or weights, their lengths differ, an unknown merge_strategy
    or majority_sign_method, or a density outside [0, 1]."""
    if not merged_adapters.ids:
        raise ValidationError("`ids` cannot be empty")
    if not merged_adapters.weights:
        raise ValidationError("`weights` cannot be empty")
    if len(merged_adapters.ids) != len(merged_adapters.weights):
        raise ValidationError("`ids` and `weights` must have the same length")
    if merged_adapters.merge_strategy is not None and merged_adapters.merge_strategy not in MERGE_STRATEGIES:
        raise ValidationError(f"`merge_strategy` must be one of {list(MERGE_STRATEGIES)}")
    if merged_adapters.density is not None and not 0 <= merged_adapters.density <= 1:
        raise ValidationError("`density` must be >= 0.0 and <= 1.0")
    method = merged_adapters.majority_sign_method
    if method is not None and method not in MAJORITY_SIGN_METHODS:
        raise ValidationError(f"`majority_sign_method` must be one of {list(MAJORITY_SIGN_METHODS)}")


def _as_plain(value: Any) -> Any:
    """A pydantic model as its wire dict (by alias: LoRAX's `ResponseFormat.schema_spec` is `schema`)."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    return value

