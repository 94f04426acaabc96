"""Modeling code for NIRVANA-pruned decoder LLMs (Llama, Qwen3, Gemma ...) whose layers differ in width.

Structured pruning removes whole KV groups and MLP channels, a different number in every layer, so
the stock configs (one ``num_key_value_heads`` / ``intermediate_size`` for all layers) cannot
describe the model. This file ships inside such a checkpoint folder and is loaded with::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

``config.nirvana_layer_widths`` holds one dict per decoder layer (``num_key_value_heads``,
``num_attention_heads``, ``intermediate_size``; a mixture-of-experts family's expert width and count). Each model
class builds the stock model and then gives every layer's q/k/v/o and gate/up/down projections (or fused experts
and router) those per-layer shapes; the forward pass is the stock one. Self-contained on purpose: it imports only
torch and transformers, never nirvana_pl.

The classes of a folder are made at the end of the file by :func:`nirvana_classes` from the stock classes
of that folder's family only (``save_pruned`` appends those lines), so that a Llama folder loads with a
transformers that lacks, say, Gemma 3.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def width_keys(layout: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The keys of one layer's entry in ``config.nirvana_layer_widths`` for a family of this ``layout``."""
    names = {**LLAMA_LAYOUT, **(layout or {})}
    experts = (names["num_experts_key"],) if names["experts"] else ()
    shared = (names["shared_width_key"],) if names["shared_expert"] else ()
    return ("num_key_value_heads", "num_attention_heads", names["mlp_width_key"]) + experts + shared


def check_layer_widths(config, layout: dict[str, Any] | None = None) -> list[dict[str, int]] | None:
    """``config.nirvana_layer_widths`` validated (one entry per layer, whole GQA groups, at least one expert in a
    mixture-of-experts layer), or None. ``layout``: the family's, as in :data:`LLAMA_LAYOUT`."""
    widths = getattr(config, "nirvana_layer_widths", None)
    if widths is None:
        return None
    if not isinstance(widths, (list, tuple)) or len(widths) != config.num_hidden_layers:
        raise ValueError(
            f"config.nirvana_layer_widths must be a list with one entry per decoder layer "
            f"({config.num_hidden_layers}); got {widths!r}. Re-export the model with nirvana_pl.save_pruned."
        )
    keys = width_keys(layout or getattr(config, "nirvana_layout", None))
    out = []
    for i, w in enumerate(widths):
        missing = [k for k in keys if k not in w]
        if missing:
            raise ValueError(f"config.nirvana_layer_widths[{i}] lacks {missing}; it needs all of {list(keys)}.")
        entry = {k: int(w[k]) for k in keys}
        n_kv, n_q, inter = (entry[k] for k in keys[:3])
        if n_kv < 1 or n_q < n_kv or n_q % n_kv:
            raise ValueError(
                f"config.nirvana_layer_widths[{i}]: num_attention_heads={n_q} must be a positive multiple of "
                f"num_key_value_heads={n_kv} (pruning removes whole KV groups)."
            )
        if inter < 0:
            raise ValueError(f"config.nirvana_layer_widths[{i}]: {keys[2]}={inter} must be >= 0.")
        if len(keys) > 3 and entry[keys[3]] < 1:
            raise ValueError(f"config.nirvana_layer_widths[{i}]: {keys[3]}={entry[keys[3]]} must be >= 1.")
        out.append(entry)
    return out


class _NirvanaConfigMixin:
    """Per-layer widths on top of a stock config.

    The stock config's own fields (``num_attention_heads`` ...) are only the shapes the model is first
    built with; ``nirvana_layer_widths`` wins. Stock ``@strict`` configs check
    ``hidden_size % num_attention_heads == 0`` on save, which does not hold for pruned layers, so the
    architecture check is replaced by the per-layer one.
    """

    def validate_architecture(self) -> None:
        if getattr(self, "nirvana_layer_widths", None) is not None:
            check_layer_widths(self)
            return
        parent = getattr(super(), "validate_architecture", None)
        if parent is not None:
            parent()

    def validate(self) -> None:
        # A @strict parent binds its validator functions at class creation; look them up by name so the
        # override above is the one that runs.
        for fn in getattr(type(self), "__class_validators__", ()):
            getattr(self, fn.__name__)()


def _reshaped(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """``old`` if it already has this shape, else a fresh Linear like it (bias, dtype, device)."""
    if old.in_features == in_features and old.out_features == out_features:
        return old
    w = old.weight
    # Same device as the replaced weight: inside from_pretrained that is the meta device, and the
    # checkpoint's tensors are materialised into these parameters afterwards.
    with warnings.catch_warnings():  # a pruned-away MLP has zero-width Linears: nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features, bias=old.bias is not None, device=w.device, dtype=w.dtype)


#: Where a Llama-like layer keeps its projections (a family's own layout is passed to nirvana_classes).
#: ``qkv`` / ``gate_up``: the fused projection that replaces q, k, v (q rows, then k, then v) or gate and up
#: (gate rows, then up), as in Phi-3. ``qk_norm``: "shared" (none, or one head's width shared by every head),
#: "per_head" (a [heads, head_dim] weight, as Cohere's) or "flat" (a [heads * head_dim] weight, as OLMo 2's).
#: ``per_layer_config``: the attention reads its head counts from ``self.config`` (Phi-3), so each layer gets a
#: view of the config with its own counts.
#: ``experts``: the MLP block's child holding fused 3-D expert parameters ``expert_gate_up`` ``[E, 2I, H]`` and
#: ``expert_down`` ``[E, H, I]`` (None: a dense MLP), with a ``router`` of one weight row per expert;
#: ``mlp_width_key`` / ``num_experts_key``: the config fields of the (expert) MLP width and the expert count;
#: ``shared_expert`` / ``shared_width_key``: the MoE block's shared expert (a gated MLP named like a dense one; None:
#: none) and the config field of its width.
LLAMA_LAYOUT = {
    "layers": "model.layers", "attention": "self_attn", "mlp": "mlp",
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
    "qkv": None, "gate_up": None, "qk_norm": "shared", "per_layer_config": False,
    "experts": None, "router": "gate", "expert_gate_up": "gate_up_proj", "expert_down": "down_proj",
    "mlp_width_key": "intermediate_size", "num_experts_key": None, "shared_expert": None, "shared_width_key": None,
}


def _attribute(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class LayerConfig:
    """The model config as one pruned layer sees it: the shared config with this layer's head counts."""

    def __init__(self, config: Any, **own: Any) -> None:
        self.__dict__["_shared"], self.__dict__["_own"] = config, dict(own)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # (copy / pickle probe these before __dict__ is filled)
            raise AttributeError(name)
        own = self.__dict__.get("_own", {})
        return own[name] if name in own else getattr(self.__dict__["_shared"], name)


def _projection_shapes(names: dict[str, Any], n_q: int, n_kv: int, inter: int, h: int) -> dict[str, tuple[str, int]]:
    """Projection name -> (which dimension is pruned, its new size) for one layer."""
    attn = ({names["qkv"]: ("out", (n_q + 2 * n_kv) * h)} if names["qkv"] else
            {names["q"]: ("out", n_q * h), names["k"]: ("out", n_kv * h), names["v"]: ("out", n_kv * h)})
    if names["experts"]:  # (the experts' fused parameters are resized by _resize_experts)
        return {**attn, names["o"]: ("in", n_q * h)}
    return {**attn, names["o"]: ("in", n_q * h), **_mlp_shapes(names, inter)}


def _mlp_shapes(names: dict[str, Any], inter: int) -> dict[str, tuple[str, int]]:
    """Projection name -> (which dimension is pruned, its new size) for a gated MLP of width ``inter``."""
    gate_up = ({names["gate_up"]: ("out", 2 * inter)} if names["gate_up"] else
               {names["gate"]: ("out", inter), names["up"]: ("out", inter)})
    return {**gate_up, names["down"]: ("in", inter)}


def _resize_experts(block: nn.Module, names: dict[str, Any], n_experts: int, inter: int, shared: int) -> bool:
    """Give a mixture-of-experts block ``n_experts`` experts of width ``inter`` (its router one row per expert, and
    a top-k of at most ``n_experts``) and a shared expert of width ``shared`` (if the family has one); True if a
    parameter changed shape."""
    experts, router = getattr(block, names["experts"]), getattr(block, names["router"])
    hidden = getattr(experts, names["expert_gate_up"]).shape[2]
    shapes = {(experts, names["expert_gate_up"]): (n_experts, 2 * inter, hidden),
              (experts, names["expert_down"]): (n_experts, hidden, inter), (router, "weight"): (n_experts, hidden)}
    changed = False
    for (owner, name), shape in shapes.items():
        old = getattr(owner, name)
        if tuple(old.shape) != shape:  # (on the meta device inside from_pretrained)
            setattr(owner, name, nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad))
            changed = True
    if names["shared_expert"]:
        mlp = getattr(block, names["shared_expert"])
        for name, (side, size) in _mlp_shapes(names, shared).items():
            old = getattr(mlp, name)
            linear = _reshaped(old, old.in_features, size) if side == "out" else _reshaped(old, size, old.out_features)
            if linear is not old:
                setattr(mlp, name, linear)
                changed = True
    set_expert_attributes(block, names, n_experts, inter, shared)
    return changed


def set_expert_attributes(block: nn.Module, names: dict[str, Any], n_experts: int, inter: int, shared: int) -> None:
    """The attributes a mixture-of-experts block's forward reads its sizes from, for ``n_experts`` experts of width
    ``inter`` and a shared expert of width ``shared`` (if the family has one); the top-k never above the experts (a
    layer left with fewer experts routes to all of them)."""
    experts, router = getattr(block, names["experts"]), getattr(block, names["router"])
    experts.num_experts = router.num_experts = n_experts
    experts.intermediate_dim = inter
    router.top_k = min(router.top_k, n_experts)
    if hasattr(block, "top_k"):
        block.top_k = router.top_k
    if names["shared_expert"]:
        getattr(block, names["shared_expert"]).intermediate_size = shared


def _resize_norm(attn: nn.Module, name: str, shape: tuple[int, ...]) -> bool:
    norm = getattr(attn, name, None)
    if norm is None or tuple(norm.weight.shape) == shape:
        return False
    norm.weight = nn.Parameter(norm.weight.new_ones(shape))  # (on the meta device inside from_pretrained)
    return True


def apply_layer_widths(
    model: nn.Module, widths: list[dict[str, Any]], head_dim: int, layout: dict[str, Any] | None = None
) -> bool:
    """Give each decoder layer of ``model`` (a *ForCausalLM) its pruned shapes; True if anything changed.

    ``layout``: module names as in :data:`LLAMA_LAYOUT` (the default)."""
    names = {**LLAMA_LAYOUT, **(layout or {})}
    layers = _attribute(model, names["layers"])
    if len(layers) != len(widths):
        raise ValueError(f"{len(widths)} layer widths for a model with {len(layers)} decoder layers.")
    changed = False
    for layer, w in zip(layers, widths):
        n_kv, n_q, inter = w["num_key_value_heads"], w["num_attention_heads"], w[names["mlp_width_key"]]
        attn, mlp = getattr(layer, names["attention"]), getattr(layer, names["mlp"])
        if names["experts"]:
            shared = w[names["shared_width_key"]] if names["shared_expert"] else 0
            changed |= _resize_experts(mlp, names, w[names["num_experts_key"]], inter, shared)
        for name, (side, size) in _projection_shapes(names, n_q, n_kv, inter, head_dim).items():
            owner = attn if hasattr(attn, name) else mlp
            old = getattr(owner, name)
            linear = (_reshaped(old, old.in_features, size) if side == "out" else
                      _reshaped(old, size, old.out_features))  # fmt: skip
            if linear is not old:
                setattr(owner, name, linear)
                changed = True
        if names["qk_norm"] != "shared":
            shapes = {"per_head": ((n_q, head_dim), (n_kv, head_dim)), "flat": ((n_q * head_dim,), (n_kv * head_dim,))}
            q_shape, k_shape = shapes[names["qk_norm"]]
            changed |= _resize_norm(attn, "q_norm", q_shape) | _resize_norm(attn, "k_norm", k_shape)
        set_layer_attributes(attn, mlp, names, n_q, n_kv, inter)
    return changed


def set_layer_attributes(
    attn: nn.Module, mlp: nn.Module, layout: dict[str, Any], n_q: int, n_kv: int, inter: int
) -> None:
    """The attributes a layer's forward reads its sizes from, for ``n_q`` query heads, ``n_kv`` KV heads and an MLP
    of width ``inter``."""
    if layout["per_layer_config"]:
        shared = getattr(attn.config, "_shared", attn.config)
        attn.config = LayerConfig(shared, num_attention_heads=n_q, num_key_value_heads=n_kv)
    # The GQA ratio of a layer is unchanged by pruning (whole groups go), but state it per layer.
    attn.num_key_value_groups = n_q // n_kv
    # Attributes some attentions read in forward(); absent in others.
    for obj, attr, value in ((attn, "num_heads", n_q), (attn, "num_key_value_heads", n_kv),
                             (mlp, "intermediate_size", inter)):  # fmt: skip
        if hasattr(obj, attr):
            setattr(obj, attr, value)


class _NirvanaCausalLMMixin:
    """Builds the stock model, then resizes each layer to ``config.nirvana_layer_widths``."""

    nirvana_layout: dict = LLAMA_LAYOUT  # (a plain annotation: transformers may evaluate it where "Any" is unbound)

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        widths = check_layer_widths(config, self.nirvana_layout)
        if widths is not None and apply_layer_widths(self, widths, _head_dim(config), self.nirvana_layout):
            # Run post_init again: it initialises only the new modules (the others are flagged as
            # initialised) and is a no-op on the meta device used by from_pretrained.
            self.post_init()

    def _get_static_cache_init_shape(self):
        # Layers differ in KV heads: let a static cache size itself lazily from the first keys it sees.
        if getattr(self.config, "nirvana_layer_widths", None) is not None:
            return None
        return super()._get_static_cache_init_shape()


def nirvana_classes(
    config_cls: type, model_cls: type, base_model_type: str, layout: dict[str, Any] | None = None,
    module: str = __name__,
) -> tuple[type, type]:
    """(config class, causal-LM class) of the ``nirvana_<base_model_type>`` format on top of the stock classes.

    Named ``Nirvana<stock name>`` (e.g. ``NirvanaQwen3Config``, ``NirvanaQwen3ForCausalLM``); ``module`` is where
    pickle finds them (this file binds them by name at its end; a caller may resolve them itself).
    """
    layout = {**LLAMA_LAYOUT, **(layout or {})}
    config = type(
        f"Nirvana{config_cls.__name__}", (_NirvanaConfigMixin, config_cls),
        {"__module__": module, "model_type": f"nirvana_{base_model_type}", "nirvana_base_model_type": base_model_type,
         "nirvana_layout": layout},
    )
    model = type(
        f"Nirvana{model_cls.__name__}", (_NirvanaCausalLMMixin, model_cls),
        {"__module__": module, "config_class": config, "nirvana_layout": layout},
    )
    return config, model


__all__ = ["LLAMA_LAYOUT", "apply_layer_widths", "check_layer_widths", "nirvana_classes", "set_expert_attributes",
           "width_keys"]
