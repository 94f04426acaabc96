"""What a model looks like to llama.cpp: the architecture name, its hyper-parameters and named tensors.

An architecture adapter describes its model as a :class:`GGUFTarget` (``Architecture.gguf_target``);
:mod:`nirvana_pl.gguf_export` writes that to a file. This module holds only the data and the weight
re-orderings llama.cpp's graphs expect; it imports nothing else of nirvana_pl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGUF name, its shape as torch sees it (rows, columns) and how to make it.

    ``make()`` returns the values as an fp32 tensor of ``shape`` (computed when the tensor is written, so that a
    large model is never held twice). ``matrix``: a weight the file's dtype applies to (norms, biases and rope
    factors stay fp32, as llama.cpp's converter writes them).
    """

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    matrix: bool


@dataclass
class GGUFTarget:
    """A model as llama.cpp reads it.

    ``arch``: the llama.cpp architecture (``general.architecture``); ``hparams``: its keys without the
    ``<arch>.`` prefix (``block_count``, ``feed_forward_length`` as one number or one per layer, ...);
    ``tensors``: in file order; ``notes``: what the export changed to fit llama.cpp's graph (shown to the user).
    """

    arch: str
    hparams: dict[str, Any]
    tensors: list[GGUFTensor]
    notes: list[str] = field(default_factory=list)


def interleave_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (weight or bias) from transformers' rotary layout to llama.cpp's.

    transformers rotates the first half of each head's dimensions against the second half ("rotate_half");
    llama.cpp's ``llama`` and ``deci`` graphs rotate adjacent pairs. Each head's rows (x0..x(d/2-1),
    y0..y(d/2-1)) become (x0, y0, x1, y1, ...), which makes both compute the same attention.
    """
    if n_heads == 0:
        return weight
    rows = weight.shape[0]
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ValueError(f"interleave_rotary: {rows} rows are not {n_heads} heads of an even width.")
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def deinterleave_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleave_rotary` (for reading a file back)."""
    if n_heads == 0:
        return weight
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


__all__ = ["GGUFTarget", "GGUFTensor", "deinterleave_rotary", "interleave_rotary"]
