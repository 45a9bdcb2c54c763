"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in plain PyTorch.

Follows transformers' `modeling_llama.py` math (pre-norm blocks, RoPE, GQA,
SwiGLU MLP); Qwen2 differs only by q/k/v biases (`attention_bias`). Tokens of
many requests arrive as one flat batch `[num_tokens]` with explicit positions;
attention reads the paged KV cache through the forward context.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loomlm.layers.activation import silu_and_mul
from loomlm.layers.attention import PagedAttention
from loomlm.layers.linear import Linear
from loomlm.layers.norm import RMSNorm
from loomlm.layers.rotary import RotaryEmbedding, apply_rotary_


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        # Qwen2 always has q/k/v biases; Llama/Mistral configs say so in `attention_bias`.
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=qkv_bias)
        self.o_proj = Linear(q_size, {"o": config.hidden_size},
                             bias=config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False)))
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.q_size, self.kv_size = q_size, kv_size

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_tokens, hidden_size]; rope: (cos, sin) of this step's positions
        qkv = self.qkv_proj(hidden)  # [T, q_size + 2 * kv_size]
        # q and k heads sit side by side at the front of each row: rotated in place, in one pass
        apply_rotary_(qkv, *rope, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = self.attn(q.unflatten(1, (self.num_heads, self.head_dim)),  # [T, H, D]
                        k.unflatten(1, (self.num_kv_heads, self.head_dim)),  # [T, KVH, D]
                        v.unflatten(1, (self.num_kv_heads, self.head_dim)))
        return self.o_proj(out.reshape(-1, self.q_size))  # out: [T, H, D]


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, {"gate": inter, "up": inter}, bias=bias)
        self.down_proj = Linear(inter, {"down": config.hidden_size}, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, residual: the stream before it (None at the first layer).

        Returns (this layer's output, the stream before it): the block h = h + attn(norm(h));
        h = h + mlp(norm(h)), with each residual add fused into the norm that follows it (as vLLM).
        """
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(rope, x), residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family model.

    forward(input_ids [num_tokens], positions [num_tokens]) -> hidden states [num_tokens, hidden_size];
    compute_logits(hidden [n, hidden_size]) -> float32 logits [n, vocab_size].
    """

    # HF parameter name suffix -> (our module attribute path, shard)
    _FUSED = {
        "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
        "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
        "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
        "self_attn.o_proj": ("self_attn.o_proj", "o"),
        "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
        "mlp.up_proj": ("mlp.gate_up_proj", "up"),
        "mlp.down_proj": ("mlp.down_proj", "down"),
    }

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_position)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Its own pre-transposed copy even when tied: `x @ w_t` beats F.linear on the
        # [num_rows, hidden] x [hidden, vocab] product that runs every step.
        self.lm_head = Linear(config.hidden_size, {"lm_head": config.vocab_size})
        for p in self.parameters():
            p.requires_grad_(False)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        rope = self.rotary.cos_sin(positions, x.dtype)  # computed once, used by every layer
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [n, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (transformers' names and [out, in] layouts).

        Raises ValueError for an unexpected name or shape, or when a parameter is left unloaded.
        """
        loaded: set[str] = set()
        modules = dict(self.named_modules())
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            key = name.removeprefix("model.")
            if name == "lm_head.weight":
                if self.tie_word_embeddings:
                    continue  # tied: some checkpoints still carry a copy
                self.lm_head.load_shard("lm_head", weight=tensor)
                loaded.add("lm_head")
                continue
            prefix, _, leaf = key.rpartition(".")  # e.g. "layers.0.self_attn.q_proj", "weight"
            parts = prefix.split(".")
            if len(parts) >= 3 and parts[0] == "layers":
                sub = ".".join(parts[2:])
                if sub in self._FUSED:
                    target, shard = self._FUSED[sub]
                    module = modules[f"layers.{parts[1]}.{target}"]
                    if leaf == "weight":
                        module.load_shard(shard, weight=tensor)
                    elif leaf == "bias":
                        module.load_shard(shard, bias=tensor)
                    else:
                        raise ValueError(f"unexpected parameter {name!r}")
                    loaded.add(f"layers.{parts[1]}.{target}.{shard}.{leaf}")
                    continue
            params = dict(self.named_parameters())
            if key not in params:
                raise ValueError(f"unexpected parameter {name!r} for {type(self).__name__}")
            self._copy(params[key], tensor, name)
            loaded.add(key)
        if self.tie_word_embeddings and "embed_tokens.weight" in loaded:
            self.lm_head.load_shard("lm_head", weight=self.embed_tokens.weight.data)
            loaded.add("lm_head")
        missing = [n for n in self._expected_names() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} parameters, e.g. {missing[:3]}")

    def _expected_names(self) -> list[str]:
        names = ["embed_tokens.weight", "norm.weight", "lm_head"]
        for i, layer in enumerate(self.layers):
            names += [f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"]
            for target, shard in self._FUSED.values():
                names.append(f"layers.{i}.{target}.{shard}.weight")
                linear = layer.get_submodule(target)
                if linear.bias is not None:
                    names.append(f"layers.{i}.{target}.{shard}.bias")
        return names

    @staticmethod
    def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
        param.data.copy_(tensor)
