"""`loomlm.LLM`: the offline, batched API with vLLM's semantics.

Source: vLLM `vllm/entrypoints/llm.py` (`LLM.generate`); see ../shared/specs/vllm-openai.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from loomlm.engine.llm_engine import LLMEngine
from loomlm.outputs import RequestOutput
from loomlm.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """An engine for offline batched generation.

    Args:
        model: a zoo alias (default "smollm2-135m-instruct"), an HF directory or a .gguf path.
        **engine_args: vLLM-style engine arguments: dtype, max_model_len, seed, block_size,
            kv_cache_memory_bytes, num_gpu_blocks_override, max_num_seqs, max_num_batched_tokens, ...

    Raises ValueError for an unknown model or engine argument.
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
        lora_request: Any = None,
    ) -> list[RequestOutput]:
        """Generate completions for all prompts, batched; outputs come back in prompt order.

        prompts: a string, a list of strings, a list of token ids, a list of those, or
            dicts `{"prompt": str}` / `{"prompt_token_ids": list[int]}` (vLLM's TextPrompt / TokensPrompt).
        sampling_params: one for all prompts, or one per prompt (default: SamplingParams()).
        Raises ValueError for an invalid prompt or parameters; then no prompt is run.
        """
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported yet.")
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompt_list)} prompts.")
        engine = self.llm_engine
        # Validate everything before queueing anything, so a bad prompt loses no work.
        encoded = [engine.encode_prompt(prompt) for prompt in prompt_list]
        request_ids = []
        for prompt, params in zip(encoded, params_list):
            request_id = str(self._counter)
            self._counter += 1
            engine.add_request(request_id, prompt, params)
            request_ids.append(request_id)
        return self._run_engine(request_ids, use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            engine.abort_request(list(engine.user_requests))
            raise
        finally:
            bar.close()
        return [finished[rid] for rid in request_ids]


def _as_prompt_list(prompts) -> list[str | list[int]]:
    def one(p) -> str | list[int]:
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
