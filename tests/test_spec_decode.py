"""Speculative decoding (n-gram prompt lookup and a draft model): outputs exactly as without it.

Greedy: token for token equal to the plain engine with 32 concurrent requests through a KV pool
small enough to force preemption, with logprobs, stop strings, structured output, penalties,
the prefix cache and LoRA. Sampling: the empirical distribution of three sampled tokens (top-k,
logit bias and a presence penalty, which read the proposals a row assumes) against the exact
distribution computed from the model's logits, chi-square. Also the n-gram proposer against
vLLM's documented examples, the config's vLLM keys, the adaptive pause, and /metrics.
"""

from __future__ import annotations

import re

import httpx
import pytest
import torch
from openai import OpenAI
from server_utils import serve_engine

from loomlm import LLM, SamplingParams
from loomlm.config import SpeculativeConfig
from loomlm.engine.request import Request
from loomlm.engine.scheduler import ScheduledRequest, SchedulerOutput
from loomlm.sampling_params import StructuredOutputsParams
from loomlm.spec_decode.manager import SpecDecodeManager
from loomlm.spec_decode.ngram_proposer import propose_ngram
from loomlm.spec_decode.rejection import accepted_prefix

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
# 64 blocks x 16 tokens for 32 requests of ~60-110 tokens each: preemption is certain.
SMALL_POOL = dict(num_gpu_blocks_override=64, max_model_len=1024)

LISTS = ["red, green, blue, yellow", "one two three four five", "alpha beta gamma delta",
         "Monday Tuesday Wednesday Thursday", "cat dog bird fish", "north south east west"]


def grounded_prompts(num: int) -> list[str]:
    """Prompts whose continuation repeats them (prompt lookup has something to find), and a few
    free ones."""
    prompts = []
    for i in range(num):
        words = LISTS[i % len(LISTS)]
        if i % 4 == 3:
            prompts.append(f"Question {i}: what is the tallest mountain in the world? Answer:")
        else:
            prompts.append(f"Repeat the list {i % 3 + 2} times.\nList: {words}\n{words}\n{words}\n")
    return prompts


@pytest.fixture(scope="module")
def plain():
    return LLM(**SMALL_POOL)


@pytest.fixture(scope="module")
def ngram():
    return LLM(**SMALL_POOL, speculative_config=NGRAM)


def tokens_of(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


# --------------------------------------------------------------------------- proposer and config
def test_ngram_proposer_follows_vllms_examples():
    # vLLM's NgramProposer docstring: [1,2,3,4,2,3], n in [2,3], k=4: [2,3] matches, three tokens follow.
    assert propose_ngram([1, 2, 3, 4, 2, 3], 2, 3, 4, 1024) == [4, 2, 3]
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3, 5, 6], 2, 2, 2, 1024) == []  # [5, 6] never occurred before
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 2, 2, 2, 1024) == [4, 1]
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 4, 4, 2, 1024) == []
    # The longest n wins over an earlier shorter match: [9, 2, 3] matches at 4, not [2, 3] at 1.
    assert propose_ngram([5, 2, 3, 7, 9, 2, 3, 8, 9, 2, 3], 2, 3, 1, 1024) == [8]
    # The earliest occurrence among the longest; never past max_model_len.
    assert propose_ngram([1, 2, 5, 1, 2, 6, 1, 2], 2, 2, 3, 1024) == [5, 1, 2]
    assert propose_ngram([1, 2, 5, 1, 2, 6, 1, 2], 2, 2, 3, 10) == [5, 1]
    assert propose_ngram([1], 1, 1, 3, 1024) == []


def test_speculative_config_takes_vllms_keys():
    config = SpeculativeConfig.from_value('{"method": "ngram", "num_speculative_tokens": 3}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    config = SpeculativeConfig.from_value({"num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (config.method, config.prompt_lookup_min, config.prompt_lookup_max) == ("ngram", 4, 4)
    config = SpeculativeConfig.from_value({"model": "smollm2-135m-instruct", "num_speculative_tokens": 2})
    assert config.method == "draft_model"
    assert SpeculativeConfig.from_value({"model": "[ngram]", "num_speculative_tokens": 2}).method == "ngram"
    for bad in ({"method": "ngram"}, {"method": "ngram", "num_speculative_tokens": 0},
                {"method": "eagle", "num_speculative_tokens": 2}, {"method": "draft_model", "num_speculative_tokens": 2},
                {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
                {"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}, "{not json", [1]):
        with pytest.raises(ValueError):
            SpeculativeConfig.from_value(bad)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM("smollm2-135m-instruct", speculative_config={"model": "gemma-3-270m", "num_speculative_tokens": 2})


def test_accepted_prefix():
    assert accepted_prefix([5], []) == [5]
    assert accepted_prefix([1, 2, 3], [1, 2]) == [1, 2, 3]  # all accepted, then the bonus token
    assert accepted_prefix([1, 9, 3], [1, 2]) == [1, 9]  # the first row that differs ends it
    assert accepted_prefix([7, 2, 3], [1, 2]) == [7]


# --------------------------------------------------------------------------- greedy: exact
def test_ngram_greedy_equals_plain_under_preemption(plain, ngram):
    prompts = grounded_prompts(32)
    params = SamplingParams(temperature=0.0, max_tokens=48, logprobs=2)
    preempted, stats = ngram.llm_engine.scheduler.num_preemptions, ngram.llm_engine.spec_decode.stats
    accepted = stats.num_accepted_tokens
    expected = plain.generate(prompts, params, use_tqdm=False)
    got = ngram.generate(prompts, params, use_tqdm=False)
    assert tokens_of(got) == tokens_of(expected)
    assert ngram.llm_engine.scheduler.num_preemptions > preempted  # the pool forced preemption
    assert stats.num_accepted_tokens - accepted > 100  # and speculation did the work
    for a, b in zip(expected, got):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.text == cb.text and ca.finish_reason == cb.finish_reason
        assert len(cb.logprobs) == len(cb.token_ids)
        for pa, pb in zip(ca.logprobs, cb.logprobs):
            assert list(pa) == list(pb)  # the chosen token, then the same top-2
            assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-3 for t in pa)
        assert cb.cumulative_logprob == pytest.approx(ca.cumulative_logprob, abs=1e-2)


def test_draft_model_drafting_for_itself_is_always_accepted():
    """The default model drafting for itself: every proposal is the target's own argmax."""
    draft = LLM(**SMALL_POOL, speculative_config={"method": "draft_model", "model": "smollm2-135m-instruct",
                                                  "num_speculative_tokens": 3})
    plain = LLM(**SMALL_POOL)
    prompts = grounded_prompts(32)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    assert tokens_of(draft.generate(prompts, params, use_tqdm=False)) == \
        tokens_of(plain.generate(prompts, params, use_tqdm=False))
    stats = draft.llm_engine.spec_decode.stats
    assert draft.llm_engine.scheduler.num_preemptions > 0
    assert stats.num_draft_tokens > 500
    # The draft runs the same weights through the decode path, the target verifies several
    # tokens a query: float sums differ in the last bits, so a near-tie may fall the other way.
    assert stats.num_accepted_tokens >= 0.99 * stats.num_draft_tokens


def test_stop_strings_penalties_and_structured_output_as_without(plain, ngram):
    prompt = grounded_prompts(1)[0]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=60, stop=["blue, yellow\nred"], logprobs=1),
        SamplingParams(temperature=0.0, max_tokens=60, stop=["yellow"], include_stop_str_in_output=True),
        SamplingParams(temperature=0.0, max_tokens=60, presence_penalty=0.4, frequency_penalty=0.2),
        SamplingParams(temperature=0.0, max_tokens=60, repetition_penalty=1.1, min_tokens=20),
        SamplingParams(temperature=0.0, max_tokens=60, bad_words=["green"]),
        SamplingParams(temperature=0.0, max_tokens=60,
                       structured_outputs=StructuredOutputsParams(regex=r"(red|green|blue|yellow)(, (red|green|blue|yellow)){7}")),
    ]
    for params in cases:
        (a,), (b,) = plain.generate([prompt], params, use_tqdm=False), ngram.generate([prompt], params, use_tqdm=False)
        ca, cb = a.outputs[0], b.outputs[0]
        assert (cb.token_ids, cb.text, cb.finish_reason, cb.stop_reason) == \
            (ca.token_ids, ca.text, ca.finish_reason, ca.stop_reason), params
        if params.logprobs is not None:
            assert len(cb.logprobs) == len(cb.token_ids)
    assert re.fullmatch(r"(red|green|blue|yellow)(, (red|green|blue|yellow)){7}", cb.text)


def test_prefix_cache_and_n_with_speculation(plain, ngram):
    prompt = grounded_prompts(1)[0] * 2
    params = SamplingParams(temperature=0.0, max_tokens=40)
    first = ngram.generate([prompt], params, use_tqdm=False)[0]
    second = ngram.generate([prompt], params, use_tqdm=False)[0]  # its prompt from the prefix cache
    assert second.num_cached_tokens > 0
    expected = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == expected
    # n > 1 with seeds: each sequence as without speculation, in distribution (tested below) and
    # exactly for greedy ones
    n_params = SamplingParams(temperature=0.0, max_tokens=30, n=2)
    assert [c.token_ids for c in ngram.generate([prompt], n_params, use_tqdm=False)[0].outputs] == [expected[:30]] * 2


def test_beam_search_and_load_cap_with_speculation(plain, ngram):
    """Beams never speculate (their group picks each token); `disable_by_batch_size` stops
    proposals while more requests than it are unfinished."""
    from dataclasses import replace

    from loomlm import BeamSearchParams

    params = BeamSearchParams(beam_width=3, max_tokens=12)
    prompts = grounded_prompts(2)
    got = ngram.beam_search(prompts, params)
    want = plain.beam_search(prompts, params)
    assert [[s.tokens for s in r.sequences] for r in got] == [[s.tokens for s in r.sequences] for r in want]
    manager = ngram.llm_engine.spec_decode
    stats, config = manager.stats, manager.config
    manager.config = replace(config, disable_by_batch_size=2)
    try:
        drafts = stats.num_drafts
        sampling = SamplingParams(temperature=0.0, max_tokens=24)
        outputs = ngram.generate(prompts[:1] * 3, sampling, use_tqdm=False)  # 3 unfinished > 2: none
        assert stats.num_drafts == drafts
        ngram.generate(prompts[:1], sampling, use_tqdm=False)  # 1 <= 2: proposals again
        assert stats.num_drafts > drafts
    finally:
        manager.config = config
    assert tokens_of(outputs) == tokens_of(plain.generate(prompts[:1] * 3, sampling, use_tqdm=False))


def test_lora_with_speculation(make_tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loomlm.lora.request import LoRARequest

    base_dir = make_tiny_model_dir("llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(str(tmp_path / "adapter"))
    lora = LoRARequest("a", 1, str(tmp_path / "adapter"))
    # A tiny random model repeats itself: prompt lookup finds proposals.
    prompts = [[5 + i, 6, 7, 8, 5 + i, 6, 7, 8, 5 + i, 6] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = LLM(str(base_dir), enable_lora=True)
    spec = LLM(str(base_dir), enable_lora=True,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                   "prompt_lookup_max": 3})
    for adapter in (lora, None):
        assert tokens_of(spec.generate(prompts, params, use_tqdm=False, lora_request=adapter)) == \
            tokens_of(plain.generate(prompts, params, use_tqdm=False, lora_request=adapter))
    assert spec.llm_engine.spec_decode.stats.num_accepted_tokens > 0


# --------------------------------------------------------------------------- sampling: exact distribution
def exact_distribution(llm: LLM, prompt: list[int], bias: dict[int, float], top_k: int, presence: float,
                       length: int) -> dict[tuple[int, ...], float]:
    """P(first `length` tokens) under the sampler's processing, from the model's own logits:
    logit bias, then the presence penalty on tokens generated so far, then top-k at temperature 1."""
    runner = llm.llm_engine.model_runner
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == length:
            out[prefix] = prob
            return
        logits = runner.logits_for(prompt + list(prefix))[-1].double()
        for token, value in bias.items():
            logits[token] += value
        for token in set(prefix):
            logits[token] -= presence
        top = logits.topk(top_k)
        probs = top.values.softmax(dim=-1)
        for token, p in zip(top.indices.tolist(), probs.tolist()):
            walk(prefix + (token,), prob * p)

    walk((), 1.0)
    return out


def chi_square_p_value(counts: dict, expected: dict[tuple, float], total: int) -> float:
    """Pearson's test of `counts` against the probabilities `expected` (cells under 5 expected
    samples pooled); the p-value from the chi-square survival function."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for cell, prob in expected.items():
        e = prob * total
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(cell, 0), pooled_exp + e
            continue
        stat += (counts.get(cell, 0) - e) ** 2 / e
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    assert sum(counts.values()) == total and not set(counts) - set(expected)  # nothing outside the support
    df = cells - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_tokens_keep_the_exact_distribution(make_tiny_model_dir, method):
    model_dir = str(make_tiny_model_dir("llama"))
    a, b, c, d = 40, 41, 42, 43
    prompt = [a, b, c, d, a, b, c, d, a]  # prompt lookup proposes b, c, d, a ...
    # ... which the biased target then often accepts; the draft model proposes its own argmax
    # (before any logits processor): top-3 of the unbiased target holds it.
    bias = {b: 4.0, c: 4.0, d: 3.0} if method == "ngram" else {}
    config = {"method": method, "num_speculative_tokens": 3}
    config |= {"prompt_lookup_min": 1, "prompt_lookup_max": 2} if method == "ngram" else {"model": model_dir}
    llm = LLM(model_dir, speculative_config=config)
    # Every request proposes all it may (the adaptive policy would hold back 128 streams of a
    # tiny model): this test is about exactness, `test_requests_whose_proposals_fail...` about policy.
    llm.llm_engine.spec_decode.worth_proposing = lambda alpha, batch_size: 3
    expected = exact_distribution(llm, prompt, bias, top_k=3, presence=0.7, length=4)
    total = 4000
    params = [SamplingParams(temperature=1.0, top_k=3, presence_penalty=0.7, logit_bias=bias, max_tokens=4,
                             ignore_eos=True, seed=seed) for seed in range(total)]
    outputs = llm.generate([prompt] * total, params, use_tqdm=False)
    counts: dict[tuple, int] = {}
    for o in outputs:
        key = tuple(o.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    stats = llm.llm_engine.spec_decode.stats
    assert stats.num_accepted_tokens > 1000 and stats.num_draft_tokens > stats.num_accepted_tokens + 1000  # both ways
    assert chi_square_p_value(counts, expected, total) > 1e-3
    # Seeded requests are reproducible with speculation too.
    again = llm.generate([prompt] * 20, params[:20], use_tqdm=False)
    assert tokens_of(again) == tokens_of(outputs[:20])


def test_chi_square_check_can_fail():
    """The distribution test rejects a sampler that is off by a little (its power)."""
    expected = {(0,): 0.5, (1,): 0.3, (2,): 0.2}
    skewed = {(0,): 1650, (1,): 850, (2,): 500}  # 0.55 / 0.28 / 0.17 of 3000
    assert chi_square_p_value(skewed, expected, 3000) < 1e-3
    fair = {(0,): 1510, (1,): 890, (2,): 600}
    assert chi_square_p_value(fair, expected, 3000) > 0.05


# --------------------------------------------------------------------------- adaptivity
class _WrongProposer:
    def __init__(self):
        self.calls = 0

    def propose(self, requests, num_tokens):
        self.calls += 1
        return [[0] * k for k in num_tokens]


def _verify_rounds(manager: SpecDecodeManager, request: Request, rounds: int, accept_all: bool,
                   batch_size: int = 1) -> int:
    """Run `rounds` steps of one decoding request whose proposals are all accepted or all rejected;
    returns the steps in which it had proposals."""
    with_proposals = 0
    for _ in range(rounds):
        spec = list(request.spec_token_ids)
        with_proposals += bool(spec)
        output = SchedulerOutput(scheduled=[ScheduledRequest(request, 1 + len(spec), spec_token_ids=spec)],
                                 total_num_scheduled_tokens=1 + len(spec))
        taken = spec + [1] if accept_all else [1]
        for token in taken:
            request.append_output_token(token)
        request.num_computed_tokens = request.num_tokens - 1
        manager.record(output, {request.request_id: taken}, 0.01)
        manager.propose([request], 1, batch_size)
    return with_proposals


def test_requests_whose_proposals_fail_stop_proposing():
    config = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    manager = SpecDecodeManager(config, _WrongProposer(), 100000)
    bad = Request("bad", [3, 4, 5], SamplingParams(max_tokens=10000), 10000)
    bad.num_computed_tokens = 2
    manager.propose([bad], 1, 1)
    assert len(bad.spec_token_ids) == 4  # a new request starts hopeful
    assert _verify_rounds(manager, bad, 200, accept_all=False) < 30  # then pauses, probing less and less
    good = Request("good", [3, 4, 5], SamplingParams(max_tokens=10000), 10000)
    good.num_computed_tokens = 2
    manager.propose([good], 1, 1)  # the engine-wide estimate it starts from is poor now: it probes first
    _verify_rounds(manager, good, 10, accept_all=True)
    assert _verify_rounds(manager, good, 40, accept_all=True) == 40
    assert len(good.spec_token_ids) == 4
    # A large batch raises the bar (a verified token costs more than a step's fixed share).
    assert manager.worth_proposing(0.9, 1) == 4 and manager.worth_proposing(0.5, 1) == 3
    assert manager.worth_proposing(0.5, 64) == 0


# --------------------------------------------------------------------------- server
def test_server_speculates_with_the_same_outputs_and_counts_it(plain):
    prompts = grounded_prompts(6)
    expected = [o.outputs[0].text for o in plain.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40),
                                                          use_tqdm=False)]
    with serve_engine(model="smollm2-135m-instruct", speculative_config=NGRAM) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="x")
        texts = [client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=40,
                                           temperature=0.0).choices[0].text for p in prompts]
        stream = client.completions.create(model="smollm2-135m-instruct", prompt=prompts[0], max_tokens=40,
                                           temperature=0.0, stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in stream)
        metrics = httpx.get(server.base_url + "/metrics").text
    assert texts == expected and streamed == expected[0]
    values = {m.group(1): float(m.group(2)) for m in
              re.finditer(r"^(loomlm_spec_decode_\w+(?:\{[^}]*\})?) (\S+)$", metrics, re.M)}
    assert values["loomlm_spec_decode_num_draft_tokens_total"] >= values["loomlm_spec_decode_num_accepted_tokens_total"] > 0
    assert values["loomlm_spec_decode_num_drafts_total"] > 0
    per_pos = [values[f'loomlm_spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}'] for i in range(4)]
    assert sum(per_pos) == values["loomlm_spec_decode_num_accepted_tokens_total"]
    assert per_pos == sorted(per_pos, reverse=True)  # position i is reached only through i - 1


def test_cli_takes_the_speculative_config_flag():
    from loomlm.cli import _engine_kwargs, build_parser

    args = build_parser().parse_args(["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    kwargs = _engine_kwargs(args)
    assert SpeculativeConfig.from_value(kwargs["speculative_config"]).num_speculative_tokens == 2
