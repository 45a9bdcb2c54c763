"""Beam search parameters and results, with vLLM's names and semantics.

Source: vLLM `vllm/beam_search.py` and `LLM.beam_search` (v0.6-0.8): every step
each live beam proposes its top 2 * beam_width next tokens; candidates ending in
EOS (unless ignore_eos) join the completed list, the others are ranked by
`cum_logprob / len(tokens) ** length_penalty` (`tokens` includes the prompt; a
final EOS is not counted) and the best beam_width live on. After max_tokens
steps the completed and live beams are ranked together and the best
beam_width returned. There is no early stopping. See
../shared/specs/vllm-openai.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loomlm.outputs import Logprob


@dataclass(frozen=True)
class BeamSearchParams:
    """How to beam-search one prompt.

    Attributes:
        beam_width: beams kept per step, and sequences returned (>= 1).
        max_tokens: generated tokens per beam (>= 1), capped by the context window.
        ignore_eos: keep beams going past EOS (then every beam runs max_tokens).
        temperature: 0 ranks by the model's logprobs only; above 0 the token sampled at that
            temperature joins each beam's candidates, as in vLLM.
        length_penalty: exponent of the length normalisation of the beam score.
        include_stop_str_in_output: accepted for vLLM compatibility (beam search has no stop strings).

    Raises ValueError for out-of-range values.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")


@dataclass
class BeamSearchSequence:
    """One returned beam. `tokens` and `text` include the prompt (vLLM); `logprobs` has one
    {token_id: Logprob} per generated token (the candidates of that step)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended with EOS) or "length"


@dataclass
class BeamSearchOutput:
    """The beam_width best sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(tokens: list[int], cumulative_logprob: float, eos_token_id: int | None,
                          length_penalty: float = 1.0) -> float:
    """cum_logprob / len ** length_penalty; len counts the prompt and not a final EOS (vLLM's definition)."""
    seq_len = len(tokens)
    if eos_token_id is not None and tokens[-1] == eos_token_id:
        seq_len -= 1
    return cumulative_logprob / (seq_len ** length_penalty)
