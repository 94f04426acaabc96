"""Core cost benchmark of nirvana_pl on a ~28M-parameter Llama (GQA), fp32, CPU, one process.

1. Training-step time (fwd+bwd+AdamW) without vs with ``AdamStateSaliency("adam_taylor").accumulate``
   after each optimizer step (what the callback does in its warm-up window); A/B blocks alternate,
   medians; the accumulate call is also timed on its own.        Goal: ratio <= 1.02.
2. One prune event as the callback's ``_prune`` does it (scores -> allocate -> apply_plan with the
   AdamW state, record + JSON report) at s=0.5, over one dense training step.      Goal: <= 1.0.
3. Peak RSS (psutil thread, 5 ms) during that prune over the peak during the training steps before it,
   same process, training measured first; ru_maxrss as a cross-check.               Goal: <= 1.10.
4. Forward tokens/s (eval, inference_mode) of a model pruned at s=0.5 (magnitude, gamma=3) over the
   dense one, vs the ideal from nn.Linear FLOPs; quotient goal >= 0.9. Training speed-up for information.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from nirvana_pl.allocate import AllocationConfig, DenseReference, allocate  # noqa: E402
from nirvana_pl.oneshot import prune as oneshot_prune  # noqa: E402
from nirvana_pl.report import PruneRecord, format_summary, write_report  # noqa: E402
from nirvana_pl.saliency import AdamStateSaliency  # noqa: E402
from nirvana_pl.surgery import apply_plan, layer_widths  # noqa: E402
from nirvana_pl.units import find_units, prunable_parameter_count  # noqa: E402

hf_logging.set_verbosity_error()

SPARSITY = 0.5
GAMMA = 3.0
SEED = 0
BATCH, SEQ = 8, 128
MODEL = dict(
    vocab_size=8192, hidden_size=384, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=6,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
)
GOALS = {"accumulate_overhead": 1.02, "prune_over_step": 1.0, "rss_prune_over_train": 1.10, "fwd_vs_ideal": 0.9}

# repetitions: (full, quick)
REPS = {
    "train_warmup": (4, 3),       # steps before A/B (both arms, accumulate included)
    "ab_blocks": (20, 6),         # alternating blocks AB, BA, AB, ...
    "ab_steps_per_block": (2, 1),
    "prune_repeats": (2, 1),      # extra prune timings on a restored copy (after the RSS measurement)
    "fwd_warmup": (2, 1),
    "fwd_reps": (15, 5),
    "train_cmp_warmup": (2, 1),
    "train_cmp_reps": (8, 3),
}


# --------------------------------------------------------------------------------------- helpers
class RssSampler(threading.Thread):
    """Samples this process's resident set size every ``interval`` s and keeps the peak since reset."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.proc = psutil.Process()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self.peak = 0
        self.samples = 0

    def _sample(self) -> int:
        rss = self.proc.memory_info().rss
        with self._lock:
            self.peak = max(self.peak, rss)
            self.samples += 1
        return rss

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self._sample()

    def reset(self) -> int:
        with self._lock:
            self.peak, self.samples = 0, 0
        return self._sample()

    def read(self) -> tuple[int, int]:
        self._sample()
        with self._lock:
            return self.peak, self.samples

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class ForeignCpu:
    """CPU time used by *other* processes over an interval, in cores (machine-noise indicator)."""

    def __init__(self):
        self.proc = psutil.Process()
        self.start()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def _own(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy(), self._own()

    def cores(self) -> float:
        dt = time.perf_counter() - self._t0
        foreign = (self._busy() - self._busy0) - (self._own() - self._own0)
        return max(0.0, foreign / dt) if dt > 0 else 0.0


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 2.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` cores over ``window`` s."""
    deadline = time.perf_counter() + max_wait
    while True:
        mon = ForeignCpu()
        time.sleep(window)
        cores = mon.cores()
        if cores < threshold or time.perf_counter() >= deadline:
            return cores
        log(f"  waiting for a quieter machine: other processes use {cores:.2f} cores ...")


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def median(xs):
    return statistics.median(xs)


def rel_iqr(xs) -> float:
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / median(xs)


QUIET_CORES = 0.15  # a timed sample is "quiet" when other processes used less than this many cores


class Series:
    """Timed samples plus the CPU load of other processes while each one ran."""

    def __init__(self):
        self.t: list[float] = []
        self.busy: list[float] = []

    def time(self, fn, *args, **kwargs):
        mon = ForeignCpu()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.t.append(time.perf_counter() - t0)
        self.busy.append(mon.cores())
        return out

    def quiet(self) -> list[float]:
        return [t for t, b in zip(self.t, self.busy) if b < QUIET_CORES]

    def to_dict(self) -> dict:
        return {"s": self.t, "foreign_cores": self.busy}


def paired_medians(a: Series, b: Series) -> dict:
    """Medians of a and b over quiet samples when both arms have enough of them, else over all samples."""
    qa, qb = a.quiet(), b.quiet()
    enough = lambda q, s: len(q) >= max(3, -(-len(s.t) * 3 // 10))  # noqa: E731  (>= 30 %, at least 3)
    use_quiet = enough(qa, a) and enough(qb, b)
    xa, xb = (qa, qb) if use_quiet else (a.t, b.t)
    return {
        "a": median(xa), "b": median(xb), "quiet_only": use_quiet, "n_used": [len(xa), len(xb)],
        "n_total": [len(a.t), len(b.t)], "a_all": median(a.t), "b_all": median(b.t), "xa": xa, "xb": xb,
    }


def bootstrap_ratio_ci(num, den, n=2000, level=0.90, seed=0):
    """Percentile bootstrap interval of median(num)/median(den)."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(n):
        a = [rng.choice(num) for _ in num]
        b = [rng.choice(den) for _ in den]
        ratios.append(median(a) / median(b))
    ratios.sort()
    lo = ratios[int((1 - level) / 2 * n)]
    hi = ratios[int((1 + level) / 2 * n) - 1]
    return lo, hi


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    config = LlamaConfig(**MODEL)
    model = LlamaForCausalLM(config).float()
    return model


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def token_batches(n: int, seed: int = SEED) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=gen) for _ in range(n)]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    # Lightning's automatic optimisation order: zero_grad, forward, backward, step (grads stay
    # alive until the next step, so they are alive at on_train_batch_end, where the callback runs).
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()


def linear_flops_per_token(model: nn.Module) -> int:
    """2 * in * out summed over every nn.Linear (lm_head included): FLOPs per token, forward."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def attention_matmul_flops_per_token(model: nn.Module, seq: int) -> int:
    """QK^T and AV: 2 * 2 * T * n_q * head_dim per token per layer (full T x T, no causal saving)."""
    return sum(4 * seq * u.num_kv_groups * u.group_size * u.head_dim for u in find_units(model))


def param_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    return {
        "total": total,
        "prunable_attn_mlp": prunable_parameter_count(model),
        "embed_tokens": model.model.embed_tokens.weight.numel(),
        "lm_head": model.lm_head.weight.numel(),
    }


def machine_info() -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model or platform.processor(),
        "torch_num_threads": torch.get_num_threads(),
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------- phases
def phase_train_ab(model, opt, adam, batches, sampler, reps):
    """Part 1 (and the training half of part 3): A = plain step, B = step + accumulate."""
    acc = Series()
    arms = {"A": Series(), "B": Series()}
    counter = iter(range(10**9))

    def step(arm: str) -> None:
        train_step(model, opt, batches[next(counter) % len(batches)])
        if arm == "B":
            acc.time(adam.accumulate, model, [opt])

    gc.collect()
    rss_start = sampler.reset()
    ru_before = ru_maxrss_bytes()
    foreign = ForeignCpu()
    for i in range(reps["train_warmup"]):
        step("B" if i % 2 else "A")
    if adam.steps == 0:  # make sure the accumulator is populated even with a single warm-up step
        adam.accumulate(model, [opt])
    acc = Series()  # warm-up calls are not recorded
    block_ratios = []
    for b in range(reps["ab_blocks"]):
        order = ("A", "B") if b % 2 == 0 else ("B", "A")
        n0 = {k: len(v.t) for k, v in arms.items()}
        for arm in order:
            for _ in range(reps["ab_steps_per_block"]):
                arms[arm].time(step, arm)
        block_ratios.append(median(arms["B"].t[n0["B"]:]) / median(arms["A"].t[n0["A"]:]))
    train_peak, samples = sampler.read()
    return {
        "arms": arms,
        "accumulate": acc,
        "block_ratios": block_ratios,
        "foreign_cores": foreign.cores(),
        "rss_at_start": rss_start,
        "train_peak_rss": train_peak,
        "train_rss_samples": samples,
        "ru_maxrss_before_training": ru_before,
        "ru_maxrss_after_training": ru_maxrss_bytes(),
    }


def prune_event(model, opt, adam, alloc, reference, report_dir, event_step):
    """The body of NirvanaPruningCallback._prune for an adam_* estimator (minus Lightning's self.log)."""
    t0 = time.perf_counter()
    total_before = sum(p.numel() for p in model.parameters())
    scores = adam.scores()
    t1 = time.perf_counter()
    plan = allocate(model, scores, alloc, reference, saliency=adam.kind)
    t2 = time.perf_counter()
    apply_plan(model, plan, [opt])
    t3 = time.perf_counter()
    record = PruneRecord(
        event_step=event_step, plan=plan, total_params_before=total_before,
        total_params_after=sum(p.numel() for p in model.parameters()),
        prunable_params_after=prunable_parameter_count(model), seconds=t3 - t0,
    )
    adam.reset()
    record.metrics(reference)
    write_report(report_dir, [record], reference)
    summary = format_summary(record, reference)
    t4 = time.perf_counter()
    return plan, summary, {
        "scores_s": t1 - t0, "allocate_s": t2 - t1, "apply_plan_s": t3 - t2, "record_report_s": t4 - t3,
        "total_s": t4 - t0,
    }


def phase_prune(model, opt, adam, reference, sampler, reps, workdir):
    alloc = AllocationConfig(SPARSITY, GAMMA)
    # Snapshot (to disk, so that it does not sit in RSS) for the extra timing repeats.
    snap = Path(workdir) / "snapshot.pt"
    rss_before_snapshot = psutil.Process().memory_info().rss
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "adam": adam.state_dict()}, snap)
    gc.collect()
    rss_before_prune = sampler.reset()
    ru_before = ru_maxrss_bytes()
    foreign = ForeignCpu()
    plan, summary, timing = prune_event(model, opt, adam, alloc, reference, Path(workdir) / "report", event_step=1)
    prune_peak, samples = sampler.read()
    ru_after = ru_maxrss_bytes()
    timings = [timing]
    for _ in range(reps["prune_repeats"]):
        saved = torch.load(snap)
        m2 = build_model()
        m2.load_state_dict(saved["model"])
        o2 = make_optimizer(m2)
        o2.load_state_dict(saved["opt"])
        a2 = AdamStateSaliency("adam_taylor")
        a2.load_state_dict(saved["adam"])
        del saved
        gc.collect()
        _, _, t = prune_event(m2, o2, a2, alloc, reference, Path(workdir) / "report_repeat", event_step=1)
        timings.append(t)
        del m2, o2, a2
        gc.collect()
    return {
        "plan": plan,
        "summary": summary,
        "foreign_cores": foreign.cores(),
        "timings": timings,
        "rss_before_snapshot": rss_before_snapshot,
        "rss_before_prune": rss_before_prune,
        "prune_peak_rss": prune_peak,
        "prune_rss_samples": samples,
        "ru_maxrss_before_prune": ru_before,
        "ru_maxrss_after_prune": ru_after,
    }


def phase_throughput(reps):
    """Part 4: dense vs one-shot pruned (magnitude, s=0.5, gamma=3): forward tokens/s and train steps."""
    dense = build_model()
    pruned = copy.deepcopy(dense)
    plan = oneshot_prune(pruned, SPARSITY, saliency="magnitude", gamma=GAMMA)
    batches = token_batches(4, seed=SEED + 1)
    models = {"dense": dense, "pruned": pruned}

    foreign = ForeignCpu()
    fwd = {"dense": Series(), "pruned": Series()}
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        for name, m in models.items():
            for i in range(reps["fwd_warmup"]):
                m(input_ids=batches[i % len(batches)], use_cache=False)
        for r in range(reps["fwd_reps"]):
            order = ("dense", "pruned") if r % 2 == 0 else ("pruned", "dense")
            for name in order:
                fwd[name].time(models[name], input_ids=batches[r % len(batches)], use_cache=False)

    train = {"dense": Series(), "pruned": Series()}
    opts = {}
    for name, m in models.items():
        m.train()
        opts[name] = make_optimizer(m)
        for i in range(reps["train_cmp_warmup"]):
            train_step(m, opts[name], batches[i % len(batches)])
    for r in range(reps["train_cmp_reps"]):
        order = ("dense", "pruned") if r % 2 == 0 else ("pruned", "dense")
        for name in order:
            train[name].time(train_step, models[name], opts[name], batches[r % len(batches)])

    lin = {k: linear_flops_per_token(m) for k, m in models.items()}
    att = {k: attention_matmul_flops_per_token(m, SEQ) for k, m in models.items()}
    return {
        "plan": plan,
        "foreign_cores": foreign.cores(),
        "fwd_s": fwd,
        "train_s": train,
        "linear_flops_per_token": lin,
        "attention_matmul_flops_per_token": att,
        "params": {k: param_counts(m) for k, m in models.items()},
        "widths": layer_widths(pruned),
    }


# --------------------------------------------------------------------------------------- report
def status(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 min); writes *_quick files")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="first wait up to S seconds until other processes use < 0.25 cores")
    args = parser.parse_args()
    command = "python benchmarks/core_bench.py" + (" --quick" if args.quick else "")
    if args.wait_quiet > 0:
        command += f" --wait-quiet {args.wait_quiet:g}"
    reps = {k: v[1 if args.quick else 0] for k, v in REPS.items()}

    torch.set_num_threads(2)
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    wall0 = time.perf_counter()
    info = machine_info()
    info["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    sampler = RssSampler(0.005)
    sampler.start()

    model = build_model()
    counts = param_counts(model)
    log(f"model: LlamaForCausalLM {MODEL}")
    log(f"params: total {counts['total']:,} (attention+MLP {counts['prunable_attn_mlp']:,}, embed "
        f"{counts['embed_tokens']:,}, lm_head {counts['lm_head']:,}); fp32; batch {BATCH}x{SEQ}; "
        f"threads {torch.get_num_threads()}; {'quick' if args.quick else 'full'} run")
    reference = DenseReference.of(model)
    opt = make_optimizer(model)
    adam = AdamStateSaliency("adam_taylor")
    batches = token_batches(4)

    log("[1/4] training steps, A = plain, B = plain + adam_taylor accumulate (alternating blocks) ...")
    tr = phase_train_ab(model, opt, adam, batches, sampler, reps)
    ab = paired_medians(tr["arms"]["A"], tr["arms"]["B"])
    a_med, b_med = ab["a"], ab["b"]
    acc_med = median(tr["accumulate"].t)
    ratio1 = b_med / a_med
    ci1 = bootstrap_ratio_ci(ab["xb"], ab["xa"])
    direct1 = 1.0 + acc_med / a_med
    paired1 = median(tr["block_ratios"])
    log(f"      step A {a_med * 1e3:.1f} ms, B {b_med * 1e3:.1f} ms, accumulate {acc_med * 1e3:.2f} ms")

    log("[2/4 + 3/4] prune event at s=0.5 (adam_taylor scores, AdamW state sliced), RSS tracked ...")
    with tempfile.TemporaryDirectory(prefix="core_bench_") as workdir:
        pr = phase_prune(model, opt, adam, reference, sampler, reps, workdir)
    prune_totals = [t["total_s"] for t in pr["timings"]]
    prune_med = median(prune_totals)
    ratio2 = prune_med / a_med
    ratio3 = pr["prune_peak_rss"] / tr["train_peak_rss"]
    log("      " + pr["summary"].replace("\n", "\n      "))
    del model, opt, adam
    gc.collect()

    log("[4/4] forward throughput / training step, dense vs pruned (magnitude, s=0.5, gamma=3) ...")
    th = phase_throughput(reps)
    sampler.stop()
    fm = paired_medians(th["fwd_s"]["dense"], th["fwd_s"]["pruned"])
    fwd_d, fwd_p = fm["a"], fm["b"]
    tps_d, tps_p = BATCH * SEQ / fwd_d, BATCH * SEQ / fwd_p
    speed4 = tps_p / tps_d
    lin, att = th["linear_flops_per_token"], th["attention_matmul_flops_per_token"]
    ideal_lin = lin["dense"] / lin["pruned"]
    ideal_all = (lin["dense"] + att["dense"]) / (lin["pruned"] + att["pruned"])
    quot4 = speed4 / ideal_lin
    tm = paired_medians(th["train_s"]["dense"], th["train_s"]["pruned"])
    tr_d, tr_p = tm["a"], tm["b"]
    train_speedup = tr_d / tr_p

    wall = time.perf_counter() - wall0
    info["loadavg_end"] = os.getloadavg()

    mib = 2**20

    def used(m: dict) -> str:
        n = f"{m['n_used'][0]}+{m['n_used'][1]} of {m['n_total'][0]}+{m['n_total'][1]}"
        return f"quiet samples only, {n}" if m["quiet_only"] else f"all samples, {n}: machine busy"

    rows = [
        ("1", "step time with / without adam_taylor accumulate", f"{ratio1:.4f}",
         f"<= {GOALS['accumulate_overhead']}", status(ratio1 <= GOALS["accumulate_overhead"]),
         f"median {b_med * 1e3:.1f} / {a_med * 1e3:.1f} ms ({used(ab)}); "
         f"90% bootstrap CI [{ci1[0]:.3f}, {ci1[1]:.3f}]; "
         f"paired-block median {paired1:.4f}; accumulate {acc_med * 1e3:.2f} ms/step -> direct estimate "
         f"{direct1:.4f}"),
        ("2", "prune event / dense training step", f"{ratio2:.3f}", f"<= {GOALS['prune_over_step']}",
         status(ratio2 <= GOALS["prune_over_step"]),
         f"prune {prune_med * 1e3:.0f} ms (median of {len(prune_totals)}: "
         f"{', '.join(f'{t * 1e3:.0f}' for t in prune_totals)} ms) / step {a_med * 1e3:.0f} ms"),
        ("3", "peak RSS prune / peak RSS training", f"{ratio3:.4f}", f"<= {GOALS['rss_prune_over_train']}",
         status(ratio3 <= GOALS["rss_prune_over_train"]),
         f"{pr['prune_peak_rss'] / mib:.0f} / {tr['train_peak_rss'] / mib:.0f} MiB; ru_maxrss "
         f"{tr['ru_maxrss_after_training'] / mib:.0f} -> {pr['ru_maxrss_after_prune'] / mib:.0f} MiB"),
        ("4", "fwd tokens/s pruned/dense over ideal (linear FLOPs)", f"{quot4:.3f}", f">= {GOALS['fwd_vs_ideal']}",
         status(quot4 >= GOALS["fwd_vs_ideal"]),
         f"measured {speed4:.3f}x ({tps_p:,.0f} vs {tps_d:,.0f} tok/s, {used(fm)}), ideal linear {ideal_lin:.3f}x "
         f"(linear+attention matmuls {ideal_all:.3f}x)"),
        ("4b", "training-step speed-up pruned/dense (info)", f"{train_speedup:.3f}", "-", "info",
         f"median {tr_p * 1e3:.0f} vs {tr_d * 1e3:.0f} ms ({used(tm)})"),
    ]
    header = ("#", "measurement", "value", "goal", "status", "details")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in [header] + rows]
    table = "\n".join(lines)
    log("")
    log(table)
    noise = (f"other processes used on average {tr['foreign_cores']:.2f} / {pr['foreign_cores']:.2f} / "
             f"{th['foreign_cores']:.2f} of {info['cpu_count']} cores during parts 1 / 2-3 / 4")
    log(f"\nwall time {wall:.0f} s; load average start {info['loadavg_start'][0]:.2f}, end "
        f"{info['loadavg_end'][0]:.2f}; {noise}")
    notes = []
    empty = [i for i, w in enumerate(pr["plan"].mlp_widths_kept()) if w == 0]
    if empty:
        notes.append(
            f"The adam_taylor plan of part 2 removed every MLP channel of layer(s) {empty} (allocation is global and "
            "has a per-layer floor for KV groups, min_kv_groups, but none for MLP channels). The model still runs "
            "(an empty MLP adds zero to the residual stream); whether that is wanted is a method question."
        )
    notes.append(
        f"The accumulate cost is per optimizer step and proportional to the parameters, while the step cost also "
        f"grows with the tokens per step: with {BATCH * SEQ} tokens per step it is {acc_med / a_med:.1%} of a step; "
        "halving the tokens per step roughly doubles that fraction."
    )
    notes.append(
        "With torch.set_num_threads(2) on 2 cores, another process taking one core slows every step about 10x "
        "(OpenMP threads wait on each other), so runs on a busy machine are not comparable; see the noise rule."
    )
    if args.quick:
        notes.append(
            f"Quick mode records only {len(tr['arms']['A'].t)} steps per arm, too few to resolve a 2 % difference "
            "between two medians (step-to-step spread is a few %); the direct estimate is the better number here, "
            "and the full run is the reference."
        )
    for n in notes:
        log("note: " + n)
    if not (ab["quiet_only"] and fm["quiet_only"] and tm["quiet_only"]):
        log("WARNING: the machine was busy with other processes; timings are noisy (try --wait-quiet 300).")

    # ----------------------------------------------------------------------------- files
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "core_bench_quick" if args.quick else "core_bench"
    plan1, plan4 = pr["plan"], th["plan"]
    result = {
        "command": command,
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "wall_s": wall,
        "model": {"config": MODEL, "dtype": "float32", "seed": SEED, "batch": [BATCH, SEQ], "params": counts},
        "repetitions": reps,
        "goals": GOALS,
        "results": {
            "accumulate_overhead": {
                "ratio": ratio1, "goal": GOALS["accumulate_overhead"], "met": ratio1 <= GOALS["accumulate_overhead"],
                "bootstrap90": list(ci1), "direct_estimate": direct1, "paired_block_median": paired1,
                "medians": {k: v for k, v in ab.items() if k not in ("xa", "xb")},
                "block_ratios": tr["block_ratios"], "foreign_cores": tr["foreign_cores"],
                "step_median_s": {"A": a_med, "B": b_med},
                "accumulate_median_s": acc_med,
                "step_rel_iqr": {k: rel_iqr(v.t) for k, v in tr["arms"].items()},
                "step_s": {k: v.to_dict() for k, v in tr["arms"].items()}, "accumulate_s": tr["accumulate"].to_dict(),
            },
            "prune_over_step": {
                "ratio": ratio2, "goal": GOALS["prune_over_step"], "met": ratio2 <= GOALS["prune_over_step"],
                "prune_median_s": prune_med, "foreign_cores": pr["foreign_cores"], "timings": pr["timings"],
                "step_median_s": a_med,
                "plan": {"realised_sparsity": plan1.realised_sparsity, "kv_groups_kept": plan1.kv_groups_kept(),
                         "mlp_widths_kept": plan1.mlp_widths_kept()},
            },
            "rss_prune_over_train": {
                "ratio": ratio3, "goal": GOALS["rss_prune_over_train"], "met": ratio3 <= GOALS["rss_prune_over_train"],
                "train_peak_rss": tr["train_peak_rss"], "prune_peak_rss": pr["prune_peak_rss"],
                "rss_at_training_start": tr["rss_at_start"], "rss_before_snapshot": pr["rss_before_snapshot"],
                "rss_before_prune": pr["rss_before_prune"], "samples": {"train": tr["train_rss_samples"],
                                                                        "prune": pr["prune_rss_samples"]},
                "ru_maxrss": {"before_training": tr["ru_maxrss_before_training"],
                              "after_training": tr["ru_maxrss_after_training"],
                              "before_prune": pr["ru_maxrss_before_prune"],
                              "after_prune": pr["ru_maxrss_after_prune"]},
            },
            "fwd_vs_ideal": {
                "quotient": quot4, "goal": GOALS["fwd_vs_ideal"], "met": quot4 >= GOALS["fwd_vs_ideal"],
                "foreign_cores": th["foreign_cores"],
                "measured_speedup": speed4, "ideal_linear": ideal_lin, "ideal_linear_plus_attention": ideal_all,
                "tokens_per_s": {"dense": tps_d, "pruned": tps_p}, "fwd_median_s": {"dense": fwd_d, "pruned": fwd_p},
                "linear_flops_per_token": lin, "attention_matmul_flops_per_token": att, "params": th["params"],
                "plan": {"realised_sparsity": plan4.realised_sparsity, "kv_groups_kept": plan4.kv_groups_kept(),
                         "mlp_widths_kept": plan4.mlp_widths_kept()},
                "medians": {k: v for k, v in fm.items() if k not in ("xa", "xb")},
                "fwd_s": {k: v.to_dict() for k, v in th["fwd_s"].items()},
            },
            "train_speedup_info": {"speedup": train_speedup, "step_median_s": {"dense": tr_d, "pruned": tr_p},
                                   "ideal_linear": ideal_lin,
                                   "medians": {k: v for k, v in tm.items() if k not in ("xa", "xb")},
                                   "train_s": {k: v.to_dict() for k, v in th["train_s"].items()}},
        },
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")

    md_table = ["| # | measurement | value | goal | status | details |", "|---|---|---|---|---|---|"]
    md_table += [f"| {' | '.join(str(c) for c in r)} |" for r in rows]
    md = f"""# core_bench: cost of nirvana_pl inside training ({result['mode']} run)

Command (from the repository root): `{command}`

Date (UTC): {info['date']}. Machine: {info['cpu_count']} CPU cores ({info['cpu_model']}),
{info['memory_total_gib']} GiB RAM, torch {info['torch']} (CPU, `torch.set_num_threads(2)`),
transformers {info['transformers']}, lightning {info['lightning']}, Python {info['python']}, {info['platform']}.
Load average at start / end: {info['loadavg_start'][0]:.2f} / {info['loadavg_end'][0]:.2f}; the machine is shared:
{noise} (CPU time of all processes minus this one's, per second). Wall time of the run: {wall:.0f} s.

Model: `LlamaForCausalLM(LlamaConfig({', '.join(f'{k}={v}' for k, v in MODEL.items())}))`, fp32, seed {SEED};
{counts['total']:,} parameters ({counts['prunable_attn_mlp']:,} attention+MLP, embeddings {counts['embed_tokens']:,},
lm_head {counts['lm_head']:,}). Random token batches of {BATCH} x {SEQ}; AdamW(lr=1e-4, weight_decay=0.01).

{chr(10).join(md_table)}

## How each number is measured

Noise rule (the machine is shared). For every timed sample the script also records how much CPU other processes
used while it ran (`psutil.cpu_times()` of the whole machine minus this process's CPU time). Medians are taken over
the *quiet* samples (other processes < {QUIET_CORES} cores) when both arms of a comparison have at least 30 % (and
at least 3) quiet samples; otherwise over all samples, and the table says "machine busy". The table shows which
rule was used and how many samples went in. All samples are in the JSON.

1. **Accumulate overhead.** Plain PyTorch loop (no Lightning, for timing precision): `zero_grad`, forward with
   labels, backward, `AdamW.step()` (Lightning's order). Arm B adds
   `AdamStateSaliency("adam_taylor").accumulate(model, [opt])` after the step, which is what
   `NirvanaPruningCallback.on_train_batch_end` does in its warm-up window (the rest of the
   hook is a few comparisons). {reps['train_warmup']} warm-up steps, then {reps['ab_blocks']} blocks of
   {reps['ab_steps_per_block']} step(s) per arm in alternating order (AB, BA, ...); value = median(B) / median(A)
   (noise rule above); "paired-block median" = median over blocks of the within-block ratio (all samples).
   The accumulate call is also timed alone; "direct estimate" = 1 + median(accumulate) / median(A), which is less
   sensitive to machine noise than the difference of two medians.
2. **Prune event.** The body of `NirvanaPruningCallback._prune` for an `adam_*` estimator on the model trained in
   part 1: parameter counts, `adam.scores()`, `allocate(s=0.5, gamma=3)`, `apply_plan(model, plan, [opt])` (slices
   AdamW's `exp_avg`/`exp_avg_sq`), `PruneRecord`, `write_report` (JSON to a temp dir), `format_summary`,
   `adam.reset()`; only Lightning's `self.log` calls are left out. Median over the real event plus
   {reps['prune_repeats']} repeat(s) on a copy restored from a disk snapshot (taken before the real prune, so that
   it is not resident), over the median dense step time of arm A.
   Split of the real event: {', '.join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in pr['timings'][0].items())}.
3. **Peak RSS.** A psutil thread samples the resident set size every 5 ms in this process. Training peak = max over
   all training steps of part 1 (measured first); prune peak = max from just before the real prune event to just
   after it (the model, AdamW state and gradients of the last step are all still alive, as in Lightning). RSS just
   before the prune: {pr['rss_before_prune'] / mib:.0f} MiB. Cross-check with the kernel's high-water mark
   `ru_maxrss`: {tr['ru_maxrss_after_training'] / mib:.0f} MiB after training,
   {pr['ru_maxrss_after_prune'] / mib:.0f} MiB after the prune (unchanged means the prune never exceeded the
   training peak).
4. **Throughput.** A fresh dense model and a deep copy pruned by `nirvana_pl.oneshot.prune(saliency="magnitude",
   sparsity=0.5, gamma=3)` (non-uniform widths; realised sparsity {plan4.realised_sparsity:.3f}; kept KV groups per
   layer {plan4.kv_groups_kept()}, MLP widths {plan4.mlp_widths_kept()}). Forward of a {BATCH}x{SEQ} batch in
   `eval()` + `torch.inference_mode()`, `use_cache=False`, {reps['fwd_warmup']} warm-up then {reps['fwd_reps']}
   alternating repeats; tokens/s from the medians. Ideal = ratio of sum over every `nn.Linear` (lm_head
   included) of 2*in*out per token: {lin['dense']:,} vs {lin['pruned']:,} FLOPs/token. Attention score/value matmuls
   (4*T*n_q*head_dim per token per layer, T={SEQ}) listed separately: {att['dense']:,} vs {att['pruned']:,}
   FLOPs/token. Training-step speed-up (info): each model with its own AdamW, {reps['train_cmp_warmup']} warm-up
   then {reps['train_cmp_reps']} alternating steps each, ratio of medians.

Prune event of part 2 (adam_taylor): realised sparsity {plan1.realised_sparsity:.3f}, kept KV groups per layer
{plan1.kv_groups_kept()}, MLP widths {plan1.mlp_widths_kept()}.

## Notes

{chr(10).join("- " + n for n in notes)}

Console table of this run:

```
{table}
```

Raw timings: `{stem}.json`.
"""
    (out_dir / f"{stem}.md").write_text(md)
    log(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
