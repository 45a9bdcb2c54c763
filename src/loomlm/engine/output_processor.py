"""Token ids and logprobs in, RequestOutputs out: the engine's output side (vLLM v1's OutputProcessor).

The engine core (scheduler + model runner) emits token ids and logprobs only. This module owns
what turns them into what a user sees:
- incremental detokenization and stop strings (`detokenize`): a stop string found in the new
  text ends the sequence there, tokens after it are dropped, and the caller finishes it in the
  scheduler (vLLM v1 aborts it in the core the same way, one step later; here it is the same step);
- logprobs assembly (`record_logprobs`): `{token_id: Logprob}` per position, chosen token first;
- n / best_of gathering (`make_outputs`): a user request's n sequences into one RequestOutput,
  the best n of best_of ranked by cumulative logprob once all have finished (vLLM v0's semantics).
It runs on the step thread; `token_text` is also safe from other threads (a cache of decoded ids).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from loomlm.engine.detokenizer import IncrementalDetokenizer
from loomlm.engine.model_runner import ModelRunnerOutput, PositionLogprobs
from loomlm.engine.request import Request, RequestStatus
from loomlm.engine.scheduler import SchedulerOutput
from loomlm.lora.request import LoRARequest
from loomlm.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
)
from loomlm.pooling_params import PoolingParams
from loomlm.sampling_params import SamplingParams


@dataclass
class ParentRequest:
    """A user request and its n (or best_of) sequences (vLLM v1's ParentRequest).

    `detokenizers[i]` turns `sequences[i]`'s tokens into text (None when the request asked for
    `detokenize=False`); `num_detokenized[i]` counts the output tokens it has seen.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    arrival_time: float
    params: SamplingParams
    lora_request: LoRARequest | None
    detokenizers: list[IncrementalDetokenizer | None]
    pooling_params: PoolingParams | None = None  # an embedding request
    embedding: list[float] | None = None  # its pooled vector, once its prompt is prefilled

    def __post_init__(self) -> None:
        self.num_detokenized = [0] * len(self.sequences)


class OutputProcessor:
    """The user requests in flight and the rules that turn engine-core outputs into RequestOutputs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, ParentRequest] = {}
        self._token_texts: dict[int, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    sequences: list[Request], params: SamplingParams, lora_request: LoRARequest | None,
                    arrival_time: float, pooling_params: PoolingParams | None = None) -> None:
        """Track a user request (its sequences already made); a detokenizer per sequence when the
        params ask for text."""
        detokenizers = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids, s.sampling_params.stop,
                                               s.sampling_params.include_stop_str_in_output,
                                               s.sampling_params.skip_special_tokens,
                                               s.sampling_params.spaces_between_special_tokens)
                        if params.detokenize else None for s in sequences]
        self.requests[request_id] = ParentRequest(request_id, prompt, prompt_token_ids, sequences, arrival_time,
                                                  params, lora_request, detokenizers, pooling_params)

    def pop(self, request_id: str) -> ParentRequest | None:
        return self.requests.pop(request_id, None)

    # ------------------------------------------------------------------ tokens -> text
    def detokenize(self, updated: list[Request]) -> list[Request]:
        """Feed each sequence's new output tokens to its detokenizer; a stop string ends the
        sequence at the token that completed it (not before `min_tokens` tokens; later tokens of
        the step, jump-forward ones, are dropped). Stop strings win over an EOS, stop token or
        length stop at the same token, as in vLLM; a completed grammar keeps its stop.

        Returns the sequences a stop string ended that are still unfinished: the caller
        finishes them in the scheduler (status FINISHED_STOPPED, `stop_reason` already set).
        """
        to_finish: list[Request] = []
        for seq in updated:
            parent = self.requests.get(seq.parent_id)
            detok = parent.detokenizers[seq.index] if parent is not None else None
            if detok is None:
                continue
            seen = parent.num_detokenized[seq.index]
            for position in range(seen, seq.num_output_tokens):
                stop_str = detok.update(seq.output_token_ids[position])
                if stop_str is None or position + 1 < seq.sampling_params.min_tokens:
                    continue
                seq.truncate_output(position + 1)
                grammar_done = (seq.structured_output is not None and seq.structured_output.is_terminated
                                and seq.status == RequestStatus.FINISHED_STOPPED and seq.stop_reason is None)
                if not grammar_done:
                    seq.stop_reason = stop_str
                    if seq.is_finished:
                        seq.status = RequestStatus.FINISHED_STOPPED
                    else:
                        to_finish.append(seq)
                break
            parent.num_detokenized[seq.index] = seq.num_output_tokens
        return to_finish

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own, special tokens kept (vLLM's decoded_token); cached per id."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    # ------------------------------------------------------------------ logprobs
    def record_logprobs(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        """Attach this step's sampled-token and prompt logprobs to their sequences (before the
        tokens are appended), and the embeddings pooled this step to their requests."""
        for request_id, embedding in runner_output.pooled.items():
            parent = self.requests.get(request_id)
            if parent is not None:
                parent.embedding = embedding
        if not runner_output.logprobs and not runner_output.prompt_logprobs:
            return
        for item in scheduler_output.scheduled:
            req = item.request
            positions = runner_output.prompt_logprobs.get(req.request_id)
            if positions:
                k = req.sampling_params.prompt_logprobs or 0
                req.prompt_logprobs.extend(self.logprob_dict(pos, k) for pos in positions)
            for entry in runner_output.logprobs.get(req.request_id, ()):  # one per token it takes
                req.cumulative_logprob += entry.logprobs[0]
                req.sampled_logprobs.append(entry.logprobs[0])
                if req.logprobs is not None:
                    req.logprobs.append(self.logprob_dict(entry, req.sampling_params.logprobs or 0))

    def logprob_dict(self, pos: PositionLogprobs, k: int) -> dict[int, Logprob]:
        """{token_id: Logprob} with the chosen token first, then its top-k alternatives (vLLM's layout)."""
        out: dict[int, Logprob] = {}
        out[pos.token_ids[0]] = Logprob(pos.logprobs[0], pos.rank, self.token_text(pos.token_ids[0]))
        for rank, (token_id, logprob) in enumerate(zip(pos.token_ids[1:k + 1], pos.logprobs[1:k + 1]), start=1):
            if token_id not in out:
                out[token_id] = Logprob(logprob, rank, self.token_text(token_id))
        return out

    # ------------------------------------------------------------------ RequestOutputs
    def make_outputs(self, updated: list[Request]) -> list[RequestOutput]:
        """One RequestOutput per user request with an updated sequence; finished ones are dropped
        from tracking."""
        outputs: list[RequestOutput] = []
        seen: set[str] = set()
        for seq in updated:
            parent = self.requests.get(seq.parent_id)
            if parent is None or parent.request_id in seen:
                continue
            seen.add(parent.request_id)
            output = self._request_output(parent)
            if output is None:
                continue
            if output.finished:
                del self.requests[parent.request_id]
            outputs.append(output)
        return outputs

    def _request_output(self, parent: ParentRequest) -> RequestOutput | EmbeddingRequestOutput | None:
        """The user request's RequestOutput now; None while a best_of > n request is still running.
        An embedding request gives its EmbeddingRequestOutput once finished (None before)."""
        finished = all(seq.is_finished for seq in parent.sequences)
        if parent.pooling_params is not None:
            if not finished:
                return None
            # Aborted before its prompt was prefilled: finished, with no embedding.
            return EmbeddingRequestOutput(parent.request_id, EmbeddingOutput(parent.embedding or []),
                                          parent.prompt_token_ids, True)
        chosen = list(range(len(parent.sequences)))
        if len(chosen) > parent.params.n:
            if not finished:
                return None  # which n are best is known only at the end
            chosen.sort(key=lambda i: parent.sequences[i].cumulative_logprob, reverse=True)
            chosen = chosen[:parent.params.n]
        completions = []
        for index, i in enumerate(chosen):
            seq, detok = parent.sequences[i], parent.detokenizers[i]
            completions.append(CompletionOutput(
                index=index, text=detok.visible_text(seq.is_finished) if detok is not None else "",
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.needs_logprobs else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        first = [s.first_scheduled_time for s in parent.sequences if s.first_scheduled_time]
        first_token = [s.first_token_time for s in parent.sequences if s.first_token_time]
        now = time.time()
        metrics = RequestMetrics(
            arrival_time=parent.arrival_time,
            first_scheduled_time=min(first, default=None),
            first_token_time=min(first_token, default=None),
            last_token_time=now,
            finished_time=now if finished else None,
        )
        prompt_logprobs = parent.sequences[0].prompt_logprobs
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids,
                             prompt_logprobs=list(prompt_logprobs) if prompt_logprobs is not None else None,
                             outputs=completions, finished=finished, metrics=metrics,
                             lora_request=parent.lora_request,
                             num_cached_tokens=parent.sequences[0].num_cached_tokens)
