"""How a Llama-family model is cut across tensor-parallel ranks (Megatron-LM's layout, as vLLM's
ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding).

Each rank builds the model from `shard_config` (its share of the attention heads, KV heads and
MLP width; hidden size, head size and norms unchanged) and loads `shard_weights` (the checkpoint's
tensors cut to that share), so the layers run unchanged on narrower weights. `parallelize` then
adds what crosses ranks: an all-reduce after each row-parallel projection (o_proj, down_proj,
whose partial sums the ranks add up; their bias only on rank 0; a mixture-of-experts block's
experts are cut as a dense MLP and the block's output is summed once), and the vocabulary-parallel
embedding (each rank looks up the ids in its slice of the vocabulary, zeros elsewhere, then an
all-reduce). The LM head gives each rank the logits of its vocabulary slice; the model runner
gathers them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from loomlm.distributed.parallel_state import TensorParallel
from loomlm.layers.moe import SparseMoeBlock

# HF tensor name suffix -> how it is cut: "rows_q" / "rows_kv" / "rows_mlp" (output features of a
# column-parallel layer), "cols_q" / "cols_mlp" (input features of a row-parallel one), "vocab".
_CUTS = {
    "self_attn.q_proj.weight": "rows_q", "self_attn.q_proj.bias": "rows_q",
    "self_attn.k_proj.weight": "rows_kv", "self_attn.k_proj.bias": "rows_kv",
    "self_attn.v_proj.weight": "rows_kv", "self_attn.v_proj.bias": "rows_kv",
    "self_attn.o_proj.weight": "cols_q", "self_attn.o_proj.bias": "rank0",
    "mlp.gate_proj.weight": "rows_mlp", "mlp.gate_proj.bias": "rows_mlp",
    "mlp.up_proj.weight": "rows_mlp", "mlp.up_proj.bias": "rows_mlp",
    "mlp.down_proj.weight": "cols_mlp", "mlp.down_proj.bias": "rank0",
    "embed_tokens.weight": "vocab", "lm_head.weight": "vocab",
}
# Mixture-of-experts: each expert's gate / up (Mixtral's w1 / w3) by output rows, down (w2) by input
# columns, as a dense MLP's; the router stays whole (every rank routes every token alike).
_EXPERT = re.compile(r"experts\.\d+\.(w1|w3|gate_proj|up_proj|w2|down_proj)\.weight$")
_EXPERT_ROWS = ("w1", "w3", "gate_proj", "up_proj")


def check_tensor_parallel(hf_config, world_size: int) -> None:
    """Raises ValueError, naming the reason, when the model cannot be cut `world_size` ways."""
    from loomlm.models.llama_spec import llama_family_spec
    from loomlm.models.registry import MODEL_REGISTRY

    model_type = getattr(hf_config, "model_type", None)
    if model_type not in MODEL_REGISTRY or MODEL_REGISTRY[model_type].module != "loomlm.models.llama":
        raise ValueError(f"tensor parallelism runs the Llama-family models; {model_type!r} is not one of them.")
    spec = llama_family_spec(hf_config)
    for what, count in (("attention heads", spec.num_heads), ("KV heads", spec.num_kv_heads),
                        ("MLP width (intermediate_size)", spec.intermediate_size)):
        if count % world_size:
            raise ValueError(f"tensor_parallel_size {world_size} does not divide the model's {what} ({count}).")
    if any(layer.is_moe for layer in spec.layers) and spec.moe_intermediate_size % world_size:
        raise ValueError(f"tensor_parallel_size {world_size} does not divide the experts' MLP width "
                         f"(moe_intermediate_size {spec.moe_intermediate_size}).")
    if spec.qk_norm == "proj":
        raise ValueError("tensor parallelism cannot cut a q/k norm over the whole projection (OLMo 2).")
    if spec.fused_checkpoint:
        raise ValueError("tensor parallelism cannot cut checkpoints with fused qkv / gate_up tensors (Phi-3) yet.")


def vocab_slice(vocab_size: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(first id, end id, padded slice size) of `rank`'s share of the vocabulary (ceil(V / N) rows,
    the last rank's padded)."""
    per_rank = -(-vocab_size // world_size)
    start = min(rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank


def shard_config(hf_config, world_size: int):
    """A copy of the HF config describing one rank's share: heads, KV heads, MLP width and
    vocabulary divided by `world_size` (head size pinned, so it is not re-derived)."""
    from loomlm.models.llama_spec import llama_family_spec

    spec = llama_family_spec(hf_config)
    config = copy.deepcopy(hf_config)
    config.num_attention_heads = spec.num_heads // world_size
    config.num_key_value_heads = spec.num_kv_heads // world_size
    config.intermediate_size = spec.intermediate_size // world_size
    if getattr(config, "moe_intermediate_size", None):
        config.moe_intermediate_size = spec.moe_intermediate_size // world_size
    config.head_dim = spec.head_dim
    config.vocab_size = vocab_slice(hf_config.vocab_size, 0, world_size)[2]
    return config


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], hf_config, tp: TensorParallel
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (HF name, tensor) pairs cut to `tp.rank`'s share (module docstring).
    Raises ValueError for GGML blocks (quantization="gguf" is not cut)."""
    from loomlm.layers.linear_method import QuantizedWeight
    from loomlm.models.llama_spec import llama_family_spec

    spec = llama_family_spec(hf_config)
    n, r = tp.world_size, tp.rank
    sizes = {"q": spec.num_heads * spec.head_dim, "kv": spec.num_kv_heads * spec.head_dim,
             "mlp": spec.intermediate_size}
    moe_share = spec.moe_intermediate_size // n
    for name, tensor in weights:
        if isinstance(tensor, QuantizedWeight):
            raise ValueError("tensor parallelism needs float weights (quantization='gguf' keeps GGML blocks).")
        expert = _EXPERT.search(name)
        if expert is not None:
            dim = 0 if expert.group(1) in _EXPERT_ROWS else 1
            yield name, tensor.narrow(dim, r * moe_share, moe_share).contiguous()
            continue
        if name.endswith("experts.gate_up_proj"):  # transformers' fused [E, 2I, H]: gate rows, then up rows
            inter = tensor.shape[1] // 2
            yield name, torch.cat([tensor[:, r * moe_share:(r + 1) * moe_share],
                                   tensor[:, inter + r * moe_share:inter + (r + 1) * moe_share]], dim=1)
            continue
        if name.endswith("experts.down_proj"):  # [E, H, I]
            yield name, tensor.narrow(2, r * moe_share, moe_share).contiguous()
            continue
        cut = next((c for suffix, c in _CUTS.items() if name.endswith(suffix)), None)
        if cut is None:
            yield name, tensor
            continue
        if cut == "rank0":
            yield name, tensor if r == 0 else torch.zeros_like(tensor)
        elif cut == "vocab":
            start, end, per_rank = vocab_slice(tensor.shape[0], r, n)
            part = tensor.new_zeros((per_rank, *tensor.shape[1:]))
            part[:end - start] = tensor[start:end]
            yield name, part
        else:
            axis, kind = cut.split("_")
            share = sizes[kind] // n
            dim = 0 if axis == "rows" else 1
            yield name, tensor.narrow(dim, r * share, share).contiguous()


# LoRA targets of column-parallel layers (B cut by output features) and of row-parallel ones (A cut by input).
_LORA_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_LORA_ROW = ("o_proj", "down_proj")


def shard_lora(module: str, a_t: torch.Tensor, b_t: torch.Tensor, tp: TensorParallel
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One projection's LoRA factors cut to `tp.rank`'s share, as its base weight is: for a
    column-parallel projection b_t [r, out] keeps this rank's output columns; for a row-parallel
    one a_t [in, r] keeps its input rows, and the all-reduce after the layer sums the partial
    updates with the partial outputs. module: "self_attn.q_proj", ..."""
    proj = module.rsplit(".", 1)[-1]
    n, r = tp.world_size, tp.rank
    if proj in _LORA_COLUMN:
        share = b_t.shape[1] // n
        return a_t, b_t[:, r * share:(r + 1) * share]
    if proj in _LORA_ROW:
        share = a_t.shape[0] // n
        return a_t[r * share:(r + 1) * share], b_t
    raise ValueError(f"no tensor-parallel layout for a LoRA on {module!r}")


class VocabParallelEmbedding(nn.Module):
    """An embedding table cut by vocabulary: this rank's rows [start, end); forward(ids [T]) ->
    [T, hidden], summed over the ranks (each contributes the ids in its slice)."""

    def __init__(self, weight: torch.Tensor, start: int, end: int, tp: TensorParallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [per_rank, hidden], padded rows zero
        self.start, self.end, self.tp = start, end, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        inside = (input_ids >= self.start) & (input_ids < self.end)
        local = torch.where(inside, input_ids - self.start, torch.zeros_like(input_ids))
        out = torch.nn.functional.embedding(local, self.weight) * inside[:, None].to(self.weight.dtype)
        self.tp.all_reduce(out)
        return out


def parallelize(model: nn.Module, full_vocab_size: int, tp: TensorParallel) -> None:
    """Make a model built from `shard_config` and loaded with `shard_weights` compute the full
    model's hidden states: vocabulary-parallel embedding, all-reduce after o_proj and down_proj.
    The native DecoderStack (no collectives) is turned off."""
    start, end, _ = vocab_slice(full_vocab_size, tp.rank, tp.world_size)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight.data, start, end, tp)

    def reduce(module, inputs, output):
        tp.all_reduce(output)

    for layer in model.layers:
        layer.self_attn.o_proj.register_forward_hook(reduce)
        # A mixture of experts sums its experts' partial outputs once, after the block.
        (layer.mlp if isinstance(layer.mlp, SparseMoeBlock) else layer.mlp.down_proj).register_forward_hook(reduce)
    model.use_decoder_stack = False
