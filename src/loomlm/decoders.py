"""LMQL's decoders as loomlm requests: `argmax`, `sample`, `beam` / `beam_search`, `beam_sample`.

Source: LMQL's decoder names and defaults (`lmql.runtime.decoders`: `argmax(n=1)`,
`sample(n=1, temperature=1)`, `beam(n=4)`, `beam_sample(n=4, temperature=1)`);
../shared/specs/lmql-generations.md. A `Decoder` is validated once and then
translated, for a local engine, into `SamplingParams` or `BeamSearchParams`, and for
a loomlm server into the body fields of `POST /v1/completions` (vLLM's names; beam
search is `use_beam_search` with `n` beams). Both translations give the same request
to the engine, so a local and a remote handle decode alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from loomlm.beam_search import BeamSearchParams
from loomlm.sampling_params import SamplingParams, StructuredOutputsParams

_PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")
_SAMPLE_ARGUMENTS = ("n", "temperature", "seed", "top_k", "top_p", *_PENALTIES)
# Keyword arguments each decoder accepts (besides max_tokens). Filters that do not act
# on a decoder (top_k on argmax, a temperature on argmax) are rejected, not ignored.
_ACCEPTED: dict[str, tuple[str, ...]] = {
    "argmax": ("n", *_PENALTIES),
    "sample": _SAMPLE_ARGUMENTS,
    "beam": ("n",),
    "beam_sample": ("n", "temperature"),
}
_ALIASES = {"beam_search": "beam"}
_DEFAULT_N = {"argmax": 1, "sample": 1, "beam": 4, "beam_sample": 4}
DECODER_NAMES = ("argmax", "sample", "beam", "beam_search", "beam_sample")


@dataclass(frozen=True)
class Decoder:
    """One validated decoding request.

    Attributes:
        name: "argmax", "sample", "beam" (also for "beam_search") or "beam_sample".
        n: completions returned (beams kept, for the beam decoders).
        max_tokens: generated tokens per completion; None = until end-of-sequence or the
            context window (beam search has no early stop: it then runs to the window).
        temperature: 0 for argmax and beam; the sampling temperature otherwise.
        seed: sample only; the same seed gives the same completions.
        top_k, top_p: sample only (-1 / 1.0 disable them).
        repetition_penalty, frequency_penalty, presence_penalty: argmax and sample only.
        stop: strings ending a completion (used by query holes; not an LMQL decoder argument).
        include_stop_str: keep the matched stop string at the end of the completion (LMQL's
            STOPS_AT; STOPS_BEFORE drops it).
        structured_outputs: a constraint on the output (used by query holes).
    """

    name: str
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 0.0
    seed: int | None = None
    top_k: int = -1
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    include_stop_str: bool = False
    structured_outputs: StructuredOutputsParams | None = None

    @classmethod
    def from_kwargs(cls, decoder: str, max_tokens: int | None, **kwargs: Any) -> Decoder:
        """The decoder `decoder` with LMQL's defaults and `kwargs` applied.

        Raises ValueError: an unknown decoder, a keyword the decoder does not take, or a value
        out of range (n < 1, max_tokens < 1, negative temperature, ...).
        """
        if not isinstance(decoder, str) or _ALIASES.get(decoder, decoder) not in _ACCEPTED:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {', '.join(DECODER_NAMES)}.")
        name = _ALIASES.get(decoder, decoder)
        unknown = sorted(set(kwargs) - set(_ACCEPTED[name]))
        if unknown:
            raise ValueError(f"decoder {decoder!r} does not take {', '.join(unknown)}; "
                             f"it takes max_tokens, {', '.join(_ACCEPTED[name])}.")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}.")
        n = kwargs.pop("n", _DEFAULT_N[name])
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}.")
        temperature = kwargs.pop("temperature", 1.0 if name in ("sample", "beam_sample") else 0.0)
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a non-negative number, got {temperature!r}.")
        result = cls(name, n=n, max_tokens=max_tokens, temperature=float(temperature), **kwargs)
        result.sampling_params()  # the engine's own checks (top_p in (0, 1], penalties' ranges, ...)
        return result

    @property
    def is_beam(self) -> bool:
        return self.name in ("beam", "beam_sample")

    def with_constraints(self, stop: tuple[str, ...] = (), include_stop_str: bool = False,
                         structured_outputs: StructuredOutputsParams | None = None,
                         max_tokens: int | None = None) -> Decoder:
        """This decoder with a query hole's constraints added (argmax and sample only): `max_tokens`
        lowers the decoder's own limit, never raises it."""
        if self.is_beam:
            raise ValueError(f"decoder {self.name!r} cannot apply a query's constraints; use argmax or sample.")
        limits = [m for m in (self.max_tokens, max_tokens) if m is not None]
        return replace(self, stop=self.stop + tuple(stop), include_stop_str=include_stop_str,
                       structured_outputs=structured_outputs, max_tokens=min(limits) if limits else None)

    def sampling_params(self) -> SamplingParams:
        """The engine request of argmax / sample (ValueError for out-of-range values)."""
        return SamplingParams(**self._sample_fields(), stop=list(self.stop),
                              include_stop_str_in_output=self.include_stop_str,
                              structured_outputs=self.structured_outputs)

    def _sample_fields(self) -> dict[str, Any]:
        """max_tokens and sample's arguments, named alike in SamplingParams and the completions body."""
        return {name: getattr(self, name) for name in ("max_tokens", *_SAMPLE_ARGUMENTS)}

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        """The engine request of beam / beam_sample; `max_tokens` is the budget when `self.max_tokens` is None."""
        return BeamSearchParams(beam_width=self.n, max_tokens=self.max_tokens or max_tokens,
                                temperature=self.temperature)

    def completion_fields(self) -> dict[str, Any]:
        """The same request as `POST /v1/completions` body fields (vLLM's extras for beam search,
        top_k and repetition_penalty; `max_tokens: null` = up to the context window)."""
        if self.is_beam:
            return {"n": self.n, "max_tokens": self.max_tokens, "temperature": self.temperature, "use_beam_search": True}
        fields = self._sample_fields()
        if self.stop:
            fields.update(stop=list(self.stop), include_stop_str_in_output=self.include_stop_str)
        so = self.structured_outputs
        if so is not None:
            if so.choice is not None:
                fields["guided_choice"] = list(so.choice)
            elif so.regex is not None:
                fields["guided_regex"] = so.regex
            else:
                raise ValueError("only choice and regex constraints go over HTTP.")
        return fields
