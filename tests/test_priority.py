"""Request priority (vLLM's `priority` with `--scheduling-policy priority`) through the offline API
and the OpenAI server; the scheduling itself is tested on fake requests in test_scheduler.py."""

from __future__ import annotations

import pytest
from openai import BadRequestError

from loomlm import LLM, SamplingParams


def test_offline_priority_runs_the_urgent_prompts_first_with_unchanged_outputs(make_tiny_model_dir):
    tiny = make_tiny_model_dir("llama")
    prompts = [f"request number {i} says" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fcfs = LLM(str(tiny), max_num_seqs=2, kv_cache_memory_bytes=8 << 20)
    expected = [o.outputs[0].token_ids for o in fcfs.generate(prompts, params, use_tqdm=False)]
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        fcfs.generate(prompts[:1], params, priority=[1], use_tqdm=False)
    llm = LLM(str(tiny), max_num_seqs=2, kv_cache_memory_bytes=8 << 20, scheduling_policy="priority")
    outputs = llm.generate(prompts, params, priority=[5, 5, 5, 5, 0, 0], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected  # same greedy tokens, whatever the order
    first = {o.request_id: o.metrics.first_token_time for o in outputs}
    urgent, others = [first[o.request_id] for o in outputs[4:]], [first[o.request_id] for o in outputs[:4]]
    assert max(urgent) < min(others)  # two slots: the urgent pair runs first
    with pytest.raises(ValueError, match="2 priorities for 6 prompts"):
        llm.generate(prompts, params, priority=[0, 1], use_tqdm=False)


def test_openai_priority_field_needs_the_priority_policy(client, server):
    with pytest.raises(BadRequestError, match="Priority scheduling is not enabled"):
        client.completions.create(model=server.engine.served_model_name, prompt="Hi", max_tokens=2,
                                  extra_body={"priority": 3})
    ok = client.completions.create(model=server.engine.served_model_name, prompt="Hi", max_tokens=2,
                                   extra_body={"priority": 0})
    assert ok.choices[0].text is not None
