"""Length-dependent rope scaling ("dynamic", "longrope") beyond the original length, against transformers.

transformers recomputes these frequencies in the forward (`dynamic_rope_update`,
modeling_rope_utils.py) from seq_len = max(position_ids) + 1: "dynamic" grows its NTK base once
seq_len > `max_position_embeddings`, "longrope" swaps `short_factor` for `long_factor` once
seq_len > `original_max_position_embeddings`. loomlm decides per sequence of a step. Tiny random
checkpoints (original length 32): per-sequence cos/sin of a mixed step against transformers'
rotary modules, logits of fresh prefills up to twice the original length within 1e-4, one batch
of prompts within, across and beyond the boundary generating greedily as transformers'
`generate` (tokens, their log-probabilities and the prompt log-probabilities), and, while every
sequence stays within the original length, the precomputed table only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from loomlm import LLM, SamplingParams
from loomlm.layers import rotary
from loomlm.layers.decode_attention import DecodeMetadata
from loomlm.layers.forward_context import ForwardBatch, PrefillSpan
from loomlm.layers.rotary import RotaryEmbedding
from loomlm.models.llama_spec import llama_family_spec
from tests.conftest import build_tiny_tokenizer
from tests.test_models_llama_family import COMMON

ORIGINAL_MAX_LEN = 32  # tokens: both cases change their frequencies for sequences longer than this

# name -> (config factory (vocab_size -> config), transformers' rotary module, context the engine runs with)
CASES: dict[str, tuple[Callable[[int], object], type, int]] = {
    # "dynamic" takes max_position_embeddings as its original length
    "llama-dynamic": (lambda v: LlamaConfig(**{**COMMON, "vocab_size": v, "max_position_embeddings": ORIGINAL_MAX_LEN},
                                            rope_parameters={"rope_type": "dynamic", "factor": 3.0,
                                                             "rope_theta": 10000.0}),
                      LlamaRotaryEmbedding, 96),
    "llama-longrope": (lambda v: LlamaConfig(**{**COMMON, "vocab_size": v, "max_position_embeddings": 128},
                                             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                              "original_max_position_embeddings": ORIGINAL_MAX_LEN,
                                                              "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                              "long_factor": [1.5 * 1.5 ** i for i in range(8)]}),
                       LlamaRotaryEmbedding, 128),
    # partial rotary (8 of 16 channels), attention factor sqrt(1 + ln 4 / ln 32) from 128 / 32
    "phi3-longrope": (lambda v: Phi3Config(**{**COMMON, "vocab_size": v, "max_position_embeddings": 128},
                                           original_max_position_embeddings=ORIGINAL_MAX_LEN,
                                           partial_rotary_factor=0.5, sliding_window=None,
                                           rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                            "short_factor": [1.0, 1.1, 1.3, 1.6],
                                                            "long_factor": [1.5, 3.0, 6.0, 12.0]}),
                      Phi3RotaryEmbedding, 128),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """case -> a saved checkpoint, random weights as tests/test_models_llama_family.py draws them."""
    built: dict[str, Path] = {}

    def make(case: str) -> Path:
        if case not in built:
            tokenizer = build_tiny_tokenizer()
            config = CASES[case][0](len(tokenizer))
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.normal_(0.0, 0.1)
                    if name.endswith("norm.weight"):
                        param.add_(1.0)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(str(path))
            tokenizer.save_pretrained(str(path))
            built[case] = path
        return built[case]

    return make


def _engine(path: Path, case: str) -> LLM:
    """An engine whose context reaches past the original length (prefix caching off: every
    prompt's keys are computed at its own length, as transformers computes them). For "dynamic"
    the engine's window is max_position_embeddings x factor, as vLLM derives it."""
    llm = LLM(str(path), num_gpu_blocks_override=64, enable_prefix_caching=False)
    assert llm.llm_engine.max_model_len >= CASES[case][2]
    return llm


def _reference(path: Path):
    """A fresh transformers model: its dynamic rope keeps the longest length seen (`max_seq_len_cached`)."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _random_ids(lengths: tuple[int, ...], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("case", list(CASES))
def test_cos_sin_per_sequence_matches_transformers(case):
    """One step mixing decodes and prefill spans within, across and beyond the original length:
    each sequence's rows equal transformers' rotary module on that sequence's positions alone."""
    factory, reference_class, context_len = CASES[case]
    config = factory(384)
    ours = RotaryEmbedding(config, llama_family_spec(config).head_dim, context_len)
    decode_positions = [40, 10, 32, 31]  # lengths 41, 11, 33 (just past), 32 (at the boundary)
    span_ranges = [(0, 45), (5, 20), (30, 36), (0, 32), (60, 64)]  # a prefill, chunks, one ending at 32
    sequences = [[p] for p in decode_positions] + [list(range(a, b)) for a, b in span_ranges]
    positions = torch.tensor([p for seq in sequences for p in seq])
    spans, start = [], len(decode_positions)
    for a, b in span_ranges:
        spans.append(PrefillSpan(start, start + b - a, b, torch.zeros(1, dtype=torch.int64)))
        start += b - a
    lens = torch.tensor(decode_positions) + 1
    decode = DecodeMetadata(None, torch.zeros(len(lens), 1, dtype=torch.int64), lens, int(lens.max()))  # rotary reads positions only
    batch = ForwardBatch(positions, positions.clone(), len(decode_positions), decode, spans)

    cos, sin = ours.cos_sin(positions, torch.float32, batch)  # [T, rotary_dim]
    row = 0
    for seq in sequences:
        rows = slice(row, row + len(seq))
        row += len(seq)
        with torch.no_grad():
            ref_cos, ref_sin = reference_class(config)(torch.zeros(1), torch.tensor([seq]))
        torch.testing.assert_close(cos[rows], ref_cos[0], atol=2e-6, rtol=0, msg=lambda m, seq=seq: f"{seq}: {m}")
        torch.testing.assert_close(sin[rows], ref_sin[0], atol=2e-6, rtol=0, msg=lambda m, seq=seq: f"{seq}: {m}")
        table_cos = ours.cos_cached[torch.tensor(seq)]
        if max(seq) + 1 <= ORIGINAL_MAX_LEN:
            assert torch.equal(cos[rows], table_cos), seq  # within: the table's rows, untouched
        elif max(seq) > 0:
            assert not torch.allclose(cos[rows], table_cos, atol=1e-3), seq  # beyond: other frequencies


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_beyond_original_length(checkpoints, case):
    """Fresh unchunked prefills at, just past and twice the original length: every position's logits."""
    path = checkpoints(case)
    llm = _engine(path, case)
    runner = llm.llm_engine.model_runner
    for ids in _random_ids((ORIGINAL_MAX_LEN, ORIGINAL_MAX_LEN + 1, 40, 2 * ORIGINAL_MAX_LEN), runner.vocab_size, 1):
        with torch.inference_mode():
            theirs = _reference(path)(torch.tensor([ids])).logits[0].float()
        ours = runner.logits_for(ids)  # [len(ids), vocab]
        err = (ours - theirs).abs().max().item()
        assert err < 1e-4, (case, len(ids), err)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_across_original_length(checkpoints, case):
    """One batch: a prompt that stays within, one that crosses the boundary while decoding, one
    beyond from its prefill. Each as transformers' greedy `generate` (KV cache) on it alone, but
    for Phi-3's crossing one (`_greedy_keeping_cache`): tokens, their log-probabilities and the
    prompt log-probabilities."""
    path = checkpoints(case)
    llm = _engine(path, case)
    max_tokens = 16
    prompts = _random_ids((12, 28, 40), llm.llm_engine.hf_config.vocab_size, 2)  # ends 28, 44, 56
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        with torch.inference_mode():
            prompt_logprobs = torch.log_softmax(_reference(path)(torch.tensor([prompt])).logits[0].float(), -1)
        crosses = len(prompt) <= ORIGINAL_MAX_LEN < len(prompt) + max_tokens - 1
        greedy = _greedy_keeping_cache if crosses and case.startswith("phi3") else _greedy_generate
        ref_tokens, ref_logits = greedy(path, prompt, max_tokens)
        assert out.outputs[0].token_ids == ref_tokens, (case, len(prompt))
        for step, (token, logprobs) in enumerate(zip(ref_tokens, out.outputs[0].logprobs)):
            expected = torch.log_softmax(ref_logits[step], -1)[token].item()
            assert abs(logprobs[token].logprob - expected) < 1e-4, (case, len(prompt), step)
        assert out.prompt_logprobs[0] is None
        for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
            expected = prompt_logprobs[i - 1, prompt[i]].item()
            assert abs(entry[prompt[i]].logprob - expected) < 1e-4, (case, len(prompt), i)


@torch.inference_mode()
def _greedy_generate(path: Path, prompt: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy `generate` with its KV cache: (new tokens, each step's logits [vocab])."""
    reference = _reference(path)
    reference.generation_config.eos_token_id = None  # as ignore_eos
    ids = torch.tensor([prompt])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                             max_new_tokens=max_tokens, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [step[0].float() for step in out.logits]


@torch.inference_mode()
def _greedy_keeping_cache(path: Path, prompt: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding over transformers' forward and its KV cache alone.

    Phi-3's `generate` (`prepare_inputs_for_generation`, modeling_phi3.py) drops its cache at the
    step a sequence first passes original_max_position_embeddings and prefills it again, so every
    key turns with the long factors; loomlm, as vLLM, keeps the keys it has cached.
    """
    reference = _reference(path)
    out = reference(torch.tensor([prompt]), use_cache=True)
    tokens, logits = [], []
    for _ in range(max_tokens):
        logits.append(out.logits[0, -1].float())
        tokens.append(int(logits[-1].argmax()))
        out = reference(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens, logits


@pytest.mark.parametrize("case", list(CASES))
def test_within_original_length_uses_the_table(checkpoints, case, monkeypatch):
    """Sequences that stay within the original length never build per-token lengths (the
    common path) and match transformers, up to a prefill of exactly the original length."""

    def not_expected(batch):
        raise AssertionError("per-sequence frequencies computed for a step within the original length")

    monkeypatch.setattr(rotary, "sequence_lens", not_expected)
    path = checkpoints(case)
    llm = _engine(path, case)
    runner = llm.llm_engine.model_runner
    [full] = _random_ids((ORIGINAL_MAX_LEN,), runner.vocab_size, 3)
    with torch.inference_mode():
        theirs = _reference(path)(torch.tensor([full])).logits[0].float()
    for chunk in (None, 5, 1):
        err = (runner.logits_for(full, chunk) - theirs).abs().max().item()
        assert err < 1e-4, (case, chunk, err)
    prompts = _random_ids((9, 20), runner.vocab_size, 4)  # the last sampled token comes from position 31
    params = SamplingParams(temperature=0.0, max_tokens=ORIGINAL_MAX_LEN - 20 + 1, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        assert out.outputs[0].token_ids == _greedy_generate(path, prompt, params.max_tokens)[0], (case, len(prompt))


def test_context_window_follows_vllm():
    """vLLM's `_get_and_verify_max_len`: linear / dynamic stretch max_position_embeddings by the
    factor, yarn stretches original_max_position_embeddings, llama3 / longrope / none keep it."""
    from loomlm.engine.llm_engine import model_context_window

    def config(rope: dict | None, max_pos: int = 100) -> LlamaConfig:
        params = {"rope_theta": 10000.0, "rope_type": "default", **(rope or {})}
        return LlamaConfig(**{**COMMON, "vocab_size": 64, "max_position_embeddings": max_pos}, rope_parameters=params)

    assert model_context_window(config(None)) == 100
    assert model_context_window(config({"rope_type": "linear", "factor": 2.0})) == 200
    assert model_context_window(config({"rope_type": "dynamic", "factor": 3.0})) == 300
    assert model_context_window(config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 50})) == 200
    assert model_context_window(config({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 50})) == 100
