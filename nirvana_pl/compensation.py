"""Compensation: after a plan is chosen, the kept input columns of o_proj / down_proj take over what the removed
ones contributed, as far as the kept inputs predict it.

A removed KV group or MLP channel reaches the rest of the network only through its input columns of the weights
its units own by column (o_proj's for a KV group, down_proj's for an MLP channel; ``axis == 1`` in the adapter's
index map). Its input ``x_R`` is correlated with the inputs ``x_K`` that stay, so the least-squares prediction
``x_R ~ B^T x_K`` on calibration text lets each such weight keep most of the removed columns' output::

    W_K <- W_K + W_R B^T,   B = (G_KK + damping * diag(G_KK))^-1 G_KR,   G = sum over tokens of x x^T

The ridge term is relative to each kept input's own scale, so an input with outlier activations is not damped
less than the others, and it shrinks the update toward no change (damping -> infinity is plain removal). Only
the kept columns change; surgery then removes the others. The same update applies to every linear map of that
input (a LoRA adapter's ``A``, an fp32 master copy of the weight held by DeepSpeed), see :class:`Compensation`.

Each layer is fitted on the activations of the model before the cut (not on what the cut layers before it will
feed it, as sequential schemes do), and fused expert weights of a mixture of experts are left as they are (a
shared expert's down_proj is compensated).

Cost and memory: one forward pass over the batches per group of layers whose Gram matrices (``in_features^2`` fp32
per weight) fit in ``max_gram_bytes`` (one group for a small model; about 16 for an 8B Llama), and one solve per
weight. The updates are held on the CPU until the cut: ``removed x kept`` fp32 per weight (about 6 GB for an 8B
Llama at 35 % of its MLP channels removed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .plan import PruningPlan
from .saliency import GradientReduce, WeightSlice, _num_samples, check_calibration, for_each_input
from .surgery import validate_plan
from .units import LayerUnits

#: ridge on the kept inputs, relative to each one's mean square (larger: the update shrinks toward none, most along
#: the directions the kept inputs vary little in); chosen on a screen of three cross-domain draws at s = 0.2
#: (benchmarks/RESULTS.md, section "Defaults decided by these numbers")
DEFAULT_DAMPING = 1.0
#: the smallest damping accepted: the solve runs in fp32, which a ridge this small still conditions
MIN_DAMPING = 1e-2
#: the Gram matrices collected in one pass over the batches (a 14336-wide down_proj input takes 0.8 GB)
DEFAULT_MAX_GRAM_BYTES = 2 << 30
#: the saliencies whose prune events compensate when ``compensate`` is None: the default's (see the cross-domain
#: matrix in benchmarks/RESULTS.md); the others prune as the paper does unless asked
COMPENSATED_BY_DEFAULT = ("fisher_functional_self",)


class CompensationError(ValueError):
    """Compensation cannot run with these arguments."""


@dataclass
class ColumnUpdate:
    """The update of one weight's kept input columns: ``t[:, kept] += t[:, removed] @ predict`` for the weight and
    every tensor that maps the same input (``predict`` is ``B^T``, ``[removed, kept]``)."""

    kept: torch.Tensor
    removed: torch.Tensor
    predict: torch.Tensor

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (``[out, in]``) with its kept columns updated (a new tensor, same dtype and device)."""
        kept, removed = self.kept.to(t.device), self.removed.to(t.device)
        out = t.clone()
        with torch.autocast(t.device.type, enabled=False):
            moved = t.index_select(1, removed).float() @ self.predict.to(t.device)
        out[:, kept] = (t.index_select(1, kept).float() + moved).to(t.dtype)
        return out


@dataclass
class Compensation:
    """Per parameter (by ``id``) the :class:`ColumnUpdate` of its input columns, for the weights a plan shrinks
    by column; ``tokens``: the (non-padding) tokens of this process's batches the fit read."""

    updates: dict[int, ColumnUpdate]
    params: dict[int, nn.Parameter]
    tokens: int
    damping: float

    def apply_(self, only: Sequence[nn.Parameter] | None = None) -> None:
        """Update the parameters' values in place (``only``: those of them); DeepSpeed updates the fp32 masters
        of the trainable ones itself (:func:`~nirvana_pl.deepspeed.prune_engine`)."""
        for p in self.params.values() if only is None else only:
            with torch.no_grad():
                p.data.copy_(self.updates[id(p)](p.data))

    def summary(self) -> dict[str, Any]:
        return {"weights": len(self.updates), "tokens": self.tokens, "damping": self.damping}


def resolve_compensate(saliency: str, compensate: bool | None) -> bool:
    """``compensate``, or whether ``saliency`` compensates by default (:data:`COMPENSATED_BY_DEFAULT`) when None."""
    return saliency in COMPENSATED_BY_DEFAULT if compensate is None else compensate


def check_compensate(compensate: Any, damping: Any, selector: bool) -> None:
    """Raise a :class:`CompensationError` (naming the fix) for a bad ``compensate`` / ``compensation_damping``."""
    if not isinstance(compensate, bool):
        raise CompensationError(f"compensate={compensate!r} must be True, False or None (the saliency's default).")
    check_damping(damping)
    if compensate and selector:
        raise CompensationError(
            "compensate=True fits the kept columns on the calibration batches, and a CalibrationSelector chooses "
            "those at the prune event; compensation with a selector is not supported yet. Pass the calibration "
            "batches themselves, or compensate=False."
        )


def check_damping(damping: Any) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= MIN_DAMPING:
        raise CompensationError(
            f"compensation_damping={damping!r} must be a number >= {MIN_DAMPING} (the ridge relative to each input's "
            f"mean square; default {DEFAULT_DAMPING}). To turn compensation off, pass compensate=False."
        )


def compensates_anything(model: nn.Module, plan: PruningPlan) -> bool:
    """Whether ``plan`` shrinks any weight :func:`plan_compensation` updates (else it has nothing to fit)."""
    return any(_column_weights(u, lp) for u, lp in zip(validate_plan(model, plan), plan.layers))


def plan_compensation(
    model: nn.Module,
    plan: PruningPlan,
    batches: Iterable[Any],
    damping: float = DEFAULT_DAMPING,
    reduce: GradientReduce | None = None,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
) -> Compensation:
    """The column updates that make the model, cut by ``plan``, lose less of what the removed units computed.

    ``batches``: token-id batches (as for the calibration estimators) whose activations the least squares fit; the
    model must not be cut yet. ``reduce(tensors, n_samples)``: averages per-rank means over data-parallel ranks
    (see :func:`~nirvana_pl.saliency.gradient_reduce`), so every rank computes the same updates. The model's
    weights are not changed (see :meth:`Compensation.apply_`)."""
    check_damping(damping)
    batches = check_calibration(model, batches)
    units = validate_plan(model, plan)
    jobs = [(u, w, kept) for u, lp in zip(units, plan.layers) for w, kept in _column_weights(u, lp)]
    n_samples = _num_samples(batches)
    updates: dict[int, ColumnUpdate] = {}
    params: dict[int, nn.Parameter] = {}
    tokens = 0
    for group in _groups_within(jobs, max_gram_bytes):
        grams, tokens = _grams(model, group, batches)
        # (a weight the batches never reached has no inputs to predict from: a zero Gram, no update)
        means = [grams.pop(id(w)).div_(n_samples) if id(w) in grams else _zeros(w) for _, w, _ in group]
        if reduce is not None:
            reduce(means, n_samples)
        for (_, w, kept), gram in zip(group, means):
            with torch.autocast(gram.device.type, enabled=False):
                update = _column_update(gram, w.index_map.indices(kept), damping)
            for p, axis in w.unit_parameters():
                if axis == 1:
                    updates[id(p)], params[id(p)] = update, p
        del grams, means  # (before the next group's are collected)
    return Compensation(updates, params, tokens, float(damping))


def _column_weights(u: LayerUnits, lp: Any) -> list[tuple[WeightSlice, list[int]]]:
    """The weights of layer ``u`` its units own by column (not fused experts) that the plan shrinks, with their
    kept units."""
    out = []
    for weights, kept in ((u.attn_weights, lp.kept_kv_groups), (u.mlp_weights, lp.kept_mlp_channels)):
        for w in weights:
            local = w.local_units(kept)
            # (a weight cut to no columns has none to update)
            if w.axis == 1 and not w.experts and w.param == "weight" and 0 < len(local) < w.num_units:
                out.append((w, local))
    return out


def _zeros(w: WeightSlice) -> torch.Tensor:
    n = w.linear.in_features
    return torch.zeros(n, n, device=w.weight.device)


def _groups_within(jobs: Sequence[tuple], max_bytes: int) -> list[list[tuple]]:
    """``jobs`` in consecutive groups whose Gram matrices (fp32, in_features^2 each) fit in ``max_bytes`` (at least
    one weight per group)."""
    groups: list[list[tuple]] = []
    size = 0
    for job in jobs:
        need = 4 * job[1].linear.in_features ** 2
        if not groups or size + need > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += need
    return groups


def _grams(model: nn.Module, group: Sequence[tuple], batches: Sequence[dict[str, torch.Tensor]]) -> tuple[dict, int]:
    """Per weight of ``group`` (by ``id``): the sum over the batches' tokens of ``x x^T`` of its input; and the
    number of tokens (padding excluded)."""
    grams: dict[int, torch.Tensor] = {}
    tokens = {"n": 0}
    first = id(group[0][1])

    def add(w: WeightSlice, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):  # (a bf16 fit's autocast would round the sums)
            g = x.T @ x
        if id(w) in grams:
            grams[id(w)].add_(g)
        else:
            grams[id(w)] = g
        if id(w) == first:
            tokens["n"] += int((x != 0).any(1).sum())

    for_each_input(model, [(u, w) for u, w, _ in group], batches, add)
    return grams, tokens["n"]


def _column_update(gram: torch.Tensor, kept: torch.Tensor, damping: float) -> ColumnUpdate:
    """The ridge regression of the removed inputs on the kept ones, from their Gram matrix ``[in, in]``.

    Solved on the correlation scale (each kept input divided by its root mean square), where the system is
    ``C + damping * I`` with C a correlation matrix: eigenvalues in [damping, n + damping], so fp32 is enough."""
    n = gram.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=gram.device)
    keep[kept.to(gram.device)] = True
    k_idx, r_idx = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    g = gram.float()
    scale = g.diagonal()[k_idx].clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    corr = g[k_idx][:, k_idx] / (scale[:, None] * scale[None, :])
    corr.diagonal().add_(damping)
    rhs = g[k_idx][:, r_idx] / scale[:, None]
    solved = torch.linalg.solve(corr, rhs) / scale[:, None]  # B: [kept, removed]
    # (on the CPU: a large model's updates of every layer are held until the cut)
    return ColumnUpdate(kept=k_idx.cpu(), removed=r_idx.cpu(), predict=solved.T.contiguous().cpu())
