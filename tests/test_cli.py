"""The `loomlm` command, run as a subprocess the way a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"


def _loomlm() -> list[str]:
    """The installed console script next to this interpreter, else `python -m loomlm.cli`."""
    script = Path(sys.executable).with_name("loomlm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loomlm.cli"]


def test_serve_help_lists_flags() -> None:
    result = subprocess.run([*_loomlm(), "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in (
        "--host",
        "--port",
        "--served-model-name",
        "--chat-template",
        "--max-model-len",
        "--kv-cache-memory-bytes",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--dtype",
        "--quantization",
    ):
        assert flag in result.stdout


def test_invalid_value_exits_with_status_2() -> None:
    result = subprocess.run(
        [*_loomlm(), "generate", PROMPT, "--temperature", "-1"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "temperature" in result.stderr


def test_missing_chat_template_file_exits_with_status_2(tmp_path: Path) -> None:
    result = subprocess.run([*_loomlm(), "serve", "--chat-template", str(tmp_path / "absent.jinja")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "chat template" in result.stderr


def test_load_chat_template_from_file_or_text(tmp_path: Path) -> None:
    from loomlm.chat_utils import load_chat_template

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_chat_template(str(path)) == template
    assert load_chat_template(template) == template
    assert load_chat_template(None) is None
    # vLLM's keyword names: chat_template=, and is_literal= for a value that is the template itself
    assert load_chat_template(chat_template=path) == template
    assert load_chat_template(chat_template="not a path", is_literal=True) == "not a path"
    with pytest.raises(TypeError):
        load_chat_template(path, is_literal=True)
    with pytest.raises(ValueError):
        load_chat_template(chat_template="no/such/template.jinja")


def test_generate_prints_the_greedy_completion() -> None:
    from loomlm import LLM, SamplingParams

    result = subprocess.run(
        [*_loomlm(), "generate", PROMPT, "--max-tokens", "8", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    [output] = LLM(model=MODEL).generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    expected = output.outputs[0].text
    assert expected.strip()
    assert result.stdout == expected + "\n"


def test_score_prints_each_value_with_its_log_probability() -> None:
    import loomlm

    result = subprocess.run(
        [*_loomlm(), "score", "The capital of France is", " Paris", " Berlin", "--agg", "sum"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    with loomlm.model(MODEL) as model:
        expected = model.score_sync("The capital of France is", [" Paris", " Berlin"]).scores("sum")
    lines = result.stdout.splitlines()
    assert lines[0] == f"loomlm.ScoringResult(model='{MODEL}')"
    printed = [float(line.rsplit(": ", 1)[1]) for line in lines[1:]]
    assert [line.split(":")[0] for line in lines[1:]] == ["- Paris", "- Berlin"]
    assert printed == [round(float(s), 4) for s in expected] and printed[0] > printed[1]


def test_serve_enables_lora_unless_disabled() -> None:
    """As in LoRAX, `loomlm serve` answers requests naming an adapter without any flag;
    --enable-lora (vLLM's) is still accepted, --disable-lora turns LoRA off."""
    from loomlm.cli import build_parser, serve_engine_kwargs

    parser = build_parser()
    assert serve_engine_kwargs(parser.parse_args(["serve"]))["enable_lora"] is True
    assert serve_engine_kwargs(parser.parse_args(["serve", "--enable-lora"]))["enable_lora"] is True
    assert serve_engine_kwargs(parser.parse_args(["serve", "--disable-lora"]))["enable_lora"] is False
    with pytest.raises(ValueError, match="--adapter-ids"):
        serve_engine_kwargs(parser.parse_args(["serve", "--disable-lora", "--adapter-ids", "x"]))


def test_serve_flags_of_the_new_faces_reach_the_engine_and_app() -> None:
    """vLLM's names: --scheduling-policy, --override-pooler-config (or --pooling), --tool-call-parser,
    --enable-auto-tool-choice, --reasoning-parser."""
    from loomlm.cli import build_parser, serve_engine_kwargs
    from loomlm.config import EngineConfig

    parser = build_parser()
    args = parser.parse_args(["serve", "--scheduling-policy", "priority", "--pooling", "MEAN",
                              "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                              "--reasoning-parser", "qwen3"])
    kwargs = serve_engine_kwargs(args)
    config = EngineConfig.from_kwargs(**kwargs)
    assert config.scheduler_config.scheduling_policy == "priority"
    assert config.model_config.override_pooler_config == {"pooling_type": "MEAN"}
    assert (args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser) == (True, "hermes", "qwen3")
    json_args = parser.parse_args(["serve", "--override-pooler-config", '{"pooling_type": "MEAN", "normalize": false}'])
    assert EngineConfig.from_kwargs(**serve_engine_kwargs(json_args)).model_config.override_pooler_config == {
        "pooling_type": "MEAN", "normalize": False}
    with pytest.raises(ValueError, match="not both"):
        serve_engine_kwargs(parser.parse_args(["serve", "--pooling", "LAST", "--override-pooler-config", "{}"]))
