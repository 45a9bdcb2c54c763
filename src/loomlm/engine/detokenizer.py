"""Incremental detokenization with stop strings.

Follows vLLM/TGI's `detokenize_incrementally`: decode a short window of token
ids (prefix_offset..end) and emit only the part beyond the previously decoded
window (prefix_offset..read_offset), so each step costs O(window), multi-byte
characters split across tokens are held back until complete (no U+FFFD), and
word-boundary spaces come out right for SentencePiece tokenizers too (the
window starts a few tokens into the prompt).

Stop strings: searched only in the newly decoded tail; the text is cut before
the match (or after it with include_stop_str_in_output). While a request runs,
the last `len(longest stop) - 1` characters are withheld from streamed text
so that a partial stop string is never sent (vLLM's stop buffer).
"""

from __future__ import annotations

import copy

# How many prompt tokens the first window reaches back (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_INITIAL_OFFSET = 5


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, a token at a time, and finds stop strings."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], include_stop_str_in_output: bool,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids[-_INITIAL_OFFSET:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.output_text = ""
        self.stop_buffer_len = max((len(s) for s in stop), default=1) - 1

    def fork(self) -> IncrementalDetokenizer:
        """An independent copy (same tokenizer, own token list) for a forked sequence."""
        child = copy.copy(self)
        child.token_ids = list(self.token_ids)
        return child

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     spaces_between_special_tokens=self.spaces_between_special_tokens)

    def update(self, token_id: int) -> str | None:
        """Adds one generated token; returns the matched stop string if the text now contains one."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # incomplete UTF-8 sequence or nothing visible yet
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        old_len = len(self.output_text)
        self.output_text += delta
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> str | None:
        for stop in self.stop:
            start = max(0, old_len - len(stop) + 1)
            idx = self.output_text.find(stop, start)
            if idx != -1:
                end = idx + len(stop) if self.include_stop_str_in_output else idx
                self.output_text = self.output_text[:end]
                return stop
        return None

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: everything once finished, else minus the stop buffer."""
        if finished or not self.stop_buffer_len:
            return self.output_text
        return self.output_text[: max(0, len(self.output_text) - self.stop_buffer_len)]
