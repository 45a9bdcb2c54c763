"""Each API family's way of asking for structured output, translated to `StructuredOutputsParams`.

One function per family, so a route only calls its own. Sources:
- OpenAI: `response_format` `{"type": "json_object"}` / `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}`, plus vLLM's `guided_json`, `guided_regex`, `guided_choice`,
  `guided_grammar` (../shared/specs/vllm-openai.md);
- LoRAX: `response_format {"type": "json_object", "schema": {...}}` (../shared/specs/lorax-tgi.md);
- TGI: `grammar {"type": "json" | "regex", "value": ...}`;
- LLM Engine: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (../shared/specs/llmengine.md).
Every function raises ValueError for a malformed request (the route maps it to its family's
4xx); whether a schema / regex / grammar compiles is checked later, by the engine.
"""

from __future__ import annotations

from typing import Any

from loomlm.sampling_params import StructuredOutputsParams


def from_llmengine(guided_json: Any = None, guided_regex: str | None = None, guided_choice: list[str] | None = None,
                   guided_grammar: str | None = None) -> StructuredOutputsParams | None:
    """LLM Engine's guided_* fields (at most one): vLLM's, which `from_openai` takes too."""
    given = {name: value for name, value in (("json", guided_json), ("regex", guided_regex),
                                             ("choice", guided_choice), ("grammar", guided_grammar))
             if value is not None}
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"only one kind of guided decoding may be given, got {sorted('guided_' + k for k in given)}.")
    return StructuredOutputsParams(**given)


def from_openai(response_format: dict[str, Any] | None, guided_json: Any = None, guided_regex: str | None = None,
                guided_choice: list[str] | None = None, guided_grammar: str | None = None
                ) -> StructuredOutputsParams | None:
    """OpenAI's response_format, or vLLM's guided_* fields (not both)."""
    guided = from_llmengine(guided_json, guided_regex, guided_choice, guided_grammar)
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return guided
    if guided is not None:
        raise ValueError("give response_format or guided decoding fields, not both.")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError("response_format json_schema needs {'json_schema': {'name', 'schema'}}.")
        return StructuredOutputsParams(json=spec["schema"])
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}.")


def from_lorax(response_format: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """LoRAX's `{"type": "json_object", "schema": {...}}` (no schema: any JSON object)."""
    if response_format is None:
        return None
    if response_format.get("type") != "json_object":
        raise ValueError(f"response_format type must be 'json_object', got {response_format.get('type')!r}.")
    schema = response_format.get("schema")
    return StructuredOutputsParams(json=schema) if schema is not None else StructuredOutputsParams(json_object=True)


def from_tgi(grammar: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """TGI's `{"type": "json", "value": schema}` or `{"type": "regex", "value": pattern}`."""
    if grammar is None:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    if value is None:
        raise ValueError("grammar needs a 'value'.")
    if kind == "json":
        return StructuredOutputsParams(json=value)
    if kind == "regex":
        if not isinstance(value, str):
            raise ValueError("a regex grammar's value must be a string.")
        return StructuredOutputsParams(regex=value)
    raise ValueError(f"grammar type must be 'json' or 'regex', got {kind!r}.")
