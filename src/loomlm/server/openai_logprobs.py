"""Engine logprobs -> the OpenAI wire formats (completions and chat), and echo.

Source: the OpenAI API reference and vLLM's `serving_completion.py`
(`_create_completion_logprobs`) and `serving_chat.py` (`_create_chat_logprobs`):
logprobs are clamped at -9999.0 so that -inf never reaches JSON; completions'
`top_logprobs` hold the chosen token and its top-k alternatives keyed by token
text; chat's `top_logprobs` hold the top-k by rank; `text_offset` counts
characters from the start of the choice's text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import islice

from loomlm.outputs import Logprob, RequestOutput, json_logprob
from loomlm.protocol.openai import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
    PromptLogprob,
)

def _text(token_id: int, lp: Logprob | None, token_text: Callable[[int], str]) -> str:
    """The entry's decoded token, else the token decoded on its own."""
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else token_text(token_id)


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob] | None], num_top: int,
                        token_text: Callable[[int], str], initial_text_offset: int = 0) -> CompletionLogProbs:
    """token_ids[i] with its entry logprobs[i] (None: no logprob, the first echoed prompt token).

    token_text(token_id) -> str decodes one token. Offsets start at `initial_text_offset` (characters).
    """
    out = CompletionLogProbs()
    offset = initial_text_offset
    for token_id, entry in zip(token_ids, logprobs):
        text = _text(token_id, entry[token_id] if entry else None, token_text)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(json_logprob(entry[token_id].logprob))
        top: dict[str, float] = {}
        for tid, lp in islice(entry.items(), num_top + 1):  # the chosen token, then num_top alternatives
            top.setdefault(_text(tid, lp, token_text), json_logprob(lp.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int,
                  token_text: Callable[[int], str]) -> ChatCompletionLogProbs:
    """Chat `logprobs.content`: one entry per generated token, `top_logprobs` its top `num_top` by rank."""
    def fields(token_id: int, lp: Logprob) -> dict:
        text = _text(token_id, lp, token_text)
        return {"token": text, "logprob": json_logprob(lp.logprob), "bytes": list(text.encode())}

    content = []
    for token_id, entry in zip(token_ids, logprobs):
        ranked = sorted((lp.rank, tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= num_top)
        top = [ChatCompletionLogProb(**fields(tid, lp)) for _, tid, lp in ranked]
        content.append(ChatCompletionLogProbsContent(**fields(token_id, entry[token_id]), top_logprobs=top))
    return ChatCompletionLogProbs(content=content)


def prompt_logprobs_json(prompt_logprobs: list[dict[int, Logprob] | None] | None
                         ) -> list[dict[int, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs` field: per prompt token {token_id: {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else
            {tid: PromptLogprob(logprob=json_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
             for tid, lp in entry.items()} for entry in prompt_logprobs]


def echoed(output: RequestOutput, prompt_text: str, keep_generated: bool) -> RequestOutput:
    """`output` with the prompt prepended to every completion (OpenAI `echo`).

    Text, token ids and (when present) logprobs all start with the prompt's; with
    keep_generated False (`max_tokens: 0`), the completion is the prompt alone.
    """
    completions = []
    for c in output.outputs:
        ids = c.token_ids if keep_generated else []
        logprobs = None
        if c.logprobs is not None:
            logprobs = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + (
                c.logprobs if keep_generated else [])
        completions.append(replace(
            c, text=prompt_text + (c.text if keep_generated else ""), token_ids=list(output.prompt_token_ids) + ids,
            logprobs=logprobs, finish_reason=c.finish_reason if keep_generated or c.finish_reason is None else "length",
            stop_reason=c.stop_reason if keep_generated else None))
    return replace(output, outputs=completions)

