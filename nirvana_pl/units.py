"""Where the prunable units of a model are.

A decoder layer has two kinds of units (METHOD.md section 1):

* one **KV group** = the ``g`` query heads that share a key/value head, that k and v
  head, and the matching input columns of ``o_proj``;
* one **MLP channel** = a row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj``.

This module only *describes* units (which rows/columns of which weights belong to which
unit); scoring, allocation and surgery live elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

#: Architectures whose decoder layers this library knows how to prune, keyed by
#: ``config.model_type`` (exported non-uniform models carry the base type in
#: ``config.nirvana_base_model_type``).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "t5")


class UnsupportedModelError(ValueError):
    """The model is not an architecture nirvana_pl can prune."""


@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter (peft) on a prunable linear: ``W_eff = W + scaling * B @ A``.

    ``A`` (r x in) owns input columns, ``B`` (out x r) owns output rows, so pruning slices
    ``A``'s columns with a column-sliced weight and ``B``'s rows with a row-sliced one.
    ``in_weight``: whether it is part of the effective weight now (active and not merged into W).
    """

    name: str
    A: nn.Linear
    B: nn.Linear
    scaling: float
    in_weight: bool


@dataclass(frozen=True)
class WeightSlice:
    """One weight of a unit kind and the axis along which units index it.

    ``module`` is what the model holds: an ``nn.Linear``, or a peft LoRA layer around one
    (``linear`` is then its base layer and ``adapters`` its LoRA pairs).
    ``axis=0`` means units own output rows (q, k, v, gate, up; their bias follows);
    ``axis=1`` means units own input columns (o, down; their bias is never pruned).
    ``rows_per_unit`` is how many rows/columns one unit owns in this weight.
    """

    name: str
    module: nn.Module
    axis: int
    rows_per_unit: int

    @property
    def linear(self) -> nn.Linear:
        return getattr(self.module, "base_layer", self.module)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def bias(self) -> nn.Parameter | None:
        # Only the bias of a row-sliced weight belongs to units.
        return self.linear.bias if self.axis == 0 else None

    @property
    def adapters(self) -> list[LoraAdapter]:
        m = self.module
        if not hasattr(m, "lora_A"):
            return []
        merged = set(getattr(m, "merged_adapters", ()))
        active = set(getattr(m, "active_adapters", ()))
        off = bool(getattr(m, "disable_adapters", False))
        return [
            LoraAdapter(name, m.lora_A[name], m.lora_B[name], float(m.scaling[name]),
                        in_weight=name in active and name not in merged and not off)
            for name in m.lora_A.keys()
        ]

    def unit_parameters(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, axis along which units index it) of everything the units of this weight own.

        The weight; the bias of a row-sliced weight; LoRA ``B`` rows (and ``B``'s bias) of a
        row-sliced weight, LoRA ``A`` columns of a column-sliced one.
        """
        out = [(self.weight, self.axis)] + ([(self.bias, 0)] if self.bias is not None else [])
        for ad in self.adapters:
            if self.axis == 0:
                out.append((ad.B.weight, 0))
                if ad.B.bias is not None:
                    out.append((ad.B.bias, 0))
            else:
                out.append((ad.A.weight, 1))
        return out

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with (``W + scaling * B @ A`` over unmerged active adapters), detached.

        Without adapters this is the weight itself (no copy); with them, an fp32 tensor.
        """
        adapters = [ad for ad in self.adapters if ad.in_weight]
        w = self.weight.detach()
        if not adapters:
            return w
        w = w.float()
        for ad in adapters:
            w = w + ad.scaling * (ad.B.weight.detach().float() @ ad.A.weight.detach().float())
        return w


@dataclass
class LayerUnits:
    """Prunable units of one decoder layer, as the model stands now."""

    index: int
    attn: nn.Module
    mlp: nn.Module
    head_dim: int
    group_size: int  # g = query heads per KV head; constant under pruning

    @property
    def attn_weights(self) -> list[WeightSlice]:
        h, g = self.head_dim, self.group_size
        a = self.attn
        return [
            WeightSlice("q_proj", a.q_proj, 0, g * h),
            WeightSlice("k_proj", a.k_proj, 0, h),
            WeightSlice("v_proj", a.v_proj, 0, h),
            WeightSlice("o_proj", a.o_proj, 1, g * h),
        ]

    @property
    def mlp_weights(self) -> list[WeightSlice]:
        m = self.mlp
        return [
            WeightSlice("gate_proj", m.gate_proj, 0, 1),
            WeightSlice("up_proj", m.up_proj, 0, 1),
            WeightSlice("down_proj", m.down_proj, 1, 1),
        ]

    @property
    def num_kv_groups(self) -> int:
        return self.attn.k_proj.out_features // self.head_dim

    @property
    def mlp_width(self) -> int:
        return self.mlp.gate_proj.out_features

    @property
    def kv_group_cost(self) -> int:
        """Parameters removed with one KV group (weights plus the biases that go with it)."""
        return sum(_unit_cost(w) for w in self.attn_weights)

    @property
    def mlp_channel_cost(self) -> int:
        return sum(_unit_cost(w) for w in self.mlp_weights)


def _unit_cost(w: WeightSlice) -> int:
    other = w.linear.in_features if w.axis == 0 else w.linear.out_features
    cost = w.rows_per_unit * other
    if w.bias is not None:
        cost += w.rows_per_unit
    return cost


def base_model_type(config) -> str:
    return getattr(config, "nirvana_base_model_type", None) or config.model_type


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a supported decoder LLM."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `.config`; nirvana_pl prunes transformers models "
            f"of type {', '.join(SUPPORTED_MODEL_TYPES)} (e.g. LlamaForCausalLM)."
        )
    mtype = base_model_type(config)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {mtype!r} ({type(model).__name__}) is not supported; nirvana_pl prunes "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models (LlamaForCausalLM, MistralForCausalLM, "
            f"Qwen2ForCausalLM and their base models, T5ForConditionalGeneration)."
        )
    if mtype == "t5":
        from .t5 import check_t5

        check_t5(model)
        return
    if not _decoder_layers(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layers to prune (found no `.layers` holding "
            f"modules with `self_attn` and `mlp`)."
        )


def locate_model(pl_module: nn.Module, model_attr: str | None = None) -> nn.Module:
    """The transformers model inside a LightningModule (``model_attr`` dotted path, or searched)."""
    if model_attr is not None:
        obj: Any = pl_module
        for part in model_attr.split("."):
            if not hasattr(obj, part):
                raise AttributeError(
                    f"model_attr={model_attr!r}: {type(obj).__name__} has no attribute {part!r}."
                )
            obj = getattr(obj, part)
        obj = _unwrap_peft(obj)  # a PeftModel / LoraModel: the transformers model it wraps (as the search finds)
        check_supported(obj)
        return obj
    # (a transformers config has a model_type; a LightningModule may keep a config of its own)
    candidates = [m for _, m in pl_module.named_modules() if hasattr(getattr(m, "config", None), "model_type")]
    for module in candidates:
        try:
            check_supported(module)
            return module
        except UnsupportedModelError:
            continue
    found = ", ".join(sorted({type(m).__name__ for m in candidates})) or "no transformers model"
    raise UnsupportedModelError(
        f"found no prunable model in {type(pl_module).__name__} ({found}). NirvanaPruningCallback prunes "
        "Llama, Mistral and Qwen2 causal LMs and T5ForConditionalGeneration; pass model_attr='path.to.model' if it "
        "is nested unusually."
    )


def _unwrap_peft(obj: Any) -> Any:
    """The transformers model inside peft wrappers (``PeftModel`` -> ``LoraModel`` -> model); others as they are."""
    for _ in range(4):  # PeftModel.get_base_model() already skips the tuner layer; bounded, never a loop
        if not type(obj).__module__.startswith("peft."):
            return obj
        inner = obj.get_base_model() if hasattr(obj, "get_base_model") else getattr(obj, "model", None)
        if inner is None or inner is obj:
            return obj
        obj = inner
    return obj


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)  # *ForCausalLM -> *Model
    layers = getattr(inner, "layers", None)
    if layers is None:
        return []
    return [layer for layer in layers if hasattr(layer, "self_attn") and hasattr(layer, "mlp")]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def find_units(model: nn.Module) -> list[LayerUnits]:
    """The prunable units of every decoder layer of ``model``, in layer order."""
    check_supported(model)
    config = model.config
    if base_model_type(config) == "t5":
        from .t5 import find_t5_units

        return find_t5_units(model)
    h = head_dim_of(config)
    out = []
    for i, layer in enumerate(_decoder_layers(model)):
        attn = layer.self_attn
        g = attn.num_key_value_groups
        unit = LayerUnits(index=i, attn=attn, mlp=layer.mlp, head_dim=h, group_size=g)
        for w in unit.attn_weights + unit.mlp_weights:
            check_wrapper(w, f"layer {i}")
        out.append(unit)
    return out


def check_wrapper(w: WeightSlice, where: str) -> None:
    """Accept a plain ``nn.Linear`` or a peft LoRA layer around one; refuse what cannot be sliced."""
    m = w.module
    if not hasattr(m, "base_layer"):
        if not isinstance(m, nn.Linear):
            raise UnsupportedModelError(f"{where} {w.name} is a {type(m).__name__}, expected an nn.Linear.")
        return
    if not (hasattr(m, "lora_A") and hasattr(m, "lora_B")):
        raise UnsupportedModelError(
            f"{where} {w.name} is wrapped by {type(m).__name__}, an adapter type nirvana_pl cannot slice (LoRA "
            "is supported). Merge the adapter into the base weights before pruning (model.merge_and_unload())."
        )
    if not isinstance(w.linear, nn.Linear):
        raise UnsupportedModelError(
            f"{where} {w.name}: the LoRA base layer is a {type(w.linear).__name__} (quantised?), not an nn.Linear; "
            "structured pruning needs plain weights. Load the model unquantised to prune it."
        )
    dora = [n for n, on in getattr(m, "use_dora", {}).items() if on]
    if dora:
        raise UnsupportedModelError(
            f"{where} {w.name} carries DoRA adapter(s) {dora}: DoRA's magnitude depends on whole weight "
            "columns, so it does not survive a structured slice. Use plain LoRA (use_dora=False) or merge first."
        )
    if getattr(m, "fan_in_fan_out", False):
        raise UnsupportedModelError(f"{where} {w.name}: LoRA with fan_in_fan_out=True is not supported.")


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name (from ``named_parameters``) belongs to a LoRA adapter, not the base model."""
    return any(part.startswith("lora_") for part in name.split("."))


def unit_index(num_units: int, rows_per_unit: int, kept: torch.Tensor | list[int]) -> torch.Tensor:
    """Row/column indices (along a weight's unit axis) owned by the ``kept`` units.

    For GQA group k with ``rows_per_unit = g*h`` this is ``[k*g*h, (k+1)*g*h)``.
    """
    kept = torch.as_tensor(kept, dtype=torch.long)
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= num_units):
        raise IndexError(f"unit index out of range [0, {num_units}): {kept.tolist()}")
    offsets = torch.arange(rows_per_unit, dtype=torch.long)
    return (kept[:, None] * rows_per_unit + offsets[None, :]).reshape(-1)


def prunable_parameter_count(model: nn.Module) -> int:
    """Parameters of attention and MLP modules of the decoder layers (embeddings excluded).

    Counted on the real modules, so it is the number a user can check. LoRA adapter weights are
    not counted: sparsity is a property of the base model (adapters come and go, or are merged).
    """
    return units_parameter_count(find_units(model))


def base_parameter_count(model: nn.Module) -> int:
    """All parameters of ``model`` except LoRA adapter weights (the model a merge or export gives)."""
    return sum(parameter_numel(p) for n, p in model.named_parameters() if not is_adapter_parameter(n))


def parameter_numel(p: nn.Parameter) -> int:
    """The elements of the whole parameter, also while DeepSpeed ZeRO-3 holds only a partition (``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def units_parameter_count(units: Sequence[LayerUnits]) -> int:
    """:func:`prunable_parameter_count` of the layers ``units`` describe."""
    return sum(
        parameter_numel(p)
        for layer in units
        for mod in (layer.attn, layer.mlp)
        if mod is not None  # a T5 cross-attention entry has no FFN
        for n, p in mod.named_parameters()
        if not is_adapter_parameter(n)
    )


def removed_parameters(units: Sequence[LayerUnits], kept_kv: Sequence[int], kept_mlp: Sequence[int]) -> int:
    """Attention+MLP parameters that go when layer l keeps ``kept_kv[l]`` groups and ``kept_mlp[l]`` channels."""
    return sum(
        (u.num_kv_groups - kv) * u.kv_group_cost + (u.mlp_width - mlp) * u.mlp_channel_cost
        for u, kv, mlp in zip(units, kept_kv, kept_mlp)
    )


def try_stock_config(config_cls: type, values: dict[str, Any]) -> tuple[Any, str | None]:
    """(config, None) if the stock ``config_cls`` validates ``values``, else (None, why).

    Stock configs may reject pruned widths (Llama checks ``hidden_size % num_attention_heads``).
    """
    try:
        config = config_cls.from_dict(values)
        if hasattr(config, "validate"):  # transformers>=5 @strict configs; also run at save time
            config.validate()
    except Exception as err:  # noqa: BLE001 - any rejection means "not describable by the stock config"
        return None, f"{type(err).__name__}: {err}"
    return config, None
