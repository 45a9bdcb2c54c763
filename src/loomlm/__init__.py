"""loomlm: an LLM inference and serving engine with vLLM-, OpenAI-, LoRAX- and LMQL-style faces."""

from __future__ import annotations

from loomlm.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from loomlm.client import AsyncClient, Client, Completion, MergedAdapters
from loomlm.lora.request import LoRARequest
from loomlm.outputs import CompletionOutput, Logprob, RequestOutput
from loomlm.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncClient",
    "BaseOutputWriter",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "Client",
    "Completion",
    "CompletionOutput",
    "LoRARequest",
    "Logprob",
    "MergedAdapters",
    "Model",
    "RequestOutput",
    "SamplingParams",
    "ScoringResult",
    "generate",
    "generate_sync",
    "headless",
    "model",
    "printing",
    "run",
    "run_sync",
    "score",
    "score_sync",
    "set_default_model",
    "silent",
    "stream",
]
__version__ = "0.1.0"


# Lazy: importing loomlm (e.g. for the protocol schemas) should not load torch model code.
_LAZY = {
    "LLM": "loomlm.llm",
    # The Generations API (LMQL-style); see loomlm.generation.
    "Model": "loomlm.generation",
    "model": "loomlm.generation",
    "generate": "loomlm.generation",
    "generate_sync": "loomlm.generation",
    "score": "loomlm.generation",
    "score_sync": "loomlm.generation",
    "set_default_model": "loomlm.generation",
    "ScoringResult": "loomlm.scoring",
    # Queries and output writers; see loomlm.query.
    "run": "loomlm.query",
    "run_sync": "loomlm.query",
    "BaseOutputWriter": "loomlm.query",
    "printing": "loomlm.query",
    "stream": "loomlm.query",
    "headless": "loomlm.query",
    "silent": "loomlm.query",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
