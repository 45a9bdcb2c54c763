"""GPT-2 (Radford et al. 2019, openai-community/gpt2*) in plain PyTorch.

Follows transformers' `models/gpt2/modeling_gpt2.py`: learned absolute positions (`wpe`),
pre-norm blocks with LayerNorm (`layer_norm_epsilon`), biases everywhere, a gelu_new MLP
(`activation_function`), attention scaled by head_dim**-0.5 (`scale_attn_weights`) and by
1 / (layer index + 1) (`scale_attn_by_inverse_layer_idx`), and a head tied to the token
embeddings. HF stores the projections as Conv1D, weight [in, out]: the layout of our
pre-transposed `Linear.weight_t`, so each loads with one transpose back. Tokens of many
requests arrive as one flat batch `[num_tokens]` with explicit positions; attention reads the
paged KV cache through the forward context.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from loomlm.layers.activation import activation_fn
from loomlm.layers.attention import PagedAttention
from loomlm.layers.linear import Linear
from loomlm.models.weight_utils import default_weight_loader


class GPT2Attention(nn.Module):
    """Multi-head attention (no GQA), q/k/v fused: [num_tokens, hidden] -> [num_tokens, hidden]."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = Linear(hidden, {"q": hidden, "k": hidden, "v": hidden}, bias=True)  # HF c_attn
        self.o_proj = Linear(hidden, {"o": hidden}, bias=True)  # HF attn.c_proj
        # GPT2Attention.scaling. `reorder_and_upcast_attn` changes only how HF's eager path reaches
        # the same float32 result (scaling k inside baddbmm); it needs nothing here.
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=scale)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.hidden, dim=-1)  # each [T, hidden]
        heads = (self.num_heads, self.head_dim)
        out = self.attn(q.unflatten(1, heads), k.unflatten(1, heads), v.unflatten(1, heads))  # [T, H, D]
        return self.o_proj(out.reshape(-1, self.hidden))


class GPT2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        inner = config.n_inner if config.n_inner is not None else 4 * hidden
        self.c_fc = Linear(hidden, {"c_fc": inner}, bias=True)
        self.c_proj = Linear(inner, {"c_proj": hidden}, bias=True)
        self.act = activation_fn(config.activation_function, "GPT-2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))  # [num_tokens, hidden_size]


class GPT2Block(nn.Module):
    """h = h + attn(ln_1(h)); h = h + mlp(ln_2(h)). Norm names are transformers'."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden_size]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its LM head.

    forward(input_ids [num_tokens], positions [num_tokens]) -> hidden [num_tokens, hidden_size];
    compute_logits(hidden [n, hidden_size]) -> float32 logits [n, vocab_size].

    Raises ValueError at construction when `max_position` exceeds the learned position table
    (`n_positions`), for an unknown activation, or for cross-attention (`add_cross_attention`).
    """

    # HF Conv1D module inside a block -> our Linear's path in the block (all its shards, in order)
    _CONV1D: ClassVar[dict[str, str]] = {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.o_proj",
               "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
    # HF module -> (our path, shard), for the LoRA manager. c_attn is missing: one HF module over
    # three shards, which the manager's one-shard targets cannot express.
    _FUSED: ClassVar[dict[str, tuple[str, str]]] = {
        "attn.c_proj": ("attn.o_proj", "o"),
        "mlp.c_fc": ("mlp.c_fc", "c_fc"),
        "mlp.c_proj": ("mlp.c_proj", "c_proj"),
    }

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        if max_position > config.max_position_embeddings:
            raise ValueError(f"max_position {max_position} exceeds GPT-2's learned position table "
                             f"(n_positions={config.max_position_embeddings})")
        activation_fn(config.activation_function, "GPT-2")  # refuses an unknown one now
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention) is an encoder-decoder part; "
                             "not supported")
        self.config = config
        hidden = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, hidden)
        self.wpe = nn.Embedding(config.max_position_embeddings, hidden)
        self.h = nn.ModuleList([GPT2Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(hidden, eps=config.layer_norm_epsilon)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        # Its own pre-transposed copy even when tied (as llama.py: `x @ w_t` is the fast path).
        self.lm_head = Linear(hidden, {"lm_head": config.vocab_size})
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        """The blocks, under the name the LoRA manager reads (HF's `h` keeps the parameter names)."""
        return self.h

    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn.attn for block in self.h]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # [num_tokens, hidden_size]
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [n, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (transformers' names; Conv1D weights [in, out], lm_head [vocab, hidden]).

        Accepts `transformer.*` and the original checkpoint's prefix-less names, and skips the
        causal-mask buffers (`attn.bias`, `attn.masked_bias`) old checkpoints store. Raises
        ValueError naming the tensor for an unexpected name or shape, and naming what is missing
        when the checkpoint lacks a parameter.
        """
        linears = {n: m for n, m in self.named_modules() if isinstance(m, Linear)}
        params = {n: p for n, p in self.named_parameters() if n.rpartition(".")[0] not in linears}
        loaded: set[str] = set()  # keys as below: HF names without "transformer."
        for name, tensor in weights:
            key = name.removeprefix("transformer.")
            module, _, leaf = key.rpartition(".")
            if module.endswith(".attn") and leaf in ("bias", "masked_bias"):
                continue  # GPT2Attention's causal-mask buffers, not weights
            if key == "lm_head.weight":
                if not self.tie_word_embeddings:
                    self._load_linear(self.lm_head, name, weight=tensor.t())  # nn.Linear, [vocab, hidden]
                    loaded.add(key)
                continue  # tied: some checkpoints still carry a copy
            path = self._conv1d_target(module)
            if path is not None:
                if leaf not in ("weight", "bias"):
                    raise ValueError(f"unexpected parameter {name!r} for GPT2LMHeadModel")
                self._load_linear(linears[path], name, **{leaf: tensor})
            elif key in params:
                default_weight_loader(params[key], tensor, name)
            else:
                raise ValueError(f"unexpected parameter {name!r} for GPT2LMHeadModel")
            loaded.add(key)
        if self.tie_word_embeddings and "wte.weight" in loaded:
            self.lm_head.load_shard("lm_head", weight=self.wte.weight.data)
            loaded.add("lm_head.weight")
        missing = [n for n in self._expected_keys(params) if n not in loaded]
        if missing:
            names = [n if n.startswith("lm_head") else f"transformer.{n}" for n in missing]
            raise ValueError(f"checkpoint lacks {len(missing)} of the model's tensors: {', '.join(names[:5])}"
                             + (", ..." if len(names) > 5 else ""))

    def _conv1d_target(self, module: str) -> str | None:
        """Our Linear's path for an HF Conv1D module name ("h.0.attn.c_attn"), or None."""
        parts = module.split(".", 2)
        if (len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and int(parts[1]) < len(self.h)
                and parts[2] in self._CONV1D):
            return f"h.{parts[1]}.{self._CONV1D[parts[2]]}"
        return None

    @staticmethod
    def _load_linear(linear: Linear, name: str, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> None:
        """Split a Conv1D weight [in, out] / bias [out] over the Linear's shards, in order.

        Raises ValueError naming `name` on a shape mismatch.
        """
        if weight is not None and tuple(weight.shape) != tuple(linear.weight_t.shape):
            raise ValueError(f"{name}: shape {tuple(weight.shape)} != expected {tuple(linear.weight_t.shape)}")
        if bias is not None and (linear.bias is None or bias.shape != linear.bias.shape):
            expected = None if linear.bias is None else tuple(linear.bias.shape)
            raise ValueError(f"{name}: shape {tuple(bias.shape)} != expected {expected}")
        for shard, (start, end) in linear.shard_offsets.items():
            linear.load_shard(shard, weight=None if weight is None else weight[:, start:end].t(),
                              bias=None if bias is None else bias[start:end])

    def _expected_keys(self, params: dict[str, torch.Tensor]) -> list[str]:
        """Every HF key (without "transformer.") the checkpoint must hold."""
        keys = list(params)
        if not self.tie_word_embeddings:
            keys.append("lm_head.weight")
        for i in range(len(self.h)):
            keys += [f"h.{i}.{hf}.{leaf}" for hf in self._CONV1D for leaf in ("weight", "bias")]
        return keys
