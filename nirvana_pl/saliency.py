"""Saliency estimators: per-weight saliency reduced to one score per prunable unit.

Every estimator returns :class:`UnitScores` (fp32, one vector per layer and unit kind).
A unit's score is the L1 sum of its weights' saliency: row sums for q, k, v, gate, up and
column sums for o, down (METHOD.md section 2). Biases are not scored.

* ``functional``  |G * W| with G = dF/dW, F = mean_{b,v} max_t logits[b,t,v]  (label free)
* ``adam_taylor``  |W| * sqrt(v_hat)     read from the optimizer's Adam state
* ``adam_fisher``  W^2 * v_hat
* ``adam_momentum`` |W * m_hat|
* ``fisher_functional``  sqrt(adam_fisher * functional) per unit: the loss curvature the training saw and
  the output functional of the paper, on the warm-up's own batches (or ``calibration``); a unit goes only
  when both rank it low (see benchmarks/RESULTS.md, cross-domain)
* ``fisher_functional_self``  the same hybrid, with both halves also on windows the model samples itself
  (:mod:`nirvana_pl.sampling`, shaped like the warm-up batches): the Fisher half sqrt(adam_fisher * loss Fisher),
  the loss Fisher W^2 * mean(g^2) of the language-model loss on the sampled windows; the functional half on the
  warm-up batches and the sampled windows, half each. Text of the model's own distribution keeps units that the warm-up
  domain does not use (see benchmarks/RESULTS.md, cross-domain)
* baselines: ``magnitude`` |W|, ``wanda_sp`` |W| * ||x||, ``taylor_loss`` |dLoss/dW * W|,
  ``random``.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .arch import Architecture, architecture_of
from .router_load import RouterLoad
from .sampling import sample_like
from .units import LayerUnits, WeightSlice, find_units

ADAM_ESTIMATORS = ("adam_taylor", "adam_fisher", "adam_momentum")
CALIBRATION_ESTIMATORS = ("functional", "taylor_loss", "wanda_sp")
DATA_FREE_ESTIMATORS = ("magnitude", "random")
#: estimators that combine an Adam-state score and a calibration one: name -> (Adam-state part, calibration part)
HYBRID_ESTIMATORS = {
    "fisher_functional": ("adam_fisher", "functional"),
    "fisher_functional_self": ("adam_fisher", "functional"),
}
#: hybrids that also score windows the model samples itself (see :mod:`nirvana_pl.sampling`)
SELF_SAMPLING_ESTIMATORS = ("fisher_functional_self",)
ESTIMATORS = ADAM_ESTIMATORS + CALIBRATION_ESTIMATORS + DATA_FREE_ESTIMATORS + tuple(HYBRID_ESTIMATORS)


def adam_part(saliency: str) -> str | None:
    """The Adam-state estimator ``saliency`` reads during the warm-up window (itself or its hybrid part), or None."""
    if saliency in ADAM_ESTIMATORS:
        return saliency
    return HYBRID_ESTIMATORS[saliency][0] if saliency in HYBRID_ESTIMATORS else None


def needs_calibration(saliency: str) -> bool:
    """Whether ``saliency`` runs forward/backward passes on calibration batches at the prune event."""
    return saliency in CALIBRATION_ESTIMATORS or saliency in HYBRID_ESTIMATORS


class SaliencyError(RuntimeError):
    """Saliency cannot be computed as configured."""


@dataclass
class UnitScores:
    """fp32 scores, ``attn[l]`` of shape (kv_groups_l,), ``mlp[l]`` of shape (mlp_width_l,).

    ``expert_load``: for a mixture-of-experts model, the tokens routed to each expert (``[experts_l]``, None for a
    layer without experts) while the scores were taken, when they were counted (see :mod:`nirvana_pl.router_load`).
    """

    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    expert_load: list[torch.Tensor | None] | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind, vecs in (("attn", self.attn), ("mlp", self.mlp)):
            flat = torch.cat([v.flatten() for v in vecs]) if vecs else torch.zeros(0)
            if flat.numel():
                out[kind] = {
                    "min": float(flat.min()),
                    "median": float(flat.median()),
                    "mean": float(flat.mean()),
                    "max": float(flat.max()),
                    "per_layer_mean": [float(v.mean()) if v.numel() else 0.0 for v in vecs],
                }
        if self.expert_load is not None:  # tokens routed to each expert while the scores were taken
            out["expert_load"] = [None if c is None else [int(x) for x in c.round().tolist()] for c in self.expert_load]
        return out

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"attn": [t.clone() for t in self.attn], "mlp": [t.clone() for t in self.mlp]}


def geometric_mean(a: UnitScores, b: UnitScores) -> UnitScores:
    """``sqrt(a * b)`` per unit (computed in fp64): high only where both scores are high.

    Each pool is ranked on its own, so the scales of ``a`` and ``b`` do not matter, only their order.
    """
    if [t.shape for t in a.attn + a.mlp] != [t.shape for t in b.attn + b.mlp]:
        raise SaliencyError("the two scores of a hybrid estimator were taken on models of different shapes.")

    def gm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.double().clamp_min(0) * y.to(x.device).double().clamp_min(0)).sqrt().float()

    return UnitScores(attn=[gm(x, y) for x, y in zip(a.attn, b.attn)], mlp=[gm(x, y) for x, y in zip(a.mlp, b.mlp)],
                      expert_load=a.expert_load if a.expert_load is not None else b.expert_load)


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise ValueError(f"saliency={name!r} is not known; choose one of {', '.join(ESTIMATORS)}.")


def check_num_sampled_batches(num_sampled_batches: int | None) -> None:
    """Raise a ValueError unless ``num_sampled_batches`` is None or an integer >= 1."""
    if num_sampled_batches is not None and not (
        isinstance(num_sampled_batches, int) and not isinstance(num_sampled_batches, bool) and num_sampled_batches >= 1
    ):
        raise ValueError(
            f"num_sampled_batches={num_sampled_batches!r} must be an integer >= 1 (or None: as many as the "
            "calibration batches)."
        )


# ---------------------------------------------------------------------------------------
# reduction of per-weight saliency to units
# ---------------------------------------------------------------------------------------
def _reduce_to_units(w: WeightSlice, per_row: torch.Tensor) -> torch.Tensor:
    """``per_row``: saliency summed over the non-unit axis, one entry per unit row/column."""
    return w.per_unit(per_row)


def _per_weight_scores(
    units: Sequence[LayerUnits], saliency_of: Callable[[WeightSlice], torch.Tensor]
) -> UnitScores:
    """Apply ``saliency_of(w)`` (returns per-row sums along w's unit axis) to every weight."""
    return _per_weight_scores_of_kinds(units, lambda w: [saliency_of(w)], 1)[0]


def _per_weight_scores_of_kinds(
    units: Sequence[LayerUnits], saliencies_of: Callable[[WeightSlice], Sequence[torch.Tensor]], n_kinds: int
) -> list[UnitScores]:
    """:func:`_per_weight_scores` for ``n_kinds`` saliencies computed together, visiting each weight once."""
    attn: list[list[torch.Tensor]] = [[] for _ in range(n_kinds)]
    mlp: list[list[torch.Tensor]] = [[] for _ in range(n_kinds)]
    for layer in units:
        for pools, weights, n_units in (
            (attn, layer.attn_weights, layer.num_kv_groups),
            (mlp, layer.mlp_weights, layer.mlp_width),
        ):
            sums = [torch.zeros(n_units) for _ in range(n_kinds)]
            for w in weights if n_units else ():  # (an MLP pruned to width 0 has nothing to score)
                for total, row in zip(sums, saliencies_of(w)):
                    total[w.unit_offset : w.pool_end] += _reduce_to_units(w, row)
            for pool, total in zip(pools, sums):
                pool.append(total)
    return [UnitScores(a, m) for a, m in zip(attn, mlp)]


def _sum_other_axis(w: WeightSlice, per_weight: torch.Tensor) -> torch.Tensor:
    return per_weight.sum(dim=w.summed_axis, dtype=torch.float32)


def _rowdot(w: WeightSlice, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over the non-unit axis of a*b, without materialising a fp32 copy of a*b twice."""
    return torch.linalg.vecdot(a.float(), b.float(), dim=w.summed_axis)


# ---------------------------------------------------------------------------------------
# data-free estimators
# ---------------------------------------------------------------------------------------
def magnitude_scores(model: nn.Module) -> UnitScores:
    with torch.no_grad():
        return _per_weight_scores(find_units(model), lambda w: _sum_other_axis(w, w.effective_weight().abs()))


def random_scores(model: nn.Module, seed: int = 0) -> UnitScores:
    gen = torch.Generator().manual_seed(seed)
    units = find_units(model)
    return UnitScores(
        attn=[torch.rand(u.num_kv_groups, generator=gen) for u in units],
        mlp=[torch.rand(u.mlp_width, generator=gen) for u in units],
    )


# ---------------------------------------------------------------------------------------
# Adam-state estimators (training-integrated)
# ---------------------------------------------------------------------------------------
# (weight, {"exp_avg", "exp_avg_sq", "step"}, param group with "betas") of one parameter
AdamStateReader = Callable[[nn.Parameter], "tuple[torch.Tensor, dict, dict | None]"]


class AdamStateSaliency:
    """Mean over optimizer steps of a per-unit saliency read from Adam's moments.

    Only the per-unit fp32 accumulators live between steps; no per-weight copies.
    """

    def __init__(self, kind: str):
        if kind not in ADAM_ESTIMATORS:
            raise ValueError(f"{kind!r} is not an Adam-state estimator ({', '.join(ADAM_ESTIMATORS)}).")
        self.kind = kind
        self.total: UnitScores | None = None
        self.steps = 0

    def reset(self) -> None:
        self.total, self.steps = None, 0

    def accumulate(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        reader: AdamStateReader | None = None,
    ) -> None:
        """Add the saliency of the current weights and Adam moments (one optimizer step).

        ``reader`` replaces the lookup in ``optimizer.state`` where the state is partitioned
        (DeepSpeed ZeRO): it is called once per weight, in the same order on every rank.
        """
        accumulate_adam_saliency([self], model, optimizer, reader)

    def add(self, scores: UnitScores) -> None:
        """Add one optimizer step's per-unit scores."""
        if self.total is None:
            self.total = scores
        else:
            if [t.shape for t in self.total.attn] != [t.shape for t in scores.attn] or [
                t.shape for t in self.total.mlp
            ] != [t.shape for t in scores.mlp]:
                raise SaliencyError("model shapes changed during a warm-up window; call reset() after pruning")
            for acc, new in zip(self.total.attn + self.total.mlp, scores.attn + scores.mlp):
                acc += new
        self.steps += 1

    def scores(self) -> UnitScores:
        if self.total is None or self.steps == 0:
            raise SaliencyError(
                f"saliency={self.kind!r} has no accumulated steps: the warm-up window saw no "
                "optimizer step. Increase warmup_steps or move the prune step later."
            )
        return UnitScores(
            attn=[t / self.steps for t in self.total.attn], mlp=[t / self.steps for t in self.total.mlp]
        )

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, "total": self.total.state_dict() if self.total else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kind, self.steps = state["kind"], state["steps"]
        t = state["total"]
        # copies: accumulate() adds in place, which must not change the caller's tensors
        self.total = None
        if t is not None:
            self.total = UnitScores([a.clone() for a in t["attn"]], [m.clone() for m in t["mlp"]])


@torch.no_grad()
def accumulate_adam_saliency(
    accumulators: Sequence[AdamStateSaliency],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    reader: AdamStateReader | None = None,
) -> None:
    """One optimizer step for several Adam-state estimators, reading each weight's state once.

    ``reader``: see :meth:`AdamStateSaliency.accumulate`; with several estimators it is still called
    once per weight (under DeepSpeed ZeRO each call is a set of collectives).
    """
    if not accumulators:
        return
    units = find_units(model)
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    param_group: dict[nn.Parameter, dict] = {}
    state: dict = {}
    if reader is None:
        for opt in optimizers:
            param_group.update(_param_groups_by_param(opt))
            state.update(opt.state)
    opt_names = ", ".join(type(o).__name__ for o in optimizers) or "none"
    names = ", ".join(repr(a.kind) for a in accumulators)

    def saliencies_of(w: WeightSlice) -> list[torch.Tensor]:
        p = w.weight
        if reader is not None:  # partitioned state (DeepSpeed ZeRO), read collectively
            wt, st, group = reader(p)
        else:
            wt, st, group = w.effective_weight(), state.get(p, {}), param_group.get(p)
        if group is None or not p.requires_grad:
            raise SaliencyError(_not_trained_message(accumulators[0].kind, f"{w.name} (shape {tuple(p.shape)})", w))
        if "exp_avg_sq" not in st or "exp_avg" not in st:
            raise SaliencyError(
                f"saliency {names} found no Adam state for {w.name}: the optimizer "
                f"({opt_names}) has not stepped yet or is not Adam-like. Start "
                "the warm-up after the first optimizer step, use torch.optim.Adam/AdamW, or "
                "use saliency='functional'."
            )
        if "step" not in st:
            raise SaliencyError(
                f"saliency {names}: the state of {w.name} has no 'step' count ({opt_names}), so Adam's "
                "bias correction cannot be applied. Use torch.optim.Adam/AdamW or saliency='functional'."
            )
        return [_adam_saliency(a.kind, w, wt, st, group) for a in accumulators]

    for accumulator, scores in zip(accumulators, _per_weight_scores_of_kinds(units, saliencies_of, len(accumulators))):
        accumulator.add(scores)


def _adam_saliency(kind: str, w: WeightSlice, wt: torch.Tensor, st: dict, group: dict) -> torch.Tensor:
    """Per-row sums along ``w``'s unit axis of one Adam-state saliency, bias-corrected."""
    step = float(st["step"])
    b1, b2 = group["betas"]
    if kind == "adam_taylor":
        corr = (1.0 - b2**step) ** -0.5
        return _rowdot(w, wt.abs(), st["exp_avg_sq"].sqrt()) * corr
    if kind == "adam_fisher":
        corr = 1.0 / (1.0 - b2**step)
        return _rowdot(w, wt.float().square(), st["exp_avg_sq"]) * corr
    corr = 1.0 / (1.0 - b1**step)
    return _sum_other_axis(w, (wt.float() * st["exp_avg"].float()).abs()) * corr


def check_adam_optimizers(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], saliency: str) -> None:
    """Fail before training when Adam-state saliency cannot work with these optimizers."""
    groups: dict[nn.Parameter, dict] = {}
    for opt in optimizers:
        groups.update(_param_groups_by_param(opt))
    for layer in find_units(model):
        for w in layer.attn_weights + layer.mlp_weights:
            if w.weight not in groups or not w.weight.requires_grad:
                raise SaliencyError(_not_trained_message(saliency, f"layer {layer.index} {w.name}", w))


def _not_trained_message(saliency: str, where: str, w: WeightSlice) -> str:
    why = (
        "is the frozen base weight of a LoRA layer, which has no Adam state"
        if w.adapters
        else "is frozen or in no optimizer"
    )
    return (
        f"saliency={saliency!r} reads the Adam state of the weights, but {where} {why}. Use "
        "saliency='functional' (the callback scores it on the warm-up window's batches; prune() takes "
        "calibration=[...]): it takes base-weight gradients for the calibration backward only and leaves nothing "
        "behind."
    )


def _param_groups_by_param(optimizer: torch.optim.Optimizer) -> dict[nn.Parameter, dict]:
    out = {}
    for group in optimizer.param_groups:
        if "betas" not in group:
            raise SaliencyError(
                f"Adam-state saliency (adam_taylor/adam_fisher/adam_momentum) needs an Adam-family optimizer "
                f"(param groups with 'betas'); got "
                f"{type(optimizer).__name__}. Use torch.optim.Adam/AdamW or saliency='functional'."
            )
        for p in group["params"]:
            out[p] = group
    return out


# ---------------------------------------------------------------------------------------
# calibration-based estimators
# ---------------------------------------------------------------------------------------
def normalize_batch(
    batch: Any, index: int, max_positions: int | None = None, architecture: Architecture | None = None
) -> dict[str, torch.Tensor]:
    """A calibration batch as ``{"input_ids": LongTensor[B, T], "attention_mask"?: ...}``.

    ``architecture``: the model's adapter; the batch also keeps its ``batch_keys`` (an encoder-decoder
    model's ``labels`` / ``decoder_input_ids`` / ``decoder_attention_mask``), checked by it.
    """
    keys = ("input_ids", "attention_mask") + (architecture.batch_keys if architecture is not None else ())
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    elif isinstance(batch, dict) and "input_ids" in batch:
        batch = {k: batch[k] for k in keys if k in batch and batch[k] is not None}
    else:
        raise ValueError(
            f"calibration batch {index} is a {type(batch).__name__}; expected a LongTensor of token ids "
            "with shape [batch, seq_len] or a dict with 'input_ids' (and optionally 'attention_mask')."
        )
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        dtype = getattr(ids, "dtype", None)
        raise ValueError(
            f"calibration batch {index}: input_ids has shape {shape} and dtype {dtype}; expected an integer "
            "tensor of shape [batch, seq_len] (add a batch dimension with ids.unsqueeze(0))."
        )
    if ids.numel() == 0:
        raise ValueError(f"calibration batch {index} is empty (shape {tuple(ids.shape)}).")
    if max_positions is not None and ids.shape[1] > max_positions:
        raise ValueError(
            f"calibration batch {index} has seq_len {ids.shape[1]} > the model's max_position_embeddings "
            f"{max_positions}; cut the windows to at most {max_positions} tokens."
        )
    mask = batch.get("attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(
            f"calibration batch {index}: attention_mask shape {tuple(mask.shape)} differs from input_ids "
            f"shape {tuple(ids.shape)}."
        )
    if architecture is not None:
        architecture.check_batch(batch, index)
    return batch


def check_calibration(model: nn.Module, batches: Iterable[Any]) -> list[dict[str, torch.Tensor]]:
    """Validate and normalise calibration batches (raises with the fix on bad input)."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    arch = architecture_of(model)
    out = [normalize_batch(b, i, max_pos, arch) for i, b in enumerate(batches)]
    if not out:
        raise ValueError("calibration is empty; pass at least one batch of token ids.")
    return out


@contextlib.contextmanager
def eval_mode(model: nn.Module, trainable: Sequence[nn.Parameter] = ()) -> Iterator[None]:
    """Eval mode (no dropout) and requires_grad on ``trainable``; both restored on exit.

    Each module's own mode is restored (not ``model.train(flag)``): a fit may hold frozen parts in eval.
    """
    params = list(trainable)
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode, not just the root's
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, training in modes:
            m.training = training


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def output_functional(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """F = mean over samples b and vocabulary v of max over positions t of logits[b, t, v]."""
    logits = logits.float()
    if attention_mask is not None:
        logits = logits.masked_fill(~attention_mask.bool()[..., None], float("-inf"))
    return logits.amax(dim=1).mean()


GradientReduce = Callable[[Sequence[torch.Tensor], int], None]
_GRADIENT_REDUCE: contextvars.ContextVar[GradientReduce | None] = contextvars.ContextVar(
    "nirvana_gradient_reduce", default=None
)


@contextlib.contextmanager
def gradient_reduce(reduce: GradientReduce | None) -> Iterator[None]:
    """Use ``reduce`` in every gradient saliency (``functional``, ``taylor_loss``) and ``wanda_sp`` inside the block.

    ``reduce(grads, n_samples)`` receives the signed per-weight gradients (fp32, each the mean
    over this process's ``n_samples`` calibration samples) and must replace them in place by
    the mean over all processes' samples, BEFORE the absolute value is taken (e.g. an
    all-reduce across data-parallel ranks; see ``nirvana_pl.distributed``). ``wanda_sp`` passes
    its per-sample mean squared activation norms through the same hook.
    """
    token = _GRADIENT_REDUCE.set(reduce)
    try:
        yield
    finally:
        _GRADIENT_REDUCE.reset(token)


def _num_samples(batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """How many samples (rows) ``batches`` hold together."""
    return sum(b["input_ids"].shape[0] for b in batches)


def _gradient_saliency(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    objective: str,
    progress: bool = False,
    reduce: GradientReduce | None = None,
    batch_weights: Sequence[float] | None = None,
) -> UnitScores:
    """|G * W| with G the signed gradient of ``objective`` averaged over all samples (``batch_weights``: each
    batch's weight in that average, summing to 1; default: its share of the samples).

    ``objective``: ``functional`` (the output functional), ``taylor_loss`` (the language-model loss), or
    ``loss_fisher``: W^2 * the mean over batches of the squared gradient of the loss (the Fisher that
    ``adam_fisher`` reads from Adam's v_hat, from passes instead of steps).
    ``reduce`` (default: the one set by :func:`gradient_reduce`, else none) combines the signed
    averaged gradients (the mean squares, for ``loss_fisher``) across processes before the absolute value.
    """
    units = find_units(model)
    weights = [w for layer in units for w in layer.attn_weights + layer.mlp_weights]
    params = [w.weight for w in weights]
    device = params[0].device
    arch = architecture_of(model)
    squared = objective == "loss_fisher"
    n_total = _num_samples(batches)
    grads = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=f"nirvana-pl {objective} saliency", leave=False)
    load = RouterLoad() if any(u.num_experts for u in units) else None
    if load is not None:
        load.attach(model)
    with eval_mode(model, params), contextlib.ExitStack() as stack:
        if load is not None:
            stack.callback(load.detach)
        for index, batch in enumerate(it):
            # (an encoder-decoder model: teacher-forced decoder logits / the seq2seq loss)
            inputs = arch.model_inputs(model, _to_device(batch, device), with_labels=objective != "functional")
            if objective == "functional":
                value = output_functional(model(**inputs.kwargs, use_cache=False).logits, inputs.output_mask)
            else:
                value = model(**inputs.kwargs, labels=inputs.labels, use_cache=False).loss
            weight = batch["input_ids"].shape[0] / n_total if batch_weights is None else batch_weights[index]
            for acc, g in zip(grads, torch.autograd.grad(value, params, allow_unused=True)):
                if g is not None:
                    acc.add_(g.float().square() if squared else g.float(), alpha=weight)
            del value
    loads = load.loads() if load is not None else None
    counts = [c.float().to(device) for c in loads if c is not None] if loads is not None else []
    reduce = reduce if reduce is not None else _GRADIENT_REDUCE.get()
    if reduce is not None:
        reduce(grads + counts, n_total)  # (the routed-token counts too: a share of the load over every process)
    by_param = {id(p): g for p, g in zip(params, grads)}
    scores = _gradient_times_weight(units, by_param, squared)
    if loads is not None:
        reduced = iter(counts)
        scores.expert_load = [None if c is None else next(reduced).double().cpu() for c in loads]
    return scores


def _gradient_times_weight(
    units: Sequence[LayerUnits], grad_of: dict[int, torch.Tensor], squared: bool
) -> UnitScores:
    """Per unit, the sum over its weights of |G * W| (``squared``: of G2 * W^2, G2 a mean squared gradient)."""

    def saliency_of(w: WeightSlice) -> torch.Tensor:
        g, weight = grad_of[id(w.weight)], w.effective_weight().float()
        return _sum_other_axis(w, g * weight.square() if squared else (g * weight).abs())

    with torch.no_grad():
        return _per_weight_scores(units, saliency_of)


def wanda_sp_scores(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], reduce: GradientReduce | None = None
) -> UnitScores:
    """|W_ij| * ||x_j|| with x the input activations of each linear over the calibration tokens.

    ``||x_j||`` is the 2-norm over the tokens divided by sqrt(number of calibration samples), which
    ranks the same and lets ``reduce`` (default: the one set by :func:`gradient_reduce`) average the
    squared norms over every process's samples, so all data-parallel ranks score the same data.
    """
    units = find_units(model)
    if any(u.num_experts for u in units):
        raise SaliencyError(
            "saliency='wanda_sp' weighs each weight by its linear's input activations, which a fused expert tensor "
            "does not have per expert; use 'functional', an Adam-state estimator or 'magnitude' for this "
            "mixture-of-experts model."
        )
    sq = _input_square_sums(model, units, batches)
    n_samples = _num_samples(batches)
    linears = list(sq)
    mean_sq = [sq[k] / n_samples for k in linears]
    reduce = reduce if reduce is not None else _GRADIENT_REDUCE.get()
    if reduce is not None:
        reduce(mean_sq, n_samples)
    sq = dict(zip(linears, mean_sq))

    def saliency_of(w: WeightSlice) -> torch.Tensor:
        norm = sq[id(w.linear)].sqrt()
        W = w.effective_weight().float().abs()
        if w.axis == 0:
            return W @ norm
        return W.sum(0) * norm

    with torch.no_grad():
        return _per_weight_scores(units, saliency_of)


def _input_square_sums(
    model: nn.Module, units: Sequence[LayerUnits], batches: Sequence[dict[str, torch.Tensor]]
) -> dict[int, torch.Tensor]:
    """For each linear of ``units`` (keyed by ``id``): the per-input-feature sum of squared activations
    over the calibration tokens of ``batches``, padded positions excluded."""
    sq: dict[int, torch.Tensor] = {}

    def add(w: WeightSlice, x: torch.Tensor) -> None:
        s = x.square().sum(0)
        acc = sq.get(id(w.linear))
        sq[id(w.linear)] = s if acc is None else acc + s

    weights = [(layer, w) for layer in units for w in layer.attn_weights + layer.mlp_weights]
    for_each_input(model, weights, batches, add)
    return sq


def for_each_input(
    model: nn.Module,
    weights: Sequence[tuple[LayerUnits, WeightSlice]],
    batches: Sequence[dict[str, torch.Tensor]],
    on_input: Callable[[WeightSlice, torch.Tensor], None],
) -> None:
    """Run ``batches`` through ``model`` (eval mode, no gradients) and call ``on_input(w, x)`` with the input of each
    weight's linear: ``x`` ``[tokens, in_features]`` in fp32, padded positions zeroed (they carry no signal)."""
    hooks = []
    # padding masks of the batch in flight, per input sequence (encoder-decoder models have two)
    current: dict[str, torch.Tensor | None] = {}
    arch = architecture_of(model)

    def make_hook(w: WeightSlice, stream: str):
        def hook(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if current.get(stream) is not None:
                x = x * current[stream].reshape(-1, 1).to(x)
            on_input(w, x)

        return hook

    for layer, w in weights:
        hooks.append(w.linear.register_forward_pre_hook(make_hook(w, layer.input_stream(w))))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = (embeddings.weight if embeddings is not None else weights[0][1].weight).device  # where the ids go in
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                inputs = arch.model_inputs(model, _to_device(batch, device))
                current.clear()
                current.update(inputs.stream_masks)  # published for the hooks
                model(**inputs.kwargs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def compute_scores(
    model: nn.Module,
    saliency: str,
    calibration: Iterable[Any] | None = None,
    optimizer_scores: UnitScores | None = None,
    seed: int = 0,
    progress: bool = False,
    reduce: GradientReduce | None = None,
    rank: int = 0,
    num_sampled_batches: int | None = None,
    sampled: Sequence[dict[str, torch.Tensor]] | None = None,
) -> UnitScores:
    """One entry point for all estimators that do not need a training run.

    ``reduce``: see :func:`gradient_reduce` (gradient estimators and ``wanda_sp``). ``rank``: this process's
    data-parallel rank; ``fisher_functional_self`` samples different windows on each rank (seeded by ``seed`` and
    ``rank``), whose gradients ``reduce`` averages. ``num_sampled_batches``: how many batches of windows
    ``fisher_functional_self`` samples, shaped like the calibration batches in turn (default: as many as there are
    calibration batches). ``sampled``: for ``fisher_functional_self``, the windows :func:`self_sampled_windows`
    sampled from ``model`` as it is now (so a caller that also needs them samples once); None: sampled here.

    Adam-state estimators cannot be computed here: they need the mean over a warm-up
    window (see :class:`AdamStateSaliency`), whose result is passed as ``optimizer_scores``.
    """
    check_estimator(saliency)
    _check_sampled(saliency, sampled)
    if adam_part(saliency) is not None and optimizer_scores is None:
        raise SaliencyError(
            f"saliency={saliency!r} reads the optimizer's Adam state during training; it is not "
            "available in one-shot prune(). Use saliency='functional' with calibration batches, or "
            "NirvanaPruningCallback inside a fit."
        )
    if saliency in ADAM_ESTIMATORS:
        return optimizer_scores
    if saliency in SELF_SAMPLING_ESTIMATORS:
        return _self_sampled_hybrid(
            model, calibration, optimizer_scores, seed, rank, progress, reduce, num_sampled_batches, sampled
        )
    if saliency in HYBRID_ESTIMATORS:
        part = HYBRID_ESTIMATORS[saliency][1]
        calibrated = compute_scores(model, part, calibration, seed=seed, progress=progress, reduce=reduce)
        return geometric_mean(optimizer_scores, calibrated)
    if saliency == "magnitude":
        return magnitude_scores(model)
    if saliency == "random":
        return random_scores(model, seed)
    if calibration is None:
        raise ValueError(
            f"saliency={saliency!r} needs calibration batches: pass calibration=[LongTensor[B, T], ...]."
        )
    batches = check_calibration(model, calibration)
    if saliency == "wanda_sp":
        return wanda_sp_scores(model, batches, reduce=reduce)
    return _gradient_saliency(model, batches, saliency, progress=progress, reduce=reduce)


def _check_sampled(saliency: str, sampled: Sequence[dict[str, torch.Tensor]] | None) -> None:
    """``compute_scores``' ``sampled``: None, or at least one batch for a saliency that samples its windows."""
    if sampled is None:
        return
    if saliency not in SELF_SAMPLING_ESTIMATORS:
        raise ValueError(f"saliency={saliency!r} samples no windows of its own: pass sampled=None.")
    if not len(sampled):
        raise ValueError("sampled holds no windows: pass at least one batch, or sampled=None to sample them here.")


def _self_sampled_hybrid(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    optimizer_scores: UnitScores,
    seed: int,
    rank: int,
    progress: bool,
    reduce: GradientReduce | None,
    num_sampled_batches: int | None,
    sampled: Sequence[dict[str, torch.Tensor]] | None,
) -> UnitScores:
    """``fisher_functional_self``: the model samples ``num_sampled_batches`` batches of windows shaped like the
    calibration batches in turn (default: one per calibration batch), scored by :func:`self_sampled_scores`;
    ``sampled``: those windows, sampled already."""
    if calibration is None:
        raise ValueError(
            "saliency='fisher_functional_self' needs the warm-up window's batches (or calibration=[...]) to score "
            "and to copy the shapes of its sampled windows from."
        )
    batches = check_calibration(model, calibration)
    if sampled is None:
        sampled = self_sampled_windows(model, batches, seed, rank, num_sampled_batches, progress)
    return self_sampled_scores(model, batches, sampled, optimizer_scores, progress=progress, reduce=reduce)


def self_sampled_windows(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    seed: int,
    rank: int = 0,
    num_sampled_batches: int | None = None,
    progress: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """The windows ``fisher_functional_self`` samples: ``num_sampled_batches`` batches (default: one per batch of
    ``batches``) shaped like ``batches`` in turn, sampled by ``model`` (see :func:`~nirvana_pl.sampling.sample_like`;
    the same arguments give the same windows)."""
    check_num_sampled_batches(num_sampled_batches)
    shapes = [batches[i % len(batches)] for i in range(num_sampled_batches or len(batches))]
    return sample_like(model, shapes, seed, rank=rank, progress=progress)


def self_sampled_scores(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    sampled: Sequence[dict[str, torch.Tensor]],
    optimizer_scores: UnitScores,
    progress: bool = False,
    reduce: GradientReduce | None = None,
) -> UnitScores:
    """The ``fisher_functional_self`` scores of the calibration ``batches`` and the model's own ``sampled`` windows:
    sqrt(sqrt(adam_fisher * loss Fisher on the sampled windows) * functional on both texts, half each).

    The functional's gradient is the mean of the calibration batches' and the sampled windows' mean gradients, so
    more sampled windows make its estimate vary less without shifting the balance between the two texts (with as
    many samples of each, the same as one mean over all of them)."""
    batches, sampled = list(batches), list(sampled)
    fisher = _gradient_saliency(model, sampled, "loss_fisher", progress=progress, reduce=reduce)
    weights = []
    for half in (batches, sampled):
        n_half = _num_samples(half)
        weights += [b["input_ids"].shape[0] / (2 * n_half) for b in half]
    functional = _gradient_saliency(model, batches + sampled, "functional", progress=progress, reduce=reduce,
                                    batch_weights=weights)  # fmt: skip
    return geometric_mean(geometric_mean(optimizer_scores, fisher), functional)
