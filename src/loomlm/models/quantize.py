"""Quantization at load (`quantization="q8_0"` / `"q4_0"`): a float checkpoint's projections to GGML blocks.

Each `*proj.weight` of shape [out, in] with `in` a multiple of 32 becomes a `QuantizedWeight`
in the GGML type asked for, by gguf-py's reference quantizer (`gguf.quants.quantize`, the
algorithm of llama.cpp's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`), and then runs on the
same native kernels as a GGUF file's blocks (layers/linear_method.py `GGUFLinearMethod`). The
embedding table, the LM head and MoE expert weights stay float (llama.cpp's `llama-quantize`
also keeps the output layer at a higher precision; the MoE block takes float experts only), as do
projections whose in-features do not divide into 32-element blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import gguf
import numpy as np
import torch

from loomlm.layers.linear_method import QuantizedWeight

GGML_BLOCK = 32  # elements per Q8_0 / Q4_0 block


def quantize_weight(weight: torch.Tensor | np.ndarray, qtype: int) -> QuantizedWeight:
    """A float weight [out, in] (in a multiple of 32) -> its `QuantizedWeight` in GGML type `qtype`.

    gguf-py's reference quantizer; raises gguf's errors for a type it cannot quantize.
    """
    dense = weight.detach().to(torch.float32).numpy() if isinstance(weight, torch.Tensor) else weight
    blocks = gguf.quants.quantize(np.ascontiguousarray(dense, dtype=np.float32), gguf.GGMLQuantizationType(qtype))
    return QuantizedWeight(torch.from_numpy(np.ascontiguousarray(blocks)), qtype, tuple(dense.shape))


def quantize_projections(weights: Iterable[tuple[str, torch.Tensor]], qtype: int
                         ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(HF name, float tensor) pairs -> the same, with eligible projection weights as `QuantizedWeight`.

    `qtype`: a GGML type id gguf-py can quantize (Q8_0 = 8, Q4_0 = 2). Weights are converted one
    at a time, so no second float copy of the model is held.
    """
    for name, tensor in weights:
        if name.endswith("proj.weight") and ".experts." not in name and tensor.dim() == 2 \
                and tensor.shape[1] % GGML_BLOCK == 0:
            yield name, quantize_weight(tensor, qtype)
        else:
            yield name, tensor
