"""Reports people read: the console table, the markdown summary, the allocation plot."""

from __future__ import annotations

import json

import pytest
from conftest import calib_batches, tiny_llama

import nirvana_pl
from nirvana_pl.allocate import DenseReference
from nirvana_pl.plots import PLOT_NAME, kept_fractions
from nirvana_pl.report import (
    MARKDOWN_NAME,
    REPORT_NAME,
    PruneRecord,
    format_summary,
    render_markdown,
    report_dict,
    write_markdown,
    write_report,
)
from nirvana_pl.units import prunable_parameter_count


def _records(targets=(0.3,), seed=0):
    model = tiny_llama(seed=seed)
    reference = DenseReference.of(model)
    records = []
    for i, target in enumerate(targets):
        before = sum(p.numel() for p in model.parameters())
        plan = nirvana_pl.prune(model, target, "functional", calib_batches(), reference=reference)
        records.append(
            PruneRecord(
                event_step=10 * (i + 1), plan=plan, total_params_before=before,
                total_params_after=sum(p.numel() for p in model.parameters()),
                prunable_params_after=prunable_parameter_count(model), seconds=0.25,
            )
        )
    return records, reference


def test_console_summary_is_a_per_layer_table():
    (record,), reference = _records()
    text = format_summary(record, reference)
    lines = text.splitlines()
    assert lines[0].startswith("NIRVANA prune at step 10 (functional, gamma=3)")
    assert f"{record.total_params_before:,} -> {record.total_params_after:,}" in lines[0]
    header = lines[1]
    for column in ("layer", "KV groups kept", "MLP width kept", "attn+MLP params kept"):
        assert column in header
    kv = record.plan.kv_groups_kept()
    mlp = record.plan.mlp_widths_kept()
    rows = [line for line in lines if line.strip().split("|")[0].strip().isdigit()]
    assert len(rows) == len(kv)
    for row, k, m in zip(rows, kv, mlp):
        cells = [c.strip() for c in row.split("|")]
        assert cells[1].startswith(f"{k}/4 ") and cells[2].startswith(f"{m}/176 ")
    total = [c.strip() for c in lines[-1].split("|")]
    assert total[0] == "total" and total[1].startswith(f"{sum(kv)}/16")
    kept_params = sum(k * reference.kv_group_cost + m * reference.mlp_channel_cost for k, m in zip(kv, mlp))
    assert total[3].startswith(f"{kept_params:,} ")
    assert kept_params == record.prunable_params_after  # the table counts what the modules hold

    # Without the dense reference the table still reads, without the parameter column.
    assert "attn+MLP params kept" not in format_summary(record, None)


def test_write_report_puts_json_markdown_and_plot_side_by_side(tmp_path):
    records, reference = _records(targets=(0.2, 0.4))
    path = write_report(tmp_path, records, reference)
    assert path == tmp_path / REPORT_NAME
    report = json.loads(path.read_text())
    assert [e["step"] for e in report["events"]] == [10, 20]
    assert (tmp_path / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / MARKDOWN_NAME).read_text()
    assert md.startswith("# NIRVANA pruning report")
    assert md.count("| functional |") == 2  # one row per event
    assert f"![kept fraction per layer]({PLOT_NAME})" in md
    assert "## Per layer after the last event (step 20)" in md
    assert not list(tmp_path.glob("*.tmp"))


def test_markdown_results_section(tmp_path):
    records, reference = _records()
    write_report(tmp_path, records, reference)
    write_markdown(tmp_path, results={"perplexity": {"dense": 10.0, "just_pruned": 30.5, "recovered": 12.25},
                                      "pruned_model": "runs/x/pruned_model"})
    md = (tmp_path / MARKDOWN_NAME).read_text()
    assert "| dense (before pruning) | 10.000 |" in md
    assert "| just pruned | 30.500 |" in md and "| recovered (end of training) | 12.250 |" in md
    assert "- pruned model: `runs/x/pruned_model`" in md
    assert "## Prune events" in md  # the events are re-read from the JSON report
    assert "| 10 | functional | 3 |" in md


def test_summary_and_markdown_say_how_many_times_the_event_scored_the_model(tmp_path):
    (record,), reference = _records()
    record.plan.score_summary["scoring_stages"] = 2
    assert format_summary(record, reference).startswith("NIRVANA prune at step 10 (functional in 2 scoring stages, "
                                                        "gamma=3)")  # fmt: skip
    write_report(tmp_path, [record], reference)
    write_markdown(tmp_path, results={})
    assert "| 10 | functional in 2 scoring stages | 3 |" in (tmp_path / MARKDOWN_NAME).read_text()
    record.plan.score_summary["compensation"] = {"weights": 8, "tokens": 512, "damping": 1.0}
    assert record.plan.compensated
    assert format_summary(record, reference).startswith("NIRVANA prune at step 10 (functional in 2 scoring stages, "
                                                        "compensated, gamma=3)")  # fmt: skip
    write_report(tmp_path, [record], reference)
    write_markdown(tmp_path, results={})
    assert "| 10 | functional in 2 scoring stages, compensated | 3 |" in (tmp_path / MARKDOWN_NAME).read_text()


def test_kept_fractions_are_relative_to_the_dense_model():
    records, reference = _records(targets=(0.2, 0.4))
    report = report_dict(records, reference)
    fractions = kept_fractions(report)
    assert [f["step"] for f in fractions] == [10, 20]
    last = records[-1].plan
    assert fractions[-1]["attention"] == [k / 4 for k in last.kv_groups_kept()]
    assert fractions[-1]["mlp"] == [m / 176 for m in last.mlp_widths_kept()]
    assert all(a >= b for a, b in zip(fractions[0]["mlp"], fractions[1]["mlp"]))


def test_markdown_without_events():
    assert "No prune event has happened yet." in render_markdown({"dense": None, "events": []})


def test_a_failing_plot_does_not_stop_the_report(tmp_path, monkeypatch):
    import nirvana_pl.plots as plots

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "plot_allocation", broken)
    records, reference = _records()
    with pytest.warns(UserWarning, match="allocation plot could not be drawn"):
        write_report(tmp_path, records, reference)
    assert (tmp_path / REPORT_NAME).is_file() and (tmp_path / MARKDOWN_NAME).is_file()
    assert "![kept fraction" not in (tmp_path / MARKDOWN_NAME).read_text()


def test_markdown_lists_perplexity_after_each_event_of_a_schedule(tmp_path):
    records, reference = _records(targets=(0.2, 0.4))
    write_report(tmp_path, records, reference)
    after = [{"step": 10, "realised_sparsity": 0.2, "ppl": 20.0}, {"step": 20, "realised_sparsity": 0.4, "ppl": 25.0}]
    write_markdown(tmp_path, results={"perplexity": {"dense": 10.0, "just_pruned": 25.0, "recovered": 12.0},
                                      "perplexity_after_each_prune": after})
    md = (tmp_path / MARKDOWN_NAME).read_text()
    assert "| after the prune at step 10 (sparsity 20.0%) | 20.000 |" in md
    assert "| after the prune at step 20 (sparsity 40.0%) | 25.000 |" in md
    assert "just pruned" not in md


def test_a_layer_whose_mlp_was_removed_earlier_still_counts_its_dense_width():
    """A decoder layer pruned to MLP width 0 by an earlier event shows 0 kept, not "no MLP" ("-")."""
    from nirvana_pl.plan import LayerPlan, PruningPlan

    model = tiny_llama()
    reference = DenseReference.of(model)
    layers = [LayerPlan(4, 176, [0, 1, 2, 3], list(range(176))) for _ in range(4)]
    layers[2] = LayerPlan(4, 0, [0, 1], [])  # its MLP went to width 0 at the event before
    plan = PruningPlan(layers=layers, target_sparsity=0.2, gamma=2.0, saliency="hand")
    record = PruneRecord(20, plan, 1000, 900, 800, 0.1)
    row = next(line for line in format_summary(record, reference).splitlines() if line.strip().startswith("2 "))
    assert "0/176 (0%)" in row
    report = report_dict([record], reference)
    assert "entries_without_mlp" not in report["events"][0]
    assert kept_fractions(report)[0]["mlp"][2] == 0.0
    assert "| 2 | 2/4 (50%) | 0/176 (0%) |" in render_markdown(report)
