"""The dense control of a pruning fit: the dense model as it was at the prune, trained on the same batches.

Recovery is judged against what the dense model would have become in the same steps, not against the dense
model at the prune (which recovery may even pass). :class:`DenseControl` is a copy of the model taken just before
the cut, with a copy of its optimizer state, stepped on every later training batch with the fit's learning rate, so
that ``HeldOutPerplexity(dense_control=True)`` can report how much of the log-perplexity gap recovery closed. It
costs a second model and optimizer in memory and a second training step per batch.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

#: ``loss(model, batch)``: the training loss of ``model`` on ``batch``, as the LightningModule computes it
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class DenseControl:
    """A copy of ``model`` and of its state in ``optimizer`` (the parameters ``optimizer`` holds that belong to
    ``model``), trained by :meth:`step` on the batches the fit trains on."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: LossFn) -> None:
        self.model = copy.deepcopy(model)
        self.optimizer = _copied_optimizer(optimizer, model, self.model)
        self.loss = loss
        self.steps = 0

    def step(
        self, batch: Any, fit_optimizer: torch.optim.Optimizer, forward_context: Callable[[], ContextManager[Any]],
        clip_norm: float | None = None,
    ) -> float:
        """One training step on ``batch`` at the learning rates ``fit_optimizer`` has now; returns the loss."""
        for mine, theirs in zip(self.optimizer.param_groups, fit_optimizer.param_groups):
            mine["lr"] = theirs["lr"]
        self.model.train()
        with forward_context():
            loss = self.loss(self.model, batch)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in params:  # (data parallel: the mean gradient, as DDP gives the fit's model)
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        if clip_norm:
            nn.utils.clip_grad_norm_(params, clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return float(loss.detach())


def _copied_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, copy_: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class and settings over ``copy_``'s parameters, with the state it holds for the
    matching parameters of ``model`` copied."""
    counterpart = {id(p): q for p, q in zip(model.parameters(), copy_.parameters())}
    groups, pairs = [], []
    for group in optimizer.param_groups:
        params = [counterpart[id(p)] for p in group["params"] if id(p) in counterpart]
        pairs += [(p, counterpart[id(p)]) for p in group["params"] if id(p) in counterpart]
        if params:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    if not groups:
        raise ValueError("the dense control found none of the model's parameters in the fit's optimizer.")
    copied = type(optimizer)(groups)
    for p, q in pairs:
        state = optimizer.state.get(p)
        if state:
            copied.state[q] = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                               for k, v in state.items()}  # fmt: skip
    return copied
