"""Continuation scoring: `Model.score` (the prompt prefilled once, the values batched on its
cached KV blocks) vs 20 independent full forwards in transformers, one process.

A ~200-token prompt and 20 values of ~5 tokens (prompt and value tokenized separately, as
LMQL does). Each repetition uses a fresh prompt (a different first sentence), so no prompt
is ever served from an earlier repetition's cache. Prints both times, the ratio
transformers / loomlm (target >= 5x) and the largest score difference.
Run: `.venv/bin/python benchmarks/scoring.py` (options: --repeats 3 --values 20).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from throughput import load_reference

PARAGRAPH = ("The committee met on a grey Tuesday morning to review the proposal for the new library. "
             "Several members argued that the budget was too small for the building they had in mind, "
             "while others pointed out that the town had waited for a decade already and could not wait "
             "much longer. After two hours of discussion, the chair asked for a vote. ")
VALUES = ["the proposal passed easily", "nobody voted at all", "the vote was postponed again",
          "they ordered lunch instead", "a fire alarm rang out", "the budget was doubled",
          "the chair resigned on the spot", "it ended in a tie", "everyone went home early",
          "the library was approved", "the mayor walked in", "a new plan was drafted",
          "the members applauded politely", "the motion failed narrowly", "nothing was decided",
          "they agreed to meet again", "the press was waiting outside", "a compromise was found",
          "the town celebrated that night", "the debate continued for hours"]


@torch.inference_mode()
def transformers_scores(model, tokenizer, prompt: str, values: list[str]) -> list[float]:
    """One full forward per prompt + value; the sum of the value tokens' log_softmax."""
    prompt_ids = tokenizer.encode(prompt)
    sums = []
    for value in values:
        value_ids = tokenizer.encode(value, add_special_tokens=False)
        ids = prompt_ids + value_ids
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        sums.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(prompt_ids), len(ids))))
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--values", type=int, default=20)
    args = parser.parse_args()

    import loomlm

    model = loomlm.model(args.model)
    tokenizer = model.engine.tokenizer
    reference = load_reference(args.model)
    values = [" " + v for v in (VALUES * (args.values // len(VALUES) + 1))[:args.values]]
    base = PARAGRAPH * 3
    model.score_sync(f"Warm-up. {base}", values)  # first-call costs (allocations, tokenizer caches)
    loomlm_times, reference_times, max_diff = [], [], 0.0
    for rep in range(args.repeats):
        prompt = f"Meeting number {rep + 1}. {base}Result:"
        start = time.perf_counter()
        result = model.score_sync(prompt, values)
        loomlm_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        expected = transformers_scores(reference, tokenizer, prompt, values)
        reference_times.append(time.perf_counter() - start)
        max_diff = max(max_diff, float(np.abs(result.scores("sum") - np.array(expected)).max()))
    prompt_len = len(result.prompt_token_ids)
    mean_value_len = float(np.mean(result.num_value_tokens))
    ours, theirs = min(loomlm_times), min(reference_times)
    print(f"prompt {prompt_len} tokens, {len(values)} values of {mean_value_len:.1f} tokens on average; "
          f"best of {args.repeats}")
    print(f"loomlm Model.score (prompt once, values batched): {ours:6.3f} s "
          f"(prompt tokens from the cache per value: {result.num_cached_tokens[0]})")
    print(f"transformers, {len(values)} full forwards:           {theirs:6.3f} s")
    print(f"speed-up: {theirs / ours:.2f}x; largest score difference {max_diff:.2e}")


if __name__ == "__main__":
    main()
