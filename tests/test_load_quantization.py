"""quantization="q8_0" / "q4_0": a float safetensors checkpoint's projections quantized at load (models/quantize.py).

The blocks must be exactly what gguf-py's reference quantizer (llama.cpp's algorithm) makes of
the checkpoint's weights, shard by shard in the fused layers, with the LM head left float; the
model then runs on the native GGUF kernels (tested against gguf's dequantize in
test_quant_kernels.py), so its prompt log-probabilities stay close to the float model's.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config

from loomlm import LLM, SamplingParams
from loomlm.layers.kernels import cpu_kernels
from loomlm.layers.linear import Linear

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="native CPU kernels not built")

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
# The fused layers of the Llama block and the checkpoint projections they hold, in column order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _reference_blocks(weight: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(weight.numpy(), qtype)))


@pytest.mark.parametrize("method", sorted(QTYPES))
def test_blocks_are_the_reference_quantizers(make_tiny_model_dir, method):
    model_dir = make_tiny_model_dir("llama")
    checkpoint = load_file(str(model_dir / "model.safetensors"))
    llm = LLM(str(model_dir), quantization=method)
    runner = llm.llm_engine.model_runner
    assert runner.linear_method.name == "gguf"
    qtype = QTYPES[method]
    seen = 0
    for name, module in runner.model.named_modules():
        if not isinstance(module, Linear):
            continue
        if name == "lm_head":
            assert module.weight_state[0] == "float"  # the LM head stays float
            continue
        kind, groups = module.weight_state
        assert kind == "gguf" and len(groups) == 1 and groups[0].qtype == int(qtype), name
        layer, proj = re.fullmatch(r"(?:.*\.)?layers\.(\d+)\.(.+)", name).groups()
        parts = FUSED.get(proj, (proj,))
        expected = torch.cat([_reference_blocks(checkpoint[f"model.layers.{layer}.{p}.weight"], qtype)
                              for p in parts])
        assert torch.equal(groups[0].data, expected), name
        assert module.weight_t.untyped_storage().nbytes() <= 4, name  # no float copy kept
        seen += 1
    assert seen == 2 * 4  # two layers of qkv, o, gate_up, down


@pytest.mark.parametrize("method,bound", [("q8_0", 1e-4), ("q4_0", 1e-3)])
def test_close_to_the_float_model(make_tiny_model_dir, method, bound):
    """Prompt log-probabilities: the weight rounding of each type, nothing more (measured max
    |diff| 3e-6 for Q8_0 and 4e-5 for Q4_0 on this tiny random model, whose logits are nearly
    flat; the bounds leave ~30x)."""
    model_dir = make_tiny_model_dir("llama")
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompts = ["hello world, this is a test", "the quick brown fox jumps over the lazy dog"]
    full = LLM(str(model_dir)).generate(prompts, params, use_tqdm=False)
    quantized = LLM(str(model_dir), quantization=method).generate(prompts, params, use_tqdm=False)
    worst = 0.0
    for a, b in zip(full, quantized):
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            ((token, ref),) = pa.items()
            worst = max(worst, abs(ref.logprob - pb[token].logprob))
    assert 0.0 < worst < bound, worst  # > 0: the quantized weights did run


def test_refused_where_it_cannot_run(tmp_path):
    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="Llama-family"):
        LLM(str(tmp_path), quantization="q4_0")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(str(tmp_path), quantization="q5_1")
