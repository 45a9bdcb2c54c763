"""The `loomlm` command: `serve` (the HTTP server: OpenAI-, LoRAX- and LLM Engine-compatible APIs),
`generate` (one offline completion) and `models` (the model zoo).

Engine flags use vLLM's names (`--max-model-len`, `--kv-cache-memory-bytes`,
`--max-num-seqs`, `--max-num-batched-tokens`, `--dtype`, `--revision`, `--tokenizer`,
`--tokenizer-revision`, `--trust-remote-code`); flags left out take the engine's defaults
(`loomlm.config`). A model may be a Hugging Face repo id (`loomlm serve facebook/opt-125m`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields, replace
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
_MODEL_HELP = "zoo alias, HF directory, .gguf path or Hugging Face repo id (namespace/name)"

# The engine flags shared by the subcommands, by argument group: (flag names, argparse keywords).
# Each flag's dest (its first name) is the engine argument it sets (`loomlm.config`), except
# --pooling (`_engine_kwargs`); every default is None: not given, the engine's default applies.
_ENGINE_FLAGS: dict[str, tuple[tuple[tuple[str, ...], dict[str, Any]], ...]] = {
    "engine": (
        (("--max-model-len",), dict(type=int, help="context window in tokens (default: the model's)")),
        (("--kv-cache-memory-bytes",), dict(type=int, help="memory budget of the paged KV cache, in bytes")),
        (("--max-num-seqs",), dict(type=int, help="most requests in one running batch")),
        (("--max-num-batched-tokens",), dict(type=int, help="token budget of one engine step")),
        (("--scheduling-policy",), dict(choices=["fcfs", "priority"],
                                        help="fcfs (default) or priority: requests' `priority` (lower first) "
                                             "orders admission and may preempt lower-priority requests when the "
                                             "KV cache is full")),
        (("--step-thread-niceness",), dict(type=int, metavar="N",
                                           help="serving: nice increment of the step thread and its OpenMP "
                                                "workers, so HTTP goes first on busy cores (default 0: off; "
                                                "costs throughput on few cores)")),
        (("--dtype",), dict(choices=["auto", "float32", "float16", "bfloat16"],
                            help="weight/activation dtype (auto: float32 on CPU; on CUDA the checkpoint's half "
                                 "dtype, else bfloat16)")),
        (("--device",), dict(choices=["auto", "cpu", "cuda"], help="where to run the model")),
        (("--revision",), dict(help="hub revision (branch, tag or commit) of a repo-id model (default: main)")),
        (("--tokenizer",), dict(help="a separate tokenizer: zoo alias, HF directory, .gguf path or repo id "
                                     "(default: the model's)")),
        (("--tokenizer-revision",), dict(help="hub revision of the tokenizer (default: --revision)")),
        (("--trust-remote-code",), dict(action="store_true",
                                        help="vLLM's flag, refused: loomlm runs no code from model repos")),
        (("--quantization", "-q"), dict(choices=["gguf", "q8_0", "q4_0"],
                                        help="gguf: keep a GGUF file's linear weights in their GGML blocks and run "
                                             "the native quantized kernels (default: dequantize to float at load); "
                                             "q8_0 / q4_0: quantize any checkpoint's projection weights to that "
                                             "GGML type at load")),
        (("--task",), dict(help="vLLM's flag: auto, generate or embed (one engine serves both); other tasks are "
                                "refused")),
        (("--pooling",), dict(choices=["LAST", "MEAN"],
                              help="default pooling of embeddings (short for --override-pooler-config "
                                   "'{\"pooling_type\": ...}'; default LAST)")),
        (("--override-pooler-config",), dict(metavar="JSON",
                                             help='default pooling of embeddings, e.g. \'{"pooling_type": "MEAN", '
                                                  '"normalize": true}\' (default LAST, normalised)')),
        (("--speculative-config",), dict(metavar="JSON",
                                         help='speculative decoding, vLLM\'s keys: \'{"method": "ngram", '
                                              '"num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                                              '"prompt_lookup_min": 2}\' or \'{"method": "draft_model", "model": '
                                              '..., "num_speculative_tokens": 4}\' (outputs unchanged; default off)')),
        (("--tensor-parallel-size", "-tp"), dict(type=int, metavar="N",
                                                 help="cut the model across N ranks (torch.distributed: gloo on "
                                                      "CPU, nccl on CUDA), each with its share of the heads, the "
                                                      "MLP and the KV cache (default 1)")),
        (("--distributed-init-method",), dict(metavar="tcp://HOST:PORT",
                                              help="where the ranks meet (default: a free loopback port; "
                                                   "torchrun's env:// when RANK / WORLD_SIZE are set)")),
        (("--nnodes",), dict(type=int, help="machines the ranks span (default 1)")),
        (("--node-rank",), dict(type=int, help="this machine's index among --nnodes (node 0 serves; the others "
                                               "run their ranks)")),
    ),
    "kernels (default: the LOOMLM_* variable of the same name, else automatic)": (
        (("--attention-backend",), dict(choices=["torch", "cpu_native"],
                                        help="decode attention (LOOMLM_ATTENTION_BACKEND)")),
        (("--linear-method",), dict(choices=["auto", "torch", "mkl_packed", "native"],
                                    help="float linear layers (LOOMLM_LINEAR_METHOD)")),
        (("--gguf-activation-planes",), dict(type=int, choices=[1, 2],
                                             help="activation precision of the quantized kernels: 1 (llama.cpp's) "
                                                  "or 2 (LOOMLM_GGUF_ACTIVATION_PLANES, default 2)")),
        (("--gguf-float-rows",), dict(type=int, metavar="N",
                                      help="from N tokens in a step, GGUF layers dequantize panels into the float "
                                           "path; 0 never (LOOMLM_GGUF_FLOAT_ROWS, default per block type)")),
    ),
}
_ENGINE_DESTS = tuple(names[0][2:].replace("-", "_") for flags in _ENGINE_FLAGS.values() for names, _ in flags)


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    for title, flags in _ENGINE_FLAGS.items():
        group = parser.add_argument_group(title)
        for names, keywords in flags:
            group.add_argument(*names, default=None, **keywords)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags the user gave (None: not given, the engine default applies). Raises
    ValueError for --pooling together with --override-pooler-config."""
    kwargs = {name: getattr(args, name) for name in _ENGINE_DESTS if getattr(args, name) is not None}
    pooling = kwargs.pop("pooling", None)
    if pooling is not None:
        if "override_pooler_config" in kwargs:
            raise ValueError("give --pooling or --override-pooler-config, not both.")
        kwargs["override_pooler_config"] = {"pooling_type": pooling}
    return kwargs


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServerLimits` field (`--max-n`, `--max-request-body-bytes`, ...)."""
    from loomlm.server.limits import ServerLimits

    group = parser.add_argument_group("request limits (each request is refused with a 4xx beyond them)")
    for f in fields(ServerLimits):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "trust_request_chat_template":
            group.add_argument(flag, dest=f.name, action="store_true", default=None,
                               help="accept `chat_template` in request bodies (rendered with a time limit)")
        elif f.name == "max_process_memory_bytes":
            group.add_argument("--max-process-memory", dest=f.name, default=None, metavar="SIZE",
                               help="refuse new requests (503; 429 on LoRAX routes) while the process's resident "
                                    "memory is above this: bytes, 20GiB, or 90%% (default: 90%% of the machine)")
        else:
            default = f.default if f.default is not MISSING else None
            group.add_argument(flag, dest=f.name, type=type(default), default=None, metavar="N",
                               help=f"(default: {default})")


def _limits(args: argparse.Namespace):
    """The `ServerLimits` of the flags given (the others keep their defaults)."""
    from loomlm.server.limits import ServerLimits, parse_memory_size

    given = {f.name: getattr(args, f.name) for f in fields(ServerLimits) if getattr(args, f.name, None) is not None}
    if "max_process_memory_bytes" in given:
        given["max_process_memory_bytes"] = parse_memory_size(given["max_process_memory_bytes"])
    return ServerLimits(**given)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `loomlm` (subcommands `serve`, `generate` and `models`)."""
    parser = argparse.ArgumentParser(prog="loomlm", description="An LLM inference and serving engine.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="logging level on stderr (default: info for serve, warning for generate)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="serve a model through the OpenAI-compatible HTTP API")
    serve.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{_MODEL_HELP} (default: {DEFAULT_MODEL})")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve: --num-replicas full engines behind a prefix-aware router "
                            "(starts a local Ray, or joins RAY_ADDRESS; needs `pip install loomlm[ray]`)")
    serve.add_argument("--num-replicas", type=int, default=2, help="replicas with --ray (default 2)")
    serve.add_argument("--served-model-name", default=None, help="model name the API reports and accepts")
    lora = serve.add_argument_group("adapters (LoRAX)")
    lora.add_argument("--enable-lora", action="store_true", default=None,
                      help="serve requests that name a LoRA adapter: the default, as in LoRAX (vLLM's flag, accepted)")
    lora.add_argument("--disable-lora", action="store_true", default=False,
                      help="refuse requests that name an adapter (no LoRA slots; the engine as offline)")
    lora.add_argument("--max-loras", "--max-active-adapters", dest="max_loras", type=int, default=None,
                      help="adapters installed at once; the least recently used idle one is evicted (default: 8)")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept in host memory (default: --max-loras)")
    lora.add_argument("--adapter-ids", dest="lora_adapter_ids", nargs="+", default=None, metavar="ID",
                      help="adapters to load at start-up: local paths or Hugging Face ids in the local cache")
    lora.add_argument("--adapter-root", dest="adapter_roots", action="append", default=None, metavar="DIR",
                      help="a directory under which requests may name local adapters (repeatable; without it, "
                           "requests may name only Hugging Face / S3 adapters and the --adapter-ids ones)")
    _add_limit_flags(serve)
    serve.add_argument("--max-concurrent-requests", type=int, default=128,
                       help="LoRAX/TGI routes answer 429 beyond this many requests in flight (default: 128)")
    serve.add_argument("--chat-template", default=None,
                       help="chat template (a file, or Jinja text) replacing the model's")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='tool_choice "auto": read tool calls out of the text with --tool-call-parser')
    serve.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                       help="the format of the model's tool calls (vLLM's parsers of these names)")
    serve.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                       help="split the model's <think> reasoning into reasoning_content (vLLM's parsers of these names)")
    keys = serve.add_argument_group("API keys (every route but /health and /metrics; none given: the server is open)")
    keys.add_argument("--api-key", dest="api_keys", action="append", default=[], metavar="KEY",
                      help="a key clients must send (Bearer, x-api-key, or Basic user); repeat for several")
    keys.add_argument("--api-key-file", default=None, metavar="PATH",
                      help="a file of keys, one per line (blank lines and # comments ignored)")
    _add_engine_flags(serve)

    commands.add_parser("models", parents=[common], help="list the model zoo (aliases `serve` and `generate` accept)")

    generate = commands.add_parser(
        "generate", parents=[common], help="print one completion of a prompt (offline engine)"
    )
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--model", default=DEFAULT_MODEL, help=f"{_MODEL_HELP} (default: {DEFAULT_MODEL})")
    generate.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    generate.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (default: -1, off)")
    generate.add_argument("--seed", type=int, default=None, help="seed of this request's sampling")
    _add_engine_flags(generate)
    score = commands.add_parser(
        "score", parents=[common], help="score continuations of a prompt (log probabilities, prompt prefilled once)"
    )
    score.add_argument("prompt", help="the prompt text")
    score.add_argument("values", nargs="+", help="the continuations to score")
    score.add_argument("--model", default=DEFAULT_MODEL, help=f"{_MODEL_HELP} or a server URL (default: {DEFAULT_MODEL})")
    score.add_argument("--agg", default="sum", choices=["sum", "mean", "normalized"],
                       help="aggregate over each value's tokens (default: sum)")
    _add_engine_flags(score)
    return parser


def serve_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine arguments of `loomlm serve`: LoRA is on unless --disable-lora (adapters load on
    first use, as in LoRAX; a request naming none costs nothing). Raises ValueError for
    --disable-lora with --enable-lora or adapter flags."""
    engine_kwargs = _engine_kwargs(args)
    for name in ("max_loras", "max_cpu_loras", "lora_adapter_ids", "adapter_roots"):
        if getattr(args, name) is not None:
            engine_kwargs[name] = getattr(args, name)
    if args.disable_lora:
        given = [flag for flag, value in (("--enable-lora", args.enable_lora), ("--adapter-ids", args.lora_adapter_ids),
                                          ("--adapter-root", args.adapter_roots)) if value]
        if given:
            raise ValueError(f"--disable-lora contradicts {', '.join(given)}.")
    engine_kwargs["enable_lora"] = not args.disable_lora
    return engine_kwargs


def _run_as_worker(model: str, engine_kwargs: dict[str, Any]) -> bool:
    """A tensor-parallel process that does not serve: a torchrun rank > 0, or a node with
    --node-rank > 0. Runs its ranks until rank 0 stops them; returns whether it did."""
    import os

    from loomlm.config import EngineConfig
    from loomlm.distributed.worker import run_worker, serve_node
    from loomlm.models.loader import checkpoint_dtype, resolve_model

    torchrun_rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if torchrun_rank == 0 and not engine_kwargs.get("node_rank"):
        return False
    config = EngineConfig.from_kwargs(model=model, **engine_kwargs)
    # dtype "auto" resolved here as the engine (rank 0) resolves it.
    mc = config.model_config
    source = resolve_model(mc.model, revision=mc.revision, tokenizer=mc.tokenizer,
                           tokenizer_revision=mc.tokenizer_revision)
    config = replace(config, model_config=mc.with_checkpoint_dtype(checkpoint_dtype(source)))
    if torchrun_rank:
        run_worker(config, torchrun_rank)
    else:
        serve_node(config)
    return True


def _serve(args: argparse.Namespace) -> int:
    from loomlm.chat_utils import load_chat_template
    from loomlm.server.app import (
        run_server,  # the server stack loads only for this command
    )
    from loomlm.server.auth import load_api_keys

    api_keys = load_api_keys(args.api_keys, args.api_key_file)  # before the model loads: fail fast
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser.")
    if args.ray and args.num_replicas < 1:
        raise ValueError("--num-replicas must be at least 1.")
    engine_kwargs = serve_engine_kwargs(args)
    if _run_as_worker(args.model, engine_kwargs):
        return 0
    # The application's arguments, the same for one server and for Ray's replicas.
    app_kwargs = dict(
        chat_template=load_chat_template(args.chat_template), max_concurrent_requests=args.max_concurrent_requests,
        api_keys=api_keys, limits=_limits(args), enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser)
    if args.ray:
        from loomlm.server.ray_serve import run_ray_server

        if args.served_model_name is not None:
            engine_kwargs["served_model_name"] = args.served_model_name
        run_ray_server(args.model, args.num_replicas, args.host, args.port, engine_kwargs, app_kwargs)
        return 0
    run_server(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
               log_level=args.log_level, **app_kwargs, **engine_kwargs)
    return 0


def _models(args: argparse.Namespace) -> int:
    """One line per zoo entry: alias, whether its package is installed (else how to install it), description."""
    import importlib.util

    from loomlm.models.zoo import DEFAULT_MODEL as ZOO_DEFAULT
    from loomlm.models.zoo import list_models

    entries = list_models()
    width = max(len(entry.alias) for entry in entries)
    for entry in entries:
        installed = importlib.util.find_spec(entry.module) is not None
        status = "installed" if installed else f"not installed ({entry.install_hint})"
        default = " (default)" if entry.alias == ZOO_DEFAULT else ""
        print(f"{entry.alias:<{width}}  {entry.description}{default}; {status}", flush=True)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from loomlm import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    llm = LLM(model=args.model, **_engine_kwargs(args))
    [output] = llm.generate(args.prompt, params, use_tqdm=False)
    # stdout carries the completion alone (logs go to stderr), so it can be piped.
    print(output.outputs[0].text, flush=True)
    return 0


def _score(args: argparse.Namespace) -> int:
    """`ScoringResult`'s text form with the chosen aggregate: one `-value: score` line per value."""
    import loomlm

    with loomlm.model(args.model, **_engine_kwargs(args)) as model:
        result = model.score_sync(args.prompt, args.values)
    lines = [f"loomlm.ScoringResult(model='{result.model_identifier}')"]
    lines += [f"-{value}: {score:.4f}" for value, score in zip(result.continuations, result.scores(args.agg))]
    print("\n".join(lines), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `loomlm` command; returns the exit status.

    Invalid values (bad sampling or engine arguments) exit with status 2 and
    the message on stderr.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        args.log_level = "info" if args.command == "serve" else "warning"
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    handlers = {"serve": _serve, "generate": _generate, "models": _models, "score": _score}
    try:
        return handlers[args.command](args)
    except ValueError as exc:
        parser.exit(2, f"loomlm {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
