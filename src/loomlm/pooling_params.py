"""How an embedding request pools the model's hidden states (vLLM's `PoolingParams` / `PoolerConfig`).

An embedding is the served model's last hidden states (after its final norm) over the prompt,
pooled and L2-normalised, as vLLM pools a generative model run as an embedding model
(`vllm/model_executor/layers/pooler.py`): "LAST" takes the last prompt token's state (vLLM's
default for decoder-only models), "MEAN" the mean over every prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loomlm.sampling_params import SamplingParams

POOLING_TYPES = ("LAST", "MEAN")


@dataclass(frozen=True)
class PoolingParams:
    """One embedding request's pooling; None fields take the engine's default (`PoolerConfig`).

    Attributes:
        pooling_type: "LAST" or "MEAN".
        normalize: L2-normalise the pooled vector.
        dimensions: the embedding's length. Only the model's hidden size is served: loomlm's
            models are not Matryoshka-trained, so a shorter prefix would be a poor embedding
            (vLLM refuses it for such models too).

    Raises ValueError for another pooling type or a non-positive dimension count.
    """

    pooling_type: str | None = None
    normalize: bool | None = None
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {list(POOLING_TYPES)}, got {self.pooling_type!r}.")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}.")

    def resolved(self, default: PoolerConfig, hidden_size: int) -> PoolingParams:
        """These params with the engine's defaults filled in. Raises ValueError for `dimensions`
        other than the model's hidden size."""
        if self.dimensions is not None and self.dimensions != hidden_size:
            raise ValueError(f"dimensions={self.dimensions} is not supported: this model's embeddings have "
                             f"{hidden_size} dimensions and it was not trained for shorter (Matryoshka) ones.")
        return PoolingParams(self.pooling_type or default.pooling_type,
                             default.normalize if self.normalize is None else self.normalize, hidden_size)


@dataclass(frozen=True)
class PoolerConfig:
    """The engine's default pooling (vLLM's `--override-pooler-config '{"pooling_type": "MEAN"}'`)."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {list(POOLING_TYPES)}, got {self.pooling_type!r}.")

    @classmethod
    def from_override(cls, override: dict[str, Any] | None) -> PoolerConfig:
        """From vLLM's override dict (keys pooling_type, normalize). Raises ValueError for other keys."""
        override = dict(override or {})
        unknown = sorted(set(override) - {"pooling_type", "normalize"})
        if unknown:
            raise ValueError(f"override_pooler_config: unknown keys {unknown} (known: pooling_type, normalize).")
        if isinstance(override.get("pooling_type"), str):
            override["pooling_type"] = override["pooling_type"].upper()
        return cls(**override)


def embedding_sampling_params() -> SamplingParams:
    """What an embedding request runs as in the engine: its prompt prefilled, then one greedy,
    undetokenized token that finishes it (the embedding is pooled at the end of the prefill)."""
    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
