"""Linear layers that keep their weight pre-transposed ([in, out], contiguous).

`x @ w_t` beat `F.linear` by about 1.6x at 32 rows on this CPU (DESIGN.md), so
weights are stored transposed once at load time. Fused layers (QKV, gate+up)
hold several HF projections side by side along the output dimension; a loader
writes each HF shard into its slice with `load_shard`. After loading, the model
runner hands every layer the model's linear method (`process_weights`,
linear_method.py: on the CPU in float32 a packed copy for MKL's packed GEMM or the
native panel kernel), which then computes the product.
"""

from __future__ import annotations

import torch
from torch import nn

from loomlm.layers.forward_context import current_lora_batch
from loomlm.layers.lora import ShardLoRA, SlotLoRA, StackedLoRA, add_lora
from loomlm.layers.linear_method import TORCH_METHOD, GGUFLinearMethod, LinearMethod, QuantizedWeight
from loomlm.layers.packed_gemm import release_storage


class Linear(nn.Module):
    """y = x @ weight_t (+ bias), weight_t: [in_features, out_features].

    `shard_sizes` names the output slices of a fused layer in order (e.g. q, k, v);
    a plain layer has one shard.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = dict(shard_sizes)
        self.out_features = sum(shard_sizes.values())
        self.weight_t = nn.Parameter(torch.empty(in_features, self.out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        offsets, start = {}, 0
        for name, size in self.shard_sizes.items():
            offsets[name] = (start, start + size)
            start += size
        self.shard_offsets = offsets
        # LoRA adapters installed in slots (loomlm.lora.manager): slot -> its shard updates.
        self.lora_slots: dict[int, SlotLoRA] = {}
        self._lora_stack: StackedLoRA | None = None  # all of lora_slots side by side; rebuilt after a change
        # The linear method and its form of the weight (`process_weights`); plain x @ weight_t until then.
        self.method: LinearMethod = TORCH_METHOD
        self.weight_state = None
        # Shards loaded as GGML blocks (`QuantizedWeight`); kept as blocks by the "gguf" method.
        self.quantized_shards: dict[str, QuantizedWeight] = {}

    def load_shard(self, shard: str, weight: torch.Tensor | QuantizedWeight | None = None,
                   bias: torch.Tensor | None = None) -> None:
        """Copy an HF weight ([out, in], as in nn.Linear) and/or bias ([out]) into shard `shard`.

        A `QuantizedWeight` (GGML blocks of the same logical shape) is kept as is, for the
        "gguf" linear method; any other method gets it dequantized at `process_weights`.

        Raises ValueError on a shape mismatch or an unknown shard.
        """
        if shard not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard!r}; expected one of {list(self.shard_offsets)}")
        if self.weight_state is not None:
            raise RuntimeError("the weight is packed (and its plain copy released): load shards before process_weights()")
        start, end = self.shard_offsets[shard]
        if weight is not None and tuple(weight.shape) != (end - start, self.in_features):
            raise ValueError(f"shard {shard!r}: weight shape {tuple(weight.shape)} != {(end - start, self.in_features)}")
        if isinstance(weight, QuantizedWeight):
            self.quantized_shards[shard] = weight
        elif weight is not None:
            self.weight_t.data[:, start:end].copy_(weight.t())
        if bias is not None:
            if self.bias is None or tuple(bias.shape) != (end - start,):
                raise ValueError(f"shard {shard!r}: unexpected bias of shape {tuple(bias.shape)}")
            self.bias.data[start:end].copy_(bias)

    def process_weights(self, method: LinearMethod) -> None:
        """Hand the loaded weight to `method` (linear_method.py), which computes `forward` from then on.

        A packing method's copy is all `forward` reads, so weight_t keeps its shape but releases
        its storage (no second copy of the model in memory). Call after the last `load_shard`.
        """
        self.method = method
        if self.quantized_shards and isinstance(method, GGUFLinearMethod) and \
                set(self.quantized_shards) == set(self.shard_offsets):
            shards = [(*self.shard_offsets[name], self.quantized_shards[name]) for name in self.shard_offsets]
            self.weight_state = method.process_quantized(shards)
        else:
            self._dequantize_shards()
            self.weight_state = method.process_weights(self.weight_t.data)
        self.quantized_shards = {}
        if method.releases_plain:
            self.weight_t.data = release_storage(self.weight_t.data)

    def _dequantize_shards(self) -> None:
        """Write any GGML-block shards into weight_t as float (a layer the "gguf" method cannot keep whole)."""
        if not self.quantized_shards:
            return
        from loomlm.layers.kernels import cpu_kernels

        for shard, weight in self.quantized_shards.items():
            start, end = self.shard_offsets[shard]
            dense = cpu_kernels().quant_dequantize(weight.data, weight.qtype, weight.shape[1])  # [out, in]
            self.weight_t.data[:, start:end].copy_(dense.t())

    def check_lora(self, shard: str, a_t: torch.Tensor, b_t: torch.Tensor) -> None:
        """ValueError unless a_t [in, r] / b_t [r, shard size] fit shard `shard` (which must exist)."""
        if shard not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard!r}; expected one of {list(self.shard_offsets)}")
        start, end = self.shard_offsets[shard]
        if a_t.shape[0] != self.in_features or b_t.shape != (a_t.shape[1], end - start):
            raise ValueError(f"shard {shard!r}: LoRA shapes {tuple(a_t.shape)} / {tuple(b_t.shape)} do not fit "
                             f"[{self.in_features}, r] / [r, {end - start}]")

    def set_lora(self, slot: int, shard: str, a_t: torch.Tensor, b_t: torch.Tensor) -> None:
        """Install an adapter's update of `shard` in `slot`: a_t [in, r], b_t [r, shard size] (scaled).

        Raises ValueError on a shape mismatch or an unknown shard (`check_lora`).
        """
        self.check_lora(shard, a_t, b_t)
        start, end = self.shard_offsets[shard]
        shards = self.lora_slots[slot].shards if slot in self.lora_slots else []
        self.lora_slots[slot] = SlotLoRA.fuse(shards + [ShardLoRA(start, end, a_t, b_t)], self.out_features)
        self._lora_stack = None

    def clear_lora(self, slot: int) -> None:
        """Remove whatever adapter `slot` holds (nothing if empty)."""
        self.lora_slots.pop(slot, None)
        self._lora_stack = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features] (TORCH_METHOD until process_weights)
        y = self.method.apply(self.weight_state, x, self.weight_t, self.bias)
        if self.lora_slots:
            batch = current_lora_batch()
            if batch is not None:
                if self._lora_stack is None:
                    self._lora_stack = StackedLoRA.stack(self.lora_slots)
                y = add_lora(x, y, self._lora_stack, batch)
        return y
