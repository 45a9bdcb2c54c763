"""Scaling out: one engine vs tensor parallelism, side by side in one run.

Tensor parallelism (`tensor_parallel_size=N`, ranks as processes on this machine, gloo over
loopback): one stream's per-token latency (greedy, --gen-len new tokens after a short prompt) and
throughput at --streams streams, for one rank and for N, with the time rank 0 spent in collectives
(the all-reduces after each row-parallel projection and the embedding, the logits all-gather) per
step. The default model has 9 heads and 3 KV heads, so N = 3 (N must divide both).
Replicas (`--replicas`): --load-streams concurrent streamed /v1/completions (--gen-len tokens each)
against one loomlm server, then against 2 replicas on Ray Serve behind loomlm's router (a local
`ray.init()`): output tokens per second and time to first token p50 / p99.
Run: `.venv/bin/python benchmarks/scale_out.py` (options: --model ALIAS --tp 3 --gen-len 64
--streams 8 --replicas --load-streams 64). Smoke run: `--gen-len 8 --streams 2`.
"""

from __future__ import annotations

import argparse
import time

from throughput import print_machine


def measure(model: str, tp: int, gen_len: int, streams: int) -> dict:
    from loomlm import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=tp)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
        llm.generate(["Warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
        engine = llm.llm_engine
        steps = [0]
        step = engine.step

        def counted():
            steps[0] += 1
            return step()

        engine.step = counted
        before = (engine.tp.stats.seconds, engine.tp.stats.num_calls) if engine.tp is not None else (0.0, 0)
        start = time.perf_counter()
        llm.generate(["The history of the lighthouse"], params, use_tqdm=False)
        one = time.perf_counter() - start
        one_steps = steps[0]
        comm = engine.tp.stats.seconds - before[0] if engine.tp is not None else 0.0
        calls = engine.tp.stats.num_calls - before[1] if engine.tp is not None else 0
        start = time.perf_counter()
        llm.generate([f"Story {i}: once upon a time" for i in range(streams)], params, use_tqdm=False)
        many = time.perf_counter() - start
        return {"ms_per_token": 1000 * one / gen_len, "comm_ms_per_step": 1000 * comm / max(one_steps, 1),
                "collectives_per_step": calls / max(one_steps, 1), "tok_s": streams * gen_len / many,
                "blocks": engine.model_runner.num_blocks}
    finally:
        llm.llm_engine.model_runner.release()


def _allreduce_rank(rank: int, world: int, port: int, width: int, iters: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tensor = torch.ones(1, width)
    for _ in range(20):
        dist.all_reduce(tensor)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor)
    if rank == 0:
        out.put((time.perf_counter() - start) / iters)
    dist.destroy_process_group()


def allreduce_latency(world: int, width: int, iters: int = 2000) -> float:
    """Seconds per gloo all-reduce of one [1, width] float32 row among `world` processes of one
    thread each (no other work): the floor of a decode step's collectives."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, world, port, width, iters, out)) for r in range(world)]
    for p in procs:
        p.start()
    latency = out.get()
    for p in procs:
        p.join()
    return latency


async def _load(base_url: str, model: str, streams: int, gen_len: int) -> dict:
    """`streams` concurrent streamed completions; output tok/s and TTFT p50 / p99 (seconds)."""
    import asyncio

    import httpx

    async def one(client, i: int) -> tuple[float, int]:
        start = time.perf_counter()
        first, chunks = None, 0
        body = {"model": model, "prompt": f"Request {i}: write about the sea.", "max_tokens": gen_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", base_url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
        return first or float("nan"), chunks

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=streams)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(streams)))
        elapsed = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"tok_s": streams * gen_len / elapsed, "ttft_p50": ttfts[len(ttfts) // 2],
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def measure_replicas(model: str, streams: int, gen_len: int) -> None:
    import asyncio

    from loomlm.server.ray_serve import ReplicaServer, run_local, stop_local

    one = ReplicaServer(model, {}, {}, 0)  # one engine and server in this process, no router
    single = asyncio.run(_load(one.url, model, streams, gen_len))
    one.engine.shutdown()
    base_url = run_local(model, 2)
    try:
        replicated = asyncio.run(_load(base_url, model, streams, gen_len))
    finally:
        stop_local()
    print(f"{streams} concurrent streams, {gen_len} tokens each:")
    print(f"{'':<26}{'tok/s':>8}{'TTFT p50 s':>12}{'TTFT p99 s':>12}")
    for name, r in (("one engine", single), ("2 Ray Serve replicas", replicated)):
        print(f"{name:<26}{r['tok_s']:>8.1f}{r['ttft_p50']:>12.2f}{r['ttft_p99']:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--replicas", action="store_true", help="also one engine vs 2 Ray Serve replicas")
    parser.add_argument("--load-streams", type=int, default=64)
    args = parser.parse_args()
    print_machine()
    if args.replicas:
        measure_replicas(args.model, args.load_streams, args.gen_len)
    print(f"model {args.model}; greedy; {args.gen_len} new tokens; ranks as processes, gloo over loopback")
    print(f"{'ranks':>6}{'ms/token (1 stream)':>21}{'collectives ms/step':>21}{'collectives/step':>18}"
          f"{f'tok/s ({args.streams} streams)':>22}{'KV blocks/rank':>16}")
    for world in (2, args.tp):
        print(f"gloo all-reduce of one 576-float row, {world} single-thread processes: "
              f"{1e6 * allreduce_latency(world, 576):.0f} us")
    for tp in (1, args.tp):
        r = measure(args.model, tp, args.gen_len, args.streams)
        print(f"{tp:>6}{r['ms_per_token']:>21.1f}{r['comm_ms_per_step']:>21.1f}{r['collectives_per_step']:>18.0f}"
              f"{r['tok_s']:>22.1f}{r['blocks']:>16}")


if __name__ == "__main__":
    main()
