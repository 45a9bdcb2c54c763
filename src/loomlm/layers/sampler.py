"""Batched token sampling: logits processors, temperature, min-p, typical-p, top-k, top-p, then a seeded draw.

Order as vLLM v1's sampler (`vllm/v1/sample/sampler.py`): logprobs are taken
from the raw logits (vLLM's default `raw_logprobs`); then allowed tokens, bans
(bad words, stop tokens before min_tokens), logit bias, penalties and the
watermark change the logits; greedy rows take the argmax of the processed
logits; the others apply temperature, min-p (Nguyen et al. 2024: keep
p >= min_p * p_max), typical-p, and top-k / top-p (Holtzman et al. 2019) on one
descending sort. The draw uses the exponential race (argmax p_i / E_i with
E_i ~ Exp(1)), which samples exactly from p and lets each seeded row draw its
noise from its own generator, so a seeded request gets the same tokens
whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loomlm.engine.sampling_metadata import SamplingMetadata
from loomlm.layers import logits_processors as lp
from loomlm.layers.fused_ops import TORCH_FUSED_OPS, TorchFusedOps


@dataclass
class LogprobsTensors:
    """Logprobs of chosen tokens and their top alternatives (vLLM v1's LogprobsTensors).

    Column 0 is the chosen (sampled, or prompt) token; columns 1.. the top-k, most likely first.
    """

    logprob_token_ids: torch.Tensor  # [num_rows, 1 + k] int64
    logprobs: torch.Tensor  # [num_rows, 1 + k] float32, natural log
    selected_token_ranks: torch.Tensor  # [num_rows] int64, rank of column 0 (1 = most likely)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_rows] int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """logprobs: [num_rows, vocab] (log_softmax), token_ids: [num_rows] -> the chosen tokens' logprobs and ranks
    plus the top `num_logprobs` alternatives of each row."""
    chosen = logprobs.gather(-1, token_ids[:, None])  # [num_rows, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    ids, values = token_ids[:, None], chosen
    if num_logprobs:
        top_values, top_ids = logprobs.topk(num_logprobs, dim=-1)
        ids, values = torch.cat([ids, top_ids], dim=1), torch.cat([values, top_values], dim=1)
    return LogprobsTensors(ids, values, ranks)


class Sampler:
    """Samples one token per row from float32 logits under per-row settings (see the module docstring)."""

    def __init__(self, generator: torch.Generator | None = None, ops: TorchFusedOps = TORCH_FUSED_OPS) -> None:
        self.generator = generator  # draws the noise of unseeded rows
        self.ops = ops  # argmax_rows: the native kernel's on the CPU in float32 (ATen's is a scalar loop)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [num_rows, vocab_size] float32 -> sampled token ids [num_rows] int64 (+ logprobs if asked)."""
        logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        logits = self.process_logits(logits, meta)
        sampled, final_logits = self.sample(logits, meta)
        if logprobs is None:
            return SamplerOutput(sampled, None)
        rows = meta.processed_logprobs_rows
        if rows is not None:  # these report the distribution they were sampled from (vLLM's processed_logprobs)
            logprobs[rows] = final_logits[rows].log_softmax(dim=-1)
        return SamplerOutput(sampled, gather_logprobs(logprobs, meta.max_num_logprobs, sampled))

    @staticmethod
    def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The distribution-changing processors, applied to greedy and sampled rows alike."""
        if meta.grammar_bitmask is not None:
            logits = lp.apply_token_bitmask(logits, meta.grammar_bitmask)
        if meta.disallowed_tokens is not None:
            logits = lp.apply_allowed_tokens(logits, meta.disallowed_tokens)
        if meta.banned_tokens is not None:
            logits = lp.apply_banned_tokens(logits, meta.banned_tokens)
        if meta.logit_bias is not None:
            logits = lp.apply_logit_bias(logits, meta.logit_bias)
        if meta.output_token_ids is not None:
            logits = lp.apply_penalties(logits, meta.prompt_token_ids, meta.output_token_ids, meta.presence_penalties,
                                        meta.frequency_penalties, meta.repetition_penalties)
        if meta.watermarks:
            from loomlm.watermark import apply_watermark

            for w in meta.watermarks:
                logits = apply_watermark(logits, w.prev_token_ids, w.gamma, w.delta, w.hash_key)
        return logits

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Processed logits [num_rows, vocab_size] -> (token ids [num_rows], the logits drawn from
        [num_rows, vocab_size]): argmax for greedy rows, else a draw after temperature, min-p,
        typical-p and top-k / top-p (identities on greedy rows, whose settings are neutral)."""
        greedy_ids = self.ops.argmax_rows(logits)
        if meta.all_greedy:
            return greedy_ids, logits
        logits = logits / meta.temperature[:, None]
        if meta.min_p is not None:
            logits = lp.apply_min_p(logits, meta.min_p)
        if meta.typical_p is not None:
            logits = lp.apply_typical_p(logits, meta.typical_p)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, gen in meta.generators.items():
            noise[row].exponential_(generator=gen)
        sampled = self.ops.argmax_rows(probs / noise)
        return torch.where(meta.is_greedy, greedy_ids, sampled), logits


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
