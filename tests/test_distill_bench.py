"""benchmarks/distill_bench.py: one arm's fit on a tiny Llama, the gap-closed arithmetic and the goal table."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # it imports its data and Lightning helpers from quality.py
_SPEC = importlib.util.spec_from_file_location("distill_bench", _BENCH / "distill_bench.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_gap_closed():
    assert bench.gap_closed(100.0, 10.0, 10.0) == pytest.approx(1.0)
    assert bench.gap_closed(100.0, 100.0, 10.0) == pytest.approx(0.0)
    assert bench.gap_closed(100.0, 10 ** 1.5, 10.0) == pytest.approx(0.5)  # half of the log gap
    assert bench.gap_closed(10.0, 12.0, 10.0) is None  # no gap to close


def test_an_arm_evaluates_after_the_prune_and_along_recovery(tmp_path):
    from conftest import tiny_llama

    from nirvana_pl.units import prunable_parameter_count

    cfg = dict(bench.CONFIGS["quick"], warmup=2, recovery=3, recovery_points=(1, 3), eval_batch=2)
    gen = torch.Generator().manual_seed(0)
    data = {"train_batches": list(torch.randint(0, 128, (5, 2, 16), generator=gen)),
            "heldout": {"pydoc": torch.randint(0, 128, (2, 16), generator=gen),
                        "shakespeare": torch.randint(0, 128, (2, 16), generator=gen)}}  # fmt: skip
    model = tiny_llama()
    dense = prunable_parameter_count(model)
    row = bench.run_arm(model, data, cfg, 0.4, {"weight": 1.0}, str(tmp_path))
    assert set(row["ppl"]) == {"0", "1", "3"} and all(math.isfinite(v) for p in row["ppl"].values() for v in p.values())
    assert prunable_parameter_count(model) < dense and abs(row["realised"] - 0.4) < 0.05
    assert len(row["losses"]) == 5
    model = tiny_llama()
    control = bench.run_arm(model, data, cfg, None, None, str(tmp_path))  # the dense control
    assert prunable_parameter_count(model) == dense and set(control["ppl"]) == {"0", "1", "3"}


def test_cost_summary_takes_medians_over_runs():
    run = {"step_seconds": 2.0, "peak_rss_mib": 10.0, "rss_before_steps_mib": 9.0, "step_times": [2.0]}
    runs = {"distill": [run, dict(run, step_seconds=4.0), dict(run, step_seconds=3.0)]}
    summary = bench.summarise_cost(runs)["distill"]
    assert summary["step_seconds"] == 3.0 and summary["peak_rss_mib"] == 10.0 and len(summary["runs"]) == 3


def test_report_states_the_goals_met_and_missed():
    cfg = dict(bench.CONFIGS["quick"], sparsities=(0.5,), recovery_points=(2, 4))

    def ppl(after_prune, r2, r4):
        return {"0": after_prune, "2": r2, "4": r4}

    arms = {
        "dense": {"ppl": {"2": {"pydoc": 10.0, "shakespeare": 40.0}, "4": {"pydoc": 10.0, "shakespeare": 40.0}}},
        "plain|0.5": {"ppl": {k: {"pydoc": v, "shakespeare": 4 * v} for k, v in ppl(100.0, 60.0, 50.0).items()}},
        "distill|0.5": {"ppl": {k: {"pydoc": v, "shakespeare": 4 * v} for k, v in ppl(100.0, 20.0, 12.0).items()}},
        "mix|0.5": {"ppl": {k: {"pydoc": v, "shakespeare": 4 * v} for k, v in ppl(100.0, 30.0, 20.0).items()}},
    }
    seconds = {"dense": 2.0, "pruned": 1.2, "distill": 2.4}
    cost = {a: {"step_seconds": t, "peak_rss_mib": 1000.0} for a, t in seconds.items()}
    text = bench.render({"config": cfg, "arms": arms, "cost": cost}, "cmd")
    assert "12.00 (92%)" in text  # log(100/12) / log(100/10)
    assert "| distill: 92% | met |" in text
    assert "| 1.20x the dense step | missed |" in text
