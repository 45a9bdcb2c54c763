"""Checkpoint-loading helpers shared by the model files."""

from __future__ import annotations

import torch


def default_weight_loader(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copy checkpoint tensor `name` into `param` (same shape; cast to its dtype), as vLLM's loader of that name.

    Raises ValueError naming the tensor when the shapes differ (a config and weights that disagree).
    """
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(tensor)
