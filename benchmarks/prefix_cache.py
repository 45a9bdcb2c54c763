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


if __name__ == "__main__":
    main()
