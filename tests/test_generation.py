"""The Generations API: `loomlm.model(...)` handles, decoders, sync twins, batching of
concurrent calls, the default model, remote handles against a real server, bad input."""

from __future__ import annotations

from collections.abc import Iterator

import asyncio
import threading
import time

import pytest
from server_utils import offline

import loomlm
from loomlm import BeamSearchParams, SamplingParams
from loomlm.generation import ENV_DEFAULT_MODEL, get_default_model
from loomlm.models.zoo import DEFAULT_MODEL

PROMPT = "Q: What is the capital of France?\nA:"
PROMPTS = ["The sky is", "My favourite food is", "In 1492, Columbus", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def model() -> Iterator[loomlm.Model]:
    with loomlm.model(DEFAULT_MODEL) as handle:
        yield handle


@pytest.fixture(scope="module")
def remote(server) -> Iterator[loomlm.Model]:
    with loomlm.model(server.base_url) as handle:
        yield handle


def beam_texts(llm, prompt: str, width: int, max_tokens: int, temperature: float = 0.0) -> list[str]:
    """The offline engine's beams as generated text: without the prompt and a final EOS."""
    tokenizer = llm.get_tokenizer()
    prompt_len = len(tokenizer.encode(prompt))
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                                     temperature=temperature))[0]
    texts = []
    for seq in out.sequences:
        generated = seq.tokens[prompt_len:]
        if seq.finish_reason == "stop":
            generated = generated[:-1]
        texts.append(tokenizer.decode(generated, skip_special_tokens=True))
    return texts


# ---------------------------------------------------------------------------------------
# Handles


def test_handles_of_one_model_share_one_engine(model, make_tiny_model_dir):
    with loomlm.model(DEFAULT_MODEL) as again:
        assert again.engine is model.engine
    assert model.engine.engine.model_runner.model is not None  # another handle is still open
    tiny = str(make_tiny_model_dir("llama"))
    with loomlm.model(tiny) as first, loomlm.model(tiny) as second, loomlm.model(tiny, max_model_len=128) as other:
        assert second.engine is first.engine
        assert other.engine is not first.engine and other.engine.max_model_len == 128
    assert repr(model) == f"loomlm.Model('{DEFAULT_MODEL}')" and not model.is_remote


def test_closing_the_last_handle_frees_the_engine(make_tiny_model_dir):
    tiny = str(make_tiny_model_dir("llama"))
    # max_model_len: engine arguments of its own, so no other test's handle shares this engine
    first, second = loomlm.model(tiny, max_model_len=96), loomlm.model(tiny, max_model_len=96)
    engine = first.engine
    first.close()
    first.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="closed"):
        first.generate_sync(PROMPT, max_tokens=2)
    assert len(second.generate_sync(PROMPT, max_tokens=2)) > 0  # the engine serves the open handle
    second.close()
    deadline = time.monotonic() + 10
    while engine.engine.model_runner.model is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # released on the engine's step thread
    assert engine.engine.model_runner.model is None and engine.engine.model_runner.kv_cache is None
    with loomlm.model(tiny, max_model_len=96) as fresh:  # loads anew
        assert fresh.engine is not engine
        assert len(fresh.generate_sync(PROMPT, max_tokens=2)) > 0


def test_generate_returns_only_the_completion_and_equals_offline_greedy(model, llm):
    text = model.generate_sync(PROMPT, max_tokens=10)
    assert isinstance(text, str)
    assert text == offline(llm, PROMPT, 10).text
    assert asyncio.run(model.generate(PROMPT, max_tokens=10)) == text


def test_max_tokens_none_runs_to_the_end_of_sequence(model, llm):
    text = model.generate_sync(PROMPT)  # the instruct model answers briefly, then EOS
    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=None), use_tqdm=False)[0].outputs[0]
    assert expected.finish_reason == "stop"
    assert text == expected.text


def test_concurrent_calls_batch_in_the_engine(model):
    """asyncio.gather of several calls: same results as one at a time, in fewer engine steps."""
    sequential = [model.generate_sync(p, max_tokens=8) for p in PROMPTS]
    engine = model.engine.engine
    steps = 0
    step = engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counting_step
    try:
        async def main():
            return await asyncio.gather(*(model.generate(p, max_tokens=8) for p in PROMPTS))

        concurrent = asyncio.run(main())
    finally:
        del engine.step
    assert concurrent == sequential
    # One at a time would take at least 8 steps each; batched, the 4 run side by side.
    assert steps < 2 * 8


def test_sync_calls_inside_a_running_loop_share_the_engine(model):
    """Jupyter's case: generate_sync while the caller's loop runs, alongside awaiting callers."""
    expected = [model.generate_sync(p, max_tokens=6) for p in PROMPTS]

    async def main():
        tasks = [asyncio.create_task(model.generate(p, max_tokens=6)) for p in PROMPTS[1:]]
        await asyncio.sleep(0)  # the tasks hand their requests to the engine's loop
        blocking = model.generate_sync(PROMPTS[0], max_tokens=6)
        return [blocking, *await asyncio.gather(*tasks)]

    assert asyncio.run(main()) == expected
    # ... and from another thread at the same time as this one.
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p: results.setdefault(p, model.generate_sync(p, max_tokens=6)))
               for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[p] for p in PROMPTS] == expected


def test_cancelling_a_call_aborts_its_request(model):
    engine = model.engine

    async def main():
        task = asyncio.create_task(model.generate("Count from one to one thousand: one, two,", max_tokens=2000))
        while not engine.engine.has_unfinished_requests():  # the request runs in the engine
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if not engine.engine.has_unfinished_requests():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main()), "the cancelled request kept running in the engine"


# ---------------------------------------------------------------------------------------
# Decoders


def test_sample_is_reproducible_with_a_seed_and_returns_n(model, llm):
    first = model.generate_sync(PROMPT, max_tokens=8, decoder="sample", n=3, seed=7, temperature=1.2)
    assert isinstance(first, list) and len(first) == 3 and all(isinstance(t, str) for t in first)
    assert model.generate_sync(PROMPT, max_tokens=8, decoder="sample", n=3, seed=7, temperature=1.2) == first
    params = SamplingParams(n=3, seed=7, temperature=1.2, max_tokens=8)
    assert [c.text for c in llm.generate(PROMPT, params, use_tqdm=False)[0].outputs] == first
    other = model.generate_sync(PROMPT, max_tokens=8, decoder="sample", n=3, seed=8, temperature=1.2)
    assert other != first
    single = model.generate_sync(PROMPT, max_tokens=8, decoder="sample", seed=7, top_k=5, top_p=0.9)
    assert isinstance(single, str)


@pytest.mark.parametrize("decoder", ["beam", "beam_search"])
def test_beam_equals_offline_beam_search(model, llm, decoder):
    texts = model.generate_sync(PROMPT, max_tokens=6, decoder=decoder, n=3)
    assert texts == beam_texts(llm, PROMPT, 3, 6)
    assert len(model.generate_sync(PROMPT, max_tokens=3, decoder=decoder)) == 4  # LMQL's default n=4
    assert isinstance(model.generate_sync(PROMPT, max_tokens=3, decoder=decoder, n=1), str)


def test_beam_sample_returns_n_beams(model):
    texts = model.generate_sync(PROMPT, max_tokens=5, decoder="beam_sample", n=2, temperature=0.8)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_penalties_reach_the_engine(model, llm):
    prompt = "List the days of the week: Monday, Tuesday,"
    kwargs = {"repetition_penalty": 1.5, "frequency_penalty": 0.5, "presence_penalty": 0.5}
    text = model.generate_sync(prompt, max_tokens=12, **kwargs)
    assert text == offline(llm, prompt, 12, **kwargs).text
    assert text != model.generate_sync(prompt, max_tokens=12)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"decoder": "greedy"}, "unknown decoder 'greedy'"),
    ({"decoder": "argmax", "top_k": 5}, "decoder 'argmax' does not take top_k"),
    ({"decoder": "argmax", "temperature": 0.5}, "does not take temperature"),
    ({"decoder": "beam", "top_p": 0.5}, "decoder 'beam' does not take top_p"),
    ({"decoder": "sample", "n": 0}, "n must be a positive integer"),
    ({"decoder": "sample", "temperature": -1}, "temperature must be a non-negative"),
    ({"decoder": "sample", "top_p": 1.5}, "top_p must be in"),
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"bogus": 1}, "does not take bogus"),
])
def test_bad_decoder_arguments_are_value_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate_sync(PROMPT, **kwargs)
    with pytest.raises(ValueError, match=message):
        asyncio.run(model.generate(PROMPT, **kwargs))


def test_bad_prompts_and_models_are_value_errors(model):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        model.generate_sync("")
    with pytest.raises(ValueError, match="maximum context length"):
        model.generate_sync(" word" * 9000, max_tokens=2)
    with pytest.raises(ValueError, match="maximum context length"):
        model.generate_sync(" word" * 9000, max_tokens=2, decoder="beam")
    with pytest.raises(ValueError, match="neither a known alias"):
        loomlm.model("no-such-model")
    with pytest.raises(ValueError, match="unknown engine argument 'bogus'"):
        loomlm.model(DEFAULT_MODEL, bogus=1)
    with pytest.raises(ValueError, match="a server URL takes only"):
        loomlm.model("http://127.0.0.1:9", max_model_len=128)
    with pytest.raises(ValueError, match="`model=` is for server URLs"):
        loomlm.model(DEFAULT_MODEL, model="x")


# ---------------------------------------------------------------------------------------
# The default model and the top-level functions


def test_top_level_functions_use_the_default_model(model, make_tiny_model_dir, monkeypatch):
    tiny = str(make_tiny_model_dir("llama"))
    monkeypatch.setenv(ENV_DEFAULT_MODEL, tiny)
    try:
        assert get_default_model().identifier == tiny
        loomlm.set_default_model(model)
        assert get_default_model() is model
        assert loomlm.generate_sync(PROMPT, max_tokens=5) == model.generate_sync(PROMPT, max_tokens=5)
        assert asyncio.run(loomlm.generate(PROMPT, 5)) == model.generate_sync(PROMPT, max_tokens=5)
        assert str(loomlm.score_sync("The capital of France is", [" Paris", " Rome"])) == str(
            asyncio.run(loomlm.score("The capital of France is", [" Paris", " Rome"], model=DEFAULT_MODEL)))
        loomlm.set_default_model(tiny)
        with loomlm.model(tiny) as handle:
            assert get_default_model().engine is handle.engine
        with pytest.raises(ValueError, match="expected a loomlm.Model"):
            loomlm.set_default_model(3)
    finally:
        loomlm.set_default_model(None)
    monkeypatch.delenv(ENV_DEFAULT_MODEL)
    assert get_default_model().engine is model.engine


# ---------------------------------------------------------------------------------------
# Remote handles: the same calls over HTTP to a server on the same model


def test_remote_generate_equals_local(model, remote):
    assert remote.is_remote and remote.engine is None
    assert remote.generate_sync(PROMPT, max_tokens=10) == model.generate_sync(PROMPT, max_tokens=10)
    assert remote.generate_sync(PROMPT) == model.generate_sync(PROMPT)  # max_tokens None: until EOS
    sample = {"max_tokens": 8, "decoder": "sample", "n": 2, "seed": 3, "temperature": 0.9, "top_k": 40}
    assert remote.generate_sync(PROMPT, **sample) == model.generate_sync(PROMPT, **sample)
    beam = {"max_tokens": 5, "decoder": "beam", "n": 3}
    assert remote.generate_sync(PROMPT, **beam) == model.generate_sync(PROMPT, **beam)
    penalties = {"max_tokens": 8, "repetition_penalty": 1.3, "presence_penalty": 0.4}
    assert remote.generate_sync(PROMPT, **penalties) == model.generate_sync(PROMPT, **penalties)


def test_remote_url_may_end_in_v1(model, server):
    remote = loomlm.model(server.base_url + "/v1/")
    assert remote.generate_sync(PROMPT, max_tokens=4) == model.generate_sync(PROMPT, max_tokens=4)


def test_remote_calls_from_gather_and_inside_a_loop(model, remote):
    expected = [model.generate_sync(p, max_tokens=5) for p in PROMPTS]

    async def main():
        gathered = await asyncio.gather(*(remote.generate(p, max_tokens=5) for p in PROMPTS))
        return gathered, remote.generate_sync(PROMPTS[0], max_tokens=5)

    gathered, blocking = asyncio.run(main())
    assert gathered == expected and blocking == expected[0]


def test_remote_errors(remote):
    with pytest.raises(ValueError, match="400.*maximum context length"):
        remote.generate_sync(" word" * 9000, max_tokens=2)
    with pytest.raises(ValueError, match="unknown decoder"):
        remote.generate_sync(PROMPT, decoder="greedy")  # checked before any request
    with pytest.raises(ConnectionError, match="cannot reach"):
        loomlm.model("http://127.0.0.1:9").generate_sync(PROMPT, max_tokens=2)
