"""Where the prunable units of a model are.

A decoder layer has two kinds of units (METHOD.md section 1):

* one **KV group** = the ``g`` query heads that share a key/value head, that k and v
  head, and the matching input columns of ``o_proj``;
* one **MLP channel** = a row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj``.

This module only *describes* units (which rows/columns of which weights belong to which
unit, as an :class:`IndexMap`); where they sit in a given architecture is that architecture's
adapter (:mod:`nirvana_pl.arch`), and scoring, allocation and surgery live elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

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
class IndexMap:
    """Which rows (or columns) of one weight each unit owns.

    ``blocks`` are ``(offset, size)`` pairs: unit ``u`` owns ``offset + u*size + [0, size)`` in every
    block. A plain projection has one block (``q_proj``: one ``g*h`` block per KV group); a fused one
    has several (Phi-3's ``qkv_proj``: a group's q rows, then its k rows, then its v rows).
    """

    blocks: tuple[tuple[int, int], ...]
    num_units: int

    @classmethod
    def consecutive(cls, length: int, *sizes: int) -> "IndexMap":
        """Blocks one after another along an axis of ``length``: block b holds ``num_units * sizes[b]`` rows."""
        per_unit = sum(sizes)
        if per_unit <= 0 or length % per_unit:
            raise UnsupportedModelError(f"a weight axis of {length} does not split into units of {list(sizes)} rows.")
        n, offset, blocks = length // per_unit, 0, []
        for size in sizes:
            blocks.append((offset, size))
            offset += n * size
        return cls(tuple(blocks), n)

    @property
    def rows_per_unit(self) -> int:
        return sum(size for _, size in self.blocks)

    def indices(self, units: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Rows owned by ``units`` (in the order: block by block, unit by unit; sorted when ``units`` is)."""
        units = torch.as_tensor(units, dtype=torch.long)
        if units.numel() and (int(units.min()) < 0 or int(units.max()) >= self.num_units):
            raise IndexError(f"unit index out of range [0, {self.num_units}): {units.tolist()}")
        return torch.cat(
            [(offset + units[:, None] * size + torch.arange(size)[None, :]).reshape(-1) for offset, size in self.blocks]
        )

    def per_unit(self, per_row: torch.Tensor) -> torch.Tensor:
        """Sum of ``per_row`` (one value per row along the unit axis, in its last dimension) over each unit's rows:
        ``[..., num_units]``."""
        n, lead = self.num_units, per_row.shape[:-1]
        return sum(
            per_row[..., o: o + n * size].float().reshape(*lead, n, size).sum(-1) for o, size in self.blocks
        ).cpu()


@dataclass(frozen=True)
class WeightSlice:
    """One weight of a unit kind, the axis along which units index it, and which rows each unit owns.

    ``module`` is what the model holds: an ``nn.Linear``, or a peft LoRA layer around one
    (``linear`` is then its base layer and ``adapters`` its LoRA pairs).
    ``axis=0`` means units own output rows (q, k, v, gate, up; their bias follows);
    ``axis=1`` means units own input columns (o, down; their bias is never pruned).
    ``index_map``: the rows (or columns) of each unit; see :meth:`of` for the common cases.
    """

    name: str
    module: nn.Module
    axis: int
    index_map: IndexMap
    #: the parameter of ``module`` it slices (a module of fused experts holds several 3-D ones)
    param: str = "weight"
    #: > 0 for a fused expert parameter ``[experts, ...]`` (axis 0 indexes the experts): its units are the
    #: (expert, channel) pairs, expert-major (unit ``e * channels + c``), and ``index_map`` gives one expert's
    #: rows along ``axis``
    experts: int = 0
    #: where this weight's units start in its layer's pool: a layer's MLP pool may hold two kinds of channel one
    #: after the other (a mixture-of-experts layer's expert channels, then its shared expert's channels)
    unit_offset: int = 0

    @classmethod
    def of(cls, name: str, module: nn.Module, axis: int, *rows_per_unit: int) -> "WeightSlice":
        """A weight whose units own ``rows_per_unit`` consecutive rows (several numbers: a fused weight, one
        block per number, e.g. ``(g*h, h, h)`` for a fused qkv projection)."""
        linear = getattr(module, "base_layer", module)
        if not isinstance(linear, nn.Linear):  # (refused with a clear message by check_wrapper)
            return cls(name, module, axis, IndexMap(((0, sum(rows_per_unit)),), 0))
        return cls(name, module, axis, _index_map(name, linear.weight, axis, rows_per_unit))

    def shifted(self, unit_offset: int) -> "WeightSlice":
        """This weight as the part of a larger pool whose units start at ``unit_offset``."""
        return dataclasses.replace(self, unit_offset=unit_offset)

    @classmethod
    def follower(cls, name: str, module: nn.Module, axis: int, *rows_per_unit: int) -> "WeightSlice":
        """The ``weight`` of a module that is not a projection but follows the units (a per-head norm, a
        per-head position bias): sliced and counted with them, never scored."""
        return cls(name, module, axis, _index_map(name, module.weight, axis, rows_per_unit))

    @classmethod
    def of_experts(cls, name: str, module: nn.Module, param: str, axis: int, *rows_per_unit: int) -> "WeightSlice":
        """A fused expert parameter ``module.<param>`` of shape ``[experts, ...]`` whose channels own
        ``rows_per_unit`` rows along ``axis`` (1 or 2) of each expert's matrix (several numbers: fused blocks, e.g.
        ``(1, 1)`` for a ``gate_up_proj`` holding every expert's gate rows, then its up rows)."""
        weight = getattr(module, param)
        shape = full_shape(weight)
        if len(shape) != 3 or axis not in (1, 2):
            raise UnsupportedModelError(f"{name}: expected a 3-D fused expert parameter, got shape {list(shape)}.")
        index_map = _index_map(name, weight, axis, rows_per_unit)
        return cls(name, module, axis, index_map, param=param, experts=shape[0])

    @property
    def rows_per_unit(self) -> int:
        return self.index_map.rows_per_unit

    @property
    def num_units(self) -> int:
        return self.index_map.num_units * max(self.experts, 1)

    @property
    def channels_per_expert(self) -> int:
        """Units of one expert (of the whole weight when it holds no experts)."""
        return self.index_map.num_units

    @property
    def pool_end(self) -> int:
        """One past the last unit of the layer's pool this weight owns rows of."""
        return self.unit_offset + self.num_units

    def local_units(self, units: Sequence[int]) -> list[int]:
        """Those of the layer's pool ``units`` that this weight owns, as its own unit indices."""
        return [int(u) - self.unit_offset for u in units if self.unit_offset <= int(u) < self.pool_end]

    @property
    def summed_axis(self) -> int:
        """The axis a unit's saliency is summed over (the weight's other axis; an expert's other axis)."""
        return (3 - self.axis) if self.experts else (1 - self.axis)

    @property
    def linear(self) -> nn.Linear:
        return getattr(self.module, "base_layer", self.module)

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.linear, self.param)

    @property
    def bias(self) -> nn.Parameter | None:
        # Only the bias of a row-sliced weight belongs to units.
        if self.experts or self.param != "weight":
            return None
        return getattr(self.linear, "bias", None) if self.axis == 0 else None

    def per_unit(self, per_row: torch.Tensor) -> torch.Tensor:
        """One score per unit (``[num_units]``) from per-row sums along the unit axis (``[experts, rows]`` for a
        fused expert parameter)."""
        return self.index_map.per_unit(per_row).reshape(-1)

    def take_experts(self, t: torch.Tensor, kept: Sequence[int], kept_experts: Sequence[int]) -> torch.Tensor:
        """For a fused expert parameter: the entries of ``t`` (the weight, or a tensor of its shape: a gradient, an
        optimizer moment) of the ``kept_experts`` (sorted) and, in each, of its channels among the kept
        (expert, channel) units ``kept``, the same number in every kept expert."""
        per_expert = expert_channels(kept, self.channels_per_expert, kept_experts)
        experts = torch.as_tensor(list(kept_experts), dtype=torch.long, device=t.device)
        rows = torch.stack([self.index_map.indices(c) for c in per_expert]).to(t.device)  # [kept experts, rows]
        t = t.index_select(0, experts)
        if self.axis == 1:
            return t.gather(1, rows[:, :, None].expand(-1, -1, t.shape[2]))
        return t.gather(2, rows[:, None, :].expand(-1, t.shape[1], -1))

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
    """Prunable units of one decoder layer (or other unit entry), as the model stood when they were found (a
    cut makes them stale: find them again).

    Built by the model's architecture adapter: ``attn_weights`` are the weights one KV group owns rows or
    columns of, ``mlp_weights`` those of one MLP channel (empty for an entry with no MLP); both are scored.
    ``attn_followers`` lose the removed groups' rows too but are not scored. ``attn`` and ``mlp`` are the
    modules whose parameters count as the prunable ones.
    """

    index: int
    attn: nn.Module
    mlp: nn.Module | None
    head_dim: int
    group_size: int  # g = query heads per KV head; constant under pruning
    attn_weights: list[WeightSlice]
    mlp_weights: list[WeightSlice]
    label: str = ""  # e.g. T5's "encoder.0"; '' for the layers of a decoder LLM
    #: parameters that are not scored but lose the rows of removed KV groups (per-head norm weights ...)
    attn_followers: list[WeightSlice] = field(default_factory=list)
    #: a mixture-of-experts layer: its number of experts (0: a dense MLP). Its MLP units are then the
    #: (expert, channel) pairs of the fused expert weights, expert-major, and whole experts can go too
    num_experts: int = 0
    #: parameters that lose a removed expert's row besides the expert weights (the router's weight)
    expert_followers: list[WeightSlice] = field(default_factory=list)

    @property
    def num_kv_groups(self) -> int:
        return self.attn_weights[0].num_units

    @property
    def mlp_width(self) -> int:
        """Units of the MLP pool (in a mixture-of-experts layer: its expert channels, then its shared expert's)."""
        return max((w.pool_end for w in self.mlp_weights), default=0)

    @property
    def kv_group_cost(self) -> int:
        """Parameters removed with one KV group (weights plus the biases and followers that go with it)."""
        return sum(_unit_cost(w) for w in self.attn_weights + self.attn_followers)

    @property
    def mlp_channel_cost(self) -> int:
        """Parameters removed with one MLP channel (an expert channel, in a mixture-of-experts layer; an adapter
        whose layers also hold a shared expert checks that its channels cost the same)."""
        return sum(_unit_cost(w) for w in self.mlp_weights if bool(w.experts) == bool(self.num_experts))

    @property
    def shared_channel_cost(self) -> int:
        """Parameters removed with one channel of the shared expert of a mixture-of-experts layer (0: none)."""
        return sum(_unit_cost(w) for w in self.mlp_weights if self.num_experts and not w.experts)

    @property
    def channels_per_expert(self) -> int:
        """MLP channels of one expert (a dense MLP's width when the layer has no experts)."""
        experts = [w for w in self.mlp_weights if w.experts]
        return experts[0].channels_per_expert if experts else self.mlp_width

    @property
    def expert_units(self) -> int:
        """The (expert, channel) units at the start of the MLP pool (0 in a dense layer)."""
        return self.num_experts * self.channels_per_expert

    @property
    def shared_width(self) -> int:
        """Channels of the shared expert of a mixture-of-experts layer, the last units of its MLP pool (0: none)."""
        return self.mlp_width - self.expert_units if self.num_experts else 0

    @property
    def expert_follower_cost(self) -> int:
        """Parameters removed with one expert besides its channels (its router row)."""
        return sum(_unit_cost(w) for w in self.expert_followers)

    def input_stream(self, w: WeightSlice) -> str:
        """Which input sequence feeds ``w`` (a key of :attr:`ModelInputs.stream_masks`)."""
        return "input"

    def modules(self) -> list[nn.Module]:
        return [self.attn] + ([self.mlp] if self.mlp is not None else [])


def expert_channels(kept: Sequence[int], channels: int, kept_experts: Sequence[int]) -> list[list[int]]:
    """The kept channels of each kept expert, from kept (expert, channel) units ``e * channels + c``; raises
    ValueError unless every kept expert keeps the same number and no other expert keeps any."""
    per_expert: dict[int, list[int]] = {int(e): [] for e in kept_experts}
    for u in kept:
        e, c = divmod(int(u), channels)
        if e not in per_expert:
            raise ValueError(f"expert {e} keeps channel {c} but is not among the kept experts {list(kept_experts)}.")
        per_expert[e].append(c)
    widths = {len(c) for c in per_expert.values()}
    if len(widths) > 1:
        raise ValueError(
            f"the experts of a fused expert tensor must keep the same number of channels; got {sorted(widths)}."
        )
    return [per_expert[e] for e in sorted(per_expert)]


def _index_map(name: str, weight: nn.Parameter, axis: int, rows_per_unit: Sequence[int]) -> IndexMap:
    try:
        return IndexMap.consecutive(full_shape(weight)[axis], *rows_per_unit)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(
            f"{name} (shape {list(full_shape(weight))}): {err} Is config.head_dim (or num_key_value_heads) the one the "
            "model was built with?"
        ) from None


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """The shape of the whole parameter, also while DeepSpeed ZeRO-3 holds only a partition (``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _unit_cost(w: WeightSlice) -> int:
    shape = full_shape(w.weight)
    other = shape[w.summed_axis] if w.experts else math.prod(shape[: w.axis] + shape[w.axis + 1 :])
    cost = w.rows_per_unit * other
    if w.bias is not None:  # (a Linear's bias: one entry per row; a per-head norm's: one row of its own)
        cost += w.rows_per_unit * math.prod(full_shape(w.bias)[1:])
    return cost


def base_model_type(config) -> str:
    return getattr(config, "nirvana_base_model_type", None) or config.model_type


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a model some registered architecture can prune."""
    from .arch import architecture_of  # (the adapters build on this module's types)

    architecture_of(model).check(model)


def locate_model(pl_module: nn.Module, model_attr: str | None = None) -> nn.Module:
    """The transformers model inside a LightningModule (``model_attr`` dotted path, or searched: the one prunable
    model, or among several the only one with trainable weights; otherwise the error asks for ``model_attr``)."""
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
    candidates = [(n, m) for n, m in pl_module.named_modules() if hasattr(getattr(m, "config", None), "model_type")]
    found: list[tuple[str, nn.Module]] = []  # the outermost prunable models (a model's own base model is inside it)
    for name, module in candidates:
        if any(outer == "" or name.startswith(f"{outer}.") for outer, _ in found):  # ("": pl_module is the model)
            continue
        try:
            check_supported(module)
        except UnsupportedModelError:
            continue
        found.append((name, module))
    if len(found) == 1:
        return found[0][1]
    trained = [n for n, m in found if any(p.requires_grad for p in m.parameters())]
    if len(trained) == 1:  # e.g. a frozen reference or teacher model beside the one being trained
        return dict(found)[trained[0]]
    if found:
        listed = ", ".join(f"{n!r} ({type(m).__name__}, {'trained' if n in trained else 'frozen'})" for n, m in found)
        raise ValueError(
            f"{type(pl_module).__name__} holds {len(found)} prunable models: {listed}. Pass model_attr= the path of "
            f"the one to prune, e.g. model_attr={found[0][0]!r}."
        )
    names = ", ".join(sorted({type(m).__name__ for _, m in candidates})) or "no transformers model"
    from .arch import supported_model_types

    raise UnsupportedModelError(
        f"found no prunable model in {type(pl_module).__name__} ({names}). NirvanaPruningCallback prunes models of "
        f"type {', '.join(supported_model_types())}; pass model_attr='path.to.model' if it is nested unusually."
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


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def find_units(model: nn.Module) -> list[LayerUnits]:
    """The prunable units of every decoder layer (unit entry) of ``model``, in layer order."""
    from .arch import architecture_of  # (the adapters build on this module's types)

    return architecture_of(model).find_units(model)


def check_wrapper(w: WeightSlice, where: str) -> None:
    """Accept a plain ``nn.Linear`` or a peft LoRA layer around one; refuse what cannot be sliced."""
    m = w.module
    if w.experts:  # a fused expert parameter: a plain tensor of the experts module (peft would wrap the module)
        if hasattr(m, "base_layer") or not isinstance(w.weight, nn.Parameter):
            raise UnsupportedModelError(
                f"{where} {w.name} is wrapped by {type(m).__name__}; nirvana_pl prunes mixture-of-experts weights "
                "without adapters. Merge the adapter into the base weights before pruning (model.merge_and_unload())."
            )
        return
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
    return IndexMap(((0, rows_per_unit),), num_units).indices(kept)


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
        for mod in layer.modules()
        for n, p in mod.named_parameters()
        if not is_adapter_parameter(n)
    )


def removed_parameters(
    units: Sequence[LayerUnits], kept_kv: Sequence[int], kept_mlp: Sequence[int],
    kept_experts: Sequence[int | None] | None = None,
) -> int:
    """Attention+MLP parameters that go when layer l keeps ``kept_kv[l]`` groups, ``kept_mlp[l]`` channels
    (expert channels, in a mixture-of-experts layer) and ``kept_experts[l]`` experts (None: all)."""
    experts = kept_experts if kept_experts is not None else [None] * len(units)
    return sum(
        (u.num_kv_groups - kv) * u.kv_group_cost + (u.mlp_width - mlp) * u.mlp_channel_cost
        + (u.num_experts - (u.num_experts if e is None else e)) * u.expert_follower_cost
        for u, kv, mlp, e in zip(units, kept_kv, kept_mlp, experts)
    )
