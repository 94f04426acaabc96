"""Apply a PruningPlan to a model: slice weights, biases, optimizer state and the config.

Parameters are shrunk in place (``param.data`` is replaced), so every ``nn.Parameter``
object survives: an optimizer that holds them keeps stepping them, and its per-parameter
state is sliced the same way (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, momentum...),
while scalar state (``step``) and param-group settings are untouched.

The plan is fully validated against the model before the first tensor changes, so bad input
never leaves a half-pruned model.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence

import torch
from torch import nn

from .arch import Materialize, architecture_of
from .optim import check_state_follows, owner_of, slice_state
from .plan import LayerPlan, PruningPlan
from .units import (
    LayerUnits,
    WeightSlice,
    expert_channels,
    find_units,
    prunable_parameter_count,
    removed_parameters,
    units_parameter_count,
)


class PlanMismatchError(ValueError):
    """The plan does not fit the model it is applied to."""


def _as_is(params: Sequence[nn.Parameter]) -> ContextManager[None]:
    return nullcontext()


def validate_plan(model: nn.Module, plan: PruningPlan, min_kv_groups: int = 1) -> list[LayerUnits]:
    units = find_units(model)
    if len(plan.layers) != len(units):
        raise PlanMismatchError(f"plan has {len(plan.layers)} layers, the model has {len(units)}.")
    for u, lp in zip(units, plan.layers):
        for what, before, now, kept in (
            ("KV groups", lp.kv_groups_before, u.num_kv_groups, lp.kept_kv_groups),
            ("MLP channels", lp.mlp_channels_before, u.mlp_width, lp.kept_mlp_channels),
        ):
            if before != now:
                raise PlanMismatchError(
                    f"layer {u.index}: plan was made for {before} {what}, the model has {now}. Plans refer "
                    "to the model they were made on; apply them in order."
                )
            if list(kept) != sorted(set(kept)) or (kept and (kept[0] < 0 or kept[-1] >= now)):
                raise PlanMismatchError(
                    f"layer {u.index}: kept {what} must be sorted unique indices in [0, {now}); "
                    f"got {list(kept)[:16]}..."
                )
        if len(lp.kept_kv_groups) < min(min_kv_groups, u.num_kv_groups):
            raise PlanMismatchError(f"layer {u.index}: a plan must keep at least {min_kv_groups} KV group(s).")
        _validate_experts(u, lp)
    architecture_of(model).check_plan(model, units, plan)
    predicted = predicted_params_after(units, plan)
    if plan.params_after and plan.params_after != predicted:
        raise PlanMismatchError(
            f"plan says params_after={plan.params_after}, but its kept units leave {predicted} attention+MLP "
            "parameters on this model; the plan was edited or made for another model."
        )
    return units


def _validate_experts(u: LayerUnits, lp: LayerPlan) -> None:
    """The experts of a mixture-of-experts layer's plan: the layer's count, sorted unique indices, at least one
    kept, and the same number of kept channels in every kept expert (they share one fused tensor)."""
    if lp.experts_before != u.num_experts:
        raise PlanMismatchError(
            f"layer {u.index}: plan was made for {lp.experts_before} experts, the model has {u.num_experts}."
        )
    if not u.num_experts:
        return
    experts = list(range(u.num_experts)) if lp.kept_experts is None else list(lp.kept_experts)
    if not experts or experts != sorted(set(experts)) or experts[0] < 0 or experts[-1] >= u.num_experts:
        raise PlanMismatchError(
            f"layer {u.index}: kept experts must be at least one sorted unique index in [0, {u.num_experts}); "
            f"got {experts}."
        )
    if lp.shared_channels_before != u.shared_width:
        raise PlanMismatchError(
            f"layer {u.index}: plan was made for a shared expert of {lp.shared_channels_before} channels, the model's "
            f"has {u.shared_width}."
        )
    try:
        expert_channels(lp.kept_expert_units, u.channels_per_expert, experts)
    except ValueError as err:
        raise PlanMismatchError(f"layer {u.index}: {err}") from None


def predicted_params_after(units: Sequence[LayerUnits], plan: PruningPlan) -> int:
    """Attention+MLP parameters of the model once ``plan`` is applied."""
    current = units_parameter_count(units)
    return current - removed_parameters(units, plan.kv_groups_kept(), plan.mlp_widths_kept(), plan.experts_kept())


def _slice_weight(
    w: WeightSlice,
    kept: Sequence[int],
    optimizers: Sequence[torch.optim.Optimizer],
    materialize: Materialize,
    kept_experts: Sequence[int] | None = None,
):
    kept = w.local_units(kept)
    unit_parameters = w.unit_parameters()
    with materialize([p for p, _ in unit_parameters]):
        for p, axis in unit_parameters:
            old_shape = p.shape
            take = _taker(w, p, axis, kept, kept_experts)
            with torch.no_grad():
                p.data = take(p.data).contiguous()
            p.grad = None
            optimizer = owner_of(optimizers, p)  # per parameter: a LoRA base is frozen, its adapters are not
            if optimizer is not None:
                slice_state(optimizer, p, old_shape, axis, take)
    if w.experts:  # (the experts module's own size attributes are the adapter's, after_slicing)
        return
    # Shape attributes of the base linear, of a LoRA wrapper, and of the adapter linears it slices.
    attr = "out_features" if w.axis == 0 else "in_features"
    size = len(kept) * w.rows_per_unit  # (not the weight's shape: ZeRO-3 holds a partition of it again)
    for module in [w.linear, w.module] + [ad.B if w.axis == 0 else ad.A for ad in w.adapters]:
        if hasattr(module, attr):
            setattr(module, attr, size)


def apply_plan(
    model: nn.Module,
    plan: PruningPlan,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    materialize: Materialize | None = None,
) -> None:
    """Physically remove the units ``plan`` drops; slice the optimizers' state alongside.

    ``materialize(params)`` is entered around the slicing of each weight (with its bias and adapters),
    for parameters whose values live elsewhere between uses (DeepSpeed ZeRO-3 partitions them; see
    :func:`nirvana_pl.deepspeed.zero3_resized`), one weight at a time.

    Raises :class:`PlanMismatchError` (model untouched) when the plan does not fit the model or an
    optimizer holds state that cannot follow the slice.
    """
    units = validate_plan(model, plan)
    optimizers = list(optimizers)
    if plan.is_identity:
        return
    expected = predicted_params_after(units, plan)
    jobs = _slice_jobs(units, plan)
    _check_states_follow(jobs, optimizers)  # before anything changes
    for w, kept, kept_experts in jobs:
        _slice_weight(w, kept, optimizers, materialize or _as_is, kept_experts)
    architecture_of(model).after_slicing(model, units, plan)  # module attributes and config fields
    actual = prunable_parameter_count(model)
    if actual != expected:  # internal consistency check: unit costs must match the real slices
        raise RuntimeError(f"surgery left {actual} attention+MLP parameters, the plan predicted {expected}.")


def _check_states_follow(
    jobs: Sequence[tuple[WeightSlice, Sequence[int], Sequence[int] | None]],
    optimizers: Sequence[torch.optim.Optimizer],
) -> None:
    """Every optimizer state of a weight to be sliced must be able to follow its slice."""
    for w, _, _ in jobs:
        for p, axis in w.unit_parameters():
            opt = owner_of(optimizers, p)
            if opt is not None:
                try:
                    check_state_follows(opt, p, axis, w.name, same_shape=bool(w.experts))
                except ValueError as err:
                    raise PlanMismatchError(str(err)) from None


def layer_widths(model: nn.Module) -> Any:
    """The model's pruned shapes as its architecture records them in an exported config (for a decoder LLM,
    one dict per layer: KV heads, query heads, MLP width), measured on the modules."""
    return architecture_of(model).widths(model)


def resize_from_state_dict(
    model: nn.Module, module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
    materialize: Materialize | None = None,
) -> bool:
    """Before ``module.load_state_dict(state_dict)``: give ``model`` (inside ``module``) the pruned shapes
    the state dict holds. False, changing nothing, when it does not hold them (a partial state dict, or
    DeepSpeed ZeRO-3's placeholders). ``materialize``: see :func:`apply_plan`.
    """
    return architecture_of(model).resize_from_state_dict(model, module, state_dict, prefix, materialize)


def planned_slices(
    model: nn.Module, plan: PruningPlan
) -> list[tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
    """(parameter, ``take``) for every parameter ``plan`` shrinks (the plan is validated): ``take(t)`` keeps the
    entries of a tensor of the parameter's shape that the plan keeps, as surgery slices the parameter itself.

    For callers that carry state kept outside the module (e.g. a DeepSpeed engine's partitioned
    fp32 masters and moments) over to the kept slices.
    """
    units = validate_plan(model, plan)
    return [(p, _taker(w, p, axis, w.local_units(kept), experts)) for w, kept, experts in _slice_jobs(units, plan)
            for p, axis in w.unit_parameters()]  # fmt: skip


def _taker(
    w: WeightSlice, p: nn.Parameter, axis: int, kept: Sequence[int], kept_experts: Sequence[int] | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What surgery keeps of ``p`` (``w``'s weight, or its bias or a LoRA factor along ``axis``); ``kept``: the
    kept units of ``w``'s own (:meth:`~nirvana_pl.units.WeightSlice.local_units`)."""
    if w.experts:
        return lambda t: w.take_experts(t, kept, kept_experts)
    idx = w.index_map.indices(kept)
    return lambda t: t.index_select(axis, idx.to(t.device))


def _slice_jobs(
    units: Sequence[LayerUnits], plan: PruningPlan
) -> list[tuple[WeightSlice, list[int], list[int] | None]]:
    """(weight, kept units of its layer's pool, kept experts for a fused expert weight) for every weight whose pool
    ``plan`` shrinks in its layer."""
    jobs: list[tuple[WeightSlice, list[int], list[int] | None]] = []
    for u, lp in zip(units, plan.layers):
        if len(lp.kept_kv_groups) != u.num_kv_groups:
            jobs += [(w, lp.kept_kv_groups, None) for w in u.attn_weights + u.attn_followers]
        experts = list(range(u.num_experts)) if lp.kept_experts is None else list(lp.kept_experts)
        if len(lp.kept_mlp_channels) != u.mlp_width or len(experts) != u.num_experts:
            jobs += [(w, lp.kept_mlp_channels, experts if w.experts else None) for w in u.mlp_weights]
        if len(experts) != u.num_experts:
            jobs += [(w, experts, None) for w in u.expert_followers]
    return jobs
