"""Where an adapter id points: LoRAX's `adapter_source` (`local`, `hub`, `s3`; `pbase` is Predibase's
hosted store and is not supported).

- `local`: the id is a directory path.
- `hub`: the id is a Hugging Face repo id, resolved from the local Hugging Face cache only
  (`huggingface_hub.snapshot_download(local_files_only=True)`): this machine cannot download.
- `s3`: `s3://bucket/prefix` (or `bucket/prefix`), downloaded once with boto3 into loomlm's cache.
- no source: a directory path if one exists, else the Hugging Face cache (LoRAX's default is hub).
Every failure is a ValueError that says what was looked for and where.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import platformdirs

ADAPTER_SOURCES = ("hub", "local", "s3", "pbase")


def resolve_adapter(adapter_id: str, source: str | None = None, api_token: str | None = None) -> str:
    """The local directory holding adapter `adapter_id` (PEFT files), fetching it from S3 if needed.

    Raises ValueError: an unknown source, a path that does not exist, a repo not in the
    Hugging Face cache, boto3 missing or S3 failing.
    """
    if not adapter_id:
        raise ValueError("adapter_id must not be empty.")
    if source is not None and source not in ADAPTER_SOURCES:
        raise ValueError(f"adapter_source must be one of {list(ADAPTER_SOURCES)}, got {source!r}.")
    if source == "pbase":
        raise ValueError("adapter_source 'pbase' (Predibase) is not supported by loomlm; use local, hub or s3.")
    if source == "local" or (source is None and Path(adapter_id).expanduser().is_dir()):
        path = Path(adapter_id).expanduser()
        if not path.is_dir():
            raise ValueError(f"adapter {adapter_id!r} (source local): no such directory.")
        return str(path.resolve())
    if source == "s3":
        return _from_s3(adapter_id)
    return _from_hub_cache(adapter_id, api_token)


def _from_hub_cache(repo_id: str, api_token: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    # Read at call time, so HF_HUB_CACHE / HF_HOME set after import still count.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        return snapshot_download(repo_id, local_files_only=True, token=api_token, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        where = cache_dir or "the default Hugging Face cache"
        raise ValueError(f"adapter {repo_id!r} (source hub) is not in {where}, and this server does not download "
                         "adapters: put it in the cache (huggingface-cli download) or pass a local path.") from exc
    except HFValidationError as exc:
        raise ValueError(f"adapter {repo_id!r} (source hub): not a valid repo id or local path ({exc}).") from exc


def _from_s3(uri: str) -> str:
    try:
        import boto3
    except ImportError as exc:
        raise ValueError("adapter_source 's3' needs boto3: pip install boto3.") from exc
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket or not prefix:
        raise ValueError(f"adapter {uri!r} (source s3): expected s3://bucket/prefix.")
    target = Path(platformdirs.user_cache_dir("loomlm")) / "adapters" / "s3" / bucket / prefix
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
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(dest))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    except ValueError:
        raise
    except Exception as exc:  # botocore's errors (no credentials, no network, access denied, ...)
        raise ValueError(f"adapter {uri!r} (source s3): {type(exc).__name__}: {exc}") from exc
    return str(target)
