"""Batched logits processors: every request's setting is one row of a tensor.

Each function takes float32 logits [num_rows, vocab_size] and per-row tensors
and returns new logits; rows whose setting is off are left unchanged (TGI's
"heterogeneous" processors, vLLM v1's `vllm/v1/sample/ops/penalties.py`).
Definitions, each checked against the reference in tests/test_sampler.py:

- repetition penalty: CTRL (Keskar et al. 2019), as transformers'
  `RepetitionPenaltyLogitsProcessor` and vLLM: for tokens of the prompt or
  the output, logit / penalty if the logit is positive, logit * penalty otherwise;
- presence / frequency penalties: OpenAI's definition over the *output*
  tokens, logit - frequency * count - presence * (count > 0);
- min_p: Nguyen et al. 2024, as transformers' `MinPLogitsWarper`;
- typical_p: locally typical sampling (Meister et al. 2022), as transformers'
  `TypicalLogitsWarper` (min_tokens_to_keep = 1);
- logit bias / banned tokens / allowed tokens: sparse adds and masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseLogitsUpdate:
    """(row, token) pairs of a batch, with a value per pair (a bias; unused for bans)."""

    rows: torch.Tensor  # [num_pairs] int64
    token_ids: torch.Tensor  # [num_pairs] int64
    values: torch.Tensor | None = None  # [num_pairs] float32


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """token_ids: [num_rows, max_len] int64, padded with vocab_size -> counts [num_rows, vocab_size] float32."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]  # drop the padding column


def apply_penalties(logits: torch.Tensor, prompt_token_ids: torch.Tensor | None, output_token_ids: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens) penalties.

    logits: [num_rows, vocab_size]; *_token_ids: [num_rows, max_len] padded with vocab_size
    (prompt_token_ids may be None when no row has a repetition penalty); presence, frequency:
    [num_rows] (0 = off); repetition: [num_rows] (1 = off).
    """
    vocab = logits.shape[-1]
    output_counts = token_counts(output_token_ids, vocab)
    seen = output_counts > 0
    if prompt_token_ids is not None:
        seen_anywhere = seen | (token_counts(prompt_token_ids, vocab) > 0)
        penalty = repetition[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen_anywhere, penalized, logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * seen.float()


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max (Nguyen et al. 2024; transformers' MinPLogitsWarper). min_p: [num_rows]."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Keep the tokens whose surprisal is closest to the entropy, up to mass typical_p (1 = off).

    logits: [num_rows, vocab_size]; typical_p: [num_rows]. Follows transformers' TypicalLogitsWarper.
    """
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs.nan_to_num() * probs).sum(dim=-1, keepdim=True)  # nan_to_num: -inf * 0
    shifted = (-log_probs - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=-1)
    cum = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cum < typical_p[:, None]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last_ind[:, None])
    remove_sorted[:, 0] = False  # min_tokens_to_keep = 1
    remove = remove_sorted.scatter(1, order, remove_sorted)
    remove &= (typical_p < 1.0)[:, None]
    return logits.masked_fill(remove, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, bias: SparseLogitsUpdate) -> torch.Tensor:
    """Add each (row, token) pair's bias to its logit."""
    return logits.index_put((bias.rows, bias.token_ids), bias.values, accumulate=True)


def apply_banned_tokens(logits: torch.Tensor, banned: SparseLogitsUpdate) -> torch.Tensor:
    """Set the logit of each banned (row, token) pair to -inf."""
    return logits.index_put((banned.rows, banned.token_ids), torch.tensor(float("-inf"), device=logits.device))


def apply_allowed_tokens(logits: torch.Tensor, disallowed: torch.Tensor) -> torch.Tensor:
    """disallowed: [num_rows, vocab_size] bool, True for tokens a row may not sample (all False: no limit)."""
    return logits.masked_fill(disallowed, float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Keep only the tokens whose bit is set: bitmask [num_rows, ceil(vocab / 32)] int32, bit t of
    word t // 32 (least significant first) allows token t (llguidance's / xgrammar's layout)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :logits.shape[-1]]  # [rows, vocab]
    return logits.masked_fill(~allowed, float("-inf"))
