"""Speculative decoding: loomlm with n-gram proposals vs loomlm without, same model, one process.

Two tasks through the chat template of the default model, greedy (temperature 0):
- grounded: rewrite a given ~400-token text (the output copies from the prompt, where prompt
  lookup proposes well);
- free: write a story from a one-line prompt (little to copy).
At each --concurrency (streams = requests run together), prints generated tokens per wall second
with and without speculation, their ratio, the acceptance rate and the mean tokens a verified
request took per step, and whether the outputs were token for token the same. The two engines
run alternately for --rounds rounds and the best round of each counts (this machine's speed drifts).
Run: `.venv/bin/python benchmarks/speculative.py` (options: --concurrency 1 8 32 --max-tokens 256
--num-speculative-tokens 4 --prompt-lookup-max 4 --prompt-lookup-min 2 --rounds 2 --model ALIAS).
Smoke run: `--concurrency 1 --max-tokens 16 --rounds 1`.
"""

from __future__ import annotations

import argparse
import time

from throughput import print_machine

# ~400 tokens of plain prose for the grounded task (written for this benchmark).
TEXT = (
    "The lighthouse on the northern cape was built in 1874, after three ships were lost on the rocks "
    "in a single winter. Its first keeper, a former sailor named Thomas Reed, lived there with his wife "
    "and two daughters. Every evening he climbed the one hundred and twelve steps to light the lamp, and "
    "every morning he wrote the weather, the ships he had seen and the oil he had used in a thick leather "
    "book. The book survives in the town museum, and its entries are short and plain: wind from the west, "
    "heavy rain, two fishing boats came in before dark, the lamp burned well.\n\n"
    "In 1901 the oil lamp was replaced by a paraffin burner, which gave a brighter light and needed less "
    "care. Reed's younger daughter, Margaret, had by then taken over most of the work. She kept the "
    "lighthouse for thirty-one years, longer than her father, and she was the first woman in the region "
    "to be paid as a keeper in her own name. During the great storm of 1913 she kept the light burning for "
    "four days without sleep, and a steamer carrying more than two hundred passengers found its way into "
    "the harbour because of it.\n\n"
    "The light was electrified in 1952 and made automatic in 1987, when the last keeper left the cape. "
    "Today the tower is open to visitors in the summer months. From the gallery at the top one can see the "
    "whole coast, the islands to the east and, on a clear day, the mountains far to the south. A small "
    "exhibition in the keeper's house tells the story of the Reed family, and the leather book lies open "
    "under glass at the page of the great storm, where Margaret wrote only: wind very strong, light kept, "
    "all ships safe.\n\n"
    "Local people still call the rocks below the tower the Widow's Teeth, a name older than the lighthouse "
    "itself. Divers who have explored them report the remains of at least five wrecks, the oldest of them "
    "a wooden merchant ship from the seventeenth century."
)
GROUNDED = "Rewrite the following text exactly as it is, sentence by sentence, without changing any word.\n\n"
FREE = ["Write a long story about a dragon who learns to bake bread.",
        "Write a long story about a robot exploring an abandoned city.",
        "Write a long story about two friends sailing across an ocean.",
        "Write a long story about a musician who loses her hearing."]


def task_prompts(task: str, num: int) -> list[list[dict]]:
    """Chat conversations for `num` streams (distinct first words, so streams share no whole prompt)."""
    if task == "grounded":
        return [[{"role": "user", "content": f"({i + 1}) " + GROUNDED + TEXT}] for i in range(num)]
    return [[{"role": "user", "content": FREE[i % len(FREE)] + f" (Story {i + 1}.)"}] for i in range(num)]


def run(llm, conversations, max_tokens: int) -> tuple[float, list[list[int]], float]:
    """(generated tokens per second, each output's token ids, seconds)."""
    from loomlm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return sum(map(len, tokens)) / elapsed, tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["grounded", "free"], choices=["grounded", "free"])
    args = parser.parse_args()

    from loomlm import LLM

    print_machine()
    spec_config = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
                   "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min}
    base = LLM(args.model)
    spec = LLM(args.model, speculative_config=spec_config)
    print(f"model {args.model}; speculative_config {spec_config}; max_tokens {args.max_tokens}; greedy; "
          f"best of {args.rounds} alternating rounds")
    tokenizer = base.get_tokenizer()
    chat = tokenizer.apply_chat_template(task_prompts("grounded", 1)[0], add_generation_prompt=True, tokenize=False)
    prompt_len = len(tokenizer(chat, add_special_tokens=False).input_ids)
    print(f"grounded prompt: {prompt_len} tokens")
    print(f"{'task':<9}{'streams':>8}{'base tok/s':>12}{'spec tok/s':>12}{'ratio':>8}{'accept':>8}"
          f"{'tok/verify':>11}{'same':>7}")
    run(base, task_prompts("free", 1), 8)  # warm both (kernels, allocator)
    run(spec, task_prompts("free", 1), 8)
    for task in args.tasks:
        for streams in args.concurrency:
            conversations = task_prompts(task, streams)
            best_base = best_spec = 0.0
            stats = spec.llm_engine.spec_decode.stats
            before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
            for _ in range(args.rounds):
                rate, base_tokens, _ = run(base, conversations, args.max_tokens)
                best_base = max(best_base, rate)
                rate, spec_tokens, _ = run(spec, conversations, args.max_tokens)
                best_spec = max(best_spec, rate)
            drafts, proposed, accepted = (stats.num_drafts - before[0], stats.num_draft_tokens - before[1],
                                          stats.num_accepted_tokens - before[2])
            same = sum(a == b for a, b in zip(base_tokens, spec_tokens))
            print(f"{task:<9}{streams:>8}{best_base:>12.1f}{best_spec:>12.1f}{best_spec / best_base:>7.2f}x"
                  f"{accepted / proposed if proposed else 0.0:>8.2f}"
                  f"{1 + accepted / drafts if drafts else 1.0:>11.2f}{same:>4}/{streams}")


if __name__ == "__main__":
    main()
