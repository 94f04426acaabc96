"""The allocation plot: kept fraction per layer, attention (KV groups) and MLP (channels), per prune event.

Drawn from the JSON report (:func:`nirvana_pl.report.report_dict`) with matplotlib's object API and
the Agg canvas (no pyplot, no display, no global state), so it is safe inside a training process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_NAME = "nirvana_allocation.png"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def kept_fractions(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per event: step, target, kept fraction per layer of KV groups and of MLP channels (vs the dense model)."""
    dense = report.get("dense") or {}
    out = []
    for event in report.get("events", []):
        kv = event["kept_kv_groups_per_layer"]
        mlp = event["kept_mlp_width_per_layer"]
        kv_dense = dense.get("kv_groups_per_layer") or max(kv)
        mlp_dense = dense.get("mlp_width") or max(mlp)
        labels = event.get("layer_labels")
        # unit entries without an MLP (T5 cross-attention) have no MLP fraction: NaN draws no bar
        without_mlp = set(event.get("entries_without_mlp", ()))
        no_mlp = [i in without_mlp for i in range(len(mlp))]
        out.append(
            {
                "step": event["step"],
                "target": event.get("target_sparsity"),
                "realised": event.get("realised_sparsity"),
                "attention": [k / kv_dense for k in kv],
                "mlp": [float("nan") if skip else m / mlp_dense for m, skip in zip(mlp, no_mlp)],
                **({"labels": labels} if labels else {}),
            }
        )
    return out


def plot_allocation(report: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Write the allocation plot of ``report`` to ``path`` (PNG) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    events = kept_fractions(report)
    if not events:
        raise ValueError("the report has no prune events to plot.")
    path = Path(path)
    n_layers = len(events[-1]["attention"])
    layers = list(range(n_layers))
    fig = Figure(figsize=(max(6.0, 0.22 * n_layers + 3.0), 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    width = 0.8 / len(events)
    for ax, key, label in ((axes[0], "attention", "attention: KV groups kept"), (axes[1], "mlp", "MLP: channels kept")):
        for i, ev in enumerate(events):
            xs = [x - 0.4 + width * (i + 0.5) for x in layers]
            name = f"step {ev['step']}"
            if ev.get("realised") is not None:
                name += f" (sparsity {ev['realised']:.0%})"
            ax.bar(xs, ev[key], width=width, color=colours[i % len(colours)], label=name)
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("kept fraction")
        ax.set_title(label, fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xlabel("layer" if "labels" not in events[-1] else "unit entry")
    axes[1].set_xticks(layers)
    if "labels" in events[-1]:
        axes[1].set_xticklabels(events[-1]["labels"], rotation=60, ha="right")
    axes[1].tick_params(axis="x", labelsize=7 if n_layers > 20 else 9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(events), 4), fontsize=8, frameon=False)
    last = report["events"][-1]
    fig.suptitle(
        title or f"NIRVANA allocation ({last.get('saliency')}, gamma={last.get('gamma'):g})", fontsize=11
    )
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


__all__ = ["PLOT_NAME", "kept_fractions", "matplotlib_available", "plot_allocation"]
