"""KL-divergence calibration selection (METHOD.md section 5).

Pruning decisions depend on the calibration data. For each candidate calibration set we score
the units, derive the plan and measure how far the pruned model's next-token distribution
moves from the dense one on a held-out probe set:

    KL(P_dense || P_pruned) = mean over probe tokens of sum_v P(v) (log P(v) - log Q(v))

and keep the candidate of least KL. The same test picks ``gamma`` from a grid.

Design:

* The pruned model is the dense one under :func:`masked` (forward pre-hooks zero the inputs of
  ``o_proj`` / ``down_proj`` that belong to removed units): no surgery, no second copy. (Exact for every
  family whose adapter says ``exact``; for OLMo 2/3, whose q/k norms span all heads, a close approximation.)
* The dense side is cached once per probe as the **final hidden states** (after the last norm,
  in the model's dtype), not as log-probs. That is ``probe_tokens * hidden_size * itemsize``
  bytes (128 windows x 64 tokens x 4096 x 2 B = 67 MB for an 8B Llama in bf16) instead of
  ``probe_tokens * vocab * 4`` (4.2 GB at a 128k vocabulary). The dense log-probs of each chunk are
  recomputed from the cache with the LM head (one extra head matmul per chunk, a few percent
  of a forward), and they are exact: the same hidden states through the same head.
* KL is computed in chunks of ``chunk_tokens`` positions: hidden states of a probe batch are
  computed once with the decoder body, and the head (with what the family does to its output: Gemma's
  soft-cap, Granite's divisor; both from the architecture adapter) + ``log_softmax`` run per chunk, so
  the fp32 logits of the whole probe batch never exist at once. Peak extra memory is about
  ``5 * chunk_tokens * vocab * 4`` bytes (650 MB at 256 tokens and a 128k vocabulary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .allocate import AllocationConfig, DenseReference, InfeasibleSparsityError, allocate, max_feasible_sparsity
from .data import as_batches
from .plan import PruningPlan
from .saliency import CALIBRATION_ESTIMATORS, UnitScores, check_calibration, compute_scores, eval_mode
from .surgery import validate_plan
from .arch import architecture_of
from .units import check_supported

#: gamma values tried by :func:`choose_gamma` (the paper hand-tunes 3.0 - 3.36).
DEFAULT_GAMMA_GRID: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: ``sets``: K random sets of n windows; ``samples``: K single windows, the n best assembled.
MODES = ("sets", "samples")


# ---------------------------------------------------------------------------------------
# the pruned model as the dense one with masks
# ---------------------------------------------------------------------------------------
#: Models inside a masked() block (so a dense probe is never built from a masked model).
_MASKED: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def masked(model: nn.Module, plan: PruningPlan) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes what ``apply_plan(model, plan)`` would, without surgery.

    A removed KV group contributes to the output only through its columns of ``o_proj``'s input
    (its query heads read only its own k/v heads), and a removed MLP channel only through its
    column of ``down_proj``'s input; zeroing those inputs is therefore exactly the removal, for every
    family whose adapter is ``exact`` (OLMo 2/3 normalise q and k over all heads, which a cut changes).
    Parameters are never touched; the hooks are removed on exit, also on error.
    """
    units = validate_plan(model, plan)
    arch = architecture_of(model)
    handles: list[Any] = []
    try:
        for u, lp in zip(units, plan.layers):
            if u.num_experts:  # (what a mixture-of-experts block computes is its adapter's to mask)
                handles += arch.mask_experts(u, lp)
            # the input columns of the weights units own by column: o_proj / down_proj (T5: o / wo; a shared
            # expert's down_proj beside the experts)
            for weights, kept in ((u.attn_weights, lp.kept_kv_groups), (u.mlp_weights, lp.kept_mlp_channels)):
                for w in (w for w in weights if w.axis == 1 and not w.experts):
                    removed = sorted(set(range(w.num_units)) - set(w.local_units(kept)))
                    if removed:
                        idx = w.index_map.indices(removed)
                        # on the module the model calls (a LoRA layer too), so adapters see the zeros as well
                        handles.append(w.module.register_forward_pre_hook(_zero_input_columns(idx)))
        _MASKED[model] = _MASKED.get(model, 0) + 1
        try:
            yield model
        finally:
            _MASKED[model] -= 1
            if not _MASKED[model]:
                del _MASKED[model]
    finally:
        for h in handles:
            h.remove()


def _zero_input_columns(idx: torch.Tensor):
    cache: dict[torch.device, torch.Tensor] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        where = cache.setdefault(x.device, idx.to(x.device))
        # index_fill (not a multiply by a 0/1 mask) so that inf/NaN in a removed unit cannot leak.
        return (x.index_fill(-1, where, 0),) + tuple(args[1:])

    return hook


# ---------------------------------------------------------------------------------------
# chunked KL against a cached dense probe
# ---------------------------------------------------------------------------------------
def _body_and_head(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(decoder body, hidden states -> logits as the model returns them), from the model's architecture."""
    return architecture_of(model).body_and_head(model)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    # no dropout and no autograd: dense and pruned must see the same function
    with eval_mode(model), torch.no_grad():
        yield


def _device_of(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def _final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states at the non-padded positions, ``[n_tokens, hidden]`` in the model dtype."""
    body, _ = _body_and_head(model)
    device = _device_of(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = body(**batch, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    mask = batch.get("attention_mask")
    if mask is not None:
        hidden = hidden[mask.reshape(-1).bool()]
    return hidden


@dataclass
class DenseProbe:
    """Probe batches and the dense model's final hidden states on them (the KL reference).

    Memory: ``num_tokens * hidden_size * itemsize`` on the model's device (see module docstring).
    Build it before any masking, from the model the candidates are pruned from.
    """

    batches: list[dict[str, torch.Tensor]]
    hidden: list[torch.Tensor]
    num_tokens: int

    @classmethod
    def build(cls, model: nn.Module, batches: Iterable[Any]) -> "DenseProbe":
        check_supported(model)
        _body_and_head(model)
        if model in _MASKED:
            raise RuntimeError(
                "DenseProbe.build was called inside masked(model, plan): the probe would hold the pruned model's "
                "outputs, not the dense ones. Build the probe before entering masked()."
            )
        norm = [{k: v.cpu() for k, v in b.items()} for b in check_calibration(model, batches)]
        with _eval(model):
            hidden = [_final_hidden(model, b) for b in norm]
        num_tokens = sum(h.shape[0] for h in hidden)
        if num_tokens == 0:
            raise ValueError("the probe has no non-padded tokens; give probe batches with attention_mask not all 0.")
        return cls(batches=norm, hidden=hidden, num_tokens=num_tokens)

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def kl_divergence(model: nn.Module, probe: DenseProbe, chunk_tokens: int = 256) -> float:
    """KL(P_dense || P_model), the mean over probe tokens of sum_v P(v) (log P(v) - log Q(v)).

    ``model`` is usually the dense model under :func:`masked`. Logits exist only for
    ``chunk_tokens`` positions at a time (fp32), for the dense and the model side each.
    """
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive integer (e.g. 256).")
    _, head = _body_and_head(model)
    total = torch.zeros((), dtype=torch.float64)
    with _eval(model):
        for batch, dense_hidden in zip(probe.batches, probe.hidden):
            hidden = _final_hidden(model, batch)
            if hidden.shape != dense_hidden.shape:
                raise ValueError(
                    f"probe batch has {dense_hidden.shape[0]} dense tokens but {hidden.shape[0]} now; the probe "
                    "was built for another model or batches."
                )
            for start in range(0, hidden.shape[0], chunk_tokens):
                end = start + chunk_tokens
                log_q = head(hidden[start:end]).float().log_softmax(-1)
                log_p = head(dense_hidden[start:end]).float().log_softmax(-1)
                # sum_v p (log p - log q), accumulated in fp64 so many chunks do not lose precision.
                total += F.kl_div(log_q, log_p, reduction="sum", log_target=True).double().cpu()
                del log_q, log_p
    return float(total / probe.num_tokens)


# ---------------------------------------------------------------------------------------
# gamma from a grid
# ---------------------------------------------------------------------------------------
@dataclass
class GammaSearch:
    """The KL test over a gamma grid for fixed scores."""

    curve: dict[float, float]  # gamma -> KL, feasible gammas in grid order
    skipped: dict[float, str]  # gamma -> why it was not tried (infeasible at this sparsity)
    best_gamma: float
    best_kl: float
    plan: PruningPlan

    def summary(self) -> dict[str, Any]:
        return {
            "curve": {str(g): k for g, k in self.curve.items()},
            "skipped": {str(g): why for g, why in self.skipped.items()},
            "best_gamma": self.best_gamma,
            "best_kl": self.best_kl,
        }


def _check_grid(grid: Sequence[float]) -> list[float]:
    values = list(dict.fromkeys(float(g) for g in grid)) if grid is not None else []
    if not values or any(not (math.isfinite(g) and g > 0) for g in values):
        raise ValueError(f"grid={grid!r} must be a non-empty sequence of positive gammas, e.g. {DEFAULT_GAMMA_GRID}.")
    return values


def choose_gamma(
    model: nn.Module,
    scores: UnitScores,
    grid: Sequence[float] = DEFAULT_GAMMA_GRID,
    *,
    probe: DenseProbe,
    alloc_config: AllocationConfig,
    reference: DenseReference | None = None,
    saliency: str = "",
    chunk_tokens: int = 256,
    progress: bool = False,
) -> GammaSearch:
    """KL of the plan at every gamma of ``grid`` (other allocation settings from ``alloc_config``).

    Gammas infeasible at ``alloc_config.sparsity`` are skipped with a note; the least KL wins
    (ties: the earlier grid entry).
    """
    values = _check_grid(grid)
    ref = reference or DenseReference.of(model)
    curve: dict[float, float] = {}
    skipped: dict[float, str] = {}
    best: tuple[float, float, PruningPlan] | None = None
    for gamma in _progress(values, progress, "nirvana-pl gamma"):
        config = dataclasses.replace(alloc_config, gamma=gamma)
        try:
            plan = allocate(model, scores, config, ref, saliency=saliency)
        except InfeasibleSparsityError as exc:
            skipped[gamma] = str(exc)
            continue
        with masked(model, plan):
            kl = kl_divergence(model, probe, chunk_tokens)
        curve[gamma] = kl
        if best is None or kl < best[1]:
            best = (gamma, kl, plan)
    if best is None:
        s_max = max(_s_max(ref, alloc_config, g) for g in values)
        raise InfeasibleSparsityError(
            f"sparsity={alloc_config.sparsity} is infeasible at every gamma of grid={values} (the largest feasible "
            f"sparsity over the grid is {math.floor(s_max * 1000) / 1000:.3f}); lower the sparsity or change the grid."
        )
    return GammaSearch(curve=curve, skipped=skipped, best_gamma=best[0], best_kl=best[1], plan=best[2])


# ---------------------------------------------------------------------------------------
# calibration-set selection
# ---------------------------------------------------------------------------------------
@dataclass
class SelectionResult:
    """What :meth:`CalibrationSelector.select` found. Indices refer to rows of the selector's pool."""

    mode: str
    windows: torch.Tensor  # LongTensor[n, T]: the chosen calibration windows
    calibration: list[torch.Tensor]  # the same windows as [B, T] batches for compute_scores / prune
    plan: PruningPlan  # plan of the chosen calibration set (at gamma_search.best_gamma when searched)
    scores: UnitScores  # unit scores on the chosen set
    kl: float  # KL of ``plan`` on the probe
    gamma: float
    candidate_kls: list[float]  # KL of every candidate, in candidate order
    best_index: int  # candidate of least KL
    candidate_indices: list[torch.Tensor]  # pool rows of every candidate
    selected_indices: torch.Tensor  # pool rows of ``windows``
    probe_indices: torch.Tensor  # pool rows cut into the probe (disjoint from every candidate)
    gamma_search: GammaSearch | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    candidate_plans: list[PruningPlan] = field(default_factory=list)  # plan of every candidate, in order

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers for a report."""
        return {
            "mode": self.mode,
            "candidate_kls": list(self.candidate_kls),
            "best_index": self.best_index,
            "kl": self.kl,
            "gamma": self.gamma,
            "selected_windows": self.selected_indices.tolist(),
            "probe_windows": self.probe_indices.tolist(),
            "gamma_search": self.gamma_search.summary() if self.gamma_search else None,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }


@dataclass
class CalibrationSelector:
    """Choose the calibration data (and optionally gamma) by the KL test of METHOD.md section 5.

    Args:
        pool: ``LongTensor[N, T]`` token windows (e.g. ``token_windows(..., seq_len=128)``). It is
            split first (seeded): some windows become the probe, the rest the candidate pool, so
            the probe never overlaps a candidate.
        num_candidates: K. ``sets``: K random sets of ``samples_per_candidate`` windows;
            ``samples``: K single windows.
        samples_per_candidate: n, windows per calibration set (the reference uses 32).
        probe_windows: probe windows (reference 128) of ``probe_seq_len`` tokens (reference 64;
            None = T). Each pool window given to the probe is cut into ``T // probe_seq_len``
            probe windows, so 128 x 64 costs 64 pool windows of 128.
        mode: ``"sets"`` (keep the set of least KL) or ``"samples"`` (score single windows, keep
            the n of least KL as the set).
        seed: the split and the draws depend only on it (and the pool).
        batch_size: windows per batch, for scoring and for the probe.
        chunk_tokens: positions per KL chunk (peak memory ~ 5 * chunk_tokens * vocab * 4 bytes).
    """

    pool: torch.Tensor
    num_candidates: int = 8
    samples_per_candidate: int = 32
    probe_windows: int = 128
    probe_seq_len: int | None = 64
    mode: str = "sets"
    seed: int = 0
    batch_size: int = 8
    chunk_tokens: int = 256

    def __post_init__(self) -> None:
        self._check_pool()
        self._check_mode_and_counts()
        self._check_probe_seq_len()
        self._check_room_for_candidates()

    def _check_pool(self) -> None:
        """The pool must be a non-empty integer [N, T] tensor; it is stored as long."""
        pool = self.pool
        integer = isinstance(pool, torch.Tensor) and not (pool.is_floating_point() or pool.dtype == torch.bool)
        if not integer or pool.dim() != 2:
            raise ValueError(
                f"pool must be a LongTensor[N, T] of token windows; got {_shape_of(pool)}. Build it with "
                "nirvana_pl.data.token_windows(source, tokenizer, seq_len=128)."
            )
        if pool.numel() == 0:
            raise ValueError(
                f"pool is empty (shape {tuple(pool.shape)}); build it with nirvana_pl.data.token_windows(...) "
                "from enough text."
            )
        self.pool = pool.to(torch.long)

    def _check_mode_and_counts(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not known; choose 'sets' or 'samples'.")
        for name in ("num_candidates", "samples_per_candidate", "probe_windows", "batch_size", "chunk_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")

    def _check_probe_seq_len(self) -> None:
        """Defaults probe_seq_len to the pool's window length, and refuses one longer than it."""
        T = self.pool.shape[1]
        if self.probe_seq_len is None:
            self.probe_seq_len = T
        if not (isinstance(self.probe_seq_len, int) and 1 <= self.probe_seq_len <= T):
            raise ValueError(
                f"probe_seq_len={self.probe_seq_len!r} must be an integer in [1, {T}] (the pool's window length); "
                f"lower it or build the pool with seq_len >= {self.probe_seq_len}."
            )

    def _check_room_for_candidates(self) -> None:
        """After the probe takes its pool windows, enough must be left for the candidates."""
        n_pool = self.pool.shape[0]
        m = self.probe_pool_windows
        if m >= n_pool:
            raise ValueError(
                f"probe_windows={self.probe_windows} of {self.probe_seq_len} tokens needs {m} of the pool's {n_pool} "
                f"windows and leaves none for candidates; lower probe_windows or give a larger pool "
                f"(token_windows(..., num_windows=...))."
            )
        free = n_pool - m
        if self.samples_per_candidate > free:
            raise ValueError(
                f"samples_per_candidate={self.samples_per_candidate} is larger than the {free} pool windows left for "
                f"candidates (pool {n_pool} minus {m} for the probe); lower samples_per_candidate or probe_windows, or "
                "give a larger pool."
            )
        if self.mode == "samples":
            self._check_samples_mode(n_pool, free)

    def _check_samples_mode(self, n_pool: int, free: int) -> None:
        """mode='samples' keeps the n best of K single windows, so K must be >= n and fit in the free pool."""
        m = n_pool - free
        if self.num_candidates < self.samples_per_candidate:
            raise ValueError(
                f"num_candidates={self.num_candidates} < samples_per_candidate={self.samples_per_candidate}: mode="
                "'samples' keeps the n best of K single windows; raise num_candidates to >= "
                f"{self.samples_per_candidate}."
            )
        if self.num_candidates > free:
            raise ValueError(
                f"num_candidates={self.num_candidates} single windows, but only {free} pool windows are left for "
                f"candidates (pool {n_pool} minus {m} for the probe); lower num_candidates or give a larger pool."
            )

    # ------------------------------------------------------------------ split
    @property
    def probe_pool_windows(self) -> int:
        """Pool windows that the probe consumes."""
        per = self.pool.shape[1] // int(self.probe_seq_len)
        return math.ceil(self.probe_windows / per)

    def split(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(probe pool rows, pool rows of each candidate); seeded, the probe rows in no candidate."""
        gen = torch.Generator().manual_seed(self.seed)
        n_pool = self.pool.shape[0]
        perm = torch.randperm(n_pool, generator=gen)
        m = self.probe_pool_windows
        probe, free = perm[:m].sort().values, perm[m:].sort().values
        if self.mode == "sets":
            n = self.samples_per_candidate
            candidates = [
                free[torch.randperm(free.numel(), generator=gen)[:n]].sort().values for _ in range(self.num_candidates)
            ]
        else:
            singles = free[torch.randperm(free.numel(), generator=gen)[: self.num_candidates]]
            candidates = [s.reshape(1) for s in singles]
        return probe, candidates

    def probe_tokens(self, probe_rows: torch.Tensor) -> torch.Tensor:
        """``LongTensor[probe_windows, probe_seq_len]`` cut from the probe's pool windows."""
        L = int(self.probe_seq_len)
        per = self.pool.shape[1] // L
        windows = self.pool[probe_rows][:, : per * L].reshape(-1, L)
        return windows[: self.probe_windows]

    def dense_probe(self, model: nn.Module, probe_rows: torch.Tensor | None = None) -> DenseProbe:
        """The dense reference on the probe (computed now, from ``model`` as it stands)."""
        if probe_rows is None:
            probe_rows = self.split()[0]
        return DenseProbe.build(model, as_batches(self.probe_tokens(probe_rows), self.batch_size))

    # ------------------------------------------------------------------ selection
    def select(
        self,
        model: nn.Module,
        saliency: str,
        alloc_config: AllocationConfig,
        reference: DenseReference | None = None,
        progress: bool = False,
        gamma_grid: Sequence[float] | None = None,
    ) -> SelectionResult:
        """Score every candidate, derive its plan, keep the one of least KL on the probe.

        With ``gamma_grid`` (``gamma="auto"``) the set is chosen at ``alloc_config.gamma`` and then
        gamma is chosen on the grid for that set's scores: K + G KL evaluations instead of the
        K * G of a joint search; the set ranking depends little on gamma, the KL curve over gamma a
        lot. The model's parameters are never modified.
        """
        start = time.perf_counter()
        self._check_model(model, saliency)
        ref = reference or DenseReference.of(model)
        grid = _check_grid(gamma_grid) if gamma_grid is not None else None
        notes: list[str] = []
        if grid is not None:
            alloc_config, note = _feasible_start(alloc_config, ref, grid)
            if note:
                notes.append(note)

        probe_rows, candidates = self.split()
        probe = self.dense_probe(model, probe_rows)
        evaluated: list[tuple[UnitScores, PruningPlan, float]] = []
        bar = _progress(candidates, progress, f"nirvana-pl calibration ({self.mode})")
        for rows in bar:
            evaluated.append(self._evaluate(model, rows, saliency, alloc_config, ref, probe))
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(kl=f"{evaluated[-1][2]:.4g}")
        kls = [e[2] for e in evaluated]
        order = sorted(range(len(kls)), key=lambda i: (kls[i], i))  # ties: the earlier candidate
        best = order[0]

        if self.mode == "sets":
            selected = candidates[best]
            scores, plan, kl = evaluated[best]
        else:
            # Rank order, so the first windows of the set are the best single windows.
            selected = torch.cat([candidates[i] for i in order[: self.samples_per_candidate]])
            scores, plan, kl = self._evaluate(model, selected, saliency, alloc_config, ref, probe)

        search = None
        if grid is not None:
            search = choose_gamma(
                model, scores, grid, probe=probe, alloc_config=alloc_config, reference=ref, saliency=saliency,
                chunk_tokens=self.chunk_tokens, progress=progress,
            )
            plan, kl = search.plan, search.best_kl
        windows = self.pool[selected].clone()
        return SelectionResult(
            mode=self.mode,
            windows=windows,
            calibration=as_batches(windows, self.batch_size),
            plan=plan,
            scores=scores,
            kl=kl,
            gamma=plan.gamma,
            candidate_kls=kls,
            best_index=best,
            candidate_indices=candidates,
            selected_indices=selected,
            probe_indices=probe_rows,
            gamma_search=search,
            seconds=time.perf_counter() - start,
            notes=notes,
            candidate_plans=[e[1] for e in evaluated],
        )

    def choose_gamma(
        self,
        model: nn.Module,
        scores: UnitScores,
        alloc_config: AllocationConfig,
        grid: Sequence[float] = DEFAULT_GAMMA_GRID,
        reference: DenseReference | None = None,
        progress: bool = False,
    ) -> GammaSearch:
        """:func:`choose_gamma` on this selector's probe (fixed ``scores``, e.g. from Adam state)."""
        self._check_model(model, None)
        return choose_gamma(
            model, scores, grid, probe=self.dense_probe(model), alloc_config=alloc_config, reference=reference,
            chunk_tokens=self.chunk_tokens, progress=progress,
        )

    def choose_scores(
        self,
        model: nn.Module,
        candidates: dict[str, UnitScores],
        alloc_config: AllocationConfig,
        reference: DenseReference | None = None,
        gamma_grid: Sequence[float] | None = None,
        progress: bool = False,
    ) -> tuple[PruningPlan, dict[str, Any]]:
        """Least-KL plan among several score sets (e.g. the adam_* estimators of one warm-up).

        With ``gamma_grid`` each score set gets its own gamma search first. Returns the plan (its
        ``saliency`` names the winning score set) and a JSON-able summary of every candidate.
        """
        if not candidates:
            raise ValueError("choose_scores needs at least one candidate score set.")
        self._check_model(model, None)
        ref = reference or DenseReference.of(model)
        probe = self.dense_probe(model)
        results: dict[str, tuple[PruningPlan, float, GammaSearch | None]] = {}
        for name in _progress(list(candidates), progress, "nirvana-pl candidate plans"):
            if gamma_grid is not None:
                search = choose_gamma(
                    model, candidates[name], gamma_grid, probe=probe, alloc_config=alloc_config, reference=ref,
                    saliency=name, chunk_tokens=self.chunk_tokens,
                )
                results[name] = (search.plan, search.best_kl, search)
            else:
                plan = allocate(model, candidates[name], alloc_config, ref, saliency=name)
                with masked(model, plan):
                    results[name] = (plan, kl_divergence(model, probe, self.chunk_tokens), None)
        names = list(results)
        best = min(range(len(names)), key=lambda i: (results[names[i]][1], i))  # ties: the earlier candidate
        plan, kl, search = results[names[best]]
        summary = {
            "mode": "scores",
            "candidates": names,
            "candidate_kls": [results[n][1] for n in names],
            "best_index": best,
            "kl": kl,
            "gamma": plan.gamma,
            "gamma_search": search.summary() if search else None,
        }
        return plan, summary

    # ------------------------------------------------------------------ helpers
    def _evaluate(
        self,
        model: nn.Module,
        rows: torch.Tensor,
        saliency: str,
        alloc_config: AllocationConfig,
        ref: DenseReference,
        probe: DenseProbe,
    ) -> tuple[UnitScores, PruningPlan, float]:
        batches = as_batches(self.pool[rows], self.batch_size)
        scores = compute_scores(model, saliency, calibration=batches, seed=self.seed)
        plan = allocate(model, scores, alloc_config, ref, saliency=saliency)
        with masked(model, plan):
            kl = kl_divergence(model, probe, self.chunk_tokens)
        return scores, plan, kl

    def _check_model(self, model: nn.Module, saliency: str | None) -> None:
        check_supported(model)
        _body_and_head(model)
        if saliency is not None and saliency not in CALIBRATION_ESTIMATORS:
            raise ValueError(
                f"saliency={saliency!r} does not depend on calibration data, so there is nothing to select; use one "
                f"of {', '.join(CALIBRATION_ESTIMATORS)}, or CalibrationSelector.choose_gamma(model, scores, ...) "
                "to pick only gamma."
            )
        config = model.config
        T = self.pool.shape[1]
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and T > max_pos:
            raise ValueError(
                f"the pool's windows have seq_len={T} > the model's max_position_embeddings={max_pos}; rebuild the "
                f"pool with token_windows(..., seq_len<={max_pos})."
            )
        vocab = getattr(config, "vocab_size", None)
        top = int(self.pool.max())
        if vocab is not None and (top >= vocab or int(self.pool.min()) < 0):
            raise ValueError(
                f"the pool holds token id {top} outside the model's vocabulary [0, {vocab}); tokenise the pool "
                "with this model's tokenizer."
            )


def _s_max(ref: DenseReference, alloc_config: AllocationConfig, gamma: float) -> float:
    """The largest feasible sparsity at ``gamma`` under ``alloc_config``'s per-layer floors."""
    return max_feasible_sparsity(ref, gamma, alloc_config.min_kv_groups, alloc_config.min_mlp_channels)


def _feasible_start(
    alloc_config: AllocationConfig, ref: DenseReference, grid: list[float]
) -> tuple[AllocationConfig, str | None]:
    """The gamma used to choose the set under ``gamma="auto"``: the configured one when feasible,
    else the feasible grid gamma nearest to it on a log scale (ties: the smaller)."""
    s = alloc_config.sparsity
    if s <= _s_max(ref, alloc_config, alloc_config.gamma) + 1e-12:
        return alloc_config, None
    feasible = [g for g in grid if s <= _s_max(ref, alloc_config, g) + 1e-12]
    if not feasible:
        return alloc_config, None  # choose_gamma / allocate raise the clear error
    gamma = min(feasible, key=lambda g: (abs(math.log(g / alloc_config.gamma)), g))
    note = f"gamma={alloc_config.gamma} is infeasible at sparsity={s}; the calibration set was chosen at gamma={gamma}"
    return dataclasses.replace(alloc_config, gamma=gamma), note


def _progress(items: Sequence[Any], enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _shape_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
