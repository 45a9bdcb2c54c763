"""Soft red/green-list watermark of Kirchenbauer et al. 2023, batched.

Source: J. Kirchenbauer, J. Geiping, Y. Wen, J. Katz, I. Miers, T. Goldstein,
"A Watermark for Large Language Models", ICML 2023 (arXiv:2301.10226), §3
("soft" red list, Algorithm 2) and its one-proportion z-test for detection;
reference code github.com/jwkirchenbauer/lm-watermarking (``WatermarkLogitsProcessor``,
``WatermarkDetector``). Defaults (gamma 0.25, delta 2.0, hash key 15485863,
z threshold 4) are the reference repo's.

At each decode step the previous token ``p`` seeds a pseudo-random "green list"
of about ``gamma * |V|`` tokens, and ``delta`` is added to the green tokens'
logits before sampling. A detector that knows the hash key counts how many
tokens are green given their predecessor; unwatermarked text has a green
fraction near ``gamma``, watermarked text well above it (one-proportion z-test).

How the green list is drawn (the one departure from the reference code): the
reference repo seeds a ``torch.Generator`` with ``hash_key * p`` and takes the
first ``gamma * |V|`` entries of ``torch.randperm(|V|)``, which needs one
generator call per row and cannot be batched. Here token ``t`` is green after
``p`` iff ``u(p, t) < gamma``, where ``u`` is a deterministic hash of
``(hash_key, p, t)`` mapped to [0, 1):

    seed_p  = SplitMix64 output number p of the stream whose state starts at hash_key
    u(p, t) = (SplitMix64 output number t of the stream whose state starts at seed_p) >> 11, / 2**53

with SplitMix64 output i of state s = ``mix64(s + (i + 1) * 0x9E3779B97F4A7C15 mod 2**64)``
(Steele, Lea, Flood 2014; the finaliser is Stafford's "Mix13" variant of
MurmurHash3's fmix64). This is still a pseudo-random green list seeded by the
previous token, as in the paper, but its size is Binomial(|V|, gamma) rather
than exactly ``gamma * |V|``; the detection statistic (each scored token is
green with probability gamma under the null) is unchanged. Everything is
elementwise int64 torch arithmetic, so a batch of rows with different previous
tokens, gammas and deltas is one set of kernels, with no host sync, on any
device. torch int64 multiplication and addition wrap modulo 2**64; right
shifts of negative int64 are arithmetic, so logical shifts are emulated with a
mask.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0
DEFAULT_HASH_KEY = 15485863  # the reference repo's key (the millionth prime)

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """``value`` mod 2**64 as the signed int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)  # SplitMix64 state increment (2**64 / golden ratio)
_MIX_MUL_1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX_MUL_2 = _as_int64(0x94D049BB133111EB)
_UNIT_BITS = 53  # u = (hash >> 11) / 2**53: 53 high bits, an exact float64 in [0, 1)


def _shift_right_logical(x: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    # ``>>`` on int64 copies the sign bit; masking clears what it copied.
    out = torch.bitwise_right_shift(x, bits, out=out)
    return out.bitwise_and_((1 << (64 - bits)) - 1)


def _mix64_(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 bit patterns (wrapping multiplies), in place on ``z``.

    In place, with one ``scratch`` buffer of ``z``'s shape: on CPU the hash is
    memory-bound, and fresh [rows, vocab] temporaries per op cost ~3x the time.
    """
    z ^= _shift_right_logical(z, 30, out=scratch)
    z *= _MIX_MUL_1
    z ^= _shift_right_logical(z, 27, out=scratch)
    z *= _MIX_MUL_2
    z ^= _shift_right_logical(z, 31, out=scratch)
    return z


def _splitmix64_output(state: torch.Tensor | int, index: torch.Tensor) -> torch.Tensor:
    """Output number ``index`` (0-based) of SplitMix64 started at ``state``, as int64 bits.

    Broadcasts; ``(index + 1) * golden`` is computed at ``index``'s shape before the
    broadcast, so for ``state [rows, 1]`` and ``index [1, vocab]`` it costs O(vocab).
    """
    z = state + (index.long() + 1) * _GOLDEN  # a fresh tensor, which _mix64_ overwrites
    return _mix64_(z, torch.empty_like(z))


def _green_unit_bits(prev_token_ids: torch.Tensor, token_ids: torch.Tensor, hash_key: int) -> torch.Tensor:
    """u(prev, tok) * 2**53 as int64 in [0, 2**53), broadcasting ``prev_token_ids`` against ``token_ids``."""
    seed = _splitmix64_output(_as_int64(hash_key), prev_token_ids)
    return _shift_right_logical(_splitmix64_output(seed, token_ids), 64 - _UNIT_BITS)


def _unit_threshold(gamma: torch.Tensor | float) -> torch.Tensor | int:
    # For an integer n and a real x, n < x iff n < ceil(x); gamma * 2**53 is exact in
    # float64, so comparing bits against this is exactly u < gamma.
    if isinstance(gamma, torch.Tensor):
        return torch.ceil(gamma.to(torch.float64) * 2.0**_UNIT_BITS).to(torch.int64)
    return math.ceil(gamma * 2.0**_UNIT_BITS)


@dataclass(frozen=True)
class WatermarkParams:
    """Watermark settings of one request (paper §3, Algorithm 2).

    Attributes:
        gamma: expected fraction of the vocabulary on each green list, in (0, 1).
        delta: logit bias (in nats) added to green tokens, >= 0; 0 leaves sampling unchanged.
        hash_key: secret key of the green-list hash; detection needs the same key.

    Raises:
        ValueError: gamma outside (0, 1); delta negative or not finite; hash_key not an int.
    """

    gamma: float = DEFAULT_GAMMA
    delta: float = DEFAULT_DELTA
    hash_key: int = DEFAULT_HASH_KEY

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise ValueError(f"watermark delta must be a finite number >= 0, got {self.delta!r}")
        if isinstance(self.hash_key, bool) or not isinstance(self.hash_key, int):
            # ValueError, not TypeError: invalid user input, which the server maps to a 400.
            raise ValueError(f"watermark hash_key must be an int, got {self.hash_key!r}")  # noqa: TRY004


def _check_gamma(gamma: float) -> None:
    # `not (0 < gamma < 1)` also rejects NaN.
    if not (0.0 < gamma < 1.0):
        raise ValueError(f"watermark gamma must be in (0, 1), got {gamma!r}")


def green_mask(
    prev_token_ids: torch.Tensor,
    vocab_size: int,
    gamma: torch.Tensor | float,
    hash_key: int = DEFAULT_HASH_KEY,
) -> torch.Tensor:
    """Each row's green list, seeded by that row's previous token.

    Args:
        prev_token_ids: [rows] int64, the token before the one being sampled.
        vocab_size: number of logit columns (may exceed the tokenizer's vocabulary).
        gamma: a float, or a [rows] float tensor (one gamma per row). It is widened to
            float64 and compared exactly with the 53-bit u: a float32 tensor acts as
            float32(gamma), so pass float64 for bit-identity with ``is_green(..., gamma)``.
        hash_key: green-list key.

    Returns:
        [rows, vocab_size] bool on ``prev_token_ids``' device; entry ``[r, t]`` equals
        ``is_green(prev_token_ids[r], t, gamma[r], hash_key)``.
    """
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=prev_token_ids.device)
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(prev_token_ids.device)[:, None]  # [rows, 1]
    return is_green(prev_token_ids[:, None], token_ids[None, :], gamma, hash_key)  # [rows, vocab_size]


def is_green(
    prev_token_ids: torch.Tensor,
    token_ids: torch.Tensor,
    gamma: torch.Tensor | float,
    hash_key: int = DEFAULT_HASH_KEY,
) -> torch.Tensor:
    """Whether each ``token_ids[i]`` is on the green list of ``prev_token_ids[i]``.

    Args:
        prev_token_ids: int64 tensor, any shape broadcastable with ``token_ids``.
        token_ids: int64 tensor.
        gamma: green-list fraction in (0, 1), or a float tensor of them broadcastable with both.
        hash_key: green-list key.

    Returns:
        bool tensor of the broadcast shape; the same hash as ``green_mask``.
    """
    return _green_unit_bits(prev_token_ids, token_ids, hash_key) < _unit_threshold(gamma)


def apply_watermark(
    logits: torch.Tensor,
    prev_token_ids: torch.Tensor,
    gamma: torch.Tensor,
    delta: torch.Tensor,
    hash_key: int = DEFAULT_HASH_KEY,
) -> torch.Tensor:
    """Add ``delta`` to each row's green-list logits (paper Algorithm 2, step 3).

    Args:
        logits: [rows, vocab] float, before temperature / top-k / top-p.
        prev_token_ids: [rows] int64, the last token of each row's sequence.
        gamma: [rows] float, green-list fraction per row (float64 for bit-identity with ``detect``).
        delta: [rows] float, bias in nats per row; rows with delta 0 come back unchanged.
        hash_key: green-list key (one per batch).

    Returns:
        A new [rows, vocab] tensor, ``logits + delta[:, None] * green``; ``logits`` is not modified.
        Computed for every row, without a host sync, so rows that are not watermarked
        cost the same as those that are.
    """
    green = green_mask(prev_token_ids, logits.shape[-1], gamma, hash_key)  # [rows, vocab]
    return logits + delta.to(device=logits.device, dtype=logits.dtype)[:, None] * green


@dataclass
class WatermarkDetection:
    """Result of ``detect``; field names as the reference repo's ``WatermarkDetector.detect``.

    Attributes:
        z_score: (num_green_tokens - gamma*T) / sqrt(T*gamma*(1-gamma)), T = num_tokens_scored.
        p_value: one-sided P(Z >= z_score) under the null hypothesis (no watermark), normal approximation.
        num_tokens_scored: T, the number of (previous, token) pairs counted.
        num_green_tokens: how many of those tokens are green after their predecessor.
        green_fraction: num_green_tokens / num_tokens_scored.
        is_watermarked: z_score > the z_threshold passed to ``detect``.
    """

    z_score: float
    p_value: float
    num_tokens_scored: int
    num_green_tokens: int
    green_fraction: float
    is_watermarked: bool


class TextEncoder(Protocol):
    """Anything that tokenizes like a Hugging Face tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> TextEncoder:
    # Imported here: the loader pulls in transformers, which token-id callers do not need.
    from loomlm.models.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


def detect(
    text_or_token_ids: str | Sequence[int],
    tokenizer: TextEncoder | None = None,
    *,
    gamma: float = DEFAULT_GAMMA,
    hash_key: int = DEFAULT_HASH_KEY,
    z_threshold: float = 4.0,
    ignore_repeated_bigrams: bool = False,
) -> WatermarkDetection:
    """Test whether text carries the watermark: the paper's one-proportion z-test.

    Token ``ids[i]`` for i >= 1 is scored against its predecessor ``ids[i-1]``; the
    first token only seeds. Under the null hypothesis each scored token is green
    with probability gamma, so z = (green - gamma*T) / sqrt(T*gamma*(1-gamma)).

    Args:
        text_or_token_ids: the text, or its token ids (no special tokens added).
        tokenizer: used only for text, as ``tokenizer.encode(text, add_special_tokens=False)``;
            None loads the default model's (smollm2-135m-instruct) tokenizer.
        gamma: the green-list fraction used at generation.
        hash_key: the key used at generation.
        z_threshold: ``is_watermarked`` is ``z_score > z_threshold`` (paper: 4, a
            one-sided false-positive rate of 3e-5).
        ignore_repeated_bigrams: count each distinct (previous, token) pair once, so
            repeated text cannot inflate the score (the reference ``WatermarkDetector``'s
            option of the same name).

    Raises:
        ValueError: fewer than 2 tokens; gamma outside (0, 1).
    """
    _check_gamma(gamma)
    if isinstance(text_or_token_ids, str):
        encoder = tokenizer if tokenizer is not None else _default_tokenizer()
        token_ids = list(encoder.encode(text_or_token_ids, add_special_tokens=False))
    else:
        token_ids = [int(t) for t in text_or_token_ids]
    if len(token_ids) < 2:
        raise ValueError(f"watermark detection needs at least 2 tokens, got {len(token_ids)}")

    pairs = list(itertools.pairwise(token_ids))  # (ids[i-1], ids[i]) for i >= 1
    if ignore_repeated_bigrams:
        pairs = list(dict.fromkeys(pairs))
    pair_ids = torch.tensor(pairs, dtype=torch.int64)  # [T, 2]
    green = is_green(pair_ids[:, 0], pair_ids[:, 1], gamma, hash_key)  # [T]

    num_tokens_scored = len(pairs)
    num_green_tokens = int(green.sum().item())
    expected = gamma * num_tokens_scored
    z_score = (num_green_tokens - expected) / math.sqrt(num_tokens_scored * gamma * (1.0 - gamma))
    return WatermarkDetection(
        z_score=z_score,
        p_value=0.5 * math.erfc(z_score / math.sqrt(2.0)),  # normal survival function
        num_tokens_scored=num_tokens_scored,
        num_green_tokens=num_green_tokens,
        green_fraction=num_green_tokens / num_tokens_scored,
        is_watermarked=z_score > z_threshold,
    )
