"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE), following transformers 5's `*SparseMoeBlock`.

Per token: router logits -> softmax over experts in float32 -> top-k -> optionally
renormalise the k weights to sum to 1 -> cast to the activation dtype. Each
expert is a SwiGLU MLP, down(silu(gate(x)) * up(x)); a token's output is the
weighted sum of its k experts' outputs.

Tokens are grouped per expert (the (token, expert) pairs sorted by expert id),
so each active expert runs one matmul pair over all its tokens; experts that
got no token are skipped. Expert weights are stacked and pre-transposed
(`[num_experts, in, out]`), as `Linear` keeps its weight, for `x @ w_t`.

Checkpoint names (relative to the block; hub checkpoints, and what
transformers 5's `save_pretrained` writes, hold the per-expert ones):
- router `gate.weight` [E, H] (an `nn.Linear` or a plain parameter: same name);
- Mixtral `experts.{e}.w1.weight` (gate [I, H]), `w3` (up [I, H]), `w2` (down [H, I]);
- Qwen3-MoE `experts.{e}.gate_proj.weight`, `up_proj`, `down_proj` (same shapes);
- transformers 5's in-memory fused layout `experts.gate_up_proj` [E, 2I, H]
  (gate rows, then up) and `experts.down_proj` [E, H, I].
"""

from __future__ import annotations

import re

import torch
from torch import nn

from loomlm.layers.activation import silu_and_mul
from loomlm.layers.linear import Linear
from loomlm.layers.linear_method import LinearMethod
from loomlm.layers.packed_gemm import release_storage

# Per-expert checkpoint projection name -> canonical projection ("gate", "up", "down").
_EXPERT_PROJ = {
    "w1": "gate", "gate_proj": "gate",
    "w3": "up", "up_proj": "up",
    "w2": "down", "down_proj": "down",
}
_PER_EXPERT_NAME = re.compile(r"experts\.(\d+)\.(\w+)\.weight")


class SparseMoeBlock(nn.Module):
    """router softmax -> top-k -> optional renormalisation; tokens grouped per expert; one matmul pair per expert over its tokens.

    forward(x [num_tokens, hidden_size]) -> [num_tokens, hidden_size].
    `renormalize`: divide the top-k weights by their sum (Mixtral always; Qwen3-MoE when
    `norm_topk_prob`). Raises ValueError on sizes that cannot make a block (top_k outside
    1..num_experts, a non-positive size).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool) -> None:
        super().__init__()
        if min(hidden_size, intermediate_size, num_experts) <= 0:
            raise ValueError(f"MoE sizes must be positive: hidden_size={hidden_size}, "
                             f"intermediate_size={intermediate_size}, num_experts={num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({num_experts}), got {top_k}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        # The router is a plain Linear: it gets packed with the other Linears on CPU float32.
        self.gate = Linear(hidden_size, {"gate": num_experts})  # [H] -> [E] router logits
        # Gate columns [:I], then up columns [I:], the layout silu_and_mul reads.
        self.w_gate_up_t = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size),
                                        requires_grad=False)  # [E, H, 2I]
        self.w_down_t = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size),
                                     requires_grad=False)  # [E, I, H]
        # The linear method's form of each expert's weights (`process_weights`); None: plain matmuls.
        self.method: LinearMethod | None = None
        self.packed_gate_up: list | None = None
        self.packed_down: list | None = None
        self._loaded: set[str] = set()

    # ------------------------------------------------------------------ weights

    def expected_weights(self) -> list[str]:
        """Canonical keys a full load covers: "gate", then "experts.{e}.gate" / ".up" / ".down" per expert."""
        return ["gate"] + [f"experts.{e}.{proj}" for e in range(self.num_experts) for proj in ("gate", "up", "down")]

    def loaded_weights(self) -> set[str]:
        """Canonical keys (as in `expected_weights`) loaded so far."""
        return set(self._loaded)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy checkpoint tensor `name` (relative to the block, names in the module docstring) into place.

        Raises ValueError naming the tensor for an unknown name, an expert index out of
        range, or a wrong shape; RuntimeError after `pack()`.
        """
        if self.packed_gate_up is not None:
            raise RuntimeError("the experts are packed (plain copies released): load weights before process_weights()")
        num_experts, hidden, inter = self.num_experts, self.hidden_size, self.intermediate_size
        if name == "gate.weight":
            self._check_shape(name, tensor, (num_experts, hidden))
            self.gate.load_shard("gate", weight=tensor)
            self._loaded.add("gate")
            return
        # transformers 5's fused layout: gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I]
        fused = {"experts.gate_up_proj": (self.w_gate_up_t, ("gate", "up")),
                 "experts.down_proj": (self.w_down_t, ("down",))}
        if name in fused:
            param, projs = fused[name]
            self._check_shape(name, tensor, (num_experts, *reversed(param.shape[1:])))
            param.data.copy_(tensor.transpose(1, 2))
            self._loaded.update(f"experts.{e}.{p}" for e in range(num_experts) for p in projs)
            return
        match = _PER_EXPERT_NAME.fullmatch(name)
        if match is None or match.group(2) not in _EXPERT_PROJ:
            raise ValueError(f"unexpected MoE weight {name!r}")
        expert, proj = int(match.group(1)), _EXPERT_PROJ[match.group(2)]
        if expert >= num_experts:
            raise ValueError(f"MoE weight {name!r}: expert {expert} out of range (num_experts={num_experts})")
        start = inter if proj == "up" else 0
        # [in, out]: the expert's slice of the stacked, pre-transposed weight
        dest = self.w_down_t.data[expert] if proj == "down" else self.w_gate_up_t.data[expert, :, start:start + inter]
        self._check_shape(name, tensor, tuple(reversed(dest.shape)))
        dest.copy_(tensor.t())
        self._loaded.add(f"experts.{expert}.{proj}")

    @staticmethod
    def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != expected:
            raise ValueError(f"MoE weight {name!r}: shape {tuple(tensor.shape)} != expected {expected}")

    def process_weights(self, method: LinearMethod) -> None:
        """Hand each expert's weights to `method` (linear_method.py), as `Linear.process_weights` does.

        Call after the last `load_weight`; a packing method's plain copies release their
        storage. The router is a `Linear` and is processed on its own.
        """
        if not method.releases_plain:
            return  # plain matmuls on the stacked weights
        self.method = method
        self.packed_gate_up = [method.process_weights(w) for w in self.w_gate_up_t.data]
        self.packed_down = [method.process_weights(w) for w in self.w_down_t.data]
        self.w_gate_up_t.data = release_storage(self.w_gate_up_t.data)
        self.w_down_t.data = release_storage(self.w_down_t.data)

    # ------------------------------------------------------------------ forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [num_tokens, H] -> (weights [num_tokens, top_k] in x's dtype, expert ids [num_tokens, top_k] int64).

        As transformers' `*TopKRouter`: softmax in float32, top-k, optional renormalisation.
        """
        router_logits = self.gate(x)  # [T, E]
        probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E] float32
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        # Qwen3-MoE casts here; transformers' Mixtral multiplies the float32 weights into the
        # expert outputs and casts after: the same in float32, one rounding apart in bf16/fp16.
        return topk_weights.to(x.dtype), topk_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        num_tokens = x.shape[0]
        if num_tokens == 0:
            return torch.zeros_like(x)
        topk_weights, topk_ids = self.route(x)  # [T, K], [T, K]
        # The T*K (token, expert) pairs, sorted by expert: each expert's tokens become one contiguous run.
        flat_ids = topk_ids.flatten()  # [T*K]
        order = torch.argsort(flat_ids, stable=True)  # [T*K] pair index, by expert
        x_sorted = x.index_select(0, order // self.top_k)  # [T*K, H] the token of each sorted pair
        # One host sync per layer: the run lengths decide the slices below.
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # [E]
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            h = silu_and_mul(self._matmul(self.packed_gate_up, self.w_gate_up_t, expert,
                                          x_sorted[start:start + count]))  # [n, I]
            outputs.append(self._matmul(self.packed_down, self.w_down_t, expert, h))  # [n, H]
            start += count
        # Back to (token, k) order in one copy, then each token's weighted sum over its k experts.
        # One scatter instead of an index_add per expert; for top-2 the sum equals transformers'
        # per-expert accumulation bit for bit (each product rounded, then one commutative add).
        y = torch.empty_like(x_sorted).index_copy_(0, order, torch.cat(outputs))  # [T*K, H]
        y = y.view(num_tokens, self.top_k, -1) * topk_weights.unsqueeze(-1)  # [T, K, H]
        return y.sum(dim=1)

    def _matmul(self, packed: list | None, w_t: torch.Tensor, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] @ the expert's slice of w_t ([E, in, out]) -> [n, out], by the linear method when packed."""
        if self.method is not None:
            return self.method.apply(packed[expert], x, w_t[expert], None)
        return x @ w_t[expert]
