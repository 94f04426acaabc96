"""Carry optimizer state over to the kept slices of pruned parameters (plain torch optimizers).

Surgery keeps every ``nn.Parameter`` object and shrinks its data, so an optimizer keeps stepping
the same parameters; only its per-parameter state has to follow the slice.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def owner_of(optimizers: Sequence[torch.optim.Optimizer], p: nn.Parameter) -> torch.optim.Optimizer | None:
    """The optimizer that steps ``p`` (None when no optimizer holds it, e.g. a frozen weight)."""
    for opt in optimizers:
        if p in opt.state or any(p is q for g in opt.param_groups for q in g["params"]):
            return opt
    return None


def state_action(value: object, shape: torch.Size, axis: int) -> str:
    """How a per-parameter optimizer state entry follows the slice: "slice", "keep" or "error".

    Same-shape moments (Adam, AMSGrad, SGD momentum) and factored ones that keep the unit axis
    (Adafactor's row/column statistics) are sliced; scalars and entries broadcast along the unit
    axis are kept; anything else (e.g. blockwise-quantised state) cannot be carried over.
    """
    if not isinstance(value, torch.Tensor) or value.numel() <= 1:
        return "keep"
    if value.dim() != len(shape) or any(v not in (o, 1) for v, o in zip(value.shape, shape)):
        return "error"
    return "slice" if value.shape[axis] == shape[axis] else "keep"


def check_state_follows(
    optimizer: torch.optim.Optimizer, p: nn.Parameter, axis: int, name: str, same_shape: bool = False
) -> None:
    """Raise ValueError (before anything changes) if some state of ``p`` cannot follow a slice (``same_shape``:
    only state of the parameter's own shape can, as for a fused expert parameter sliced along two axes)."""
    for key, value in optimizer.state.get(p, {}).items():
        if same_shape:
            follows = not isinstance(value, torch.Tensor) or value.numel() <= 1 or value.shape == p.shape
        else:
            follows = state_action(value, p.shape, axis) != "error"
        if not follows:
            raise ValueError(
                f"{type(optimizer).__name__} state {key!r} of {name} has shape {tuple(value.shape)}, which "
                f"does not follow the weight's shape {tuple(p.shape)}, so it cannot be sliced. Use "
                "Adam/AdamW/SGD/Adafactor, or create the optimizer after pruning."
            )


def slice_state(
    optimizer: torch.optim.Optimizer, p: nn.Parameter, old_shape: torch.Size, axis: int,
    take: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Replace every state tensor of ``p`` that follows its shape along ``axis`` by ``take(tensor)`` (the kept
    entries, as the weight itself is sliced)."""
    state = optimizer.state.get(p)
    if not state:
        return
    for key, value in list(state.items()):
        if state_action(value, old_shape, axis) == "slice":
            state[key] = take(value).contiguous()


def retarget_optimizers(
    optimizers: Sequence[torch.optim.Optimizer],
    trainable: Sequence[nn.Parameter],
    anchors: dict[nn.Parameter, nn.Parameter],
) -> None:
    """Make ``optimizers`` step exactly ``trainable`` from now on, in place (LR schedulers keep working).

    Parameters no longer trainable leave their param groups and their state is dropped; a new
    parameter joins the group of its anchor (``anchors[p]``, e.g. the base weight a LoRA adapter
    adapts), else the first group of the first optimizer. The number of groups and their
    hyperparameters stay, so a scheduler's per-group ``base_lrs`` still line up.
    """
    if not optimizers:
        raise ValueError("there is no optimizer to retarget; configure_optimizers() returned none.")
    keep = set(trainable)
    group_of: dict[nn.Parameter, dict] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                group_of[p] = group
            group["params"] = [p for p in group["params"] if p in keep]
        for p in [p for p in opt.state if p not in keep]:
            del opt.state[p]
    placed = {p for opt in optimizers for g in opt.param_groups for p in g["params"]}
    fallback = optimizers[0].param_groups[0]
    for p in trainable:
        if p not in placed:
            group_of.get(anchors.get(p), fallback)["params"].append(p)
            placed.add(p)
