"""Hugging Face repo ids, revisions, separate tokenizers, trust_remote_code and dtype "auto".

No network: each test builds a Hugging Face cache in its tmp dir with the layout huggingface_hub
writes (``models--org--name/{blobs/<sha256>, refs/<branch>, snapshots/<commit>/<file> -> blob}``)
and points ``HF_HUB_CACHE`` / ``HF_HOME`` at it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from loomlm import LLM, SamplingParams
from loomlm.config import ModelConfig
from loomlm.models.loader import checkpoint_dtype, iter_weights, load_tokenizer, resolve_model

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"  # the discard port: connection refused at once
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def add_to_hub_cache(cache_dir: Path, repo_id: str, model_dir: Path, commit: str = COMMIT,
                     branch: str | None = "main") -> Path:
    """Put ``model_dir``'s files in ``cache_dir`` as huggingface_hub stores a downloaded snapshot
    (content-addressed blobs, relative symlinks from the snapshot); returns the snapshot dir."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for file in sorted(model_dir.iterdir()):
        blob = repo_dir / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if branch is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache (HF_HUB_CACHE), offline mode on."""
    cache_dir = tmp_path / "hf-home" / "hub"
    cache_dir.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache_dir


@pytest.fixture
def cached_llama(hub_cache: Path, make_tiny_model_dir: Callable[[str], Path]) -> Path:
    """The tiny llama as ``REPO_ID`` at ``COMMIT`` (branch main) in the cache; its snapshot dir."""
    return add_to_hub_cache(hub_cache, REPO_ID, make_tiny_model_dir("llama"))


def _go_online_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE_ENDPOINT)


# ---------------------------------------------------------------------------
# Repo ids and revisions


def test_repo_id_resolves_to_cached_snapshot(cached_llama: Path, make_tiny_model_dir: Callable[[str], Path]) -> None:
    source = resolve_model(REPO_ID)
    assert source.name == REPO_ID and source.format == "hf"
    assert source.weights_path == source.tokenizer_dir == cached_llama
    assert source.hf_config.model_type == "llama"
    local = dict(iter_weights(resolve_model(str(make_tiny_model_dir("llama")))))
    cached = dict(iter_weights(source))
    assert sorted(cached) == sorted(local)
    assert all(torch.equal(cached[name], local[name]) for name in local)


def test_llm_generates_from_repo_id_like_from_the_directory(
    cached_llama: Path, make_tiny_model_dir: Callable[[str], Path]
) -> None:
    llm = LLM(model=REPO_ID, num_gpu_blocks_override=16)
    assert llm.llm_engine.served_model_name == REPO_ID
    [output] = llm.generate("Hello there", GREEDY, use_tqdm=False)
    [expected] = LLM(model=str(make_tiny_model_dir("llama")), num_gpu_blocks_override=16).generate(
        "Hello there", GREEDY, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4
    assert output.outputs[0].token_ids == expected.outputs[0].token_ids


def test_hf_home_locates_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   make_tiny_model_dir: Callable[[str], Path]) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = add_to_hub_cache(tmp_path / "home" / "hub", REPO_ID, make_tiny_model_dir("llama"))
    assert resolve_model(REPO_ID).weights_path == snapshot


def test_revision_selects_the_snapshot(hub_cache: Path, make_tiny_model_dir: Callable[[str], Path]) -> None:
    main = add_to_hub_cache(hub_cache, REPO_ID, make_tiny_model_dir("llama"))
    # A second commit no branch points at, reachable by its hash only.
    other = add_to_hub_cache(hub_cache, REPO_ID, make_tiny_model_dir("llama"), commit=OTHER_COMMIT, branch=None)
    assert resolve_model(REPO_ID).weights_path == main
    assert resolve_model(REPO_ID, revision=OTHER_COMMIT).weights_path == other
    assert resolve_model(REPO_ID, revision=COMMIT).weights_path == main
    [output] = LLM(model=REPO_ID, revision=OTHER_COMMIT, num_gpu_blocks_override=16).generate(
        "Hi", GREEDY, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4


def test_unknown_revision_is_an_error(cached_llama: Path, hub_cache: Path) -> None:
    with pytest.raises(ValueError, match=rf"'{REPO_ID}' \(revision v9\) is not a local path.*{hub_cache}"):
        resolve_model(REPO_ID, revision="v9")
    with pytest.raises(ValueError, match=f"revision {OTHER_COMMIT}"):
        LLM(model=REPO_ID, revision=OTHER_COMMIT, num_gpu_blocks_override=16)


def test_missing_repo_offline_names_id_revision_cache_and_offline_mode(hub_cache: Path) -> None:
    expected = (rf"Model 'nobody/absent' \(revision main\) is not a local path, and is not in the Hugging Face "
                rf"cache at {hub_cache} and HF_HUB_OFFLINE=1\.")
    with pytest.raises(ValueError, match=expected):
        resolve_model("nobody/absent")


def _spy_snapshot_download(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the keyword arguments of each ``huggingface_hub.snapshot_download`` call (which still runs)."""
    import huggingface_hub

    calls: list[dict] = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id: str, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return calls


def test_unreachable_hub_falls_back_to_the_cache(cached_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _go_online_unreachable(monkeypatch)
    calls = _spy_snapshot_download(monkeypatch)
    assert resolve_model(REPO_ID).weights_path == cached_llama
    assert resolve_model(REPO_ID, revision=COMMIT).weights_path == cached_llama
    # One failed request decides: the snapshots are then read from the cache alone, without
    # huggingface_hub's retries on each listing.
    assert calls and all(call["local_files_only"] for call in calls)


def test_unreachable_hub_and_not_cached_is_an_error(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _go_online_unreachable(monkeypatch)
    with pytest.raises(ValueError, match=rf"'nobody/absent' \(revision main\) .* cache at {hub_cache} and the hub "
                                         r"could not be reached \(ConnectError"):
        resolve_model("nobody/absent")


def test_online_download_fetches_metadata_then_the_indexed_shards(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_tiny_model_dir: Callable[[str], Path]
) -> None:
    """With the hub reachable (simulated): the commit it names is pinned, and only the config,
    tokenizer files and the shards the index names are fetched, never a duplicate export."""
    import huggingface_hub

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(make_tiny_model_dir("llama"))).save_pretrained(
        str(sharded), max_shard_size="20KB")
    AutoTokenizer.from_pretrained(str(make_tiny_model_dir("llama"))).save_pretrained(str(sharded))
    shutil.copyfile(sorted(sharded.glob("model-*.safetensors"))[0], sharded / "consolidated.safetensors")
    snapshot = add_to_hub_cache(hub_cache, REPO_ID, sharded, commit=OTHER_COMMIT, branch=None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    asked: list[tuple[str, str | None]] = []

    class FakeRepoInfo:
        sha = OTHER_COMMIT

    def repo_info(self, repo_id: str, revision: str | None = None, **kwargs) -> FakeRepoInfo:
        asked.append((repo_id, revision))
        return FakeRepoInfo()

    calls: list[dict] = []

    def snapshot_download(repo_id: str, **kwargs) -> str:  # the files are "downloaded" already
        calls.append({"repo_id": repo_id, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = resolve_model(REPO_ID, revision="v2")
    assert source.weights_path == snapshot and source.name == REPO_ID
    assert asked == [(REPO_ID, "v2")]
    assert [call["revision"] for call in calls] == [OTHER_COMMIT, OTHER_COMMIT]
    assert not any(call["local_files_only"] for call in calls)
    assert all(call["cache_dir"] == hub_cache for call in calls)
    metadata, weights = (call["allow_patterns"] for call in calls)
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(metadata)
    assert not [pattern for pattern in metadata if pattern.endswith((".safetensors", ".bin", ".gguf"))]
    assert weights == sorted(p.name for p in sharded.glob("model-*.safetensors")) and len(weights) > 1


def test_bare_names_and_paths_are_not_hub_ids(hub_cache: Path, tmp_path: Path) -> None:
    # A bare name is a mistyped alias far more often than a legacy hub id: no hub look-up.
    with pytest.raises(ValueError, match="neither a known alias .* nor an existing path .* nor a Hugging Face repo id"):
        resolve_model("smollm2-135m")
    with pytest.raises(ValueError, match="neither a known alias"):
        resolve_model(str(tmp_path / "absent" / "dir"))


# ---------------------------------------------------------------------------
# Engine args: trust_remote_code, tokenizer


def test_trust_remote_code_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="loomlm runs no remote code: .*remove trust_remote_code"):
        ModelConfig(trust_remote_code=True)
    with pytest.raises(ValueError, match="loomlm runs no remote code"):
        LLM(model="no/model-needed", trust_remote_code=True)
    assert ModelConfig(trust_remote_code=False).trust_remote_code is False


@pytest.mark.parametrize("name", ["revision", "tokenizer", "tokenizer_revision"])
def test_empty_revision_or_tokenizer_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a non-empty string"):
        ModelConfig(**{name: ""})


def _custom_tokenizer_dir(path: Path) -> Path:
    """The tiny tokenizer with a chat template of its own, which tells it apart."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer.save_pretrained(str(path))
    return path


def test_tokenizer_path_replaces_the_models(tmp_path: Path, make_tiny_model_dir: Callable[[str], Path]) -> None:
    tokenizer_dir = _custom_tokenizer_dir(tmp_path / "tokenizer")
    model_dir = make_tiny_model_dir("llama")
    source = resolve_model(str(model_dir), tokenizer=str(tokenizer_dir))
    assert source.tokenizer_dir == tokenizer_dir and source.weights_path == model_dir
    llm = LLM(model=str(model_dir), tokenizer=str(tokenizer_dir), num_gpu_blocks_override=16)
    assert llm.get_tokenizer().chat_template == AutoTokenizer.from_pretrained(str(tokenizer_dir)).chat_template
    [output] = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False)
    assert output.prompt_token_ids == llm.get_tokenizer().encode("[Hi]", add_special_tokens=False)


def test_tokenizer_repo_id_and_revision(hub_cache: Path, tmp_path: Path,
                                        make_tiny_model_dir: Callable[[str], Path]) -> None:
    snapshot = add_to_hub_cache(hub_cache, "tiny-org/tokenizer", _custom_tokenizer_dir(tmp_path / "tokenizer"),
                                commit=OTHER_COMMIT, branch="v1")
    model_dir = make_tiny_model_dir("llama")
    source = resolve_model(str(model_dir), tokenizer="tiny-org/tokenizer", tokenizer_revision="v1")
    assert source.tokenizer_dir == snapshot
    assert "[" in load_tokenizer(source).chat_template
    # tokenizer_revision defaults to revision (vLLM), which is ignored for the local model path.
    assert resolve_model(str(model_dir), revision="v1", tokenizer="tiny-org/tokenizer").tokenizer_dir == snapshot
    with pytest.raises(ValueError, match=r"Tokenizer 'tiny-org/tokenizer' \(revision main\) is not a local path"):
        resolve_model(str(model_dir), tokenizer="tiny-org/tokenizer")


def test_model_repo_tokenizer_at_another_revision(cached_llama: Path, hub_cache: Path, tmp_path: Path) -> None:
    tokenizer_snapshot = add_to_hub_cache(hub_cache, REPO_ID, _custom_tokenizer_dir(tmp_path / "tokenizer"),
                                          commit=OTHER_COMMIT, branch="new-tokenizer")
    source = resolve_model(REPO_ID, tokenizer_revision="new-tokenizer")
    assert source.weights_path == cached_llama and source.tokenizer_dir == tokenizer_snapshot


# ---------------------------------------------------------------------------
# dtype "auto"


@pytest.fixture(scope="module")
def bf16_model_dir(make_tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama saved in bfloat16 (config.json declares it)."""
    source_dir = make_tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("tiny-llama-bf16")
    AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.bfloat16).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(source_dir)).save_pretrained(str(out))
    return out


def test_checkpoint_dtype_reads_the_config(bf16_model_dir: Path, make_tiny_model_dir: Callable[[str], Path],
                                           default_gguf_path: Path) -> None:
    assert checkpoint_dtype(resolve_model(str(bf16_model_dir))) == torch.bfloat16
    assert checkpoint_dtype(resolve_model(str(make_tiny_model_dir("llama")))) == torch.float32
    assert checkpoint_dtype(resolve_model(str(default_gguf_path))) is None


@pytest.mark.parametrize(
    ("device", "dtype", "checkpoint", "expected"),
    [
        ("cpu", "auto", torch.bfloat16, torch.float32),
        ("cpu", "auto", torch.float16, torch.float32),
        ("cpu", "auto", None, torch.float32),
        ("cpu", "bfloat16", torch.float32, torch.bfloat16),
        ("cpu", "float16", None, torch.float16),
        ("cuda", "auto", torch.bfloat16, torch.bfloat16),
        ("cuda", "auto", torch.float16, torch.float16),
        ("cuda", "auto", torch.float32, torch.bfloat16),
        ("cuda", "auto", None, torch.bfloat16),
        ("cuda", "float32", torch.bfloat16, torch.float32),
    ],
)
def test_resolve_dtype_policy(device: str, dtype: str, checkpoint: torch.dtype | None, expected: torch.dtype) -> None:
    config = ModelConfig(device=device, dtype=dtype)
    assert config.resolve_dtype(checkpoint) == expected
    pinned = config.with_checkpoint_dtype(checkpoint)
    assert pinned.dtype != "auto" and pinned.torch_dtype == expected


def test_auto_dtype_on_cpu_computes_bf16_checkpoint_in_float32(bf16_model_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="loomlm.config"):
        llm = LLM(model=str(bf16_model_dir), device="cpu", num_gpu_blocks_override=16)
    engine = llm.llm_engine
    assert "checkpoint dtype bfloat16; computing in float32 on CPU (no fast half-precision path)" in caplog.messages
    assert engine.model_runner.dtype == torch.float32
    assert {p.dtype for p in engine.model_runner.model.parameters()} == {torch.float32}
    assert engine.config.model_config.torch_dtype == torch.float32
    [output] = llm.generate("Hello", GREEDY, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4


def test_explicit_bf16_dtype_runs_in_bf16(bf16_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="loomlm.config"):
        llm = LLM(model=str(bf16_model_dir), device="cpu", dtype="bfloat16", num_gpu_blocks_override=16)
    engine = llm.llm_engine
    assert not [m for m in caplog.messages if "computing in float32" in m]
    assert engine.model_runner.dtype == torch.bfloat16
    assert {p.dtype for p in engine.model_runner.model.parameters()} == {torch.bfloat16}
    [output] = llm.generate("Hello", GREEDY, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4


# ---------------------------------------------------------------------------
# CLI


def _loomlm() -> list[str]:
    script = Path(sys.executable).with_name("loomlm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loomlm.cli"]


def test_serve_help_lists_hub_flags() -> None:
    result = subprocess.run([*_loomlm(), "serve", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    for flag in ("--revision", "--tokenizer", "--tokenizer-revision", "--trust-remote-code"):
        assert flag in result.stdout
    assert "repo id" in result.stdout


def test_trust_remote_code_flag_exits_with_status_2() -> None:
    result = subprocess.run([*_loomlm(), "generate", "Hi", "--model", "org/name", "--trust-remote-code"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "loomlm runs no remote code" in result.stderr


def test_bare_legacy_id_in_the_cache_resolves(hub_cache: Path, make_tiny_model_dir: Callable[[str], Path]) -> None:
    # "gpt2"-style legacy ids: looked up when the local cache holds them (offline here), as vLLM does.
    snapshot = add_to_hub_cache(hub_cache, "tinyllama", make_tiny_model_dir("llama"))
    assert resolve_model("tinyllama").weights_path == snapshot
    with pytest.raises(ValueError, match="neither a known alias"):
        resolve_model("tinyllama2")  # not cached: still a mistyped alias, no hub look-up
