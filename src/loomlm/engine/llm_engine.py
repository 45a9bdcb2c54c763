"""The synchronous engine: requests in, RequestOutputs out, one `step()` at a time.

`step()` is the whole architecture in three calls:
`scheduler.schedule()` -> `model_runner.execute()` -> `scheduler.update_from_output()`,
followed by turning the updated sequences into RequestOutputs. A user request
with `n > 1` fans out into n sequences (ids `"{i}_{request_id}"`, seeds
`seed + i`, as vLLM v1's ParentRequest), gathered back into one RequestOutput.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from loomlm.config import EngineConfig
from loomlm.engine.block_manager import BlockManager
from loomlm.engine.detokenizer import IncrementalDetokenizer
from loomlm.engine.model_runner import ModelRunner
from loomlm.engine.request import Request
from loomlm.engine.scheduler import Scheduler
from loomlm.models.loader import iter_weights, load_tokenizer, resolve_model
from loomlm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loomlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EncodedPrompt(NamedTuple):
    """A prompt tokenized and validated by `LLMEngine.encode_prompt`."""

    text: str | None  # the prompt text; None when it was given as token ids
    token_ids: list[int]


@dataclass
class _UserRequest:
    """A user request and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    arrival_time: float
    finished_ids: set[str] = field(default_factory=set)


class LLMEngine:
    """Synchronous engine over one model: `add_request`, then `step()` until no request is unfinished.

    Loading raises ValueError for an unknown model, a bad engine argument or a checkpoint that
    does not fit its config. Not thread-safe: one caller at a time (AsyncLLMEngine serializes).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.source = resolve_model(mc.model)
        self.hf_config = self.source.hf_config
        self.tokenizer = load_tokenizer(self.source)
        self.served_model_name = mc.served_model_name or self.source.name
        model_max = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        window = _sliding_window(self.hf_config)
        if window is not None and window < model_max:
            # Attention here is full-context, which equals sliding-window attention only up to
            # the window: cap the context there rather than silently compute something else.
            logger.warning("sliding-window attention is not implemented: capping the context at the window (%d)",
                           window)
            model_max = window
        if mc.max_model_len is not None and mc.max_model_len > model_max:
            raise ValueError(f"max_model_len ({mc.max_model_len}) is larger than the model's context window ({model_max}).")
        max_len = mc.max_model_len or model_max
        self.model_runner = ModelRunner(mc, config.cache_config, self.hf_config,
                                        iter_weights(self.source, mc.torch_dtype), max_len)
        capacity = self.model_runner.num_blocks * config.cache_config.block_size
        if capacity < max_len:
            logger.warning("KV cache holds %d tokens < context window %d: capping max_model_len", capacity, max_len)
            max_len = capacity
        self.max_model_len = max_len
        self.block_manager = BlockManager(self.model_runner.num_blocks, config.cache_config.block_size)
        self.scheduler = Scheduler(config.scheduler_config, self.block_manager)
        self.eos_token_ids = _eos_token_ids(self.tokenizer, self.hf_config)
        self.user_requests: dict[str, _UserRequest] = {}

    @classmethod
    def from_engine_args(cls, **kwargs) -> LLMEngine:
        """Build from flat vLLM-style args (`model=`, `max_model_len=`, `block_size=`, ...)."""
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ----------------------------------------------------------------- requests
    def encode_prompt(self, prompt: str | list[int] | EncodedPrompt) -> EncodedPrompt:
        """Tokenize and validate a prompt once; `add_request` accepts the result as is.

        Raises ValueError: empty prompt, token ids outside the vocabulary, or a prompt that
        leaves no room to generate within the context window (`max_model_len`).
        """
        if isinstance(prompt, EncodedPrompt):
            return prompt
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("The prompt cannot be empty.")
            encoded = EncodedPrompt(prompt, self.tokenizer.encode(prompt))
        else:
            token_ids = list(prompt)
            if not token_ids:
                raise ValueError("The prompt cannot be empty.")
            vocab = self.hf_config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}).")
            encoded = EncodedPrompt(None, token_ids)
        n = len(encoded.token_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{n} tokens, which leaves no room for the completion. Please reduce the length of the prompt.")
        return encoded

    def add_request(self, request_id: str, prompt: str | list[int] | EncodedPrompt, params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError for bad input or a duplicate id (nothing is queued then)."""
        if request_id in self.user_requests:
            raise ValueError(f"request id {request_id!r} is already in use.")
        text, token_ids = self.encode_prompt(prompt)
        arrival = arrival_time or time.time()
        max_tokens = self.max_model_len - len(token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        sequences = []
        for i in range(params.n):
            seq_params = params.clone(n=1, best_of=None, seed=None if params.seed is None else params.seed + i)
            seq_params.all_stop_token_ids = set(seq_params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            seq_id = request_id if params.n == 1 else f"{i}_{request_id}"
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, seq_params.stop,
                                           seq_params.include_stop_str_in_output, seq_params.skip_special_tokens,
                                           seq_params.spaces_between_special_tokens) if params.detokenize else None
            sequences.append(Request(seq_id, token_ids, seq_params, max_tokens, detok, request_id, i, arrival))
        self.user_requests[request_id] = _UserRequest(request_id, text, token_ids, sequences, arrival)
        for seq in sequences:
            self.scheduler.add_request(seq)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop requests and free their blocks; unknown ids are ignored."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            user = self.user_requests.pop(rid, None)
            if user is None:
                continue
            for seq in user.sequences:
                self.scheduler.abort(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.user_requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.user_requests)

    # --------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every user request that got new tokens."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        tables = {it.request.request_id: self.block_manager.block_table(it.request.request_id)
                  for it in scheduler_output.scheduled}
        runner_output = self.model_runner.execute(scheduler_output, tables)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output.sampled_token_ids)
        return self._make_outputs(updated)

    def _make_outputs(self, updated: list[Request]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        seen: set[str] = set()
        for seq in updated:
            user = self.user_requests.get(seq.parent_id)
            if user is None or user.request_id in seen:
                continue
            seen.add(user.request_id)
            output = self._request_output(user)
            if output.finished:
                del self.user_requests[user.request_id]
            outputs.append(output)
        return outputs

    def _request_output(self, user: _UserRequest) -> RequestOutput:
        completions = []
        for seq in user.sequences:
            done = seq.is_finished
            text = seq.detokenizer.visible_text(done) if seq.detokenizer is not None else ""
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        finished = all(seq.is_finished for seq in user.sequences)
        first = [s.first_scheduled_time for s in user.sequences if s.first_scheduled_time]
        first_token = [s.first_token_time for s in user.sequences if s.first_token_time]
        metrics = RequestMetrics(
            arrival_time=user.arrival_time,
            first_scheduled_time=min(first, default=None),
            first_token_time=min(first_token, default=None),
            last_token_time=time.time(),
            finished_time=time.time() if finished else None,
        )
        return RequestOutput(request_id=user.request_id, prompt=user.prompt,
                             prompt_token_ids=user.prompt_token_ids, prompt_logprobs=None,
                             outputs=completions, finished=finished, metrics=metrics)


def _sliding_window(hf_config) -> int | None:
    """The config's attention window in tokens, if it uses one (Mistral; Qwen2 with use_sliding_window)."""
    window = getattr(hf_config, "sliding_window", None)
    if hf_config.model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
        return None
    return window if isinstance(window, int) and window > 0 else None


def _eos_token_ids(tokenizer, hf_config) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    cfg = getattr(hf_config, "eos_token_id", None)
    if isinstance(cfg, int):
        ids.add(cfg)
    elif isinstance(cfg, (list, tuple)):
        ids.update(cfg)
    return ids
