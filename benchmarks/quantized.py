"""Quantized GGUF throughput, side by side in one run: loomlm on the file's blocks, loomlm on float32, llama.cpp.

Same GGUF file (default: the default model's Q4_1), same thread count (torch's), random
prompts of --prompt-len tokens and --gen-len new tokens each (greedy, EOS ignored):
- decode: generated tokens per wall second at each of --concurrency streams, prefill included
  (as llama.cpp's `llama-batched-bench` and the README table count them);
- prefill: prompt tokens per second for one --prefill-len-token prompt (one new token);
- RSS: the process's resident memory after each engine loaded (growth over the previous).
llama.cpp runs through `llama-cpp-python` when it is importable: its low-level batch API
decodes all streams of a step in one `llama_decode` (one sequence id per stream), as
`llama-batched-bench` does. Install it with `pip install llama-cpp-python` (builds llama.cpp
from source; `CMAKE_ARGS="-DGGML_NATIVE=ON"`); without it the benchmark prints
"llama.cpp not available" and measures the two loomlm paths.
Run: `.venv/bin/python benchmarks/quantized.py` (options: --model ALIAS_OR_GGUF --concurrency
1 8 32 128 --prompt-len 128 --gen-len 128 --prefill-len 512 --rounds 1).
Smoke run: `--concurrency 1 2 --prompt-len 8 --gen-len 8 --prefill-len 32`.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import torch
from throughput import bench_loomlm, make_prompts, print_machine


def rss_mib() -> float:
    """This process's resident set size in MiB (/proc/self/status VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_loomlm_prefill(llm, prompt_len: int, vocab: int) -> float:
    """Prompt tokens per second for one prompt of `prompt_len` tokens (one new token)."""
    from loomlm import SamplingParams

    prompt = make_prompts(1, prompt_len, vocab, seed=7 + prompt_len)
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    return prompt_len / (time.perf_counter() - start)


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: N streams decoded in one batch per step."""

    def __init__(self, path: Path, n_ctx: int, n_seq: int, n_threads: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        verbose = bool(os.environ.get("LLAMA_VERBOSE"))
        # The high-level Llama loads the model; the context is made here, because Llama() does
        # not pass n_seq_max (streams) through. One KV pool shared by all sequences.
        self.llama = llama_cpp.Llama(str(path), n_ctx=64, n_threads=n_threads, verbose=verbose)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = max(512, n_seq)
        params.n_seq_max = n_seq
        params.n_outputs_max = max(params.n_outputs_max, n_seq)
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.llama.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = self.llama.n_vocab()

    def _clear(self) -> None:
        mem = self.lib.llama_get_memory(self.ctx)
        self.lib.llama_memory_clear(mem, True)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence id, wants logits)."""
        batch = self.lib.llama_batch_init(len(entries), 0, 1)
        try:
            for i, (token, pos, seq, logits) in enumerate(entries):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            batch.n_tokens = len(entries)
            if self.lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            self.lib.llama_batch_free(batch)

    def _argmax(self, index: int) -> int:
        logits = self.lib.llama_get_logits_ith(self.ctx, index)
        row = torch.frombuffer((self.lib.ctypes.c_float * self.n_vocab).from_address(
            self.lib.ctypes.addressof(logits.contents)), dtype=torch.float32)
        return int(row.argmax())

    def generate(self, prompts: list[list[int]], gen_len: int) -> float:
        """Generated tokens per second: all prompts prefilled (512-token batches), then gen_len greedy steps."""
        self._clear()
        start = time.perf_counter()
        last: list[int] = []
        for seq, prompt in enumerate(prompts):
            for at in range(0, len(prompt), 512):
                chunk = prompt[at:at + 512]
                self._decode([(t, at + i, seq, at + i == len(prompt) - 1) for i, t in enumerate(chunk)])
            last.append(self._argmax(-1))
        pos = len(prompts[0])
        for _ in range(gen_len - 1):
            self._decode([(tok, pos, seq, True) for seq, tok in enumerate(last)])
            last = [self._argmax(i) for i in range(len(prompts))]
            pos += 1
        return len(prompts) * gen_len / (time.perf_counter() - start)

    def prefill(self, prompt_len: int, vocab: int) -> float:
        prompt = make_prompts(1, prompt_len, vocab, seed=7 + prompt_len)[0]
        self._clear()
        start = time.perf_counter()
        for at in range(0, prompt_len, 512):
            chunk = prompt[at:at + 512]
            self._decode([(t, at + i, 0, at + i == prompt_len - 1) for i, t in enumerate(chunk)])
        return prompt_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="zoo alias or GGUF path")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each; the best counts")
    args = parser.parse_args()
    print_machine()

    from loomlm import LLM
    from loomlm.models.loader import resolve_model

    source = resolve_model(args.model)
    if source.format != "gguf":
        raise SystemExit(f"{args.model}: a GGUF file is needed (got {source.format})")
    size_mib = source.weights_path.stat().st_size / 2**20
    print(f"model: {source.weights_path.name} ({size_mib:.0f} MiB)")
    max_c = max(args.concurrency)
    n_ctx = args.prompt_len + args.gen_len + 8
    engines: dict[str, object] = {}
    rss: dict[str, float] = {}
    base = rss_mib()
    for name, quantization in (("loomlm gguf", "gguf"), ("loomlm fp32", None)):
        before = rss_mib()
        engines[name] = LLM(args.model, quantization=quantization, max_num_seqs=max_c,
                            max_num_batched_tokens=max(512, max_c))
        gc.collect()
        rss[name] = rss_mib() - before
    try:
        before = rss_mib()
        engines["llama.cpp"] = LlamaCpp(source.weights_path, n_ctx=max(n_ctx * max_c, args.prefill_len + 8),
                                        n_seq=max_c, n_threads=torch.get_num_threads())
        rss["llama.cpp"] = rss_mib() - before
    except ImportError:
        print("llama.cpp not available (pip install llama-cpp-python to compare)")
    print(f"RSS growth on load, MiB (process base {base:.0f}; KV pools included): "
          + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    vocab = engines["loomlm gguf"].llm_engine.hf_config.vocab_size

    def run(name: str, prompts: list[list[int]]) -> float:
        engine = engines[name]
        if isinstance(engine, LlamaCpp):
            return engine.generate(prompts, args.gen_len)
        return bench_loomlm(engine, prompts, args.gen_len)

    for name in engines:  # warm-up: first-call allocations
        run(name, make_prompts(1, 8, vocab, seed=99))
    names = list(engines)
    print("decode, generated tokens/s (prefill included):")
    print(f"{'streams':>8} " + " ".join(f"{n:>12}" for n in names) + "  gguf/fp32  gguf/llama.cpp")
    for c in args.concurrency:
        best = dict.fromkeys(names, 0.0)
        for round_index in range(max(1, args.rounds)):
            prompts = make_prompts(c, args.prompt_len, vocab, seed=1000 * round_index + c)
            for name in names:
                best[name] = max(best[name], run(name, prompts))
        vs_cpp = f"{best['loomlm gguf'] / best['llama.cpp']:.2f}" if "llama.cpp" in best else "-"
        print(f"{c:>8} " + " ".join(f"{best[n]:>12.1f}" for n in names)
              + f"  {best['loomlm gguf'] / best['loomlm fp32']:>9.2f}  {vs_cpp:>14}", flush=True)
    prefill = {}
    for name, engine in engines.items():
        prefill[name] = (engine.prefill(args.prefill_len, vocab) if isinstance(engine, LlamaCpp)
                         else bench_loomlm_prefill(engine, args.prefill_len, vocab))
    print(f"prefill of {args.prefill_len} tokens, tokens/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in prefill.items()))


if __name__ == "__main__":
    main()
