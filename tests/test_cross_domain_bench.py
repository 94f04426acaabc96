"""benchmarks/cross_domain.py: disjoint draws, the off-/in-domain summary and the goal table it reports."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # it imports its data helpers from quality.py
_SPEC = importlib.util.spec_from_file_location("cross_domain_bench", _BENCH / "cross_domain.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_a_draw_takes_disjoint_windows_and_seeds_differ():
    cfg = bench.CONFIGS["quick"]
    pool = torch.arange(400 * cfg["train_len"]).view(400, cfg["train_len"])  # every window is unique
    data = {"pools": {dom: pool for dom in bench.DOMAINS}}
    d = bench.draw(data, cfg, "plays", seed=0)
    rows = [r for part in ("warmup", "calibration", "probe", "recovery") for b in d[part] for r in b]
    assert len({int(r[0]) for r in rows}) == len(rows)  # no window used twice
    assert len(d["warmup"]) == cfg["warmup"] and len(d["recovery"]) == cfg["recovery"]
    assert sum(b.shape[0] for b in d["calibration"]) == cfg["calib_windows"]
    other = bench.draw(data, cfg, "plays", seed=1)
    assert not torch.equal(other["calibration"][0], d["calibration"][0])
    with pytest.raises(SystemExit, match="windows"):
        bench.draw({"pools": {"plays": pool[:5]}}, cfg, "plays", seed=0)


def _stage(ppl_of):
    """A zero-shot stage whose perplexity is ppl_of(arm, calibration domain, evaluation domain, seed)."""
    stage = {}
    for arm in ("functional@3", "mine@2"):
        for cal in bench.DOMAINS:
            for seed in (0, 1):
                stage[f"{cal}|{seed}|{arm}|0.4"] = {ev: ppl_of(arm, cal, ev, seed) for ev in bench.DOMAINS}
    return stage


def test_summary_separates_in_and_off_domain_and_measures_the_seed_spread():
    def ppl(arm, cal, ev, seed):
        return (10.0 if cal == ev else 40.0) * (2.0 if seed else 1.0)

    m = bench.summarise(_stage(ppl), (0, 1), "functional@3", 0.4)
    assert m["in"] == pytest.approx(10 * math.sqrt(2)) and m["off"] == pytest.approx(40 * math.sqrt(2))
    assert m["log_std"] == pytest.approx(math.log(2) / 2)  # two seeds, log ppl apart by log 2
    assert m["draws"] == 2 and len(m["cells"]) == 9


def test_goal_table_counts_the_cells_met_per_sparsity():
    def ppl(arm, cal, ev, seed):  # the candidate: 0.5x everywhere but one off-domain cell at 1.2x
        base = 100.0
        if arm == "functional@3":
            return base
        return base * (1.2 if (cal, ev) == ("pydoc", "plays") else 0.5)

    lines = bench._goal_table(_stage(ppl), (0, 1), (0.4,), "mine@2", "functional@3")
    row = next(line for line in lines if line.startswith("| 0.4 |"))
    assert row.startswith("| 0.4 | 0, 1 |") and row.endswith("| 8/9 |") and "1.20" in row and "0.50" in row


def test_goal_table_compares_the_seeds_both_arms_were_run_on():
    def ppl(arm, cal, ev, seed):  # seed 1 is a bad draw for everyone
        return (50.0 if arm == "mine@2" else 100.0) * (10.0 if seed else 1.0)

    stage = {k: v for k, v in _stage(ppl).items() if not k.startswith(tuple(f"{c}|1|functional@3" for c in
                                                                              bench.DOMAINS))}  # fmt: skip
    lines = bench._goal_table(stage, (0, 1), (0.4,), "mine@2", "functional@3")
    row = next(line for line in lines if line.startswith("| 0.4 |"))
    assert row.startswith("| 0.4 | 0 |") and row.endswith("| 9/9 |") and "0.50" in row


def test_arms_run_on_fewer_seeds_are_compared_on_the_draws_every_arm_has():
    def ppl(arm, cal, ev, seed):  # seed 1 is a bad draw; only functional@3 was run on it
        return (50.0 if arm == "mine@2" else 100.0) * (10.0 if seed else 1.0)

    stage = {k: v for k, v in _stage(ppl).items() if not k.startswith(tuple(f"{c}|1|mine@2" for c in bench.DOMAINS))}
    lines = bench._same_draws_table(stage, (0, 1), (0.4,), ["functional@3", "mine@2"], "mine@2", "functional@3")
    assert "seed 0," in lines[0]
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| mine@2 **(default)** | 50.0 | 50.0 |", "| functional@3 (paper) | 100.0 | 100.0 |"]
    assert bench._same_draws_table(_stage(ppl), (0, 1), (0.4,), ["functional@3", "mine@2"], "mine@2", "x") == []


def test_the_matrix_follows_the_callbacks_default():
    import inspect

    from nirvana_pl import NirvanaPruningCallback

    params = inspect.signature(NirvanaPruningCallback).parameters
    assert bench.default_arm() == (params["saliency"].default, params["gamma"].default)
    arms = bench.arms(bench.CONFIGS["full"], bench.default_arm())
    assert bench.PAPER in arms and bench.default_arm() in arms
    assert {e for e, _ in arms} == set(bench.ALL_ESTIMATORS)
    assert len(arms) == len(set(arms))


def test_recovery_fit_prunes_with_the_callback_and_trains_on(tmp_path, monkeypatch):
    """One recovery cell on a tiny Llama: warm-up at a tiny lr, the callback prunes, recovery at the real lr."""
    from conftest import tiny_llama

    from nirvana_pl.units import prunable_parameter_count

    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    cfg = dict(bench.CONFIGS["quick"], warmup=3, recovery=3, batch=2)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 128, (40, 16), generator=gen)
    d = {"warmup": list(rows[:6].view(3, 2, 16)), "recovery": list(rows[6:12].view(3, 2, 16)),
         "calibration": [rows[12:14]], "probe": [rows[14:16]]}  # fmt: skip
    model = tiny_llama()
    dense = prunable_parameter_count(model)
    cell = bench.recover(model, d, cfg, *bench.default_arm(), 0.4)
    assert abs(cell["realised"] - 0.4) < 0.05 and cell["gamma"] == bench.default_arm()[1]
    assert prunable_parameter_count(model) < dense and math.isfinite(cell["train_loss_last"])
    control = tiny_llama()
    bench.recover(control, d, cfg, None, None, 0.0)  # the dense control: the same steps, no prune
    assert prunable_parameter_count(control) == dense


def test_recovery_table_compares_arms_on_the_domains_every_arm_finished():
    def cells(scale):
        return {ev: scale * (10 if ev == "plays" else 2) for ev in bench.DOMAINS}

    out = {"config": {**bench.CONFIGS["quick"], "sparsities": [0.4]}, "default": ["mine", 2.0],
           "zero_shot": {}, "recovery": {}}  # fmt: skip
    for arm, before, after in (("functional@3", 3.0, 1.0), ("mine@2", 2.0, 1.5)):
        for cal in ("pydoc", "plays"):
            out["zero_shot"][f"{cal}|0|{arm}|0.4"] = cells(before)
            out["recovery"][f"{cal}|0|{arm}|0.4"] = cells(after)
    out["recovery"]["pysrc|0|mine@2|0.4"] = cells(100.0)  # a domain only one arm has finished: left out
    text = "\n".join(bench._recovery_table(out, [0.4]))
    assert "calibration domains pydoc, plays, the others not run yet" in text
    off = lambda scale: bench.geomean([scale * 2, scale * 2, scale * 10, scale * 2])  # noqa: E731 (off-domain cells)
    assert f"| mine@2 **(default)** | {off(2.0):.1f} -> {off(1.5):.1f} |" in text
    assert f"| functional@3 (paper) | {off(3.0):.1f} -> {off(1.0):.1f} |" in text
    assert "- s = 0.4: mine@2 < functional@3 / functional@3 < mine@2 (the order changes)" in text
