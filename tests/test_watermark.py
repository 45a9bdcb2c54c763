"""Tests of the Kirchenbauer et al. 2023 watermark: the green-list hash, the logit bias, detection."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from loomlm.watermark import (
    WatermarkDetection,
    WatermarkParams,
    _splitmix64_output,
    apply_watermark,
    detect,
    green_mask,
    is_green,
)

VOCAB_SIZE = 49152  # SmolLM2's vocabulary
KEY = 15485863
MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------
# An independent pure-Python reference of the documented hash (unsigned ints mod 2**64).


def _ref_mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _ref_output(state: int, index: int) -> int:
    return _ref_mix64((state + (index + 1) * 0x9E3779B97F4A7C15) & MASK64)


def _ref_uniform(hash_key: int, prev: int, tok: int) -> float:
    seed = _ref_output(hash_key & MASK64, prev)
    return (_ref_output(seed, tok) >> 11) / 2.0**53


def _ref_is_green(hash_key: int, prev: int, tok: int, gamma: float) -> bool:
    return _ref_uniform(hash_key, prev, tok) < gamma


# ---------------------------------------------------------------------------
# The hash


def test_splitmix64_matches_published_vectors() -> None:
    # Rosetta Code "Pseudo-random numbers/Splitmix64": first five outputs for seed 1234567;
    # first output for seed 0 (splitmix64.c).
    outputs = _splitmix64_output(1234567, torch.arange(5)).tolist()
    assert [x & MASK64 for x in outputs] == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    assert _splitmix64_output(0, torch.tensor([0])).item() & MASK64 == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("hash_key", [KEY, 0, 1, -7, (1 << 64) - 3, 0xDEADBEEFCAFEF00D])
def test_is_green_matches_python_reference(hash_key: int) -> None:
    # Ids spanning the vocabulary plus large ones, so products and sums overflow int64.
    gen = torch.Generator().manual_seed(1)
    random_ids = torch.randint(0, VOCAB_SIZE, (2, 60), generator=gen)
    prev = torch.cat([torch.tensor([0, 1, VOCAB_SIZE - 1, 2**31 - 1]), random_ids[0]])
    tok = torch.cat([torch.tensor([0, 2**40, 5, 2**31]), random_ids[1]])
    for gamma in (0.1, 0.25, 0.5, 0.9):
        got = is_green(prev, tok, gamma, hash_key).tolist()
        want = [_ref_is_green(hash_key, p, t, gamma) for p, t in zip(prev.tolist(), tok.tolist(), strict=True)]
        assert got == want


def test_green_fraction_is_gamma() -> None:
    gen = torch.Generator().manual_seed(0)
    prev = torch.randint(0, VOCAB_SIZE, (64,), generator=gen)
    mask = green_mask(prev, VOCAB_SIZE, 0.25, KEY)
    assert mask.shape == (64, VOCAB_SIZE) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.25) < 0.01
    # Per row, with a different gamma on each row: the binomial std is <= 0.0023, so 0.012 is > 5 sigma.
    gammas = torch.linspace(0.05, 0.95, 64, dtype=torch.float64)
    row_fraction = green_mask(prev, VOCAB_SIZE, gammas, KEY).double().mean(dim=1)
    assert (row_fraction - gammas).abs().max().item() < 0.012
    # Each row's list is its own: rows with different previous tokens differ.
    assert not torch.equal(mask[0], mask[1])


def test_green_mask_agrees_with_is_green() -> None:
    gen = torch.Generator().manual_seed(2)
    prev = torch.randint(0, VOCAB_SIZE, (16,), generator=gen)
    gammas = torch.rand(16, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    mask = green_mask(prev, VOCAB_SIZE, gammas, KEY)  # [16, VOCAB_SIZE]
    tokens = torch.arange(VOCAB_SIZE)
    for row in range(16):
        expected = is_green(prev[row].expand(VOCAB_SIZE), tokens, gammas[row].item(), KEY)
        assert torch.equal(mask[row], expected)
    # A scalar gamma and a tensor of that gamma give the same mask.
    gamma_rows = torch.full((16,), 0.3, dtype=torch.float64)
    assert torch.equal(green_mask(prev, 1000, 0.3, KEY), green_mask(prev, 1000, gamma_rows, KEY))


def test_green_mask_is_deterministic_and_keyed() -> None:
    prev = torch.arange(0, 4000, 97)
    first = green_mask(prev, VOCAB_SIZE, 0.25, KEY)
    assert torch.equal(first, green_mask(prev.clone(), VOCAB_SIZE, 0.25, KEY))
    other_key = green_mask(prev, VOCAB_SIZE, 0.25, KEY + 1)
    # Independent lists agree on a token with probability gamma^2 + (1-gamma)^2 = 0.625.
    agreement = (first == other_key).float().mean().item()
    assert abs(agreement - 0.625) < 0.01


# ---------------------------------------------------------------------------
# The logit bias


def test_apply_watermark_adds_delta_on_green_only() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, VOCAB_SIZE, generator=gen) * 3
    logits[0, :10] = float("-inf")  # masked tokens stay masked
    original = logits.clone()
    prev = torch.tensor([5, 17, 17, 40000])
    gamma = torch.tensor([0.25, 0.25, 0.5, 0.1], dtype=torch.float64)
    delta = torch.tensor([2.0, 0.0, 1.5, 4.0])

    out = apply_watermark(logits, prev, gamma, delta, KEY)

    assert torch.equal(logits, original)  # input untouched
    assert out.dtype == logits.dtype and out.shape == logits.shape
    green = green_mask(prev, VOCAB_SIZE, gamma, KEY)
    for row in range(4):
        g = green[row]
        assert torch.equal(out[row][g], logits[row][g] + delta[row])
        assert torch.equal(out[row][~g], logits[row][~g])
    assert torch.equal(out[1], logits[1])  # delta 0: unchanged


# ---------------------------------------------------------------------------
# Detection


def _generate(delta: torch.Tensor, num_steps: int, seed: int, gamma: float = 0.25) -> list[list[int]]:
    """Sample one sequence per row of ``delta`` [rows], from fresh random logits each step.

    Logits ~ N(0, 5^2) over the vocabulary give ~3 nats of entropy per step, a
    moderate-entropy stand-in for a language model.
    """
    num_rows = delta.shape[0]
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB_SIZE, (num_rows, 1), generator=gen)  # [rows, 1], the "prompt"
    gamma_rows = torch.full((num_rows,), gamma, dtype=torch.float64)
    for _ in range(num_steps):
        logits = torch.randn(num_rows, VOCAB_SIZE, generator=gen) * 5.0  # [rows, vocab]
        logits = apply_watermark(logits, tokens[:, -1], gamma_rows, delta, KEY)
        next_tokens = torch.multinomial(logits.softmax(dim=-1), 1, generator=gen)  # [rows, 1]
        tokens = torch.cat([tokens, next_tokens], dim=1)
    return tokens.tolist()


def test_detect_separates_watermarked_from_plain() -> None:
    # One batch mixing watermarked (delta 2) and plain (delta 0) rows, as the sampler will see it.
    num_watermarked = 4
    delta = torch.tensor([2.0] * num_watermarked + [0.0] * 4)
    sequences = _generate(delta, num_steps=200, seed=0)
    for ids in sequences[:num_watermarked]:
        result = detect(ids, gamma=0.25, hash_key=KEY)
        assert result.num_tokens_scored == 200
        assert result.z_score > 4.0 and result.is_watermarked, result
        assert result.p_value < 3.2e-5
        # With the right key only: under another key the text looks unwatermarked.
        assert not detect(ids, gamma=0.25, hash_key=KEY + 1).is_watermarked
    for ids in sequences[num_watermarked:]:
        result = detect(ids, gamma=0.25, hash_key=KEY)
        assert result.z_score < 4.0 and not result.is_watermarked, result


def test_detect_counts_and_statistics_exactly() -> None:
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB_SIZE, (50,), generator=gen).tolist()
    gamma = 0.3
    num_green = sum(_ref_is_green(KEY, p, t, gamma) for p, t in itertools.pairwise(ids))
    z = (num_green - gamma * 49) / math.sqrt(49 * gamma * (1 - gamma))

    result = detect(ids, gamma=gamma, hash_key=KEY, z_threshold=z)

    assert result == WatermarkDetection(
        z_score=pytest.approx(z, rel=1e-12),
        p_value=pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=1e-12),
        num_tokens_scored=49,
        num_green_tokens=num_green,
        green_fraction=pytest.approx(num_green / 49),
        is_watermarked=False,  # the threshold is strict
    )
    # z = 0 exactly when the green count is gamma*T: the p-value is one half.
    tok = next(t for t in range(100) if _ref_is_green(KEY, 1, t, 0.5) != _ref_is_green(KEY, t, 2, 0.5))
    balanced = detect([1, tok, 2], gamma=0.5, hash_key=KEY)
    assert (balanced.num_green_tokens, balanced.z_score, balanced.p_value) == (1, 0.0, 0.5)


def test_detect_ignore_repeated_bigrams() -> None:
    ids = [7, 9] * 30 + [11]  # pairs (7,9) x30, (9,7) x29, (9,11) x1
    counted = detect(ids, hash_key=KEY)
    deduped = detect(ids, hash_key=KEY, ignore_repeated_bigrams=True)
    assert counted.num_tokens_scored == 60
    assert deduped.num_tokens_scored == 3
    greens = [_ref_is_green(KEY, p, t, 0.25) for p, t in [(7, 9), (9, 7), (9, 11)]]
    assert deduped.num_green_tokens == sum(greens)
    assert counted.num_green_tokens == 30 * greens[0] + 29 * greens[1] + greens[2]


def test_detect_on_text_with_default_tokenizer() -> None:
    from loomlm.models.loader import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    text = "Paged attention stores the KV cache in fixed-size blocks, so memory is not fragmented."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 2

    from_ids = detect(ids)
    assert detect(text, tokenizer) == from_ids
    assert detect(text) == from_ids  # None: the default model's tokenizer
    assert from_ids.num_tokens_scored == len(ids) - 1


# ---------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("ids", [[], [42]])
def test_detect_rejects_too_few_tokens(ids: list[int]) -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        detect(ids)


def test_detect_rejects_bad_gamma() -> None:
    with pytest.raises(ValueError, match="gamma"):
        detect([1, 2, 3], gamma=1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"delta": -0.5}, "delta"),
        ({"delta": float("inf")}, "delta"),
        ({"hash_key": 1.5}, "hash_key"),
    ],
)
def test_watermark_params_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WatermarkParams(**kwargs)


def test_watermark_params_defaults() -> None:
    params = WatermarkParams()
    assert (params.gamma, params.delta, params.hash_key) == (0.25, 2.0, 15485863)
    assert WatermarkParams(gamma=0.5, delta=0.0).delta == 0.0
