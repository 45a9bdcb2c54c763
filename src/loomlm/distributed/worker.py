"""Tensor-parallel ranks as processes: started with torch's multiprocessing on one machine, or by
torchrun / a launcher across machines, joined in torch.distributed's default process group.

On one machine (`tensor_parallel_size=N`, nothing else set) rank 0, the engine's process, spawns
ranks 1..N-1 and all meet at a TCP store on a free loopback port. Across machines, each node runs
`loomlm serve ... --nnodes M --node-rank K --distributed-init-method tcp://HOST:PORT`: node K
spawns its N / M local ranks (rank 0, on node 0, is the engine). Under torchrun (the variables
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) every process is started by torchrun and joins
with `env://`; rank 0 is the engine, the others run `run_worker`.
Each rank loads the checkpoint itself and keeps its shard; threads per rank: the node's CPUs
divided among its ranks. Backend: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from loomlm.distributed.parallel_state import TensorParallel

logger = logging.getLogger(__name__)

# Rank 0's torch threads before it divided the CPUs among its ranks (restored when it stops them).
_threads_before: int | None = None

# How long ranks wait for each other to join (a rank that failed to load never joins).
JOIN_TIMEOUT = timedelta(seconds=300)


def _torchrun_rank() -> int | None:
    """This process's rank when started by torchrun (RANK and WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"])
    return None


def _node_ranks(parallel_config) -> list[int]:
    """The ranks this node runs (N / nnodes consecutive ranks per node)."""
    n, nnodes = parallel_config.tensor_parallel_size, parallel_config.nnodes
    per_node = n // nnodes
    first = parallel_config.node_rank * per_node
    return list(range(first, first + per_node))


def _backend(config) -> str:
    return "nccl" if config.model_config.torch_device.type == "cuda" else "gloo"


def _join(config, rank: int, init_method: str) -> TensorParallel:
    """Set this rank's threads (and CUDA device) and join the default process group."""
    pc = config.parallel_config
    local = len(_node_ranks(pc)) if _torchrun_rank() is None else int(os.environ.get("LOCAL_WORLD_SIZE", pc.tensor_parallel_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if config.model_config.torch_device.type == "cuda":
        torch.cuda.set_device(rank % max(1, torch.cuda.device_count()))
    dist.init_process_group(_backend(config), init_method=init_method, rank=rank,
                            world_size=pc.tensor_parallel_size, timeout=JOIN_TIMEOUT)
    return TensorParallel(rank, pc.tensor_parallel_size)


def start_tensor_parallel(config) -> tuple[TensorParallel, list]:
    """On the engine's process (rank 0): spawn this node's other ranks and join the group.
    Returns (rank 0's TensorParallel, the worker processes). Raises RuntimeError when a process
    group already exists in this process (one tensor-parallel engine per process)."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process: one "
                           "tensor-parallel engine per process.")
    global _threads_before
    _threads_before = torch.get_num_threads()
    if _torchrun_rank() is not None:
        return _join(config, 0, "env://"), []
    pc = config.parallel_config
    init_method = pc.distributed_init_method or f"tcp://127.0.0.1:{_free_port()}"
    processes = _spawn(config, [r for r in _node_ranks(pc) if r != 0], init_method)
    logger.info("tensor parallelism: %d ranks (%s), %d local workers", pc.tensor_parallel_size, init_method,
                len(processes))
    return _join(config, 0, init_method), processes


def serve_node(config) -> None:
    """A node other than node 0 (`--node-rank K > 0`): run its ranks until rank 0 stops them."""
    pc = config.parallel_config
    if not pc.distributed_init_method:
        raise ValueError("--node-rank > 0 needs --distributed-init-method tcp://HOST:PORT (node 0's).")
    processes = _spawn(config, _node_ranks(pc), pc.distributed_init_method)
    for process in processes:
        process.join()


def _spawn(config, ranks: list[int], init_method: str) -> list:
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=run_worker, args=(config, rank, init_method), daemon=True,
                                 name=f"loomlm-tp-rank{rank}") for rank in ranks]
    for process in processes:
        process.start()
    return processes


def run_worker(config, rank: int, init_method: str = "env://") -> None:
    """A worker rank's whole life: join, load its shard, run steps until rank 0 stops it."""
    from loomlm.engine.llm_engine import model_weights, resolve_max_model_len
    from loomlm.engine.model_runner import ModelRunner
    from loomlm.models.loader import resolve_model

    tp = _join(config, rank, init_method)
    mc = config.model_config
    source = resolve_model(mc.model, revision=mc.revision, tokenizer=mc.tokenizer,
                           tokenizer_revision=mc.tokenizer_revision)
    runner = ModelRunner(mc, config.cache_config, source.hf_config, model_weights(source, mc),
                         resolve_max_model_len(mc, source.hf_config), config.kernel_config, config.lora_config, tp)
    try:
        runner.worker_loop()
    finally:
        dist.destroy_process_group()


def stop_workers(tp: TensorParallel) -> None:
    """Rank 0: tell the workers to end (they leave `worker_loop`) and leave the group."""
    tp.broadcast(None)
    dist.destroy_process_group()
    if _threads_before is not None:  # this process goes on without its share of the CPUs
        torch.set_num_threads(_threads_before)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
