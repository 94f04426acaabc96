"""One-shot pruning for plain PyTorch: score, allocate and cut in one call."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from .allocate import AllocationConfig, DenseReference, allocate
from .plan import PruningPlan
from .saliency import compute_scores
from .surgery import apply_plan


def prune(
    model: nn.Module,
    sparsity: float,
    saliency: str = "functional",
    calibration: Iterable[Any] | None = None,
    gamma: float = 3.0,
    *,
    min_kv_groups: int = 1,
    mlp_round_to: int = 8,
    uniform: bool = False,
    reference: DenseReference | None = None,
    seed: int = 0,
    progress: bool = False,
) -> PruningPlan:
    """Prune ``model`` in place to ``sparsity`` of its attention+MLP parameters; return the plan.

    ``calibration`` is a list of LongTensor[B, T] token ids (or dicts with ``input_ids``) for
    ``functional``, ``taylor_loss`` and ``wanda_sp``. ``reference`` is the original dense model's
    sizes when the model was already pruned (targets are relative to it).
    """
    config = AllocationConfig(
        sparsity=sparsity, gamma=gamma, min_kv_groups=min_kv_groups, mlp_round_to=mlp_round_to, uniform=uniform
    )
    reference = reference or DenseReference.of(model)
    scores = compute_scores(model, saliency, calibration=calibration, seed=seed, progress=progress)
    plan = allocate(model, scores, config, reference, saliency=saliency)
    apply_plan(model, plan)
    return plan
