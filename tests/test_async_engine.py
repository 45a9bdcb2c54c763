"""AsyncLLMEngine: one background loop serving concurrent streams, abort, bad input."""

from __future__ import annotations

import asyncio

import pytest

from loomlm import SamplingParams
from loomlm.engine.async_engine import AsyncLLMEngine


@pytest.fixture(scope="module")
def engine() -> AsyncLLMEngine:
    eng = AsyncLLMEngine.from_engine_args(model="smollm2-135m-instruct", max_num_seqs=8)
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params, rid):
    outs = [out async for out in engine.generate(prompt, params, rid)]
    return outs


def test_concurrent_streams_are_cumulative_and_equal_to_sync(engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["The sky is", "My favourite food is", "In 1492,"]

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy, f"s{i}") for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    llm_engine = engine.engine
    for prompt, outs in zip(prompts, results):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        texts = [o.outputs[0].text for o in outs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
        ids = [o.outputs[0].token_ids for o in outs]
        assert [len(i) for i in ids] == list(range(1, 13))  # one new token per step
        # the same request through the synchronous engine gives the same tokens
        llm_engine.add_request("sync", prompt, greedy)
        final = None
        while llm_engine.has_unfinished_requests():
            for o in llm_engine.step():
                final = o
        assert final.outputs[0].token_ids == ids[-1]


def test_abort_and_disconnect_free_the_request(engine):
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def main():
        # a consumer that walks away after 3 outputs (a client disconnect)
        stream = engine.generate("Tell me everything", params, "gone")
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        # an explicit abort ends the other stream without a finished output
        outs = []

        async def consume():
            async for out in engine.generate("Count to a thousand", params, "aborted"):
                outs.append(out)

        task = asyncio.create_task(consume())
        while len(outs) < 2:
            await asyncio.sleep(0.01)
        await engine.abort("aborted")
        await asyncio.wait_for(task, timeout=30)
        # the engine loop drains the aborts between steps
        for _ in range(200):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.05)
        return outs

    outs = asyncio.run(main())
    assert outs and not outs[-1].finished
    bm = engine.engine.block_manager
    assert not engine.engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks


def test_bad_input_raises_for_that_request_only(engine):
    async def main():
        with pytest.raises(ValueError):
            async for _ in engine.generate("", SamplingParams(max_tokens=4), "empty"):
                pass
        too_long = " ".join(["word"] * (engine.max_model_len + 5))
        with pytest.raises(ValueError):
            async for _ in engine.generate(too_long, SamplingParams(max_tokens=4), "long"):
                pass
        return await collect(engine, "fine", SamplingParams(max_tokens=3, ignore_eos=True), "ok")

    outs = asyncio.run(main())
    assert len(outs[-1].outputs[0].token_ids) == 3
