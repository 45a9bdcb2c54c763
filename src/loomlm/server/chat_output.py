"""One chat choice's text read as OpenAI's assistant message: reasoning, content and tool calls.

The reasoning parsers follow vLLM's (`--reasoning-parser`, vllm/reasoning/): the model thinks
between `<think>` and `</think>`, and that text becomes `reasoning_content`, the rest `content`.

- `deepseek_r1` (DeepSeek-R1 and its distills, whose template may already open `<think>` in the
  prompt): everything before `</think>` is reasoning (a leading `<think>` dropped); without
  `</think>` the whole text is reasoning (it never stopped thinking), content None.
- `qwen3` (Qwen3, `enable_thinking`): reasoning only when the text opens with `<think>`;
  otherwise it is all content (thinking switched off). A `<think>` never closed is reasoning
  (vLLM would then call it content, which a stream that already sent it as reasoning cannot).

Tool calls are then read out of the content (`loomlm.server.tool_parsers`). Like the tool
parsers, the split is monotone in the text (a partial `</think>` is held back), so a stream is
the diffs of successive reads and reassembles to the whole message.
"""

from __future__ import annotations

from dataclasses import dataclass

from loomlm.server.tool_parsers import ToolCallState, held_back

REASONING_PARSERS = ("deepseek_r1", "qwen3")
_START, _END = "<think>", "</think>"


def split_reasoning(parser: str, text: str, finished: bool) -> tuple[str, str]:
    """(reasoning so far, the text after it so far) of `text` under `parser`."""
    stripped = text.lstrip()
    opened = stripped.startswith(_START)
    if parser == "qwen3" and not opened:
        if not finished and _START.startswith(stripped):
            return "", ""  # may still open
        return "", text
    body = stripped[len(_START):] if opened else text
    if parser == "deepseek_r1" and not opened and not finished and stripped and _START.startswith(stripped):
        return "", ""  # may still be the opening tag
    end = body.find(_END)
    if end < 0:
        return (body if finished else held_back(body, _END)), ""
    return body[:end], body[end + len(_END):]


@dataclass
class ChatOutputState:
    """How one choice's text becomes the assistant message (reasoning, content, tool calls),
    whole (`message`) or as stream deltas (`delta`). `tools` None: no tool parsing (mode "none")."""

    tools: ToolCallState | None = None
    reasoning_parser: str | None = None
    sent_reasoning: int = 0

    def __post_init__(self) -> None:
        if self.tools is None:
            self.tools = ToolCallState("none")

    def fresh(self) -> ChatOutputState:
        """A new state of the same configuration, for another choice."""
        return ChatOutputState(self.tools.fresh(), self.reasoning_parser)

    def _split(self, text: str, finished: bool) -> tuple[str, str]:
        if self.reasoning_parser is None:
            return "", text
        return split_reasoning(self.reasoning_parser, text, finished)

    def message(self, text: str) -> tuple[str | None, str | None, list[dict]]:
        """The finished text -> (reasoning_content, content, OpenAI tool_calls); None for an empty part."""
        reasoning, rest = self._split(text, finished=True)
        content, calls = self.tools.message(rest)
        if reasoning and not content:
            content = None
        return reasoning or None, content, calls

    def delta(self, text: str, finished: bool) -> tuple[str, str, list[dict]]:
        """The text so far -> (reasoning to append, content to append, DeltaToolCall dicts) since the last call."""
        reasoning, rest = self._split(text, finished)
        reasoning_delta = reasoning[self.sent_reasoning:]
        self.sent_reasoning = len(reasoning)
        return (reasoning_delta, *self.tools.delta(rest, finished))

    def finish_reason(self, finish_reason: str | None) -> str | None:
        """OpenAI's "tool_calls" for a choice that stopped after calling tools of its own choice
        (auto, required); a named function's call ends with "stop", as OpenAI's."""
        if self.tools.called and self.tools.mode in ("auto", "required") and finish_reason == "stop":
            return "tool_calls"
        return finish_reason
