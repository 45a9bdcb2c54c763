"""OPT and GPT-2 (`loomlm.models.opt`, `loomlm.models.gpt2`) against transformers on tiny random checkpoints.

Four checkpoints, each a config switch the model code must honour: OPT pre-norm; OPT post-norm
with embeddings narrower than the decoder (350m-like: project_in/out, no final norm); GPT-2;
GPT-2 with attention scaled by 1 / (layer index + 1) (and reorder_and_upcast_attn, run by
transformers' eager path). For each: prompt logits through every attention path, greedy
generation, a prefix-cache hit, and checkpoints that do not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    OPTConfig,
    PretrainedConfig,
)

from loomlm import LLM, SamplingParams
from loomlm.layers.kernels import cpu_kernels
from loomlm.models.gpt2 import GPT2LMHeadModel
from loomlm.models.opt import OPTForCausalLM

MAX_POSITIONS = 256


def _opt(vocab_size: int, **overrides) -> OPTConfig:
    return OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                     max_position_embeddings=MAX_POSITIONS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     **overrides)


def _gpt2(vocab_size: int, **overrides) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=3, n_head=4, n_positions=MAX_POSITIONS,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)


@dataclass(frozen=True)
class Case:
    make_config: Callable[[int], PretrainedConfig]  # vocab_size -> config
    attn_implementation: str  # transformers' attention for the reference ("eager" runs reorder_and_upcast_attn)


CASES = {
    "opt-prenorm": Case(lambda v: _opt(v), "sdpa"),
    "opt-postnorm-proj": Case(lambda v: _opt(v, do_layer_norm_before=False, word_embed_proj_dim=32), "sdpa"),
    "gpt2": Case(lambda v: _gpt2(v), "sdpa"),
    "gpt2-inverse-layer-scale": Case(
        lambda v: _gpt2(v, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, n_inner=96), "eager"),
}


@pytest.fixture(scope="module")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A factory: case name -> an HF directory (config, float32 safetensors, tiny tokenizer), built once.

    Every parameter is drawn from N(0, 0.02), biases included, so a mixed-up name or layout
    changes values; LayerNorm weights are 1 + N(0, 0.02), as trained ones sit near 1: with
    weights near 0 every hidden state, and so the logits (std ~5e-4), would shrink to the size
    of the 1e-4 tolerance.
    """
    built: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            tokenizer = build_tiny_tokenizer()
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(CASES[name].make_config(len(tokenizer)), dtype=torch.float32)
            with torch.no_grad():
                for module in model.modules():
                    for param_name, param in module.named_parameters(recurse=False):
                        is_norm_weight = isinstance(module, torch.nn.LayerNorm) and param_name == "weight"
                        param.normal_(1.0 if is_norm_weight else 0.0, 0.02)
            model.save_pretrained(str(path))
            tokenizer.save_pretrained(str(path))
            built[name] = path
        return built[name]

    return make


@dataclass
class Pair:
    """One case's loomlm engine and its transformers reference."""

    llm: LLM
    reference: torch.nn.Module


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, make_checkpoint) -> Pair:
    path = make_checkpoint(request.param)
    reference = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation=CASES[request.param].attn_implementation).eval()
    return Pair(LLM(str(path), num_gpu_blocks_override=64), reference)


def _reference_logits(reference: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([ids])).logits[0].float()  # [len(ids), vocab]


def test_prompt_logits_match_transformers(pair):
    """Fresh prefill, chunked prefill over cached blocks, and token-by-token decode (every backend)."""
    runner = pair.llm.llm_engine.model_runner
    vocab = pair.reference.config.vocab_size
    logit_std = None
    g = torch.Generator().manual_seed(0)
    backends = ["torch"] + (["cpu_native"] if cpu_kernels() is not None else [])
    default_backend = runner.decode_backend.name
    try:
        # chunk 1 runs every token after the first as a decode; the full table's run (chunk 255)
        # ends with one decode, at the last learned position
        runs = {1: [None, 1], 7: [None, 5, 1], 40: [None, 5, 1], MAX_POSITIONS: [None, 64, MAX_POSITIONS - 1]}
        for length, chunks in runs.items():
            ids = torch.randint(0, vocab, (length,), generator=g).tolist()
            theirs = _reference_logits(pair.reference, ids)
            logit_std = theirs.std().item()
            paths = [(c, b) for c in chunks for b in (backends if c == 1 or c == MAX_POSITIONS - 1 else ["torch"])]
            for chunk, backend in paths:
                runner.use_decode_backend(backend)
                ours = runner.logits_for(ids, chunk)
                assert ours.shape == theirs.shape
                assert (ours - theirs).abs().max().item() < 1e-4, (length, chunk, backend)
    finally:
        runner.use_decode_backend(default_backend)
    assert logit_std > 0.01  # the tolerance is small against the logits' spread (std 0.02 to 0.2 here)


def test_greedy_generation_matches_transformers(pair):
    max_tokens = 16
    prompts = ["The quick brown fox", "def add(a, b):", "Paged attention stores the KV cache in"]
    outputs = pair.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.inference_mode():
            ref = pair.reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_tokens, eos_token_id=2, pad_token_id=0)
        ref_tokens = ref[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref_tokens, f"diverged on {prompt!r}"
        # both stop at eos only: a shorter run must end with it
        assert len(ref_tokens) == max_tokens or ref_tokens[-1] == 2


def test_prefix_cache_hit_matches_transformers(pair):
    """A second request sharing a 48-token prefix reads it from the cache and still matches
    transformers: the same greedy tokens and the same chosen-token logprobs."""
    vocab = pair.reference.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, vocab, (48,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, vocab, (5,), generator=g).tolist() for _ in range(2)]
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)
    first = pair.llm.generate(prompts[:1], params, use_tqdm=False)[0]
    second = pair.llm.generate(prompts[1:], params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 48  # 3 full blocks of 16
    for prompt, out in [(prompts[0], first), (prompts[1], second)]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = pair.reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                          eos_token_id=2, pad_token_id=0, output_logits=True,
                                          return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref_tokens
        for token, position_logprobs, logits in zip(ref_tokens, out.outputs[0].logprobs, ref.logits, strict=True):
            ref_logprob = torch.log_softmax(logits[0].float(), -1)[token].item()
            assert abs(position_logprobs[token].logprob - ref_logprob) < 1e-4


# ---------------------------------------------------------------------------
# Checkpoints that do not fit, and names the hub uses


def _rewrite_checkpoint(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Copy an HF directory to `dst` with its tensors changed in place by `edit`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), {"format": "pt"})
    return dst


BAD_TENSORS = {  # case -> (a tensor to drop, a tensor to give the wrong shape)
    "opt-prenorm": ("model.decoder.layers.1.fc2.bias", "model.decoder.layers.0.self_attn.k_proj.weight"),
    "opt-postnorm-proj": ("model.decoder.project_in.weight", "model.decoder.embed_positions.weight"),
    "gpt2": ("transformer.h.2.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"),
    "gpt2-inverse-layer-scale": ("transformer.ln_f.bias", "transformer.h.1.attn.c_attn.bias"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_missing_a_tensor_is_refused_naming_it(make_checkpoint, tmp_path, case):
    missing, _ = BAD_TENSORS[case]
    path = _rewrite_checkpoint(make_checkpoint(case), tmp_path / "ckpt", lambda t: t.pop(missing))
    with pytest.raises(ValueError, match=f"lacks 1 of the model's tensors: {missing}$"):
        LLM(str(path), num_gpu_blocks_override=8)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_tensor_of_wrong_shape_is_refused_naming_it(make_checkpoint, tmp_path, case):
    _, wrong = BAD_TENSORS[case]

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        # GPT-2's Conv1D [in, out] given as nn.Linear's [out, in]: the likeliest layout mistake
        t = tensors[wrong]
        tensors[wrong] = t.t().contiguous() if t.dim() == 2 and t.shape[0] != t.shape[1] else t[..., :-1].clone()

    path = _rewrite_checkpoint(make_checkpoint(case), tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match=f"^{wrong}: "):
        LLM(str(path), num_gpu_blocks_override=8)


def _load_direct(model_cls, path: Path, weights: list[tuple[str, torch.Tensor]]) -> torch.nn.Module:
    """`model_cls` built from the checkpoint's config, loaded from `weights`."""
    model = model_cls(AutoConfig.from_pretrained(str(path)), max_position=MAX_POSITIONS)
    model.load_weights(weights)
    return model


@pytest.mark.parametrize(("case", "model_cls", "strip", "unknown"), [
    ("opt-postnorm-proj", OPTForCausalLM, "model.", "model.decoder.layers.3.fc1.weight"),
    ("gpt2", GPT2LMHeadModel, "transformer.", "transformer.h.3.mlp.c_fc.weight"),
])
def test_hub_names_without_prefix_load_the_same_weights(make_checkpoint, case, model_cls, strip, unknown):
    """`decoder.*` (some OPT uploads) and the original GPT-2 checkpoint's prefix-less names, with
    its causal-mask buffers, load the same parameters; a layer the config lacks and a context past
    the learned position table are refused."""
    path = make_checkpoint(case)
    tensors = list(load_file(str(path / "model.safetensors")).items())
    expected = _load_direct(model_cls, path, tensors).state_dict()
    renamed = [(name.removeprefix(strip), t) for name, t in tensors]
    if model_cls is GPT2LMHeadModel:
        renamed += [("h.0.attn.bias", torch.ones(1, 1, 4, 4)), ("h.0.attn.masked_bias", torch.tensor(-1e4))]
    got = _load_direct(model_cls, path, renamed).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    with pytest.raises(ValueError, match=f"unexpected parameter '{unknown}'"):
        _load_direct(model_cls, path, tensors + [(unknown, torch.zeros(128, 64))])
    with pytest.raises(ValueError, match="position table"):
        model_cls(AutoConfig.from_pretrained(str(path)), max_position=MAX_POSITIONS + 1)
