"""A draft model proposes greedily (vLLM's `draft_model` method), with a KV cache of its own.

The draft runs in a second ModelRunner whose KV pool has as many blocks as the target's, so it
reads and writes a request's K/V at the target's block table and slot mapping: no block manager
of its own, and the prefix cache's shared blocks hold the draft's K/V of the same tokens (the
draft's K/V depends on the tokens only). The scheduler allocates `num_speculative_tokens`
lookahead slots past each request's tokens, where the draft writes its proposals' K/V.

Per request (`SpecDecodeState`) the draft tracks how many of its tokens have valid K/V: after a verification, those
up to the first proposal the target did not take (proposals it fed and the target accepted stay
valid, the rest are written over). Each engine step it catches up on the tokens it has not seen
(at first the whole prompt) in one pass, then runs k - 1 one-token passes, taking the argmax at
each: q is one-hot, so acceptance is exact by `rejection.py`'s argument.
"""

from __future__ import annotations

from loomlm.engine.block_manager import BlockManager
from loomlm.engine.model_runner import ModelRunner


class DraftModelProposer:
    """Greedy proposals from `runner` (the draft model) over the target's block tables."""

    def __init__(self, runner: ModelRunner, block_manager: BlockManager) -> None:
        self.runner = runner
        self.block_manager = block_manager

    def propose(self, requests: list, num_tokens: list[int]) -> list[list[int]]:
        """requests: decoding requests; num_tokens[i]: the most tokens to propose for requests[i]
        (at least 1), each with its `spec_state`. Returns each request's proposals (num_tokens[i]
        of them)."""
        states = [r.spec_state for r in requests]
        tables = [self.block_manager.block_table(r.request_id) for r in requests]
        runs = []
        for r, state, table in zip(requests, states, tables):
            # Re-feed at least the last token: its logits give the first proposal.
            start = min(state.draft_valid_tokens(r.all_token_ids), r.num_tokens - 1)
            runs.append((r.all_token_ids[start:], start, table))
        proposals = [[token] for token in self.runner.last_token_logits(runs).argmax(dim=-1).tolist()]
        for step in range(1, max(num_tokens, default=0)):
            live = [i for i, k in enumerate(num_tokens) if k > step]
            if not live:
                break
            runs = [([proposals[i][-1]], requests[i].num_tokens + step - 1, tables[i]) for i in live]
            for i, token in zip(live, self.runner.last_token_logits(runs).argmax(dim=-1).tolist()):
                proposals[i].append(token)
        for r, state, drafts in zip(requests, states, proposals):
            state.draft_base, state.draft_fed = r.num_tokens, drafts[:-1]
            state.num_draft_computed_tokens = r.num_tokens + len(drafts) - 1
        return proposals
