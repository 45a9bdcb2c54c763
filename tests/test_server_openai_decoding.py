"""The OpenAI surface of the decoding options, with the real `openai` client:
completions logprobs / echo (the lm-evaluation-harness scoring call), chat
logprobs, best_of, logit_bias, vLLM's extra fields, /tokenize, /detokenize,
chat templates, and their bad input."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from server_utils import serve_app

from loomlm.server.app import build_app
from loomlm.server.limits import ServerLimits

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_completion_logprobs_shape(client: OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    offset = 0
    for token, logprob, top, text_offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert text_offset == offset
        offset += len(token)
        assert logprob <= 0 and top[token] == logprob
        assert len(top) == 3  # greedy: the chosen token is the most likely of the top 3
        assert max(top.values()) == logprob


def test_echo_max_tokens_0_scores_the_prompt_like_transformers(client: OpenAI, server, reference) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = out.choices[0]
    assert choice.text == text
    assert out.usage.completion_tokens == 0
    ids = server.tokenizer.encode(text)
    assert out.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert "".join(lp.tokens) == text and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-4
        # top_logprobs: the prompt token and the single most likely alternative.
        assert max(lp.top_logprobs[i].values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)


def test_echo_with_generation_prepends_the_prompt(client: OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=0)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.usage.completion_tokens == 5
    lp = echoed.choices[0].logprobs
    assert "".join(lp.tokens) == echoed.choices[0].text
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])


def test_streamed_logprobs_equal_non_streamed(client: OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    tokens, logprobs, offsets = [], [], []
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                           stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            logprobs += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == full.choices[0].logprobs.tokens
    assert logprobs == pytest.approx(full.choices[0].logprobs.token_logprobs, abs=1e-6)
    assert offsets == full.choices[0].logprobs.text_offset


def test_chat_logprobs(client: OpenAI, server) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = out.choices[0].logprobs.content
    text = out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":  # the EOS token is reported too, as vLLM does
        text += server.tokenizer.eos_token
    assert "".join(c.token for c in content) == text
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                                logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += [(c.token, c.logprob, c.top_logprobs) for c in chunk.choices[0].logprobs.content]
    assert [t for t, _, _ in streamed] == [c.token for c in content]
    assert all(top == [] for _, _, top in streamed)  # logprobs without top_logprobs: no alternatives
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_best_of_and_n(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, prompt="Write a word:", max_tokens=6, temperature=1.0, seed=3)
    first = client.completions.create(best_of=4, n=2, **kwargs)
    again = client.completions.create(best_of=4, n=2, **kwargs)
    assert len(first.choices) == 2 and [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]


def test_logit_bias_and_vllm_extras(client: OpenAI, server) -> None:
    target = server.tokenizer.encode(" banana", add_special_tokens=False)[0]
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0,
                                    logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == " banana" * 4
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logit_bias={str(target): 100})
    assert chat.choices[0].message.content.strip().startswith("banana")
    extra = client.completions.create(
        model=MODEL, prompt="one two three four five six", max_tokens=4, temperature=0.7, seed=1,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 4, "prompt_logprobs": 1,
                    "truncate_prompt_tokens": 3, "include_stop_str_in_output": False, "stop_token_ids": [2]})
    assert extra.usage.prompt_tokens == 3 and extra.usage.completion_tokens == 4
    prompt_logprobs = extra.choices[0].model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == 3
    assert all(1 <= len(entry) <= 2 for entry in prompt_logprobs[1:])


BAD_BODIES = {
    "logprobs negative": dict(logprobs=-1),
    "logprobs above 20": dict(logprobs=21),
    "best_of below n": dict(n=3, best_of=2, temperature=1.0),
    "best_of with stream": dict(n=1, best_of=2, temperature=1.0, stream=True),
    "logit_bias unknown token": dict(logit_bias={"100000000": 5}),
    "echo max_tokens -1": dict(echo=True, max_tokens=-1),
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_decoding_requests_are_400(client: OpenAI, body: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, **({"max_tokens": 4} | body))
    assert info.value.response.json()["error"]["code"] == 400
    ok = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_bad_chat_logprobs_are_400(client: OpenAI) -> None:
    for kwargs in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **kwargs)


def test_tokenize_detokenize(server) -> None:
    tok = server.tokenizer
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT})
        assert r.status_code == 200
        body = r.json()
        assert body["tokens"] == tok.encode(PROMPT) and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == server.engine.max_model_len
        r = http.post("/detokenize", json={"tokens": body["tokens"]})
        assert r.status_code == 200 and r.json() == {"prompt": tok.decode(body["tokens"])}
        chat = http.post("/tokenize", json={"messages": MESSAGES, "return_token_strs": True}).json()
        rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False)
        assert chat["token_strs"] == tok.convert_ids_to_tokens(chat["tokens"])
        template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
        # A request's own chat template needs --trust-request-chat-template (vLLM's flag).
        refused = http.post("/tokenize", json={"messages": MESSAGES, "chat_template": template})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template"
        assert "--trust-request-chat-template" in refused.json()["error"]["message"]
        for path, payload in (("/detokenize", {"tokens": [10**9]}), ("/tokenize", {})):
            r = http.post(path, json=payload)
            assert r.status_code == 400 and r.json()["error"]["code"] == 400
    trusting = build_app(server.engine, limits=ServerLimits(trust_request_chat_template=True))
    with serve_app(trusting, server.engine) as trusted, httpx.Client(base_url=trusted.base_url, timeout=60) as http:
        custom = http.post("/tokenize", json={"messages": MESSAGES, "chat_template": template}).json()
        assert custom["tokens"] == tok.encode("<<What is the capital of France?>>", add_special_tokens=False)
        r = http.post("/tokenize", json={"messages": MESSAGES, "chat_template": "{% if %}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_chat_template_fields_reach_the_prompt(client: OpenAI, server) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # Request templates need a server started with --trust-request-chat-template.
    trusting = build_app(server.engine, limits=ServerLimits(trust_request_chat_template=True))
    with serve_app(trusting, server.engine) as trusted:
        trusted_client = OpenAI(base_url=f"{trusted.base_url}/v1", api_key="x", max_retries=0, timeout=300)
        out = trusted_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0,
            extra_body={"chat_template": template, "add_generation_prompt": False})
    with pytest.raises(openai.BadRequestError, match="trust-request-chat-template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
                                       extra_body={"chat_template": template})
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    # The template renders the bare text; completions add no BOS for this tokenizer either.
    assert server.tokenizer.encode(PROMPT) == server.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert out.choices[0].message.content == plain.choices[0].text


def test_server_chat_template_replaces_the_models(server) -> None:
    from loomlm.server.app import build_app

    app = build_app(server.engine, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
                    limits=ServerLimits(trust_request_chat_template=True))

    async def tokenize(payload: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loomlm") as http:
            return (await http.post("/tokenize", json=payload)).json()

    tok = server.tokenizer
    default = asyncio.run(tokenize({"messages": MESSAGES}))
    assert default["tokens"] == tok.encode("[What is the capital of France?]", add_special_tokens=False)
    # A template in the request still wins over the server's.
    own = asyncio.run(tokenize({"messages": MESSAGES, "chat_template": "{{ messages[0]['content'] }}"}))
    assert own["tokens"] == tok.encode("What is the capital of France?", add_special_tokens=False)

    async def lorax_prefill(inputs: str) -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loomlm") as http:
            r = await http.post("/generate", json={"inputs": inputs, "parameters": {
                "apply_chat_template": True, "max_new_tokens": 1, "details": True, "decoder_input_details": True}})
            return [t["id"] for t in r.json()["details"]["prefill"]]

    # LoRAX's apply_chat_template renders with the server's template too, not the model's.
    assert asyncio.run(lorax_prefill(json.dumps(MESSAGES))) == default["tokens"]


def test_use_beam_search_equals_offline_beam_search(client: OpenAI, server) -> None:
    from loomlm import LLM, BeamSearchParams

    out = client.completions.create(model=MODEL, prompt=[PROMPT, "def add(a, b):"], max_tokens=6, n=3,
                                    temperature=0, extra_body={"use_beam_search": True, "length_penalty": 0.8})
    assert len(out.choices) == 6 and [c.index for c in out.choices] == list(range(6))
    offline = LLM(MODEL).beam_search([PROMPT, "def add(a, b):"],
                                     BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.8))
    tok = server.tokenizer
    for p, (prompt, result) in enumerate(zip([PROMPT, "def add(a, b):"], offline)):
        prompt_len = len(tok.encode(prompt))
        for i, seq in enumerate(result.sequences):
            choice = out.choices[p * 3 + i]
            generated = seq.tokens[prompt_len:]
            if seq.finish_reason == "stop":
                generated = generated[:-1]  # the EOS is not part of the text
            assert choice.finish_reason == seq.finish_reason
            assert choice.text == tok.decode(generated, skip_special_tokens=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, stream=True,
                                  extra_body={"use_beam_search": True})
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=2,
                                          extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)


def test_structured_output_over_openai(client: OpenAI) -> None:
    import json
    import re

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
              "required": ["city", "population"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    choice = client.completions.create(model=MODEL, prompt="The best color is", max_tokens=8, temperature=1.0, seed=2,
                                       extra_body={"guided_choice": ["red", "green", "blue"]})
    assert choice.choices[0].text in {"red", "green", "blue"}
    regex = client.completions.create(model=MODEL, prompt="A date:", max_tokens=16, temperature=1.0, seed=3,
                                      extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", regex.choices[0].text)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}) if c.choices)
    assert streamed == chat.choices[0].message.content


def test_invalid_structured_output_is_400_with_the_compilers_message(client: OpenAI) -> None:
    for kwargs in ({"extra_body": {"guided_regex": "[a-"}},
                   {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                               "schema": {"type": "nonsense"}}}},
                   {"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a"]}},
                   {"response_format": {"type": "xml"}}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, **kwargs)
        error = info.value.response.json()["error"]
        assert error["code"] == 400 and error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"guided_regex": "[a-"})
    assert "unclosed character class" in info.value.response.json()["error"]["message"]
