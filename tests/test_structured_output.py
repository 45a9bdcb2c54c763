"""Structured output on the default model: every sampled output (temperature 1, several seeds)
of 20 JSON schemas validates with `jsonschema` and of 10 regexes `re.fullmatch`es; choices,
Lark grammars, any-JSON-object; constrained and unconstrained requests in one batch; the
compile cache; jump-forward; invalid constraints; the API-family translations."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loomlm import LLM, SamplingParams
from loomlm.protocol import structured_outputs as translate
from loomlm.sampling_params import GuidedDecodingParams, StructuredOutputsParams

SEEDS = (0, 1, 2)
# Every schema bounds its output (maxLength, maxItems, ranges, multipleOf): a bare JSON `number` or
# `string` admits endless digits / characters, and a 135M model at temperature 1 sometimes takes them.
# (multipleOf is a power of two: jsonschema checks it in binary floating point.)
NAME = {"type": "string", "maxLength": 12}

SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125}},
     "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -100, "maximum": 100}, "y": {"type": "integer", "minimum": -100, "maximum": 100}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}, "required": ["id"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": NAME, "nickname": NAME}, "required": ["name"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "$defs": {"person": {"type": "object", "properties": {"name": NAME}, "required": ["name"],
                                             "additionalProperties": False}},
     "properties": {"author": {"$ref": "#/$defs/person"}, "editor": {"$ref": "#/$defs/person"}},
     "required": ["author", "editor"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"],
     "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 1000, "maximum": 2000},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 50, "multipleOf": 0.5},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["temperature", "unit"],
     "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 3,
                                                "maxItems": 3}}, "required": ["flags"], "additionalProperties": False},
    {"type": "object", "properties": {"meta": {"type": "object", "properties": {"version": {"type": "integer",
     "minimum": 1, "maximum": 9}, "stable": {"type": "boolean"}}, "required": ["version"],
                                               "additionalProperties": False}}, "required": ["meta"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "event"}, "count": {"type": "integer", "minimum": 0,
                                                                            "maximum": 50}},
     "required": ["kind", "count"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"cat": NAME}, "required": ["cat"], "additionalProperties": False},
               {"type": "object", "properties": {"dog": NAME}, "required": ["dog"], "additionalProperties": False}]},
]

REGEXES = [
    r"[0-9]{3}-[0-9]{3}-[0-9]{4}",
    r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    r"#[0-9a-f]{6}",
    r"[a-z]{3,8}@[a-z]{3,8}\.(com|org|net)",
    r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}",
    r"(yes|no)",
    r"[A-Z][a-z]{2,10} [A-Z][a-z]{2,10}",
    r"-?[0-9]{1,4}\.[0-9]{2}",
    r"[01]{8}",
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun)day?, [0-9]{1,2} (Jan|Feb|Mar)",
]


def constrained(llm: LLM, prompt: str, so: StructuredOutputsParams) -> list[str]:
    """Texts sampled at temperature 1, one per seed."""
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, structured_outputs=so) for s in SEEDS]
    return [o.outputs[0].text for o in llm.generate([prompt] * len(SEEDS), params, use_tqdm=False)]


def test_json_schemas_always_validate(llm):
    assert len(SCHEMAS) >= 20
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        jsonschema.Draft202012Validator.check_schema(schema)
        for seed in SEEDS:
            prompts.append(f"Write JSON for record {i}:")
            params.append(SamplingParams(temperature=1.0, seed=seed, max_tokens=200,
                                         structured_outputs=StructuredOutputsParams(json=schema)))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outputs, params):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), p.structured_outputs.json)


def test_regexes_always_fullmatch(llm):
    prompts, params = [], []
    for regex in REGEXES:
        for seed in SEEDS:
            prompts.append("Answer:")
            params.append(SamplingParams(temperature=1.0, seed=seed, max_tokens=64,
                                         structured_outputs=StructuredOutputsParams(regex=regex)))
    for out, p in zip(llm.generate(prompts, params, use_tqdm=False), params):
        assert re.fullmatch(p.structured_outputs.regex, out.outputs[0].text), (p.structured_outputs.regex,
                                                                              out.outputs[0].text)


def test_choice_grammar_and_json_object(llm):
    choices = ["Paris", "London", "New York City", 'say "hi"']
    for text in constrained(llm, "The best city:", StructuredOutputsParams(choice=choices)):
        assert text in choices
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    for text in constrained(llm, "Q: 2+2?", StructuredOutputsParams(grammar=grammar)):
        assert re.fullmatch(r"The answer is [0-9]{1,3}\.", text)
    # Any JSON object is unbounded: a 135M model at temperature 1 may ramble until max_tokens, so
    # check the greedy completion and every sampled one that finished.
    prompt = 'JSON: {"ok": true}\nJSON: {"city": "Paris"}\nJSON:'
    so = GuidedDecodingParams(json_object=True)  # vLLM's older name
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=100, guided_decoding=so),
                          use_tqdm=False)[0].outputs[0]
    assert greedy.finish_reason == "stop" and isinstance(json.loads(greedy.text), dict)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=100, structured_outputs=so) for s in range(6)]
    finished = [o.outputs[0] for o in llm.generate([prompt] * 6, params, use_tqdm=False)
                if o.outputs[0].finish_reason == "stop"]
    assert finished
    for completion in finished:
        assert isinstance(json.loads(completion.text), dict)


def test_unconstrained_requests_are_unaffected_in_a_mixed_batch(llm):
    plain_prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    alone = [o.outputs[0].text for o in llm.generate(plain_prompts, greedy, use_tqdm=False)]
    so = StructuredOutputsParams(json=SCHEMAS[0])
    mixed_prompts = [plain_prompts[0], "JSON:", plain_prompts[1], "JSON:", plain_prompts[2]]
    mixed_params = [greedy, SamplingParams(temperature=1.0, seed=1, max_tokens=64, structured_outputs=so), greedy,
                    SamplingParams(temperature=0, max_tokens=64, structured_outputs=so), greedy]
    outs = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    assert [outs[0].outputs[0].text, outs[2].outputs[0].text, outs[4].outputs[0].text] == alone
    for out in (outs[1], outs[3]):
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[0])


def test_compile_cache_and_jump_forward(llm):
    manager = llm.llm_engine.structured_outputs
    schema = {"type": "object", "properties": {"first_name": NAME, "last_name": NAME}, "required":
              ["first_name", "last_name"], "additionalProperties": False}
    compiles, hits, forced = manager.num_compiles, manager.num_cache_hits, manager.num_forced_tokens
    so = StructuredOutputsParams(json=schema)
    fast = llm.generate("A person:", SamplingParams(temperature=0, max_tokens=64, structured_outputs=so),
                        use_tqdm=False)[0].outputs[0]
    assert manager.num_compiles == compiles + 1
    assert manager.num_forced_tokens > forced  # the fixed keys were appended without sampling
    # logprobs disable jump-forward (a forced token has none): the same text, token by token.
    slow = llm.generate("A person:", SamplingParams(temperature=0, max_tokens=64, structured_outputs=so, logprobs=0),
                        use_tqdm=False)[0].outputs[0]
    assert manager.num_compiles == compiles + 1 and manager.num_cache_hits == hits + 1  # same schema: cached
    assert json.loads(fast.text) == json.loads(slow.text)
    jsonschema.validate(json.loads(fast.text), schema)
    assert len(slow.logprobs) == len(slow.token_ids)


@pytest.mark.parametrize("so", [
    StructuredOutputsParams(json={"type": "nonsense"}),
    StructuredOutputsParams(regex="[a-"),
    StructuredOutputsParams(grammar="start: ("),
    StructuredOutputsParams(json="{not json"),
])
def test_invalid_constraints_raise_and_lose_nothing(llm, so):
    with pytest.raises(ValueError, match="invalid structured output constraint"):
        llm.generate(["fine", "bad"], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, structured_outputs=so)],
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs", [{}, {"json": {}, "regex": "a"}, {"choice": []}, {"choice": "ab"}])
def test_bad_params_raise(kwargs):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**kwargs)


def test_family_translations():
    schema = {"type": "object"}
    assert translate.from_openai({"type": "json_object"}) == StructuredOutputsParams(json_object=True)
    assert translate.from_openai({"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                          "strict": True}}).json == schema
    assert translate.from_openai(None, guided_choice=["a", "b"]).choice == ["a", "b"]
    assert translate.from_openai({"type": "text"}) is None
    assert translate.from_lorax({"type": "json_object", "schema": schema}).json == schema
    assert translate.from_lorax({"type": "json_object"}).json_object
    assert translate.from_tgi({"type": "regex", "value": "[0-9]+"}).regex == "[0-9]+"
    assert translate.from_tgi({"type": "json", "value": schema}).json == schema
    assert translate.from_llmengine(guided_grammar='start: "x"').grammar == 'start: "x"'
    for bad in (lambda: translate.from_openai({"type": "json_schema"}),
                lambda: translate.from_openai({"type": "json_object"}, guided_regex="a"),
                lambda: translate.from_openai({"type": "xml"}),
                lambda: translate.from_openai(None, guided_regex="a", guided_choice=["b"]),
                lambda: translate.from_lorax({"type": "regex"}),
                lambda: translate.from_tgi({"type": "json"}),
                lambda: translate.from_tgi({"type": "grammar", "value": "x"})):
        with pytest.raises(ValueError):
            bad()


def test_a_request_waiting_for_its_grammar_does_not_stall_the_batch(llm):
    import threading

    engine = llm.llm_engine
    manager = engine.structured_outputs
    release = threading.Event()
    compile_original = manager._compile

    def slow_compile(params):
        release.wait(timeout=60)  # held until the other request has finished
        return compile_original(params)

    manager._compile = slow_compile
    try:
        schema = {"type": "object", "properties": {"slow": {"type": "boolean"}}, "required": ["slow"],
                  "additionalProperties": False}
        engine.add_request("waits", "JSON:", SamplingParams(temperature=0, max_tokens=32,
                                                            structured_outputs=StructuredOutputsParams(json=schema)))
        engine.add_request("runs", "The capital of France is", SamplingParams(temperature=0, max_tokens=8))
        finished: dict[str, object] = {}
        while "runs" not in finished:
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        assert "waits" not in finished
        waiting = engine.output_processor.requests["waits"].sequences[0]
        assert waiting.num_computed_tokens == 0 and not waiting.output_token_ids  # never scheduled yet
        release.set()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        assert json.loads(finished["waits"].outputs[0].text) in ({"slow": True}, {"slow": False})
    finally:
        release.set()
        manager._compile = compile_original
