"""One HTTP request's engine requests (one per prompt), run and streamed together.

Shared by the OpenAI routes: `Generation.outputs()` merges the prompts' engine
streams, keeps each prompt's latest `RequestOutput`, applies `echo`, counts
usage into the metrics, and aborts whatever is unfinished when it is closed
early (the client went away).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING

import anyio
from fastapi import Request

from loomlm.lora.request import LoRARequest
from loomlm.outputs import RequestOutput
from loomlm.protocol.openai import UsageInfo
from loomlm.sampling_params import SamplingParams
from loomlm.server.errors import BadRequestError
from loomlm.server.metrics import record_usage
from loomlm.server.openai_logprobs import echoed
from loomlm.server.sse import merge_async_iterators

if TYPE_CHECKING:
    from loomlm.server.openai_router import OpenAIServing

logger = logging.getLogger(__name__)


class Generation:
    """The engine requests of one HTTP request: one per prompt, streamed together.

    `latest[i]` is the newest RequestOutput of prompt `i` (cumulative text).
    """

    def __init__(
        self,
        serving: OpenAIServing,
        raw_request: Request,
        prompts: list[list[int]],
        params: list[SamplingParams],
        request_id: str,
        echo_texts: list[str] | None = None,
        keep_generated: bool = True,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
    ) -> None:
        self.serving = serving
        self.priority = priority  # vLLM's scheduling priority (--scheduling-policy priority)
        self.lora_request = lora_request
        # Responses name the adapter when one was asked for (vLLM answers with the requested model).
        self.model_name = lora_request.lora_name if lora_request is not None else serving.served_model_name
        # echo: each prompt's text is prepended to its choices; keep_generated False is `max_tokens: 0`.
        self.echo_texts = echo_texts
        self.keep_generated = keep_generated
        self.raw_request = raw_request
        self.prompts = prompts
        self.params = params
        self.request_id = request_id
        # One engine request per prompt.
        self.request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self.latest: dict[int, RequestOutput] = {}

    def usage(self) -> UsageInfo:
        # The engine's prompt (after truncate_prompt_tokens) once it has answered.
        prompt_tokens = sum(len(self.latest[i].prompt_token_ids) if i in self.latest else len(p)
                            for i, p in enumerate(self.prompts))
        completion_tokens = (sum(len(c.token_ids) for out in self.latest.values() for c in out.outputs)
                             if self.keep_generated else 0)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def outputs(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Yield `(prompt_index, RequestOutput)` as the engine produces them.

        Raises:
            BadRequestError: the engine rejected a prompt (its ValueError).
        """
        engine = self.serving.engine
        metrics = self.serving.metrics
        metrics.requests_running.inc()
        try:
            streams = [
                engine.generate(prompt, params, rid, self.lora_request, priority=self.priority)
                for prompt, params, rid in zip(self.prompts, self.params, self.request_ids, strict=True)
            ]
            async with aclosing(merge_async_iterators(streams)) as merged:
                async for prompt_index, output in merged:
                    self.latest[prompt_index] = output
                    yield prompt_index, self.view(prompt_index, output)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        finally:
            metrics.requests_running.dec()
            # Closing the streams already aborts them (engine contract); abort again by id
            # in case a stream never started, so nothing keeps running for a gone client.
            unfinished = [rid for i, rid in enumerate(self.request_ids)
                          if i not in self.latest or not self.latest[i].finished]
            if unfinished:
                with anyio.CancelScope(shield=True):
                    for rid in unfinished:
                        try:
                            await engine.abort(rid)
                        except Exception:  # an unknown id is not worth failing the clean-up
                            logger.debug("abort of %s failed", rid, exc_info=True)
            usage = self.usage()
            record_usage(self.raw_request, metrics, usage.prompt_tokens, usage.completion_tokens)

    def view(self, prompt_index: int, output: RequestOutput) -> RequestOutput:
        """The output as the client sees it: with the prompt echoed when asked."""
        if self.echo_texts is None:
            return output
        return echoed(output, self.echo_texts[prompt_index], self.keep_generated)


async def drain(generation: Generation) -> None:
    async with aclosing(generation.outputs()) as outputs:
        async for _ in outputs:
            pass
