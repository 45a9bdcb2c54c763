"""Continuous batching with chunked prefill and preemption by recompute.

Each step gets a token budget (`max_num_batched_tokens`). Decode tokens come first: one for
every running request past its prompt, in arrival order, so a long prompt never stalls the
streams already generating. Then prefill chunks, oldest request first: running requests still
prefilling (or recomputing), then waiting requests admitted in FCFS order while budget,
sequence slots (`max_num_seqs`) and blocks last. A burst is thus prefilled in arrival order,
and its first requests stream while later prompts are still being prefilled.

Under `scheduling_policy="priority"` (vLLM's) waiting requests are admitted by (priority, arrival),
lower values first, and one that finds the pool or the sequence slots full preempts running
requests of strictly lower priority (greater value) for room.

With speculative decoding a decoding request also computes its proposed tokens
(`Request.spec_token_ids`, as many as the budget leaves room for) in the same step, and
`update_from_output` counts as computed only those the model runner accepted.

When the KV pool cannot hold a request's next tokens, the most recently arrived (under the
priority policy: the lowest-priority, then latest) running request is preempted (a decode
already scheduled this step is undone; it may be the request itself): its blocks are freed and it goes back to the front of the waiting queue with
`num_computed_tokens = 0`, to be recomputed later (prompt + tokens generated so far); nothing
it generated is lost. Follows vLLM v1's scheduler (`vllm/v1/core/sched/scheduler.py`),
without its phases.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from loomlm.config import SchedulerConfig
from loomlm.engine.block_manager import BlockManager
from loomlm.engine.request import Request, RequestStatus
from loomlm.lora.manager import LoRAManager
from loomlm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    # Tokens computed this step: positions num_computed_tokens .. num_computed_tokens + num_new_tokens - 1.
    num_new_tokens: int
    # Scheduled for the first time (vLLM's scheduled_new_reqs): not after a preemption.
    is_new: bool = False
    # Speculative decoding: the proposed tokens computed after the request's last token (the last
    # len(spec_token_ids) of num_new_tokens; vLLM's scheduled_spec_decode_tokens).
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples_token(self) -> bool:
        """True when this step reaches the request's last token, so it samples the next one
        (and verifies `spec_token_ids`)."""
        return self.request.num_computed_tokens + self.num_new_tokens >= self.request.num_tokens


@dataclass
class GrammarBitmask:
    # (request id, i) per bitmask row, in its order: the request's next token after its first i
    # proposed tokens (i = 0 without speculative decoding)
    rows: list[tuple[str, int]]
    bitmask: torch.Tensor  # [len(rows), ceil(vocab_size / 32)] int32, bit t allows token t


@dataclass
class SchedulerOutput:
    # Requests to run this step with their token counts, in scheduling order.
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Sum of num_new_tokens: the size of the flat batch.
    total_num_scheduled_tokens: int = 0
    # Requests preempted this step (their blocks are already freed).
    preempted_request_ids: list[str] = field(default_factory=list)
    # (source, destination) KV block copies to make before the forward pass: copy-on-write of
    # blocks that forked sequences (beams) shared and are about to write different tokens into.
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # Each scheduled request's KV blocks (request_id -> block ids, covering its scheduled tokens).
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    # Allowed next tokens of the constrained requests that sample this step (filled by the
    # StructuredOutputManager hook, `grammar_bitmask`).
    grammar_bitmask: GrammarBitmask | None = None
    # The adapters of every running request after this step's admissions (name -> request; at
    # most max_loras): the model runner keeps them installed.
    active_loras: dict[str, LoRARequest] = field(default_factory=dict)
    # Requests the scheduler ended without running them this step (an adapter that failed to load).
    finished_requests: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides each step which requests run and how many tokens each computes (module docstring: policy)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 lora_manager: LoRAManager | None = None, max_loras: int = 0,
                 num_lookahead_tokens: int = 0, max_model_len: int | None = None) -> None:
        """`lora_manager`: asked only whether a request's adapter is loaded (`is_ready`); the
        scheduler counts adapters (at most `max_loras` distinct ones among the running requests,
        as vLLM v1's) and the model runner installs them.

        `num_lookahead_tokens`: KV slots allocated past each scheduled request's tokens (up to
        `max_model_len`), where a draft model writes the K/V of its proposals (vLLM's name)."""
        self.config = config
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_model_len = max_model_len
        self.block_manager = block_manager
        self.lora_manager = lora_manager
        self.max_loras = max_loras
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since start; read by tests and metrics

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, request: Request, budget: int, num_computed: int | None = None) -> int:
        """Tokens the request computes this step from `num_computed` (default: its counter),
        its proposed tokens included (those the budget leaves room for)."""
        if num_computed is None:
            num_computed = request.num_computed_tokens
        num_new = min(request.num_tokens + len(request.spec_token_ids) - num_computed, budget)
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts; allocates their KV blocks, may preempt."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        now = time.time()

        # Decodes first, then prefill chunks; the stable sort keeps arrival order within each.
        scheduled: dict[str, ScheduledRequest] = {}
        copies: dict[str, tuple[int, int]] = {}
        for request in sorted(self.running, key=_is_prefilling):
            if budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = self._chunk(request, budget)
            if num_new == 0:
                # Nothing to compute: a beam that already gave its candidates waits for the
                # other beams of its group to choose its next token.
                continue
            target = self._with_lookahead(request.num_computed_tokens + num_new)
            while not bm.can_allocate(request.request_id, target, request.num_computed_tokens):
                # The latest arrival (or lowest priority) loses its blocks first; a later decode
                # scheduled before this older prefill chunk gives its tokens back.
                budget += self._preempt_one(scheduled, copies, out)
                if request.status == RequestStatus.PREEMPTED:  # it was the victim
                    break
            else:
                copy = bm.copy_on_write(request.request_id, request.num_computed_tokens)
                if copy is not None:
                    copies[request.request_id] = copy
                bm.allocate(request.request_id, target)
                num_spec = max(0, request.num_computed_tokens + num_new - request.num_tokens)
                scheduled[request.request_id] = ScheduledRequest(request, num_new,
                                                                 spec_token_ids=request.spec_token_ids[:num_spec])
                budget -= num_new

        # Admit waiting requests only if nobody was preempted this step (the pool is tight),
        # in arrival order (priority order under the priority policy), passing over those whose
        # grammar is still compiling or whose adapter is loading or would be one adapter too many.
        # Under the priority policy a request that outranks a running one may preempt it for room.
        active_loras = {r.lora_request.lora_name: r.lora_request for r in self.running if r.lora_request is not None}
        for request in self._waiting_order():
            if budget <= 0:
                break
            if (len(self.running) >= self.config.max_num_seqs or out.preempted_request_ids) \
                    and not self._outranks(request):
                break
            if request.structured_output is not None and not request.structured_output.is_ready:
                continue
            lora = request.lora_request
            if lora is not None and lora.lora_name not in active_loras:
                # Readiness first: it starts the adapter's load even while the count is full.
                if not self._lora_ready(request, out) or len(active_loras) >= self.max_loras:
                    continue
            if len(self.running) >= self.config.max_num_seqs:
                budget += self._preempt_one(scheduled, copies, out)
            # Prefix caching: a request starting from scratch shares the cached blocks of its
            # longest cached prefix and computes only the rest.
            cached = []
            if request.num_computed_tokens == 0:
                # Prompt logprobs need the logits of every position they score (vLLM skips the
                # cache for them): only the positions before `prompt_logprobs_from` may be hits.
                lookup = request.all_token_ids
                if request.sampling_params.prompt_logprobs is not None:
                    lookup = lookup[:request.prompt_logprobs_from]
                pooling = request.pooling_params
                if pooling is not None and pooling.pooling_type == "MEAN":
                    lookup = []  # a mean pools the states of every prompt token: none from the cache
                cached = bm.find_cached_prefix(lookup, _cache_extra(request))
            num_computed = max(request.num_computed_tokens, len(cached) * bm.block_size)
            num_new = self._chunk(request, budget, num_computed)

            def fits() -> bool:
                target = self._with_lookahead(num_computed + num_new)
                return (bm.can_allocate_with_prefix(cached, target) if request.num_computed_tokens == 0
                        else bm.can_allocate(request.request_id, target))

            while not fits() and self._outranks(request):
                budget += self._preempt_one(scheduled, copies, out)
                num_new = min(num_new, self._chunk(request, budget, num_computed))
            if not fits() or num_new <= 0:
                break
            self.waiting.remove(request)
            if request.num_computed_tokens == 0:
                bm.take_cached_prefix(request.request_id, cached, request.num_tokens)
                request.num_computed_tokens = num_computed
                if request.prompt_logprobs is not None and num_computed + 1 > len(request.prompt_logprobs):
                    # Positions 1..num_computed were served by the cache: no logprobs for them.
                    request.prompt_logprobs.extend([None] * (num_computed + 1 - len(request.prompt_logprobs)))
                if request.num_preemptions == 0:
                    request.num_cached_tokens = num_computed
            bm.allocate(request.request_id, self._with_lookahead(num_computed + num_new))
            request.status = RequestStatus.RUNNING
            is_new = request.first_scheduled_time is None
            if is_new:
                request.first_scheduled_time = now
            self.running.append(request)
            if lora is not None:
                active_loras[lora.lora_name] = lora
            scheduled[request.request_id] = ScheduledRequest(request, num_new, is_new)
            budget -= num_new

        out.scheduled = list(scheduled.values())
        out.blocks_to_copy = list(copies.values())
        out.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        out.active_loras = active_loras
        out.block_tables = {it.request.request_id: bm.block_table(it.request.request_id) for it in out.scheduled}
        return out

    def _with_lookahead(self, num_tokens: int) -> int:
        """Tokens to allocate KV slots for when `num_tokens` are computed: the draft model's
        lookahead slots too, within the context window."""
        if not self.num_lookahead_tokens:
            return num_tokens
        return max(num_tokens, min(num_tokens + self.num_lookahead_tokens, self.max_model_len or num_tokens))

    # ------------------------------------------------------------------ policy
    def _priority_key(self, request: Request) -> tuple[int, float]:
        return request.priority, request.arrival_time

    def _waiting_order(self) -> list[Request]:
        """Waiting requests in admission order: the queue's (arrival, preempted ones first), or
        by (priority, arrival) under the priority policy."""
        if self.config.scheduling_policy == "priority":
            return sorted(self.waiting, key=self._priority_key)
        return list(self.waiting)

    def _victim(self) -> Request:
        """Takes the running request to preempt out of `running`: the latest arrival, or under the
        priority policy the lowest priority (latest arrival among equals), vLLM v1's choice."""
        if self.config.scheduling_policy == "priority":
            victim = max(self.running, key=self._priority_key)
            self.running.remove(victim)
            return victim
        return self.running.pop()

    def _outranks(self, request: Request) -> bool:
        """Under the priority policy: whether `request` may preempt a running request (one of
        strictly lower priority, a greater `priority` value, is running)."""
        return (self.config.scheduling_policy == "priority" and bool(self.running)
                and max(self.running, key=self._priority_key).priority > request.priority)

    def _preempt_one(self, scheduled: dict[str, ScheduledRequest], copies: dict[str, tuple[int, int]],
                     out: SchedulerOutput) -> int:
        """Preempt the `_victim`, dropping its work scheduled this step; returns the tokens it
        gives back to the budget."""
        victim = self._victim()
        copies.pop(victim.request_id, None)
        undone = scheduled.pop(victim.request_id, None)
        self._preempt(victim)
        out.preempted_request_ids.append(victim.request_id)
        return undone.num_new_tokens if undone is not None else 0

    def _lora_ready(self, request: Request, out: SchedulerOutput) -> bool:
        """Whether the request's adapter is loaded (else it waits). A failed adapter load
        finishes the request (aborted, in `out.finished_requests`): it cannot run."""
        try:
            return self.lora_manager.is_ready(request.lora_request)
        except ValueError as exc:
            logger.error("request %s: adapter %s failed to load: %s", request.request_id,
                         request.lora_request.lora_name, exc)
            self.finish(request, RequestStatus.FINISHED_ABORTED)
            out.finished_requests.append(request)
            return False

    def fork(self, parent: Request, child_id: str) -> Request:
        """A copy of `parent` under `child_id` sharing its KV blocks (reference counts), queued
        right after it (running or waiting, as the parent is)."""
        child = parent.fork(child_id)
        self.block_manager.fork(parent.request_id, child_id)
        queue = self.running if parent in self.running else self.waiting
        queue.insert(queue.index(parent) + 1, child)
        return child

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []  # proposed again once it decodes; a draft model's K/V went with the blocks
        if request.spec_state is not None:
            request.spec_state.num_draft_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           sampled_token_ids: dict[str, int | list[int]]) -> list[Request]:
        """Advance counters, append sampled tokens, finish requests that stop.

        `sampled_token_ids`: request id -> its new token, or with speculative decoding the
        tokens it took this step (the accepted proposals, then the target's own token). Only
        the accepted proposals' K/V count as computed: the slots of rejected ones are written
        over later (nothing is copied). Stops are checked token by token; tokens after a stop
        are dropped.

        Returns the requests that got a new token this step (finished ones included).
        """
        updated: list[Request] = []
        now = time.time()
        for item in scheduler_output.scheduled:
            request = item.request
            tokens = sampled_token_ids.get(request.request_id)
            if tokens is None:  # a prefill chunk that has not reached the end of the prompt yet
                request.num_computed_tokens += item.num_new_tokens
                self.block_manager.cache_full_blocks(request.request_id, request.all_token_ids,
                                                     request.num_computed_tokens, _cache_extra(request))
                continue
            tokens = [tokens] if isinstance(tokens, int) else tokens
            num_rejected = len(item.spec_token_ids) - (len(tokens) - 1)
            request.num_computed_tokens += item.num_new_tokens - num_rejected
            stopped = False
            for token_id in tokens:
                request.append_output_token(token_id)
                stopped = check_stop(request, token_id)
                if stopped:
                    break
            stopped = stopped or _jump_forward(request)
            request.trim_logprobs()  # those of proposals accepted after a stop
            if request.first_token_time is None:
                request.first_token_time = now
            # Register blocks this step filled (before a stop frees them: a finished prompt is
            # reusable); K/V computed for tokens a stop dropped is not registered.
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens)
            self.block_manager.cache_full_blocks(request.request_id, request.all_token_ids,
                                                 request.num_computed_tokens, _cache_extra(request))
            if stopped:
                self.finish(request, request.status)
            updated.append(request)
        return updated

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove the request from the queues and free its blocks."""
        request.status = status
        request.finished_time = time.time()
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request.request_id)

    def abort(self, request: Request) -> None:
        if not request.is_finished:
            self.finish(request, RequestStatus.FINISHED_ABORTED)


def _is_prefilling(request: Request) -> bool:
    """True while the request has more than one token to compute: a prompt (or, after a
    preemption, prompt + output) chunk rather than a single decode token."""
    return request.num_tokens - request.num_computed_tokens > 1


def _cache_extra(request: Request) -> str | None:
    """What besides the tokens decides a block's KV: the adapter the request runs with."""
    return request.lora_request.lora_name if request.lora_request is not None else None


def check_stop(request: Request, token_id: int) -> bool:
    """Sets the request's finished status if `token_id` ends it; returns whether it did.

    Token rules only (the engine core sees no text): a completed grammar, then EOS / stop token
    ids, then the length limit, as vLLM v1's `check_stop`. Stops are not checked before
    `min_tokens` tokens. Stop strings are the OutputProcessor's (engine/output_processor.py).
    """
    params = request.sampling_params
    grammar = request.structured_output
    if grammar is not None:
        grammar.accept(token_id)
        if grammar.is_terminated:  # the constraint is complete: nothing may follow
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, None
            return True
    if request.num_output_tokens >= params.min_tokens:
        if token_id in params.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            # vLLM reports the stop token id, but None for the EOS token.
            request.stop_reason = token_id if token_id in params.stop_token_ids else None
            return True
    if request.num_output_tokens >= request.max_tokens:
        request.status = RequestStatus.FINISHED_LENGTH
        return True
    return False


def _jump_forward(request: Request) -> bool:
    """Append the tokens a constraint forces next without sampling them; returns whether one
    of them ended the request. Skipped when logprobs are asked for (a forced token has none)."""
    grammar = request.structured_output
    if grammar is None or request.needs_logprobs:
        return False
    for token_id in grammar.forced_tokens():
        request.append_output_token(token_id)
        if check_stop(request, token_id):
            return True
    return False
