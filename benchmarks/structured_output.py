"""Structured output cost: decode tokens/s at batch 16 with every request JSON-schema constrained vs
unconstrained, and time to first token with a new schema vs a cached one. One process.

Constrained: a schema of 8 {name, value} records (up to ~150 tokens); tokens appended by
jump-forward count as generated, as the user receives them; a second constrained run with
jump-forward off (logprobs=0) shows the cost of the masks alone. Unconstrained: the same prompts,
128 tokens, EOS ignored. Run: `.venv/bin/python benchmarks/structured_output.py`.
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "minItems": 8, "maxItems": 8, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "value": {"type": "integer", "minimum": 0, "maximum": 1000}},
    "required": ["name", "value"], "additionalProperties": False}}}, "required": ["records"],
    "additionalProperties": False}


def tokens_per_s(llm, prompts: list[str], params) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return num_tokens / elapsed, num_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    from loomlm import LLM, SamplingParams
    from loomlm.sampling_params import StructuredOutputsParams

    llm = LLM(args.model)
    prompts = [f"Write 8 records of inventory batch {i} as JSON:" for i in range(args.batch)]
    so = StructuredOutputsParams(json=SCHEMA)
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=256, structured_outputs=so)
                   for i in range(args.batch)]
    plain = [SamplingParams(temperature=1.0, seed=i, max_tokens=128, ignore_eos=True) for i in range(args.batch)]
    tokens_per_s(llm, prompts[:2], plain[:2])  # warm-up (first-call allocations)
    tokens_per_s(llm, prompts[:2], constrained[:2])  # warm-up, and the schema is now cached

    free, n_free = tokens_per_s(llm, prompts, plain)
    manager = llm.llm_engine.structured_outputs
    forced_before = manager.num_forced_tokens
    bound, n_bound = tokens_per_s(llm, prompts, constrained)
    forced = manager.num_forced_tokens - forced_before
    # logprobs turn jump-forward off (a forced token has no logprob): every token is sampled under the mask.
    masked_only = [p.clone(logprobs=0) for p in constrained]
    sampled, n_sampled = tokens_per_s(llm, prompts, masked_only)
    print(f"batch {args.batch}: unconstrained {free:.1f} tok/s ({n_free} tokens)")
    print(f"  JSON-schema constrained {bound:.1f} tok/s ({n_bound} tokens, {forced} of them by jump-forward): "
          f"ratio {bound / free:.2f}")
    print(f"  constrained, every token sampled under the mask {sampled:.1f} tok/s ({n_sampled} tokens): "
          f"ratio {sampled / free:.2f}")

    def first_token_s(schema: dict) -> float:
        params = SamplingParams(temperature=0, max_tokens=1, structured_outputs=StructuredOutputsParams(json=schema))
        start = time.perf_counter()
        llm.generate(prompts[0], params, use_tqdm=False)
        return time.perf_counter() - start

    new_schema = json.loads(json.dumps(SCHEMA))
    new_schema["title"] = f"never seen {time.time()}"  # a new cache key
    print(f"time to first token: new schema {first_token_s(new_schema) * 1000:.0f} ms, "
          f"cached schema {first_token_s(new_schema) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
