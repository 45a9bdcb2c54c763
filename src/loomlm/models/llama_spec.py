"""What sets each Llama-family architecture apart, read once from its HF config.

The family (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Gemma 1/2/3, Phi-3, OLMo 2,
Granite, SmolLM3) shares one decoder block: attention with RoPE and GQA, a gated MLP or a
mixture of experts, RMSNorm. `LlamaFamilySpec` holds the switches that differ, each with the
transformers file it follows (`transformers/models/<type>/modeling_<type>.py`), so that the
model code in `llama.py` reads as one block with a few config-driven branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSpec:
    """Per-layer choices (Gemma 2/3 alternate local and global layers; SmolLM3 drops RoPE in some)."""

    sliding_window: int | None  # attend the last `sliding_window` positions only; None: full causal
    rope_key: str | None  # which rotary table ("default", or Gemma 3's layer type); None: no RoPE (SmolLM3)
    is_moe: bool  # the MLP is a sparse mixture of experts


@dataclass(frozen=True)
class LlamaFamilySpec:
    """Architecture switches of one checkpoint (see the module docstring)."""

    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    qkv_bias: bool  # Qwen2 always; Llama/Mistral/OLMo 2 when `attention_bias`
    o_bias: bool
    mlp_bias: bool
    # "head": RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3);
    # "full": over the whole q and k projections (OLMo 2); None: no q/k norm
    qk_norm: str | None
    # "pre": h += attn(norm(h)); h += mlp(norm(h))  (Llama)
    # "sandwich": h += norm(attn(norm(h))); h += norm(mlp(norm(h)))  (Gemma 2/3)
    # "post": h += norm(attn(h)); h += norm(mlp(h))  (OLMo 2)
    norm_layout: str
    norm_weight_offset: float  # Gemma's RMSNorm scales by (1 + weight): 1.0, folded into the weight at load
    activation: str  # gate activation of the MLP: "silu" or "gelu_tanh" (Gemma's gelu_pytorch_tanh)
    embed_scale: float  # embeddings are multiplied by it (Gemma: sqrt(hidden); Granite: embedding_multiplier)
    residual_multiplier: float  # Granite scales each block's output before the residual add
    attn_scale: float  # softmax scale (head_dim**-0.5; Gemma 2/3: query_pre_attn_scalar**-0.5; Granite's own)
    attn_logit_softcap: float | None  # Gemma 2 (Gemma 3 when set): scores = c * tanh(scores / c)
    final_logit_softcap: float | None  # Gemma 2: logits = c * tanh(logits / c)
    logits_scale: float  # logits are multiplied by it (Granite: 1 / logits_scaling)
    tie_word_embeddings: bool
    fused_checkpoint: bool  # Phi-3 stores qkv_proj and gate_up_proj already fused
    # mixture of experts (Mixtral, Qwen3-MoE): 0 experts = dense
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_renormalize: bool
    layers: tuple[LayerSpec, ...]


_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


def _activation(config) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if name == "silu" or name == "swish":
        return "silu"
    if name in _GELU_TANH:
        return "gelu_tanh"
    if name == "gelu" and config.model_type == "gemma":
        # transformers' Gemma maps a legacy "gelu" to the tanh approximation (modeling_gemma.py).
        return "gelu_tanh"
    raise ValueError(f"unsupported MLP activation {name!r} for model_type {config.model_type!r}")


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    # Mistral, Mixtral, Phi-3: one `sliding_window` for every layer (modeling_mistral.py)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def _is_moe_layer(config, i: int) -> bool:
    mt = config.model_type
    if mt == "mixtral":
        return True
    if mt == "qwen3_moe":  # modeling_qwen3_moe.py: Qwen3MoeDecoderLayer
        return (i not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
                and (i + 1) % config.decoder_sparse_step == 0)
    return False


def _rope_key(config, i: int, layer_type: str) -> str | None:
    if config.model_type == "smollm3" and not config.no_rope_layers[i]:
        return None  # modeling_smollm3.py: `use_rope = config.no_rope_layers[layer_idx]`
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # Gemma 3: a rope table per layer type (local base 10k, global 1M)
        return layer_type
    return "default"


def llama_family_spec(config) -> LlamaFamilySpec:
    """Read the switches of a Llama-family HF config (transformers' attribute names).

    Raises ValueError for a value the family code does not implement (an unknown activation).
    """
    mt = config.model_type
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    is_gemma = mt in ("gemma", "gemma2", "gemma3_text")
    attention_bias = bool(getattr(config, "attention_bias", False))
    if mt in ("gemma2", "gemma3_text"):
        attn_scale = config.query_pre_attn_scalar ** -0.5
    elif mt == "granite":
        attn_scale = config.attention_multiplier
    else:
        attn_scale = head_dim ** -0.5
    window = getattr(config, "sliding_window", None)
    layer_types = _layer_types(config)
    layers = tuple(
        LayerSpec(sliding_window=window if kind == "sliding_attention" else None,
                  rope_key=_rope_key(config, i, kind), is_moe=_is_moe_layer(config, i))
        for i, kind in enumerate(layer_types))
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    return LlamaFamilySpec(
        model_type=mt,
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        qkv_bias=mt == "qwen2" or attention_bias,
        o_bias=mt != "qwen2" and attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm="head" if mt in ("qwen3", "qwen3_moe", "gemma3_text") else "full" if mt == "olmo2" else None,
        norm_layout="sandwich" if mt in ("gemma2", "gemma3_text") else "post" if mt == "olmo2" else "pre",
        norm_weight_offset=1.0 if is_gemma else 0.0,
        activation=_activation(config),
        embed_scale=(math.sqrt(config.hidden_size) if is_gemma
                     else float(config.embedding_multiplier) if mt == "granite" else 1.0),
        residual_multiplier=float(config.residual_multiplier) if mt == "granite" else 1.0,
        attn_scale=float(attn_scale),
        attn_logit_softcap=getattr(config, "attn_logit_softcapping", None) if mt in ("gemma2", "gemma3_text") else None,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None),
        logits_scale=1.0 / float(config.logits_scaling) if mt == "granite" else 1.0,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        fused_checkpoint=mt == "phi3",
        num_experts=num_experts if any(layer.is_moe for layer in layers) else 0,
        num_experts_per_tok=getattr(config, "num_experts_per_tok", 0) or 0,
        moe_intermediate_size=getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
        # Mixtral always renormalizes the top-k weights; Qwen3-MoE when `norm_topk_prob`
        moe_renormalize=mt == "mixtral" or bool(getattr(config, "norm_topk_prob", False)),
        layers=layers,
    )
