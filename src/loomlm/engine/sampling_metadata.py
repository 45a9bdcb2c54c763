"""Per-row sampling settings of one step, as tensors (one row per request that samples).

Built once per step from the sampling requests; every optional field is None
when no row uses it, so the sampler skips that processor entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loomlm.engine.request import Request
from loomlm.layers.logits_processors import SparseLogitsUpdate


@dataclass
class WatermarkBatch:
    """Rows to watermark with one hash key (rows without a watermark have delta 0)."""

    prev_token_ids: torch.Tensor  # [num_rows] int64: the token each row's green list is seeded by
    gamma: torch.Tensor  # [num_rows] float64
    delta: torch.Tensor  # [num_rows] float32
    hash_key: int


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_rows] float32; 1.0 where the row is greedy (never divides by 0)
    is_greedy: torch.Tensor  # [num_rows] bool
    top_k: torch.Tensor | None  # [num_rows] int64, vocab_size where disabled
    top_p: torch.Tensor | None  # [num_rows] float32, 1.0 where disabled
    min_p: torch.Tensor | None  # [num_rows] float32, 0.0 where disabled
    generators: dict[int, torch.Generator]  # row -> the request's own seeded generator
    all_greedy: bool
    typical_p: torch.Tensor | None = None  # [num_rows] float32, 1.0 where disabled
    # Penalties: output_token_ids is set when any row has one; prompt_token_ids only with a repetition penalty.
    output_token_ids: torch.Tensor | None = None  # [num_rows, max_output_len] int64, padded with vocab_size
    prompt_token_ids: torch.Tensor | None = None  # [num_rows, max_prompt_len] int64, padded with vocab_size
    presence_penalties: torch.Tensor | None = None  # [num_rows] float32
    frequency_penalties: torch.Tensor | None = None  # [num_rows] float32
    repetition_penalties: torch.Tensor | None = None  # [num_rows] float32
    logit_bias: SparseLogitsUpdate | None = None
    banned_tokens: SparseLogitsUpdate | None = None  # bad words, and stop tokens before min_tokens
    disallowed_tokens: torch.Tensor | None = None  # [num_rows, vocab_size] bool (allowed_token_ids)
    watermarks: list[WatermarkBatch] = field(default_factory=list)  # one per distinct hash key
    max_num_logprobs: int | None = None  # most alternatives any row wants; None: no row needs logprobs
    processed_logprobs_rows: torch.Tensor | None = None  # [k] int64: rows reporting processed_logprobs
    grammar_bitmask: torch.Tensor | None = None  # [num_rows, ceil(vocab / 32)] int32; -1 rows: unconstrained

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int, device: torch.device,
                      pending: list[list[int]] | None = None) -> SamplingMetadata:
        """One row per entry of `requests` (a request may fill several rows).

        pending[i]: tokens row i takes as already generated after its request's tokens (the
        speculative proposals before that row's position; None: none anywhere), so penalties,
        min_tokens, bad words and the watermark see the history that row's token would follow.
        """
        pending = pending or [[] for _ in requests]
        params = [r.sampling_params for r in requests]
        greedy = [p.is_greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_ks = [vocab_size if (p.top_k < 1 or g) else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
        top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        typical_ps = [1.0 if g else p.typical_p for p, g in zip(params, greedy)]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        meta = cls(
            temperature=floats(temps),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device) if any(k < vocab_size for k in top_ks) else None,
            top_p=floats(top_ps) if any(p < 1.0 for p in top_ps) else None,
            min_p=floats(min_ps) if any(p > 0.0 for p in min_ps) else None,
            generators={i: r.generator for i, r in enumerate(requests) if r.generator is not None},
            all_greedy=all(greedy),
            typical_p=floats(typical_ps) if any(p < 1.0 for p in typical_ps) else None,
        )
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
            meta.output_token_ids = _padded([r.output_token_ids + p for r, p in zip(requests, pending)],
                                            vocab_size, device)
            meta.presence_penalties = floats([p.presence_penalty for p in params])
            meta.frequency_penalties = floats([p.frequency_penalty for p in params])
            meta.repetition_penalties = floats([p.repetition_penalty for p in params])
            if any(p.repetition_penalty != 1.0 for p in params):
                meta.prompt_token_ids = _padded([r.prompt_token_ids for r in requests], vocab_size, device)
        if any(p.logit_bias for p in params):
            pairs = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
            meta.logit_bias = _sparse(pairs, device)
        banned = [(i, t, 0.0) for i, (r, p) in enumerate(zip(requests, pending)) for t in _banned_tokens(r, p)]
        if banned:
            meta.banned_tokens = _sparse(banned, device)
        if any(p.allowed_token_ids is not None for p in params):
            disallowed = torch.zeros(len(requests), vocab_size, dtype=torch.bool, device=device)
            for i, p in enumerate(params):
                if p.allowed_token_ids is not None:
                    disallowed[i] = True
                    disallowed[i, p.allowed_token_ids] = False
            meta.disallowed_tokens = disallowed
        marked = [(i, p.watermark) for i, p in enumerate(params) if p.watermark is not None]
        prev_ids = None
        for hash_key in dict.fromkeys(w.hash_key for _, w in marked):  # usually one key: one batch
            if prev_ids is None:
                prev_ids = torch.tensor([(p or r.all_token_ids)[-1] for r, p in zip(requests, pending)],
                                        dtype=torch.int64, device=device)
            gamma, delta = [0.5] * len(params), [0.0] * len(params)  # delta 0: the row is left unchanged
            for i, w in marked:
                if w.hash_key == hash_key:
                    gamma[i], delta[i] = w.gamma, w.delta
            # gamma in float64: the green test then equals `watermark.detect`'s bit for bit.
            meta.watermarks.append(WatermarkBatch(prev_ids, torch.tensor(gamma, dtype=torch.float64, device=device),
                                                  floats(delta), hash_key))
        wanted = [r.sampling_params.logprobs or 0 for r in requests if r.needs_logprobs]
        meta.max_num_logprobs = max(wanted) if wanted else None
        processed = [i for i, r in enumerate(requests)
                     if r.needs_logprobs and r.sampling_params.logprobs_mode == "processed_logprobs"]
        if processed:
            meta.processed_logprobs_rows = torch.tensor(processed, dtype=torch.int64, device=device)
        return meta


def _banned_tokens(request: Request, pending: list[int]) -> list[int]:
    """Tokens this request may not sample next after `pending`: stop tokens before min_tokens, and
    the last token of each bad word whose other tokens were just generated (transformers'
    NoBadWordsLogitsProcessor, matched against prompt + output)."""
    params = request.sampling_params
    banned: list[int] = []
    if request.num_output_tokens + len(pending) < params.min_tokens:
        banned.extend(params.all_stop_token_ids)
    history = request.all_token_ids + pending if pending else request.all_token_ids
    for word in params.bad_words_token_ids:
        prefix = word[:-1]
        if not prefix or history[-len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device).view(len(rows), width)


def _sparse(pairs: list[tuple[int, int, float]], device: torch.device) -> SparseLogitsUpdate:
    rows, token_ids, values = zip(*pairs)
    return SparseLogitsUpdate(torch.tensor(rows, dtype=torch.int64, device=device),
                              torch.tensor(token_ids, dtype=torch.int64, device=device),
                              torch.tensor(values, dtype=torch.float32, device=device))
