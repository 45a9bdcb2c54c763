"""Chat templates: loading a `--chat-template` and rendering a conversation.

Rendering is the tokenizer's own (`transformers`' `apply_chat_template`, Jinja);
this module only adds vLLM's conventions: a template given as a file path or as
Jinja text, `continue_final_message` excluding `add_generation_prompt`, and
template errors reported as `ValueError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_chat_template(value: str | None) -> str | None:
    """A chat template from a file path or inline Jinja text (vLLM's `--chat-template`); None stays None.

    Raises ValueError when `value` is neither a readable file nor Jinja text.
    """
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat template {value!r} is neither a file nor a Jinja template.")


def render_chat(tokenizer, messages: list[dict[str, Any]], chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """The conversation as prompt text (special tokens included, so encode it without adding more).

    chat_template None uses the tokenizer's (the model's). Raises ValueError: no messages,
    no template, or an error raised while rendering.
    """
    if not messages:
        raise ValueError("messages must not be empty.")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message)
    except Exception as exc:  # jinja errors and template-raised exceptions are the caller's input
        raise ValueError(f"Cannot apply the chat template: {exc}") from exc
