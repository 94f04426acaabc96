"""PruningPlan: which units of each layer are kept, plus the numbers that explain it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerPlan:
    """Kept units of one decoder layer, as indices into the layer *before* this plan."""

    kv_groups_before: int
    mlp_channels_before: int
    kept_kv_groups: list[int]
    kept_mlp_channels: list[int]
    #: which unit entry this is, where a layer holds several (T5: ``encoder.3``, ``decoder.3.self``,
    #: ``decoder.3.cross``); empty for decoder LLMs, whose entries are their layers
    label: str = ""
    #: False for an entry that has attention only (T5's cross-attention), as against an MLP pruned to width 0
    has_mlp: bool = True
    #: a mixture-of-experts layer: its experts before the plan (0: a dense MLP) and the ones kept; its MLP
    #: channels are then (expert, channel) pairs ``e * channels_per_expert + c``, the same number in every kept
    #: expert, none in a removed one
    experts_before: int = 0
    kept_experts: list[int] | None = None
    #: a mixture-of-experts layer with a shared expert (an ordinary MLP beside the routed experts): its channels,
    #: the last ``shared_channels_before`` units of the MLP pool, after the (expert, channel) pairs
    shared_channels_before: int = 0

    @property
    def is_identity(self) -> bool:
        return (len(self.kept_kv_groups) == self.kv_groups_before
                and len(self.kept_mlp_channels) == self.mlp_channels_before
                and self.experts_kept == self.experts_before)  # fmt: skip

    @property
    def experts_kept(self) -> int:
        """Experts the layer keeps (0 for a dense MLP)."""
        return self.experts_before if self.kept_experts is None else len(self.kept_experts)

    @property
    def kept_expert_units(self) -> list[int]:
        """The kept (expert, channel) units of a mixture-of-experts layer (all kept MLP channels of a dense one)."""
        end = self.mlp_channels_before - self.shared_channels_before
        return [u for u in self.kept_mlp_channels if u < end]

    @property
    def kept_shared_channels(self) -> list[int]:
        """The kept channels of the layer's shared expert, as its own channel indices."""
        start = self.mlp_channels_before - self.shared_channels_before
        return [u - start for u in self.kept_mlp_channels if u >= start]

    @property
    def expert_width_kept(self) -> int:
        """Channels every kept expert keeps (a mixture-of-experts layer)."""
        return len(self.kept_expert_units) // max(self.experts_kept, 1)


@dataclass
class PruningPlan:
    """The result of allocation: kept units per layer and the statistics of the decision.

    ``target_sparsity`` is relative to the original dense model (attention+MLP parameters).
    Indices in ``layers`` refer to the model as it was when the plan was made, so a chain of
    plans (iterative pruning) is replayed in order.
    """

    layers: list[LayerPlan]
    target_sparsity: float
    gamma: float
    saliency: str
    uniform: bool = False
    dense_prunable_params: int = 0
    params_before: int = 0
    params_after: int = 0
    score_summary: dict[str, Any] = field(default_factory=dict)

    # --- derived numbers -------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return all(layer.is_identity for layer in self.layers)

    @property
    def scoring_stages(self) -> int:
        """How many times the prune event scored the model (:func:`~nirvana_pl.oneshot.staged_plan`)."""
        return self.score_summary.get("scoring_stages", 1)

    @property
    def compensated(self) -> bool:
        """Whether the kept input columns were compensated before the cut (:mod:`nirvana_pl.compensation`)."""
        return "compensation" in self.score_summary

    @property
    def realised_sparsity(self) -> float:
        """Fraction of the ORIGINAL dense attention+MLP parameters removed after this plan."""
        if not self.dense_prunable_params:
            return 0.0
        return 1.0 - self.params_after / self.dense_prunable_params

    def kv_groups_kept(self) -> list[int]:
        return [len(layer.kept_kv_groups) for layer in self.layers]

    def mlp_widths_kept(self) -> list[int]:
        return [len(layer.kept_mlp_channels) for layer in self.layers]

    def experts_kept(self) -> list[int | None]:
        """Experts each layer keeps (None for a layer without experts)."""
        return [layer.experts_kept if layer.experts_before else None for layer in self.layers]

    def entries_without_mlp(self) -> list[int]:
        """Indices of the unit entries that have attention only (no MLP channels; T5's cross-attention)."""
        return [i for i, layer in enumerate(self.layers) if not layer.has_mlp]

    def layer_labels(self) -> list[str]:
        """Label of each entry (``encoder.0`` ...), or its index for decoder LLMs."""
        return [layer.label or str(i) for i, layer in enumerate(self.layers)]

    def fraction_removed(self) -> dict[str, float]:
        kv_before = sum(layer.kv_groups_before for layer in self.layers)
        mlp_before = sum(layer.mlp_channels_before for layer in self.layers)
        return {
            "kv_groups": 1.0 - sum(self.kv_groups_kept()) / max(kv_before, 1),
            "mlp_channels": 1.0 - sum(self.mlp_widths_kept()) / max(mlp_before, 1),
        }

    # --- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [_layer_dict(layer) for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningPlan":
        data = dict(data)
        layers = [LayerPlan(**layer) for layer in data.pop("layers")]
        return cls(layers=layers, **data)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        return cls.from_json(Path(path).read_text())

    def fingerprint(self) -> str:
        """SHA-256 of the decision (kept indices and shapes), for cross-rank checks."""
        decision = [{k: v for k, v in _layer_dict(layer).items() if k != "has_mlp"} for layer in self.layers]
        return hashlib.sha256(json.dumps(decision, sort_keys=True).encode()).hexdigest()


def _layer_dict(layer: LayerPlan) -> dict[str, Any]:
    d = asdict(layer)
    if not d["label"]:  # decoder LLMs: the same JSON (and fingerprint) as before labels existed
        del d["label"]
    if d["has_mlp"]:  # likewise: only attention-only entries say so
        del d["has_mlp"]
    if not d["experts_before"]:  # and only mixture-of-experts layers name their experts
        del d["experts_before"], d["kept_experts"]
    if not d["shared_channels_before"]:  # and only layers with a shared expert count its channels
        del d["shared_channels_before"]
    return d
