"""Offline generation throughput: loomlm vs transformers' batched `generate`, same weights, one process.

N requests of 128 prompt tokens and 128 new tokens (greedy, EOS ignored) at
1, 8 and 32 concurrent requests. Prints generated tokens/s for both and the
ratio loomlm / transformers. Each is run `--rounds` times, alternating, and the
best round of each counts: this machine's speed drifts by up to 2x within an
hour, and alternating keeps one system from getting all the fast minutes.
Run: `.venv/bin/python benchmarks/throughput.py` (options: --concurrency 1 8 32
--prompt-len 128 --gen-len 128 --rounds 2 --model ALIAS_OR_PATH --quantization gguf).
`--lora-overhead`: loomlm with LoRA enabled (as `loomlm serve` runs) against loomlm without, on
requests that name no adapter, instead of transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch


def cpu_description() -> tuple[str, str]:
    """(model name, best vector ISA) from /proc/cpuinfo."""
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "none (no avx2/avx512f)"
    extras = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    if extras:
        isa += " (+" + ", ".join(extras) + ")"
    return model, isa


def print_machine() -> None:
    cpu, isa = cpu_description()
    print(f"CPU: {cpu}; vector ISA: {isa}; {os.cpu_count()} logical CPUs; torch threads {torch.get_num_threads()}")


def make_prompts(num: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the low ids, where the special tokens live.
    return torch.randint(100, vocab_size, (num, prompt_len), generator=g).tolist()


def load_reference(model: str):
    """The transformers model on the same weights (from the GGUF or the HF directory)."""
    from transformers import AutoModelForCausalLM

    from loomlm.models.loader import resolve_model

    source = resolve_model(model)
    if source.format == "gguf":
        path = source.weights_path
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(source.weights_path), dtype=torch.float32).eval()


def bench_loomlm(llm, prompts: list[list[int]], gen_len: int) -> float:
    from loomlm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == gen_len for o in outputs)
    return len(prompts) * gen_len / elapsed


@torch.inference_mode()
def bench_transformers(model, prompts: list[list[int]], gen_len: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=gen_len,
                         min_new_tokens=gen_len, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == gen_len
    return len(prompts) * gen_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best counts")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--quantization", default=None, choices=["gguf"],
                        help="run loomlm on the GGUF file's quantized blocks (transformers stays float32)")
    parser.add_argument("--lora-overhead", action="store_true",
                        help="instead of transformers, compare loomlm with enable_lora=True (`loomlm serve`'s "
                             "default) against loomlm without, no request naming an adapter")
    args = parser.parse_args()
    print_machine()

    from loomlm import LLM

    max_c = max(args.concurrency)
    engine_args = dict(max_num_seqs=max(max_c, 1), max_num_batched_tokens=max(512, max_c),
                       quantization=args.quantization)
    llm = LLM(args.model, **engine_args)
    print(f"loomlm linear method: {llm.llm_engine.model_runner.linear_method.name}")
    vocab = llm.llm_engine.hf_config.vocab_size
    if args.lora_overhead:
        compare(LLM(args.model, enable_lora=True, **engine_args), llm, vocab, args,
                names=("enable_lora=True", "enable_lora=False"))
        return
    reference = None if args.skip_transformers else load_reference(args.model)
    compare(llm, reference, vocab, args)


def compare(llm, reference, vocab: int, args: argparse.Namespace,
            names: tuple[str, str] = ("loomlm", "transformers")) -> None:
    """Print tok/s of loomlm and the reference (transformers, None: skipped; or a second loomlm
    `LLM`) at each of args.concurrency, and their ratio.

    Same prompts for both (args.prompt_len tokens, args.gen_len new ones); args.rounds alternating
    runs each, the best counts.
    """
    run_reference = bench_loomlm if hasattr(reference, "llm_engine") else bench_transformers
    # Warm-up (first-call allocations, the native kernels' build) for both.
    warm = make_prompts(1, args.prompt_len, vocab, seed=99)
    bench_loomlm(llm, warm, 4)
    if reference is not None:
        run_reference(reference, warm, 4)

    print(f"{'concurrency':>11} {names[0] + ' tok/s':>20} {names[1] + ' tok/s':>20} {'ratio':>6}")
    for c in args.concurrency:
        ours_runs, theirs_runs = [], []
        for round_index in range(max(1, args.rounds)):
            # New prompts each round, so loomlm's prefix cache never serves a repeat.
            prompts = make_prompts(c, args.prompt_len, vocab, seed=1000 * round_index + c)
            ours_runs.append(bench_loomlm(llm, prompts, args.gen_len))
            if reference is not None:
                theirs_runs.append(run_reference(reference, prompts, args.gen_len))
        ours, theirs = max(ours_runs), max(theirs_runs, default=float("nan"))
        print(f"{c:>11} {ours:>20.1f} {theirs:>20.1f} {ours / theirs:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
