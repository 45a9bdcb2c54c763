"""A decode-only step through all layers of a Llama-family model in one native call.

At one stream a decode step of the default model spent about as long in Python (module calls,
views, some 15 kernel calls per layer, 30 layers) as in the kernels. `kernels.DecoderStack`
(decoder_stack_cpu.cpp) holds each layer's weights and KV pool and runs the same kernels in the
same order, so its output equals the Python layers' bit for bit; `build_decoder_stack` decides
whether a model can use it at all and `LlamaForCausalLM.forward` whether a step can.

A model qualifies when it is float32 on the CPU with the native kernels, pre-norm (Llama, Mistral,
Qwen2, SmolLM, Granite without multipliers), without q/k norms, biases or mixture-of-experts
layers, with one full-width rotary table, and every projection on a native linear method (GGUF
blocks in one group, or float32 panels). A step qualifies when it is decode-only on the
"cpu_native" decode backend and carries no LoRA adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from loomlm.layers.kernels import cpu_kernels
from loomlm.layers.linear import Linear
from loomlm.layers.linear_method import GGUFLinearMethod, NativeLinearMethod

if TYPE_CHECKING:
    from loomlm.models.llama import LlamaForCausalLM


def native_linear(linear: Linear) -> tuple[torch.Tensor, int, int, int, int] | None:
    """(weight, qtype, n, rows, activation_planes) as DecoderStack.add_layer takes it, or None.

    GGUF blocks in one group: (blocks, GGML type id, out_features, float_rows, planes); float32
    panels of the native method: (panels, 0, out_features, large_m, 1). None for a bias, several
    GGUF groups or any other method.
    """
    method, state = linear.method, linear.weight_state
    if linear.bias is not None or state is None:
        return None
    if isinstance(method, GGUFLinearMethod):
        kind, inner = state
        if kind == "gguf":
            if len(inner) != 1:
                return None
            group = inner[0]
            return group.data, group.qtype, group.end - group.start, group.float_rows, method.activation_planes
        method, state = method.float_method, inner
    if isinstance(method, NativeLinearMethod):
        return state, 0, linear.out_features, method.large_m, 1
    return None


def build_decoder_stack(model: LlamaForCausalLM) -> Any | None:
    """A `kernels.DecoderStack` over model's layers and their bound KV pools, or None where the model
    does not qualify (module docstring) or its KV pools are not bound yet."""
    from loomlm.models.llama import LlamaMLP

    kernels = cpu_kernels()
    spec = model.spec
    norm = model.norm.weight
    if kernels is None or norm.device.type != "cpu" or norm.dtype != torch.float32:
        return None
    if spec.norm_layout != "pre" or spec.qk_norm is not None or spec.residual_multiplier != 1.0 \
            or spec.activation != "silu" or len(model.rotary) != 1:
        return None
    rotary = next(iter(model.rotary.values()))
    if rotary.cos_cached.shape[-1] != spec.head_dim:
        return None
    stack = kernels.DecoderStack(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps)
    for layer in model.layers:
        attn = layer.self_attn
        if attn.rope_key is None or not isinstance(layer.mlp, LlamaMLP) or attn.attn.k_cache is None:
            return None
        linears = [native_linear(m) for m in (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        if any(lin is None for lin in linears):
            return None
        paged = attn.attn
        stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, linears,
                        paged.k_cache, paged.v_cache, paged.scale, paged.sliding_window or 0,
                        paged.logits_soft_cap or 0.0)
    return stack
