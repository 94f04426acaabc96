"""What a prune event did: metrics, a console table, and a JSON report with a markdown summary and a plot.

Files written next to each other by :func:`write_report` (rewritten at every prune event):

* ``nirvana_prune_report.json`` - every event: targets, realised sparsity, parameters, kept units
  per layer (counts and indices), score statistics, plan fingerprint;
* ``nirvana_prune_report.md`` - the same for people: an events table and a per-layer table, plus any
  run results added later with :func:`write_markdown` (e.g. held-out perplexity, output folders);
* ``nirvana_allocation.png`` - kept fraction per layer for attention and MLP (when matplotlib is installed).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .allocate import DenseReference
from .plan import PruningPlan

REPORT_NAME = "nirvana_prune_report.json"
MARKDOWN_NAME = "nirvana_prune_report.md"


@dataclass
class PruneRecord:
    """One prune event: the plan and the numbers counted on the real modules after surgery."""

    event_step: int
    plan: PruningPlan
    total_params_before: int
    total_params_after: int
    prunable_params_after: int
    seconds: float
    #: ``trainer.global_step`` when the surgery ran (``event_step`` unless a batch stepped past it)
    at_step: int | None = None
    #: what the architecture's adapter says the user should know about this cut (``Architecture.caveat``)
    caveat: str = ""
    #: the distillation settings recovery trains with after this cut (``DistillConfig.to_dict()``), None without
    distill: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.at_step is None:
            self.at_step = self.event_step

    @property
    def realised_sparsity(self) -> float:
        dense = self.plan.dense_prunable_params
        return 1.0 - self.prunable_params_after / dense if dense else 0.0

    def removed_fractions(self, reference: DenseReference | None = None) -> dict[str, float]:
        """Fractions of the dense model's KV groups and MLP channels gone after this event."""
        if reference is None:
            return self.plan.fraction_removed()
        return {
            "kv_groups": 1.0 - sum(self.plan.kv_groups_kept()) / reference.total_kv_groups,
            "mlp_channels": 1.0 - sum(self.plan.mlp_widths_kept()) / reference.total_mlp_channels,
        }

    def metrics(self, reference: DenseReference | None = None) -> dict[str, float]:
        fractions = self.removed_fractions(reference)
        out = {
            "target_sparsity": self.plan.target_sparsity,
            "realised_sparsity": self.realised_sparsity,
            "params_before": self.total_params_before,
            "params_after": self.total_params_after,
            "kv_groups_removed": fractions["kv_groups"],
            "mlp_channels_removed": fractions["mlp_channels"],
            "prune_seconds": self.seconds,
        }
        for kind, share in kind_fractions(self.plan, reference).items():
            out[f"heads_removed_{kind.replace('.', '_')}"] = share
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_step": self.event_step,
            "plan": self.plan.to_dict(),
            "total_params_before": self.total_params_before,
            "total_params_after": self.total_params_after,
            "prunable_params_after": self.prunable_params_after,
            "seconds": self.seconds,
            "at_step": self.at_step,
            **({"distill": self.distill} if self.distill is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneRecord":
        data = dict(data)
        data["plan"] = PruningPlan.from_dict(data["plan"])
        return cls(**data)


def entry_kind(label: str) -> str:
    """Kind of a labelled unit entry: ``encoder``, ``decoder.self`` or ``decoder.cross`` (T5); '' when unlabelled."""
    if not label:
        return ""
    parts = label.split(".")
    return parts[0] if len(parts) < 3 else f"{parts[0]}.{parts[-1]}"


def kind_fractions(plan: PruningPlan, reference: DenseReference | None = None) -> dict[str, float]:
    """Share of the dense heads each kind of attention lost (T5: encoder, decoder.self, decoder.cross).

    Empty for decoder LLMs, whose entries are all one kind (see ``kv_groups_removed``).
    """
    kept: dict[str, int] = {}
    dense: dict[str, int] = {}
    for layer in plan.layers:
        kind = entry_kind(layer.label)
        if not kind:
            return {}
        full = reference.kv_groups_per_layer if reference is not None else layer.kv_groups_before
        kept[kind] = kept.get(kind, 0) + len(layer.kept_kv_groups)
        dense[kind] = dense.get(kind, 0) + full
    return {kind: 1.0 - kept[kind] / max(dense[kind], 1) for kind in kept}


def _scored_by(saliency: str, scores: Mapping[str, Any]) -> str:
    """The saliency, how many times the prune event scored the model when more than once, and whether it
    compensated the kept columns (``scores``: the plan's ``score_summary``)."""
    stages = scores.get("scoring_stages", 1)
    out = f"{saliency} in {stages} scoring stages" if stages > 1 else saliency
    return out + (", compensated" if "compensation" in scores else "")


def format_summary(record: PruneRecord, reference: DenseReference | None = None) -> str:
    """A console summary of one prune event: a headline and a per-layer table of what is kept."""
    m = record.metrics(reference)
    plan = record.plan
    head = (
        f"NIRVANA prune at step {record.event_step} ({_scored_by(plan.saliency, plan.score_summary)}, "
        f"gamma={plan.gamma:g}): "
        f"attention+MLP sparsity {m['realised_sparsity']:.1%} (target {plan.target_sparsity:.1%}); "
        f"params {record.total_params_before:,} -> {record.total_params_after:,}; "
        f"KV groups removed {m['kv_groups_removed']:.1%}, MLP channels removed {m['mlp_channels_removed']:.1%}; "
        f"{record.seconds:.2f} s"
    )
    kinds = kind_fractions(plan, reference)
    if kinds:
        head += "\n  heads removed by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in kinds.items())
    if record.caveat:
        head += f"\n  note: {record.caveat}"
    if record.distill is not None:
        head += "\n  recovery: " + describe_distill(record.distill)
    labels = [layer.label for layer in plan.layers]
    rows = layer_rows(plan.kv_groups_kept(), plan.mlp_widths_kept(), _dense_sizes(record, reference),
                      labels if any(labels) else None, plan.entries_without_mlp())  # fmt: skip
    experts = expert_cells(plan)
    if experts is not None:  # (a mixture-of-experts model: its MLP width is experts x channels)
        rows = [r[:3] + [e] + r[3:] for r, e in zip(rows, ["experts kept x width", *experts, ""])]
    return head + "\n" + "\n".join("  " + line for line in format_table(rows))


def expert_cells(plan: Any) -> list[str] | None:
    """Per layer, ``kept/before experts x channels each`` (and ``+ shared kept/before`` for a layer with a shared
    expert; None for a plan without experts)."""
    if not any(layer.experts_before for layer in plan.layers):
        return None
    cells = []
    for layer in plan.layers:
        if not layer.experts_before:
            cells.append("-")
            continue
        shared = (f" + shared {len(layer.kept_shared_channels)}/{layer.shared_channels_before}"
                  if layer.shared_channels_before else "")  # fmt: skip
        cells.append(f"{layer.experts_kept}/{layer.experts_before} x {layer.expert_width_kept}{shared}")
    return cells


def describe_distill(settings: dict[str, Any]) -> str:
    """One line on how recovery distils, from ``DistillConfig.to_dict()``."""
    teacher = "the dense model" if settings.get("teacher") == "dense" else "the model before this cut"
    return (
        f"distilled from {teacher}: loss = {1 - settings['weight']:g} x loss + {settings['weight']:g} x "
        f"T^2 KL(teacher || student), T = {settings['temperature']:g}"
    )


def _dense_sizes(record: PruneRecord, reference: DenseReference | None) -> dict[str, int]:
    if reference is not None:
        return {
            "kv_groups_per_layer": reference.kv_groups_per_layer,
            "mlp_width": reference.mlp_width,
            "kv_group_cost": reference.kv_group_cost,
            "mlp_channel_cost": reference.mlp_channel_cost,
        }
    layers = record.plan.layers
    return {
        "kv_groups_per_layer": max(layer.kv_groups_before for layer in layers),
        "mlp_width": max(layer.mlp_channels_before for layer in layers),
    }


def layer_rows(
    kv_kept: list[int],
    mlp_kept: list[int],
    dense: dict[str, Any],
    labels: list[str] | None = None,
    without_mlp: Sequence[int] = (),
) -> list[list[str]]:
    """Rows (header first, total last) of the per-layer table: kept KV groups, MLP width, parameters.

    ``labels`` names labelled unit entries (T5: ``encoder.0``, ``decoder.0.self``, ``decoder.0.cross``);
    the entries listed in ``without_mlp`` (indices; T5's cross-attention) show ``-`` as their MLP width.
    """
    kv_d, mlp_d = dense["kv_groups_per_layer"], dense["mlp_width"]
    c_a, c_m = dense.get("kv_group_cost"), dense.get("mlp_channel_cost")
    with_params = bool(c_a and c_m)
    header = ["layer", "KV groups kept", "MLP width kept"] + (["attn+MLP params kept"] if with_params else [])
    if labels:
        header[:3] = ["entry", "heads kept", "FFN width kept"]
    rows = [header]

    def row(name: str, kv: int, kvd: int, mlp: int, mlpd: int) -> list[str]:
        mlp_cell = f"{mlp}/{mlpd} ({mlp / mlpd:.0%})" if mlpd else "-"
        cells = [name, f"{kv}/{kvd} ({kv / kvd:.0%})", mlp_cell]
        if with_params:
            kept, full = kv * c_a + mlp * c_m, kvd * c_a + mlpd * c_m
            cells.append(f"{kept:,} ({kept / full:.0%})")
        return cells

    has_mlp = [i not in set(without_mlp) for i in range(len(kv_kept))]
    for i, (kv, mlp) in enumerate(zip(kv_kept, mlp_kept)):
        rows.append(row(labels[i] if labels else str(i), kv, kv_d, mlp, mlp_d if has_mlp[i] else 0))
    n = len(kv_kept)
    rows.append(row("total", sum(kv_kept), kv_d * n, sum(mlp_kept), mlp_d * sum(has_mlp)))
    return rows


def format_table(rows: list[list[str]]) -> list[str]:
    """Plain-text table lines (first row is the header; the last row is set off as a total)."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return " | ".join(cell.rjust(w) for cell, w in zip(r, widths))

    rule = "-+-".join("-" * w for w in widths)
    return [line(rows[0]), rule] + [line(r) for r in rows[1:-1]] + [rule, line(rows[-1])]


def report_dict(
    records: list[PruneRecord], reference: DenseReference | None, pending: Sequence[Any] = ()
) -> dict[str, Any]:
    """The JSON report; ``pending``: schedule events (``PruneEvent``) that did not happen in the fit."""
    events = []
    for r in records:
        without_mlp = r.plan.entries_without_mlp()
        events.append(
            {
                "step": r.event_step,
                "saliency": r.plan.saliency,
                "gamma": r.plan.gamma,
                "uniform": r.plan.uniform,
                **r.metrics(reference),
                "prunable_params_after": r.prunable_params_after,
                "kept_kv_groups_per_layer": r.plan.kv_groups_kept(),
                "kept_mlp_width_per_layer": r.plan.mlp_widths_kept(),
                "kept_kv_group_indices": [layer.kept_kv_groups for layer in r.plan.layers],
                **({"layer_labels": [layer.label for layer in r.plan.layers]}
                   if r.plan.layers and r.plan.layers[0].label else {}),  # fmt: skip
                **({"entries_without_mlp": without_mlp} if without_mlp else {}),
                **({"kept_experts_per_layer": r.plan.experts_kept(),
                    "kept_expert_indices": [layer.kept_experts for layer in r.plan.layers],
                    "kept_expert_width_per_layer": [layer.expert_width_kept for layer in r.plan.layers]}
                   if any(layer.experts_before for layer in r.plan.layers) else {}),  # fmt: skip
                **({"kept_shared_expert_width_per_layer": [len(layer.kept_shared_channels) for layer in r.plan.layers]}
                   if any(layer.shared_channels_before for layer in r.plan.layers) else {}),  # fmt: skip
                "plan_fingerprint": r.plan.fingerprint(),
                "scores": r.plan.score_summary,
                **({"caveat": r.caveat} if r.caveat else {}),
                **({"recovery_distill": r.distill} if r.distill is not None else {}),
            }
        )
    report = {"dense": reference.to_dict() if reference else None, "events": events}
    if pending:
        report["events_not_reached"] = [{"step": e.step, "target_sparsity": e.sparsity} for e in pending]
    return report


def write_report(
    directory: str | Path, records: list[PruneRecord], reference: DenseReference | None, pending: Sequence[Any] = ()
) -> Path:
    """Write the JSON report, its markdown summary and the allocation plot into ``directory``; return the JSON path.

    ``pending``: events of the schedule the fit ended before (recorded as ``events_not_reached``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REPORT_NAME
    report = report_dict(records, reference, pending)
    _atomic_write(path, json.dumps(report, indent=2))  # never leave a half-written report behind
    plot = _write_plot(directory, report)
    write_markdown(directory, report, plot=plot)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_plot(directory: Path, report: dict[str, Any]) -> Path | None:
    from .plots import PLOT_NAME, matplotlib_available, plot_allocation

    if not report["events"] or not matplotlib_available():
        return None
    try:
        return plot_allocation(report, directory / PLOT_NAME)
    except Exception as err:  # noqa: BLE001 - a plot must never stop a training run
        warnings.warn(
            f"nirvana-pl: the allocation plot could not be drawn ({type(err).__name__}: {err}).", stacklevel=2
        )
        return None


def render_markdown(report: dict[str, Any], results: dict[str, Any] | None = None, plot: str | None = None) -> str:
    """The markdown summary of a report (``report_dict``); ``results`` adds run results (perplexity, folders)."""
    lines = ["# NIRVANA pruning report", ""]
    dense = report.get("dense")
    events = report.get("events", [])
    if dense:
        lines += _dense_markdown(dense)
    missed = report.get("events_not_reached") or []
    if missed:
        steps = ", ".join(f"step {e['step']} (target {e['target_sparsity']:.0%})" for e in missed)
        lines += [f"**Not pruned as scheduled:** the fit ended before the prune events at {steps}"
                  + ("; the model is dense." if not events else "."), ""]
    if results:
        lines += _results_markdown(results)
    if events:
        lines += _events_markdown(events)
        lines += _heads_by_kind_markdown(events)
        if plot:
            lines += [f"![kept fraction per layer]({plot})", ""]
        lines += _last_layers_markdown(events[-1], dense)
    else:
        lines += ["No prune event has happened yet.", ""]
    return "\n".join(lines)


def _dense_markdown(dense: dict[str, Any]) -> list[str]:
    if dense.get("num_mlp_layers") is not None:  # T5: attentions and FFNs are separate entries
        return [
            f"Dense model: {dense['num_layers']} attentions of {dense['kv_groups_per_layer']} heads and "
            f"{dense['num_mlp_layers']} FFNs of {dense['mlp_width']} channels, {dense['prunable_params']:,} "
            "attention+FFN parameters.",
            "",
        ]
    return [
        f"Dense model: {dense['num_layers']} layers, {dense['kv_groups_per_layer']} KV groups and "
        f"{dense['mlp_width']} MLP channels per layer, {dense['prunable_params']:,} attention+MLP parameters.",
        "",
    ]


def _events_markdown(events: list[dict[str, Any]]) -> list[str]:
    """One table row per prune event."""
    lines = [
        "## Prune events",
        "",
        "| step | saliency | gamma | target | realised sparsity | params before | params after | "
        "KV groups removed | MLP channels removed | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in events:
        lines.append(
            f"| {e['step']} | {_scored_by(e['saliency'], e.get('scores', {}))} | "
            f"{e['gamma']:g} | "
            f"{e['target_sparsity']:.1%} | "
            f"{e['realised_sparsity']:.1%} | {int(e['params_before']):,} | {int(e['params_after']):,} | "
            f"{e['kv_groups_removed']:.1%} | {e['mlp_channels_removed']:.1%} | {e['prune_seconds']:.2f} |"
        )
    lines.append("")
    lines += [f"Note: {caveat}", ""] if (caveat := next((e["caveat"] for e in events if e.get("caveat")), "")) else []
    distilled = [e for e in events if e.get("recovery_distill")]
    lines += [f"Recovery after step {e['step']}: {describe_distill(e['recovery_distill'])}." for e in distilled]
    return lines + ([""] if distilled else [])


def _heads_by_kind_markdown(events: list[dict[str, Any]]) -> list[str]:
    """Heads removed per attention kind (T5: encoder, decoder.self, decoder.cross); empty for decoder LLMs."""
    kinds = [(e["step"], {k[len("heads_removed_"):]: v for k, v in e.items() if k.startswith("heads_removed_")})
             for e in events]  # fmt: skip
    if not any(k for _, k in kinds):
        return []
    names = list(kinds[-1][1])
    lines = ["Share of the dense attention heads removed, by kind (FFN channels form one pool):", "",
             "| step | " + " | ".join(n.replace("_", ".") for n in names) + " |",
             "|---:|" + "---:|" * len(names)]  # fmt: skip
    for step, k in kinds:
        lines.append(f"| {step} | " + " | ".join(f"{k.get(n, 0.0):.1%}" for n in names) + " |")
    lines.append("")
    return lines


def _last_layers_markdown(last: dict[str, Any], dense: dict[str, Any] | None) -> list[str]:
    """The per-layer table of what the last event kept (out of the dense sizes, when known)."""
    sizes = dict(dense) if dense else {
        "kv_groups_per_layer": max(last["kept_kv_groups_per_layer"]),
        "mlp_width": max(last["kept_mlp_width_per_layer"]),
    }
    rows = layer_rows(last["kept_kv_groups_per_layer"], last["kept_mlp_width_per_layer"], sizes,
                      last.get("layer_labels"), last.get("entries_without_mlp", ()))  # fmt: skip
    lines = [f"## Per layer after the last event (step {last['step']})", ""]
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "---:|" * len(rows[0]))
    for r in rows[1:-1]:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("| **" + "** | **".join(rows[-1]) + "** |")
    lines.append("")
    return lines


def _results_markdown(results: dict[str, Any]) -> list[str]:
    lines = ["## Results", ""]
    ppl = results.get("perplexity") or {}
    if any(v is not None for v in ppl.values()):
        lines += ["| held-out perplexity | value |", "|---|---:|"]
        after_each = results.get("perplexity_after_each_prune") or []
        rows = [("dense", "dense (before pruning)")]
        if len(after_each) <= 1:
            rows.append(("just_pruned", "just pruned"))
        rows.append(("recovered", "recovered (end of training)"))
        for key, label in rows:
            if ppl.get(key) is not None:
                lines.append(f"| {label} | {ppl[key]:.3f} |")
            if key == "dense" and len(after_each) > 1:
                for event in after_each:
                    lines.append(
                        f"| after the prune at step {event['step']} (sparsity {event['realised_sparsity']:.1%}) | "
                        f"{event['ppl']:.3f} |"
                    )
        lines.append("")
    for key, value in results.items():
        if key not in ("perplexity", "perplexity_after_each_prune") and value is not None:
            lines.append(f"- {key.replace('_', ' ')}: `{value}`")
    if len(lines) > 2 and lines[-1] != "":
        lines.append("")
    return lines


def write_markdown(
    directory: str | Path,
    report: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None,
    plot: str | Path | None = None,
) -> Path:
    """Write ``nirvana_prune_report.md`` into ``directory`` (from ``report``, else the JSON report there)."""
    from .plots import PLOT_NAME

    directory = Path(directory)
    if report is None:
        report = json.loads((directory / REPORT_NAME).read_text())
    if plot is None and (directory / PLOT_NAME).is_file():
        plot = directory / PLOT_NAME
    path = directory / MARKDOWN_NAME
    _atomic_write(path, render_markdown(report, results, Path(plot).name if plot else None))
    return path
