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
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "Client",
    "Completion",
    "CompletionOutput",
    "LoRARequest",
    "Logprob",
    "MergedAdapters",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing loomlm (e.g. for the protocol schemas) should not load torch model code.
    if name == "LLM":
        from loomlm.llm import LLM

        return LLM
    raise AttributeError(name)
