"""One-shot pruning for plain PyTorch: score, allocate and cut in one call.

:func:`make_plan` is the decision pipeline shared with the Lightning callback
(scores -> optional KL selection -> plan); :func:`prune` applies its plan in place.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .allocate import DEFAULT_GAMMA, AllocationConfig, DenseReference, allocate
from .calibration import DEFAULT_GAMMA_GRID, CalibrationSelector, masked
from .compensation import (
    DEFAULT_DAMPING,
    CompensationError,
    check_compensate,
    compensates_anything,
    plan_compensation,
    resolve_compensate,
)
from .plan import PruningPlan
from .saliency import (
    ADAM_ESTIMATORS,
    CALIBRATION_ESTIMATORS,
    DATA_FREE_ESTIMATORS,
    HYBRID_ESTIMATORS,
    UnitScores,
    adam_part,
    check_estimator,
    compute_scores,
)
from .surgery import apply_plan
from .units import prunable_parameter_count

#: gamma used to choose the calibration set under gamma="auto" (the grid then picks gamma).
AUTO_GAMMA_START = 3.0
#: the estimators whose scores change when units are masked out: computed from passes over the model
RESCORED_ESTIMATORS = CALIBRATION_ESTIMATORS + tuple(HYBRID_ESTIMATORS)
#: scoring_stages when none is given, per saliency (1 for the others): two scorings lowered the default's
#: perplexity on and off the warm-up domain at every sparsity of the cross-domain matrix (benchmarks/RESULTS.md)
DEFAULT_SCORING_STAGES = {"fisher_functional_self": 2}


def resolve_scoring_stages(saliency: str, scoring_stages: int | None) -> int:
    """``scoring_stages``, or the saliency's default (:data:`DEFAULT_SCORING_STAGES`) when it is None."""
    return DEFAULT_SCORING_STAGES.get(saliency, 1) if scoring_stages is None else scoring_stages


def check_scoring_stages(saliency: str, calibration: Any, scoring_stages: int) -> None:
    """Raise a ValueError (naming the fix) unless ``scoring_stages`` is an integer >= 1 that ``saliency`` can use."""
    if not (isinstance(scoring_stages, int) and not isinstance(scoring_stages, bool) and scoring_stages >= 1):
        raise ValueError(f"scoring_stages={scoring_stages!r} must be an integer >= 1 (1: score once).")
    if scoring_stages == 1:
        return
    if saliency not in RESCORED_ESTIMATORS:
        reads = "the optimizer's Adam state" if saliency in ADAM_ESTIMATORS else "only the weights"
        raise ValueError(
            f"scoring_stages={scoring_stages} scores the model again with the units of the earlier stages masked "
            f"out, but saliency={saliency!r} reads {reads}, which a mask does not change. Use scoring_stages=1, "
            f"or a saliency computed from passes over the model ({', '.join(RESCORED_ESTIMATORS)})."
        )
    if isinstance(calibration, CalibrationSelector):
        raise ValueError(
            f"scoring_stages={scoring_stages} is not supported with a CalibrationSelector yet: pass the calibration "
            "batches themselves, or scoring_stages=1."
        )


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
    sampled: Sequence[dict[str, torch.Tensor]] | None = None,
    scoring_stages: int | None = None,
    progress: bool = False,
) -> tuple[PruningPlan, dict[str, Any] | None]:
    """Decide what to prune. Returns the plan and, when a KL selection ran, its JSON-able summary.

    With a :class:`CalibrationSelector` and a calibration-based saliency, the calibration set (and,
    with ``gamma_auto``, gamma) is chosen by the KL test; with Adam-state or data-free scores and
    ``gamma_auto``, only gamma is chosen. ``optimizer_scores`` may map several Adam-state
    estimators to their scores: with a selector the plan of least KL among them is kept. ``expert_load``: the
    tokens routed to each expert of a mixture-of-experts model while training (see
    :class:`~nirvana_pl.router_load.RouterLoad`): the Adam-state scores take it, and any other scores that
    counted none of their own. ``rank``, ``num_sampled_batches``: see :func:`~nirvana_pl.saliency.compute_scores`;
    ``sampled``: the windows of its first scoring, sampled already (the later stages sample their own).
    ``scoring_stages``: see :func:`staged_plan` (estimators computed from passes, without a selector); None: the
    saliency's default (:data:`DEFAULT_SCORING_STAGES`). The model's weights are never changed here.
    """
    scoring_stages = resolve_scoring_stages(saliency, scoring_stages)
    check_scoring_stages(saliency, calibration, scoring_stages)
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

    def score(windows: Sequence[dict[str, torch.Tensor]] | None = None) -> UnitScores:
        scores = compute_scores(
            model, saliency, calibration=None if isinstance(calibration, CalibrationSelector) else calibration,
            optimizer_scores=optimizer_scores, seed=seed, progress=progress, rank=rank,
            num_sampled_batches=num_sampled_batches, sampled=windows,
        )
        if scores.expert_load is None:
            scores.expert_load = expert_load
        return scores

    scores = score(sampled)
    if gamma_auto and isinstance(calibration, CalibrationSelector):
        search = calibration.choose_gamma(model, scores, config, gamma_grid, reference, progress=progress)
        return _with_selection(search.plan, {"gamma_search": search.summary(), "kl": search.best_kl})
    return staged_plan(model, saliency, config, reference, scores, score, scoring_stages), None


def staged_plan(
    model: nn.Module,
    saliency: str,
    config: AllocationConfig,
    reference: DenseReference,
    scores: UnitScores,
    score: Callable[[], UnitScores],
    stages: int = 1,
) -> PruningPlan:
    """The plan that brings ``model`` to ``config.sparsity``, reached in ``stages`` scorings at one prune event.

    Stage k of n plans the first k/n of the way from the model's present sparsity to the target with the scores it
    has, masks those units out (:func:`~nirvana_pl.calibration.masked`: the model computes what it would without
    them, exactly for every adapter marked exact) and calls ``score()`` again. Units already out score zero, so
    each plan removes them first; the last plan is the one returned. A unit whose worth depends on units removed
    beside it is judged again without them. ``stages=1``: the plan of ``scores``, as one scoring gives it. The
    model's weights are never changed.
    """
    start = 1.0 - prunable_parameter_count(model) / reference.prunable_params
    for stage in range(1, stages):
        partial = replace(config, sparsity=start + (config.sparsity - start) * stage / stages)
        with masked(model, allocate(model, scores, partial, reference, saliency=saliency)):
            scores = score()
    plan = allocate(model, scores, config, reference, saliency=saliency)
    if stages > 1:
        plan.score_summary["scoring_stages"] = stages
    return plan


def _with_selection(plan: PruningPlan, summary: dict[str, Any]) -> tuple[PruningPlan, dict[str, Any]]:
    plan.score_summary["selection"] = summary  # travels with the plan into JSON and reports
    return plan, summary


def prune(
    model: nn.Module,
    sparsity: float,
    saliency: str = "functional",
    calibration: Iterable[Any] | CalibrationSelector | None = None,
    gamma: float | str = DEFAULT_GAMMA,
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
    scoring_stages: int | None = None,
    compensate: bool | None = None,
    compensation_damping: float = DEFAULT_DAMPING,
    progress: bool = False,
) -> PruningPlan:
    """Prune ``model`` in place to ``sparsity`` of its attention+MLP parameters; return the plan.

    ``calibration`` is a list of LongTensor[B, T] token ids (or dicts with ``input_ids``) for
    ``functional``, ``taylor_loss`` and ``wanda_sp``, or a :class:`CalibrationSelector` that
    chooses the calibration set by the KL test (METHOD.md section 5). ``gamma="auto"`` (with a
    selector) chooses gamma from ``gamma_grid`` by the same test. ``reference`` is the original
    dense model's sizes when the model was already pruned (targets are relative to it). ``expert_share`` and
    ``min_experts``: mixture-of-experts models only (see :class:`~nirvana_pl.allocate.AllocationConfig`).
    ``scoring_stages``: score again with the units of the earlier stages masked out (see :func:`staged_plan`);
    None: 2 for ``fisher_functional_self``, 1 for the others (:data:`DEFAULT_SCORING_STAGES`).
    ``compensate``: before the cut, update the kept input columns of o_proj / down_proj by least squares on the
    ``calibration`` batches (see :mod:`~nirvana_pl.compensation`; ``compensation_damping`` its ridge). None: on
    only for the saliencies of :data:`~nirvana_pl.compensation.COMPENSATED_BY_DEFAULT`.
    """
    check_estimator(saliency)
    check_selection_args(saliency, calibration, gamma)
    compensate = resolve_compensate(saliency, compensate)
    check_compensate(compensate, compensation_damping, isinstance(calibration, CalibrationSelector))
    if calibration is not None and not isinstance(calibration, CalibrationSelector):
        calibration = list(calibration)  # (read by the scores and again by the compensation)
    config = allocation_config(
        sparsity, gamma, min_kv_groups=min_kv_groups, min_mlp_channels=min_mlp_channels, mlp_round_to=mlp_round_to,
        uniform=uniform, expert_share=expert_share, min_experts=min_experts, router_load=router_load,
    )
    reference = reference or DenseReference.of(model)
    plan, _ = make_plan(
        model, saliency, config, reference, calibration=calibration, gamma_auto=gamma == "auto",
        gamma_grid=gamma_grid, seed=seed, scoring_stages=scoring_stages, progress=progress,
    )
    if compensate and compensates_anything(model, plan):
        if calibration is None:  # (checked after the plan: a saliency prune cannot run says so first)
            raise CompensationError(
                "compensate=True fits the kept columns on calibration batches: pass "
                "calibration=[LongTensor[B, T], ...]."
            )
        compensation = plan_compensation(model, plan, calibration, compensation_damping)
        plan.score_summary["compensation"] = compensation.summary()
        compensation.apply_()
    apply_plan(model, plan)
    reference.attach(model)
    return plan
