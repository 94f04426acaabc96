"""benchmarks/cross_domain.py: disjoint draws, the off-/in-domain summary and the goal table it reports."""

import importlib.util
import contextlib
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


def test_goal_table_references_each_off_domain_cell_to_the_default_warmed_up_on_the_evaluation_domain():
    def ppl(arm, cal, ev, seed):  # per evaluation domain a scale; mine: 0.3x the paper in-domain, 0.95x off it
        scale = bench.DOMAINS.index(ev) + 1
        if arm == "functional@3":
            return 100.0 * scale
        return (30.0 if cal == ev else 95.0) * scale

    lines = bench._goal_table(_stage(ppl), (0, 1), (0.4,), "mine@2", "functional@3")
    ref = next(line for line in lines if line.startswith("| 0.4 ref |")).split(" | ")
    cells = dict(zip((f"{c}->{e}" for c in bench.DOMAINS for e in bench.DOMAINS), ref[2:-1]))
    assert {k: v for k, v in cells.items() if k.split("->")[0] != k.split("->")[1]} == dict.fromkeys(
        [f"{c}->{e}" for c in bench.DOMAINS for e in bench.DOMAINS if c != e], "0.30")
    assert all(cells[f"{d}->{d}"] == "-" for d in bench.DOMAINS) and ref[-1] == "6/6 |"
    row = next(line for line in lines if line.startswith("| 0.4 |"))
    assert row.endswith("| 3/9 |") and "0.95" in row


def test_goal_table_best_row_takes_each_cell_from_whichever_arm_is_lowest_there():
    def ppl(arm, cal, ev, seed):  # mine: 0.5x on pydoc calibrations, 1.5x elsewhere; other: the mirror image
        if arm == "functional@3":
            return 100.0
        low = (cal == "pydoc") == (arm == "mine@2")
        return 100.0 * (0.5 if low else 1.5)

    stage = _stage(ppl)
    for cal in bench.DOMAINS:
        for seed in (0, 1):
            stage[f"{cal}|{seed}|other@3|0.4"] = {ev: ppl("other@3", cal, ev, seed) for ev in bench.DOMAINS}
    stage["plays|0|late@3|0.4"] = {ev: 1.0 for ev in bench.DOMAINS}  # one seed only: not comparable, left out
    names = ["functional@3", "mine@2", "other@3", "late@3"]
    lines = bench._goal_table(stage, (0, 1), (0.4,), "mine@2", "functional@3", names)
    assert next(ln for ln in lines if ln.startswith("| 0.4 |")).endswith("| 3/9 |")
    best = next(ln for ln in lines if ln.startswith("| 0.4 best |")).split(" | ")
    assert best[2:-1] == ["0.50"] * 9 and best[-1] == "9/9 |"
    del stage["pysrc|1|other@3|0.4"]  # other now lacks a seed the default has: the best row is the default's own
    best = next(ln for ln in bench._goal_table(stage, (0, 1), (0.4,), "mine@2", "functional@3", names)
                if ln.startswith("| 0.4 best |")).split(" | ")  # fmt: skip
    assert best[-1] == "3/9 |" and best[2:5] == ["0.50"] * 3 and best[5:-1] == ["1.50"] * 6


def test_a_ratio_that_two_decimals_would_round_onto_a_limit_shows_three():
    assert bench._ratio_cell(0.8001) == "0.8001" and bench._ratio_cell(0.7996) == "0.7996"
    assert bench._ratio_cell(1.004) == "1.004" and bench._ratio_cell(0.8) == "0.80"
    assert bench._ratio_cell(0.7949) == "0.79" and bench._ratio_cell(1.16) == "1.16"


def test_goal_by_arm_counts_cells_and_the_worst_off_domain_ratio_on_the_shared_draws():
    def ppl(arm, cal, ev, seed):  # mine: 0.5x everywhere, but 1.2x on one off-domain cell of seed 1 only
        return 100.0 * (1.0 if arm == "functional@3" else 1.2 if (cal, ev, seed) == ("pydoc", "plays", 1) else 0.5)

    stage = _stage(ppl)
    row = next(ln for ln in bench._goal_by_arm_table(stage, (0, 1), (0.4,), ["functional@3", "mine@2"], "mine@2",
                                                     "functional@3") if ln.startswith("| mine@2"))  # fmt: skip
    # over seeds 0 and 1 the odd cell is sqrt(0.5 * 1.2) = 0.77: met, and the worst off-domain ratio
    assert row == "| mine@2 **(default)** | 0, 1 | 9/9, 0.77 | 9/9 |"
    del stage["plays|1|mine@2|0.4"]  # mine now lacks seed 1 on one domain: every arm is compared on seed 0
    row = next(ln for ln in bench._goal_by_arm_table(stage, (0, 1), (0.4,), ["functional@3", "mine@2"], "mine@2",
                                                     "functional@3") if ln.startswith("| mine@2"))  # fmt: skip
    assert row == "| mine@2 **(default)** | 0 | 9/9, 0.50 | 9/9 |"


def test_with_budgets_of_removes_as_many_units_per_layer_as_the_budgets_and_the_units_the_choice_ranks_lowest():
    from conftest import tiny_llama

    from nirvana_pl.allocate import AllocationConfig, allocate
    from nirvana_pl.saliency import UnitScores
    from nirvana_pl.units import find_units

    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    units = find_units(model)

    def random_scores():
        return UnitScores(attn=[torch.rand(u.num_kv_groups, generator=gen) for u in units],
                          mlp=[torch.rand(u.mlp_width, generator=gen) for u in units])  # fmt: skip

    budgets, choice = random_scores(), random_scores()
    config = AllocationConfig(sparsity=0.4, gamma=3.0, mlp_round_to=1)
    by_budgets = allocate(model, budgets, config)
    mixed = allocate(model, bench.with_budgets_of(budgets, choice), config)
    for lb, lm, c_attn, c_mlp in zip(by_budgets.layers, mixed.layers, choice.attn, choice.mlp):
        assert len(lm.kept_kv_groups) == len(lb.kept_kv_groups)
        assert len(lm.kept_mlp_channels) == len(lb.kept_mlp_channels)
        assert sorted(lm.kept_mlp_channels) == sorted(c_mlp.argsort(descending=True)[: len(lm.kept_mlp_channels)]
                                                      .tolist())  # fmt: skip
        assert sorted(lm.kept_kv_groups) == sorted(c_attn.argsort(descending=True)[: len(lm.kept_kv_groups)].tolist())
    assert any(lm.kept_mlp_channels != lb.kept_mlp_channels for lb, lm in zip(by_budgets.layers, mixed.layers))


def test_the_self_sampled_candidates_score_the_warm_up_batches_and_the_models_own_windows():
    from types import SimpleNamespace

    from conftest import tiny_llama

    from nirvana_pl.saliency import compute_scores, geometric_mean

    model = tiny_llama()
    windows = bench.sample_windows(model, SimpleNamespace(bos_token_id=1, eos_token_id=2), n=5, length=12)
    assert len(windows) == 5 and all(w.shape == (12,) and w[0] == 1 for w in windows)
    assert len({tuple(w.tolist()) for w in windows}) == 5  # sampled, not greedy
    sampled = [torch.stack(windows[:4])]
    cfg = dict(bench.CONFIGS["quick"], warmup=2, batch=2)
    rows = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    d = {"warmup": list(rows[:4].view(2, 2, 12)), "calibration": [rows[4:6]]}
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    scores, seconds = bench.draw_scores(model, d, cfg, {"fisher_functional", "fisher_functional+sampled"}, sampled)
    assert {"fisher_functional", "fisher_functional+sampled"} <= set(scores) and "fisher_functional+sampled" in seconds
    expected = compute_scores(model, "fisher_functional", d["warmup"] + sampled, optimizer_scores=scores["adam_fisher"])
    for got, want in zip(scores["fisher_functional+sampled"].mlp, expected.mlp):
        torch.testing.assert_close(got, want, rtol=0.02, atol=1e-6)  # (the benchmark scores under bf16 autocast)
    assert any(not torch.equal(a, b) for a, b in zip(scores["fisher_functional+sampled"].mlp,
                                                     scores["fisher_functional"].mlp))  # fmt: skip
    model.load_state_dict(dense)
    scores_self, _ = bench.draw_scores(model, d, cfg, {"fisher_functional+self"}, sampled)
    functional = compute_scores(model, "functional", d["warmup"] + sampled)
    fisher = geometric_mean(scores_self["adam_fisher"], bench.loss_fisher(model, sampled))
    for got, want in zip(scores_self["fisher_functional+self"].attn, geometric_mean(fisher, functional).attn):
        torch.testing.assert_close(got, want, rtol=0.02, atol=1e-6)
    model.load_state_dict(dense)
    with pytest.raises(ValueError, match="sampled windows"):
        bench.draw_scores(model, d, cfg, {"fisher_functional+sampled"}, None)


def test_twice_the_sampled_text_is_the_librarys_num_sampled_batches_and_the_pooled_variant_shares_its_windows():
    from conftest import tiny_llama

    from nirvana_pl.saliency import compute_scores

    model = tiny_llama()
    cfg = dict(bench.CONFIGS["quick"], warmup=2, batch=2)
    rows = torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    d = {"warmup": list(rows[:4].view(2, 2, 12)), "calibration": [rows[4:6]]}
    names = {"fisher_functional_self+x2", "fisher_functional_self+x2pooled"}
    scores, seconds = bench.draw_scores(model, d, cfg, names)
    assert names <= set(seconds) and all(seconds[n] > 0 for n in names)
    with bench.bf16(), bench.sampler_of("fisher_functional_self+x2"):  # (sampled from BOS alone, as measured)
        library = compute_scores(model, "fisher_functional_self", d["warmup"], optimizer_scores=scores["adam_fisher"],
                                 num_sampled_batches=4)  # fmt: skip
    for got, want in zip(scores["fisher_functional_self+x2"].attn + scores["fisher_functional_self+x2"].mlp,
                         library.attn + library.mlp):  # fmt: skip
        torch.testing.assert_close(got, want)
    pooled, balanced = scores["fisher_functional_self+x2pooled"], scores["fisher_functional_self+x2"]
    assert any(not torch.equal(a, b) for a, b in zip(pooled.mlp, balanced.mlp))


def test_two_stages_rescore_with_the_first_half_masked_and_the_final_plan_removes_those_units_first():
    from conftest import tiny_llama

    from nirvana_pl.allocate import AllocationConfig, DenseReference, allocate
    from nirvana_pl.oneshot import staged_plan
    from nirvana_pl.saliency import compute_scores
    from nirvana_pl.units import find_units

    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(bench.CONFIGS["quick"], warmup=2, batch=2, sparsities=(0.4,))
    rows = torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    d = {"warmup": list(rows[:4].view(2, 2, 12)), "calibration": [rows[4:6]]}
    name = "fisher_functional_self+vocab+2stage"  # (the default's scores)
    scores, seconds = bench.draw_scores(model, d, cfg, {name})
    assert seconds[name] > seconds["fisher_functional_self+vocab"] > 0
    first, second = scores["fisher_functional_self+vocab"], scores[name][0.4]
    reference = DenseReference.of(model)
    half = allocate(model, first, AllocationConfig(sparsity=0.2, gamma=3.0), reference)
    for lp, attn, mlp, u in zip(half.layers, second.attn, second.mlp, find_units(model)):
        out_kv = sorted(set(range(u.num_kv_groups)) - set(lp.kept_kv_groups))
        out_mlp = sorted(set(range(u.mlp_width)) - set(lp.kept_mlp_channels))
        assert torch.all(attn[out_kv] == 0) and torch.all(mlp[out_mlp] == 0)  # masked out: no gradient, no score
        assert torch.all(mlp[sorted(lp.kept_mlp_channels)] > 0)
    assert any(len(lp.kept_mlp_channels) < u.mlp_width for lp, u in zip(half.layers, find_units(model)))
    plan, _ = bench.prune_arm(model, scores, name, 3.0, 0.4, cfg, None, reference)
    for lh, lf in zip(half.layers, plan.layers):  # the units out after the first stage stay out
        assert set(lf.kept_mlp_channels) <= set(lh.kept_mlp_channels)
        assert set(lf.kept_kv_groups) <= set(lh.kept_kv_groups)
    assert plan.realised_sparsity > half.realised_sparsity
    assert any(not torch.equal(a, b) for a, b in zip(second.mlp, first.mlp))

    def score(arm=name):  # what the callback's second stage computes, as the benchmark scores (bf16 autocast)
        with bench.bf16(), bench.sampler_of(arm):
            return compute_scores(model, "fisher_functional_self", d["warmup"][-8:],
                                  optimizer_scores=scores["adam_fisher"], seed=0)  # fmt: skip

    library = staged_plan(model, "fisher_functional_self", AllocationConfig(sparsity=0.4, gamma=3.0), reference, first,
                          score, stages=2)  # fmt: skip
    assert library.layers == plan.layers  # the candidate is the library's scoring_stages=2
    model.load_state_dict(dense)  # (the draw warmed the model up in place; score the same warm-up again)
    scores3, _ = bench.draw_scores(model, d, cfg, {"fisher_functional_self+3stage"})
    plan3, _ = bench.prune_arm(model, scores3, "fisher_functional_self+3stage", 3.0, 0.4, cfg, None, reference)
    torch.testing.assert_close(scores3["adam_fisher"].mlp, scores["adam_fisher"].mlp)  # (score() reads these)
    library3 = staged_plan(model, "fisher_functional_self", AllocationConfig(sparsity=0.4, gamma=3.0), reference,
                           scores3["fisher_functional_self"], lambda: score("fisher_functional_self+3stage"),
                           stages=3)  # fmt: skip
    assert library3.layers == plan3.layers and library3.score_summary["scoring_stages"] == 3
    assert library3.layers != plan.layers


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
    callback = NirvanaPruningCallback(sparsity=0.3, prune_at=4, warmup_steps=4)
    name, gamma = bench.default_arm()
    assert bench.library_settings(name) == (params["saliency"].default, callback.scoring_stages, callback.compensate)
    assert name == "fisher_functional_self+vocab+2stage+comp"
    assert bench.scored_as(name) == "fisher_functional_self+vocab+2stage"
    assert bench.scored_once(name) == "fisher_functional_self+vocab"
    assert gamma == params["gamma"].default
    assert bench.library_settings("fisher_functional_self") == ("fisher_functional_self", 1, False)
    assert bench.library_settings("fisher_functional_self+x2") == ("fisher_functional_self+x2", 1, False)
    assert bench.library_settings("fisher_functional_self+3stage") == ("fisher_functional_self", 3, False)
    assert bench.library_settings("fisher_functional_self+2stage") == ("fisher_functional_self", 2, False)
    assert bench.scored_once("fisher_functional_self+2stage+comp") == "fisher_functional_self"
    assert bench.staged_arms({name}) == {"fisher_functional_self+vocab+2stage": ("fisher_functional_self", 2)}
    # the arms measured before the library opened its windows from the vocabulary are sampled from BOS alone
    from nirvana_pl import sampling

    assert sampling.OPEN_FROM_VOCABULARY
    with bench.sampler_of("fisher_functional_self+2stage+comp"):
        assert not sampling.OPEN_FROM_VOCABULARY
        with bench.sampler_of(name):
            assert sampling.OPEN_FROM_VOCABULARY
        assert not sampling.OPEN_FROM_VOCABULARY
    assert sampling.OPEN_FROM_VOCABULARY
    assert (bench.library_settings(name)[0], gamma) in bench.recovery_arms(bench.default_arm())
    arms = bench.arms(bench.CONFIGS["full"], bench.default_arm())
    assert bench.PAPER in arms and bench.default_arm() in arms
    assert {e for e, _ in arms} == set(bench.ALL_ESTIMATORS) | set(bench.CANDIDATES)
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
    assert cell["scoring_stages"] == bench.library_settings(bench.default_arm()[0])[1] == 2
    assert cell["compensated"]
    assert prunable_parameter_count(model) < dense and math.isfinite(cell["train_loss_last"])
    control = tiny_llama()
    bench.recover(control, d, cfg, None, None, 0.0)  # the dense control: the same steps, no prune
    assert prunable_parameter_count(control) == dense


def test_recovery_table_compares_arms_on_the_draws_every_arm_finished():
    def cells(scale, prune_seconds=None):
        return {ev: scale * (10 if ev == "plays" else 2) for ev in bench.DOMAINS} | (
            {"prune_seconds": prune_seconds} if prune_seconds is not None else {})

    out = {"config": {**bench.CONFIGS["quick"], "sparsities": [0.4], "recovery_seeds": [0, 1]},
           "default": ["mine", 2.0], "zero_shot": {}, "recovery": {}}  # fmt: skip
    for arm, before, after in (("functional@3", 3.0, 1.0), ("mine@2", 2.0, 1.5)):
        for draw, scale in (("pydoc|0", 1), ("plays|0", 1), ("pydoc|1", 4)):  # seed 1: a draw 4x worse
            out["zero_shot"][f"{draw}|{arm}|0.4"] = cells(before * scale)
            seconds = {"pydoc|0": 2, "plays|0": 1, "pydoc|1": 4}[draw] * len(arm)
            out["recovery"][f"{draw}|{arm}|0.4"] = cells(after * scale, prune_seconds=seconds)
    out["recovery"]["pysrc|0|mine@2|0.4"] = cells(100.0, 0.1)  # a draw only one arm has finished: left out
    out["recovery"]["plays|1|functional@3|0.4"] = cells(100.0, 0.1)
    text = "\n".join(bench._recovery_table(out, [0.4]))
    assert "(draws seed 0: pydoc, plays; seed 1: pydoc; the others not run yet)" in text

    def off(x):  # the off-domain cells: pydoc -> plays and pysrc over seeds 0 and 1, plays -> pydoc and pysrc
        return bench.geomean([bench.geomean([10 * x, 40 * x]), bench.geomean([2 * x, 8 * x]), 2 * x, 2 * x])

    assert f"| mine@2 **(default)** | {off(2.0):.1f} -> {off(1.5):.1f} |" in text
    assert f"| functional@3 (paper) | {off(3.0):.1f} -> {off(1.0):.1f} |" in text
    # the prune event's seconds: the fastest of the arm's cells on those draws
    assert text.count(f"| {len('mine@2'):.1f} |") == 1 and text.count(f"| {len('functional@3'):.1f} |") == 1
    assert "- s = 0.4: mine@2 < functional@3 / functional@3 < mine@2 (the order changes)" in text

    # every draw done by both, then a newer arm run on one draw only: the full table stays, and a second one
    # compares every arm on that draw
    for arm in ("functional@3", "mine@2"):
        for draw in ("pysrc|0", "plays|1", "pysrc|1"):
            out["recovery"][f"{draw}|{arm}|0.4"] = cells(1.0, 1.0)
    out["recovery"]["pydoc|0|new@3|0.4"] = cells(1.0, 7.0)
    text = "\n".join(bench._recovery_table(out, [0.4]))
    assert "(draws seed 0: pydoc, plays, pysrc; seed 1: pydoc, plays, pysrc)" in text
    assert "inside the fit, new@3 included)" in text
    assert "(draws seed 0: pydoc; the arms not in the first table have not been recovered on the others)" in text
    assert text.count("| new@3 |") == 1 and text.count("| functional@3 (paper) |") == 2

    # a new default run on more draws than another new arm: a table of the complete arms and the default on the
    # default's draws, before the one of every arm on the draws they all have
    out["default"] = ["newer", 3.0]
    for draw in ("pydoc|0", "plays|0", "pysrc|0", "pydoc|1"):
        out["recovery"][f"{draw}|newer@3|0.4"] = cells(1.0, 5.0)
    text = "\n".join(bench._recovery_table(out, [0.4]))
    assert "inside the fit, newer@3 included)" in text and "(draws seed 0: pydoc, plays, pysrc; seed 1: pydoc; " in text
    assert "inside the fit, new@3, newer@3 included)" in text
    assert text.count("| newer@3 **(default)** |") == 2 and text.count("| functional@3 (paper) |") == 3


def test_every_estimator_is_recovered_on_the_survey_seeds_and_gamma_auto_chooses_on_a_probe_of_the_draw():
    default = bench.default_arm()
    main, survey = bench.recovery_arms(default), bench.survey_arms(default)
    assert not set(main) & set(survey) and len(survey) == len(set(survey))
    assert {e for e, _ in main + survey} >= set(bench.ALL_ESTIMATORS) and (bench.PAPER[0], "auto") in survey
    # gamma="auto" in the callback: a selector with one candidate set, the draw's calibration and probe windows
    from nirvana_pl import CalibrationSelector

    cfg = dict(bench.CONFIGS["quick"], calib_windows=4, probe_windows=2, batch=2)
    rows = torch.arange(6 * 8).view(6, 8)
    d = {"calibration": [rows[:2], rows[2:4]], "probe": [rows[4:6]]}
    selector = bench.recovery_calibration(d, cfg, "functional", "auto")
    assert isinstance(selector, CalibrationSelector) and selector.num_candidates == 1
    assert torch.equal(selector.pool, rows) and selector.probe_pool_windows == 2
    assert selector.samples_per_candidate == 4 and selector.probe_seq_len == 8
    assert bench.recovery_calibration(d, cfg, "functional", 3.0) is d["calibration"]
    assert bench.recovery_calibration(d, cfg, "adam_fisher", 2.0) is None


def test_recovery_table_names_the_gamma_the_kl_test_chose_per_cell():
    out = {"config": {**bench.CONFIGS["quick"], "sparsities": [0.4], "recovery_seeds": [0]},
           "default": ["functional", 3.0], "zero_shot": {}, "recovery": {}}  # fmt: skip
    for draw, gamma in (("pydoc|0", 2.0), ("plays|0", 4.5), ("pysrc|0", 3.0)):
        for arm in ("functional@3", "functional@auto"):
            cell = {ev: 10.0 for ev in bench.DOMAINS} | {"prune_seconds": 1.0}
            out["recovery"][f"{draw}|{arm}|0.4"] = cell | ({"gamma": gamma} if arm.endswith("auto") else {})
    text = "\n".join(bench._recovery_table(out, [0.4]))
    # functional@auto is a survey arm: its own table, after the one of the arms recovered on every draw
    assert text.index("inside the fit)") < text.index("inside the fit, every estimator)")
    assert text.count("| functional@3 **(default)** |") == 2 and text.count("| functional@auto |") == 1
    assert "The gammas functional@auto chose by the callback's KL test over the grid 2, 3" in text
    assert "pydoc|0: 0.4 -> 2; plays|0: 0.4 -> 4.5; pysrc|0: 0.4 -> 3." in text


def test_a_compensated_arm_evaluates_what_the_librarys_compensated_cut_computes(monkeypatch):
    """The +comp arms: inside ``compensated`` and the mask, the model computes what the library's compensation (on
    the warm-up batches the hybrid scores and the windows it samples) and surgery give; on exit, the dense weights
    are back."""
    import copy

    from conftest import tiny_llama

    from nirvana_pl.allocate import AllocationConfig, DenseReference, allocate
    from nirvana_pl.calibration import masked
    from nirvana_pl.compensation import plan_compensation
    from nirvana_pl.saliency import magnitude_scores, self_sampled_windows
    from nirvana_pl.surgery import apply_plan

    monkeypatch.setattr(bench, "bf16", contextlib.nullcontext)  # (fp32 on both sides, for an exact comparison)
    gen = torch.Generator().manual_seed(0)
    d = {"warmup": list(torch.randint(3, 128, (10, 2, 16), generator=gen))}
    model = tiny_llama()
    plan = allocate(model, magnitude_scores(model), AllocationConfig(sparsity=0.4, gamma=2.0), DenseReference.of(model))
    dense = copy.deepcopy(model.state_dict())
    x = torch.randint(3, 128, (2, 16), generator=gen)
    fit = bench.CompensationBatches(model, d, bench.default_arm()[0])
    with bench.compensated(model, plan, fit), masked(model, plan), torch.no_grad():
        got = model(input_ids=x).logits
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    assert len(fit.batches()) == 2 * 8 and fit.seconds() > 0  # the last 8 warm-up batches and as many sampled
    kept = [{"input_ids": b} for b in d["warmup"][-8:]]
    plan_compensation(model, plan, kept + self_sampled_windows(model, kept, seed=0)).apply_()
    apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(got, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_compensation_table_pairs_each_cell_with_its_plain_cut():
    stage = {}
    for cal in bench.DOMAINS:
        for seed in (0, 1):
            plain = {ev: 20.0 if cal == ev else 50.0 for ev in bench.DOMAINS}
            cell = {ev: v * (0.9 if ev != "plays" else 1.1) for ev, v in plain.items()}  # lower on 2 of 3 domains
            stage[f"{cal}|{seed}|x+2stage+comp@3|0.4"] = {**cell, "uncompensated": plain}
            stage[f"{cal}|{seed}|x+2stage@3|0.4"] = plain
    lines = bench._compensation_table(stage, (0, 1), (0.4,), ["x+2stage@3", "x+2stage+comp@3"])
    rows = [line for line in lines if line.startswith("| x")]
    off = math.exp((4 * math.log(45.0) + 2 * math.log(55.0)) / 6)  # pydoc/pysrc 0.9x, plays 1.1x
    in_domain = 20 * (0.9 * 0.9 * 1.1) ** (1 / 3)
    assert rows == [f"| x+2stage+comp@3 | 50.0 -> {off:.1f} | 20.0 -> {in_domain:.1f} | 12/18 |"]
    assert bench._compensation_table(stage, (0, 1), (0.4,), ["x+2stage@3"]) == []


def test_cost_table_marks_the_compensated_costs_that_count_the_fit_alone():
    out = {"draws": {
        "pydoc|0": {"score_seconds": {"x": 40.0, "x+comp": 60.0}, bench.FIT_ALONE: ["x+comp"]},
        "plays|0": {"score_seconds": {"x": 41.0, "x+comp": 75.0}},  # measured while the fit sampled again
    }}  # fmt: skip
    rows = [line for line in bench._cost_table(out) if line.startswith("| p")]
    assert rows == ["| pydoc, seed 0 | 40.0 | 60.0* |", "| plays, seed 0 | 41.0 | 75.0 |"]


def test_bf16_products_in_fp32_are_the_fp32_products_of_the_bf16_values_rounded_to_bf16():
    from bf16_in_fp32 import Bf16ProductsInFp32

    generator = torch.Generator().manual_seed(0)
    x, w = (torch.randn(6, 32, generator=generator).bfloat16() for _ in range(2))
    q, k, v = (torch.randn(1, 2, 5, 8, generator=generator).bfloat16().requires_grad_() for _ in range(3))
    with Bf16ProductsInFp32() as mode:
        product = torch.nn.functional.linear(x, w)
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        attention.float().sum().backward()
        fp32_untouched = torch.nn.functional.linear(x.float(), w.float())
    assert product.dtype == attention.dtype == q.grad.dtype == torch.bfloat16
    assert torch.equal(product, (x.float() @ w.float().T).bfloat16())
    assert torch.equal(fp32_untouched, x.float() @ w.float().T)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32)
    assert torch.equal(attention, expected.bfloat16())
    expected.bfloat16().float().sum().backward()
    assert torch.allclose(q.grad.float(), q32.grad, atol=1e-2, rtol=1e-2)
    assert mode.calls >= 3  # the product, the attention and its backward; not the fp32 product


def test_a_tiny_llama_step_in_autocast_with_products_in_fp32_stays_within_bf16_noise_of_the_native_one():
    from bf16_in_fp32 import Bf16ProductsInFp32
    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[1, :5] = 0  # (left padding: the attention takes a mask)
    for attention_mask in (None, padded):
        losses, grads = [], []
        for mode in (contextlib.nullcontext(), Bf16ProductsInFp32()):
            model.zero_grad()
            with mode:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
                loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert mode.calls > 0
        assert losses[1] == pytest.approx(losses[0], rel=1e-2)
        assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.05


def test_recovery_cells_with_products_in_fp32_are_named_and_their_times_left_out_where_native_ones_exist():
    stage = {
        "pydoc|0|mine@3|0.2": {"prune_seconds": 100.0},
        "pydoc|1|mine@3|0.2": {"prune_seconds": 50.0, "bf16_products": "fp32"},
        "plays|1|mine@3|0.4": {"prune_seconds": 60.0, "bf16_products": "fp32"},
        "pydoc|1|other@3|0.2": {"prune_seconds": 70.0, "bf16_products": "fp32"},
        "pydoc|0|native@3|0.2": {"prune_seconds": 80.0, "bf16_products": "native"},
    }
    assert bench.products_in_fp32(stage) == {"mine@3": ["pydoc|1", "plays|1"], "other@3": ["pydoc|1"]}
    assert bench.prune_event_time(stage, "mine@3") == "100.0"
    assert bench.prune_event_time(stage, "other@3") == "70.0*"  # (only cells in fp32: their times, marked)
    assert bench.prune_event_time(stage, "native@3") == "80.0"
