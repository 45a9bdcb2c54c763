"""Prefix caching: requests that share a long prompt prefix (a system prompt, few-shot examples),
with the prefix cache on vs off, one process. Prints wall time, prefill tokens computed and the
speed-up.

32 requests = one shared prefix of `--prefix-tokens` random tokens + 16 distinct tokens each,
16 new tokens, greedy, EOS ignored. The first request warms the cache (run alone, not timed);
then the 32 run as one batch. Run: `.venv/bin/python benchmarks/prefix_cache.py`.
"""

from __future__ import annotations

import argparse
import random
import time

from loomlm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    rng = random.Random(0)
    vocab = range(100, 40000)
    prefix = [rng.choice(vocab) for _ in range(args.prefix_tokens)]
    prompts = [prefix + [rng.choice(vocab) for _ in range(16)] for _ in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = LLM(args.model, enable_prefix_caching=caching, max_num_seqs=args.num_requests)
        llm.generate([prefix + [1]], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up (and the cache)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        cached = sum(o.num_cached_tokens for o in outputs)
        computed = sum(len(o.prompt_token_ids) for o in outputs) - cached
        results[caching] = (elapsed, [o.outputs[0].token_ids for o in outputs])
        print(f"prefix cache {'on ' if caching else 'off'}: {elapsed:6.2f} s, prompt tokens computed {computed:6d}, "
              f"from cache {cached:6d}")
        del llm
    assert results[True][1] == results[False][1], "prefix caching changed the output"
    print(f"speed-up with the prefix cache: {results[False][0] / results[True][0]:.2f}x (same tokens)")
    chat_second_turn_ttft(args.model)


def chat_second_turn_ttft(model: str) -> None:
    """A multi-turn chat: the second turn's prompt is the first turn's conversation plus one
    message. Time to first token of that turn (a 1-token generation), cache on vs off."""
    system = "You are a helpful assistant. " + " ".join(f"Rule {i}: answer briefly and politely." for i in range(40))
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Name three rivers in Europe."}]
    ttft = {}
    for caching in (False, True):
        llm = LLM(model, enable_prefix_caching=caching)
        reply = llm.chat(first, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
        second = first + [{"role": "assistant", "content": reply.outputs[0].text},
                          {"role": "user", "content": "Which one is the longest?"}]
        start = time.perf_counter()
        out = llm.chat(second, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
        ttft[caching] = time.perf_counter() - start
        print(f"chat turn 2 ({len(out.prompt_token_ids)} prompt tokens, {out.num_cached_tokens} from cache): "
              f"time to first token {ttft[caching] * 1000:.0f} ms with the prefix cache {'on' if caching else 'off'}")
        del llm
    print(f"turn-2 time to first token: {ttft[False] / ttft[True]:.2f}x faster with the prefix cache")


if __name__ == "__main__":
    main()
