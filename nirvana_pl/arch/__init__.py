"""Architecture adapters: everything nirvana_pl knows about one family of models, in one place per family.

The shared steps (units -> scores -> plan -> surgery -> optimizer, config, export) never ask "is this T5?";
they ask the model's :class:`Architecture`, looked up by ``config.model_type`` in one registry::

    from nirvana_pl.arch import architecture_of, register_architecture, supported_model_types

An adapter says where the decoder layers and the unit pools are (as :class:`~nirvana_pl.units.LayerUnits`
with an :class:`~nirvana_pl.units.IndexMap` per weight), what changes after a cut (module attributes,
config fields), how the widths are read back from a state dict, what the model reads during calibration,
and how a pruned model is written so that transformers loads it. The built-in families are in
:mod:`nirvana_pl.arch.decoder` (Llama-like decoder LLMs) and :mod:`nirvana_pl.arch.t5`; a user adds one with
:func:`register_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from ..units import UnsupportedModelError, base_model_type

if TYPE_CHECKING:
    from ..gguf_layout import GGUFTarget
    from ..plan import LayerPlan, PruningPlan
    from ..units import LayerUnits

#: ``materialize(params)``: a context entered around the slicing of some parameters (DeepSpeed ZeRO-3
#: gathers them); see :func:`nirvana_pl.surgery.apply_plan`.
Materialize = Callable[[Sequence[nn.Parameter]], ContextManager[None]]


@dataclass
class ModelInputs:
    """What the model reads for one calibration batch, as the adapter builds it.

    ``kwargs``: the forward's keyword arguments; ``output_mask``: which output positions are real (the
    padding mask of the sequence the logits are over), or None; ``labels``: loss labels when asked for;
    ``stream_masks``: the padding mask of each input sequence, keyed as
    :meth:`~nirvana_pl.units.LayerUnits.input_stream` names them.
    """

    kwargs: dict[str, torch.Tensor]
    output_mask: torch.Tensor | None
    labels: torch.Tensor | None = None
    stream_masks: dict[str, torch.Tensor | None] = field(default_factory=dict)


class Architecture:
    """What nirvana_pl knows about one family of models (subclass it; register it with
    :func:`register_architecture`).

    ``model_types``: the ``config.model_type`` values it handles; ``saved_model_types``: the ones of the
    folders it writes (e.g. ``nirvana_llama``), so that loading finds it too. ``zero3``: whether the
    callback may prune it under DeepSpeed ZeRO-3; ``lora``: whether LoRA-wrapped weights may be pruned.
    """

    model_types: tuple[str, ...] = ()
    saved_model_types: tuple[str, ...] = ()
    zero3: bool = True
    lora: bool = True
    notes: str = ""  # what is particular about the family (the README's table)
    #: what a user should know about a cut of this family (printed with every prune event; '' when nothing)
    caveat: str = ""
    #: whether a pruned model computes exactly what the dense one does with the removed units masked
    exact: bool = True
    #: batch keys besides ``input_ids`` / ``attention_mask`` that calibration batches may carry
    batch_keys: tuple[str, ...] = ()
    #: whether the model writes text token by token from a start token (a decoder-only language model), so that
    #: ``saliency="fisher_functional_self"`` can score windows it samples itself
    generates: bool = True

    def model_class_name(self) -> str:
        """The transformers class users prune (for messages and the README's table)."""
        raise NotImplementedError

    # --- units
    def check(self, model: nn.Module) -> None:
        """Raise :class:`~nirvana_pl.units.UnsupportedModelError` unless this adapter can prune ``model``."""
        self.find_units(model)

    def find_units(self, model: nn.Module) -> list["LayerUnits"]:
        """The unit entries of ``model``, in a fixed order (one per decoder layer for a decoder LLM)."""
        raise NotImplementedError

    # --- after a cut
    def after_slicing(self, model: nn.Module, units: Sequence["LayerUnits"], plan: "PruningPlan") -> None:
        """Module attributes and config fields that describe the new shapes (the weights are sliced already;
        ``units`` as they were found before the cut, ``plan`` the plan that was applied)."""
        raise NotImplementedError

    def widths(self, model: nn.Module) -> Any:
        """The model's pruned shapes as JSON data (what the exported config records), measured on the modules."""
        raise NotImplementedError

    def resize_from_state_dict(
        self, model: nn.Module, module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
        materialize: Materialize | None = None,
    ) -> bool:
        """Before ``module.load_state_dict(state_dict)``: give ``model`` (inside ``module``, whose keys the state
        dict uses after ``prefix``) the shapes the state dict holds; False, changing nothing, when it does not
        hold them (a partial state dict, DeepSpeed ZeRO-3's 1-D placeholders)."""
        raise NotImplementedError

    # --- calibration
    def model_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor], with_labels: bool = False) -> ModelInputs:
        """The forward inputs of a calibration batch (``with_labels``: and the loss labels)."""
        mask = batch.get("attention_mask")
        labels = None
        if with_labels:
            ids = batch["input_ids"]
            labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
        return ModelInputs(dict(batch), mask, labels, {"input": mask})

    def check_batch(self, batch: dict[str, Any], index: int) -> None:
        """Shapes of :attr:`batch_keys` in one calibration batch (``input_ids`` is checked already)."""

    def check_plan(self, model: nn.Module, units: Sequence["LayerUnits"], plan: "PruningPlan") -> None:
        """Raise :class:`~nirvana_pl.surgery.PlanMismatchError` if the pruned shapes of ``plan`` (valid for the
        units) cannot be computed by this family's modules; called before anything changes."""

    def mask_experts(self, units: "LayerUnits", plan: "LayerPlan") -> list[Any]:
        """Hooks (each with a ``remove()``) under which the mixture-of-experts block of ``units`` computes what it
        would once ``plan`` is applied, parameters untouched (see :func:`nirvana_pl.calibration.masked`)."""
        raise UnsupportedModelError(f"the {type(self).__name__} adapter cannot mask the experts of a layer.")

    def count_routing(self, units: "LayerUnits", add: Callable[[torch.Tensor], None]) -> Any:
        """A hook (with a ``remove()``) that passes the experts the router of ``units``' mixture-of-experts block picks
        in each forward (an integer tensor of expert indices) to ``add``."""
        raise UnsupportedModelError(f"the {type(self).__name__} adapter has no router to count.")

    def body_and_head(self, model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """(the module whose output's ``last_hidden_state`` feeds the LM head, the function from those hidden
        states to the logits the model returns), for the chunked KL of calibration selection."""
        raise UnsupportedModelError(
            f"KL calibration needs the model split into a body and an LM head; the {type(self).__name__} "
            f"adapter of {type(model).__name__} does not give one."
        )

    # --- export
    def save(self, model: nn.Module, path: Path, save_pretrained_kwargs: dict[str, Any]) -> None:
        """Write ``model`` into the empty folder ``path``: a stock folder when the stock config describes the
        pruned shapes, else a folder that loads with ``trust_remote_code=True``."""
        raise NotImplementedError

    def load(self, path: Path, config: dict[str, Any], from_pretrained_kwargs: dict[str, Any]) -> nn.Module:
        """Load the folder ``path`` (its ``config.json`` is ``config``) without remote code."""
        raise NotImplementedError

    #: whether ``save_pruned(format="gguf")`` writes models of this family (see :meth:`gguf_target`)
    writes_gguf: bool = False

    def gguf_support(self) -> str:
        """What GGUF export writes for this family, for the README's table."""
        return "not yet"

    def gguf_target(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> "GGUFTarget":
        """``model`` as llama.cpp reads it (architecture, hyper-parameters, tensors taken from ``state``, the
        model's state dict with any LoRA adapters merged); raise UnsupportedModelError, saying why, when no
        llama.cpp graph computes it."""
        raise UnsupportedModelError(
            f"save_pruned(format='gguf'): the {type(self).__name__} adapter of {type(model).__name__} has no "
            "llama.cpp layout; GGUF export covers the decoder families listed in the README ('Run it in llama.cpp')."
        )


_REGISTRY: dict[str, Architecture] = {}
_BUILTINS_LOADED = False


def register_architecture(architecture: Architecture, *, replace: bool = False) -> Architecture:
    """Make ``architecture`` the adapter of every model type in its ``model_types`` (and ``saved_model_types``).

    A model type that already has an adapter is refused unless ``replace=True``. Returns ``architecture``.
    """
    _load_builtins()
    if not isinstance(architecture, Architecture):
        raise TypeError(
            f"register_architecture: expected an Architecture (e.g. nirvana_pl.arch.decoder.DecoderArchitecture(...)), "
            f"got {type(architecture).__name__}."
        )
    types = tuple(architecture.model_types) + tuple(architecture.saved_model_types)
    if not architecture.model_types:
        raise ValueError("register_architecture: the architecture names no model_types (config.model_type values).")
    taken = [t for t in types if t in _REGISTRY and _REGISTRY[t] is not architecture]
    if taken and not replace:
        raise ValueError(
            f"register_architecture: model type(s) {taken} already have an adapter "
            f"({type(_REGISTRY[taken[0]]).__name__}); pass replace=True to override it."
        )
    for t in types:
        _REGISTRY[t] = architecture
    return architecture


def _load_builtins() -> None:
    """Register the built-in adapters (on first use, so that they may import the shared modules)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True  # (first: the adapters' own registrations come back here)
    try:
        from . import decoder, moe, t5  # noqa: F401  (each registers its families on import)
    except BaseException:
        _BUILTINS_LOADED = False
        raise


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values some registered adapter prunes (not the saved-folder aliases), sorted."""
    _load_builtins()
    return sorted(t for t, arch in _REGISTRY.items() if t in arch.model_types)


def registered_architectures() -> dict[str, Architecture]:
    """model type -> adapter, for every type :func:`supported_model_types` lists."""
    return {t: _REGISTRY[t] for t in supported_model_types()}


def architecture_for_type(model_type: str) -> Architecture | None:
    """The adapter registered for ``model_type`` (a model's or a saved folder's), or None."""
    _load_builtins()
    return _REGISTRY.get(model_type)


def architecture_of(model: nn.Module) -> Architecture:
    """The adapter of ``model`` (by ``config.model_type``, or the base type a pruned export records).

    Raises :class:`~nirvana_pl.units.UnsupportedModelError` naming the supported types, and for a hybrid model
    the layer kind no adapter knows.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no transformers `.config`; nirvana_pl prunes transformers models of type "
            f"{', '.join(supported_model_types())} (e.g. LlamaForCausalLM)."
        )
    mtype = base_model_type(config)
    arch = architecture_for_type(mtype)
    if arch is None:
        raise UnsupportedModelError(
            f"model_type {mtype!r} ({type(model).__name__}) is not supported{_unknown_layers(model)}. nirvana_pl "
            f"prunes {', '.join(supported_model_types())}; a family of your own can be added with "
            "nirvana_pl.arch.register_architecture (README, 'Supported architectures')."
        )
    return arch


def architectures_table() -> str:
    """The README's table of supported architectures, rendered from the registry (``python -m nirvana_pl.arch``)."""
    rows = ["| `model_type` | class | GGUF (llama.cpp) | notes |", "|---|---|---|---|"]
    for mtype, arch in registered_architectures().items():
        rows.append(f"| `{mtype}` | `{arch.model_class_name()}` | {arch.gguf_support()} | {arch.notes} |")
    return "\n".join(rows) + "\n"


#: decoder-layer children every adapter of a Llama-like layer knows; anything else is named in the refusal
_KNOWN_LAYER_PARTS = ("self_attn", "mlp", "dropout")


def _unknown_layers(model: nn.Module) -> str:
    """For a model with decoder layers: which kinds of sub-layer (e.g. Qwen3-Next's ``linear_attn``, a Mamba
    mixer, an MoE block) no adapter knows, as a clause of the refusal message."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None) or getattr(getattr(inner, "language_model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return ""
    unknown: dict[str, str] = {}
    for layer in layers:
        for name, child in layer.named_children():
            if name not in _KNOWN_LAYER_PARTS and "norm" not in name.lower():
                unknown.setdefault(name, type(child).__name__)
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and (hasattr(mlp, "experts") or hasattr(mlp, "router") or hasattr(mlp, "gate")):
            unknown.setdefault("mlp", f"{type(mlp).__name__}, a mixture of experts")
    if not unknown:
        return ""
    kinds = ", ".join(f"{name} ({cls})" for name, cls in unknown.items())
    return f": its decoder layers hold {kinds}, a layer kind no adapter knows"


__all__ = [
    "Architecture",
    "architectures_table",
    "ModelInputs",
    "architecture_for_type",
    "architecture_of",
    "register_architecture",
    "registered_architectures",
    "supported_model_types",
]
