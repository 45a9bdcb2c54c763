"""Adapter sources (LoRAX's adapter_source): local paths, the local Hugging Face cache (nothing is
downloaded), S3 through boto3 (a stand-in client here: no network), and their errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from loomlm.lora import source
from loomlm.lora.source import resolve_adapter

FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights"}


def write_adapter(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (directory / name).write_bytes(data)
    return directory


def test_local_paths(tmp_path):
    adapter = write_adapter(tmp_path / "a")
    assert resolve_adapter(str(adapter), "local") == str(adapter.resolve())
    assert resolve_adapter(str(adapter)) == str(adapter.resolve())  # no source: an existing path is local
    with pytest.raises(ValueError, match="no such directory"):
        resolve_adapter(str(tmp_path / "missing"), "local")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_adapter(str(adapter), "ftp")
    with pytest.raises(ValueError, match="pbase"):
        resolve_adapter("some/adapter", "pbase")


def test_hub_resolves_from_the_local_cache_first(tmp_path, monkeypatch):
    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/files}.
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--acme--tiny-lora"
    write_adapter(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = Path(resolve_adapter("acme/tiny-lora", "hub"))
    assert path == repo / "snapshots" / commit and (path / "adapter_config.json").read_bytes() == FILES[
        "adapter_config.json"]
    assert resolve_adapter("acme/tiny-lora") == str(path)  # no source: the hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in .*could not be downloaded .HF_HUB_OFFLINE is set"):
        resolve_adapter("acme/absent-lora", "hub")


def test_hub_downloads_only_the_adapter_files_when_online(tmp_path, monkeypatch):
    import huggingface_hub

    from loomlm.lora import source

    calls = []
    real = huggingface_hub.snapshot_download

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)  # a cache miss
        target = tmp_path / "downloaded"
        write_adapter(target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_adapter("acme/new-lora", "hub") == str(tmp_path / "downloaded")
    assert calls[0]["local_files_only"] is True
    assert calls[1]["allow_patterns"] == source._ADAPTER_FILES  # never a whole model repository


class FakeS3:
    """boto3's S3 client surface that source.py uses, over a dict of objects."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.downloads: list[str] = []

    def get_paginator(self, name: str):
        assert name == "list_objects_v2"
        objects = self.objects

        class Paginator:
            def paginate(self, Bucket: str, Prefix: str):
                keys = [k for k in objects if k.startswith(f"{Bucket}/{Prefix}")]
                yield {"Contents": [{"Key": k.split("/", 1)[1]} for k in keys]}

        return Paginator()

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        self.downloads.append(key)
        Path(filename).write_bytes(self.objects[f"{bucket}/{key}"])


def test_s3_downloads_once_into_the_cache(tmp_path, monkeypatch):
    fake = FakeS3({f"bucket/loras/x/{name}": data for name, data in FILES.items()} | {"bucket/loras/y/other": b""})
    monkeypatch.setitem(sys.modules, "boto3", types.SimpleNamespace(client=lambda service: fake))
    monkeypatch.setattr(source.platformdirs, "user_cache_dir", lambda app: str(tmp_path / "cache"))
    path = Path(resolve_adapter("s3://bucket/loras/x", "s3"))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == FILES
    assert sorted(fake.downloads) == ["loras/x/adapter_config.json", "loras/x/adapter_model.safetensors"]
    assert resolve_adapter("s3://bucket/loras/x", "s3") == str(path) and len(fake.downloads) == 2  # cached
    with pytest.raises(ValueError, match="no objects"):
        resolve_adapter("s3://bucket/loras/none", "s3")
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        resolve_adapter("s3://bucket-only", "s3")
    # A request's id never steers a read or a write outside the S3 cache.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "adapter_config.json").write_bytes(b"{}")
    for escaping in ("s3://bucket/../../../elsewhere", "s3://../elsewhere/x", "s3://bucket/loras/../../.."):
        with pytest.raises(ValueError, match="may not contain"):
            resolve_adapter(escaping, "s3")
    fake.objects["bucket/loras/evil/../../../../elsewhere/adapter_config.json"] = b"{}"
    with pytest.raises(ValueError, match="leaves the adapter's directory"):
        resolve_adapter("s3://bucket/loras/evil", "s3")
    assert (tmp_path / "elsewhere" / "adapter_config.json").read_bytes() == b"{}"


def test_s3_without_boto3_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(ValueError, match="needs boto3"):
        resolve_adapter("s3://bucket/loras/x", "s3")
