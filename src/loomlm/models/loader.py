"""Resolve a model name to files on disk and read its config, tokenizer and weights.

A model is given as a zoo alias, a Hugging Face directory (``config.json`` +
``*.safetensors`` + tokenizer files), a ``.gguf`` file, or a Hugging Face hub repo id
(``namespace/name``), fetched into the Hugging Face cache as vLLM does. Whatever the
format, ``iter_weights`` yields tensors under Hugging Face transformers' parameter names
and layouts, so the model code has a single loading path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from loomlm.models import gguf_loader
from loomlm.models.registry import architecture_for, supported_model_types
from loomlm.models.zoo import ZOO, resolve_alias

_GGUF_MAGIC = b"GGUF"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# What a tokenizer needs from a hub repo (config.json: some tokenizers take their class from it).
_HUB_TOKENIZER_FILES = [
    *_TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "config.json",
]
# A model repo is fetched in two steps: these small files first, then the weights the index names
# (or every *.safetensors file without an index), so duplicate exports such as Mistral's
# consolidated.safetensors and PyTorch .bin files are never downloaded.
_HUB_MODEL_METADATA_FILES = [*_HUB_TOKENIZER_FILES, "generation_config.json", "model.safetensors.index.json"]


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to files on disk.

    Attributes:
        name: served name: the zoo alias, path string or hub repo id, as given.
        hf_config: LlamaConfig / MistralConfig / Qwen2Config (``model_type`` tells which).
        tokenizer_dir: a directory ``AutoTokenizer.from_pretrained()`` loads quickly
            (for GGUF: the cached conversion of the file's tokenizer metadata); the separate
            tokenizer's directory when one was given.
        weights_path: the HF directory (for a hub id: its snapshot in the Hugging Face cache),
            or the ``.gguf`` file.
        format: "hf" or "gguf".
    """

    name: str
    # compare=False: PretrainedConfig defines __eq__ without __hash__; the paths identify the model.
    hf_config: PretrainedConfig = field(compare=False)
    tokenizer_dir: Path
    weights_path: Path
    format: str


def resolve_model(model: str, revision: str | None = None, tokenizer: str | None = None,
                  tokenizer_revision: str | None = None) -> ModelSource:
    """Resolve a zoo alias, an HF directory, a ``.gguf`` path or a hub repo id to a ``ModelSource``.

    Follows vLLM's engine args ``model`` / ``revision`` / ``tokenizer`` / ``tokenizer_revision``:
    a string that is neither an alias nor an existing path and is a valid ``namespace/name`` repo
    id (``huggingface_hub.utils.validate_repo_id``) is fetched with
    ``huggingface_hub.snapshot_download`` at ``revision`` (branch, tag or commit; default
    "main"): its config, tokenizer and safetensors weights only. Bare names (legacy ids such as
    "gpt2") are looked up only when the local Hugging Face cache holds them, so a mistyped alias
    fails at once: elsewhere use the namespaced id. The
    Hugging Face environment (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``,
    ``HF_TOKEN``) is read at each call. Offline, or when the hub cannot be reached, the cached
    snapshot is used. ``revision`` is ignored for aliases and paths (as in vLLM).

    ``tokenizer``: a separate tokenizer (alias, HF directory, .gguf file or repo id), fetched at
    ``tokenizer_revision``, which defaults to ``revision`` (vLLM's rule). Without ``tokenizer``,
    a ``tokenizer_revision`` other than ``revision`` takes the model repo's tokenizer at that revision.

    For a GGUF file the first call converts its tokenizer and config into the
    cache (``gguf_loader.ensure_gguf_cache``, seconds); later calls read the cache.

    Raises:
        ValueError: unknown alias (the message lists known aliases); alias whose
            package is not installed (the message gives the pip command); missing
            path that is not a repo id; repo id not in the Hugging Face cache while offline or
            with the hub unreachable (the message names the id, revision, cache directory and
            offline state); repo or revision not on the hub; directory without ``config.json``,
            safetensors weights or tokenizer files; a file that is not GGUF; an architecture
            other than LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM.
    """
    if tokenizer is None and tokenizer_revision not in (None, revision) and _is_hub_repo_id(model):
        tokenizer = model  # the model repo's tokenizer, at another revision
    if tokenizer_revision is None:
        tokenizer_revision = revision
    path = _model_path(model, revision)
    has_own_tokenizer = tokenizer is None
    if path.is_dir():
        source = _resolve_hf_dir(model, path, needs_tokenizer=has_own_tokenizer)
    elif _is_gguf_file(path):
        source = _resolve_gguf_file(model, path)
    else:
        raise ValueError(f"Model path {str(path)!r} is neither a directory nor a GGUF file.")
    entry = ZOO.get(model)
    if entry is not None and entry.eos_token_ids:
        source.hf_config.eos_token_id = list(entry.eos_token_ids)  # the family's end-of-turn ids too
    if has_own_tokenizer:
        return source
    return replace(source, tokenizer_dir=_tokenizer_dir(tokenizer, tokenizer_revision))


def checkpoint_dtype(source: ModelSource) -> torch.dtype | None:
    """The dtype the checkpoint's ``config.json`` declares (``dtype``; ``torch_dtype`` before
    transformers 4.56), or None: no declared dtype, one that is not a float type torch knows, or
    a GGUF file (its tensors are dequantized to float32, whatever their quantization)."""
    if source.format != "hf":
        return None
    config = source.hf_config
    value = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer, with ``chat_template`` set when the model has one (or, for a
    zoo alias whose file has none, the family's template from the zoo entry).

    Raises:
        ValueError: the tokenizer cannot be loaded as a fast (Rust ``tokenizers``) tokenizer.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot load the tokenizer of {source.name!r} from {source.tokenizer_dir}: {e}") from e
    if not tokenizer.is_fast:
        # Incremental detokenization and offsets rely on the Rust tokenizer.
        raise ValueError(f"The tokenizer of {source.name!r} has no fast (tokenizers) version.")
    entry = ZOO.get(source.name)
    if tokenizer.chat_template is None and entry is not None and entry.chat_template:
        tokenizer.chat_template = entry.chat_template
    return tokenizer


def iter_weights(source: ModelSource, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(HF parameter name, tensor)`` pairs in transformers' names and layouts, cast to ``dtype``.

    Names: ``model.embed_tokens.weight`` ``[vocab, hidden]``,
    ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` (q: ``[num_heads * head_dim, hidden]``,
    k/v: ``[num_kv_heads * head_dim, hidden]``), ``...{q,k,v}_proj.bias`` (qwen2),
    ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.layers.{i}.input_layernorm.weight``,
    ``model.layers.{i}.post_attention_layernorm.weight``, ``model.norm.weight`` and
    ``lm_head.weight``, which is absent when ``hf_config.tie_word_embeddings``.

    HF directories are read with safetensors (every shard); GGUF files are
    dequantized once and then served from a float32 safetensors cache
    (``gguf_loader.iter_cached_gguf_weights``).

    Raises:
        ValueError: unknown ``source.format``.
    """
    if source.format == "hf":
        yield from _iter_safetensors_dir(source.weights_path, source.hf_config, dtype)
    elif source.format == "gguf":
        yield from gguf_loader.iter_cached_gguf_weights(source.weights_path, source.hf_config, dtype)
    else:
        raise ValueError(f"Unknown model format {source.format!r}; expected 'hf' or 'gguf'.")


def _model_path(model: str, revision: str | None) -> Path:
    """The file or directory ``model`` names: a zoo alias's file, a local path, or a hub snapshot."""
    path = resolve_alias(model) if model in ZOO else Path(model).expanduser()
    if path.exists():
        return path
    if _is_hub_repo_id(model):
        return _hub_model_snapshot(model, revision)
    known = ", ".join(sorted(ZOO))
    raise ValueError(
        f"Model {model!r} is neither a known alias ({known}) nor an existing path "
        "(an HF directory or a .gguf file) nor a Hugging Face repo id (namespace/name)."
    )


def _tokenizer_dir(tokenizer: str, revision: str | None) -> Path:
    """The directory ``AutoTokenizer`` loads for a separate ``tokenizer`` (vLLM's ``tokenizer=``)."""
    path = resolve_alias(tokenizer) if tokenizer in ZOO else Path(tokenizer).expanduser()  # an alias names a GGUF
    if path.is_dir():
        return path
    if _is_gguf_file(path):
        return gguf_loader.ensure_gguf_cache(path)
    if path.exists():
        raise ValueError(f"Tokenizer path {tokenizer!r} is neither a directory nor a GGUF file.")
    if _is_hub_repo_id(tokenizer):
        return _HubFetch.start(tokenizer, revision, what="Tokenizer").snapshot(_HUB_TOKENIZER_FILES)
    raise ValueError(
        f"Tokenizer {tokenizer!r} is neither a known alias, an existing path (an HF directory or a "
        ".gguf file) nor a Hugging Face repo id (namespace/name)."
    )


def _is_hub_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") > 1:
        return False
    if "/" not in name:
        # Bare names are legacy hub ids ("gpt2") or, far more often, mistyped aliases: only one the
        # local Hugging Face cache already holds counts as an id, so a typo still fails at once.
        if not name or not (hub_settings().cache_dir / f"models--{name}").is_dir():
            return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@dataclass(frozen=True)
class HubSettings:
    """The Hugging Face hub environment, as huggingface_hub reads it (``huggingface_hub.constants``).

    huggingface_hub reads these variables once, at import; loomlm reads them at each call, so
    variables set later (tests, notebooks) count too.
    """

    cache_dir: Path  # HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
    is_offline: bool  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is 1/true/yes/on
    endpoint: str | None  # HF_ENDPOINT; None: huggingface_hub's default


def hub_settings() -> HubSettings:
    """The Hugging Face environment variables as they are now (see ``HubSettings``)."""
    env = os.environ
    default_home = os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                "huggingface")
    hf_home = os.path.expanduser(env.get("HF_HOME") or default_home)
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub")
    offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper()
    endpoint = env.get("HF_ENDPOINT")
    return HubSettings(
        cache_dir=Path(os.path.expandvars(os.path.expanduser(cache))),
        is_offline=offline in ("1", "ON", "YES", "TRUE"),
        endpoint=endpoint.rstrip("/") if endpoint else None,
    )


def _hub_model_snapshot(repo_id: str, revision: str | None) -> Path:
    """The snapshot directory of model ``repo_id`` with its config, tokenizer and safetensors weights."""
    fetch = _HubFetch.start(repo_id, revision, what="Model")
    snapshot = fetch.snapshot(_HUB_MODEL_METADATA_FILES)
    index_shards = _index_shards(snapshot)
    shards = ["*.safetensors"] if index_shards is None else index_shards
    # snapshot.name is the commit of the metadata: the weights come from the same one.
    snapshot = fetch.snapshot(shards, commit=snapshot.name)
    missing = [shard for shard in shards if "*" not in shard and not (snapshot / shard).is_file()]
    if missing:
        raise ValueError(f"The cached snapshot of {repo_id!r} at {snapshot} lacks the weight shards {missing} "
                         "its index names: download it again with network access.")
    return snapshot


@dataclass(frozen=True)
class _HubFetch:
    """One resolution of a repo id: online at the commit the hub named, or from the cache only.

    Asking the hub once up front (``repo_info``, a single request) tells whether it can be reached;
    when it cannot, every ``snapshot_download`` reads the cache only, instead of each spending
    huggingface_hub's ~25 s of retries on listing the repo before falling back to the cache.
    """

    repo_id: str
    what: str  # "Model" or "Tokenizer", for messages
    settings: HubSettings
    revision: str  # as asked ("main" when none was)
    commit: str | None  # the commit ``revision`` names on the hub; None: read the cache only
    offline_reason: str  # why the cache only, for messages; "" when online

    @classmethod
    def start(cls, repo_id: str, revision: str | None, what: str) -> _HubFetch:
        """Raises ValueError: the hub has the repo but not ``revision``."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        settings = hub_settings()
        revision = revision or "main"
        if settings.is_offline:
            return cls(repo_id, what, settings, revision, None, "HF_HUB_OFFLINE=1")
        try:
            info = HfApi(endpoint=settings.endpoint).repo_info(repo_id, revision=revision, timeout=10)
        except RevisionNotFoundError as e:
            raise ValueError(f"{what} {repo_id!r} has no revision {revision!r} on the Hugging Face hub.") from e
        except RepositoryNotFoundError as e:  # gated repos too; a cached copy still serves, as in huggingface_hub
            reason = ("the hub has no such repo, or it is private or gated (log in with `hf auth login` or "
                      f"HF_TOKEN) ({_first_line(e)})")
            return cls(repo_id, what, settings, revision, None, reason)
        except Exception as e:  # noqa: BLE001  # connection, timeout, proxy, server errors: the cache may serve
            reason = f"the hub could not be reached ({type(e).__name__}: {_first_line(e)})"
            return cls(repo_id, what, settings, revision, None, reason)
        return cls(repo_id, what, settings, revision, info.sha, "")

    def snapshot(self, allow_patterns: list[str], commit: str | None = None) -> Path:
        """``snapshot_download`` of the files ``allow_patterns`` matches, at ``commit`` (default: the
        one the hub named, else ``revision`` in the cache); the cache alone when offline.

        Raises ValueError: not in the cache while offline, or the download failed.
        """
        from huggingface_hub import snapshot_download

        is_online = self.commit is not None
        try:
            return Path(snapshot_download(
                self.repo_id, revision=commit or self.commit or self.revision, allow_patterns=allow_patterns,
                cache_dir=self.settings.cache_dir, endpoint=self.settings.endpoint, local_files_only=not is_online,
            ))
        except OSError as e:  # LocalEntryNotFoundError (not cached) and the hub's HTTP errors
            if is_online:
                raise ValueError(f"Downloading {self.what.lower()} {self.repo_id!r} (revision {self.revision}) into "
                                 f"{self.settings.cache_dir} failed: {type(e).__name__}: {_first_line(e)}") from e
            raise ValueError(f"{self.what} {self.repo_id!r} (revision {self.revision}) is not a local path, and is "
                             f"not in the Hugging Face cache at {self.settings.cache_dir} and "
                             f"{self.offline_reason}.") from e


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _check_architecture(config: PretrainedConfig, origin: str) -> None:
    arch = architecture_for(getattr(config, "model_type", None), origin)
    architectures = getattr(config, "architectures", None) or list(arch.hf_architectures)
    unsupported = [a for a in architectures if a not in arch.hf_architectures]
    if unsupported:
        raise ValueError(f"Unsupported architectures {unsupported} in {origin}; supported: {supported_model_types()}.")


def _resolve_hf_dir(name: str, model_dir: Path, needs_tokenizer: bool = True) -> ModelSource:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(model_dir)!r} is not an HF model directory: it has no config.json.")
    # Check model_type before AutoConfig, which fails with a less helpful message on unknown types.
    try:
        raw_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    architecture_for(raw_config.get("model_type"), str(config_file))
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    _check_architecture(hf_config, str(config_file))
    hf_config = _text_model_config(hf_config)
    if not _safetensors_files(model_dir):
        raise ValueError(f"{str(model_dir)!r} has no *.safetensors weights (PyTorch .bin files are not supported).")
    if needs_tokenizer and not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"{str(model_dir)!r} has no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}).")
    return ModelSource(name=name, hf_config=hf_config, tokenizer_dir=model_dir, weights_path=model_dir, format="hf")


def _text_model_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The config of the text model loomlm runs: a Gemma 3 checkpoint with its vision tower
    (`Gemma3ForConditionalGeneration`) runs its `text_config` (the model skips the vision weights)."""
    if hf_config.model_type != "gemma3":
        return hf_config
    text = hf_config.text_config
    # The multimodal config carries the tie and the end-of-turn ids; the text config may hold defaults.
    for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(hf_config, key, None)
        if value is not None:
            setattr(text, key, value)
    return text


def _resolve_gguf_file(name: str, gguf_path: Path) -> ModelSource:
    entry = gguf_loader.ensure_gguf_cache(gguf_path)
    hf_config = AutoConfig.from_pretrained(str(entry))
    _check_architecture(hf_config, str(gguf_path))
    return ModelSource(name=name, hf_config=hf_config, tokenizer_dir=entry, weights_path=gguf_path, format="gguf")


def _index_shards(model_dir: Path) -> list[str] | None:
    """The shard file names ``model.safetensors.index.json`` names, sorted; None without an index."""
    index_file = model_dir / "model.safetensors.index.json"
    if not index_file.is_file():
        return None
    return sorted(set(json.loads(index_file.read_text())["weight_map"].values()))


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The shards the index names when there is one, else every ``*.safetensors`` file."""
    shards = _index_shards(model_dir)
    return sorted(model_dir.glob("*.safetensors")) if shards is None else [model_dir / shard for shard in shards]


def _iter_safetensors_dir(
    model_dir: Path, config: PretrainedConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    is_tied = bool(getattr(config, "tie_word_embeddings", False))
    for shard in _safetensors_files(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                # Old checkpoints store RoPE inverse frequencies, which the model recomputes;
                # some tied checkpoints still store lm_head, which the tie replaces.
                if name.endswith("rotary_emb.inv_freq") or (is_tied and name == "lm_head.weight"):
                    continue
                yield name, f.get_tensor(name).to(dtype)
