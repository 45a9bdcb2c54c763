"""InputProcessor (engine/input_processor.py): the request rules every face shares, without a model.

The context-window rule is checked here once; the faces only word its ContextWindowError their
family's way (the server tests check each family's text and status).
"""

from __future__ import annotations

import pytest
from conftest import build_tiny_tokenizer

from loomlm.engine.input_processor import ContextWindowError, EncodedPrompt, InputProcessor
from loomlm.sampling_params import SamplingParams, StructuredOutputsParams


class _Spy:
    """Counts structured-output validations."""

    def __init__(self) -> None:
        self.specs = []

    def validate(self, spec) -> None:
        self.specs.append(spec)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _processor(tokenizer, max_model_len: int = 32, spy: _Spy | None = None) -> InputProcessor:
    return InputProcessor(tokenizer, len(tokenizer), max_model_len, max_logprobs=5,
                          structured_outputs=lambda: spy or _Spy())


def test_completion_budget_is_the_servers_rule(tokenizer):
    p = _processor(tokenizer, max_model_len=32)
    assert p.completion_budget(10, None) == 22  # all the window leaves
    assert p.completion_budget(10, 22) == 22
    with pytest.raises(ContextWindowError) as info:
        p.completion_budget(10, 23)
    e = info.value
    assert (e.max_model_len, e.prompt_tokens, e.requested) == (32, 10, 23)
    assert str(e) == ("This model's maximum context length is 32 tokens. However, you requested 33 tokens "
                      "(10 in the messages, 23 in the completion). Please reduce the length of the messages or "
                      "completion.")
    with pytest.raises(ContextWindowError) as info:
        p.completion_budget(32, None)
    assert info.value.requested is None and "your request has 32 input tokens" in str(info.value)
    assert isinstance(info.value, ValueError)  # offline callers see a ValueError


def test_room_for_is_the_offline_rule(tokenizer):
    p = _processor(tokenizer, max_model_len=32)
    assert p.room_for(10, None) == 22
    assert p.room_for(10, 5) == 5
    assert p.room_for(10, 100) == 22  # capped: the request stops with finish_reason "length"


def test_encode_validates_once(tokenizer):
    spy = _Spy()
    p = _processor(tokenizer, max_model_len=32, spy=spy)
    encoded = p.encode("hello world")
    assert encoded == EncodedPrompt("hello world", tokenizer.encode("hello world"))
    assert p.encode(encoded) is encoded  # already encoded: passed through
    assert p.encode([1, 2, 3]) == EncodedPrompt(None, [1, 2, 3])
    for bad in ("", []):
        with pytest.raises(ValueError, match="cannot be empty"):
            p.encode(bad)
    vocab = len(tokenizer)
    for bad_id in (-1, vocab, 2.5, True, "7"):
        with pytest.raises(ValueError, match=rf"prompt token ids must be integers in \[0, {vocab}\)"):
            p.encode([1, bad_id])
    with pytest.raises(ContextWindowError):
        p.encode(list(range(1, 33)))  # 32 tokens leave no room in a 32-token window
    truncated = p.encode(list(range(1, 41)), SamplingParams(truncate_prompt_tokens=8))
    assert truncated.token_ids == list(range(33, 41))
    with pytest.raises(ValueError, match="logprobs"):
        p.encode([1, 2], SamplingParams(logprobs=6))  # above max_logprobs
    p.encode([1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"})))
    assert len(spy.specs) == 1


def test_a_huge_text_prompt_is_refused_before_tokenization(tokenizer):
    p = _processor(tokenizer, max_model_len=32)
    huge = "x" * (32 * p.max_token_chars + 1)

    class NoEncode:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, *args, **kwargs):
            raise AssertionError("tokenized a prompt that cannot fit")

    p.tokenizer = NoEncode()
    with pytest.raises(ValueError, match="maximum context length is 32 tokens.*characters"):
        p.encode(huge)


def test_check_token_ids_names_the_field(tokenizer):
    p = _processor(tokenizer)
    p.check_token_ids([0, len(tokenizer) - 1], "tokens")
    with pytest.raises(ValueError, match=r"^tokens must be integers"):
        p.check_token_ids([len(tokenizer)], "tokens")


def test_process_makes_the_engine_request(tokenizer):
    p = _processor(tokenizer)
    params = SamplingParams(max_tokens=4, bad_words=["hello", "hello"])
    request = p.process("r1", "hello world", params, prompt_logprobs_from=2, arrival_time=123.0)
    assert request.request_id == "r1" and request.prompt == p.encode("hello world")
    assert request.params is params and request.lora_request is None
    assert (request.prompt_logprobs_from, request.arrival_time) == (2, 123.0)
    # vLLM's bad_words: bare and with a leading space, each once
    expected = [tokenizer.encode("hello", add_special_tokens=False), tokenizer.encode(" hello", add_special_tokens=False)]
    assert request.bad_words_token_ids == [ids for i, ids in enumerate(expected) if ids not in expected[:i]]
    from loomlm.lora.request import LoRARequest

    with pytest.raises(ValueError, match="enable_lora=True"):
        p.process("r2", "hi", params, LoRARequest("a", 1, "/nowhere"))
    with pytest.raises(ContextWindowError):
        p.process("r3", list(range(1, 40)), params)
