"""`loomlm.LLM`: the offline, batched API with vLLM's semantics.

Source: vLLM `vllm/entrypoints/llm.py` (`LLM.generate`); see ../shared/specs/vllm-openai.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from loomlm.beam_search import BeamSearchOutput, BeamSearchParams
from loomlm.chat_utils import render_chat
from loomlm.engine.input_processor import EncodedPrompt, EngineRequest
from loomlm.engine.llm_engine import LLMEngine
from loomlm.lora.request import LoRARequest
from loomlm.outputs import EmbeddingRequestOutput, RequestOutput
from loomlm.pooling_params import PoolingParams, embedding_sampling_params
from loomlm.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """An engine for offline batched generation.

    Args:
        model: a zoo alias (default "smollm2-135m-instruct"), an HF directory, a .gguf path, or a
            Hugging Face repo id ("Qwen/Qwen3-0.6B"), fetched into the Hugging Face cache
            (`loomlm.models.loader.resolve_model`; HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE apply).
        **engine_args: vLLM-style engine arguments: dtype ("auto": the checkpoint's, float32 on CPU),
            revision, tokenizer, tokenizer_revision, max_model_len, seed, block_size,
            kv_cache_memory_bytes, num_gpu_blocks_override, max_num_seqs, max_num_batched_tokens, ...
            (`loomlm.config`).

    Raises ValueError for an unknown model, a repo id neither cached nor downloadable, an unknown
    engine argument, or trust_remote_code=True (loomlm runs no code from model repos).
    """

    def __init__(self, model: str = "smollm2-135m-instruct", **engine_args: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(model=model, **engine_args)
        self._counter = 0

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for all prompts, batched; outputs come back in prompt order.

        prompts: a string, a list of strings, a list of token ids, a list of those, or
            dicts `{"prompt": str}` / `{"prompt_token_ids": list[int]}` (vLLM's TextPrompt / TokensPrompt).
        sampling_params: one for all prompts, or one per prompt (default: SamplingParams()).
        lora_request: an adapter for all prompts, or one (or None) per prompt; needs enable_lora=True.
        priority: one per prompt, lower first (vLLM's; needs scheduling_policy="priority").
        Raises ValueError for an invalid prompt or parameters; then no prompt is run.
        """
        prompt_list = _as_prompt_list(prompts)
        sampling_params = SamplingParams() if sampling_params is None else sampling_params
        params_list = _per_prompt(sampling_params, isinstance(sampling_params, SamplingParams), len(prompt_list),
                                  "sampling params")
        lora_list = _per_prompt(lora_request, lora_request is None or isinstance(lora_request, LoRARequest),
                                len(prompt_list), "LoRA requests")
        priorities = _per_prompt(0 if priority is None else priority, priority is None, len(prompt_list), "priorities")
        engine = self.llm_engine
        # Validate everything before queueing anything, so a bad prompt loses no work.
        requests = [engine.input_processor.process(str(self._counter + i), prompt, params, lora, priority=rank)
                    for i, (prompt, params, lora, rank) in enumerate(zip(prompt_list, params_list, lora_list,
                                                                        priorities))]
        # More adapters than slots is fine: a request waits for a slot to free up.
        adapters = {lora.lora_name: lora for lora in lora_list if lora is not None}
        for lora in adapters.values():
            engine.check_lora(lora)
        return self._run_engine(requests, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    lora_request: Any = None, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam-search every prompt (batched together); one BeamSearchOutput per prompt, in order.

        Semantics of vLLM's `LLM.beam_search` (see `loomlm.beam_search`); each prompt is
        prefilled once and its beams share KV blocks. Raises ValueError for a bad prompt
        or a beam_width above max_logprobs / 2 (then nothing is run).
        """
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported yet.")
        engine = self.llm_engine
        encoded = [engine.encode_prompt(p) for p in _as_prompt_list(prompts)]
        request_ids = []
        results: dict[str, BeamSearchOutput] = {}
        try:
            for prompt in encoded:
                request_id = f"beam-{self._counter}"
                self._counter += 1
                engine.add_beam_search_request(request_id, prompt, params,
                                               on_finish=functools.partial(results.__setitem__, request_id))
                request_ids.append(request_id)
            with tqdm(total=len(request_ids), desc="Beam search", disable=not use_tqdm) as bar:
                while engine.has_unfinished_requests():
                    engine.step()
                    bar.n = len(results)
                    bar.refresh()
        except BaseException:
            engine.abort_request(request_ids)
            raise
        return [results[rid] for rid in request_ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of `{"role", "content"}` messages) or a list
        of conversations, rendered with the model's chat template (or `chat_template`, Jinja text).

        `continue_final_message` continues the last (assistant) message instead of opening a new
        turn; it excludes `add_generation_prompt`. Follows vLLM's `LLM.chat`. Raises ValueError for
        an empty conversation, a template error, or invalid parameters (then nothing is run).
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not conversations:
            raise ValueError("no conversation given.")
        tokenizer = self.get_tokenizer()
        # The template writes the special tokens itself: encode without adding more (as vLLM); the
        # outputs' `prompt` is the rendered text, as vLLM's.
        prompts = [self.llm_engine.input_processor.encode(
            render_chat(tokenizer, list(conversation), chat_template, add_generation_prompt, continue_final_message),
            add_special_tokens=False) for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """Embed each prompt (vLLM's `LLM.embed`): the model's final hidden states over the prompt,
        pooled ("LAST" token by default, or "MEAN") and L2-normalised (`PoolingParams`; the engine
        default comes from `override_pooler_config`). Batched with anything else in the engine.

        Returns one EmbeddingRequestOutput per prompt, in order; `outputs.embedding` has
        hidden_size floats. Raises ValueError for an invalid prompt or params (nothing is run).
        """
        prompt_list = _as_prompt_list(prompts)
        pooling = pooling_params or PoolingParams()
        engine = self.llm_engine
        requests = [engine.input_processor.process(str(self._counter + i), prompt, embedding_sampling_params(),
                                                   lora_request, pooling_params=pooling)
                    for i, prompt in enumerate(prompt_list)]
        pooling.resolved(engine.pooler_config, engine.hf_config.hidden_size)  # dimensions checked before any run
        if lora_request is not None:
            engine.check_lora(lora_request)
        return self._run_engine(requests, use_tqdm)

    def _run_engine(self, requests: list[EngineRequest], use_tqdm: bool) -> list[RequestOutput]:
        """Queue `requests` (validated, numbered from `_counter` on) and step the engine until they finish."""
        engine = self.llm_engine
        self._counter += len(requests)
        for request in requests:
            engine.add_engine_request(request)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(requests), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            engine.abort_all()
            raise
        finally:
            bar.close()
        return [finished[request.request_id] for request in requests]


def _per_prompt(value: Any, is_one: bool, num_prompts: int, what: str) -> list:
    """`value` for every prompt when `is_one`, else its items, one per prompt (ValueError otherwise)."""
    if is_one:
        return [value] * num_prompts
    values = list(value)
    if len(values) != num_prompts:
        raise ValueError(f"got {len(values)} {what} for {num_prompts} prompts.")
    return values


def _as_prompt_list(prompts) -> list[str | list[int] | EncodedPrompt]:
    def one(p) -> str | list[int] | EncodedPrompt:
        if isinstance(p, EncodedPrompt):  # already tokenized (LLM.chat)
            return p
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                return list(p["prompt_token_ids"])
            if "prompt" in p:
                return p["prompt"]
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
        if isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p)):
            return p
        raise ValueError(f"unsupported prompt type {type(p).__name__}.")

    if isinstance(prompts, (str, dict)):
        return [one(prompts)]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    prompt_list = [one(p) for p in prompts]
    if not prompt_list:
        raise ValueError("no prompts given.")
    return prompt_list
