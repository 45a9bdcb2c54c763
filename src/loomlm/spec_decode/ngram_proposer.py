"""Prompt lookup decoding (Saxena 2023; vLLM's `ngram` method): propose what followed the context's
last n-gram where it occurred before.

Follows vLLM v1's `NgramProposer` (`vllm/v1/spec_decode/ngram_proposer.py`): the longest n in
[prompt_lookup_min, prompt_lookup_max] whose last-n-token suffix occurs earlier in the context
wins, its earliest occurrence is used, and up to k tokens that followed it are proposed (fewer
where the context ends sooner, none past max_model_len). Vectorised over the context with numpy
in place of vLLM's numba KMP.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(token_ids: list[int] | np.ndarray, min_n: int, max_n: int, k: int, max_model_len: int) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the context's longest matching
    suffix n-gram (min_n <= n <= max_n); [] when none matches. The match must end before the
    context's last token (at least one token follows it)."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    total = tokens.shape[0]
    k = min(k, max_model_len - total)
    if k <= 0 or total < min_n + 1:
        return []
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        # windows[j] = tokens[j:j + n] for every start j whose window ends before the last token
        windows = sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return tokens[start:start + k].tolist()
    return []


class NgramProposer:
    """vLLM's `ngram` method: proposals from the request's own context (prompt + output)."""

    def __init__(self, min_n: int, max_n: int, max_model_len: int) -> None:
        self.min_n, self.max_n, self.max_model_len = min_n, max_n, max_model_len

    def propose(self, requests: list, num_tokens: list[int]) -> list[list[int]]:
        """requests: decoding requests; num_tokens[i]: the most tokens to propose for requests[i].
        Returns each request's proposals (possibly none)."""
        return [propose_ngram(r.all_token_ids, self.min_n, self.max_n, k, self.max_model_len) if k > 0 else []
                for r, k in zip(requests, num_tokens)]
