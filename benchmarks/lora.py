"""Multi-LoRA decode throughput: a batch of 32 requests spread over 8 distinct adapters vs the same
32 requests on the base model alone, one process. Prints tokens/s for both and the ratio.

The adapters are made here with `peft` on transformers' load of the same weights (rank 8 and 16
alternating, all seven projections, random non-zero weights). 32 prompts of 64 random tokens,
64 new tokens each, greedy, EOS ignored. Run: `.venv/bin/python benchmarks/lora.py`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from throughput import make_prompts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_name: str, out_root: Path, num: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loomlm.models.loader import resolve_model

    source = resolve_model(model_name)
    paths = []
    for i in range(num):
        torch.manual_seed(i)
        if source.format == "gguf":
            base = AutoModelForCausalLM.from_pretrained(str(source.weights_path.parent),
                                                        gguf_file=source.weights_path.name, dtype=torch.float32)
        else:
            base = AutoModelForCausalLM.from_pretrained(str(source.weights_path), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8 if i % 2 == 0 else 16, lora_alpha=16, target_modules=TARGETS,
                                                init_lora_weights=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.02)
        paths.append(out_root / f"adapter-{i}")
        model.save_pretrained(str(paths[-1]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=64)
    args = parser.parse_args()

    from loomlm import LLM, LoRARequest, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(args.model, Path(tmp), args.adapters)
        # No prefix caching: the repeated base run would find its prompts cached, the adapter run not.
        llm = LLM(args.model, enable_lora=True, max_loras=args.adapters, max_num_seqs=args.requests,
                  enable_prefix_caching=False)
        prompts = make_prompts(args.requests, args.prompt_len, llm.llm_engine.hf_config.vocab_size, seed=3)
        loras = [LoRARequest(f"adapter-{i % args.adapters}", i % args.adapters + 1, str(paths[i % args.adapters]))
                 for i in range(args.requests)]
        params = SamplingParams(temperature=0, max_tokens=args.gen_len, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=2), lora_request=loras[:2], use_tqdm=False)  # warm-up

        def run(lora_request) -> float:
            start = time.perf_counter()
            llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
            return args.requests * args.gen_len / (time.perf_counter() - start)

        base = run(None)
        mixed = run(loras)
        base_again = run(None)  # the machine drifts: bracket the adapter run
    base = (base + base_again) / 2
    print(f"{args.requests} requests, {args.adapters} adapters: base model {base:.1f} tok/s, "
          f"with adapters {mixed:.1f} tok/s, ratio {mixed / base:.2f}")


if __name__ == "__main__":
    main()
