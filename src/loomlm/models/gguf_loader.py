"""GGUF files (llama.cpp's format) as Hugging Face configs, tokenizers and tensors.

A GGUF file's ``general.architecture`` (llama.cpp's name) selects a ``GGUFArchitecture``
in ``GGUF_ARCHITECTURES``: llama, qwen2, qwen3, qwen3moe (-> ``qwen3_moe``), gemma2,
gemma3 (-> ``gemma3_text``), phi3 and gpt2. The config, the tensor names and the
tensor layouts produced are those of transformers' own GGUF loader
(``integrations/ggml.py`` GGUF_CONFIG_MAPPING, ``modeling_gguf_pytorch_utils.py``
TensorProcessors), each undoing what llama.cpp's ``convert_hf_to_gguf.py`` did:

* llama: Q/K rows permuted for ggml's interleaved RoPE -> ``reverse_permute_qk``;
* gemma2, gemma3: RMSNorm weights stored as ``w + 1`` -> minus 1;
* qwen3moe: experts stacked as ``ffn_{gate,up,down}_exps`` ``[num_experts, ...]`` ->
  one tensor per expert under the hub checkpoints' names;
* gpt2: Conv1D weights stored transposed -> transposed back;
* phi3: nothing (HF Phi3's ``qkv_proj`` / ``gate_up_proj`` are fused as in the file);
  LongRoPE factors stored as tensors -> the config's ``rope_parameters``.

Names come from gguf-py's own ``TensorNameMap`` applied to the parameter names of
the transformers model class, built on the meta device (no memory, no weights).
Where transformers leaves a config field at its class default, it is read as
llama.cpp's ``llama-model.cpp`` reads it (e.g. Qwen3's head_dim from
``attention.key_length``, Gemma's ``query_pre_attn_scalar``).

Metadata is read by a small parser (``read_gguf``) that walks over the vocabulary
instead of decoding it: ``gguf.GGUFReader`` spends about a minute on Gemma 3's
262k-token vocabulary. Tensors are dequantized with ``gguf.quants.dequantize``.

Two things are slow and are therefore cached per GGUF file under
``cache_root() / "gguf" / <key>`` (the key covers the file's absolute path, size
and mtime, the transformers version and ``CACHE_FORMAT_VERSION``):

* the tokenizer conversion from GGUF metadata (transformers' converter, seconds to
  a minute), saved with ``save_pretrained`` next to the ``config.json`` built here;
* the float32 weights (dequantizing takes seconds), served later from a
  ``model.safetensors`` copy.

Every cache write goes to a temporary name first and is published with a rename,
so concurrent processes never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from loomlm.layers.linear_method import QuantizedWeight
from loomlm.models.quantize import GGML_BLOCK, quantize_weight

logger = logging.getLogger(__name__)

# Storage types read as float; any other GGML type is a quantized one.
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                GGMLQuantizationType.F64)

# Bump when what is written into a cache entry changes, so stale entries are ignored.
CACHE_FORMAT_VERSION = 1
CACHE_DIR_ENV = "LOOMLM_CACHE_DIR"

# Marker written last into an entry; an entry directory without it is not trusted.
_ENTRY_MARKER = "loomlm_cache.json"
_WEIGHTS_FILE = "model.safetensors"


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


def publish_file_atomically(target: Path, write: Callable[[str], None]) -> Path:
    """Write a file under a temporary name beside ``target``, then rename it to ``target``.

    ``write(tmp_name)`` fills the file; whatever it raises propagates and the temporary file is
    removed. If another process published ``target`` first, its copy is kept (both were built
    from the same input).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a cache file is ordinary data
        if not target.is_file():
            os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


# ---------------------------------------------------------------------------
# Reading GGUF files (format: ggml docs/gguf.md, versions 2 and 3)

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent


@dataclass(frozen=True)
class SkippedStrings:
    """A string array ``read_gguf`` walked over without decoding (a vocabulary, a merge table)."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies in a GGUF file.

    Attributes:
        name: llama.cpp's name, e.g. ``blk.0.attn_q.weight``.
        shape: numpy order (ggml's dimensions reversed), e.g. ``[out_features, in_features]``.
        ggml_type: storage type (F32, F16, Q8_0, Q4_K, ...).
        offset: absolute byte offset of the data in the file.
        nbytes: bytes the data occupies.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata and tensor table; tensor data is read on demand (``read_tensor``).

    Attributes:
        path: the file.
        metadata: key -> value: ints, floats, bools and strings as Python values,
            numeric arrays as numpy arrays, string arrays as lists of str when
            ``read_gguf`` was asked for them, else as ``SkippedStrings``.
        tensors: in file order.
    """

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def architecture(self) -> str:
        """``general.architecture``: llama.cpp's name for the model family."""
        return str(self.metadata["general.architecture"])

    @property
    def tensor_names(self) -> set[str]:
        return {info.name for info in self.tensors}

    def tensor(self, name: str) -> GGUFTensorInfo:
        """The tensor called ``name``. Raises ValueError naming it when the file has none."""
        for info in self.tensors:
            if info.name == name:
                return info
        raise ValueError(f"{self.path} has no tensor {name!r}.")

    def read_blocks(self, info: GGUFTensorInfo, row_order: np.ndarray | None = None) -> QuantizedWeight:
        """A 2-D tensor's stored GGML blocks, rows as stored or taken in ``row_order``: data uint8
        [rows, row_bytes] (a new array: row n = output feature n), shape (rows, in_features)."""
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        rows = raw.reshape(info.shape[0], -1)
        data = np.array(rows if row_order is None else rows[row_order])
        return QuantizedWeight(torch.from_numpy(data), int(info.ggml_type), (int(info.shape[0]), int(info.shape[1])))

    def read_tensor(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor dequantized to float32: a new, writable, C-contiguous array of ``info.shape``.

        Raises:
            ValueError: a storage type gguf-py cannot dequantize (integer tensors).
        """
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        data = raw.reshape(quant_shape_to_byte_shape(info.shape, info.ggml_type))  # rows of bytes, any type
        try:
            array = dequantize(data, info.ggml_type)
        except NotImplementedError as e:
            raise ValueError(
                f"GGUF tensor {info.name!r} has type {info.ggml_type.name}, which loomlm cannot read."
            ) from e
        # F32 comes back as a read-only view of the memory map: "O" forces a copy then.
        return np.require(array.reshape(info.shape), np.float32, ["C", "W", "O"])


def read_gguf(gguf_path: Path, string_arrays: Collection[str] = ()) -> GGUFFile:
    """Parse a GGUF file's header: metadata and tensor table, no tensor data.

    Args:
        gguf_path: the file.
        string_arrays: metadata keys whose string arrays are decoded (e.g.
            ``tokenizer.ggml.tokens``); the others are only walked over (``SkippedStrings``).

    Raises:
        ValueError: not a GGUF file, an unsupported version, or a truncated or corrupt header.
    """
    try:
        return _parse_gguf(Path(gguf_path), string_arrays)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {e}") from e


def _parse_gguf(gguf_path: Path, string_arrays: Collection[str]) -> GGUFFile:
    blob = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    if bytes(blob[:4]) != b"GGUF":
        raise ValueError("no GGUF magic")
    version, tensor_count, metadata_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _GGUF_VERSIONS:
        raise ValueError(f"GGUF version {version}; loomlm reads versions {_GGUF_VERSIONS}")
    pos = 24
    metadata: dict[str, Any] = {}
    for _ in range(metadata_count):
        key, pos = _read_string(blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _read_value(blob, pos + 4, GGUFValueType(value_type), key in string_arrays)
    if "general.architecture" not in metadata:
        raise ValueError("no 'general.architecture' metadata")
    raw_infos = []
    for _ in range(tensor_count):
        name, pos = _read_string(blob, pos)
        (num_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{num_dims}Q", blob, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * num_dims)
        pos += 4 + 8 * num_dims + 12
        raw_infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(ggml_type), offset))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, ggml_type, offset in raw_infos:
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        nbytes = math.prod(shape) // block_size * type_size
        if data_start + offset + nbytes > blob.size:
            raise ValueError(f"truncated: tensor {name!r} ends past the end of the file")
        tensors.append(GGUFTensorInfo(name, shape, ggml_type, data_start + offset, nbytes))
    return GGUFFile(path=gguf_path, metadata=metadata, tensors=tuple(tensors))


def _read_string(blob: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    pos += 8
    return bytes(blob[pos : pos + length]).decode("utf-8"), pos + length


def _read_value(blob: np.ndarray, pos: int, value_type: GGUFValueType, decode_strings: bool) -> tuple[Any, int]:
    if value_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if value_type == GGUFValueType.STRING:
        return _read_string(blob, pos)
    if value_type != GGUFValueType.ARRAY:
        raise ValueError(f"unknown metadata value type {value_type}")
    element_type, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    element_type = GGUFValueType(element_type)
    if element_type in _SCALAR_FORMATS:
        dtype = np.dtype(_SCALAR_FORMATS[element_type])
        values = np.frombuffer(blob, dtype=dtype, count=count, offset=pos).copy()
        return values, pos + count * dtype.itemsize
    if element_type != GGUFValueType.STRING:
        raise ValueError(f"metadata arrays of {element_type.name} are not supported")
    strings = []
    for _ in range(count):  # variable-length entries: walk the lengths, decoding only when asked
        (length,) = struct.unpack_from("<Q", blob, pos)
        if decode_strings:
            strings.append(bytes(blob[pos + 8 : pos + 8 + length]).decode("utf-8"))
        pos += 8 + length
    return strings if decode_strings else SkippedStrings(count), pos


# The header of a file with no string array decoded (the vocabulary is walked over).
open_gguf = read_gguf


_MISSING = object()


def _metadata(gguf_file: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    """A scalar or string metadata value (arrays are refused: use ``gguf_file.metadata``)."""
    value = gguf_file.metadata.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ValueError(f"GGUF file {gguf_file.path} lacks the metadata key {key!r}.")
        return default
    if isinstance(value, (np.ndarray, list, SkippedStrings)):
        raise ValueError(f"GGUF metadata {key!r} is an array; loomlm expects a single value.")  # noqa: TRY004
    return value


# ---------------------------------------------------------------------------
# Architectures: config from metadata, tensor layouts


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture maps onto a transformers causal-LM class.

    Attributes:
        model_type: the HF ``model_type`` the file becomes.
        hf_class: the class ``config.json``'s "architectures" names.
        config_fields: ``(file, arch) -> HF config kwargs`` from the metadata
            (special token ids and ``tie_word_embeddings`` are added for every architecture).
        transform: ``(gguf_name, float32 array, HF config) -> array in HF layout``,
            undoing convert_hf_to_gguf.py's change to that tensor; None when none is changed.
        config_tensors: tensors that hold config values rather than weights (never yielded).
    """

    model_type: str
    hf_class: str
    config_fields: Callable[[GGUFFile, str], dict[str, Any]]
    transform: Callable[[str, np.ndarray, PretrainedConfig], np.ndarray] | None = None
    config_tensors: frozenset[str] = frozenset()


def _common_fields(f: GGUFFile, arch: str) -> dict[str, Any]:
    """The fields of every Llama-like config (transformers' GGUF_CONFIG_MAPPING for "llama")."""
    num_heads = int(_metadata(f, f"{arch}.attention.head_count"))
    fields: dict[str, Any] = {
        "vocab_size": _vocab_size(f, arch),
        "hidden_size": int(_metadata(f, f"{arch}.embedding_length")),
        "intermediate_size": int(_metadata(f, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_metadata(f, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_metadata(f, f"{arch}.attention.head_count_kv", num_heads)),
        "max_position_embeddings": int(_metadata(f, f"{arch}.context_length")),
        # Stored as float32 in GGUF (1e-5 reads back as 9.9999997e-06); kept as stored,
        # which is also what transformers' GGUF loader does.
        "rms_norm_eps": float(_metadata(f, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_metadata(f, f"{arch}.rope.freq_base", 10000.0)),
    }
    rope_scaling = _rope_scaling(f, arch)
    if rope_scaling is not None:
        fields["rope_scaling"] = rope_scaling
    if "rope_freqs.weight" in f.tensor_names:
        # Llama 3.1-style scaling: convert_hf_to_gguf.py stores the llama3 per-frequency factors
        # (not the scaling parameters) as this tensor; ggml divides each frequency by its factor,
        # and so does the rotary layer given `rope_freq_factors` (layers/rotary.py).
        fields["rope_freq_factors"] = [float(x) for x in f.read_tensor(f.tensor("rope_freqs.weight"))]
    return fields


def _vocab_size(f: GGUFFile, arch: str) -> int:
    vocab_size = _metadata(f, f"{arch}.vocab_size", None)
    if vocab_size is None:
        tokens = f.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"GGUF file {f.path} has neither {arch}.vocab_size nor a tokenizer vocabulary.")
        vocab_size = len(tokens)
    return int(vocab_size)


def _rope_scaling(f: GGUFFile, arch: str) -> dict[str, Any] | None:
    scaling_type = _metadata(f, f"{arch}.rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type not in ("linear", "yarn"):
        raise ValueError(f"GGUF RoPE scaling type {scaling_type!r} is not supported.")
    rope_scaling: dict[str, Any] = {
        "rope_type": scaling_type,
        "factor": float(_metadata(f, f"{arch}.rope.scaling.factor")),
    }
    if scaling_type == "yarn":
        rope_scaling["original_max_position_embeddings"] = int(
            _metadata(f, f"{arch}.rope.scaling.original_context_length")
        )
    return rope_scaling


def _head_dim(f: GGUFFile, arch: str) -> int:
    """``attention.key_length``, else hidden / heads (llama.cpp's ``n_embd_head_k``)."""
    key_length = _metadata(f, f"{arch}.attention.key_length", None)
    if key_length is not None:
        return int(key_length)
    return int(_metadata(f, f"{arch}.embedding_length")) // int(_metadata(f, f"{arch}.attention.head_count"))


def _with_head_dim(f: GGUFFile, arch: str) -> dict[str, Any]:
    """Llama, Qwen3: head_dim may differ from hidden / heads (Qwen3-0.6B: 128 vs 64)."""
    return {**_common_fields(f, arch), "head_dim": _head_dim(f, arch)}


def _qwen3_moe_fields(f: GGUFFile, arch: str) -> dict[str, Any]:
    return {
        **_with_head_dim(f, arch),
        "num_experts": int(_metadata(f, f"{arch}.expert_count")),
        "num_experts_per_tok": int(_metadata(f, f"{arch}.expert_used_count")),
        "moe_intermediate_size": int(_metadata(f, f"{arch}.expert_feed_forward_length")),
        # llama.cpp's qwen3moe graph renormalizes the top-k weights (transformers' GGUF default too).
        "norm_topk_prob": bool(_metadata(f, f"{arch}.expert_weights_norm", True)),
    }


def _gemma_query_pre_attn_scalar(fields: dict[str, Any], num_layers_27b: int) -> int:
    """llama.cpp's ``f_attention_scale``: 1/sqrt(hidden / heads) for the 27B models, else 1/sqrt(head_dim).

    The 27B models are recognised by their layer count, as llama-model.cpp does.
    """
    if fields["num_hidden_layers"] == num_layers_27b:
        return fields["hidden_size"] // fields["num_attention_heads"]
    return fields["head_dim"]


def _layer_types(num_layers: int, sliding: Callable[[int], bool]) -> list[str]:
    return ["sliding_attention" if sliding(i) else "full_attention" for i in range(num_layers)]


def _gemma2_fields(f: GGUFFile, arch: str) -> dict[str, Any]:
    # Defaults are llama.cpp's for keys older files lack (llama-model.cpp, LLM_ARCH_GEMMA2).
    fields = _with_head_dim(f, arch)
    return {
        **fields,
        "query_pre_attn_scalar": _gemma_query_pre_attn_scalar(fields, num_layers_27b=46),
        "sliding_window": int(_metadata(f, f"{arch}.attention.sliding_window", 4096)),
        "attn_logit_softcapping": float(_metadata(f, f"{arch}.attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(_metadata(f, f"{arch}.final_logit_softcapping", 30.0)),
        # Even layers slide (llama.cpp's swa pattern 2 = HF's default layer_types).
        "layer_types": _layer_types(fields["num_hidden_layers"], lambda i: i % 2 == 0),
    }


def _gemma3_fields(f: GGUFFile, arch: str) -> dict[str, Any]:
    """Gemma 3 text: local (sliding) and global layers with their own RoPE bases.

    As llama-model.cpp (LLM_ARCH_GEMMA3): without ``attention.sliding_window`` every
    layer is global; with it, every 6th layer is global (or as
    ``attention.sliding_window_pattern`` says), and local layers use RoPE base
    ``rope.freq_base_swa`` (default 10000) without scaling, which applies to global
    layers only.
    """
    fields = _with_head_dim(f, arch)
    num_layers = fields["num_hidden_layers"]
    full_rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta"), **fields.pop("rope_scaling", {})}
    local_rope = {"rope_type": "default", "rope_theta": float(_metadata(f, f"{arch}.rope.freq_base_swa", 10000.0))}
    sliding_window = int(_metadata(f, f"{arch}.attention.sliding_window", 0))
    pattern = f.metadata.get(f"{arch}.attention.sliding_window_pattern", 6)
    if sliding_window <= 0:
        layer_types = _layer_types(num_layers, lambda i: False)
    elif isinstance(pattern, np.ndarray):  # one flag per layer: true = sliding
        if len(pattern) != num_layers:
            raise ValueError(
                f"GGUF {arch}.attention.sliding_window_pattern has {len(pattern)} entries, not {num_layers}."
            )
        layer_types = _layer_types(num_layers, lambda i: bool(pattern[i]))
    else:  # every pattern-th layer is global
        layer_types = _layer_types(num_layers, lambda i: (i + 1) % int(pattern) != 0)
    final_softcap = float(_metadata(f, f"{arch}.final_logit_softcapping", 0.0))
    return {
        **fields,
        "query_pre_attn_scalar": _gemma_query_pre_attn_scalar(fields, num_layers_27b=62),
        "sliding_window": sliding_window if sliding_window > 0 else None,
        "layer_types": layer_types,
        "rope_parameters": {"full_attention": full_rope, "sliding_attention": local_rope},
        "final_logit_softcapping": final_softcap if final_softcap > 0 else None,
        "attn_logit_softcapping": None,
    }


_PHI3_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def _phi3_fields(f: GGUFFile, arch: str) -> dict[str, Any]:
    """Phi-3 / Phi-4 (convert_hf_to_gguf.py Phi3MiniModel).

    ``rope.dimension_count`` gives the partial rotary factor; ``sliding_window`` 0 means
    none (Phi-4); LongRoPE (the 128k models) stores its per-frequency factors as the
    tensors ``rope_factors_long`` / ``rope_factors_short``.
    """
    fields = _common_fields(f, arch)
    head_dim = fields["hidden_size"] // fields["num_attention_heads"]
    rope_dims = int(_metadata(f, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        fields["partial_rotary_factor"] = rope_dims / head_dim
    sliding_window = int(_metadata(f, f"{arch}.attention.sliding_window", 0))
    fields["sliding_window"] = sliding_window if sliding_window > 0 else None
    original_context = _metadata(f, f"{arch}.rope.scaling.original_context_length", None)
    if original_context is not None:
        fields["original_max_position_embeddings"] = int(original_context)
    if _PHI3_ROPE_FACTORS[0] in f.tensor_names:
        # Stored as float32: the shortest decimal that reads back the same (1.1, not 1.100000023841858)
        # is the value the HF config had.
        long_factor, short_factor = (
            [float(str(x)) for x in f.read_tensor(f.tensor(name))] for name in _PHI3_ROPE_FACTORS
        )
        fields["rope_scaling"] = {"rope_type": "longrope", "long_factor": long_factor, "short_factor": short_factor}
    return fields


def _gpt2_fields(f: GGUFFile, arch: str) -> dict[str, Any]:
    """GPT-2's own field names (transformers' GGUF_CONFIG_MAPPING "gpt2", plus n_positions from context_length)."""
    hidden_size = int(_metadata(f, f"{arch}.embedding_length"))
    feed_forward = int(_metadata(f, f"{arch}.feed_forward_length", 4 * hidden_size))
    return {
        "vocab_size": _vocab_size(f, arch),
        "n_embd": hidden_size,
        "n_layer": int(_metadata(f, f"{arch}.block_count")),
        "n_head": int(_metadata(f, f"{arch}.attention.head_count")),
        "n_positions": int(_metadata(f, f"{arch}.context_length")),
        "n_inner": feed_forward if feed_forward != 4 * hidden_size else None,
        "layer_norm_epsilon": float(_metadata(f, f"{arch}.attention.layer_norm_epsilon")),
    }


def reverse_permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for one projection (weight or bias).

    llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders each
    head's rows from HF's rotate-half layout ``[half, head_dim/2]`` to ggml's
    interleaved-pairs layout ``[head_dim/2, 2]``; this is the inverse, as in
    transformers' ``LlamaTensorProcessor._reverse_permute_weights``.

    Args:
        weight: ``[num_heads * head_dim, hidden]`` or a bias ``[num_heads * head_dim]``.
        num_heads: query heads for ``attn_q``, KV heads for ``attn_k``.

    Returns:
        A new contiguous array of the same shape in HF row order.
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    # [num_heads, head_dim/2, 2, *rest] -> [num_heads, 2, head_dim/2, *rest]
    return np.ascontiguousarray(weight.reshape(num_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape))


def _llama_transform(name: str, array: np.ndarray, config: PretrainedConfig) -> np.ndarray:
    # Only llama is permuted: llama.cpp runs Qwen, Gemma and Phi-3 with NeoX-style RoPE.
    if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", name):
        return reverse_permute_qk(array, config.num_attention_heads)
    if re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", name):
        return reverse_permute_qk(array, config.num_key_value_heads)
    return array


def _gemma_transform(name: str, array: np.ndarray, config: PretrainedConfig) -> np.ndarray:
    # convert_hf_to_gguf.py stores Gemma's RMSNorm weights as w + 1 (ggml multiplies by the
    # weight; HF's GemmaRMSNorm by 1 + weight); transformers' Gemma2TensorProcessor subtracts 1.
    return array - np.float32(1.0) if name.endswith("norm.weight") else array


_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def _gpt2_transform(name: str, array: np.ndarray, config: PretrainedConfig) -> np.ndarray:
    # HF GPT-2's Conv1D keeps [in_features, out_features]; llama.cpp stores [out, in].
    return np.ascontiguousarray(array.T) if name.endswith(_GPT2_TRANSPOSED) else array


# llama.cpp architecture name -> how it loads. Mistral checkpoints convert to arch "llama"
# (llama.cpp drops the sliding window), so they load as Llama.
GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("llama", "LlamaForCausalLM", _with_head_dim, _llama_transform,
                              frozenset({"rope_freqs.weight"})),
    "qwen2": GGUFArchitecture("qwen2", "Qwen2ForCausalLM", _common_fields),
    "qwen3": GGUFArchitecture("qwen3", "Qwen3ForCausalLM", _with_head_dim),
    "qwen3moe": GGUFArchitecture("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_fields),
    "gemma2": GGUFArchitecture("gemma2", "Gemma2ForCausalLM", _gemma2_fields, _gemma_transform),
    "gemma3": GGUFArchitecture("gemma3_text", "Gemma3ForCausalLM", _gemma3_fields, _gemma_transform),
    "phi3": GGUFArchitecture("phi3", "Phi3ForCausalLM", _phi3_fields, None, frozenset(_PHI3_ROPE_FACTORS)),
    "gpt2": GGUFArchitecture("gpt2", "GPT2LMHeadModel", _gpt2_fields, _gpt2_transform),
}


def gguf_architecture(gguf_file: GGUFFile) -> GGUFArchitecture:
    """The ``GGUFArchitecture`` of a file.

    Raises:
        ValueError: the architecture is not one loomlm loads (the message lists those it does).
    """
    arch = gguf_file.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_ARCHITECTURES))} "
            "(llama.cpp's names; Mistral checkpoints convert to llama)."
        )
    return GGUF_ARCHITECTURES[arch]


def config_from_gguf(gguf_file: GGUFFile) -> PretrainedConfig:
    """Build the HF config (LlamaConfig, Gemma3TextConfig, ...) from GGUF metadata.

    Field names follow transformers' GGUF_CONFIG_MAPPING (``integrations/ggml.py``);
    fields it leaves at class defaults are read as llama.cpp reads them (see each
    architecture's fields function). ``tie_word_embeddings`` is true exactly when
    there is no ``output.weight`` tensor, as in llama.cpp's loader.

    Raises:
        ValueError: unsupported architecture (lists the supported ones), missing
            metadata, or a RoPE scaling the HF configs cannot express from GGUF metadata.
    """
    arch = gguf_architecture(gguf_file)
    fields = arch.config_fields(gguf_file, gguf_file.architecture)
    fields["architectures"] = [arch.hf_class]
    fields["tie_word_embeddings"] = "output.weight" not in gguf_file.tensor_names
    special_ids = {"bos": "bos_token_id", "eos": "eos_token_id", "padding": "pad_token_id", "unknown": "unk_token_id"}
    for gguf_key, hf_key in special_ids.items():
        token_id = _metadata(gguf_file, f"tokenizer.ggml.{gguf_key}_token_id", None)
        if token_id is not None:
            fields[hf_key] = int(token_id)
    return AutoConfig.for_model(arch.model_type, **fields)


# ---------------------------------------------------------------------------
# Tensors

# transformers 5 fuses each layer's experts into [num_experts, ...] parameters; hub checkpoints
# (and loomlm's models) keep one tensor per expert.
_FUSED_EXPERTS_RE = re.compile(r"(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)")
# llama.cpp's stacked experts [num_experts, out, in] (Qwen2-MoE/Qwen3-MoE layout).
_GGUF_EXPERTS_RE = re.compile(r"blk\.(?P<layer>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.weight")
# The HF names of linear layers' weights: the tensors the "gguf" linear method may keep as blocks.
_LINEAR_WEIGHTS = ("proj.weight", "lm_head.weight")


def hf_checkpoint_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a hub checkpoint of ``config`` holds.

    Taken from the transformers model class built on the meta device (no memory),
    with fused MoE experts listed one by one as in hub checkpoints
    (``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``) and without
    ``lm_head.weight`` when the embeddings are tied.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        match = _FUSED_EXPERTS_RE.fullmatch(name)
        if match is None:
            shapes[name] = tuple(tensor.shape)
            continue
        num_experts = tensor.shape[0]
        if match["proj"] == "gate_up_proj":  # [num_experts, 2 * intermediate, hidden], gate first
            per_expert = (tensor.shape[1] // 2, tensor.shape[2])
            projs = ("gate_proj", "up_proj")
        else:  # down_proj: [num_experts, hidden, intermediate]
            per_expert, projs = tuple(tensor.shape[1:]), ("down_proj",)
        for expert in range(num_experts):
            for proj in projs:
                shapes[f"{match['prefix']}.{expert}.{proj}.weight"] = per_expert
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def gguf_to_hf_names(gguf_arch: str, hf_names: Collection[str], num_layers: int) -> dict[str, str]:
    """llama.cpp tensor name -> HF name, from gguf-py's ``TensorNameMap`` for ``gguf_arch``.

    E.g. ``blk.3.attn_q.bias`` -> ``model.layers.3.self_attn.q_proj.bias``. HF names
    the map does not know (per-expert weights) are left out.
    """
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    name_map = gguf.get_tensor_name_map(model_arch, num_layers)
    names: dict[str, str] = {}
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            assert f"{gguf_base}.{suffix}" not in names, f"two HF parameters map to {gguf_base}.{suffix}"
            names[f"{gguf_base}.{suffix}"] = hf_name
    return names


def _row_permutation(arch: GGUFArchitecture, gguf_name: str, rows: int, config: PretrainedConfig) -> np.ndarray | None:
    """The output-row order the architecture's transform gives a [rows, in] tensor (None: not a row reorder).

    The transform is run on a column of row indices: a reorder of whole rows (Llama's Q/K
    un-permutation) comes back as a permutation; anything else (GPT-2's transposes, Gemma's
    norm offset) does not, and that tensor is dequantized instead.
    """
    index = np.arange(rows, dtype=np.float32)[:, None]
    if arch.transform is None:
        return np.arange(rows)
    out = arch.transform(gguf_name, index.copy(), config)
    if out.shape != (rows, 1) or not np.array_equal(np.sort(out[:, 0]), index[:, 0]):
        return None
    return out[:, 0].astype(np.int64)


def iter_gguf_weights(gguf_path: Path, config: PretrainedConfig,
                      keep_quantized: Collection[int] = ()) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Dequantize every tensor of a GGUF file into float32, in HF names and layouts.

    Applies the architecture's ``transform`` (Llama Q/K un-permutation, Gemma norm
    offset, GPT-2 transposes) and splits stacked MoE experts into per-expert tensors.

    Yields:
        ``(hf_name, tensor)``, e.g. ``model.layers.0.self_attn.k_proj.weight``
        ``[num_kv_heads * head_dim, hidden]`` float32, or for Qwen3-MoE
        ``model.layers.0.mlp.experts.5.down_proj.weight`` ``[hidden, moe_intermediate]``.
        No ``lm_head.weight`` when the embeddings are tied (the file has no ``output.weight``).
        With ``keep_quantized`` (GGML type ids), a linear layer's weight (``*proj.weight``,
        ``lm_head.weight``) stored in one of those types comes as a ``QuantizedWeight``: its
        blocks as stored, rows in HF order, for the "gguf" linear method. One stored in another
        quantized type (Q5_1, Q2_K, IQ4_NL, ...) is dequantized and requantized to Q8_0, the
        nearest kernel type that loses nothing the source kept (8 bits per weight against at
        most 6.6), with a log line per type; float (F32/F16/BF16) weights and MoE experts
        stay float.

    Raises:
        ValueError: unreadable file or unsupported architecture; a tensor no HF
            parameter corresponds to, one whose shape differs from what ``config``
            implies, or (after the last tensor) HF parameters the file lacks; each
            message names the tensors.
    """
    gguf_file = open_gguf(gguf_path)
    arch = gguf_architecture(gguf_file)
    expected = hf_checkpoint_shapes(config)
    names = gguf_to_hf_names(gguf_file.architecture, expected, config.num_hidden_layers)
    requantized: set[str] = set()
    for info in gguf_file.tensors:
        if info.name in arch.config_tensors:
            continue
        hf_name = names.get(info.name)
        # The order of the stored rows in HF layout, where the blocks may be kept (None: they may not).
        order = (_row_permutation(arch, info.name, info.shape[0], config)
                 if int(info.ggml_type) in keep_quantized and len(info.shape) == 2 and hf_name is not None else None)
        if order is not None and hf_name.endswith(_LINEAR_WEIGHTS):
            _check_expected(expected, info.name, hf_name, info.shape, gguf_path)
            yield hf_name, gguf_file.read_blocks(info, order)
            continue
        if (hf_name == "model.embed_tokens.weight" and order is not None
                and getattr(config, "tie_word_embeddings", False) and np.array_equal(order, np.arange(info.shape[0]))):
            # Tied embeddings: the lookup needs float rows, but the LM head can read the blocks.
            yield "lm_head.weight", gguf_file.read_blocks(info)
        array = gguf_file.read_tensor(info)
        if arch.transform is not None:
            array = arch.transform(info.name, array, config)
        requantize = bool(keep_quantized) and info.ggml_type not in _FLOAT_TYPES
        for hf_name, part in _hf_tensors(info.name, array, names, arch):
            _check_expected(expected, info.name, hf_name, part.shape, gguf_path)
            if (requantize and hf_name.endswith(_LINEAR_WEIGHTS) and ".experts." not in hf_name
                    and part.ndim == 2 and part.shape[1] % GGML_BLOCK == 0):
                if info.ggml_type.name not in requantized:
                    requantized.add(info.ggml_type.name)
                    logger.info("GGUF %s weights have no native kernel: dequantized and requantized to Q8_0",
                                info.ggml_type.name)
                yield hf_name, quantize_weight(part, int(GGMLQuantizationType.Q8_0))
                continue
            yield hf_name, torch.from_numpy(part)
    if expected:
        missing = sorted(expected)
        raise ValueError(
            f"{gguf_path} lacks the tensors of {len(missing)} {arch.hf_class} parameters: "
            f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}."
        )


def _check_expected(expected: dict[str, tuple[int, ...]], gguf_name: str, hf_name: str, shape: tuple[int, ...],
                    gguf_path: Path) -> None:
    """Take ``hf_name`` off ``expected``. Raises ValueError when it was taken already or has another shape."""
    expected_shape = expected.pop(hf_name, None)
    if expected_shape is None:
        raise ValueError(f"GGUF tensor {gguf_name!r} maps to {hf_name!r}, which appears twice in {gguf_path}.")
    if tuple(shape) != tuple(expected_shape):
        raise ValueError(f"GGUF tensor {gguf_name!r} gives {hf_name!r} the shape {list(shape)}; "
                         f"the file's metadata implies {list(expected_shape)}.")


def _hf_tensors(
    gguf_name: str, array: np.ndarray, names: dict[str, str], arch: GGUFArchitecture
) -> Iterator[tuple[str, np.ndarray]]:
    """The HF tensors one GGUF tensor becomes: itself renamed, or one per expert."""
    if gguf_name in names:
        yield names[gguf_name], array
        return
    match = _GGUF_EXPERTS_RE.fullmatch(gguf_name)
    if match is None:
        raise ValueError(f"Unexpected GGUF tensor {gguf_name!r}: no {arch.hf_class} parameter corresponds to it.")
    # [num_experts, out, in] -> one [out, in] per expert, as in transformers' Qwen2MoeTensorProcessor.
    for expert in range(array.shape[0]):
        hf_name = f"model.layers.{match['layer']}.mlp.experts.{expert}.{match['proj']}_proj.weight"
        yield hf_name, array[expert].copy()  # a copy: safetensors refuses tensors sharing memory


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


def iter_cached_gguf_weights(
    gguf_path: Path, config: PretrainedConfig, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Like ``iter_gguf_weights`` but served from a float32 safetensors copy (HF names), cast to ``dtype``.

    The copy is written on first use into the entry of ``ensure_gguf_cache`` (built if missing),
    published atomically (``publish_file_atomically``).
    """
    weights_file = ensure_gguf_cache(gguf_path) / _WEIGHTS_FILE
    if not weights_file.is_file():
        tensors = dict(iter_gguf_weights(gguf_path, config))
        metadata = {"format": "pt", "source": str(gguf_path.resolve())}
        publish_file_atomically(weights_file, lambda tmp_name: save_file(tensors, tmp_name, metadata=metadata))
    with safe_open(str(weights_file), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name).to(dtype)
