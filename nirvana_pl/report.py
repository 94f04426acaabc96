"""What a prune event did, as metrics, a console summary and a JSON report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .allocate import DenseReference
from .plan import PruningPlan

REPORT_NAME = "nirvana_prune_report.json"


@dataclass
class PruneRecord:
    """One prune event: the plan and the numbers counted on the real modules after surgery."""

    event_step: int
    plan: PruningPlan
    total_params_before: int
    total_params_after: int
    prunable_params_after: int
    seconds: float

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
        return {
            "target_sparsity": self.plan.target_sparsity,
            "realised_sparsity": self.realised_sparsity,
            "params_before": self.total_params_before,
            "params_after": self.total_params_after,
            "kv_groups_removed": fractions["kv_groups"],
            "mlp_channels_removed": fractions["mlp_channels"],
            "prune_seconds": self.seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_step": self.event_step,
            "plan": self.plan.to_dict(),
            "total_params_before": self.total_params_before,
            "total_params_after": self.total_params_after,
            "prunable_params_after": self.prunable_params_after,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneRecord":
        data = dict(data)
        data["plan"] = PruningPlan.from_dict(data["plan"])
        return cls(**data)


def format_summary(record: PruneRecord, reference: DenseReference | None = None) -> str:
    m = record.metrics(reference)
    plan = record.plan
    return (
        f"NIRVANA prune at step {record.event_step} ({plan.saliency}, gamma={plan.gamma:g}): "
        f"attention+MLP sparsity {m['realised_sparsity']:.1%} (target {plan.target_sparsity:.1%}); "
        f"params {record.total_params_before:,} -> {record.total_params_after:,}; "
        f"KV groups removed {m['kv_groups_removed']:.1%}, MLP channels removed {m['mlp_channels_removed']:.1%}; "
        f"{record.seconds:.2f} s\n"
        f"  kept KV groups per layer: {plan.kv_groups_kept()}\n"
        f"  kept MLP width per layer: {plan.mlp_widths_kept()}"
    )


def report_dict(records: list[PruneRecord], reference: DenseReference | None) -> dict[str, Any]:
    events = []
    for r in records:
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
                "plan_fingerprint": r.plan.fingerprint(),
                "scores": r.plan.score_summary,
            }
        )
    return {"dense": reference.to_dict() if reference else None, "events": events}


def write_report(directory: str | Path, records: list[PruneRecord], reference: DenseReference | None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REPORT_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report_dict(records, reference), indent=2))
    tmp.replace(path)  # never leave a half-written report behind
    return path
