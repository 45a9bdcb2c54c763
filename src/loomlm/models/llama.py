"""Llama-family decoder in plain PyTorch: Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Gemma 1/2/3,
Phi-3, OLMo 2, Granite, SmolLM3 (SmolLM2 is a Llama).

Follows transformers' `modeling_llama.py` math (RoPE, GQA, gated MLP, RMSNorm); what each
architecture changes is a switch of `LlamaFamilySpec` (llama_spec.py: q/k norms, norm layout,
Gemma's (1 + w) norms and scaled embeddings, soft-capping, sliding windows per layer, Granite's
multipliers, mixture-of-experts MLPs, layers without RoPE). Tokens of many requests arrive as
one flat batch `[num_tokens]` with explicit positions; attention reads the paged KV cache
through the forward context.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from loomlm.layers.activation import gelu_tanh_and_mul, silu_and_mul
from loomlm.layers.attention import PagedAttention
from loomlm.layers.forward_context import current_forward_batch
from loomlm.layers.linear import Linear
from loomlm.layers.linear_method import QuantizedWeight
from loomlm.layers.moe import SparseMoeBlock
from loomlm.layers.norm import RMSNorm
from loomlm.layers.rotary import RotaryEmbedding, apply_rotary_
from loomlm.models.decoder_stack import build_decoder_stack
from loomlm.models.llama_spec import LayerSpec, LlamaFamilySpec, llama_family_spec
from loomlm.models.weight_utils import default_weight_loader

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of this step's positions, each [T, rotary_dim]

_ACTIVATIONS = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}
# Multimodal Gemma 3 checkpoints nest the text model; these prefixes lead to it (transformers 5 / 4).
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class LlamaAttention(nn.Module):
    def __init__(self, spec: LlamaFamilySpec, layer: LayerSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(spec.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=spec.qkv_bias)
        self.o_proj = Linear(q_size, {"o": spec.hidden_size}, bias=spec.o_bias)
        self.qk_norm = spec.qk_norm
        if spec.qk_norm is not None:
            per_head = spec.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_size, spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_size, spec.rms_norm_eps)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale=spec.attn_scale,
                                   sliding_window=layer.sliding_window, logits_soft_cap=spec.attn_logit_softcap)
        self.rope_key = layer.rope_key
        self.q_size, self.kv_size = q_size, kv_size

    def forward(self, ropes: dict[str, Rope], hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_tokens, hidden_size]
        rope = ropes[self.rope_key] if self.rope_key is not None else None
        qkv = self.qkv_proj(hidden)  # [T, q_size + 2 * kv_size]
        if self.qk_norm is None and rope is not None:
            # q and k heads sit side by side at the front of each row: rotated in place, in one pass
            apply_rotary_(qkv, *rope, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm is not None:
            q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)  # before RoPE, as transformers
            if rope is not None:
                apply_rotary_(q, *rope, self.num_heads, self.head_dim)
                apply_rotary_(k, *rope, self.num_kv_heads, self.head_dim)
        out = self.attn(q.unflatten(1, (self.num_heads, self.head_dim)),  # [T, H, D]
                        k.unflatten(1, (self.num_kv_heads, self.head_dim)),  # [T, KVH, D]
                        v.unflatten(1, (self.num_kv_heads, self.head_dim)))
        return self.o_proj(out.reshape(-1, self.q_size))  # out: [T, H, D]

    def _norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads * head_dim] (a view into qkv) -> a normalized contiguous copy, same shape."""
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head on its own
            return norm(x.reshape(-1, self.head_dim)).view(x.shape[0], -1)
        return norm(x.contiguous())  # OLMo 2: the whole projection


class LlamaMLP(nn.Module):
    def __init__(self, spec: LlamaFamilySpec) -> None:
        super().__init__()
        inter = spec.intermediate_size
        self.gate_up_proj = Linear(spec.hidden_size, {"gate": inter, "up": inter}, bias=spec.mlp_bias)
        self.down_proj = Linear(inter, {"down": spec.hidden_size}, bias=spec.mlp_bias)
        self.act_and_mul = _ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: LlamaFamilySpec, layer: LayerSpec) -> None:
        super().__init__()
        hidden, eps = spec.hidden_size, spec.rms_norm_eps
        self.norm_layout = spec.norm_layout
        self.residual_multiplier = spec.residual_multiplier
        if spec.norm_layout != "post":
            self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = LlamaAttention(spec, layer)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        if spec.norm_layout == "sandwich":
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        if spec.norm_layout != "pre":
            self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        if layer.is_moe:
            self.mlp = SparseMoeBlock(hidden, spec.moe_intermediate_size, spec.num_experts,
                                      spec.num_experts_per_tok, spec.moe_renormalize)
        else:
            self.mlp = LlamaMLP(spec)

    def forward(self, ropes: dict[str, Rope], x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, residual: the stream before it (None at the first layer).

        Returns (this layer's output, the stream before it): the residual stream is always
        `output + stream`, so each residual add fuses into the norm that follows it (as vLLM).
        """
        if self.norm_layout == "post":  # OLMo 2: h += norm(attn(h)); h += norm(mlp(h))
            h = x if residual is None else x + residual
            h = h + self.post_attention_layernorm(self.self_attn(ropes, h))
            return self.post_feedforward_layernorm(self.mlp(h)), h
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        attn = self.self_attn(ropes, x)
        if self.norm_layout == "sandwich":  # Gemma 2/3: h += norm(attn(norm(h))); h += norm(mlp(norm(h)))
            x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(attn), residual)
            return self.post_feedforward_layernorm(self.mlp(x)), residual
        if self.residual_multiplier != 1.0:  # Granite scales each block's output
            attn = attn * self.residual_multiplier
        x, residual = self.post_attention_layernorm(attn, residual)
        out = self.mlp(x)
        if self.residual_multiplier != 1.0:
            out = out * self.residual_multiplier
        return out, residual


class BlockEmbedding(nn.Module):
    """An embedding table kept as GGML blocks: rows [vocab, row_bytes] uint8, each looked-up row
    dequantized on the fly (kernels' quant_dequantize, bit for bit gguf's dequantize).

    The tied LM head's blocks serve as the table, so a GGUF model holds no float copy of it
    (the default model: 113 MB). forward: ids [T] int64 -> [T, hidden] float32; an id outside
    the vocabulary raises IndexError, as nn.Embedding.
    """

    def __init__(self, data: torch.Tensor, qtype: int, hidden_size: int) -> None:
        super().__init__()
        from loomlm.layers.kernels import cpu_kernels

        self.data, self.qtype, self.hidden_size = data, qtype, hidden_size
        self._kernels = cpu_kernels()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.data.index_select(0, input_ids)  # [T, row_bytes]
        return self._kernels.quant_dequantize(rows, self.qtype, self.hidden_size)


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family model.

    forward(input_ids [num_tokens], positions [num_tokens]) -> hidden states [num_tokens, hidden_size];
    compute_logits(hidden [n, hidden_size]) -> float32 logits [n, vocab_size].
    Raises ValueError at construction for a switch value the family does not implement.
    """

    # HF parameter name suffix -> (our module attribute path, shard)
    _FUSED: ClassVar[dict[str, tuple[str, str]]] = {
        "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
        "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
        "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
        "self_attn.o_proj": ("self_attn.o_proj", "o"),
        "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
        "mlp.up_proj": ("mlp.gate_up_proj", "up"),
        "mlp.down_proj": ("mlp.down_proj", "down"),
    }
    # Phi-3 checkpoints hold these already fused: HF suffix -> (our module path, its shards in order)
    _PREFUSED: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "self_attn.qkv_proj": ("self_attn.qkv_proj", ("q", "k", "v")),
        "mlp.gate_up_proj": ("mlp.gate_up_proj", ("gate", "up")),
    }

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.spec = spec = llama_family_spec(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(spec, layer) for layer in spec.layers])
        # One rotary table per distinct rope setting (Gemma 3: local and global layers differ).
        keys = sorted({layer.rope_key for layer in spec.layers if layer.rope_key is not None})
        self.rotary = nn.ModuleDict({
            key: RotaryEmbedding(config, spec.head_dim, max_position, None if key == "default" else key)
            for key in keys})
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.tie_word_embeddings = spec.tie_word_embeddings
        # Its own pre-transposed copy even when tied: `x @ w_t` beats F.linear on the
        # [num_rows, hidden] x [hidden, vocab] product that runs every step.
        self.lm_head = Linear(spec.hidden_size, {"lm_head": config.vocab_size})
        for p in self.parameters():
            p.requires_grad_(False)
        # decoder_stack.py: decode-only steps through all layers in one native call where the model
        # qualifies; built on first use, after the KV pools are bound. False: always the Python layers.
        self.use_decoder_stack = True
        self._stack, self._stack_key = None, None

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        if self.spec.embed_scale != 1.0:
            x = x * self.spec.embed_scale
        batch = current_forward_batch()  # its sequence lengths pick dynamic / longrope frequencies
        ropes = {key: rotary.cos_sin(positions, x.dtype, batch) for key, rotary in self.rotary.items()}  # once per step
        stack = self._decoder_stack(batch, x.shape[0])
        if stack is not None:  # every layer in one native call, the same kernels in the same order
            cos, sin = next(iter(ropes.values()))
            x, residual = stack.forward(x, cos, sin, batch.decode.block_tables, batch.decode.context_lens,
                                        batch.slot_mapping)
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(ropes, x, residual)
        x, _ = self.norm(x, residual)
        return x

    def _decoder_stack(self, batch, num_tokens: int):
        """The native DecoderStack when this step may use it (decoder_stack.py), else None."""
        if not self.use_decoder_stack or batch.num_decode_tokens != num_tokens or batch.lora is not None \
                or batch.decode.backend.name != "cpu_native":
            return None
        k_cache = self.layers[0].self_attn.attn.k_cache
        if self._stack_key is not k_cache:  # first use, or the KV pools were bound anew
            self._stack = build_decoder_stack(self) if k_cache is not None else None
            self._stack_key = k_cache
        return self._stack

    def drop_decoder_stack(self) -> None:
        """Forget the DecoderStack (and its references to the KV pools), as when the pools are released."""
        self._stack, self._stack_key = None, None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()  # [n, vocab_size]
        if self.spec.logits_scale != 1.0:
            logits = logits * self.spec.logits_scale
        cap = self.spec.final_logit_softcap
        if cap is not None:  # Gemma 2: logits = c * tanh(logits / c)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def embed_from_lm_head_blocks(self) -> bool:
        """After process_weights: a tied LM head kept as one group of GGML blocks over the whole
        vocabulary also serves the embedding lookup (`BlockEmbedding`), and the float table is
        dropped. Returns whether it did. The blocks are the GGUF file's token_embd rows in order
        (the loader checks), so the lookup equals the float table bit for bit."""
        state = self.lm_head.weight_state
        if not (self.tie_word_embeddings and state is not None and state[0] == "gguf" and len(state[1]) == 1):
            return False
        group = state[1][0]
        if (group.start, group.end) != (0, self.config.vocab_size) or self.embed_tokens.weight.device.type != "cpu":
            return False
        self.embed_tokens = BlockEmbedding(group.data, group.qtype, self.spec.hidden_size)
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (transformers' names and [out, in] layouts).

        Raises ValueError for an unexpected name or shape, or when a parameter is left unloaded
        (the message names them).
        """
        loaded: set[str] = set()
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        for name, tensor in weights:
            name = _text_model_name(name)
            if name is None or "rotary_emb.inv_freq" in name:
                continue
            key = name.removeprefix("model.")
            if name == "lm_head.weight":
                if self.tie_word_embeddings and not isinstance(tensor, QuantizedWeight):
                    continue  # tied: some checkpoints still carry a copy (GGML blocks of the tied table are used)
                self.lm_head.load_shard("lm_head", weight=tensor)
                loaded.add("lm_head")
                continue
            prefix, _, leaf = key.rpartition(".")  # e.g. "layers.0.self_attn.q_proj", "weight"
            parts = prefix.split(".")
            if len(parts) >= 3 and parts[0] == "layers" and self._load_layer_tensor(
                    modules, int(parts[1]), ".".join(parts[2:]), leaf, tensor, name, loaded):
                continue
            if key not in params:
                raise ValueError(f"unexpected parameter {name!r} for {type(self).__name__}")
            if key.endswith("norm.weight") and self.spec.norm_weight_offset:
                tensor = tensor.float() + self.spec.norm_weight_offset  # Gemma's (1 + w), as it computes it
            default_weight_loader(params[key], tensor, name)
            loaded.add(key)
        if self.tie_word_embeddings and "embed_tokens.weight" in loaded and "lm_head" not in loaded:
            self.lm_head.load_shard("lm_head", weight=self.embed_tokens.weight.data)
            loaded.add("lm_head")
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                loaded.update(f"layers.{i}.mlp.{k}" for k in layer.mlp.loaded_weights())
        missing = [n for n in self._expected_names() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} parameters, e.g. {missing[:3]}")

    def _load_layer_tensor(self, modules: dict[str, nn.Module], i: int, sub: str, leaf: str,
                           tensor: torch.Tensor, name: str, loaded: set[str]) -> bool:
        """Load a tensor of layer i that goes to a fused Linear or an MoE block; False for others."""
        if i >= len(self.layers):
            raise ValueError(f"unexpected parameter {name!r}: the config has {len(self.layers)} layers")
        if leaf not in ("weight", "bias"):
            if sub in self._FUSED or sub in self._PREFUSED:
                raise ValueError(f"unexpected parameter {name!r}")
        elif sub in self._FUSED or (sub in self._PREFUSED and self.spec.fused_checkpoint):
            # one HF projection into its shard, or a Phi-3 fused one split over its shards in order
            target, shards = self._PREFUSED.get(sub) or (self._FUSED[sub][0], self._FUSED[sub][1:])
            if target.startswith("mlp.") and isinstance(self.layers[i].mlp, SparseMoeBlock):
                raise ValueError(f"unexpected parameter {name!r}: layer {i} is a mixture of experts")
            module = modules[f"layers.{i}.{target}"]
            sizes = [module.shard_sizes[s] for s in shards]
            if len(shards) > 1 and tensor.shape[0] != sum(sizes):  # one shard: load_shard checks the shape
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not hold {dict(zip(shards, sizes))} rows")
            for shard, part in zip(shards, tensor.split(sizes, dim=0) if len(shards) > 1 else (tensor,)):
                module.load_shard(shard, **{leaf: part})
                loaded.add(f"layers.{i}.{target}.{shard}.{leaf}")
            return True
        mlp = self.layers[i].mlp
        for moe_prefix in ("mlp.", "block_sparse_moe."):  # Qwen3-MoE / Mixtral names of the MoE block
            if isinstance(mlp, SparseMoeBlock) and sub.startswith(moe_prefix):
                mlp.load_weight(f"{sub.removeprefix(moe_prefix)}.{leaf}", tensor)
                return True
        return False

    def _expected_names(self) -> list[str]:
        """Every name `load_weights` must have recorded: Linear shards, norms, embeddings, MoE weights."""
        names = ["lm_head"]
        moe_blocks = []  # the MoE blocks check their own weights
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                moe_blocks.append(f"layers.{i}.mlp.")
                names += [f"layers.{i}.mlp.{k}" for k in layer.mlp.expected_weights()]
        for mod_name, module in self.named_modules():
            if mod_name == "lm_head" or f"{mod_name}.".startswith(tuple(moe_blocks)):
                continue
            if isinstance(module, Linear):
                for shard in module.shard_offsets:
                    names.append(f"{mod_name}.{shard}.weight")
                    if module.bias is not None:
                        names.append(f"{mod_name}.{shard}.bias")
            elif isinstance(module, (RMSNorm, nn.Embedding)):
                names.append(f"{mod_name}.weight")
        return names



def _text_model_name(name: str) -> str | None:
    """The text model's HF name of a checkpoint tensor (multimodal Gemma 3 nests it); None: not text."""
    if name.startswith(_NOT_TEXT):
        return None
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name
