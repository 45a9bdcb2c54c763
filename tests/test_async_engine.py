"""AsyncLLMEngine: one background loop serving concurrent streams, abort, bad input."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

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


def test_concurrent_streams_are_cumulative_and_equal_to_sync(engine, llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["The sky is", "My favourite food is", "In 1492,"]

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy, f"s{i}") for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    offline = llm.generate(prompts, greedy, use_tqdm=False)  # another engine on the same model
    for prompt, outs, sync in zip(prompts, results, offline):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        texts = [o.outputs[0].text for o in outs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
        ids = [o.outputs[0].token_ids for o in outs]
        assert [len(i) for i in ids] == list(range(1, 13))  # one new token per step
        assert sync.outputs[0].token_ids == ids[-1]  # the offline engine gives the same tokens


def test_only_the_step_thread_touches_the_engine(engine):
    """The routes' views are thread-safe; the engine's state belongs to the step thread, and with
    LOOMLM_CHECK_ENGINE_THREAD=1 (conftest sets it) a call from any other thread raises."""
    async def main():
        return [o async for o in engine.generate("Hi", SamplingParams(max_tokens=2), "owner")]

    assert asyncio.run(main())[-1].finished
    assert engine.token_text(engine.tokenizer.eos_token_id) and engine.registered_loras() == []
    with pytest.raises(RuntimeError, match="belongs to 'loomlm-step"):
        engine.engine.abort_request("owner")
    with pytest.raises(RuntimeError, match="belongs to 'loomlm-step"):
        engine.engine.step()


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


def test_steps_go_on_while_the_event_loop_is_busy(engine):
    """The step thread does not wait for the event loop between steps (vLLM v1's busy loop): while
    the loop is blocked, steps go on and their outputs queue up for the stream."""
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

    async def main():
        stream = engine.generate("Once upon a time", params, "busy-loop")
        first = await anext(stream)
        time.sleep(1.5)  # the event loop is stuck (a slow handler): no awaits for 1.5 s
        for _ in range(3):
            await asyncio.sleep(0)  # run the deliveries the step thread scheduled meanwhile
        queued = engine._queues["busy-loop"].qsize()
        rest = [out async for out in stream]
        return first, queued, rest

    first, queued, rest = asyncio.run(main())
    # When the event loop drove each step, at most one step ran while it was blocked.
    assert queued >= 5, queued
    assert len(first.outputs[0].token_ids) + len(rest) == 60 and rest[-1].finished


def test_shutdown_ends_running_requests_and_a_dropped_engine_is_collected():
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    dropped = AsyncLLMEngine.from_engine_args(model="smollm2-135m-instruct", max_num_seqs=2,
                                              num_gpu_blocks_override=64)

    # The model was loaded on the step thread, which serves it (one OpenMP team, see from_engine_args).
    assert dropped._step_thread.is_alive() and dropped._step_thread is not threading.main_thread()

    async def one(eng):
        return [o async for o in eng.generate("Hi", SamplingParams(max_tokens=2), "one")]

    assert asyncio.run(one(dropped))[-1].finished
    thread, ref = dropped._step_thread, weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None  # the step thread holds the engine only weakly between steps
    thread.join(timeout=30)
    assert not thread.is_alive()  # the engine's finalizer stopped it

    eng = AsyncLLMEngine.from_engine_args(model="smollm2-135m-instruct", max_num_seqs=2,
                                          num_gpu_blocks_override=64)

    async def main():
        outs = []
        with pytest.raises(RuntimeError, match="shut down"):
            async for out in eng.generate("Count to a thousand", params, "long"):
                outs.append(out)
                if len(outs) == 2:
                    eng.shutdown()
        await eng.aclose()
        return outs

    assert len(asyncio.run(main())) >= 2
    assert not eng._step_thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(one(eng))
