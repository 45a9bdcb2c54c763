"""One prompt's beam search inside the engine, its beams sharing KV blocks.

The live beams are ordinary engine `Request`s that ask for the top
2 * beam_width logprobs of their next token. The prompt is prefilled once, by
the first beam; when a beam is chosen k > 1 times, k - 1 forks of it are made
with `Scheduler.fork`, which shares its block table through the block
manager's reference counts; the first write into a shared block copies it
(copy-on-write, `BlockManager.copy_on_write`). Beams that are not chosen are
finished, which drops their references.

A round needs the candidates of every live beam (a beam preempted and
recomputing arrives later: the others wait, the scheduler skipping requests
with nothing to compute). Ranking follows vLLM (`loomlm.beam_search`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loomlm.beam_search import BeamSearchParams, BeamSearchSequence, get_beam_search_score
from loomlm.engine.model_runner import PositionLogprobs
from loomlm.engine.request import Request, RequestStatus
from loomlm.engine.scheduler import Scheduler
from loomlm.outputs import Logprob


@dataclass
class _Candidate:
    beam: Request  # the beam it extends
    token_id: int
    cum_logprob: float
    step_logprobs: dict[int, Logprob]  # the candidates of that beam's step

    @property
    def tokens(self) -> list[int]:
        return self.beam.all_token_ids + [self.token_id]


class BeamSearchGroup:
    """The live beams, the completed hypotheses and the round counter of one beam search."""

    def __init__(self, request_id: str, root: Request, params: BeamSearchParams, eos_token_id: int | None,
                 max_tokens: int) -> None:
        self.request_id = request_id
        self.params = params
        self.eos_token_id = eos_token_id
        self.max_tokens = max_tokens  # rounds: params.max_tokens capped by the context window
        self.beams: list[Request] = [root]
        self.pending: dict[str, PositionLogprobs] = {}  # this round's candidates, per live beam
        self.completed: list[BeamSearchSequence] = []
        self.num_steps = 0
        self._num_forks = 0

    def add_candidates(self, beam_id: str, entry: PositionLogprobs) -> None:
        """Record a live beam's top-2k next tokens for this round."""
        self.pending[beam_id] = entry  # a recomputed beam reports the same candidates again

    @property
    def is_ready(self) -> bool:
        """Every live beam has proposed its candidates for this round."""
        return all(b.request_id in self.pending for b in self.beams)

    def _score(self, tokens: list[int], cum_logprob: float) -> float:
        return get_beam_search_score(tokens, cum_logprob, self.eos_token_id, self.params.length_penalty)

    def advance(self, scheduler: Scheduler,
                logprob_dict: Callable[[PositionLogprobs, int], dict[int, Logprob]]) -> list[BeamSearchSequence] | None:
        """Run one round: rank the candidates, extend / fork / drop beams.

        Returns the best beam_width sequences (text not filled) once the search is over, else None.
        """
        width = self.params.beam_width
        live: list[_Candidate] = []
        for beam in self.beams:
            step = logprob_dict(self.pending.pop(beam.request_id), 2 * width)
            for token_id, lp in step.items():
                cand = _Candidate(beam, token_id, beam.cumulative_logprob + lp.logprob, step)
                if token_id == self.eos_token_id and not self.params.ignore_eos:
                    self.completed.append(self._sequence(cand, "stop"))
                else:
                    live.append(cand)
        live.sort(key=lambda c: self._score(c.tokens, c.cum_logprob), reverse=True)  # stable, as vLLM's
        chosen = live[:width]
        self.num_steps += 1
        if self.num_steps >= self.max_tokens or not chosen:
            self.completed.extend(self._sequence(c, "length") for c in chosen)
            for beam in self.beams:
                scheduler.finish(beam, RequestStatus.FINISHED_LENGTH)
            self.beams = []
            return sorted(self.completed, key=lambda s: self._score(s.tokens, s.cum_logprob), reverse=True)[:width]

        # Fork before extending: a fork copies its parent as it was before this round's token.
        taken: set[str] = set()
        new_beams: list[Request] = []
        for cand in chosen:
            parent = cand.beam
            if parent.request_id in taken:
                self._num_forks += 1
                new_beams.append(scheduler.fork(parent, f"{self.request_id}-beam{self._num_forks}"))
            else:
                taken.add(parent.request_id)
                new_beams.append(parent)  # the first child continues in the parent itself
        for beam in self.beams:
            if beam.request_id not in taken:
                scheduler.finish(beam, RequestStatus.FINISHED_ABORTED)
        for cand, beam in zip(chosen, new_beams):
            beam.append_output_token(cand.token_id)
            beam.cumulative_logprob = cand.cum_logprob
            beam.logprobs.append(cand.step_logprobs)
        self.beams = new_beams
        return None

    def _sequence(self, cand: _Candidate, finish_reason: str) -> BeamSearchSequence:
        return BeamSearchSequence(tokens=cand.tokens, logprobs=list(cand.beam.logprobs) + [cand.step_logprobs],
                                  cum_logprob=cand.cum_logprob, finish_reason=finish_reason)

    def abort(self, scheduler: Scheduler) -> None:
        """Finish every live beam (their blocks are freed); the search ends without a result."""
        for beam in self.beams:
            scheduler.abort(beam)
        self.beams = []
