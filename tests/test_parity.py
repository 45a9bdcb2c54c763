"""Model parity with transformers on the same weights.

Default model (GGUF, dequantized by loomlm) vs transformers' own GGUF load:
greedy generation of 32 tokens token for token, and logits within 1e-3 through
each attention path (fresh prefill, chunked prefill over cached blocks, decode).
Tiny random-weight Qwen2 (q/k/v bias), Mistral and Llama HF directories: logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loomlm import LLM, SamplingParams
from loomlm.layers.kernels import cpu_kernels

CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a five-year-old.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
]
RAW = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 1, 2, 3, 5, 8,",
    "La tour Eiffel est",
    "<html>\n  <body>",
]


@pytest.fixture(scope="module")
def prompts(llm) -> list[str]:
    tok = llm.get_tokenizer()
    chat = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in CHAT]
    return chat + RAW


def test_greedy_generation_matches_transformers(llm, reference, prompts):
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    assert len(prompts) >= 10
    eos = reference.generation_config.eos_token_id
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.inference_mode():
            ref = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                     eos_token_id=eos, pad_token_id=eos)
        ref_tokens = ref[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref_tokens, f"diverged on {prompt!r}"
        assert out.outputs[0].finish_reason == ("length" if len(ref_tokens) == 32 and ref_tokens[-1] != eos else "stop")


@pytest.mark.parametrize("chunk_size", [None, 7, 1], ids=["prefill", "chunked", "decode"])
def test_logits_match_transformers(llm, reference, prompts, chunk_size):
    runner = llm.llm_engine.model_runner
    tok = llm.get_tokenizer()
    for prompt in prompts:
        ids = tok.encode(prompt)
        ours = runner.logits_for(ids, chunk_size)
        with torch.inference_mode():
            theirs = reference(torch.tensor([ids])).logits[0].float()
        assert ours.shape == theirs.shape
        # the bar: last position within 1e-3; every position is checked too
        assert (ours[-1] - theirs[-1]).abs().max().item() < 1e-3
        assert (ours - theirs).abs().max().item() < 1e-3


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_tiny_random_models_match_transformers(make_tiny_model_dir, model_type):
    path = make_tiny_model_dir(model_type)
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if model_type == "qwen2":  # the point of this case: q/k/v biases are loaded and used
        assert reference.model.layers[0].self_attn.q_proj.bias is not None
    llm = LLM(str(path), num_gpu_blocks_override=64)
    runner = llm.llm_engine.model_runner
    vocab = reference.config.vocab_size
    g = torch.Generator().manual_seed(0)
    backends = ["torch"] + (["cpu_native"] if cpu_kernels() is not None else [])
    for length in (1, 5, 40):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        with torch.inference_mode():
            theirs = reference(torch.tensor([ids])).logits[0].float()
        for chunk, backend in [(None, "torch"), (3, "torch")] + [(1, b) for b in backends]:
            runner.use_decode_backend(backend)  # chunk 1 runs every token after the first as a decode
            ours = runner.logits_for(ids, chunk)
            assert (ours - theirs).abs().max().item() < 1e-4, (model_type, length, chunk, backend)
    # and the engine's generate agrees with transformers' greedy generate
    ids = torch.randint(0, vocab, (9,), generator=g).tolist()
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    with torch.inference_mode():
        ref = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                 pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, 9:].tolist()
