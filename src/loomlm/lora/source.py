"""Where an adapter id points: LoRAX's `adapter_source` (`local`, `hub`, `s3`; `pbase` is Predibase's
hosted store and is not supported).

- `local`: the id is a directory path. On a server, requests may name only directories under the
  operator's adapter roots (`loomlm serve --adapter-root DIR`): an absolute path inside a root, or
  a path relative to one. Everything else (other absolute paths, `..`, `~`, symlinks that leave
  a root) is refused with one message whether or not it exists, so the answer tells nothing about
  the server's disk.
- `hub`: the id is a Hugging Face repo id, resolved from the local Hugging Face cache, else
  downloaded (its adapter files only) unless `HF_HUB_OFFLINE` is set, as LoRAX does.
- `s3`: `s3://bucket/prefix` (or `bucket/prefix`), downloaded once with boto3 into loomlm's cache.
- no source: a directory path if one exists (under the roots, on a server), else the Hugging Face
  cache (LoRAX's default is hub).
Every failure is a ValueError that says what was looked for and where.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import platformdirs

ADAPTER_SOURCES = ("hub", "local", "s3", "pbase")


def resolve_adapter(adapter_id: str, source: str | None = None, api_token: str | None = None,
                    allowed_roots: Sequence[str] | None = None) -> str:
    """The local directory holding adapter `adapter_id` (PEFT files), fetching it from S3 if needed.

    `allowed_roots` None: any local path (the operator's own calls: `--adapter-ids`, offline use).
    A sequence (a request's id on a server): local adapters only under those directories; an
    empty sequence refuses every local id (hub and s3 ids still resolve).

    Raises ValueError: an unknown source, a local id outside the roots or not a directory, a repo
    not in the Hugging Face cache, boto3 missing or S3 failing.
    """
    if not adapter_id:
        raise ValueError("adapter_id must not be empty.")
    if source is not None and source not in ADAPTER_SOURCES:
        raise ValueError(f"adapter_source must be one of {list(ADAPTER_SOURCES)}, got {source!r}.")
    if source == "pbase":
        raise ValueError("adapter_source 'pbase' (Predibase) is not supported by loomlm; use local, hub or s3.")
    if allowed_roots is not None:
        local = _under_roots(adapter_id, allowed_roots)
        if local is not None and source in (None, "local"):
            return local
        if source == "local":
            raise ValueError(f"adapter {adapter_id!r} (source local) is not an adapter directory under the "
                             "server's adapter roots (loomlm serve --adapter-root DIR).")
    elif source == "local" or (source is None and Path(adapter_id).expanduser().is_dir()):
        path = Path(adapter_id).expanduser()
        if not path.is_dir():
            raise ValueError(f"adapter {adapter_id!r} (source local): no such directory.")
        return str(path.resolve())
    if source == "s3":
        return _from_s3(adapter_id)
    return _from_hub_cache(adapter_id, api_token)


def _under_roots(adapter_id: str, roots: Sequence[str]) -> str | None:
    """The directory `adapter_id` names inside one of `roots` (symlinks resolved), or None.

    Absolute ids must lie inside a root; relative ids are taken relative to each root in turn.
    `~` is not expanded. Only paths already known to be inside a root are checked for existence.
    """
    if "\x00" in adapter_id:
        return None
    for root in roots:
        real_root = os.path.realpath(root)
        candidate = os.path.realpath(os.path.join(real_root, adapter_id))  # an absolute id replaces the root
        if candidate != real_root and Path(candidate).is_relative_to(real_root) and os.path.isdir(candidate):
            return candidate
    return None


# The files of a PEFT adapter: what the hub source downloads (never a whole model repo).
_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def _from_hub_cache(repo_id: str, api_token: str | None) -> str:
    """The adapter from the local Hugging Face cache, else downloaded from the hub (its adapter
    files only) unless `HF_HUB_OFFLINE` is set or the hub cannot be reached (LoRAX's hub source)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    # Read at call time, so HF_HUB_CACHE / HF_HOME set after import still count.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    where = cache_dir or "the default Hugging Face cache"
    try:
        return snapshot_download(repo_id, local_files_only=True, token=api_token, cache_dir=cache_dir)
    except HFValidationError as exc:
        raise ValueError(f"adapter {repo_id!r} (source hub): not a valid repo id or local path ({exc}).") from exc
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    reason = "HF_HUB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        try:
            return snapshot_download(repo_id, token=api_token, cache_dir=cache_dir, allow_patterns=_ADAPTER_FILES,
                                     etag_timeout=10)
        except Exception as exc:  # not on the hub, private, or no network: the message below says which
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise ValueError(f"adapter {repo_id!r} (source hub) is not in {where} and could not be downloaded ({reason}): "
                     "put it in the cache (huggingface-cli download) or pass a local path.")


def _from_s3(uri: str) -> str:
    try:
        import boto3
    except ImportError as exc:
        raise ValueError("adapter_source 's3' needs boto3: pip install boto3.") from exc
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket or not prefix:
        raise ValueError(f"adapter {uri!r} (source s3): expected s3://bucket/prefix.")
    s3_cache = Path(platformdirs.user_cache_dir("loomlm")) / "adapters" / "s3"
    target = s3_cache / bucket / prefix
    if not _is_inside(target, s3_cache):  # ".." in a request's id must not leave the cache
        raise ValueError(f"adapter {uri!r} (source s3): the bucket and prefix may not contain '..' or '.' parts.")
    if (target / "adapter_config.json").is_file():
        return str(target)
    prefix = prefix.rstrip("/") + "/"
    try:
        s3 = boto3.client("s3")
        keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for obj in page.get("Contents", [])]
        if not keys:
            raise ValueError(f"adapter {uri!r} (source s3): no objects under s3://{bucket}/{prefix}.")
        # Into a scratch directory first: an interrupted download must not look like an adapter.
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for key in keys:
            dest = partial / key[len(prefix):]
            if not _is_inside(dest, partial):
                raise ValueError(f"adapter {uri!r} (source s3): object key {key!r} leaves the adapter's directory.")
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(dest))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    except ValueError:
        raise
    except Exception as exc:  # botocore's errors (no credentials, no network, access denied, ...)
        raise ValueError(f"adapter {uri!r} (source s3): {type(exc).__name__}: {exc}") from exc
    return str(target)


def _is_inside(path: Path, directory: Path) -> bool:
    """Whether `path` names something strictly inside `directory`, judged on the names alone
    (no "." or ".." part, not absolute): nothing is looked up on disk."""
    parts = path.relative_to(directory).parts if path.is_relative_to(directory) else ()
    return bool(parts) and all(part not in ("", ".", "..") for part in parts)
