"""The request rules every face shares, in one place: prompt tokenization and its bounds, the
vocabulary, the context window and the parameters' checks against the model.

vLLM v1's `Processor` (vllm/v1/engine/processor.py) is the model: faces translate their wire
format, then ask this one object, so a rule (say, "prompt + max_tokens fits the context window")
lives once and each face only words the error its family's way. Everything here is pure over
state fixed at load (tokenizer, context window, vocabulary size), so it is thread-safe and runs
in worker threads, off the event loop and off the step thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from loomlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loomlm.lora.request import LoRARequest
    from loomlm.pooling_params import PoolingParams


class EncodedPrompt(NamedTuple):
    """A prompt tokenized and validated by `InputProcessor.encode`."""

    text: str | None  # the prompt text; None when it was given as token ids
    token_ids: list[int]


@dataclass(frozen=True)
class EngineRequest:
    """A request as every face hands it to the engine, checked and tokenized once by
    `InputProcessor.process` (vLLM v1's EngineCoreRequest): the engine queues it as is."""

    request_id: str
    prompt: EncodedPrompt
    params: SamplingParams
    lora_request: LoRARequest | None = None
    # With params.prompt_logprobs: positions before this one need none (see LLMEngine.add_request).
    prompt_logprobs_from: int = 0
    arrival_time: float = field(default_factory=time.time)  # seconds since the epoch
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # params.bad_words, tokenized
    pooling_params: PoolingParams | None = None  # an embedding request (its params: one greedy token)
    priority: int = 0  # scheduling_policy "priority": lower runs first


class ContextWindowError(ValueError):
    """A prompt, or a prompt plus the completion asked for, longer than the context window.

    Carries the numbers, so that each face words the error as its API family does (TGI's
    "`inputs` tokens + `max_new_tokens` must be <= ..."); `str()` is vLLM's OpenAI server message.
    `requested` is None when the prompt alone leaves no room for a completion.
    """

    def __init__(self, max_model_len: int, prompt_tokens: int, requested: int | None = None) -> None:
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.requested = requested
        head = f"This model's maximum context length is {max_model_len} tokens. However, "
        if requested is None:
            message = (f"your request has {prompt_tokens} input tokens. Please reduce the length of the input "
                       "messages.")
        else:
            message = (f"you requested {prompt_tokens + requested} tokens ({prompt_tokens} in the messages, "
                       f"{requested} in the completion). Please reduce the length of the messages or completion.")
        super().__init__(head + message)


class InputProcessor:
    """Validates and tokenizes requests against one loaded model. Thread-safe.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: the model's vocabulary (logits width); token ids must lie in [0, vocab_size).
        max_model_len: the context window in tokens (prompt + completion).
        max_logprobs: the most logprobs a request may ask for per position.
        structured_outputs: returns the constraint compiler (made on first use by the engine),
            which checks a request's structured-output spec.
        lora_enabled: whether requests may name adapters (the engine's enable_lora).
    """

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, max_logprobs: int,
                 structured_outputs: Callable[[], object], lora_enabled: bool = False,
                 priority_enabled: bool = False) -> None:
        self.tokenizer = tokenizer
        self.priority_enabled = priority_enabled
        self.lora_enabled = lora_enabled
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.max_token_chars = max_token_chars(tokenizer)
        self._structured_outputs = structured_outputs

    def check_token_ids(self, token_ids: Sequence[int], what: str = "prompt token ids") -> None:
        """Raises ValueError unless every id is an int in [0, vocab_size)."""
        for t in token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(f"{what} must be integers in [0, {self.vocab_size}); got {t!r}.")

    def encode(self, prompt: str | list[int] | EncodedPrompt, params: SamplingParams | None = None,
               add_special_tokens: bool = True) -> EncodedPrompt:
        """Tokenize and validate a prompt (and the parameters it will run with) once.

        With `params`, the prompt is truncated to `truncate_prompt_tokens` and the parameters'
        token ids and logprob counts are checked against the model. `add_special_tokens` False:
        text that already holds them (a rendered chat). A text prompt with more characters than
        `max_model_len` tokens can cover is refused before it is tokenized (unless it is to be
        truncated), so a huge prompt costs no tokenizer time.

        Raises ValueError: empty prompt, token ids outside the vocabulary, invalid parameters;
        ContextWindowError (a ValueError): a prompt that leaves no room to generate.
        """
        if isinstance(prompt, EncodedPrompt):
            encoded = prompt
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("The prompt cannot be empty.")
            truncating = params is not None and params.truncate_prompt_tokens is not None
            if not truncating and len(prompt) > self.max_model_len * self.max_token_chars:
                # Every token covers at most max_token_chars characters: this cannot fit.
                raise ValueError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                    f"{len(prompt)} characters, more than {self.max_model_len} tokens can hold. Please reduce the "
                    "length of the prompt.")
            encoded = EncodedPrompt(prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        else:
            token_ids = list(prompt)
            if not token_ids:
                raise ValueError("The prompt cannot be empty.")
            if len(token_ids) > self.max_model_len and (params is None or params.truncate_prompt_tokens is None):
                raise ContextWindowError(self.max_model_len, len(token_ids))
            self.check_token_ids(token_ids)
            encoded = EncodedPrompt(None, token_ids)
        if params is not None:
            params.verify_for_vocab(self.vocab_size, self.max_logprobs)
            if params.structured_outputs is not None:
                self._structured_outputs().validate(params.structured_outputs)
            if params.truncate_prompt_tokens is not None:  # idempotent: safe on an already truncated prompt
                encoded = EncodedPrompt(encoded.text, encoded.token_ids[-params.truncate_prompt_tokens:])
        if len(encoded.token_ids) >= self.max_model_len:
            raise ContextWindowError(self.max_model_len, len(encoded.token_ids))
        return encoded

    def process(self, request_id: str, prompt: str | list[int] | EncodedPrompt, params: SamplingParams,
                lora_request: LoRARequest | None = None, prompt_logprobs_from: int = 0,
                arrival_time: float | None = None, pooling_params: PoolingParams | None = None,
                priority: int = 0) -> EngineRequest:
        """Everything a generation request needs checked and tokenized before the engine queues it:
        `encode` (prompt and parameters), the adapter rule, the bad words' token ids.

        Raises ValueError (ContextWindowError among them) as `encode` does, or for an adapter
        when LoRA is not enabled.
        """
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        if priority != 0 and not self.priority_enabled:
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled "
                             "(--scheduling-policy priority).")
        encoded = self.encode(prompt, params)
        if lora_request is not None and not self.lora_enabled:
            raise ValueError("LoRA adapters need the engine argument enable_lora=True (loomlm serve --enable-lora).")
        return EngineRequest(request_id, encoded, params, lora_request, prompt_logprobs_from,
                             arrival_time or time.time(), self.bad_words_token_ids(params.bad_words or []),
                             pooling_params, priority)

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word tokenized bare and with a leading space (vLLM's bad_words), without duplicates."""
        ids: list[list[int]] = []
        for word in words:
            for variant in (word, " " + word.lstrip()):
                token_ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if token_ids and token_ids not in ids:
                    ids.append(token_ids)
        return ids

    def completion_budget(self, prompt_tokens: int, requested: int | None) -> int:
        """The completion tokens a prompt of `prompt_tokens` may generate: `requested`, or all the
        context window leaves when None (vLLM's OpenAI server). Raises ContextWindowError when the
        prompt leaves no room, or prompt + requested exceeds the window."""
        if prompt_tokens >= self.max_model_len:
            raise ContextWindowError(self.max_model_len, prompt_tokens)
        if requested is None:
            return self.max_model_len - prompt_tokens
        if prompt_tokens + requested > self.max_model_len:
            raise ContextWindowError(self.max_model_len, prompt_tokens, requested)
        return requested

    def room_for(self, prompt_tokens: int, requested: int | None) -> int:
        """The offline API's rule (vLLM's `LLM`): `requested` capped at what the window leaves, so a
        long completion stops with finish_reason "length" instead of being refused."""
        room = self.max_model_len - prompt_tokens
        return room if requested is None else min(room, requested)


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters of text one token covers.

    A vocabulary key has at least as many characters as the text it stands for (byte-level
    keys spell each UTF-8 byte as one character; SentencePiece keys spell the text itself, with
    "▁" for a space). A normalizer may compose up to three characters into one (NFKC: Hangul
    jamo), hence the factor.
    """
    longest = max((len(key) for key in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(backend, "normalizer", None) is not None:
        longest *= 3
    return max(longest, 1)
