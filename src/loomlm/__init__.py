"""loomlm: an LLM inference and serving engine with vLLM-, OpenAI-, LoRAX- and LMQL-style faces."""

from __future__ import annotations

from loomlm.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from loomlm.client import AsyncClient, Client, Completion, MergedAdapters
from loomlm.lora.request import LoRARequest
from loomlm.outputs import CompletionOutput, Logprob, RequestOutput
from loomlm.sampling_params import SamplingParams

__version__ = "0.1.0"


# Lazy: importing loomlm (e.g. for the protocol schemas) should not load torch model code. The
# Generations API (LMQL-style) is loomlm.generation's; queries and output writers, loomlm.query's.
_LAZY_MODULES = {
    "loomlm.llm": ("LLM",),
    "loomlm.generation": ("Model", "model", "generate", "generate_sync", "score", "score_sync", "set_default_model"),
    "loomlm.scoring": ("ScoringResult",),
    "loomlm.query": ("run", "run_sync", "BaseOutputWriter", "printing", "stream", "headless", "silent"),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}
__all__ = ["AsyncClient", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "Client", "Completion",
           "CompletionOutput", "LoRARequest", "Logprob", "MergedAdapters", "RequestOutput", "SamplingParams", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
