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
from typing import Callable, ContextManager, Iterable, Mapping, Sequence

import torch
from torch import nn

from .optim import check_state_follows, owner_of, slice_state
from .plan import PruningPlan
from .units import (
    LayerUnits,
    WeightSlice,
    find_units,
    head_dim_of,
    prunable_parameter_count,
    removed_parameters,
    try_stock_config,
    unit_index,
    units_parameter_count,
)


Materialize = Callable[[Sequence[nn.Parameter]], ContextManager[None]]


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
    predicted = predicted_params_after(units, plan)
    if plan.params_after and plan.params_after != predicted:
        raise PlanMismatchError(
            f"plan says params_after={plan.params_after}, but its kept units leave {predicted} attention+MLP "
            "parameters on this model; the plan was edited or made for another model."
        )
    return units


def predicted_params_after(units: Sequence[LayerUnits], plan: PruningPlan) -> int:
    """Attention+MLP parameters of the model once ``plan`` is applied."""
    current = units_parameter_count(units)
    return current - removed_parameters(units, plan.kv_groups_kept(), plan.mlp_widths_kept())


def _slice_weight(
    w: WeightSlice,
    kept: Sequence[int],
    n_units: int,
    optimizers: Sequence[torch.optim.Optimizer],
    materialize: Materialize,
):
    idx = unit_index(n_units, w.rows_per_unit, kept).to(w.weight.device)
    unit_parameters = w.unit_parameters()
    with materialize([p for p, _ in unit_parameters]):
        for p, axis in unit_parameters:
            old_shape = p.shape
            with torch.no_grad():
                p.data = p.data.index_select(axis, idx).contiguous()
            p.grad = None
            optimizer = owner_of(optimizers, p)  # per parameter: a LoRA base is frozen, its adapters are not
            if optimizer is not None:
                slice_state(optimizer, p, old_shape, axis, idx)
    # Shape attributes of the base linear, of a LoRA wrapper, and of the adapter linears it slices.
    attr = "out_features" if w.axis == 0 else "in_features"
    for module in [w.linear, w.module] + [ad.B if w.axis == 0 else ad.A for ad in w.adapters]:
        if hasattr(module, attr):
            setattr(module, attr, idx.numel())


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
    for w, kept, n in jobs:
        _slice_weight(w, kept, n, optimizers, materialize or _as_is)
    _record_new_widths(model, units, plan)
    actual = prunable_parameter_count(model)
    if actual != expected:  # internal consistency check: unit costs must match the real slices
        raise RuntimeError(f"surgery left {actual} attention+MLP parameters, the plan predicted {expected}.")


def _check_states_follow(
    jobs: Sequence[tuple[WeightSlice, Sequence[int], int]], optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """Every optimizer state of a weight to be sliced must be able to follow its slice."""
    for w, _, _ in jobs:
        for p, axis in w.unit_parameters():
            opt = owner_of(optimizers, p)
            if opt is not None:
                try:
                    check_state_follows(opt, p, axis, w.name)
                except ValueError as err:
                    raise PlanMismatchError(str(err)) from None


def _record_new_widths(model: nn.Module, units: Sequence[LayerUnits], plan: PruningPlan) -> None:
    """After slicing: the modules' width attributes and the model config describe the new shapes."""
    for u in units:
        if hasattr(u.mlp, "intermediate_size"):  # informational attribute of stock MLP modules
            u.mlp.intermediate_size = u.mlp_width
    if _is_t5(model):  # head bookkeeping (kept original heads for the position bias) and the config
        from .t5 import after_slicing

        after_slicing(model, units, [lp.kept_kv_groups for lp in plan.layers])
    else:
        update_config(model)


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per-layer sizes as they stand: KV heads, query heads, MLP width."""
    return [
        {
            "num_key_value_heads": u.num_kv_groups,
            "num_attention_heads": u.num_kv_groups * u.group_size,
            "intermediate_size": u.mlp_width,
        }
        for u in find_units(model)
    ]


def update_config(model: nn.Module) -> None:
    """Write the real per-layer widths into ``model.config``.

    When every layer has the same width (and the stock config class accepts it) the stock fields
    describe the model and the per-layer list is dropped; otherwise ``config.nirvana_layer_widths`` holds one
    entry per layer.
    ``head_dim`` is always written explicitly, because stock configs derive it from
    ``hidden_size / num_attention_heads``, which pruning changes.
    """
    if _is_t5(model):
        from .t5 import update_t5_config

        update_t5_config(model)
        return
    config = model.config
    widths = layer_widths(model)
    config.head_dim = head_dim_of(config)
    if all(w == widths[0] for w in widths) and _stock_config_accepts(config, widths[0]):
        for key, value in widths[0].items():
            setattr(config, key, value)
        if hasattr(config, "nirvana_layer_widths"):
            del config.nirvana_layer_widths
    else:
        config.nirvana_layer_widths = widths


def _is_t5(model: nn.Module) -> bool:
    from .t5 import is_t5

    return is_t5(model)


def _stock_config_accepts(config, widths: dict[str, int]) -> bool:
    """Whether the stock config class validates these widths (Llama's checks hidden % heads)."""
    values = {**config.to_dict(), **widths, "head_dim": head_dim_of(config)}
    return try_stock_config(type(config), values)[0] is not None


def resize_to_widths(
    model: nn.Module, widths: Sequence[dict[str, int]], materialize: Materialize | None = None
) -> None:
    """Give ``model`` the per-layer shapes ``widths`` (keeping the first units).

    Used before loading a pruned state dict into a freshly built dense model: only the shapes
    matter, the values are overwritten by the load. ``materialize``: as in :func:`apply_plan`.
    """
    from .plan import LayerPlan

    units = find_units(model)
    if len(widths) != len(units):
        raise PlanMismatchError(f"{len(widths)} layer widths given, the model has {len(units)} layers.")
    layers = []
    for u, w in zip(units, widths):
        kv, mlp = int(w["num_key_value_heads"]), int(w["intermediate_size"])
        if kv > u.num_kv_groups or mlp > u.mlp_width:
            raise PlanMismatchError(
                f"layer {u.index}: cannot grow from {u.num_kv_groups} KV groups / {u.mlp_width} MLP channels "
                f"to {kv} / {mlp}; build the model from the dense config."
            )
        layers.append(LayerPlan(u.num_kv_groups, u.mlp_width, list(range(kv)), list(range(mlp))))
    apply_plan(model, PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="resize"), (), materialize)


def widths_from_state_dict(
    model: nn.Module, module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = ""
) -> list[dict[str, int]] | None:
    """The per-layer widths (as :func:`layer_widths`) of the pruned ``model`` that ``state_dict`` was saved
    from; None when it does not hold every layer's K and gate weights as 2-D tensors (a partial state
    dict, or DeepSpeed ZeRO-3's 1-D placeholders).

    ``module`` is what the state dict is keyed by (``model`` itself or the module holding it, e.g. a
    LightningModule), ``prefix`` its keys' prefix. Weights saved from inside LoRA layers count too.
    """
    names = {id(p): n for n, p in module.named_parameters()}

    def saved(weight: nn.Parameter) -> torch.Tensor | None:
        name = prefix + names[id(weight)]
        base_name = name.replace(".base_layer.weight", ".weight").removesuffix(".weight") + ".base_layer.weight"
        return state_dict.get(name, state_dict.get(base_name))  # plain, or saved from inside a LoRA layer

    h = head_dim_of(model.config)
    widths = []
    for u in find_units(model):
        k, gate = saved(u.attn_weights[1].weight), saved(u.mlp_weights[0].weight)
        if k is None or gate is None or k.dim() != 2 or gate.dim() != 2:  # (a 2-D gate with no rows: MLP pruned away)
            return None
        widths.append(
            {"num_key_value_heads": k.shape[0] // h, "num_attention_heads": k.shape[0] // h * u.group_size,
             "intermediate_size": gate.shape[0]}
        )
    return widths


def resize_from_state_dict(
    model: nn.Module, module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
    materialize: Callable[[Sequence[nn.Parameter]], ContextManager[None]] | None = None,
) -> bool:
    """Before ``module.load_state_dict(state_dict)``: give ``model`` (inside ``module``) the pruned shapes
    the state dict holds. False, changing nothing, when it does not hold them (a partial state dict, or
    DeepSpeed ZeRO-3's placeholders). ``materialize``: see :func:`apply_plan` (decoder models).
    """
    from .t5 import is_t5, resize_t5_from_state_dict

    if is_t5(model):  # T5 also needs the kept original heads (buffers in the state dict)
        return resize_t5_from_state_dict(model, module, state_dict, prefix)
    widths = widths_from_state_dict(model, module, state_dict, prefix)
    if widths is None:
        return False
    if widths != layer_widths(model):
        resize_to_widths(model, widths, materialize)
    return True


def planned_slices(model: nn.Module, plan: PruningPlan) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    """(parameter, axis, kept indices) for every parameter ``plan`` shrinks (the plan is validated).

    For callers that carry state kept outside the module (e.g. a DeepSpeed engine's partitioned
    fp32 masters and moments) over to the kept slices.
    """
    units = validate_plan(model, plan)
    return [
        (p, axis, unit_index(n, w.rows_per_unit, kept))
        for w, kept, n in _slice_jobs(units, plan)
        for p, axis in w.unit_parameters()
    ]


def _slice_jobs(units: Sequence[LayerUnits], plan: PruningPlan) -> list[tuple[WeightSlice, list[int], int]]:
    """(weight, kept units, units before) for every weight whose pool ``plan`` shrinks in its layer."""
    jobs = []
    for u, lp in zip(units, plan.layers):
        if len(lp.kept_kv_groups) != u.num_kv_groups:
            jobs += [(w, lp.kept_kv_groups, u.num_kv_groups) for w in u.attn_weights]
        if len(lp.kept_mlp_channels) != u.mlp_width:
            jobs += [(w, lp.kept_mlp_channels, u.mlp_width) for w in u.mlp_weights]
    return jobs
