"""The `loomlm` command: `serve` (OpenAI-compatible HTTP server) and `generate` (one offline completion).

Engine flags use vLLM's names (`--max-model-len`, `--kv-cache-memory-bytes`,
`--max-num-seqs`, `--max-num-batched-tokens`, `--dtype`); flags left out take
the engine's defaults (`loomlm.config`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
_MODEL_HELP = "zoo alias, HF directory or .gguf path"

# argparse dest -> engine argument, for the engine flags shared by the subcommands.
_ENGINE_FLAGS = (
    "max_model_len",
    "kv_cache_memory_bytes",
    "max_num_seqs",
    "max_num_batched_tokens",
    "dtype",
    "device",
)


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--max-model-len", type=int, default=None, help="context window in tokens (default: the model's)"
    )
    group.add_argument(
        "--kv-cache-memory-bytes", type=int, default=None, help="memory budget of the paged KV cache, in bytes"
    )
    group.add_argument("--max-num-seqs", type=int, default=None, help="most requests in one running batch")
    group.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one engine step")
    group.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weight/activation dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    group.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="where to run the model")


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags the user gave (None: not given, the engine default applies)."""
    return {name: getattr(args, name) for name in _ENGINE_FLAGS if getattr(args, name) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `loomlm` (subcommands `serve` and `generate`)."""
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
    serve.add_argument("--served-model-name", default=None, help="model name the API reports and accepts")
    serve.add_argument("--chat-template", default=None,
                       help="chat template (a file, or Jinja text) replacing the model's")
    _add_engine_flags(serve)

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
    return parser


def _serve(args: argparse.Namespace) -> int:
    from loomlm.chat_utils import load_chat_template
    from loomlm.server.app import run_server  # the server stack loads only for this command

    run_server(
        args.model,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        log_level=args.log_level,
        chat_template=load_chat_template(args.chat_template),
        **_engine_kwargs(args),
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from loomlm import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    llm = LLM(model=args.model, **_engine_kwargs(args))
    [output] = llm.generate(args.prompt, params, use_tqdm=False)
    # stdout carries the completion alone (logs go to stderr), so it can be piped.
    sys.stdout.write(output.outputs[0].text + "\n")
    sys.stdout.flush()
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
    handlers = {"serve": _serve, "generate": _generate}
    try:
        return handlers[args.command](args)
    except ValueError as exc:
        parser.exit(2, f"loomlm {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
