"""GGUF files (llama.cpp's format) as Hugging Face configs, tokenizers and tensors.

Tensors are read with ``gguf.GGUFReader`` and dequantized with
``gguf.quants.dequantize``; names and layouts are mapped back to Hugging Face
transformers' conventions, undoing the Q/K row permutation that llama.cpp's
``convert_hf_to_gguf.py`` applies to Llama-architecture checkpoints.

Two things are slow and are therefore cached per GGUF file under
``cache_root() / "gguf" / <key>`` (the key covers the file's absolute path, size
and mtime, the transformers version and ``CACHE_FORMAT_VERSION``):

* the tokenizer conversion from GGUF metadata (transformers' converter, seconds),
  saved with ``save_pretrained`` next to the ``config.json`` built here;
* the float32 weights: opening a GGUFReader alone parses every vocabulary entry
  (5-6.5 s for the default model's 49k vocabulary on the 2-core reference
  machine) before dequantizing (about 3 s more), so later loads read a
  ``model.safetensors`` copy instead (under 1 s).

Every cache write goes to a temporary name first and is published with a rename,
so concurrent processes never see a half-written entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

# Bump when what is written into a cache entry changes, so stale entries are ignored.
CACHE_FORMAT_VERSION = 1
CACHE_DIR_ENV = "LOOMLM_CACHE_DIR"

# Marker written last into an entry; an entry directory without it is not trusted.
_ENTRY_MARKER = "loomlm_cache.json"
_WEIGHTS_FILE = "model.safetensors"

# GGUF `general.architecture` -> HF model_type. Mistral checkpoints convert to arch
# "llama" (llama.cpp drops the sliding window), so they load as Llama here.
GGUF_ARCH_TO_MODEL_TYPE: dict[str, str] = {"llama": "llama", "qwen2": "qwen2"}
_MODEL_TYPE_TO_HF_CLASS: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama.cpp's standard tensor names (gguf-py's TensorNameMap) -> HF names.
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# ---------------------------------------------------------------------------
# Cache locations


def cache_root() -> Path:
    """loomlm's cache directory: ``$LOOMLM_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("loomlm")``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs  # only needed when no override is given

    return Path(platformdirs.user_cache_dir("loomlm"))


def file_cache_key(path: Path, *salt: str) -> str:
    """A directory name identifying one version of a file: ``<stem>-<16 hex digits>``.

    The hash covers the absolute path, size, mtime (ns), ``CACHE_FORMAT_VERSION``,
    the transformers version (its tokenizer converter produced the entry) and ``salt``,
    so replacing the file or upgrading transformers yields a new key.
    """
    path = path.resolve()
    stat = path.stat()
    parts = [str(path), str(stat.st_size), str(stat.st_mtime_ns), str(CACHE_FORMAT_VERSION), transformers.__version__]
    parts.extend(salt)
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def gguf_cache_entry(gguf_path: Path) -> Path:
    """Where the converted config/tokenizer/weights of ``gguf_path`` live (may not exist yet)."""
    return cache_root() / "gguf" / file_cache_key(gguf_path)


def publish_dir_atomically(final_dir: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory under a temporary name, then rename it to ``final_dir``.

    ``build(tmp_dir)`` fills the directory. If another process published ``final_dir``
    first, its copy is kept and ours is discarded (both were built from the same input).
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        build(tmp_dir)
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; a cache entry is ordinary data
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not final_dir.is_dir():
                raise
            # Lost the race to a concurrent builder: its entry is complete, use it.
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


# ---------------------------------------------------------------------------
# Metadata


@functools.lru_cache(maxsize=1)
def _open_reader_cached(path: str, size: int, mtime_ns: int) -> GGUFReader:
    del size, mtime_ns  # part of the cache key only: a rewritten file gets a new reader
    return GGUFReader(path)


def open_gguf(gguf_path: Path) -> GGUFReader:
    """A GGUFReader for ``gguf_path``, reused for consecutive calls on the same file version.

    Opening costs seconds (the reader parses every vocabulary string), and a first
    load opens the file twice (config, then weights).

    Raises:
        ValueError: the file is not a readable GGUF file.
    """
    stat = gguf_path.stat()
    try:
        return _open_reader_cached(str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {e}") from e


_MISSING = object()


def _metadata(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """A scalar or string metadata value (arrays are not needed for the config)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF file lacks the metadata key {key!r}.")
        return default
    if field.types[0] == GGUFValueType.ARRAY:
        raise ValueError(f"GGUF metadata {key!r} is an array; loomlm expects a single value.")
    value = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value.item()


def gguf_model_type(reader: GGUFReader) -> str:
    """HF model_type of a GGUF file ("llama" or "qwen2").

    Raises:
        ValueError: the architecture is not one loomlm runs.
    """
    arch = _metadata(reader, "general.architecture")
    if arch not in GGUF_ARCH_TO_MODEL_TYPE:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(GGUF_ARCH_TO_MODEL_TYPE)} "
            "(Llama, Mistral and Qwen2 checkpoints convert to these)."
        )
    return GGUF_ARCH_TO_MODEL_TYPE[arch]


def config_from_gguf(reader: GGUFReader) -> PretrainedConfig:
    """Build the HF config (LlamaConfig / Qwen2Config) from GGUF metadata.

    Follows transformers' GGUF_CONFIG_MAPPING (``integrations/ggml.py``) for the
    field names, but reads only the scalars it needs, so it does not parse the
    vocabulary (transformers' parser takes ~7 s on the default model).
    ``tie_word_embeddings`` is true exactly when there is no ``output.weight``
    tensor, as in llama.cpp's loader.

    Raises:
        ValueError: unsupported architecture, missing metadata, or a RoPE scaling
            that the HF Llama/Qwen2 configs cannot express from GGUF metadata.
    """
    arch = _metadata(reader, "general.architecture")
    model_type = gguf_model_type(reader)
    num_heads = int(_metadata(reader, f"{arch}.attention.head_count"))
    hidden_size = int(_metadata(reader, f"{arch}.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1-style scaling is stored as precomputed frequency factors,
        # which no HF config field represents.
        raise ValueError("GGUF files with a rope_freqs tensor (Llama 3.1-style RoPE scaling) are not supported.")

    vocab_size = _metadata(reader, f"{arch}.vocab_size", None)
    if vocab_size is None:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
    kwargs: dict[str, Any] = {
        "architectures": [_MODEL_TYPE_TO_HF_CLASS[model_type]],
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": int(_metadata(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_metadata(reader, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_metadata(reader, f"{arch}.attention.head_count_kv", num_heads)),
        "max_position_embeddings": int(_metadata(reader, f"{arch}.context_length")),
        # Stored as float32 in GGUF (1e-5 reads back as 9.9999997e-06); kept as stored,
        # which is also what transformers' GGUF loader does.
        "rms_norm_eps": float(_metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if model_type == "llama":
        key_length = _metadata(reader, f"{arch}.attention.key_length", None)
        kwargs["head_dim"] = int(key_length) if key_length is not None else hidden_size // num_heads
    special_ids = {"bos": "bos_token_id", "eos": "eos_token_id", "padding": "pad_token_id", "unknown": "unk_token_id"}
    for gguf_key, hf_key in special_ids.items():
        token_id = _metadata(reader, f"tokenizer.ggml.{gguf_key}_token_id", None)
        if token_id is not None:
            kwargs[hf_key] = int(token_id)

    scaling_type = _metadata(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type in ("linear", "yarn"):
        rope_scaling: dict[str, Any] = {
            "rope_type": scaling_type,
            "factor": float(_metadata(reader, f"{arch}.rope.scaling.factor")),
        }
        if scaling_type == "yarn":
            rope_scaling["original_max_position_embeddings"] = int(
                _metadata(reader, f"{arch}.rope.scaling.original_context_length")
            )
        kwargs["rope_scaling"] = rope_scaling
    elif scaling_type != "none":
        raise ValueError(f"GGUF RoPE scaling type {scaling_type!r} is not supported.")
    return AutoConfig.for_model(model_type, **kwargs)


# ---------------------------------------------------------------------------
# Tensors


def gguf_to_hf_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name to its HF name.

    E.g. ``blk.3.attn_q.bias`` -> ``model.layers.3.self_attn.q_proj.bias``.

    Raises:
        ValueError: a tensor loomlm's Llama/Qwen2 model has no parameter for.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match[2] not in _BLOCK_NAMES:
        raise ValueError(f"Unexpected GGUF tensor {gguf_name!r} for a Llama/Qwen2 model.")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def reverse_permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for one projection (weight or bias).

    llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders each
    head's rows from HF's rotate-half layout ``[half, head_dim/2]`` to ggml's
    interleaved-pairs layout ``[head_dim/2, 2]``; this is the inverse, as in
    transformers' ``LlamaTensorProcessor._reverse_permute_weights``.

    Args:
        weight: ``[num_heads * head_dim, hidden]`` or a bias ``[num_heads * head_dim]``.
        num_heads: query heads for ``attn_q``, KV heads for ``attn_k``.

    Returns:
        A new contiguous tensor of the same shape in HF row order.
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    # [num_heads, head_dim/2, 2, *rest] -> [num_heads, 2, head_dim/2, *rest]
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(gguf_path: Path, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize every tensor of a GGUF file into float32, in HF names and layouts.

    Reads with ``gguf.GGUFReader`` and dequantizes with ``gguf.quants.dequantize``;
    applies ``reverse_permute_qk`` to ``attn_q``/``attn_k`` of Llama-architecture
    files only (llama.cpp does not permute Qwen2, whose RoPE is NeoX-style there).

    Yields:
        ``(hf_name, tensor)``, e.g. ``model.layers.0.self_attn.k_proj.weight``
        ``[num_kv_heads * head_dim, hidden]`` float32. No ``lm_head.weight`` when
        the embeddings are tied (the file has no ``output.weight``).

    Raises:
        ValueError: unreadable file, unsupported architecture, or unknown tensors.
    """
    reader = open_gguf(gguf_path)
    is_permuted = gguf_model_type(reader) == "llama"
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        array = dequantize(tensor.data, tensor.tensor_type)
        if array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous:
            # F32 tensors come back as read-only views of the memory map: copy them.
            array = np.array(array, dtype=np.float32, order="C")
        weight = torch.from_numpy(array)
        if is_permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = reverse_permute_qk(weight, config.num_attention_heads)
        elif is_permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = reverse_permute_qk(weight, config.num_key_value_heads)
        yield name, weight


# ---------------------------------------------------------------------------
# Cached conversion


def convert_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Convert the tokenizer and chat template in GGUF metadata to a fast HF tokenizer saved in ``out_dir``.

    Uses transformers' GGUF tokenizer converter (``AutoTokenizer.from_pretrained(dir,
    gguf_file=...)``), which takes seconds: call it through ``ensure_gguf_cache``.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))


def ensure_gguf_cache(gguf_path: Path) -> Path:
    """The cache entry for ``gguf_path`` holding ``config.json`` and the tokenizer files, built on first use.

    Returns:
        The entry directory: ``AutoConfig.from_pretrained`` and
        ``AutoTokenizer.from_pretrained`` load it directly.

    Raises:
        ValueError: unreadable GGUF file or unsupported architecture (checked
            before the slow tokenizer conversion).
    """
    entry = gguf_cache_entry(gguf_path)
    if (entry / _ENTRY_MARKER).is_file():
        return entry

    config = config_from_gguf(open_gguf(gguf_path))

    def build(tmp_dir: Path) -> None:
        convert_gguf_tokenizer(gguf_path, tmp_dir)
        config.save_pretrained(str(tmp_dir))
        stat = gguf_path.stat()
        marker = {
            "gguf_path": str(gguf_path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "cache_format_version": CACHE_FORMAT_VERSION,
            "transformers_version": transformers.__version__,
        }
        (tmp_dir / _ENTRY_MARKER).write_text(json.dumps(marker, indent=2))

    if entry.exists():
        # An entry without its marker was left by hand or by an older layout: rebuild it.
        shutil.rmtree(entry, ignore_errors=True)
    return publish_dir_atomically(entry, build)


def ensure_gguf_weights_cache(gguf_path: Path, config: PretrainedConfig) -> Path:
    """The float32 safetensors copy of a GGUF file's weights (HF names), written on first use.

    The file goes into the entry of ``ensure_gguf_cache`` (which must exist) under a
    temporary name and is published with ``os.replace``.
    """
    entry = ensure_gguf_cache(gguf_path)
    weights_file = entry / _WEIGHTS_FILE
    if weights_file.is_file():
        return weights_file
    tensors = dict(iter_gguf_weights(gguf_path, config))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{_WEIGHTS_FILE}.", suffix=".tmp", dir=entry)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata={"format": "pt", "source": str(gguf_path.resolve())})
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a cache file is ordinary data
        os.replace(tmp_name, weights_file)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    # Later loads read the safetensors copy: release the reader's parsed metadata.
    _open_reader_cached.cache_clear()
    return weights_file


def iter_cached_gguf_weights(
    gguf_path: Path, config: PretrainedConfig, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Like ``iter_gguf_weights`` but served from the float32 safetensors cache, cast to ``dtype``."""
    weights_file = ensure_gguf_weights_cache(gguf_path, config)
    with safe_open(str(weights_file), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name).to(dtype)
