"""Batched token sampling: temperature, min-p, top-k, top-p, then a seeded draw.

Filters follow vLLM's sampler (`vllm/v1/sample/`): min-p (Nguyen et al. 2024)
keeps tokens with p >= min_p * p_max; top-k and top-p (Holtzman et al. 2019,
nucleus sampling) act on one descending sort. The draw uses the exponential
race (argmax p_i / E_i with E_i ~ Exp(1)), which samples exactly from p and
lets each seeded row draw its noise from its own generator, so a seeded
request gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from loomlm.engine.sampling_metadata import SamplingMetadata


class Sampler:
    """Samples one token per row from float32 logits under per-row settings (see the module docstring)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator  # draws the noise of unseeded rows

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """logits: [num_rows, vocab_size] float32 -> sampled token ids [num_rows] int64."""
        greedy_ids = logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy_ids
        logits = logits / meta.temperature[:, None]
        if meta.min_p is not None:
            probs = logits.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * meta.min_p[:, None]
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, gen in meta.generators.items():
            noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(meta.is_greedy, greedy_ids, sampled)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus.

    logits: [num_rows, vocab_size]; top_k: [num_rows] (vocab_size = off); top_p: [num_rows] (1.0 = off).
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        remove |= ranks >= top_k[:, None]
    if top_p is not None:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        remove |= cum_before >= top_p[:, None]  # the top token always survives (cum_before = 0)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
