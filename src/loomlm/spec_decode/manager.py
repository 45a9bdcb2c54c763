"""The engine's side of speculative decoding: who proposes, how much, and what was accepted.

Per step, after the scheduler has taken the sampled tokens (`LLMEngine.step`):
- `record` counts each verified request's proposed and accepted tokens (vLLM's spec-decode
  metrics), updates the request's acceptance estimate, and feeds the step's time and token
  count to the step cost model;
- `propose` sets `Request.spec_token_ids` for the requests that just took tokens and decode
  next: no more than fit under max_tokens (the step's own token comes on top) and the context
  window, cut where a constrained request's grammar would reject one; none while more than
  `disable_by_batch_size` requests are unfinished.

How many (at most k): a step costs about a + b * tokens seconds (`StepCostModel`, fitted on the
engine's own steps), so at B decoding requests a token costs a / B + b and a proposal b. Under
the geometric model of acceptance (a proposal is accepted with probability alpha given that the
ones before it were; Leviathan et al. 2023, section 3.1), proposal i pays when
alpha^i * (a / B + b) > b, i.e. alpha^i > B / (r + B) with r = a / b. One stream on this CPU
(r ~ 8) speculates from alpha ~ 0.1; 32 streams only from alpha ~ 0.8. A request whose estimate
allows no proposal pauses (1, 2, 4 ... 64 steps), then probes with one proposal, so speculation
that does not pay costs little, and comes back when it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loomlm.config import SpeculativeConfig
from loomlm.spec_decode.state import SpecDecodeState

REQUEST_DECAY = 0.9  # weight of a request's older verifications, per verification
ENGINE_DECAY = 0.99  # the same for the engine-wide estimate (a new request's prior)
PRIOR_WEIGHT = 2.0  # verifications' worth of the engine-wide estimate in a request's own
MAX_PAUSE_STEPS = 64
DEFAULT_OVERHEAD_TOKENS = 8.0  # r = a / b until the cost model has seen steps of different sizes


@dataclass
class SpecDecodingStats:
    """Counters since start (vLLM's `spec_decode_num_drafts`, `..._num_draft_tokens`,
    `..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos`)."""

    num_drafts: int = 0  # verifications (requests x steps with proposals)
    num_draft_tokens: int = 0  # proposed tokens verified
    num_accepted_tokens: int = 0  # of those, accepted
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [k]: accepted at position i

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class StepCostModel:
    """Least-squares fit of a step's seconds = a + b * tokens, recent steps weighted most
    (each older step's weight multiplied by `decay`)."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self._sums = [0.0] * 5  # weighted: 1, n, n^2, t, n t

    def add(self, num_tokens: int, seconds: float) -> None:
        n, t = float(num_tokens), seconds
        self._sums = [s * self.decay + x for s, x in zip(self._sums, (1.0, n, n * n, t, n * t))]

    def overhead_tokens(self) -> float:
        """r = a / b: the fixed cost of a step in tokens' worth (DEFAULT_OVERHEAD_TOKENS until
        the fit is determined and both terms are positive)."""
        w, n, nn, t, nt = self._sums
        det = w * nn - n * n
        if w < 3 or det <= 1e-9 * max(w * nn, 1e-12):
            return DEFAULT_OVERHEAD_TOKENS
        b = (w * nt - n * t) / det
        a = (t - b * n) / w
        if a <= 0 or b <= 0:
            return DEFAULT_OVERHEAD_TOKENS
        return min(a / b, 1e4)


class SpecDecodeManager:
    """Proposals and their bookkeeping for one engine (module docstring).

    proposer: `NgramProposer` or `DraftModelProposer` (`propose(requests, num_tokens)`);
    max_model_len: the context window proposals stay within (a draft model's may be shorter).
    """

    def __init__(self, config: SpeculativeConfig, proposer, max_model_len: int) -> None:
        self.config = config
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.stats = SpecDecodingStats(num_accepted_tokens_per_pos=[0] * config.num_speculative_tokens)
        self.cost = StepCostModel()
        self._accepted = self._rejected = 0.0  # engine-wide decayed counts

    def record(self, scheduler_output, sampled_token_ids: dict[str, list[int]], step_seconds: float) -> None:
        """Count this step's verifications (each scheduled request with proposals took
        len(tokens) - 1 of them) and its cost (`step_seconds` for its scheduled tokens)."""
        self.cost.add(scheduler_output.total_num_scheduled_tokens, step_seconds)
        stats = self.stats
        for item in scheduler_output.scheduled:
            proposed = len(item.spec_token_ids)
            tokens = sampled_token_ids.get(item.request.request_id)
            if not proposed or tokens is None:
                continue
            accepted = len(tokens) - 1
            stats.num_drafts += 1
            stats.num_draft_tokens += proposed
            stats.num_accepted_tokens += accepted
            for i in range(accepted):
                stats.num_accepted_tokens_per_pos[i] += 1
            rejected = float(accepted < proposed)
            state = item.request.spec_state
            state.accepted = state.accepted * REQUEST_DECAY + accepted
            state.rejected = state.rejected * REQUEST_DECAY + rejected
            self._accepted = self._accepted * ENGINE_DECAY + accepted
            self._rejected = self._rejected * ENGINE_DECAY + rejected

    def acceptance(self, state: SpecDecodeState) -> float:
        """alpha: the chance that a request's next proposal is accepted given the ones before it
        were (its own counts, with the engine-wide estimate as a prior)."""
        prior = (self._accepted + 1.0) / (self._accepted + self._rejected + 1.0)
        return (state.accepted + PRIOR_WEIGHT * prior) / (state.accepted + state.rejected + PRIOR_WEIGHT)

    def worth_proposing(self, alpha: float, batch_size: int) -> int:
        """How many proposals pay at acceptance `alpha` with `batch_size` decoding requests
        (module docstring): the i <= k with alpha^i > B / (r + B)."""
        threshold = batch_size / (self.cost.overhead_tokens() + batch_size)
        worth = 0
        while worth < self.config.num_speculative_tokens and alpha ** (worth + 1) > threshold:
            worth += 1
        return worth

    def propose(self, requests: list, num_unfinished: int, batch_size: int) -> None:
        """Set the proposals of `requests` (those that took tokens this step and are unfinished);
        clears them where none are due. `num_unfinished`: the engine's unfinished requests;
        `batch_size`: its running ones."""
        for r in requests:
            r.spec_token_ids = []
        cap = self.config.disable_by_batch_size
        if cap is not None and num_unfinished > cap:
            return
        due, budgets = [], []
        for r in requests:
            if r.spec_state is None:
                r.spec_state = SpecDecodeState()
            state = r.spec_state
            if state.pause > 0:
                state.pause -= 1
                continue
            worth = self.worth_proposing(self.acceptance(state), max(batch_size, 1))
            if worth > 0:
                state.backoff, state.probe = 1, False
            elif state.probe:  # a pause just ended: one proposal probes whether speculation pays now
                worth, state.probe = 1, False
            else:
                state.pause, state.backoff, state.probe = state.backoff, min(2 * state.backoff, MAX_PAUSE_STEPS), True
                continue
            # Past max_tokens nothing is kept (the step's own token comes on top of the proposals).
            budget = min(worth, r.max_tokens - r.num_output_tokens - 1, self.max_model_len - r.num_tokens)
            if budget > 0 and r.num_tokens - r.num_computed_tokens == 1:
                due.append(r)
                budgets.append(budget)
        if not due:
            return
        for r, proposals in zip(due, self.proposer.propose(due, budgets)):
            grammar = r.structured_output
            if grammar is not None and proposals:
                proposals = proposals[:grammar.valid_prefix(proposals)]
            r.spec_token_ids = proposals
