"""One sequence being generated, described by counters rather than phases.

`num_computed_tokens` counts the tokens whose K/V are in the cache;
`num_tokens` counts prompt + generated tokens. A request is prefilling while
`num_computed_tokens < num_prompt_tokens`, decoding after; a preempted request
simply restarts from `num_computed_tokens = 0` with its generated tokens kept.
"""

from __future__ import annotations

import copy
import enum
import time
from typing import TYPE_CHECKING

import torch

from loomlm.outputs import Logprob

if TYPE_CHECKING:
    from loomlm.engine.structured_output import StructuredOutputRequest
    from loomlm.lora.request import LoRARequest
    from loomlm.pooling_params import PoolingParams
from loomlm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """A single sequence: one completion of a user request (n > 1 fans out into n of these).

    Attributes:
        request_id: unique engine-wide id of this sequence.
        parent_id: the user request it belongs to; `index` is its place among that request's n.
        max_tokens: generated-token limit, already capped by the context window.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        parent_id: str | None = None,
        index: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        # Logprobs: `logprobs` (per generated token) and `prompt_logprobs` (per prompt token, None
        # first) are filled by the engine when asked for; the cumulative sum is kept whenever
        # `needs_logprobs` (also for best_of ranking).
        self.needs_logprobs = sampling_params.needs_sampled_logprob
        self.cumulative_logprob = 0.0
        self.sampled_logprobs: list[float] = []  # with needs_logprobs: each output token's own logprob
        self.logprobs: list[dict[int, Logprob]] | None = [] if sampling_params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if sampling_params.prompt_logprobs is not None else None)
        # Prompt logprobs are wanted from this position on (0: all); the prefix cache may serve
        # the positions before it (set by the engine: continuation scoring).
        self.prompt_logprobs_from = 0
        # Its adapter (None: the base model); the model runner maps it to a slot each step.
        self.lora_request: LoRARequest | None = None
        # Set by the engine for a constrained request (structured outputs).
        self.structured_output: StructuredOutputRequest | None = None
        # An embedding request: how to pool its prompt's hidden states (resolved: no None fields);
        # `pool_sum` is the model runner's running sum for MEAN across prefill chunks.
        self.priority = 0  # scheduling_policy "priority": lower runs first (vLLM's)
        self.pooling_params: PoolingParams | None = None
        self.pool_sum: torch.Tensor | None = None
        # Speculative decoding: the tokens proposed to follow `all_token_ids`, verified by the next
        # step (never part of `all_token_ids` until accepted); `spec_decode.SpecDecodeState` keeps
        # the proposer's per-request state (acceptance history, the draft model's KV counter).
        self.spec_token_ids: list[int] = []
        self.spec_state = None
        # A per-request generator makes seeded sampling independent of batch composition.
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None and not sampling_params.is_greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling_params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep the first `num_output_tokens` generated tokens (a stop string ended the sequence
        before later tokens of its step: jump-forward or accepted speculative ones)."""
        del self.output_token_ids[num_output_tokens:]
        del self.all_token_ids[self.num_prompt_tokens + num_output_tokens:]
        self.trim_logprobs()

    def trim_logprobs(self) -> None:
        """Drop logprobs recorded for tokens the sequence did not keep (speculative tokens after a
        stop), from `logprobs` and `cumulative_logprob`."""
        n = self.num_output_tokens
        if len(self.sampled_logprobs) > n:
            self.cumulative_logprob -= sum(self.sampled_logprobs[n:])
            del self.sampled_logprobs[n:]
        if self.logprobs is not None and len(self.logprobs) > n:
            del self.logprobs[n:]

    def fork(self, request_id: str) -> Request:
        """A copy of this sequence under `request_id`: same tokens, counters and logprobs
        (beam search forks a beam into several)."""
        child = copy.copy(self)
        child.request_id = request_id
        child.prompt_token_ids = self.prompt_token_ids  # never modified: shared
        child.all_token_ids = list(self.all_token_ids)
        child.output_token_ids = list(self.output_token_ids)
        child.logprobs = list(self.logprobs) if self.logprobs is not None else None
        child.sampled_logprobs = list(self.sampled_logprobs)
        child.spec_token_ids, child.spec_state = [], None  # beams never speculate
        if self.generator is not None:
            child.generator = torch.Generator()
            child.generator.set_state(self.generator.get_state())
        return child

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, computed={self.num_computed_tokens}, "
                f"tokens={self.num_tokens})")
