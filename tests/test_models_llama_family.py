"""The Llama family's architectures against transformers on tiny random checkpoints.

Each case builds a checkpoint with transformers' own config class (2-4 layers, hidden 64) with the
architecture's switches turned on: sliding windows shorter than the prompts (6, and 20 across a
16-token block), soft-capping that bites, mixtures of 4-6 experts with top-2 routing, Gemma 3's
local/global layers with their own rope bases, Granite's multipliers, SmolLM3's layers without
RoPE, every Llama rope scaling type. Weights are drawn large enough (std 0.1) that attention is
far from uniform, so a wrong mask, scale or cap changes the numbers. Then, through loomlm's paged
path: logits at every prompt position within 1e-4 of transformers (fresh prefill, chunked prefill,
token by token through each decode backend), greedy continuations equal to transformers'
`generate` with prompts longer than the window, and a prefix-cache hit giving the same tokens and
log-probabilities.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
    SmolLM3Config,
)

from loomlm import LLM, SamplingParams
from loomlm.layers.kernels import cpu_kernels
from tests.conftest import build_tiny_tokenizer

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _c(**overrides) -> dict:
    return {**COMMON, **overrides}


# name -> config factory (vocab_size -> config)
CASES: dict[str, Callable[[int], object]] = {
    "llama-linear": lambda v: LlamaConfig(**_c(vocab_size=v), rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "llama-dynamic": lambda v: LlamaConfig(**_c(vocab_size=v), rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "llama-yarn": lambda v: LlamaConfig(**_c(vocab_size=v), rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}),
    "llama-llama3": lambda v: LlamaConfig(**_c(vocab_size=v), rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
    "llama-longrope": lambda v: LlamaConfig(**_c(vocab_size=v), rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.2 * i for i in range(8)], "original_max_position_embeddings": 128,
        "rope_theta": 10000.0}),
    "mistral-window": lambda v: MistralConfig(**_c(vocab_size=v), sliding_window=6, rope_theta=1e6),
    "qwen2-window": lambda v: Qwen2Config(**_c(vocab_size=v, num_hidden_layers=3, tie_word_embeddings=True),
                                          use_sliding_window=True, sliding_window=20, max_window_layers=1),
    "qwen3": lambda v: Qwen3Config(**_c(vocab_size=v, head_dim=24), use_sliding_window=True, sliding_window=6,
                                   max_window_layers=1),
    "qwen3_moe": lambda v: Qwen3MoeConfig(**_c(vocab_size=v, num_hidden_layers=3, head_dim=16), num_experts=6,
                                          num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                          decoder_sparse_step=1, mlp_only_layers=[1]),
    "mixtral": lambda v: MixtralConfig(**_c(vocab_size=v), num_local_experts=4, num_experts_per_tok=2,
                                       sliding_window=6),
    "gemma": lambda v: GemmaConfig(**_c(vocab_size=v, head_dim=16, num_key_value_heads=1, tie_word_embeddings=True),
                                   hidden_activation="gelu_pytorch_tanh"),
    "gemma2": lambda v: Gemma2Config(**_c(vocab_size=v, num_hidden_layers=3, head_dim=16, tie_word_embeddings=True),
                                     query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=2.0,
                                     final_logit_softcapping=1.5),
    "gemma3_text": lambda v: Gemma3TextConfig(
        **_c(vocab_size=v, num_hidden_layers=3, head_dim=16, tie_word_embeddings=True), query_pre_attn_scalar=24,
        sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
    # the text part of a checkpoint with its vision tower (Gemma3ForConditionalGeneration)
    "gemma3-multimodal": lambda v: Gemma3Config(
        text_config=Gemma3TextConfig(**_c(vocab_size=v, head_dim=16, tie_word_embeddings=True),
                                     query_pre_attn_scalar=24, sliding_window=6,
                                     layer_types=["sliding_attention", "full_attention"]),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=v - 1, boi_token_index=v - 2, eoi_token_index=v - 3),
    "phi3": lambda v: Phi3Config(**_c(vocab_size=v), partial_rotary_factor=0.5, sliding_window=20),
    "olmo2": lambda v: Olmo2Config(**_c(vocab_size=v)),
    "granite": lambda v: GraniteConfig(**_c(vocab_size=v), embedding_multiplier=3.0, attention_multiplier=0.2,
                                       residual_multiplier=0.5, logits_scaling=4.0),
    "smollm3": lambda v: SmolLM3Config(**_c(vocab_size=v, num_hidden_layers=4), no_rope_layer_interval=2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def make(case: str) -> Path:
        if case not in built:
            tokenizer = build_tiny_tokenizer()
            config = CASES[case](len(tokenizer))
            torch.manual_seed(0)
            if config.model_type == "gemma3":
                model = Gemma3ForConditionalGeneration(config).float()
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            offset = 0.0 if config.model_type.startswith("gemma") else 1.0  # Gemma norms scale by (1 + w)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.normal_(0.0, 0.1)
                    if name.endswith("norm.weight"):
                        param.add_(offset)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(str(path))
            tokenizer.save_pretrained(str(path))
            built[case] = path
        return built[case]

    return make


def _reference(path: Path):
    if "multimodal" in path.name:
        return Gemma3ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(checkpoints, case):
    path = checkpoints(case)
    reference = _reference(path)
    llm = LLM(str(path), num_gpu_blocks_override=64)
    _check_logits(llm, reference, case)
    _check_greedy_and_prefix_cache(llm, reference, case)


def _check_logits(llm, reference, case) -> None:
    """Every position's logits: fresh prefill, chunked prefill over cached blocks, token by token."""
    runner = llm.llm_engine.model_runner
    vocab = llm.llm_engine.hf_config.vocab_size
    g = torch.Generator().manual_seed(1)
    backends = ["torch"] + (["cpu_native"] if cpu_kernels() is not None else [])
    for length in (1, 7, 40):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        with torch.inference_mode():
            theirs = reference(torch.tensor([ids])).logits[0].float()
        for chunk, backend in [(None, "torch"), (3, "torch"), (7, "torch")] + [(1, b) for b in backends]:
            runner.use_decode_backend(backend)  # chunk 1 runs every token after the first as a decode
            ours = runner.logits_for(ids, chunk)
            err = (ours - theirs).abs().max().item()
            assert err < 1e-4, (case, length, chunk, backend, err)
    runner.use_decode_backend(backends[-1])


def _check_greedy_and_prefix_cache(llm, reference, case) -> None:
    """Greedy continuations through the engine (paged decode), then again after a prefix-cache hit."""
    reference.generation_config.eos_token_id = None  # as ignore_eos: run on through an end-of-text token
    vocab = llm.llm_engine.hf_config.vocab_size
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(3, vocab, (33,), generator=g).tolist()  # two full blocks and one token
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 25)] + [shared + [5, 6, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    first = llm.generate(prompts, params, use_tqdm=False)
    # The shared prefix again with another tail: its first two blocks come from the prefix cache.
    second = llm.generate([shared + [8, 9]], params, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 32, "the prefix cache was not hit"
    for prompt, out in zip(prompts + [shared + [8, 9]], first + [second]):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                     pad_token_id=0, output_logits=True,
                                     return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref_tokens, (case, len(prompt))
        # the sampled tokens' logprobs along the way (decode through the paged cache)
        for step, (token, logprobs) in enumerate(zip(ref_tokens, out.outputs[0].logprobs)):
            expected = torch.log_softmax(ref.logits[step][0].float(), -1)[token].item()
            assert abs(logprobs[token].logprob - expected) < 1e-4, (case, step)


def _rewrite_weights(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_missing_tensor_is_named(checkpoints, tmp_path):
    dst = tmp_path / "missing"
    _rewrite_weights(checkpoints("qwen3"), dst, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing 1 parameters.*layers\.1\.self_attn\.k_norm\.weight"):
        LLM(str(dst), num_gpu_blocks_override=8)


def test_missing_expert_is_named(checkpoints, tmp_path):
    dst = tmp_path / "missing-expert"
    src = checkpoints("mixtral")

    def drop_one_expert(tensors: dict[str, torch.Tensor]) -> None:
        # whatever the on-disk expert layout, drop layer 0's experts' down projection
        names = [n for n in tensors if n.startswith("model.layers.0.") and "experts" in n
                 and ("w2" in n or "down" in n)]
        assert names
        for n in names:
            tensors.pop(n)

    _rewrite_weights(src, dst, drop_one_expert)
    with pytest.raises(ValueError, match=r"missing .*layers\.0\.mlp\.experts"):
        LLM(str(dst), num_gpu_blocks_override=8)


def test_wrong_shape_is_named(checkpoints, tmp_path):
    dst = tmp_path / "shape"

    def widen(tensors: dict[str, torch.Tensor]) -> None:
        name = "model.layers.0.post_feedforward_layernorm.weight"
        tensors[name] = torch.ones(65)

    _rewrite_weights(checkpoints("gemma2"), dst, widen)
    with pytest.raises(ValueError, match=r"post_feedforward_layernorm\.weight.*\(65,\)"):
        LLM(str(dst), num_gpu_blocks_override=8)


def test_unknown_tensor_is_named(checkpoints, tmp_path):
    dst = tmp_path / "extra"
    _rewrite_weights(checkpoints("olmo2"), dst,
                     lambda t: t.__setitem__("model.layers.0.self_attn.mystery.weight", torch.ones(3)))
    with pytest.raises(ValueError, match=r"unexpected parameter 'model\.layers\.0\.self_attn\.mystery\.weight'"):
        LLM(str(dst), num_gpu_blocks_override=8)
