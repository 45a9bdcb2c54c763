"""Gemma 3 270M (the real Q4_K_M GGUF, zoo alias `gemma-3-270m`) against transformers on the same file.

transformers dequantizes the same GGUF (`gguf_file=`) into its own Gemma3ForCausalLM; loomlm reads it
with its GGUF loader and runs its Llama-family block (local/global layers with their own rope bases,
q/k norms, Gemma's (1 + w) norms, scaled embeddings). On 8 varied prompts rendered with the model's
chat template (Gemma 3's own: the base-model file carries none, the zoo entry supplies it): greedy
continuations equal token for token, and the last position's logits within 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loomlm import LLM, SamplingParams
from loomlm.models.loader import resolve_model

ALIAS = "gemma-3-270m"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a five-year-old.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "def fibonacci(n):",
    "Give me a JSON object with keys name and age.",
    "Summarize: the cat sat on the mat, then it slept all afternoon in the sun.",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gemma():
    try:
        source = resolve_model(ALIAS)
    except ValueError as e:  # the package is installed by `make test`; say how when it is not
        pytest.fail(f"{ALIAS} is not available: {e}")
    llm = LLM(ALIAS, max_model_len=1024, num_gpu_blocks_override=256)
    path = source.weights_path
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    return llm, reference


def _chat_prompts(llm) -> list[list[int]]:
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    return [tok.encode(text, add_special_tokens=False) for text in texts]  # the template writes <bos>


def test_config_is_gemma3_text(gemma):
    llm, reference = gemma
    config = llm.llm_engine.hf_config
    assert config.model_type == "gemma3_text"
    assert list(config.layer_types) == list(reference.config.layer_types)
    assert "full_attention" in config.layer_types and "sliding_attention" in config.layer_types


def test_greedy_matches_transformers(gemma):
    llm, reference = gemma
    prompts = _chat_prompts(llm)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS), use_tqdm=False)
    eos = llm.llm_engine.hf_config.eos_token_id
    assert eos == [1, 106]  # <eos> and <end_of_turn>, as Gemma 3's generation_config
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
        ref_tokens = ref[0, len(prompt):].tolist()
        ours = out.outputs[0].token_ids
        # transformers keeps the end-of-turn token it stopped on; so does loomlm's token_ids
        assert ours == ref_tokens, (llm.get_tokenizer().decode(prompt), ours, ref_tokens)


def test_last_position_logits_match(gemma):
    llm, reference = gemma
    runner = llm.llm_engine.model_runner
    for prompt in _chat_prompts(llm):
        ours = runner.logits_for(prompt)
        with torch.inference_mode():
            theirs = reference(torch.tensor([prompt])).logits[0].float()
        assert (ours[-1] - theirs[-1]).abs().max().item() < 1e-3
