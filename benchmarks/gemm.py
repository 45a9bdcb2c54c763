"""Linear-layer GEMM: each linear method (layers/linear_method.py) vs plain `x @ w_t`, one process.

For each weight shape ([in, out]: the default model's projections and LM head, and the MoE
benchmark's experts) and row count (1 decode row to a 512-token prefill chunk), times
y = x @ w_t with: torch (`x @ w_t`, the unpacked baseline transformers uses), mkl_packed
(MKL's packed GEMM), native (our panel kernel, `large_m=0` so the panel kernel runs at every
size) and native-blas (panels unpacked chunk-wise into BLAS, the many-rows path). Prints ms and
GFLOP/s per method and the ratio of each to torch; the best of `--reps` runs counts (this
machine's speed drifts). The last column says which the native method's default `large_m`
threshold would run.
Run: `.venv/bin/python benchmarks/gemm.py` (options: --rows 1 8 32 96 128 512 --reps 10 --threads N).
"""

from __future__ import annotations

import argparse
import time

import torch
from throughput import print_machine

from loomlm.layers.linear_method import NATIVE_LARGE_M, MklPackedLinearMethod, NativeLinearMethod
from loomlm.layers.packed_gemm import packed_gemm_available

# (in_features, out_features, what)
SHAPES = [
    (576, 960, "SmolLM2-135M qkv"),
    (576, 3072, "SmolLM2-135M gate_up"),
    (1536, 576, "SmolLM2-135M down"),
    (576, 49152, "SmolLM2-135M LM head"),
    (512, 1536, "MoE bench expert gate_up"),
    (768, 512, "MoE bench expert down"),
]


def best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 96, 128, 512])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine()
    from loomlm.layers.kernels import cpu_kernels

    kernels = cpu_kernels()
    methods = {}
    if packed_gemm_available(torch.device("cpu"), torch.float32):
        methods["mkl_packed"] = MklPackedLinearMethod()
    if kernels is not None:
        print(f"native kernel ISA: {kernels.gemm_isa()}; default large_m {NATIVE_LARGE_M}")
        methods["native"] = NativeLinearMethod(large_m=0)
        methods["native-blas"] = NativeLinearMethod(large_m=1)
    gen = torch.Generator().manual_seed(0)
    header = f"{'shape':<28}{'rows':>5}  {'torch':>16}" + "".join(f"{name:>24}" for name in methods)
    print(header)
    for in_f, out_f, what in SHAPES:
        weight_t = torch.randn(in_f, out_f, generator=gen)
        states = {name: m.process_weights(weight_t) for name, m in methods.items()}
        for rows in args.rows:
            x = torch.randn(rows, in_f, generator=gen)
            reps = max(3, args.reps // 4) if out_f > 10000 else args.reps
            flops = 2 * rows * in_f * out_f
            base = best_time(lambda: x @ weight_t, reps)
            line = f"{what + f' [{in_f}x{out_f}]':<28}{rows:>5}  {base * 1e3:8.2f} ms {flops / base / 1e9:4.0f}GF"
            for name, method in methods.items():
                t = best_time(lambda m=method, s=states[name]: m.apply(s, x, weight_t, None), reps)
                line += f"  {t * 1e3:7.2f} ms {flops / t / 1e9:4.0f}GF x{base / t:4.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
