"""Per-row sampling settings of one step, as tensors (one row per request that samples)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loomlm.engine.request import Request


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_rows] float32; 1.0 where the row is greedy (never divides by 0)
    is_greedy: torch.Tensor  # [num_rows] bool
    top_k: torch.Tensor | None  # [num_rows] int64, vocab_size where disabled; None when no row uses it
    top_p: torch.Tensor | None  # [num_rows] float32, 1.0 where disabled; None when no row uses it
    min_p: torch.Tensor | None  # [num_rows] float32, 0.0 where disabled; None when no row uses it
    generators: dict[int, torch.Generator]  # row -> the request's own seeded generator
    all_greedy: bool

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int, device: torch.device) -> SamplingMetadata:
        params = [r.sampling_params for r in requests]
        greedy = [p.is_greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_ks = [vocab_size if (p.top_k < 1 or g) else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
        top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device) if any(k < vocab_size for k in top_ks) else None,
            top_p=torch.tensor(top_ps, dtype=torch.float32, device=device) if any(p < 1.0 for p in top_ps) else None,
            min_p=torch.tensor(min_ps, dtype=torch.float32, device=device) if any(p > 0.0 for p in min_ps) else None,
            generators={i: r.generator for i, r in enumerate(requests) if r.generator is not None},
            all_greedy=all(greedy),
        )
