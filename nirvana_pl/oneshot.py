"""One-shot pruning for plain PyTorch: score, allocate and cut in one call.

:func:`make_plan` is the decision pipeline shared with the Lightning callback
(scores -> optional KL selection -> plan); :func:`prune` applies its plan in place.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .allocate import AllocationConfig, DenseReference, allocate
from .calibration import DEFAULT_GAMMA_GRID, CalibrationSelector
from .plan import PruningPlan
from .saliency import (
    CALIBRATION_ESTIMATORS,
    DATA_FREE_ESTIMATORS,
    HYBRID_ESTIMATORS,
    UnitScores,
    adam_part,
    check_estimator,
    compute_scores,
)
from .surgery import apply_plan

#: gamma used to choose the calibration set under gamma="auto" (the grid then picks gamma).
AUTO_GAMMA_START = 3.0


def check_selection_args(saliency: str, calibration: Any, gamma: float | str) -> None:
    """Raise early (naming the fix) when a selector / gamma='auto' cannot do anything useful."""
    auto = gamma == "auto"
    if isinstance(gamma, str) and not auto:
        raise ValueError(f"gamma={gamma!r} must be a positive number or 'auto'.")
    selector = isinstance(calibration, CalibrationSelector)
    if auto and not selector:
        raise ValueError(
            "gamma='auto' chooses gamma by the KL test on a probe set: pass "
            "calibration=CalibrationSelector(pool=token_windows(...)) as well."
        )
    if selector and saliency in HYBRID_ESTIMATORS:
        raise ValueError(
            f"saliency={saliency!r} takes its calibration batches from the warm-up window (or calibration=[...]); "
            "a CalibrationSelector (and gamma='auto', which needs one) is not supported with it yet. Give a fixed "
            "gamma, or use saliency='adam_fisher' / 'functional' with the selector."
        )
    if selector and not auto and saliency in DATA_FREE_ESTIMATORS:
        raise ValueError(
            f"calibration=CalibrationSelector(...) selects calibration data for {', '.join(CALIBRATION_ESTIMATORS)}, "
            f"the Adam-state estimator for adam_*, or gamma when gamma='auto'; with saliency={saliency!r} and "
            f"gamma={gamma} it has nothing to choose. Use gamma='auto' or a data-driven saliency."
        )


def allocation_config(sparsity: float, gamma: float | str, **kwargs: Any) -> AllocationConfig:
    return AllocationConfig(sparsity=sparsity, gamma=AUTO_GAMMA_START if gamma == "auto" else gamma, **kwargs)


def make_plan(
    model: nn.Module,
    saliency: str,
    config: AllocationConfig,
    reference: DenseReference,
    *,
    calibration: Iterable[Any] | CalibrationSelector | None = None,
    gamma_auto: bool = False,
    gamma_grid: Sequence[float] = DEFAULT_GAMMA_GRID,
    optimizer_scores: UnitScores | Mapping[str, UnitScores] | None = None,
    expert_load: list[torch.Tensor | None] | None = None,
    seed: int = 0,
    rank: int = 0,
    num_sampled_batches: int | None = None,
    progress: bool = False,
) -> tuple[PruningPlan, dict[str, Any] | None]:
    """Decide what to prune. Returns the plan and, when a KL selection ran, its JSON-able summary.

    With a :class:`CalibrationSelector` and a calibration-based saliency, the calibration set (and,
    with ``gamma_auto``, gamma) is chosen by the KL test; with Adam-state or data-free scores and
    ``gamma_auto``, only gamma is chosen. ``optimizer_scores`` may map several Adam-state
    estimators to their scores: with a selector the plan of least KL among them is kept. ``expert_load``: the
    tokens routed to each expert of a mixture-of-experts model while training (see
    :class:`~nirvana_pl.router_load.RouterLoad`): the Adam-state scores take it, and any other scores that
    counted none of their own. ``rank``, ``num_sampled_batches``: see :func:`~nirvana_pl.saliency.compute_scores`.
    The model's weights are never changed here.
    """
    if expert_load is not None:  # (the training window's count comes first: it saw more tokens than calibration)
        adam_scores = optimizer_scores.values() if isinstance(optimizer_scores, Mapping) else [optimizer_scores]
        for scores in adam_scores:
            if scores is not None:
                scores.expert_load = expert_load
    grid = gamma_grid if gamma_auto else None
    selector = calibration if isinstance(calibration, CalibrationSelector) else None
    if selector is not None and saliency in CALIBRATION_ESTIMATORS:
        result = selector.select(model, saliency, config, reference, progress=progress, gamma_grid=grid)
        return _with_selection(result.plan, result.summary())
    if isinstance(optimizer_scores, Mapping):
        if selector is not None:
            return _with_selection(
                *selector.choose_scores(model, dict(optimizer_scores), config, reference, grid, progress=progress)
            )
        optimizer_scores = optimizer_scores[adam_part(saliency)]
    scores = compute_scores(
        model, saliency, calibration=None if isinstance(calibration, CalibrationSelector) else calibration,
        optimizer_scores=optimizer_scores, seed=seed, progress=progress, rank=rank,
        num_sampled_batches=num_sampled_batches,
    )
    if scores.expert_load is None:
        scores.expert_load = expert_load
    if gamma_auto and isinstance(calibration, CalibrationSelector):
        search = calibration.choose_gamma(model, scores, config, gamma_grid, reference, progress=progress)
        return _with_selection(search.plan, {"gamma_search": search.summary(), "kl": search.best_kl})
    return allocate(model, scores, config, reference, saliency=saliency), None


def _with_selection(plan: PruningPlan, summary: dict[str, Any]) -> tuple[PruningPlan, dict[str, Any]]:
    plan.score_summary["selection"] = summary  # travels with the plan into JSON and reports
    return plan, summary


def prune(
    model: nn.Module,
    sparsity: float,
    saliency: str = "functional",
    calibration: Iterable[Any] | CalibrationSelector | None = None,
    gamma: float | str = 2.0,
    *,
    gamma_grid: Sequence[float] = DEFAULT_GAMMA_GRID,
    min_kv_groups: int = 1,
    min_mlp_channels: int = 0,
    mlp_round_to: int = 8,
    uniform: bool = False,
    expert_share: float = 0.5,
    min_experts: int = 1,
    router_load: float = 1.0,
    reference: DenseReference | None = None,
    seed: int = 0,
    progress: bool = False,
) -> PruningPlan:
    """Prune ``model`` in place to ``sparsity`` of its attention+MLP parameters; return the plan.

    ``calibration`` is a list of LongTensor[B, T] token ids (or dicts with ``input_ids``) for
    ``functional``, ``taylor_loss`` and ``wanda_sp``, or a :class:`CalibrationSelector` that
    chooses the calibration set by the KL test (METHOD.md section 5). ``gamma="auto"`` (with a
    selector) chooses gamma from ``gamma_grid`` by the same test. ``reference`` is the original
    dense model's sizes when the model was already pruned (targets are relative to it). ``expert_share`` and
    ``min_experts``: mixture-of-experts models only (see :class:`~nirvana_pl.allocate.AllocationConfig`).
    """
    check_estimator(saliency)
    check_selection_args(saliency, calibration, gamma)
    config = allocation_config(
        sparsity, gamma, min_kv_groups=min_kv_groups, min_mlp_channels=min_mlp_channels, mlp_round_to=mlp_round_to,
        uniform=uniform, expert_share=expert_share, min_experts=min_experts, router_load=router_load,
    )
    reference = reference or DenseReference.of(model)
    plan, _ = make_plan(
        model, saliency, config, reference, calibration=calibration, gamma_auto=gamma == "auto",
        gamma_grid=gamma_grid, seed=seed, progress=progress,
    )
    apply_plan(model, plan)
    reference.attach(model)
    return plan
