"""Chat templates: loading a `--chat-template` and rendering a conversation.

Rendering is the tokenizer's own (`transformers`' `apply_chat_template`, Jinja);
this module only adds vLLM's conventions: a template given as a file path or as
Jinja text, `continue_final_message` excluding `add_generation_prompt`, and
template errors reported as `ValueError`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any


def load_chat_template(chat_template: Path | str | None, *, is_literal: bool = False) -> str | None:
    """A chat template from a file path or inline Jinja text (vLLM's `--chat-template` and its
    `vllm.entrypoints.chat_utils.load_chat_template`); None stays None. `is_literal`: the value
    is the template itself, never a path.

    Raises ValueError when the value is neither a readable file nor Jinja text; TypeError for a
    Path with is_literal (as vLLM).
    """
    if chat_template is None:
        return None
    if is_literal:
        if isinstance(chat_template, Path):
            raise TypeError("chat_template is expected to be read directly from its value")
        return chat_template
    path = Path(chat_template)
    if path.is_file():
        return path.read_text()
    if isinstance(chat_template, str) and ("{{" in chat_template or "{%" in chat_template):
        return chat_template
    raise ValueError(f"chat template {str(chat_template)!r} is neither a file nor a Jinja template.")


class ChatTemplateTimeout(Exception):
    """A chat template ran past its time limit (raised inside the rendering thread)."""


@contextmanager
def _deadline(timeout_s: float) -> Iterator[None]:
    """Raise ChatTemplateTimeout in this thread's Python code once `timeout_s` have passed.

    A trace function (this thread only) checks the clock on every line and call, so a template
    looping without output (`{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}...`)
    is stopped too; raising from it unsets it. Rendering under it runs a few times slower, which
    only request-supplied templates pay.
    """
    deadline = time.monotonic() + timeout_s

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise ChatTemplateTimeout(f"the chat template took longer than {timeout_s:g} s to render.")
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_chat(tokenizer, messages: list[dict[str, Any]], chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                timeout_s: float | None = None, tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as prompt text (special tokens included, so encode it without adding more).

    chat_template None uses the tokenizer's (the model's). `timeout_s`: the rendering time
    allowed (for templates sent by clients); blocking, so servers call it in a worker thread.
    `tools`: OpenAI tool definitions, handed to the template as `tools` (transformers'
    `apply_chat_template(tools=...)`; a template that does not read them ignores them).
    Raises ValueError: no messages, no template, an error raised while rendering, or the time
    limit passed.
    """
    if not messages:
        raise ValueError("messages must not be empty.")
    try:
        with _deadline(timeout_s) if timeout_s is not None else nullcontext():
            return tokenizer.apply_chat_template(
                messages, tokenize=False, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, tools=tools)
    except ChatTemplateTimeout as exc:
        raise ValueError(f"Cannot apply the chat template: {exc}") from None
    except Exception as exc:  # jinja errors and template-raised exceptions are the caller's input
        raise ValueError(f"Cannot apply the chat template: {exc}") from exc
