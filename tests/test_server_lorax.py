"""The LoRAX / TGI-compatible routes driven by the real `lorax-client` and `text-generation`
packages: generate, stream, details, best_of, adapters, merged adapters, structured output,
errors; plus `/info`, TGI's `/tokenize`, the adapter metrics and OpenAI's `model=<adapter>`.
Expected outputs come from the offline `LLM` on the same weights."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import lorax
import pytest
import text_generation
from server_utils import RunningServer, make_adapter, offline, serve_engine

from loomlm import LoRARequest, SamplingParams

PROMPT = "The capital of France is"



@pytest.fixture(scope="module")
def adapters(smollm2_reference_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lorax-adapters")
    return {
        "attn-r8": make_adapter(smollm2_reference_dir, root / "attn-r8", 8, 16, ["q_proj", "v_proj", "o_proj"], 1),
        "mlp-r8": make_adapter(smollm2_reference_dir, root / "mlp-r8", 8, 8, ["gate_proj", "down_proj"], 2),
        "all-r4": make_adapter(smollm2_reference_dir, root / "all-r4", 4, 8,
                               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 3),
    }


@pytest.fixture(scope="module")
def lorax_server(adapters: dict[str, Path]) -> Iterator[RunningServer]:
    # --adapter-ids: the first adapter is preloaded under its path.
    # --adapter-root: requests may name the adapters under it by path.
    with serve_engine(model="smollm2-135m-instruct", enable_lora=True, max_loras=2,
                      lora_adapter_ids=(str(adapters["attn-r8"]),),
                      adapter_roots=(str(adapters["attn-r8"].parent),)) as running:
        yield running


@pytest.fixture(scope="module")
def lorax_client(lorax_server: RunningServer) -> lorax.Client:
    return lorax.Client(lorax_server.base_url, timeout=300)


@pytest.fixture(scope="module")
def tgi_client(lorax_server: RunningServer) -> text_generation.Client:
    return text_generation.Client(lorax_server.base_url, timeout=300)



def test_generate_matches_the_offline_engine_with_details(lorax_client, llm):
    expected = offline(llm, PROMPT, 12, ignore_eos=True)
    response = lorax_client.generate(PROMPT, max_new_tokens=12, ignore_eos_token=True, decoder_input_details=True,
                                     return_k_alternatives=3)
    assert response.generated_text == expected.text
    details = response.details
    assert details.finish_reason == "length" and details.generated_tokens == 12
    assert [t.id for t in details.tokens] == expected.token_ids
    for token, position in zip(details.tokens, expected.logprobs, strict=True):
        assert token.logprob == pytest.approx(position[token.id].logprob, abs=1e-4)
        alternatives = token.alternative_tokens
        assert len(alternatives) == 3 and alternatives[0].id == token.id  # greedy: the chosen one is the top
        assert [a.logprob for a in alternatives] == sorted((a.logprob for a in alternatives), reverse=True)
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    assert [t.id for t in details.prefill] == prompt_ids and details.prompt_tokens == len(prompt_ids)
    assert details.prefill[0].logprob is None and all(t.logprob <= 0 for t in details.prefill[1:])


def test_stream_tokens_add_up_to_the_generated_text(lorax_client, tgi_client):
    full = lorax_client.generate(PROMPT, max_new_tokens=10, ignore_eos_token=True).generated_text
    for client in (lorax_client, tgi_client):
        kwargs = {"ignore_eos_token": True} if client is lorax_client else {}
        events = list(client.generate_stream(PROMPT, max_new_tokens=10, **kwargs))
        text = "".join(e.token.text for e in events if not e.token.special)
        last = events[-1]
        assert last.generated_text is not None and all(e.generated_text is None for e in events[:-1])
        assert last.details.generated_tokens == len(events)
        if client is lorax_client:
            assert len(events) == 10 and text == full == last.generated_text


def test_stop_sequence_stays_in_the_text_and_full_text(lorax_client):
    base = lorax_client.generate(PROMPT, max_new_tokens=16, ignore_eos_token=True).generated_text
    stop = base.strip().split()[1]  # a word the greedy completion reaches
    response = lorax_client.generate(PROMPT, max_new_tokens=16, stop_sequences=[stop], return_full_text=True)
    assert response.details.finish_reason == "stop_sequence"
    assert response.generated_text.startswith(PROMPT) and response.generated_text.endswith(stop)
    assert base.startswith(response.generated_text[len(PROMPT):])


def test_best_of_returns_the_most_likely_sequence(lorax_client):
    response = lorax_client.generate(PROMPT, max_new_tokens=8, do_sample=True, best_of=2, temperature=1.0)
    details = response.details
    (other,) = details.best_of_sequences
    assert sum(t.logprob for t in details.tokens) >= sum(t.logprob for t in other.tokens)
    assert details.seed is not None and other.seed is not None and details.seed != other.seed


def test_seeded_sampling_is_reproducible(tgi_client):
    a = tgi_client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=7, top_n_tokens=2)
    b = tgi_client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=7, top_n_tokens=2)
    assert a.generated_text == b.generated_text and a.details.seed == 7
    assert all(len(top) == 2 for top in a.details.top_tokens)


def test_adapters_match_openai_model_selection_and_change_the_output(lorax_server, lorax_client, adapters):
    from openai import OpenAI

    openai = OpenAI(base_url=f"{lorax_server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
    base = lorax_client.generate(PROMPT, max_new_tokens=10, ignore_eos_token=True).generated_text
    for name in ("attn-r8", "all-r4"):
        path = str(adapters[name])
        response = lorax_client.generate(PROMPT, adapter_id=path, adapter_source="local", max_new_tokens=10,
                                         ignore_eos_token=True)
        assert response.generated_text != base
        completion = openai.completions.create(model=path, prompt=PROMPT, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert completion.choices[0].text == response.generated_text and completion.model == path
    listed = [m.id for m in openai.models.list().data]
    assert listed[0] == lorax_server.engine.served_model_name and str(adapters["attn-r8"]) in listed
    with pytest.raises(Exception) as err:
        openai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert getattr(err.value, "status_code", None) == 404


def test_merged_adapters(lorax_client, adapters):
    a, b = str(adapters["attn-r8"]), str(adapters["mlp-r8"])
    alone = lorax_client.generate(PROMPT, adapter_id=a, max_new_tokens=10, ignore_eos_token=True).generated_text
    # peft's linear merge with weights (1, 0) is adapter a exactly.
    only_a = lorax.MergedAdapters(ids=[a, b], weights=[1.0, 0.0], merge_strategy="linear", density=1.0)
    merged = lorax_client.generate(PROMPT, merged_adapters=only_a, max_new_tokens=10, ignore_eos_token=True)
    assert merged.generated_text == alone
    for strategy in ("ties", "dare_ties"):
        spec = lorax.MergedAdapters(ids=[a, b], weights=[0.6, 0.4], merge_strategy=strategy, density=0.5,
                                    majority_sign_method="frequency")
        first = lorax_client.generate(PROMPT, merged_adapters=spec, max_new_tokens=8, ignore_eos_token=True)
        again = lorax_client.generate(PROMPT, merged_adapters=spec, max_new_tokens=8, ignore_eos_token=True)
        assert first.generated_text == again.generated_text  # cached by its definition: the same draw
    # Different ranks (r8 with r4): linear merges exactly (peft refuses), so weights (1, 0) are a alone;
    # ties over different ranks is refused with a clear error.
    r4 = str(adapters["all-r4"])
    mixed = lorax.MergedAdapters(ids=[a, r4], weights=[1.0, 0.0], merge_strategy="linear", density=1.0)
    assert lorax_client.generate(PROMPT, merged_adapters=mixed, max_new_tokens=10,
                                 ignore_eos_token=True).generated_text == alone
    mismatch = lorax.MergedAdapters(ids=[a, r4], weights=[0.5, 0.5], merge_strategy="ties", density=0.5)
    with pytest.raises(lorax.errors.ValidationError, match="r=4|rank"):
        lorax_client.generate(PROMPT, merged_adapters=mismatch, max_new_tokens=2)


def test_structured_output_through_both_clients(lorax_client, tgi_client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    response = lorax_client.generate("Describe Paris as JSON:", max_new_tokens=60, do_sample=True, seed=3,
                                     response_format={"type": "json_object", "schema": schema})
    jsonschema.validate(json.loads(response.generated_text), schema)
    grammar = text_generation.types.Grammar(type="regex", value=r"(yes|no), [0-9]{2}")
    answer = tgi_client.generate("Is Paris in France?", max_new_tokens=12, grammar=grammar)
    assert re.fullmatch(r"(yes|no), [0-9]{2}", answer.generated_text)
    assert answer.details.finish_reason == "eos_token"


def test_errors_are_422_with_error_type_and_lose_nothing(lorax_server, lorax_client, adapters):
    with pytest.raises(lorax.errors.ValidationError, match="not in"):
        lorax_client.generate(PROMPT, adapter_id="nobody/no-such-adapter", max_new_tokens=2)
    broken = adapters["attn-r8"].parent / "broken"  # under the adapter root
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(lorax.errors.ValidationError):
        lorax_client.generate(PROMPT, adapter_id=str(broken), adapter_source="local", max_new_tokens=2)
    url = lorax_server.base_url
    cases = [
        {"inputs": PROMPT, "parameters": {"adapter_id": str(adapters["attn-r8"]),
                                          "merged_adapters": {"ids": ["x"], "weights": [1.0]}}},
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 100_000}},
        {"inputs": PROMPT, "parameters": {"temperature": -1}},
        {"inputs": PROMPT, "parameters": {"grammar": {"type": "regex", "value": "([a-z"}}},
        {"inputs": PROMPT, "parameters": {"best_of": 2}},  # best_of needs sampling
        {"inputs": ""},
        {"parameters": {"max_new_tokens": 2}},  # no inputs
    ]
    for body in cases:
        for path in ("/", "/generate", "/generate_stream"):
            r = httpx.post(url + path, json=body, timeout=60)
            assert r.status_code == 422, (path, body, r.text)
            assert r.json()["error_type"] == "validation" and r.json()["error"]
    # Explicit nulls everywhere are "not given".
    nulls = {k: None for k in ("adapter_id", "temperature", "top_p", "seed", "stop", "details", "best_of",
                               "max_new_tokens", "response_format", "grammar", "watermark")}
    r = httpx.post(url + "/generate", json={"inputs": PROMPT, "parameters": nulls | {"max_new_tokens": 3},
                                            "stream": None}, timeout=60)
    assert r.status_code == 200 and int(r.headers["x-generated-tokens"]) <= 3
    assert int(r.headers["x-prompt-tokens"]) == len(lorax_server.tokenizer.encode(PROMPT))
    assert r.headers["x-model-id"] == lorax_server.engine.served_model_name and "x-total-time" in r.headers


def test_overloaded_is_429(lorax_server):
    app_state = lorax_server.app.state
    app_state.tgi.max_concurrent_requests = 0
    try:
        r = httpx.post(lorax_server.base_url + "/generate", json={"inputs": PROMPT}, timeout=60)
        assert r.status_code == 429 and r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    finally:
        app_state.tgi.max_concurrent_requests = 128


def test_info_tokenize_and_metrics(lorax_server, adapters):
    url = lorax_server.base_url
    info = httpx.get(url + "/info").json()
    assert info["model_id"] == lorax_server.engine.served_model_name
    assert info["max_total_tokens"] == lorax_server.engine.max_model_len and info["max_active_adapters"] == 2
    tokens = httpx.post(url + "/tokenize", json={"inputs": PROMPT}).json()
    assert [t["id"] for t in tokens] == lorax_server.tokenizer.encode(PROMPT)
    assert "".join(t["text"] for t in tokens) == PROMPT[: tokens[-1]["stop"]]
    vllm_form = httpx.post(url + "/tokenize", json={"prompt": PROMPT}).json()  # the OpenAI family's form
    assert vllm_form["tokens"] == [t["id"] for t in tokens]
    metrics = httpx.get(url + "/metrics").text
    loads = float(re.search(r"^loomlm_lora_loads_total (\S+)$", metrics, re.MULTILINE)[1])
    hits = float(re.search(r"^loomlm_lora_hits_total (\S+)$", metrics, re.MULTILINE)[1])
    assert loads >= 1 and hits >= 1 and "loomlm_lora_evictions_total" in metrics


def test_async_clients(lorax_server):
    import asyncio

    async def run() -> tuple[str, str]:
        a = await lorax.AsyncClient(lorax_server.base_url, timeout=300).generate(PROMPT, max_new_tokens=6)
        b = await text_generation.AsyncClient(lorax_server.base_url, timeout=300).generate(PROMPT, max_new_tokens=6)
        return a.generated_text, b.generated_text

    a, b = asyncio.run(run())
    assert a == b and a


def test_preloaded_and_loaded_adapters_are_counted(lorax_server, adapters):
    manager = lorax_server.engine.engine.lora_manager
    assert str(adapters["attn-r8"]) in lorax_server.engine.engine.lora_requests
    assert manager.num_loads >= 1 and set(manager.loaded) <= set(manager.known)
    assert isinstance(lorax_server.engine.engine.lora_requests[str(adapters["attn-r8"])], LoRARequest)


def test_loomlm_clients_against_the_server(lorax_server, lorax_client, adapters):
    """loomlm's own Client / AsyncClient give what the real lorax client gets, typed errors included."""
    import asyncio

    import loomlm
    from loomlm.client import ValidationError

    a, b = str(adapters["attn-r8"]), str(adapters["mlp-r8"])
    client = loomlm.Client(lorax_server.base_url, timeout=300)
    kwargs = {"max_new_tokens": 8, "ignore_eos_token": True, "decoder_input_details": True}
    mine = client.generate(PROMPT, adapter_id=a, **kwargs)
    theirs = lorax_client.generate(PROMPT, adapter_id=a, **kwargs)
    assert mine.generated_text == theirs.generated_text
    assert [t.id for t in mine.details.tokens] == [t.id for t in theirs.details.tokens]
    assert len(mine.details.prefill) == len(theirs.details.prefill)
    events = list(client.generate_stream(PROMPT, adapter_id=a, max_new_tokens=8, ignore_eos_token=True))
    assert "".join(e.token.text for e in events) == mine.generated_text == events[-1].generated_text
    merged = loomlm.MergedAdapters(ids=[a, b], weights=[1.0, 0.0], merge_strategy="linear", density=1.0)
    assert client.generate(PROMPT, merged_adapters=merged, max_new_tokens=8,
                           ignore_eos_token=True).generated_text == mine.generated_text
    with pytest.raises(ValidationError, match="not in") as err:
        client.generate(PROMPT, adapter_id="nobody/no-such-adapter", max_new_tokens=2)
    assert err.value.status_code == 422

    async def run_async() -> tuple[str, str]:
        async with loomlm.AsyncClient(lorax_server.base_url, timeout=300) as aclient:
            response = await aclient.generate(PROMPT, adapter_id=a, max_new_tokens=8, ignore_eos_token=True)
            streamed = [e.token.text async for e in aclient.generate_stream(PROMPT, adapter_id=a, max_new_tokens=8,
                                                                           ignore_eos_token=True)]
            return response.generated_text, "".join(streamed)

    assert asyncio.run(run_async()) == (mine.generated_text, mine.generated_text)


def test_truncate_keeps_the_last_prompt_tokens(lorax_server, lorax_client, llm):
    prompt = "One two three four five six seven eight nine ten eleven twelve"
    ids = lorax_server.tokenizer.encode(prompt)
    r = httpx.post(lorax_server.base_url + "/generate", timeout=60, json={
        "inputs": prompt, "parameters": {"truncate": 5, "max_new_tokens": 6, "ignore_eos_token": True,
                                         "details": True}})
    assert r.status_code == 200 and r.headers["x-prompt-tokens"] == "5"
    expected = llm.generate([ids[-5:]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert [t["id"] for t in r.json()["details"]["tokens"]] == expected.token_ids


def test_tgi_client_chat_streamed_and_not(tgi_client, llm):
    """`text_generation.Client.chat` sends `model="tgi"` (hard-coded in the client) to
    /v1/chat/completions; TGI serves its model whatever the name, and so does loomlm."""
    messages = [text_generation.types.Message(role="user", content="Name a color.")]
    expected = llm.chat([{"role": "user", "content": "Name a color."}],
                        SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    reply = tgi_client.chat(messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage["completion_tokens"] == 8 or reply.choices[0].finish_reason == "stop"  # usage: Any
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       tgi_client.chat(messages, max_tokens=8, temperature=0, stream=True) if chunk.choices)
    assert streamed == expected


def test_adapters_without_any_lora_flag(lorax_client, adapters, tmp_path):
    """`loomlm serve MODEL` as a LoRAX user starts it (no LoRA flag): adapters from the Hugging
    Face cache load on first use, alone and merged, with the same outputs as a server started
    with the adapters' paths."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time

    commit = "1" * 40
    hub = tmp_path / "hub"
    for name in ("attn-r8", "mlp-r8"):
        repo = hub / f"models--acme--{name}"
        shutil.copytree(adapters[name], repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "loomlm.cli", "serve", "smollm2-135m-instruct", "--port", str(port),
                               "--log-level", "warning"], env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert server.poll() is None, "loomlm serve exited"
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = lorax.Client(base_url, timeout=300)
        ours = client.generate(PROMPT, adapter_id="acme/attn-r8", max_new_tokens=8, ignore_eos_token=True)
        expected = lorax_client.generate(PROMPT, adapter_id=str(adapters["attn-r8"]), adapter_source="local",
                                         max_new_tokens=8, ignore_eos_token=True)
        assert ours.generated_text == expected.generated_text
        spec = {"weights": [0.7, 0.3], "merge_strategy": "linear", "density": 1.0}
        merged = client.generate(PROMPT, merged_adapters=lorax.MergedAdapters(ids=["acme/attn-r8", "acme/mlp-r8"], **spec),
                                 max_new_tokens=8, ignore_eos_token=True)
        local_ids = [str(adapters["attn-r8"]), str(adapters["mlp-r8"])]
        expected = lorax_client.generate(PROMPT, merged_adapters=lorax.MergedAdapters(ids=local_ids, **spec),
                                         adapter_source="local", max_new_tokens=8, ignore_eos_token=True)
        assert merged.generated_text == expected.generated_text
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_loomlm_lorax_dropin_against_the_server(lorax_server, lorax_client, adapters):
    """`import loomlm.lorax as lorax` code, LoRAX's names: the same answer as the real client."""
    import loomlm.lorax as ours

    spec = {"ids": [str(adapters["attn-r8"]), str(adapters["mlp-r8"])], "weights": [0.6, 0.4],
            "merge_strategy": "linear", "density": 1.0}
    mine = ours.Client(lorax_server.base_url, timeout=300).generate(
        PROMPT, merged_adapters=ours.MergedAdapters(**spec), max_new_tokens=6, ignore_eos_token=True)
    theirs = lorax_client.generate(PROMPT, merged_adapters=lorax.MergedAdapters(**spec), max_new_tokens=6,
                                   ignore_eos_token=True)
    assert isinstance(mine, ours.Response) and mine.generated_text == theirs.generated_text
    assert mine.details.finish_reason == ours.FinishReason.Length


def test_load_and_unload_lora_adapters_at_run_time(lorax_server, adapters, tmp_path):
    """vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`: an adapter under the
    --adapter-root becomes a model name, listed with its parent, until it is unloaded."""
    from openai import OpenAI, NotFoundError

    base, path = lorax_server.base_url, str(adapters["mlp-r8"])
    client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
    with httpx.Client(base_url=base, timeout=300) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime-mlp", "lora_path": path})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'runtime-mlp' added successfully."
        cards = {m.id: m for m in client.models.list().data}
        assert cards["runtime-mlp"].parent == "smollm2-135m-instruct"
        by_name = client.completions.create(model="runtime-mlp", prompt=PROMPT, max_tokens=6, temperature=0)
        by_path = client.completions.create(model=path, prompt=PROMPT, max_tokens=6, temperature=0)
        assert by_name.choices[0].text == by_path.choices[0].text
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime-mlp", "lora_path": path})
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        refused = http.post("/v1/load_lora_adapter", json={"lora_name": "other", "lora_path": str(outside)})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == 400
        empty = http.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": path})
        assert empty.status_code == 400
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime-mlp"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'runtime-mlp' removed successfully."
        assert "runtime-mlp" not in {m.id for m in client.models.list().data}
        with pytest.raises(NotFoundError):
            client.completions.create(model="runtime-mlp", prompt=PROMPT, max_tokens=2)
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime-mlp"})
        assert gone.status_code == 404 and gone.json()["error"]["message"] == "The lora adapter 'runtime-mlp' cannot be found."
