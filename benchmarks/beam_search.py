"""Beam search throughput: loomlm `LLM.beam_search` vs transformers' `generate(num_beams=...)`, one process.

16 prompts of 64 random tokens, beam width 4, 32 new tokens per beam, EOS
ignored (transformers: eos_token_id=None) so both do the same work. Prints
generated beam tokens/s (prompts x beams x new tokens / seconds) for both and
the ratio loomlm / transformers. Run: `.venv/bin/python benchmarks/beam_search.py`
(options: --prompts 16 --beam-width 4 --prompt-len 64 --gen-len 32).
"""

from __future__ import annotations

import argparse
import time

import torch
from throughput import load_reference, make_prompts


def bench_loomlm(llm, prompts: list[list[int]], width: int, gen_len: int) -> float:
    from loomlm import BeamSearchParams

    start = time.perf_counter()
    outputs = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=gen_len, ignore_eos=True))
    elapsed = time.perf_counter() - start
    assert all(len(s.tokens) == len(p) + gen_len for o, p in zip(outputs, prompts) for s in o.sequences)
    return len(prompts) * width * gen_len / elapsed


@torch.inference_mode()
def bench_transformers(model, prompts: list[list[int]], width: int, gen_len: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=width,
                         max_new_tokens=gen_len, min_new_tokens=gen_len, eos_token_id=None, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == gen_len
    return len(prompts) * width * gen_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    args = parser.parse_args()

    from loomlm import LLM

    num_seqs = args.prompts * args.beam_width
    llm = LLM(args.model, max_num_seqs=num_seqs, max_num_batched_tokens=max(512, num_seqs))
    vocab = llm.llm_engine.hf_config.vocab_size
    reference = load_reference(args.model)
    warm = make_prompts(1, args.prompt_len, vocab, seed=99)
    bench_loomlm(llm, warm, args.beam_width, 2)
    bench_transformers(reference, warm, args.beam_width, 2)

    prompts = make_prompts(args.prompts, args.prompt_len, vocab, seed=1)
    ours = bench_loomlm(llm, prompts, args.beam_width, args.gen_len)
    theirs = bench_transformers(reference, prompts, args.beam_width, args.gen_len)
    print(f"{'prompts x beams':>15} {'loomlm tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    print(f"{f'{args.prompts} x {args.beam_width}':>15} {ours:>13.1f} {theirs:>19.1f} {ours / theirs:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
