"""Checkpoint-loading helpers shared by the model files."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loomlm.layers.linear import Linear

# An HF linear module's destination: (our Linear's path, its shard in nn.Linear's [out, in] layout),
# or (path, None) for a Conv1D tensor ([in, out], GPT-2) that spans all the Linear's shards in order.
LinearTarget = tuple[str, str | None]


def default_weight_loader(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copy checkpoint tensor `name` into `param` (same shape; cast to its dtype), as vLLM's loader of that name.

    Raises ValueError naming the tensor when the shapes differ (a config and weights that disagree).
    """
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(tensor)


def load_hf_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], *, prefixes: tuple[str, ...],
                    layers_name: str, layer_linears: dict[str, LinearTarget],
                    top_linears: dict[str, LinearTarget], embed_key: str) -> None:
    """Load HF-named tensors into a model whose modules keep transformers' names (OPT, GPT-2).

    `prefixes` are stripped from each name in order (what the hub may omit); `layer_linears` maps
    an HF module inside layer i (`{layers_name}.{i}.{module}`) and `top_linears` one outside the
    layers to the `LinearTarget` it loads into (a top one whose path is None in the model is
    absent); every other tensor must be a parameter of the same name. `model.lm_head` is loaded
    from `embed_key` when `model.tie_word_embeddings` (a checkpoint's copy of it is skipped).

    Raises ValueError naming the tensor for an unexpected name or shape, and naming what is
    missing when the checkpoint lacks a tensor the model needs.
    """
    linear_paths = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    params = {n: p for n, p in model.named_parameters() if n.rpartition(".")[0] not in linear_paths}
    # HF module -> target; a tied head loads from the embeddings, and OPT's projections exist in some sizes only
    targets = {hf: t for hf, t in top_linears.items()
               if getattr(model, t[0]) is not None and not (hf == "lm_head" and model.tie_word_embeddings)}
    for i in range(len(getattr(model, layers_name))):
        targets.update({f"{layers_name}.{i}.{hf}": (f"{layers_name}.{i}.{path}", shard)
                        for hf, (path, shard) in layer_linears.items()})
    loaded: set[str] = set()  # keys: HF names without `prefixes`
    for name, tensor in weights:
        key = name
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        if key == "lm_head.weight" and model.tie_word_embeddings:
            continue  # tied: some checkpoints still carry a copy
        module, _, leaf = key.rpartition(".")
        if module in targets:
            if leaf not in ("weight", "bias"):
                raise ValueError(f"unexpected parameter {name!r} for {type(model).__name__}")
            path, shard = targets[module]
            try:
                _load_linear(model.get_submodule(path), shard, **{leaf: tensor})
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        elif key in params:
            default_weight_loader(params[key], tensor, name)
        else:
            raise ValueError(f"unexpected parameter {name!r} for {type(model).__name__}")
        loaded.add(key)
    if model.tie_word_embeddings and embed_key in loaded:
        model.lm_head.load_shard("lm_head", weight=params[embed_key].data)
    expected = list(params)
    for module, (path, _) in targets.items():
        has_bias = model.get_submodule(path).bias is not None
        expected += [f"{module}.weight"] + ([f"{module}.bias"] if has_bias else [])
    missing = [n if n.startswith("lm_head") else "".join(prefixes) + n for n in expected if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} of the model's tensors: {', '.join(missing[:5])}"
                         + (", ..." if len(missing) > 5 else ""))


def _load_linear(linear: Linear, shard: str | None, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> None:
    """Load into one shard (nn.Linear layout), or with shard None split a Conv1D weight [in, out] /
    bias [out] over all the shards in order. Raises ValueError on a shape mismatch."""
    if shard is not None:
        linear.load_shard(shard, weight=weight, bias=bias)
        return
    if weight is not None and tuple(weight.shape) != tuple(linear.weight_t.shape):
        raise ValueError(f"shape {tuple(weight.shape)} != expected {tuple(linear.weight_t.shape)}")
    if bias is not None and (linear.bias is None or bias.shape != linear.bias.shape):
        expected = None if linear.bias is None else tuple(linear.bias.shape)
        raise ValueError(f"shape {tuple(bias.shape)} != expected {expected}")
    for name, (start, end) in linear.shard_offsets.items():
        linear.load_shard(name, weight=None if weight is None else weight[:, start:end].t(),
                          bias=None if bias is None else bias[start:end])
