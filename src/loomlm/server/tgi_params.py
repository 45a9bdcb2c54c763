"""LoRAX / TGI `parameters` -> `SamplingParams` and the response options, with the routers' checks.

Source: LoRAX's and TGI's `router/src/validation.rs` (ranges and messages) and
`server/.../utils/tokens.py` (`NextTokenChooser`: sampling is on when `do_sample` is set or
any warper is: temperature, top_k, top_p, typical_p). Every problem is a ValueError, which the
router answers with 422 `{"error", "error_type": "validation"}`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loomlm.protocol.structured_outputs import from_lorax, from_tgi
from loomlm.protocol.tgi import GenerateParameters
from loomlm.sampling_params import SamplingParams

# The routers' defaults (LoRAX / TGI launcher flags).
MAX_BEST_OF = 2
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class TGIPlan:
    """How to run one generate request and shape its answer.

    Attributes:
        params: the engine's parameters (n = best_of; logprobs when details are asked for).
        seed: the seed reported in `details.seed` (sequence i used seed + i); None when greedy.
        details: answer with `details` (always on for streams: every token event has a logprob).
        decoder_input_details: `details.prefill` with the prompt tokens' logprobs.
        return_full_text: prepend the prompt to `generated_text`.
        num_alternatives: LoRAX's return_k_alternatives (per token `alternative_tokens`).
        top_n_tokens: TGI's top_n_tokens (`details.top_tokens` / an event's `top_tokens`).
    """

    params: SamplingParams
    seed: int | None
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    num_alternatives: int | None
    top_n_tokens: int | None


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"`{name}` must be strictly positive")


def _open_unit(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be > 0.0 and < 1.0")


def plan_generation(p: GenerateParameters | None, stream: bool, max_logprobs: int) -> TGIPlan:
    """Check LoRAX / TGI parameters and translate them (see the module docstring).

    `max_new_tokens` None leaves the limit to the context window, as LoRAX does.
    Raises ValueError with the routers' messages for out-of-range values.
    """
    p = p or GenerateParameters()
    if p.temperature is not None and p.temperature < 0:
        raise ValueError("`temperature` must be non-negative")
    _positive("repetition_penalty", p.repetition_penalty)
    _positive("top_k", p.top_k)
    _open_unit("top_p", p.top_p)
    _open_unit("typical_p", p.typical_p)
    _positive("truncate", p.truncate)
    _positive("max_new_tokens", p.max_new_tokens)
    _positive("return_k_alternatives", p.return_k_alternatives)
    _positive("top_n_tokens", p.top_n_tokens)
    if p.seed is not None and p.seed < 0:
        raise ValueError("`seed` must be positive")
    stop = list(p.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ValueError(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(stop)}")
    for name, value in (("return_k_alternatives", p.return_k_alternatives), ("top_n_tokens", p.top_n_tokens)):
        if value is not None and value > max_logprobs:
            raise ValueError(f"`{name}` must be <= {max_logprobs}. Given: {value}")
    sampling = bool(p.do_sample) or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    if p.temperature == 0:
        sampling = False  # LoRAX accepts 0: greedy
    best_of = p.best_of or 1
    if best_of < 1 or best_of > MAX_BEST_OF:
        raise ValueError(f"`best_of` must be > 0 and <= {MAX_BEST_OF}. Given: {best_of}")
    if best_of > 1:
        if not sampling:
            raise ValueError("you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise ValueError("`seed` must not be set when `best_of` is > 1")
        if stream:
            raise ValueError("`best_of` != 1 is not supported when `stream` == True")
    if p.response_format is not None and p.grammar is not None:
        raise ValueError("give `response_format` (LoRAX) or `grammar` (TGI), not both")
    structured = from_lorax(p.response_format) if p.response_format is not None else from_tgi(p.grammar)

    # TGI draws a seed when sampling without one, and reports it.
    seed = (p.seed if p.seed is not None else random.getrandbits(63)) if sampling else None
    details = bool(p.details) or stream or best_of > 1
    num_top = max(p.return_k_alternatives or 0, p.top_n_tokens or 0)
    params = SamplingParams(
        n=best_of,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
        top_k=p.top_k if sampling and p.top_k is not None else 0,
        top_p=p.top_p if sampling and p.top_p is not None else 1.0,
        typical_p=p.typical_p if sampling and p.typical_p is not None else 1.0,
        seed=seed,
        max_tokens=p.max_new_tokens,
        stop=stop,
        include_stop_str_in_output=True,  # TGI keeps the stop sequence in the text
        ignore_eos=bool(p.ignore_eos_token),
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        truncate_prompt_tokens=p.truncate,
        watermark=bool(p.watermark),
        logprobs=num_top if details else None,
        prompt_logprobs=0 if p.decoder_input_details else None,
        structured_outputs=structured,
    )
    return TGIPlan(params, seed, details, bool(p.decoder_input_details), bool(p.return_full_text),
                   p.return_k_alternatives, p.top_n_tokens)
