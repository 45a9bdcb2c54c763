"""LLMEngine.step's glue with a fake model runner (vLLM's tests/v1/core style): what the engine
does between `schedule()`, `execute()` and `update_from_output()`, without running a model.

The fake runner "samples" a token that encodes the request's state (its output length), so every
assertion follows from the scheduling alone: chunked prefill, cumulative outputs, n > 1
gathering, stop tokens, logprobs assembly, abort, and the block tables the runner is handed.
"""

from __future__ import annotations

import pytest

from loomlm.engine.llm_engine import LLMEngine
from loomlm.engine.model_runner import ModelRunnerOutput, PositionLogprobs
from loomlm.sampling_params import SamplingParams

FIRST_TOKEN = 50  # the fake samples FIRST_TOKEN + the number of tokens the sequence has generated


class FakeRunner:
    """Stands in for ModelRunner.execute: checks what it is handed, returns made-up samples."""

    def __init__(self, real, block_size: int) -> None:
        self.num_blocks = real.num_blocks
        self.block_size = block_size
        self.steps = []  # per step: [(request_id, num_new_tokens, num_computed_tokens)]
        self.active_loras = []  # per step: the adapters the runner was told to keep installed

    def execute(self, scheduler_output) -> ModelRunnerOutput:
        sampled, logprobs, step = {}, {}, []
        self.active_loras.append(sorted(scheduler_output.active_loras))
        for item in scheduler_output.scheduled:
            request = item.request
            if request.lora_request is not None:  # every scheduled adapter is among those to install
                assert request.lora_request.lora_name in scheduler_output.active_loras
            step.append((request.request_id, item.num_new_tokens, request.num_computed_tokens))
            # the table handed over covers the tokens computed so far and this step's
            table = scheduler_output.block_tables[request.request_id]
            assert len(table) * self.block_size >= request.num_computed_tokens + item.num_new_tokens
            if item.samples_token:
                token = FIRST_TOKEN + len(request.output_token_ids)
                sampled[request.request_id] = [token]
                if request.needs_logprobs:
                    logprobs[request.request_id] = [PositionLogprobs([token, 7], [-0.5, -1.5], 1)]
        self.steps.append(step)
        return ModelRunnerOutput(sampled, logprobs)

    def release(self) -> None:
        pass


@pytest.fixture()
def engine(make_tiny_model_dir):
    engine = LLMEngine.from_engine_args(model=str(make_tiny_model_dir("llama")), max_num_batched_tokens=16,
                                        max_num_seqs=4, block_size=4)
    engine.model_runner = FakeRunner(engine.model_runner, 4)
    return engine


def _run(engine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id not in finals, "an output after the request finished"
            if output.finished:
                finals[output.request_id] = output
    return finals


def test_chunked_prefill_then_one_token_per_step(engine):
    engine.add_request("a", list(range(3, 23)), SamplingParams(max_tokens=3, ignore_eos=True))  # 20 prompt tokens
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    # 16 prompt tokens (the budget), then 4 and the first sample, then one token per step
    assert [s[0][1:] for s in engine.model_runner.steps] == [(16, 0), (4, 16), (1, 20), (1, 21)]
    assert [o.outputs[0].token_ids for o in outputs] == [[50], [50, 51], [50, 51, 52]]  # cumulative
    assert [o.finished for o in outputs] == [False, False, True]
    assert outputs[-1].outputs[0].finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.model_runner.num_blocks  # all freed


def test_n_sequences_are_gathered_and_stop_tokens_finish(engine):
    params = SamplingParams(n=2, max_tokens=5, stop_token_ids=[52], ignore_eos=True, logprobs=1)
    engine.add_request("n2", [3, 4, 5], params)
    final = _run(engine)["n2"]
    assert [c.index for c in final.outputs] == [0, 1]
    for completion in final.outputs:
        assert completion.token_ids == [50, 51, 52] and completion.finish_reason == "stop"
        assert completion.stop_reason == 52
        # logprobs assembled per token: the sampled one and its top alternative
        assert [sorted(entry) for entry in completion.logprobs] == [sorted({t, 7}) for t in (50, 51, 52)]
        assert completion.logprobs[0][50].logprob == -0.5 and completion.logprobs[0][50].rank == 1
    # both sequences ran side by side, named as vLLM's ParentRequest children
    assert {rid for step in engine.model_runner.steps for rid, *_ in step} == {"0_n2", "1_n2"}


def test_abort_frees_everything(engine):
    engine.add_request("gone", list(range(3, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("kept", [3, 4], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    engine.abort_request("gone")
    finals = _run(engine)
    assert set(finals) == {"kept"} and "gone" not in engine.output_processor.requests
    assert engine.block_manager.num_free_blocks == engine.model_runner.num_blocks


def test_stop_strings_are_the_output_processors(engine):
    """The scheduler sees token ids only; the OutputProcessor finds the stop string in the text,
    finishes the sequence in the same step (its blocks freed) and cuts the text before it."""
    texts = [engine.tokenizer.decode([FIRST_TOKEN + i]) for i in range(3)]
    assert texts[2] and texts[2] not in texts[0] + texts[1]
    engine.add_request("s", [3, 4], SamplingParams(max_tokens=10, ignore_eos=True, stop=[texts[2]]))
    engine.add_request("late", [3, 4], SamplingParams(max_tokens=10, ignore_eos=True, stop=[texts[2]],
                                                      min_tokens=4))
    finals = _run(engine)
    out = finals["s"].outputs[0]
    assert out.token_ids == [50, 51, 52] and out.text == texts[0] + texts[1]
    assert (out.finish_reason, out.stop_reason) == ("stop", texts[2])
    # before min_tokens a stop string does not stop (its text is still cut from the output)
    assert finals["late"].outputs[0].finish_reason == "length"
    assert len(finals["late"].outputs[0].token_ids) == 10
    assert engine.block_manager.num_free_blocks == engine.model_runner.num_blocks


def test_a_stop_string_inside_jump_forward_tokens_drops_the_rest(engine):
    """Tokens appended in one step (structured output's jump-forward) are detokenized one by one;
    a stop string in the middle ends the sequence there."""
    texts = [engine.tokenizer.decode([t]) for t in (60, 61, 62)]
    engine.add_request("j", [3, 4], SamplingParams(max_tokens=10, ignore_eos=True, stop=[texts[1]]))
    engine.step()  # the prompt, and token 50
    seq = engine.output_processor.requests["j"].sequences[0]
    seq.append_output_token(60)  # as the scheduler's jump-forward appends forced tokens
    seq.append_output_token(61)
    seq.append_output_token(62)
    stopped = engine.output_processor.detokenize([seq])
    assert stopped == [seq] and seq.output_token_ids == [50, 60, 61] and seq.stop_reason == texts[1]
    assert seq.all_token_ids == [3, 4, 50, 60, 61]


class FakeAdapterCache:
    """The scheduler's view of the LoRA manager: which adapters are loaded (`is_ready`)."""

    def __init__(self, ready: set[str], failing: set[str]) -> None:
        self.ready, self.failing = ready, failing

    def is_ready(self, lora_request) -> bool:
        if lora_request.lora_name in self.failing:
            raise ValueError("not a PEFT adapter")
        return lora_request.lora_name in self.ready


def test_scheduler_counts_adapters_and_the_runner_is_told_which_to_install(make_tiny_model_dir):
    """vLLM v1's split: the scheduler admits requests while the running ones use at most
    max_loras distinct adapters (a request whose adapter is loading waits; one whose adapter
    failed to load ends "abort" in that step), and hands the runner the set to install."""
    from loomlm.lora.request import LoRARequest

    engine = LLMEngine.from_engine_args(model=str(make_tiny_model_dir("llama")), max_num_batched_tokens=16,
                                        max_num_seqs=8, block_size=4, enable_lora=True, max_loras=2)
    engine.model_runner = FakeRunner(engine.model_runner, 4)
    cache = FakeAdapterCache(ready={"a", "b", "c"}, failing={"bad"})
    engine.scheduler.lora_manager = cache
    loras = {name: LoRARequest(name, i + 1, f"/adapters/{name}") for i, name in enumerate(["a", "b", "c", "d", "bad"])}
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for rid, name in [("a1", "a"), ("b1", "b"), ("c1", "c"), ("a2", "a"), ("d1", "d"), ("base", None), ("x", "bad")]:
        engine.add_request(rid, [3, 4], params, lora_request=loras.get(name))
    first = engine.step()
    # c1 waits (a third adapter), a2 shares a's slot, d1 waits for its load, x failed at once
    assert [rid for rid, *_ in engine.model_runner.steps[0]] == ["a1", "b1", "a2", "base"]
    assert engine.model_runner.active_loras[0] == ["a", "b"]
    failed = {o.request_id: o for o in first if o.finished}
    assert set(failed) == {"x"} and failed["x"].outputs[0].finish_reason == "abort"
    cache.ready.add("d")
    finals = _run(engine)
    assert set(finals) == {"a1", "b1", "c1", "a2", "d1", "base"}
    assert all(len(active) <= 2 for active in engine.model_runner.active_loras)
    # c and d ran only once a and b were no longer running
    ran = [{rid for rid, *_ in step} for step in engine.model_runner.steps]
    first_cd = next(i for i, step in enumerate(ran) if step & {"c1", "d1"})
    assert not any(step & {"a1", "b1", "a2"} for step in ran[first_cd:])
    assert engine.block_manager.num_free_blocks == engine.model_runner.num_blocks
