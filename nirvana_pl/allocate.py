"""Global, module-balanced allocation (METHOD.md section 3): scores + budget -> PruningPlan.

Two pools, compared only within themselves: all KV groups of all layers, all MLP channels of
all layers. ``gamma`` = (fraction of MLP channels removed) / (fraction of KV groups removed).
Targets are fractions of the ORIGINAL dense model's attention+MLP parameters, so iterative
pruning calls this again with a larger target and the model as it now stands.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from .plan import LayerPlan, PruningPlan
from .saliency import UnitScores
from .units import LayerUnits, find_units, prunable_parameter_count, removed_parameters


#: config attribute where a pruned model remembers its dense reference
CONFIG_KEY = "nirvana_dense_reference"
#: MLP fraction removed over KV-group fraction removed, when not given (the callback, prune(), `nirvana-pl prune`)
DEFAULT_GAMMA = 3.0


class InfeasibleSparsityError(ValueError):
    """The requested sparsity cannot be reached with this gamma and these constraints."""


@dataclass(frozen=True)
class DenseReference:
    """Sizes of the original dense model that every target is relative to."""

    num_layers: int
    kv_groups_per_layer: int
    mlp_width: int
    kv_group_cost: int
    mlp_channel_cost: int
    prunable_params: int
    #: layers (unit entries) that have an MLP, when not all do (T5's cross-attention entries have none)
    num_mlp_layers: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> "DenseReference":
        """The sizes of ``model`` as dense, or, for a model pruned before, the ones it remembers.

        A prune records the dense reference in ``model.config.nirvana_dense_reference`` (it is
        saved and loaded with the config), so later targets stay relative to the original model.
        """
        recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        if recorded:
            return cls(**recorded)
        units = find_units(model)
        mlp_units = [u for u in units if u.mlp_weights]
        first = mlp_units[0] if mlp_units else units[0]
        if any(u.num_kv_groups != first.num_kv_groups for u in units) or any(
            u.mlp_width != first.mlp_width for u in mlp_units
        ):
            raise ValueError(
                "the model's layers already differ in width and its config records no dense reference; pass "
                "reference=DenseReference.of(original_dense_model) so targets stay relative to the dense model."
            )
        return cls(
            num_layers=len(units),
            kv_groups_per_layer=first.num_kv_groups,
            mlp_width=first.mlp_width,
            kv_group_cost=first.kv_group_cost,
            mlp_channel_cost=first.mlp_channel_cost,
            prunable_params=prunable_parameter_count(model),
            num_mlp_layers=len(mlp_units) if len(mlp_units) != len(units) else None,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["num_mlp_layers"] is None:  # decoder models: every layer has an MLP
            del d["num_mlp_layers"]
        return d

    def attach(self, model: nn.Module) -> None:
        """Remember these dense sizes in ``model.config`` (kept through save/load)."""
        setattr(model.config, CONFIG_KEY, self.to_dict())

    @property
    def total_kv_groups(self) -> int:
        return self.num_layers * self.kv_groups_per_layer

    @property
    def total_mlp_channels(self) -> int:
        return (self.num_layers if self.num_mlp_layers is None else self.num_mlp_layers) * self.mlp_width


@dataclass(frozen=True)
class AllocationConfig:
    """How a target sparsity becomes kept units. Validated on construction."""

    sparsity: float
    gamma: float = DEFAULT_GAMMA
    #: KV groups every layer keeps; at least the groups per layer keeps all attention (MLP-only pruning,
    #: gamma then has no effect)
    min_kv_groups: int = 1
    #: kept MLP widths are multiples of this (or a layer's whole width); at most the MLP width
    mlp_round_to: int = 8
    uniform: bool = False
    #: MLP channels every layer keeps, a multiple of ``mlp_round_to`` (0: a layer's whole MLP may go).
    #: DeepSpeed ZeRO-3 cannot hold a weight with no elements, so under ZeRO-3 the callback raises
    #: it to ``mlp_round_to``. In a mixture-of-experts layer: per kept expert, and at least one block of
    #: ``mlp_round_to`` (an expert without channels would still take its share of the routing: whole experts go
    #: instead); a shared expert may go to 0.
    min_mlp_channels: int = 0
    #: mixture-of-experts models: the share of the MLP cut taken as whole experts (the rest as channels inside the
    #: kept experts, the same number in every expert of a layer); 0 prunes channels only, 1 experts only
    expert_share: float = 0.5
    #: mixture-of-experts models: experts every layer keeps
    min_experts: int = 1
    #: mixture-of-experts models: an expert's score is its channels' mean score times (its share of the routed
    #: tokens / the layer's mean share) to this power, where the load was counted (0: the channels' scores alone)
    router_load: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity={self.sparsity!r} must be in [0, 1), e.g. sparsity=0.5 removes half.")
        if not (isinstance(self.gamma, (int, float)) and self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(
                f"gamma={self.gamma!r} must be a positive number (MLP fraction removed / KV fraction "
                "removed); gamma=1 removes equal fractions, the paper uses about 3."
            )
        if not (isinstance(self.min_kv_groups, int) and self.min_kv_groups >= 1):
            raise ValueError(f"min_kv_groups={self.min_kv_groups!r} must be an integer >= 1.")
        if not (isinstance(self.min_mlp_channels, int) and self.min_mlp_channels >= 0):
            raise ValueError(f"min_mlp_channels={self.min_mlp_channels!r} must be an integer >= 0.")
        if not (isinstance(self.mlp_round_to, int) and self.mlp_round_to >= 1):
            raise ValueError(f"mlp_round_to={self.mlp_round_to!r} must be an integer >= 1 (1 = no rounding).")
        if not (isinstance(self.expert_share, (int, float)) and 0.0 <= self.expert_share <= 1.0):
            raise ValueError(
                f"expert_share={self.expert_share!r} must be in [0, 1]: the share of a mixture-of-experts model's MLP "
                "cut taken as whole experts (0: channels inside the experts only, 1: whole experts only)."
            )
        if not (isinstance(self.router_load, (int, float)) and 0.0 <= self.router_load <= 4.0):
            raise ValueError(
                f"router_load={self.router_load!r} must be in [0, 4]: the power of an expert's share of the routed "
                "tokens in its score (0 ignores the router's load, 1 weighs the score by it)."
            )
        if not (isinstance(self.min_experts, int) and self.min_experts >= 1):
            raise ValueError(f"min_experts={self.min_experts!r} must be an integer >= 1 (experts every layer keeps).")
        if self.min_mlp_channels % self.mlp_round_to:
            floor = -(-self.min_mlp_channels // self.mlp_round_to) * self.mlp_round_to
            raise ValueError(
                f"min_mlp_channels={self.min_mlp_channels} must be a multiple of mlp_round_to={self.mlp_round_to} "
                f"(kept MLP widths are), e.g. min_mlp_channels={floor}."
            )


def max_feasible_sparsity(
    ref: DenseReference, gamma: float, min_kv_groups: int = 1, min_mlp_channels: int = 0
) -> float:
    """Largest s for which every layer keeps ``min_kv_groups`` KV groups and ``min_mlp_channels`` MLP
    channels (with none kept, p_m <= 1).

    With ``min_kv_groups`` >= the KV groups per layer no attention is pruned and gamma has no effect:
    the MLP channels alone are the budget.
    """
    n_a, n_m = ref.total_kv_groups, ref.total_mlp_channels
    ca, cm = ref.kv_group_cost, ref.mlp_channel_cost
    p_m_max = max(0.0, 1.0 - min_mlp_channels / ref.mlp_width) if ref.mlp_width else 0.0
    if _attention_frozen(ref, min_kv_groups):
        return max(0.0, p_m_max * n_m * cm / ref.prunable_params)
    p_a_max = min(p_m_max / gamma, (ref.kv_groups_per_layer - min_kv_groups) / ref.kv_groups_per_layer)
    removable = p_a_max * (n_a * ca + gamma * n_m * cm)
    return max(0.0, removable / ref.prunable_params)


def _attention_frozen(ref: DenseReference, min_kv_groups: int) -> bool:
    """Whether ``min_kv_groups`` keeps every KV group of every layer (only MLP channels can go)."""
    return min_kv_groups >= ref.kv_groups_per_layer


def check_mlp_round_to(ref: DenseReference, mlp_round_to: int) -> None:
    """Refuse an ``mlp_round_to`` wider than the layers' MLPs.

    Kept MLP widths are multiples of ``mlp_round_to`` (or a layer's whole width), so with a block wider
    than the MLP a pruned layer can only keep nothing: every layer touched would lose its whole MLP and
    the realised sparsity would overshoot the target.
    """
    width = ref.mlp_width
    if width and mlp_round_to > width:
        # the largest power of two (<= 64) that divides the width: kept widths stay hardware friendly
        suggestion = next(b for b in (64, 32, 16, 8, 4, 2, 1) if b <= width and width % b == 0)
        raise ValueError(
            f"mlp_round_to={mlp_round_to} is larger than the MLP width of the layers ({width} channels): a pruned "
            f"layer could keep only 0 channels, so every layer touched would lose its whole MLP and the realised "
            f"sparsity would overshoot the target. Use mlp_round_to <= {width}, e.g. mlp_round_to={suggestion} "
            f"(a divisor of {width})."
        )


def check_feasible(ref: DenseReference, sparsity: float, gammas: Sequence[float], min_kv_groups: int = 1,
                   where: str = "", min_mlp_channels: int = 0, mlp_round_to: int = 1) -> None:
    """Raise :class:`InfeasibleSparsityError` naming the largest feasible sparsity, unless ``sparsity``
    is reachable with some gamma of ``gammas`` (``min_kv_groups`` and ``min_mlp_channels`` kept per layer).

    Also refuses (``ValueError``) an ``mlp_round_to`` wider than the layers' MLPs (see :func:`check_mlp_round_to`).
    """
    check_mlp_round_to(ref, mlp_round_to)
    s_max = max(max_feasible_sparsity(ref, g, min_kv_groups, min_mlp_channels) for g in gammas)
    if sparsity <= s_max + 1e-12:
        return
    largest = f"{math.floor(s_max * 1000) / 1000:.3f}"
    mlp_floor = f" (keeping min_mlp_channels={min_mlp_channels} per layer)" if min_mlp_channels else ""
    n_kv = ref.kv_groups_per_layer
    if _attention_frozen(ref, min_kv_groups):
        # gamma cannot help: no KV group may go, so only the MLP pool counts
        raise InfeasibleSparsityError(
            f"sparsity={sparsity}{where} is not reachable: min_kv_groups={min_kv_groups} keeps all {n_kv} KV groups "
            f"of every layer, so no attention is pruned (gamma has no effect) and the MLP channels alone{mlp_floor} "
            f"reach a sparsity of {largest} at most: the largest feasible sparsity is {largest}. Lower sparsity to "
            f"<= {largest}, or lower min_kv_groups below {n_kv} (e.g. min_kv_groups={max(1, n_kv - 1)}) so that KV "
            "groups are pruned too."
        )
    if len(gammas) == 1:
        gamma = float(gammas[0])
        p_a = sparsity * ref.prunable_params / (
            ref.total_kv_groups * ref.kv_group_cost + gamma * ref.total_mlp_channels * ref.mlp_channel_cost
        )
        which = f"gamma={gamma:g} (it needs {gamma * p_a:.1%} of MLP channels and {p_a:.1%} of KV groups)"
    else:
        which = f"any gamma of {tuple(gammas)}"
    floors = f"min_kv_groups={min_kv_groups}" + (f", min_mlp_channels={min_mlp_channels}" if min_mlp_channels else "")
    advice = _infeasible_advice(ref, gammas, min_kv_groups, min_mlp_channels)
    raise InfeasibleSparsityError(
        f"sparsity={sparsity}{where} is not reachable with {which} and {floors} per layer: "
        f"the largest feasible sparsity is {largest}. {advice}"
    )


def _infeasible_advice(ref: DenseReference, gammas: Sequence[float], min_kv_groups: int, min_mlp_channels: int) -> str:
    """What raises the largest feasible sparsity: it depends on which pool runs out first at the best gamma."""
    gamma = max(gammas, key=lambda g: max_feasible_sparsity(ref, g, min_kv_groups, min_mlp_channels))
    p_m_max = max(0.0, 1.0 - min_mlp_channels / ref.mlp_width) if ref.mlp_width else 0.0
    kv_cap = (ref.kv_groups_per_layer - min_kv_groups) / ref.kv_groups_per_layer
    many = len(gammas) > 1
    if kv_cap < p_m_max / gamma:
        # the KV pool is exhausted first (each layer down to min_kv_groups): a smaller gamma only lowers the limit
        return (
            f"At that sparsity every layer is already down to min_kv_groups={min_kv_groups} of its "
            f"{ref.kv_groups_per_layer} KV groups, so a lower gamma cannot help: lower sparsity, "
            f"{'add a larger gamma to the grid' if many else 'raise gamma'} (more of the cut from the MLP channels) "
            "or lower min_kv_groups."
        )
    mlp = "every MLP channel" if not min_mlp_channels else f"all but min_mlp_channels={min_mlp_channels} MLP channels"
    return (
        f"At that sparsity {mlp} of every layer is gone: lower sparsity or "
        f"{'add a smaller gamma to the grid' if many else 'gamma'} (more of the cut from the KV groups)"
        f"{', or lower min_mlp_channels' if min_mlp_channels else ''}."
    )


def check_router_loss(model: nn.Module, config: AllocationConfig) -> None:
    """Refuse a cut that would leave layers with different numbers of experts while the model computes
    transformers' load-balancing loss (``output_router_logits=True``), which stacks every layer's router logits."""
    if not getattr(getattr(model, "config", None), "output_router_logits", False) or config.uniform:
        return
    if config.expert_share > 0 and any(u.num_experts for u in find_units(model)):
        raise ValueError(
            "this mixture-of-experts model computes the load-balancing loss (config.output_router_logits=True), "
            "which needs the same number of experts in every layer, and expert_share="
            f"{config.expert_share} removes whole experts layer by layer. Prune with uniform=True, or "
            "expert_share=0 (channels only), or set model.config.output_router_logits=False."
        )


def _check_scores(scores: UnitScores, units: Sequence[LayerUnits]) -> None:
    if scores.expert_load is not None:
        counts = [None if c is None else c.numel() for c in scores.expert_load]
        if counts != [u.num_experts or None for u in units]:
            raise ValueError(f"the router load covers experts {counts}, the model's layers have "
                             f"{[u.num_experts for u in units]}; it was counted on another model.")  # fmt: skip
    for kind, vecs, sizes in (
        ("attn", scores.attn, [u.num_kv_groups for u in units]),
        ("mlp", scores.mlp, [u.mlp_width for u in units]),
    ):
        if len(vecs) != len(units):
            raise ValueError(f"{kind} scores cover {len(vecs)} layers, the model has {len(units)}.")
        for i, (v, n) in enumerate(zip(vecs, sizes)):
            if v.numel() != n:
                raise ValueError(f"{kind} scores of layer {i} have {v.numel()} entries, the layer has {n} units.")
            if not torch.isfinite(v).all():
                raise ValueError(
                    f"{kind} scores of layer {i} contain NaN/inf; the saliency pass diverged (check the loss "
                    "and the calibration data)."
                )


def _lowest_k(flat_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores; ties broken by position (layer, then index): exact top-k."""
    order = torch.sort(flat_scores.double(), stable=True).indices
    return order[:k]


def _keep_top(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Sorted indices of the n_keep best units of one layer (ties: lower index removed first)."""
    n_remove = scores.numel() - n_keep
    removed = set(_lowest_k(scores, n_remove).tolist())
    return [i for i in range(scores.numel()) if i not in removed]


def allocate(
    model: nn.Module,
    scores: UnitScores,
    config: AllocationConfig,
    reference: DenseReference | None = None,
    saliency: str = "",
) -> PruningPlan:
    """Turn unit scores into a plan that brings ``model`` to ``config.sparsity`` of ``reference``."""
    units = find_units(model)
    ref = reference or DenseReference.of(model)
    _check_scores(scores, units)
    check_router_loss(model, config)
    params_before = prunable_parameter_count(model)
    s, gamma = float(config.sparsity), float(config.gamma)

    n_a, n_m = ref.total_kv_groups, ref.total_mlp_channels
    ca, cm = ref.kv_group_cost, ref.mlp_channel_cost
    budget = s * ref.prunable_params  # parameters removed from the dense model in total
    p_a = budget / (n_a * ca + gamma * n_m * cm)
    check_feasible(
        ref, s, [gamma], config.min_kv_groups, min_mlp_channels=config.min_mlp_channels,
        mlp_round_to=config.mlp_round_to,
    )

    kv_now = [u.num_kv_groups for u in units]
    mlp_now = [u.mlp_width for u in units]
    removed_so_far = ref.prunable_params - params_before
    moe = any(u.num_experts for u in units)
    kept_experts = [list(range(u.num_experts)) for u in units]
    if budget <= removed_so_far:
        kept_kv = [list(range(n)) for n in kv_now]
        kept_mlp = [list(range(n)) for n in mlp_now]
    elif moe and config.uniform:
        kept_kv = _uniform_kept_kv(units, scores, _uniform_kv_keep(ref, p_a, config))
        attn_removed = sum(u.num_kv_groups - len(k) for u, k in zip(units, kept_kv)) * ca
        kept_mlp, kept_experts = _uniform_moe(units, scores, (budget - removed_so_far - attn_removed) / cm, config)
    elif moe:
        kept_kv = _global_kv(units, scores, round(p_a * n_a) - (n_a - sum(kv_now)), config.min_kv_groups)
        attn_removed_total = (n_a - sum(len(k) for k in kept_kv)) * ca
        mlp_target_total = min(n_m, max(0, round((budget - attn_removed_total) / cm)))
        kept_mlp, kept_experts = _global_moe(units, scores, mlp_target_total - (n_m - sum(mlp_now)), config)
    elif config.uniform:
        kept_kv, kept_mlp = _uniform(units, scores, ref, p_a, budget, config)
    else:
        kept_kv = _global_kv(units, scores, round(p_a * n_a) - (n_a - sum(kv_now)), config.min_kv_groups)
        attn_removed_total = (n_a - sum(len(k) for k in kept_kv)) * ca
        mlp_target_total = min(n_m, max(0, round((budget - attn_removed_total) / cm)))
        kept_mlp = _global_mlp(
            units, scores, mlp_target_total - (n_m - sum(mlp_now)), config.mlp_round_to, config.min_mlp_channels
        )

    layers = [
        LayerPlan(kv_groups_before=kv_now[i], mlp_channels_before=mlp_now[i], kept_kv_groups=kept_kv[i],
                  kept_mlp_channels=kept_mlp[i], label=units[i].label,
                  has_mlp=bool(units[i].mlp_weights), experts_before=units[i].num_experts,
                  kept_experts=kept_experts[i] if units[i].num_experts else None,
                  shared_channels_before=units[i].shared_width)
        for i in range(len(units))
    ]
    params_after = params_before - removed_parameters(
        units, [len(k) for k in kept_kv], [len(k) for k in kept_mlp], [len(e) if e else None for e in kept_experts]
    )
    return PruningPlan(
        layers=layers,
        target_sparsity=s,
        gamma=gamma,
        saliency=saliency,
        uniform=config.uniform,
        dense_prunable_params=ref.prunable_params,
        params_before=params_before,
        params_after=params_after,
        score_summary=scores.summary(),
    )


def _global_kv(units: Sequence[LayerUnits], scores: UnitScores, k: int, min_kv: int) -> list[list[int]]:
    """Remove the k lowest KV groups of the global pool, sparing each layer's best ``min_kv``."""
    flat = _pool_sparing_each_layers_best(scores.attn, min_kv)
    k = max(0, min(k, int(torch.isfinite(flat).sum())))
    removed = _lowest_k(flat, k).tolist()
    return _split_kept(removed, [u.num_kv_groups for u in units])


def _pool_sparing_each_layers_best(per_layer: Sequence[torch.Tensor], n_spared: int) -> torch.Tensor:
    """The layers' scores as one pool, each layer's best ``n_spared`` (all, if fewer) set to +inf."""
    pool = []
    for v in per_layer:
        p = v.double().clone()
        p[_keep_top(v, min(n_spared, v.numel()))] = math.inf
        pool.append(p)
    return torch.cat(pool) if pool else torch.zeros(0, dtype=torch.float64)


def _split_kept(removed_flat: list[int], sizes: list[int]) -> list[list[int]]:
    removed = set(removed_flat)
    kept, offset = [], 0
    for n in sizes:
        kept.append([i for i in range(n) if offset + i not in removed])
        offset += n
    return kept


def _global_mlp(
    units: Sequence[LayerUnits], scores: UnitScores, k: int, round_to: int, min_keep: int = 0
) -> list[list[int]]:
    """Remove ~k lowest MLP channels globally, then round kept widths to multiples of ``round_to``.

    Each layer's best ``min_keep`` channels (a multiple of ``round_to``) are spared. Each pruned
    layer's width is floored to a multiple of ``round_to``; whole blocks are then given back to the
    layers whose best removed block scores highest until the global count is within half a block
    of the target (so the realised sparsity is within one block).
    """
    widths = [u.mlp_width for u in units]
    flat = _pool_sparing_each_layers_best(scores.mlp, min_keep)
    k = max(0, min(k, int(torch.isfinite(flat).sum())))
    layer_of = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
    removed_per_layer = torch.bincount(layer_of[_lowest_k(flat, k)], minlength=len(widths)).tolist()

    keep = list(widths)
    for i, r in enumerate(removed_per_layer):
        if r:
            keep[i] = ((widths[i] - r) // round_to) * round_to
    target_kept = sum(widths) - k
    blocks = round((target_kept - sum(keep)) / round_to)
    candidates, remainders = [], []
    for i, r in enumerate(removed_per_layer):
        if r and keep[i] < widths[i]:
            # a width that is not a multiple of round_to: the step back is the remainder, to the whole width
            step = min(round_to, widths[i] - keep[i])
            order = torch.sort(scores.mlp[i].double(), stable=True, descending=True).indices
            restored = order[keep[i] : keep[i] + step]
            entry = (-float(scores.mlp[i][restored].sum()) / step, i, step)
            (candidates if step == round_to else remainders).append(entry)
    for _, i, step in sorted(candidates)[: max(0, blocks)]:
        keep[i] += step
    # Without this a layer floored below a non-multiple width (e.g. 176 -> 128 with round_to=64 for one
    # channel removed) could not be given back, and the realised sparsity would overshoot the target.
    deficit = target_kept - sum(keep)
    for _, i, step in sorted(remainders):
        if deficit > step / 2:
            keep[i] += step
            deficit -= step
    return [_keep_top(v, n) for v, n in zip(scores.mlp, keep)]


def _global_moe(
    units: Sequence[LayerUnits], scores: UnitScores, k: int, config: AllocationConfig
) -> tuple[list[list[int]], list[list[int]]]:
    """Remove about ``k`` MLP channels of mixture-of-experts layers: ``config.expert_share`` of them as whole
    experts, the rest as channels inside the kept experts and of the shared experts; (kept MLP units, kept experts)
    per layer.

    Both are ranked globally and cost-normalised, by the mean score of the channels that go: an expert by the mean
    of its channels' scores; a width step of a layer's experts (each kept expert's worst remaining channel, since
    the experts of a layer keep one width) by the mean over its kept experts; a step of a shared expert by the score
    of its worst remaining channel. Kept widths are rounded to ``mlp_round_to``.
    """
    grids = [s[: u.expert_units].double().view(u.num_experts, u.channels_per_expert) for u, s in zip(units, scores.mlp)]
    shared = [s[u.expert_units :].double() for u, s in zip(units, scores.mlp)]
    k = max(0, k)
    expert_scores = _expert_scores(grids, scores.expert_load, config.router_load)
    kept_experts, removed = _remove_experts(grids, expert_scores, config.expert_share * k, config.min_experts)
    # each kept expert's channels, best first: width step j of layer i removes column -(j+1) of every kept expert;
    # a shared expert is one more pool of one row
    best_first = [g[kept].sort(dim=1, descending=True, stable=True).values for g, kept in zip(grids, kept_experts)]
    shared_best_first = [v.sort(descending=True, stable=True).values[None, :] for v in shared]
    floors = [_expert_floor(config)] * len(best_first) + [config.min_mlp_channels] * len(shared_best_first)
    keep = _expert_widths(best_first + shared_best_first, k - removed, config, floors)
    expert_keep, shared_keep = keep[: len(units)], keep[len(units) :]
    return [
        [e * g.shape[1] + c for e in kept for c in _keep_top(g[e], n)]
        + [u.expert_units + c for c in _keep_top(v, n_shared)]
        for u, g, kept, n, v, n_shared in zip(units, grids, kept_experts, expert_keep, shared, shared_keep)
    ], kept_experts


def _expert_scores(
    grids: Sequence[torch.Tensor], loads: Sequence[torch.Tensor | None] | None, power: float
) -> list[torch.Tensor]:
    """Each expert's score: the mean score of its channels (cost-normalised), times its share of the layer's routed
    tokens over the mean share, to ``power``, where the load was counted."""
    out = []
    for i, grid in enumerate(grids):
        means = grid.mean(1) if grid.shape[1] else torch.zeros(grid.shape[0], dtype=torch.float64)
        load = loads[i] if loads is not None else None
        if load is not None and power and float(load.sum()) > 0:
            means = means * (load.double() / load.double().mean()) ** power
        out.append(means)
    return out


def _remove_experts(
    grids: Sequence[torch.Tensor], expert_scores: Sequence[torch.Tensor], target: float, min_experts: int
) -> tuple[list[list[int]], int]:
    """Whole experts, lowest score first, until about ``target`` channels are gone (each layer keeps its best
    ``min_experts``): (kept experts per layer, channels removed)."""
    candidates = []
    for i, means in enumerate(expert_scores):
        spared = set(_keep_top(means, min(min_experts, means.numel())))
        candidates += [(float(means[e]), i, e) for e in range(means.numel()) if e not in spared]
    gone: list[set[int]] = [set() for _ in grids]
    removed = 0
    for _, i, e in sorted(candidates):
        width = grids[i].shape[1]
        if width and removed + width / 2 <= target:
            gone[i].add(e)
            removed += width
    return [[e for e in range(g.shape[0]) if e not in out] for g, out in zip(grids, gone)], removed


def _expert_floor(config: AllocationConfig) -> int:
    """Channels every kept expert keeps at least (see :attr:`AllocationConfig.min_mlp_channels`)."""
    return max(config.min_mlp_channels, config.mlp_round_to)


def _expert_widths(
    best_first: Sequence[torch.Tensor], target: float, config: AllocationConfig, floors: Sequence[int]
) -> list[int]:
    """The width every row of each pool keeps (``best_first[p]``: the channel scores of pool p's rows, each sorted
    best first: a layer's kept experts, or its shared expert as one row; at least ``floors[p]`` or its whole width),
    so that about ``target`` channels go: width steps taken lowest mean first, then widths floored to
    ``mlp_round_to`` and whole blocks given back, best first, while the cut stays within half a block of its
    target."""
    steps = []
    for i, ranked in enumerate(best_first):
        step_means = ranked.mean(0) if ranked.shape[0] else ranked.new_zeros(ranked.shape[1])
        first = min(floors[i], ranked.shape[1])
        steps += [(float(step_means[j]), i, -j) for j in range(first, ranked.shape[1])]
    keep = [ranked.shape[1] for ranked in best_first]
    removed = 0
    for _, i, _ in sorted(steps):
        cost = best_first[i].shape[0]  # one channel of every kept expert
        if removed + cost / 2 <= target:
            keep[i] -= 1
            removed += cost
    blocks = []
    for i, ranked in enumerate(best_first):
        width = ranked.shape[1]
        if keep[i] < width:
            keep[i] = min(width, max(floors[i], (keep[i] // config.mlp_round_to) * config.mlp_round_to))
            step = min(config.mlp_round_to, width - keep[i])
            value = float(ranked[:, keep[i]: keep[i] + step].mean()) if ranked.numel() else 0.0
            blocks.append((-value, i, step))
    removed = sum((r.shape[1] - n) * r.shape[0] for r, n in zip(best_first, keep))
    for _, i, step in sorted(blocks):
        cost = step * best_first[i].shape[0]
        if removed - cost / 2 >= target:
            keep[i] += step
            removed -= cost
    return keep


_NOT_UNIFORM = ("uniform=True needs a model whose layers have equal widths; this one was pruned non-uniformly before. "
                "Keep uniform=False for later prune events of a non-uniform model.")


def _uniform_moe(
    units: Sequence[LayerUnits], scores: UnitScores, k: float, config: AllocationConfig
) -> tuple[list[list[int]], list[list[int]]]:
    """:func:`_global_moe` with the same number of experts, of the same width, and the same shared-expert width
    kept in every layer: about ``k`` MLP channels removed in all (``config.expert_share`` of them as whole experts,
    the rest the same fraction of the kept experts' and the shared expert's width), each layer keeping its best."""
    first = units[0]
    shape = (first.num_experts, first.channels_per_expert, first.shared_width)
    if any((u.num_experts, u.channels_per_expert, u.shared_width) != shape for u in units):
        raise ValueError(_NOT_UNIFORM)
    n, width, shared = shape
    per_layer = max(0.0, k / len(units))
    experts_gone = min(n - config.min_experts, round(config.expert_share * per_layer / width)) if width else 0
    experts_keep = n - max(0, experts_gone)
    fraction = max(0.0, per_layer - (n - experts_keep) * width) / (experts_keep * width + shared or 1)
    keep = _uniform_width(width, fraction, config, _expert_floor(config))
    shared_keep = _uniform_width(shared, fraction, config, config.min_mlp_channels)
    kept_mlp, kept_experts = [], []
    grids = [s[: n * width].double().view(n, width) for s in scores.mlp]
    for grid, expert_scores, s in zip(grids, _expert_scores(grids, scores.expert_load, config.router_load), scores.mlp):
        experts = _keep_top(expert_scores, experts_keep)
        kept_experts.append(experts)
        kept_mlp.append([e * width + c for e in experts for c in _keep_top(grid[e], keep)]
                        + [n * width + c for c in _keep_top(s[n * width :], shared_keep)])  # fmt: skip
    return kept_mlp, kept_experts


def _uniform_width(width: int, fraction: float, config: AllocationConfig, floor: int) -> int:
    """The width left of ``width`` channels when about ``fraction`` of them go, rounded to ``mlp_round_to``, at
    least ``floor`` (or the whole width)."""
    keep = width * (1.0 - fraction)
    if fraction > 0:
        keep = round(keep / config.mlp_round_to) * config.mlp_round_to
    return int(min(width, max(min(floor, width), keep)))


def _uniform_kv_keep(ref: DenseReference, p_a: float, config: AllocationConfig) -> int:
    """KV groups every layer keeps in a uniform cut that removes the fraction ``p_a`` of them (of the dense model)."""
    kv_keep = max(config.min_kv_groups, ref.kv_groups_per_layer - round(p_a * ref.kv_groups_per_layer))
    return min(kv_keep, ref.kv_groups_per_layer)  # min_kv_groups >= the groups per layer: MLP only


def _uniform_kept_kv(units: Sequence[LayerUnits], scores: UnitScores, kv_keep: int) -> list[list[int]]:
    """Each layer's best ``kv_keep`` KV groups (at most the ones it has); the layers must have equal widths."""
    if len({u.num_kv_groups for u in units}) > 1:
        raise ValueError(_NOT_UNIFORM)
    return [_keep_top(v, min(kv_keep, units[0].num_kv_groups)) for v in scores.attn]


def _uniform(
    units: Sequence[LayerUnits], scores: UnitScores, ref: DenseReference, p_a: float, budget: float,
    config: AllocationConfig,
) -> tuple[list[list[int]], list[list[int]]]:
    """Same kept width in every layer (a stock config can describe the result)."""
    L = ref.num_layers
    kv_keep = _uniform_kv_keep(ref, p_a, config)
    attn_removed = L * (ref.kv_groups_per_layer - kv_keep) * ref.kv_group_cost
    L_mlp = L if ref.num_mlp_layers is None else ref.num_mlp_layers
    per_layer_removed = max(0.0, (budget - attn_removed) / (L_mlp * ref.mlp_channel_cost))
    mlp_keep = ref.mlp_width - per_layer_removed
    if per_layer_removed > 0:
        round_to = config.mlp_round_to
        lower = math.floor(mlp_keep / round_to) * round_to
        if lower + round_to > ref.mlp_width:
            # width not a multiple of round_to: the choices are `lower` and the whole width, nearest wins
            mlp_keep = ref.mlp_width if ref.mlp_width - mlp_keep < mlp_keep - lower else lower
        else:
            mlp_keep = round(mlp_keep / round_to) * round_to
    mlp_keep = int(max(min(config.min_mlp_channels, ref.mlp_width), min(ref.mlp_width, mlp_keep)))
    mlp_units = [u for u in units if u.mlp_weights]  # T5 cross-attention entries have no MLP
    kept_kv = _uniform_kept_kv(units, scores, kv_keep)
    if len({u.mlp_width for u in mlp_units}) > 1:
        raise ValueError(_NOT_UNIFORM)
    mlp_keep = min(mlp_keep, mlp_units[0].mlp_width if mlp_units else 0)
    kept_mlp = [_keep_top(v, min(mlp_keep, v.numel())) for v in scores.mlp]
    return kept_kv, kept_mlp
