"""Per-request sampling parameters, vLLM's `SamplingParams` names and defaults.

Source: vLLM `vllm/sampling_params.py` (v0.8 signature); see
../shared/specs/vllm-openai.md. Invalid values raise `ValueError` at construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loomlm.watermark import WatermarkParams

_SAMPLING_EPS = 1e-5
# Float parameters that must be finite (NaN slips through range checks; inf poisons the logits).
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "typical_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")


@dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's `StructuredOutputsParams`; the older name is `GuidedDecodingParams`).

    Exactly one of: `json` (a JSON schema, dict or JSON text), `regex`, `choice` (the output is
    one of these strings), `grammar` (a Lark grammar, llguidance's dialect), `json_object=True`
    (any JSON object). Compiled to per-step token masks by llguidance. Raises ValueError when
    none or several are given; a schema / regex / grammar the compiler rejects raises
    ValueError when the request is added.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("structured outputs need exactly one of json, regex, choice, grammar or json_object; "
                             f"got {given or 'none'}.")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings.")
            self.choice = list(self.choice)

    @property
    def key(self) -> tuple:
        """A hashable identity of the constraint (the compile cache key)."""
        import json as json_module

        schema = self.json if isinstance(self.json, str) or self.json is None else json_module.dumps(self.json, sort_keys=True)
        return (schema, self.regex, tuple(self.choice) if self.choice else None, self.grammar, bool(self.json_object))


GuidedDecodingParams = StructuredOutputsParams

# vLLM's logprobs_mode values that report log-probabilities (not its raw_logits / processed_logits).
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass
class SamplingParams:
    """How to sample one request's completion(s).

    Attributes:
        n: number of completions returned for the prompt (each an independent sample).
        best_of: sample this many completions and return the `n` with the highest
            cumulative logprob (vLLM v0 semantics); None means `n`.
        presence_penalty: subtracted once from the logit of every token already generated
            (OpenAI's definition), in [-2, 2].
        frequency_penalty: subtracted from a token's logit per time it was generated (OpenAI), in [-2, 2].
        repetition_penalty: CTRL's penalty (Keskar et al. 2019) on tokens of the prompt and the output:
            positive logits are divided by it, negative ones multiplied; 1 disables it.
        temperature: softmax temperature; 0 means greedy (argmax).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 or -1 disables it.
        min_p: drop tokens whose probability is below `min_p` times the top token's.
        seed: seeds a per-request generator, so the same seed gives the same text
            whatever else shares the batch.
        stop: strings that end the completion; the matched string is not returned
            unless `include_stop_str_in_output`.
        stop_token_ids: token ids that end the completion (kept in `token_ids`).
        ignore_eos: keep generating past the end-of-sequence token.
        max_tokens: maximum generated tokens per completion (None: up to the context window).
        min_tokens: the completion may not stop before this many tokens (issue: decoding completeness).
        skip_special_tokens: drop special tokens from the returned text.
        include_stop_str_in_output: keep the matched stop string in the text.
        logprobs: return the sampled token's logprob and this many most likely alternatives
            per generated token (natural log of the model's raw distribution, as vLLM v1).
        prompt_logprobs: the same for every prompt token after the first.
        logprobs_mode: which distribution `logprobs` report: "raw_logprobs" (the model's, before
            any processing; the default) or "processed_logprobs" (the one sampled from: after
            logit_bias, allowed tokens, bad words, penalties, structured output, temperature,
            min-p, typical-p, top-k and top-p). vLLM's engine option of that name, here per request.
        spaces_between_special_tokens: vLLM's detokenization option (spaces around special tokens).
        truncate_prompt_tokens: keep only the last k prompt tokens (left truncation).
        logit_bias: {token_id: bias} added to the logits before sampling (OpenAI; ids may be strings).
        allowed_token_ids: only these token ids may be sampled.
        bad_words: words never generated: each word (and its space-prefixed form) is tokenized and
            its last token is banned wherever the others were just generated (transformers'
            NoBadWordsLogitsProcessor, vLLM's bad_words).
        typical_p: locally typical sampling mass (Meister et al. 2022; TGI / transformers'
            TypicalLogitsWarper), in (0, 1]; 1 disables it.
        watermark: a Kirchenbauer et al. 2023 green-list watermark (True: default gamma/delta).
        structured_outputs: constrain the output to a JSON schema, regex, choice or grammar
            (`guided_decoding` is vLLM's older name for it).
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw_logprobs"
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    typical_p: float = 1.0
    watermark: WatermarkParams | bool | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None
    # Filled by the engine: stop_token_ids plus the tokenizer's EOS id (unless ignore_eos) ...
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # ... and the token-id sequences of bad_words.
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.logit_bias is not None:
            try:  # OpenAI sends the token ids as JSON object keys, i.e. strings
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}.") from None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        if self.guided_decoding is not None:
            if self.structured_outputs is not None and self.structured_outputs != self.guided_decoding:
                raise ValueError("give structured_outputs or its older name guided_decoding, not both.")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be StructuredOutputsParams, got {self.structured_outputs!r}.")
        if self.watermark is False:
            self.watermark = None
        elif self.watermark is not None:
            from loomlm.watermark import WatermarkParams

            if self.watermark is True:
                self.watermark = WatermarkParams()
            elif not isinstance(self.watermark, WatermarkParams):
                raise ValueError(f"watermark must be a bool or WatermarkParams, got {self.watermark!r}.")
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.logit_bias and any(not math.isfinite(v) for v in self.logit_bias.values()):
            raise ValueError("logit_bias values must be finite numbers.")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {list(LOGPROBS_MODES)}, got {self.logprobs_mode!r}.")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.best_of is not None:
            if not isinstance(self.best_of, int) or self.best_of < self.n:
                raise ValueError(
                    f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
            if self.best_of > self.n and self.temperature < _SAMPLING_EPS:
                raise ValueError("best_of must equal n when using greedy sampling (temperature 0).")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        for name in ("top_p", "typical_p"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}.")
        if self.top_k < -1 or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        for name in ("max_tokens", "truncate_prompt_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            # torch.Generator.manual_seed's range.
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}.")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.logit_bias and min(self.logit_bias) < 0:
            raise ValueError(f"logit_bias token ids must be non-negative, got {min(self.logit_bias)}.")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids is not None and empty!")
            if any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be non-negative integers.")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise ValueError("bad_words must be non-empty strings.")

    def verify_for_vocab(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks that need the model: token ids in [0, vocab_size), logprobs <= max_logprobs.

        Raises ValueError (called by the engine before anything is queued).
        """
        for name, k in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if k is not None and k > max_logprobs:
                raise ValueError(f"Requested {name} of {k}, which is greater than max allowed: {max_logprobs}.")
        for name, ids in (("logit_bias", self.logit_bias or ()), ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} contains token id {bad[0]}, out of vocabulary (size {vocab_size}).")

    @property
    def needs_sampled_logprob(self) -> bool:
        """Whether each sampled token's logprob must be computed (for `logprobs` or best_of ranking)."""
        return self.logprobs is not None or (self.best_of is not None and self.best_of > self.n)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def clone(self, **changes) -> SamplingParams:
        """A copy with `changes` applied (re-validated)."""
        return replace(self, **changes)
