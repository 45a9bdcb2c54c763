"""quantization="gguf": GGUF linear weights kept in their GGML blocks (layers/linear_method.py GGUFLinearMethod).

Layer level: a fused Linear of shards in different GGML types equals the float product on the
dequantized weights within the error of 8-bit activations. Model level: the default model
(Q4_1 layers, Q8_0 tied embedding read by the LM head as blocks) against the same file
dequantized to float32: per-position KL and prompt log-probability differences stay at the size
8-bit activation rounding gives (measured on SmolLM2-135M, AMD EPYC: max KL 0.04, mean
|d logprob| 0.04-0.06 nats per prompt; the bounds below leave 2x).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from loomlm import LLM, SamplingParams
from loomlm.layers.kernels import cpu_kernels
from loomlm.layers.linear import Linear
from loomlm.layers.linear_method import GGUFLinearMethod, LinearMethod, QuantizedWeight

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="native CPU kernels not built")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:",
           "Water boils at", "The quick brown fox", "In 1969, astronauts", "To make a cup of tea,"]


def _quantized(rows: int, cols: int, qtype: gguf.GGMLQuantizationType, seed: int) -> tuple[QuantizedWeight, torch.Tensor]:
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((rows, cols)).astype(np.float32)
    blocks = gguf.quants.quantize(dense, qtype)
    return (QuantizedWeight(torch.from_numpy(np.ascontiguousarray(blocks)), int(qtype), (rows, cols)),
            torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32)))


def test_fused_layer_of_mixed_types_matches_float_product():
    # Gemma 3's Q4_K_M layout: q and k in one type, v in another -> two kernel calls into their columns.
    q8, q5, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q4_1
    layer = Linear(64, {"q": 48, "k": 16, "v": 33}, bias=True)
    parts = {"q": _quantized(48, 64, q5, 0), "k": _quantized(16, 64, q5, 1), "v": _quantized(33, 64, q8, 2)}
    bias = torch.randn(97)
    for shard, (weight, _) in parts.items():
        start, end = layer.shard_offsets[shard]
        layer.load_shard(shard, weight=weight, bias=bias[start:end])
    dense = torch.cat([parts[s][1] for s in ("q", "k", "v")])  # [97, 64]
    layer.process_weights(GGUFLinearMethod(float_method=LinearMethod()))
    kind, groups = layer.weight_state
    assert kind == "gguf" and [(g.start, g.end, g.qtype) for g in groups] == [(0, 64, int(q5)), (64, 97, int(q8))]
    x = torch.randn(5, 64)
    expected = x @ dense.t() + bias
    # 8-bit activations: per element at most max|x_block| / 254 off; a swapped row or block is O(1) off.
    bound = (x.abs().amax() / 254) * dense.abs().sum(1) + 1e-4
    assert ((layer(x) - expected).abs() <= bound).all()
    # A layer with one float shard is dequantized whole and runs the float method.
    mixed = Linear(64, {"a": 32, "b": 32})
    mixed.load_shard("a", weight=_quantized(32, 64, q4, 3)[0])
    mixed.load_shard("b", weight=torch.randn(32, 64))
    mixed.process_weights(GGUFLinearMethod(float_method=LinearMethod()))
    assert mixed.weight_state[0] == "float"


def test_quantized_split_keeps_rows():
    weight, dense = _quantized(40, 32, gguf.GGMLQuantizationType.Q8_0, 4)
    first, second = weight.split([16, 24])
    assert first.shape == (16, 32) and second.shape == (24, 32)
    assert torch.equal(cpu_kernels().quant_dequantize(second.data, second.qtype, 32), dense[16:])


@pytest.fixture(scope="module")
def engines():
    return LLM(quantization="gguf", num_gpu_blocks_override=64), LLM(num_gpu_blocks_override=64)


def test_default_model_keeps_its_blocks(engines):
    quantized, _ = engines
    runner = quantized.llm_engine.model_runner
    assert runner.linear_method.name == "gguf"
    linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
    assert all(m.weight_state[0] == "gguf" for m in linears)  # every projection and the tied LM head
    assert runner.model.lm_head.weight_state[1][0].qtype == int(gguf.GGMLQuantizationType.Q8_0)
    assert all(m.weight_t.untyped_storage().nbytes() <= 4 for m in linears)  # no float copy kept


def test_default_model_close_to_float(engines):
    quantized, full = engines
    tok = full.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = full.generate(PROMPTS, params, use_tqdm=False)
    quantized_outputs = quantized.generate(PROMPTS, params, use_tqdm=False)
    # The first tokens agree; later near-ties may flip under 8-bit activation rounding.
    assert sum(a.outputs[0].token_ids[:3] == b.outputs[0].token_ids[:3]
               for a, b in zip(outputs, quantized_outputs)) >= 7
    for prompt, out in zip(PROMPTS, outputs):
        ids = tok.encode(prompt) + list(out.outputs[0].token_ids)
        ours = torch.log_softmax(quantized.llm_engine.model_runner.logits_for(ids, None).double(), -1)
        ref = torch.log_softmax(full.llm_engine.model_runner.logits_for(ids, None).double(), -1)
        kl = (ref.exp() * (ref - ours)).sum(-1)
        assert kl.max().item() < 0.1, prompt
        targets = torch.tensor(ids[1:])[:, None]
        diff = (ours[:-1].gather(1, targets) - ref[:-1].gather(1, targets)).abs()
        assert diff.mean().item() < 0.1, prompt


def test_gguf_quantization_is_refused_where_it_cannot_run(make_tiny_model_dir):
    from loomlm.config import ModelConfig

    with pytest.raises(ValueError, match="quantization must be one of"):
        ModelConfig(quantization="awq")
    with pytest.raises(ValueError, match="needs a GGUF file"):
        LLM(str(make_tiny_model_dir("llama")), quantization="gguf")
