"""Tensor parallelism over torch.distributed (gloo over loopback, ranks as spawned processes):
greedy tokens and logprobs equal to one rank's within 1e-4, offline and through the server, on
tiny checkpoints cut 2 ways and on the default model cut 3 ways (9 heads, 3 KV heads), with
chunked prefill, the prefix cache, structured output and speculative decoding on top; the KV pool
of each rank holds its heads only, so the context capacity grows with the ranks; models that do
not divide get a clear error before any process starts.
"""

from __future__ import annotations

from contextlib import contextmanager

import httpx
import pytest
import torch
from openai import OpenAI
from server_utils import serve_engine

from loomlm import LLM, SamplingParams
from loomlm.sampling_params import StructuredOutputsParams

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a land far away,",
           "1, 2, 3, 4, 5, 6,"]


@contextmanager
def engine(model: str, **kwargs):
    """An LLM whose ranks are stopped (and the process group left) on exit: one per process at a time."""
    llm = LLM(model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.model_runner.release()


def assert_same(expected, got, tolerance: float = 1e-4) -> None:
    for a, b in zip(expected, got):
        ca, cb = a.outputs[0], b.outputs[0]
        assert cb.token_ids == ca.token_ids and cb.text == ca.text
        if ca.logprobs is not None:
            for pa, pb in zip(ca.logprobs, cb.logprobs):
                for token, lp in pa.items():
                    assert abs(pb[token].logprob - lp.logprob) < tolerance
        if a.prompt_logprobs is not None:
            for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert all(abs(pb[t].logprob - pa[t].logprob) < tolerance for t in pa)


def run_cases(llm: LLM, tokenizer_prompts: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    outputs = llm.generate(tokenizer_prompts, params, use_tqdm=False)
    # The prefix cache serves the second one's prompt (prompt logprobs would bypass it).
    plain = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True)
    again = [llm.generate(tokenizer_prompts[:1], plain, use_tqdm=False)[0] for _ in range(2)]
    constrained = llm.generate(tokenizer_prompts[:2], SamplingParams(
        temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex=r"[a-f]{3}-[0-9]{2}")),
        use_tqdm=False)
    return outputs, again, constrained


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_two_ranks_equal_one_on_tiny_models(make_tiny_model_dir, model_type):
    model = str(make_tiny_model_dir(model_type))
    # Long prompts in chunks of 32 tokens: prefill chunks and decodes mix in the steps.
    prompts = [[5 + (i * 7 + j) % 300 for j in range(40 + 9 * i)] for i in range(4)]
    common = dict(max_num_batched_tokens=32, max_num_seqs=4)
    with engine(model, **common) as one:
        expected = run_cases(one, prompts)
        blocks_one = one.llm_engine.model_runner.num_blocks
    with engine(model, tensor_parallel_size=2, **common) as two:
        got = run_cases(two, prompts)
        assert two.llm_engine.model_runner.num_blocks == 2 * blocks_one  # each rank: half the KV heads
        assert got[1][1].num_cached_tokens > 0
    for e, g in zip(expected, got):
        assert_same(e, g)


def test_three_ranks_on_the_default_model_and_speculation_on_top():
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=2)
    with engine("smollm2-135m-instruct") as one:
        expected = one.generate(PROMPTS, params, use_tqdm=False)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    with engine("smollm2-135m-instruct", tensor_parallel_size=3, speculative_config=spec) as three:
        got = three.generate(PROMPTS, params, use_tqdm=False)
        assert three.llm_engine.model_runner.model.layers[0].self_attn.num_heads == 3  # 9 heads / 3 ranks
    assert_same(expected, got)
    assert torch.get_num_threads() >= 1


def test_lora_adapters_across_two_ranks(make_tiny_model_dir, tmp_path):
    """Adapters cut as their projections are (B by output columns, A by input rows), with the base
    model in the same batch, equal one rank's within 1e-4."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loomlm.lora.request import LoRARequest

    model = str(make_tiny_model_dir("llama"))
    paths = []
    for seed, targets in ((1, ["q_proj", "k_proj", "v_proj", "o_proj"]), (2, ["gate_proj", "up_proj", "down_proj", "o_proj"])):
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                    LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.3)
        peft_model.save_pretrained(str(tmp_path / f"a{seed}"))
        paths.append(str(tmp_path / f"a{seed}"))
    loras = [LoRARequest("a1", 1, paths[0]), LoRARequest("a2", 2, paths[1]), None,
             LoRARequest("a1", 1, paths[0])]
    prompts = [[5 + (i * 11 + j) % 300 for j in range(12 + 5 * i)] for i in range(4)]
    prompts[2] = prompts[0]  # the base model on adapter a1's prompt
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=2, ignore_eos=True)
    with engine(model, enable_lora=True, max_loras=2) as one:
        expected = one.generate(prompts, params, use_tqdm=False, lora_request=loras)
    with engine(model, enable_lora=True, max_loras=2, tensor_parallel_size=2) as two:
        got = two.generate(prompts, params, use_tqdm=False, lora_request=loras)
    assert_same(expected, got)
    assert expected[0].outputs[0].token_ids != expected[2].outputs[0].token_ids  # the adapter changes the output


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_mixture_of_experts_across_two_ranks(make_tiny_model_dir, kind):
    """Each expert's MLP cut as a dense one's (the router whole), its partial outputs summed once
    after the block: equal one rank's within 1e-4."""
    model = str(make_tiny_model_dir(kind))
    prompts = [[5 + (i * 13 + j) % 300 for j in range(10 + 7 * i)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=2, ignore_eos=True)
    with engine(model) as one:
        expected = one.generate(prompts, params, use_tqdm=False)
    with engine(model, tensor_parallel_size=2) as two:
        got = two.generate(prompts, params, use_tqdm=False)
    assert_same(expected, got)


def test_models_that_do_not_divide_fail_before_any_rank_starts():
    with pytest.raises(ValueError, match="attention heads"):
        LLM("smollm2-135m-instruct", tensor_parallel_size=2)  # 9 heads
    with pytest.raises(ValueError, match="nnodes"):
        LLM("smollm2-135m-instruct", tensor_parallel_size=3, nnodes=2, distributed_init_method="tcp://127.0.0.1:1")


def test_server_on_two_ranks(make_tiny_model_dir):
    from text_generation import Client

    model = str(make_tiny_model_dir("llama"))
    prompts = ["Paged attention stores", "def add(a, b):"]
    with engine(model) as one:
        expected = [o.outputs[0].text for o in one.generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)]
    with serve_engine(model=model, tensor_parallel_size=2) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="x")
        texts = [client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0.0,
                                           extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
        tgi = Client(server.base_url).generate(prompts[0], max_new_tokens=16, decoder_input_details=False)
        metrics = httpx.get(server.base_url + "/metrics").text
    assert texts == expected
    assert "loomlm_tensor_parallel_size 2.0" in metrics
    assert 'loomlm_tp_collective_seconds_total{rank="0"}' in metrics
    assert 'loomlm_tp_collective_seconds_total{rank="1"}' in metrics  # the worker's, from the exchange
    assert expected[0].startswith(tgi.generated_text) or tgi.generated_text == expected[0]


def test_cli_flags_reach_the_parallel_config():
    from loomlm.cli import build_parser, serve_engine_kwargs
    from loomlm.config import EngineConfig

    args = build_parser().parse_args(["serve", "-tp", "4", "--nnodes", "2", "--node-rank", "1",
                                      "--distributed-init-method", "tcp://10.0.0.1:29500"])
    kwargs = serve_engine_kwargs(args)
    assert kwargs["enable_lora"] is True  # serve's default-on LoRA works across ranks too
    pc = EngineConfig.from_kwargs(model="smollm2-135m-instruct", **kwargs).parallel_config
    assert (pc.tensor_parallel_size, pc.nnodes, pc.node_rank, pc.distributed_init_method) == \
        (4, 2, 1, "tcp://10.0.0.1:29500")
