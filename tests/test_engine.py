"""The engine end to end on the default model: continuous batching under KV
pressure, sampling options, stops, n, seeds, and bad input."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from loomlm import LLM, SamplingParams

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "quiet", "hills", "and", "rivers", "ran", "toward", "the", "distant", "sea", "under", "grey", "skies", "as", "children", "played", "near", "old", "stone", "walls"]


@pytest.fixture(scope="module")
def small_cache_llm() -> LLM:
    # 48 blocks x 16 tokens = 768 token slots: far too few for 64 requests at once.
    return LLM("smollm2-135m-instruct", num_gpu_blocks_override=48, max_num_seqs=32, max_num_batched_tokens=256)


def varied_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]


def test_64_requests_under_kv_pressure_match_running_alone(small_cache_llm):
    llm = small_cache_llm
    prompts = varied_prompts(64)
    rng = random.Random(1)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 24), ignore_eos=True) for _ in prompts]
    engine = llm.llm_engine
    before = engine.scheduler.num_preemptions
    batched = llm.generate(prompts, params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > before, "the cache was meant to force preemption"
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished_requests()
    for prompt, p, out in zip(prompts, params, batched):
        alone = llm.generate([prompt], p, use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == p.max_tokens
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.outputs[0].text == alone.outputs[0].text
        assert out.prompt == prompt and out.finished


def test_seeded_sampling_is_independent_of_the_batch(small_cache_llm):
    llm = small_cache_llm
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["Tell me a story"], seeded, use_tqdm=False)[0].outputs[0].text
    others = varied_prompts(6, seed=5)
    mixed = llm.generate(others + ["Tell me a story"],
                         [SamplingParams(temperature=1.0, max_tokens=10)] * 6 + [seeded], use_tqdm=False)
    assert mixed[-1].outputs[0].text == alone
    different = llm.generate(["Tell me a story"], seeded.clone(seed=99), use_tqdm=False)[0].outputs[0].text
    assert different != alone


def test_n_completions_and_filters(small_cache_llm):
    llm = small_cache_llm
    out = llm.generate("Once upon a time", SamplingParams(n=3, best_of=3, temperature=1.0, seed=7, max_tokens=8,
                                                           ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    # filters that leave only the top token make sampling greedy
    for p in (SamplingParams(temperature=1.0, top_k=1, max_tokens=8),
              SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8),
              SamplingParams(temperature=1.0, min_p=1.0, max_tokens=8)):
        got = llm.generate("Once upon a time", p, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == greedy.outputs[0].token_ids, p


def test_stop_strings_stop_tokens_and_eos(small_cache_llm):
    llm = small_cache_llm
    tok = llm.get_tokenizer()
    prompt = "Count: 1, 2, 3, 4,"
    full = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert "," in text
    stopped = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[","]), use_tqdm=False)[0]
    c = stopped.outputs[0]
    assert c.text == text[: text.index(",")] and "," not in c.text
    assert (c.finish_reason, c.stop_reason) == ("stop", ",")
    kept = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[","],
                                                include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == text[: text.index(",") + 1]
    # a stop token id ends the completion and is reported as the stop reason
    stop_id = full.outputs[0].token_ids[3]
    by_id = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id]),
                         use_tqdm=False)[0].outputs[0]
    first = full.outputs[0].token_ids.index(stop_id)
    assert by_id.token_ids == full.outputs[0].token_ids[: first + 1]
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", stop_id)
    # a chat turn ends on the EOS token (<|im_end|>), which stays in token_ids but not in the text
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True)
    eos = llm.generate(chat, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert eos.finish_reason == "stop" and eos.stop_reason is None
    assert eos.token_ids[-1] == tok.eos_token_id and tok.eos_token not in eos.text


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_k": -2}, {"min_p": 1.5}, {"n": 0}, {"stop": [""]}, {"logprobs": -1}, {"prompt_logprobs": -2},
    {"n": 3, "best_of": 2}, {"best_of": 2, "temperature": 0.0}, {"presence_penalty": 2.5},
    {"frequency_penalty": -3.0}, {"repetition_penalty": 0.0}, {"typical_p": 0.0}, {"typical_p": 1.1},
    {"truncate_prompt_tokens": 0}, {"logit_bias": {"abc": 1.0}}, {"logit_bias": {-1: 1.0}},
    {"allowed_token_ids": []}, {"allowed_token_ids": [-1]}, {"bad_words": [""]},
])
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_lose_nothing(small_cache_llm):
    llm = small_cache_llm
    engine = llm.llm_engine
    too_long = " ".join(["word"] * (engine.max_model_len + 10))
    for bad in ([""], ["fine", ""], [too_long], [[engine.hf_config.vocab_size + 5]], [[]]):
        with pytest.raises(ValueError):
            llm.generate(bad, SamplingParams(max_tokens=4), use_tqdm=False)
        assert not engine.has_unfinished_requests()  # nothing half-queued
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    ok = llm.generate(["fine"], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 4


def test_unknown_model_and_engine_arg_raise():
    with pytest.raises(ValueError):
        LLM("no-such-model-alias")
    with pytest.raises(ValueError):
        LLM("smollm2-135m-instruct", not_an_engine_arg=1)
    with pytest.raises(ValueError, match="task='classify' is not supported"):  # vLLM's task arg: generate / embed
        LLM("smollm2-135m-instruct", task="classify")


def test_task_generate_is_accepted():
    from loomlm.config import EngineConfig

    assert EngineConfig.from_kwargs(task="generate").model_config.task == "generate"
    assert EngineConfig.from_kwargs().model_config.task == "auto"


def test_progress_bar(small_cache_llm, capsys):
    small_cache_llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


def test_sliding_window_model_keeps_its_full_context(make_tiny_model_dir, tmp_path):
    """A window is attention's business (each layer attends its last W positions), not a cap on the
    context: prompts longer than the window run (parity with transformers: test_models_llama_family)."""
    src = make_tiny_model_dir("mistral")
    dst = tmp_path / "mistral-window"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["sliding_window"] = 32
    (dst / "config.json").write_text(json.dumps(config))
    llm = LLM(str(dst), num_gpu_blocks_override=16)
    assert llm.llm_engine.max_model_len == 256
    assert all(a.sliding_window == 32 for a in llm.llm_engine.model_runner.model.attention_layers())
    out = llm.generate([list(range(5, 45))], SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 30 and out.outputs[0].finish_reason == "length"


def test_prefix_caching_changes_nothing_but_the_work(small_cache_llm):
    """Prompts sharing a long prefix: with the cache, later ones prefill only their suffix
    (num_cached_tokens), and tokens and logprobs equal an engine without prefix caching."""
    shared = " ".join(WORDS) + " " + " ".join(reversed(WORDS))
    prompts = [shared + suffix for suffix in (" and then", " but the", " so we", " and then")]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True)
    cached_llm = small_cache_llm
    first = cached_llm.generate(prompts[:1], params, use_tqdm=False)
    rest = cached_llm.generate(prompts[1:], params, use_tqdm=False)
    with_cache = first + rest
    assert [o.num_cached_tokens > 32 for o in with_cache] == [False, True, True, True]
    # The repeated prompt hits every full block but the one holding its last token.
    assert with_cache[3].num_cached_tokens == (len(with_cache[3].prompt_token_ids) - 1) // 16 * 16
    plain = LLM("smollm2-135m-instruct", enable_prefix_caching=False)
    without = plain.generate(prompts, params, use_tqdm=False)
    assert all(o.num_cached_tokens == 0 for o in without)
    for a, b in zip(with_cache, without, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert pa.keys() == pb.keys()
            assert max(abs(pa[t].logprob - pb[t].logprob) for t in pa) < 1e-4
    bm = cached_llm.llm_engine.block_manager
    assert bm.num_hit_tokens > 0 and bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


def test_prompt_logprobs_from_lets_the_cache_serve_the_prompt(small_cache_llm):
    """Continuation scoring: the shared prompt is cached once; a prompt + value request with
    prompt_logprobs_from = len(prompt) hits it and still scores every value token exactly."""
    engine = small_cache_llm.llm_engine
    tok = small_cache_llm.get_tokenizer()
    prompt = tok.encode(" ".join(WORDS))
    value = tok.encode(" and the children laughed", add_special_tokens=False)
    engine.add_request("prompt", prompt, SamplingParams(max_tokens=1))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    engine.add_request("full", prompt + value, params)  # prompt_logprobs_from 0: no cache hit
    results = {}
    while engine.has_unfinished_requests():
        results.update({o.request_id: o for o in engine.step() if o.finished})
    engine.add_request("scored", prompt + value, params, prompt_logprobs_from=len(prompt))
    while engine.has_unfinished_requests():
        results.update({o.request_id: o for o in engine.step() if o.finished})
    full, scored = results["full"], results["scored"]
    assert full.num_cached_tokens == 0 and scored.num_cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
    assert len(scored.prompt_logprobs) == len(prompt + value)
    assert all(p is None for p in scored.prompt_logprobs[1:scored.num_cached_tokens + 1])
    for position in range(len(prompt), len(prompt + value)):
        token = (prompt + value)[position]
        assert abs(scored.prompt_logprobs[position][token].logprob - full.prompt_logprobs[position][token].logprob) < 1e-4
