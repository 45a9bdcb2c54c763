"""What speculative decoding keeps per request (`Request.spec_state`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeState:
    """One request's proposal history and, with a draft model, the draft's K/V counter.

    accepted / rejected: decayed counts of its proposals accepted and of verifications that
    rejected one (each verification rejects at most one: acceptance stops there), so
    accepted / (accepted + rejected) estimates the chance that a proposal is accepted given the
    ones before it were. pause: steps left without proposals; backoff: the next pause's length;
    probe: the next step after the pause proposes once, whatever the estimate.
    num_draft_computed_tokens: the draft model's K/V is valid for this many of the request's
    tokens (0 after a preemption frees its blocks); draft_base / draft_fed: at its last proposal
    the request had draft_base tokens and the draft fed draft_fed (its proposals) after them.
    """

    accepted: float = 0.0
    rejected: float = 0.0
    pause: int = 0
    backoff: int = 1
    probe: bool = False
    num_draft_computed_tokens: int = 0
    draft_base: int = 0
    draft_fed: list[int] = field(default_factory=list)

    def draft_valid_tokens(self, token_ids: list[int]) -> int:
        """Tokens of `token_ids` whose draft K/V still hold: those before the first fed proposal
        the request did not take."""
        same = 0
        while same < len(self.draft_fed) and self.draft_base + same < len(token_ids) and \
                token_ids[self.draft_base + same] == self.draft_fed[same]:
            same += 1
        return min(self.num_draft_computed_tokens, self.draft_base + same)
