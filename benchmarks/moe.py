"""MoE generation throughput: loomlm vs transformers' batched `generate` on a random Qwen3-MoE, one process.

Builds a random-weight Qwen3-MoE checkpoint (default: 4 layers, hidden 512, 8
experts of moe_intermediate 768, top-2, every layer sparse; the default model's
tokenizer and vocabulary), saves it with `save_pretrained` to a temporary
directory (per-expert tensor names, as hub checkpoints hold them), and loads
both engines from it. N requests of 64 prompt tokens and 64 new tokens (greedy,
EOS ignored) at 1, 8 and 32 concurrent requests; prints generated tokens/s for
both and the ratio loomlm / transformers. All prompts share one length, so
transformers' batch needs no padding. As in throughput.py, each side runs
`--rounds` times, alternating, and the best round of each counts.
Run: `.venv/bin/python benchmarks/moe.py` (options: --concurrency 1 8 32
--prompt-len 64 --gen-len 64 --rounds 2 --hidden 512 --moe-intermediate 768
--num-experts 8 --top-k 2 --layers 4 --hf-experts eager|grouped_mm|...).
Smoke run: `--hidden 128 --moe-intermediate 64 --layers 2 --concurrency 1 4 --prompt-len 8 --gen-len 8 --rounds 1`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from throughput import compare, print_machine


def build_checkpoint(out_dir: Path, args: argparse.Namespace) -> int:
    """Save a random Qwen3-MoE (float32 safetensors, config, tokenizer) in `out_dir`; returns its vocab size."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from loomlm.models.loader import load_tokenizer, resolve_model
    from loomlm.models.zoo import DEFAULT_MODEL

    tokenizer = load_tokenizer(resolve_model(DEFAULT_MODEL))
    vocab_size = len(tokenizer)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=2 * args.moe_intermediate,  # dense MLP size; unused, every layer is sparse
        moe_intermediate_size=args.moe_intermediate,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=max(512, 2 * (args.prompt_len + args.gen_len)),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # transformers' init leaves the routers at zero (uniform routing, ties): draw them too.
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best counts")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=768)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--hf-experts", default=None,
                        help="transformers' experts_implementation (default: its own choice)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    print_machine()
    with tempfile.TemporaryDirectory(prefix="loomlm-moe-bench-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from loomlm import LLM

    vocab = build_checkpoint(model_dir, args)
    print(f"model: qwen3_moe, {args.layers} layers, hidden {args.hidden}, {args.num_experts} experts x "
          f"moe_intermediate {args.moe_intermediate}, top-{args.top_k}, vocab {vocab}")
    max_c = max(args.concurrency)
    llm = LLM(str(model_dir), max_num_seqs=max(max_c, 1), max_num_batched_tokens=max(512, max_c))
    print(f"loomlm linear method: {llm.llm_engine.model_runner.linear_method.name}")
    reference = None
    if not args.skip_transformers:
        kwargs = {} if args.hf_experts is None else {"experts_implementation": args.hf_experts}
        reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs).eval()
        print(f"transformers experts_implementation: {reference.config._experts_implementation}")

    compare(llm, reference, vocab, args)


if __name__ == "__main__":
    main()
