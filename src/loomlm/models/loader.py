"""Resolve a model name to files on disk and read its config, tokenizer and weights.

A model is given as a zoo alias, a Hugging Face directory (``config.json`` +
``*.safetensors`` + tokenizer files) or a ``.gguf`` file. Whatever the format,
``iter_weights`` yields tensors under Hugging Face transformers' parameter names
and layouts, so the model code has a single loading path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from loomlm.models import gguf_loader
from loomlm.models.zoo import ZOO, resolve_alias

# HF model_type -> the causal-LM class name config.json's "architectures" may list.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

_GGUF_MAGIC = b"GGUF"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to files on disk.

    Attributes:
        name: served name: the zoo alias if one was given, else the path string as given.
        hf_config: LlamaConfig / MistralConfig / Qwen2Config (``model_type`` tells which).
        tokenizer_dir: a directory ``AutoTokenizer.from_pretrained()`` loads quickly
            (for GGUF: the cached conversion of the file's tokenizer metadata).
        weights_path: the HF directory, or the ``.gguf`` file.
        format: "hf" or "gguf".
    """

    name: str
    # compare=False: PretrainedConfig defines __eq__ without __hash__; the paths identify the model.
    hf_config: PretrainedConfig = field(compare=False)
    tokenizer_dir: Path
    weights_path: Path
    format: str


def resolve_model(model: str) -> ModelSource:
    """Resolve a zoo alias, an HF directory or a ``.gguf`` path to a ``ModelSource``.

    For a GGUF file the first call converts its tokenizer and config into the
    cache (``gguf_loader.ensure_gguf_cache``, seconds); later calls read the cache.

    Raises:
        ValueError: unknown alias (the message lists known aliases); alias whose
            package is not installed (the message gives the pip command); missing
            path; directory without ``config.json``, safetensors weights or tokenizer
            files; a file that is not GGUF; an architecture other than
            LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM.
    """
    if model in ZOO:
        path = resolve_alias(model)
    else:
        path = Path(model).expanduser()
        if not path.exists():
            known = ", ".join(sorted(ZOO))
            raise ValueError(
                f"Model {model!r} is neither a known alias ({known}) nor an existing path "
                "(an HF directory or a .gguf file)."
            )
    if path.is_dir():
        return _resolve_hf_dir(model, path)
    if _is_gguf_file(path):
        return _resolve_gguf_file(model, path)
    raise ValueError(f"Model path {str(path)!r} is neither a directory nor a GGUF file.")


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer, with ``chat_template`` set when the model has one.

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


def _is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _check_architecture(config: PretrainedConfig, origin: str) -> None:
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(f"{cls} ({mt})" for mt, cls in SUPPORTED_ARCHITECTURES.items())
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"Unsupported model_type {model_type!r} in {origin}; supported: {supported}.")
    architectures = getattr(config, "architectures", None) or [SUPPORTED_ARCHITECTURES[model_type]]
    unsupported = [arch for arch in architectures if arch != SUPPORTED_ARCHITECTURES[model_type]]
    if unsupported:
        raise ValueError(f"Unsupported architectures {unsupported} in {origin}; supported: {supported}.")


def _resolve_hf_dir(name: str, model_dir: Path) -> ModelSource:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(model_dir)!r} is not an HF model directory: it has no config.json.")
    # Check model_type before AutoConfig, which fails with a less helpful message on unknown types.
    try:
        raw_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    raw_type = raw_config.get("model_type")
    if raw_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(f"{cls} ({mt})" for mt, cls in SUPPORTED_ARCHITECTURES.items())
        raise ValueError(f"Unsupported model_type {raw_type!r} in {config_file}; supported: {supported}.")
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    _check_architecture(hf_config, str(config_file))
    if not _safetensors_files(model_dir):
        raise ValueError(f"{str(model_dir)!r} has no *.safetensors weights (PyTorch .bin files are not supported).")
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"{str(model_dir)!r} has no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}).")
    return ModelSource(name=name, hf_config=hf_config, tokenizer_dir=model_dir, weights_path=model_dir, format="hf")


def _resolve_gguf_file(name: str, gguf_path: Path) -> ModelSource:
    entry = gguf_loader.ensure_gguf_cache(gguf_path)
    hf_config = AutoConfig.from_pretrained(str(entry))
    _check_architecture(hf_config, str(gguf_path))
    return ModelSource(name=name, hf_config=hf_config, tokenizer_dir=entry, weights_path=gguf_path, format="gguf")


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The shards the index names when there is one, else every ``*.safetensors`` file."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return [model_dir / shard for shard in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


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
