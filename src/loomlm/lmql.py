"""LMQL's Generations API under its own names: code written for `lmql` (0.7.3, `lmql.api`) runs on
loomlm's engine with `import loomlm.lmql as lmql`.

Source: eth-sri/lmql `src/lmql/api/llm.py` (`LLM`, `LLM.from_descriptor`, `generate`,
`generate_sync`, `score`, `score_sync`, `set_default_model`), `src/lmql/api/scoring.py`
(`ScoringResult`), `src/lmql/api/__init__.py` (the module functions, `LMQL_DEFAULT_MODEL`);
../shared/specs/lmql-generations.md. What follows lmql rather than loomlm's own API
(`loomlm.model`, `loomlm.generate`, `loomlm.ScoringResult`):

- signatures: `generate(prompt, max_tokens=None, model=None, **kwargs)` (positional model, the
  decoder as `decoder=` among the kwargs), `score(prompt, values, model=None, **kwargs)`;
  keyword arguments that mean nothing here (lmql's `chunksize`, `verbose`, `endpoint`,
  `inprocess`, ...) are ignored with a warning instead of raising.
- `model(...)` returns an `LLM` handle, loaded lazily on first use; given a handle, returns it.
- the default model: `set_default_model`, else `$LMQL_DEFAULT_MODEL`, else
  `$LOOMLM_DEFAULT_MODEL`, else loomlm's default model.
- `generate` returns the completion only, as lmql 0.7.3's code does (its docs say prompt +
  completion).
- `ScoringResult` aggregates over the whole sequence, prompt + value, as lmql's does (`seqs`,
  `token_scores` per sequence; "mean" and "normalized" divide by the sequence's length); the
  first prompt token has no context and scores 0. `str()` prints lmql's header and full-precision
  sums. (loomlm's own `ScoringResult` aggregates over the value's tokens only.)

Queries and output writers are loomlm's (`run`, `run_sync`, `printing`, `stream`, `headless`,
`silent`, `BaseOutputWriter`, see `loomlm.query`). `run` takes an LMQL program (a decoder clause
or a quoted prompt first) and hands it to the `lmql` package's compiler, on loomlm's engine
(`loomlm.query.lmql_program`; an ImportError says so when `lmql` is not installed), and loomlm's
template syntax otherwise; its errors say which reading was used.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from loomlm import generation
from loomlm import scoring as _scoring
from loomlm.query import BaseOutputWriter, headless, printing, run, run_sync, silent, stream

DEFAULT_MODEL_ENV = "LMQL_DEFAULT_MODEL"

# Keyword arguments of lmql's generate / score that loomlm's decoders take.
_DECODER_KWARGS = frozenset({"decoder", "n", "temperature", "seed", "top_k", "top_p", "repetition_penalty",
                             "frequency_penalty", "presence_penalty"})


def _engine_arg_names() -> frozenset[str]:
    """The engine arguments `model(...)` passes on for a local model (lmql's others are ignored)."""
    from loomlm.config import CacheConfig, KernelConfig, LoRAConfig, ModelConfig, SchedulerConfig

    return frozenset(f.name for cls in (ModelConfig, CacheConfig, SchedulerConfig, LoRAConfig, KernelConfig)
                     for f in dataclasses.fields(cls))


def _split(kwargs: dict[str, Any], accepted: Collection[str], what: str) -> dict[str, Any]:
    """The kwargs in `accepted`; the others are dropped with a warning (lmql passes them on to
    backends that may ignore them too)."""
    ignored = sorted(set(kwargs) - set(accepted))
    if ignored:
        warnings.warn(f"loomlm.lmql: {what} ignores {', '.join(ignored)} (no meaning on loomlm's engine).",
                      stacklevel=3)
    return {k: v for k, v in kwargs.items() if k in accepted}


class _Seq:
    """One scored sequence, prompt + value, as lmql's `dc.seq`: `input_ids` and `logprobs`."""

    def __init__(self, input_ids: list[int], logprobs: np.ndarray) -> None:
        self.input_ids = np.array(input_ids)
        self.logprobs = logprobs  # [len(input_ids)], natural log; 0 for the first token

    def __len__(self) -> int:
        return len(self.input_ids)

    def expand(self) -> _Seq:
        return self


class ScoringResult(_scoring.ScoreRanking):
    """lmql's `ScoringResult`: the scores of `continuations` after `prompt`, aggregated over each
    whole sequence (prompt + value); `logprobs`, `probs` and `argmax` rank them.

    Attributes: `prompt`, `continuations`, `num_value_tokens`, `seqs` (per value, with
    `.logprobs` over the whole sequence), `model_identifier`.
    """

    def __init__(self, result: _scoring.ScoringResult) -> None:
        self.prompt = result.prompt
        self.continuations = list(result.continuations)
        self.num_value_tokens = result.num_value_tokens
        self.model_identifier = result.model_identifier
        self.seqs = [_Seq(result.prompt_token_ids + ids, np.concatenate([[0.0], full]))
                     for ids, full in zip(result.value_token_ids, result.full_token_scores)]

    @property
    def token_scores(self) -> list[np.ndarray]:
        """Per value, the logprobs of every token of prompt + value."""
        return [s.logprobs for s in self.seqs]

    def scores(self, agg: str = "sum", **kwargs: Any) -> np.ndarray:
        """One score per value, shape [len(continuations)]: "sum" of the sequence's logprobs,
        "mean" per token, or "normalized..." (sum / len ** alpha, alpha=0.7 by default).

        Raises ValueError for another agg."""
        if agg == "sum":
            return np.array([s.logprobs.sum() for s in self.seqs])
        if agg == "mean":
            return np.array([s.logprobs.mean() for s in self.seqs])
        if agg.startswith("normalized"):
            alpha = kwargs.get("alpha", 0.7)
            lengths = np.array([len(s) for s in self.seqs])
            return np.array([s.logprobs.sum() for s in self.seqs]) / lengths ** alpha
        raise ValueError(f"invalid aggregation: {agg}")

    def __str__(self) -> str:
        return f"lmql.ScoringResult(model='{self.model_identifier}')\n" + "\n".join(
            f"-{c}: {score}" for c, score in zip(self.continuations, self.scores(agg="sum")))


class LLM:
    """lmql's `LLM`: a handle on a model (a zoo alias, a local HF directory or .gguf file, or a
    loomlm server URL), loaded on first use. `LLM.from_descriptor(identifier, **kwargs)` or
    `model(identifier, **kwargs)` make one; kwargs are engine arguments (others are ignored with
    a warning)."""

    def __init__(self, model_identifier: str, **kwargs: Any) -> None:
        if not isinstance(model_identifier, str) or not model_identifier:
            raise ValueError(f"the model identifier must be a non-empty string, got {model_identifier!r}.")
        self.model_identifier = model_identifier
        accepted = generation.REMOTE_KWARGS if generation.is_server_url(model_identifier) else _engine_arg_names()
        self._kwargs = _split(kwargs, accepted, f"model({model_identifier!r})")
        self._model: generation.Model | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_descriptor(cls, model_identifier: str | LLM, **kwargs: Any) -> LLM:
        return model_identifier if isinstance(model_identifier, LLM) else cls(model_identifier, **kwargs)

    @property
    def adapter(self) -> generation.Model:
        """The loomlm model behind the handle (loaded now if it was not)."""
        with self._lock:
            if self._model is None:
                self._model = generation.model(self.model_identifier, **self._kwargs)
            return self._model

    async def generate(self, prompt: str, max_tokens: int | None = None, **kwargs: Any) -> str | list[str]:
        """The completion of `prompt` (without the prompt), or a list of n of them; kwargs:
        `decoder` ("argmax", "sample", "beam", "beam_sample"), n, temperature, top_k, top_p,
        seed, penalties; others are ignored with a warning. Raises ValueError as
        `loomlm.Model.generate` does."""
        decoder_kwargs = _split(kwargs, _DECODER_KWARGS, "generate")
        decoder = decoder_kwargs.pop("decoder", "argmax")
        return await self.adapter.generate(prompt, max_tokens, decoder, **decoder_kwargs)

    def generate_sync(self, prompt: str, max_tokens: int | None = None, **kwargs: Any) -> str | list[str]:
        """`generate`, blocking (works inside a running event loop too)."""
        decoder_kwargs = _split(kwargs, _DECODER_KWARGS, "generate_sync")
        decoder = decoder_kwargs.pop("decoder", "argmax")
        return self.adapter.generate_sync(prompt, max_tokens, decoder, **decoder_kwargs)

    async def score(self, prompt: str, values: str | Sequence[str], **kwargs: Any) -> ScoringResult:
        """Scores of each value after `prompt` (lmql's `ScoringResult`); kwargs are ignored with a warning."""
        _split(kwargs, frozenset(), "score")
        return ScoringResult(await self.adapter.score(prompt, values))

    def score_sync(self, prompt: str, values: str | Sequence[str], **kwargs: Any) -> ScoringResult:
        """`score`, blocking (works inside a running event loop too)."""
        _split(kwargs, frozenset(), "score_sync")
        return ScoringResult(self.adapter.score_sync(prompt, values))

    def __repr__(self) -> str:
        return f"<LLM {self.model_identifier} on loomlm>"


def model(model_identifier: str | LLM, **kwargs: Any) -> LLM:
    """lmql's `model(...)`: an `LLM` handle (the handle itself when given one), loaded lazily."""
    return LLM.from_descriptor(model_identifier, **kwargs)


_default: LLM | None = None


def set_default_model(model_or_identifier: str | LLM | None) -> None:
    """The model of the module functions when they get `model=None` (None: back to the
    environment's `LMQL_DEFAULT_MODEL` / `LOOMLM_DEFAULT_MODEL`, else loomlm's default)."""
    global _default
    _default = None if model_or_identifier is None else model(model_or_identifier)


def _model_for(model_or_identifier: str | LLM | None) -> LLM:
    if model_or_identifier is not None:
        return model(model_or_identifier)
    if _default is not None:
        return _default
    from loomlm.models.zoo import DEFAULT_MODEL

    identifier = os.environ.get(DEFAULT_MODEL_ENV) or os.environ.get(generation.ENV_DEFAULT_MODEL) or DEFAULT_MODEL
    return model(identifier)


async def generate(prompt: str, max_tokens: int | None = None, model: str | LLM | None = None,
                   **kwargs: Any) -> str | list[str]:
    """`LLM.generate` on `model` (None: the default model)."""
    return await _model_for(model).generate(prompt, max_tokens, **kwargs)


def generate_sync(prompt: str, max_tokens: int | None = None, model: str | LLM | None = None,
                  **kwargs: Any) -> str | list[str]:
    """`LLM.generate_sync` on `model` (None: the default model)."""
    return _model_for(model).generate_sync(prompt, max_tokens, **kwargs)


async def score(prompt: str, values: str | Sequence[str], model: str | LLM | None = None,
                **kwargs: Any) -> ScoringResult:
    """`LLM.score` on `model` (None: the default model)."""
    return await _model_for(model).score(prompt, values, **kwargs)


def score_sync(prompt: str, values: str | Sequence[str], model: str | LLM | None = None,
               **kwargs: Any) -> ScoringResult:
    """`LLM.score_sync` on `model` (None: the default model)."""
    return _model_for(model).score_sync(prompt, values, **kwargs)


__all__ = ["LLM", "ScoringResult", "generate", "generate_sync", "model", "score", "score_sync", "set_default_model",
           "BaseOutputWriter", "headless", "printing", "run", "run_sync", "silent", "stream"]
