"""Helpers of the tests that drive a real server with real clients: running a loomlm app under
uvicorn, the offline engine's expected output, and PEFT adapters made with peft."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    engine: Any  # AsyncLLMEngine
    tokenizer: Any
    app: Any = None  # the FastAPI app


@contextmanager
def serve_app(app: Any, engine: Any) -> Iterator[RunningServer]:
    """Serve `app` on a free loopback port in a thread; stops the server (not the engine) on exit."""
    # Bind first and hand uvicorn the socket: no race for a "free" port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv_server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", engine, engine.tokenizer, app)
    finally:
        uv_server.should_exit = True
        thread.join(timeout=60)
        sock.close()


@contextmanager
def serve_engine(**engine_args: Any) -> Iterator[RunningServer]:
    """An AsyncLLMEngine built from `engine_args`, served by `build_app` until exit (then shut down)."""
    from loomlm.engine.async_engine import AsyncLLMEngine
    from loomlm.server.app import build_app

    engine = AsyncLLMEngine.from_engine_args(**engine_args)
    try:
        with serve_app(build_app(engine), engine) as running:
            yield running
    finally:
        engine.shutdown()


def offline(llm: Any, prompt: str, max_tokens: int, **kwargs: Any) -> Any:
    """The offline engine's greedy CompletionOutput for `prompt`, with the chosen tokens' logprobs."""
    from loomlm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def make_adapter(base_dir: Path, out_dir: Path, rank: int, alpha: int, targets: list[str], seed: int,
                 std: float = 0.2) -> Path:
    """A PEFT LoRA adapter on `base_dir`'s model, every LoRA weight drawn from N(0, std) (peft's
    default B is zero: no visible change), saved with `save_pretrained` into `out_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    model.save_pretrained(str(out_dir))
    return out_dir
