"""The request bounds without a model: strict JSON bodies, memory sizes, per-field caps, adapter
roots (no file-system oracle), finite sampling parameters and the chat-template time limit."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from loomlm.chat_utils import render_chat
from loomlm.lora.source import resolve_adapter
from loomlm.sampling_params import SamplingParams, StructuredOutputsParams
from loomlm.server.limits import BodyProblem, ServerLimits, check_json_body, parse_memory_size, process_rss_bytes


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
    ('{"prompt": "x"}'.encode("utf-16"), "not valid UTF-8"),
    (b'{"temperature": NaN}', "NaN is not a JSON number"),
    (b'{"temperature": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"temperature": 1e400}', "out of range"),
    (b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"\\udfff": 1}', "lone UTF-16 surrogate"),
    (b'{"n": ' + b"9" * 5000 + b"}", "Invalid JSON body"),
    (b'{"p": ' + b"[" * 65 + b"]" * 65 + b"}", "nested more than 64 levels"),
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 64 levels"),
])
def test_bodies_that_are_not_strict_json_are_refused(body, reason):
    with pytest.raises(BodyProblem, match=reason):
        check_json_body(body, max_depth=64)


@pytest.mark.parametrize("body", [
    b'{"prompt": "caf\xc3\xa9 \\ud83e\\udd99", "temperature": 0.5, "n": 12345678901234567890}',
    b'{"p": ' + b"[" * 63 + b"]" * 63 + b"}",  # 64 levels, the object included
    b"not json at all",  # left to FastAPI's own parse, which reports it in the family's format
    b'{"truncated": ',
])
def test_strict_json_and_non_json_pass(body):
    check_json_body(body, max_depth=64)


def test_memory_sizes():
    assert parse_memory_size("1024") == 1024
    assert parse_memory_size("20GiB") == 20 << 30
    assert parse_memory_size("20G") == 20 << 30
    assert parse_memory_size("512MB") == 512 * 10**6
    assert parse_memory_size("0") == 0
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < parse_memory_size("50%") <= total // 2 + 1
    for bad in ("lots", "-1G", "150%", "nanG"):
        with pytest.raises(ValueError):
            parse_memory_size(bad)
    assert process_rss_bytes() > 10 << 20  # this Python process


def test_default_memory_ceiling_is_90_percent_of_the_machine():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ceiling = ServerLimits().max_process_memory_bytes
    assert ceiling is not None and 0 < ceiling <= int(total * 0.9)


def test_sampling_caps_name_the_field():
    limits = ServerLimits()
    cases = [
        (SamplingParams(n=129), "n must be at most 128"),
        (SamplingParams(n=2, best_of=21, temperature=1.0), "best_of must be at most 20"),
        (SamplingParams(stop=[f"s{i}" for i in range(65)]), "stop has 65 strings"),
        (SamplingParams(stop=["x" * 1025]), "stop has a string of 1025 characters"),
        (SamplingParams(bad_words=["w"] * 65), "bad_words has 65 strings"),
        (SamplingParams(stop_token_ids=list(range(4097))), "stop_token_ids has 4097 entries"),
        (SamplingParams(logit_bias={i: 1.0 for i in range(4097)}), "logit_bias has 4097 entries"),
        (SamplingParams(structured_outputs=StructuredOutputsParams(regex="a" * 200_000)), "structured_outputs is"),
        (SamplingParams(structured_outputs=StructuredOutputsParams(
            json={"enum": ["x" * 1000] * 200})), "structured_outputs is"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            limits.check_params(params)
    limits.check_params(SamplingParams(n=128, stop=["a"] * 64, logit_bias={1: 5.0}))
    with pytest.raises(ValueError, match="best_of must be at most 2"):
        limits.check_params(SamplingParams(n=1, best_of=3, temperature=1.0), max_best_of=2)
    with pytest.raises(ValueError, match="model is 257 characters long"):
        limits.check_name("model", "m" * 257)
    with pytest.raises(ValueError, match="NUL"):
        limits.check_name("adapter_id", "a\x00b")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"top_p": float("nan")}, "top_p"),
    ({"logit_bias": {1: float("inf")}}, "logit_bias"),
    ({"seed": 1 << 64}, "seed"),
    ({"seed": -(1 << 63) - 1}, "seed"),
])
def test_sampling_params_refuse_values_that_would_break_a_step(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_seeds_at_the_edges_of_torchs_range_are_accepted():
    SamplingParams(seed=(1 << 64) - 1, temperature=1.0)
    SamplingParams(seed=-(1 << 63), temperature=1.0)


def _adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return path


def test_local_adapters_resolve_only_under_the_roots(tmp_path):
    root = tmp_path / "root"
    good = _adapter(root / "team" / "good")
    outside = _adapter(tmp_path / "outside")
    (root / "escape").symlink_to(outside)
    (root / "inside-link").symlink_to(good)
    roots = (str(root),)
    # Inside: by absolute path, by path relative to a root, through a symlink that stays inside.
    assert resolve_adapter(str(good), "local", allowed_roots=roots) == str(good.resolve())
    assert resolve_adapter("team/good", "local", allowed_roots=roots) == str(good.resolve())
    assert resolve_adapter("team/good", None, allowed_roots=roots) == str(good.resolve())
    assert resolve_adapter("inside-link", "local", allowed_roots=roots) == str(good.resolve())
    # Outside, existing or not: one message, which says nothing about existence.
    refused = [str(outside), "/etc", "/nonexistent-dir-xyz", "~", "../outside", "team/../../outside", "escape",
               str(root / "escape"), str(root), ".", "/proc/self/cwd", "team/missing"]
    messages = set()
    for adapter_id in refused:
        with pytest.raises(ValueError, match="is not an adapter directory under the server's adapter roots") as info:
            resolve_adapter(adapter_id, "local", allowed_roots=roots)
        messages.add(str(info.value).replace(repr(adapter_id), "ID"))
    assert len(messages) == 1
    # No roots at all: every local id from a request is refused.
    with pytest.raises(ValueError, match="adapter roots"):
        resolve_adapter(str(good), "local", allowed_roots=())
    # The operator's own ids (allowed_roots None) may be anywhere.
    assert resolve_adapter(str(outside), "local") == str(outside.resolve())


def test_ids_that_are_no_local_adapter_fall_to_the_hub_cache_without_touching_their_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    answers = []
    for adapter_id in ("/etc", "/nonexistent-dir-xyz"):
        with pytest.raises(ValueError) as info:
            resolve_adapter(adapter_id, None, allowed_roots=())
        answers.append(str(info.value).replace(repr(adapter_id), "ID"))
    assert answers[0] == answers[1] and "source hub" in answers[0]


def test_request_chat_templates_are_stopped_at_their_time_limit():
    from conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(tokenizer, messages, timeout_s=1.0) == render_chat(tokenizer, messages)
    for template in ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                     "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"):
        start = time.monotonic()
        with pytest.raises(ValueError, match="took longer than 0.5 s"):
            render_chat(tokenizer, messages, template, timeout_s=0.5)
        assert time.monotonic() - start < 5.0
