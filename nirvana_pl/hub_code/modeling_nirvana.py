"""Modeling code for NIRVANA-pruned Llama / Mistral / Qwen2 checkpoints whose layers differ in width.

Structured pruning removes whole KV groups and MLP channels, a different number in every layer, so
the stock configs (one ``num_key_value_heads`` / ``intermediate_size`` for all layers) cannot
describe the model. This file ships inside such a checkpoint folder and is loaded with::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

``config.nirvana_layer_widths`` holds one dict per decoder layer (``num_key_value_heads``,
``num_attention_heads``, ``intermediate_size``). Each model class builds the stock model and then
gives every layer's q/k/v/o and gate/up/down projections those per-layer shapes; the forward pass is
the stock one. Self-contained on purpose: it imports only torch and transformers, never nirvana_pl.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WIDTH_KEYS = ("num_key_value_heads", "num_attention_heads", "intermediate_size")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_layer_widths(config) -> list[dict[str, int]] | None:
    """``config.nirvana_layer_widths`` validated (one entry per layer, whole GQA groups), or None."""
    widths = getattr(config, "nirvana_layer_widths", None)
    if widths is None:
        return None
    if not isinstance(widths, (list, tuple)) or len(widths) != config.num_hidden_layers:
        raise ValueError(
            f"config.nirvana_layer_widths must be a list with one entry per decoder layer "
            f"({config.num_hidden_layers}); got {widths!r}. Re-export the model with nirvana_pl.save_pruned."
        )
    out = []
    for i, w in enumerate(widths):
        missing = [k for k in WIDTH_KEYS if k not in w]
        if missing:
            raise ValueError(f"config.nirvana_layer_widths[{i}] lacks {missing}; it needs all of {list(WIDTH_KEYS)}.")
        n_kv, n_q, inter = (int(w[k]) for k in WIDTH_KEYS)
        if n_kv < 1 or n_q < n_kv or n_q % n_kv:
            raise ValueError(
                f"config.nirvana_layer_widths[{i}]: num_attention_heads={n_q} must be a positive multiple of "
                f"num_key_value_heads={n_kv} (pruning removes whole KV groups)."
            )
        if inter < 0:
            raise ValueError(f"config.nirvana_layer_widths[{i}]: intermediate_size={inter} must be >= 0.")
        out.append({"num_key_value_heads": n_kv, "num_attention_heads": n_q, "intermediate_size": inter})
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


class NirvanaLlamaConfig(_NirvanaConfigMixin, LlamaConfig):
    model_type = "nirvana_llama"
    nirvana_base_model_type = "llama"


class NirvanaMistralConfig(_NirvanaConfigMixin, MistralConfig):
    model_type = "nirvana_mistral"
    nirvana_base_model_type = "mistral"


class NirvanaQwen2Config(_NirvanaConfigMixin, Qwen2Config):
    model_type = "nirvana_qwen2"
    nirvana_base_model_type = "qwen2"


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


def apply_layer_widths(model: nn.Module, widths: list[dict[str, Any]], head_dim: int) -> bool:
    """Give each decoder layer of ``model`` (a *ForCausalLM) its pruned shapes; True if anything changed."""
    layers = model.model.layers
    if len(layers) != len(widths):
        raise ValueError(f"{len(widths)} layer widths for a model with {len(layers)} decoder layers.")
    changed = False
    for layer, w in zip(layers, widths):
        n_kv, n_q, inter = w["num_key_value_heads"], w["num_attention_heads"], w["intermediate_size"]
        attn, mlp = layer.self_attn, layer.mlp
        new = {
            (attn, "q_proj"): _reshaped(attn.q_proj, attn.q_proj.in_features, n_q * head_dim),
            (attn, "k_proj"): _reshaped(attn.k_proj, attn.k_proj.in_features, n_kv * head_dim),
            (attn, "v_proj"): _reshaped(attn.v_proj, attn.v_proj.in_features, n_kv * head_dim),
            (attn, "o_proj"): _reshaped(attn.o_proj, n_q * head_dim, attn.o_proj.out_features),
            (mlp, "gate_proj"): _reshaped(mlp.gate_proj, mlp.gate_proj.in_features, inter),
            (mlp, "up_proj"): _reshaped(mlp.up_proj, mlp.up_proj.in_features, inter),
            (mlp, "down_proj"): _reshaped(mlp.down_proj, inter, mlp.down_proj.out_features),
        }
        for (owner, name), linear in new.items():
            if linear is not getattr(owner, name):
                setattr(owner, name, linear)
                changed = True
        # The GQA ratio of a layer is unchanged by pruning (whole groups go), but state it per layer.
        attn.num_key_value_groups = n_q // n_kv
        # Attributes older transformers versions read in forward(); absent in newer ones.
        for obj, attr, value in (
            (attn, "num_heads", n_q),
            (attn, "num_key_value_heads", n_kv),
            (mlp, "intermediate_size", inter),
        ):
            if hasattr(obj, attr):
                setattr(obj, attr, value)
    return changed


class _NirvanaCausalLMMixin:
    """Builds the stock model, then resizes each layer to ``config.nirvana_layer_widths``."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        widths = check_layer_widths(config)
        if widths is not None and apply_layer_widths(self, widths, _head_dim(config)):
            # Run post_init again: it initialises only the new modules (the others are flagged as
            # initialised) and is a no-op on the meta device used by from_pretrained.
            self.post_init()

    def _get_static_cache_init_shape(self):
        # Layers differ in KV heads: let a static cache size itself lazily from the first keys it sees.
        if getattr(self.config, "nirvana_layer_widths", None) is not None:
            return None
        return super()._get_static_cache_init_shape()


class NirvanaLlamaForCausalLM(_NirvanaCausalLMMixin, LlamaForCausalLM):
    config_class = NirvanaLlamaConfig


class NirvanaMistralForCausalLM(_NirvanaCausalLMMixin, MistralForCausalLM):
    config_class = NirvanaMistralConfig


class NirvanaQwen2ForCausalLM(_NirvanaCausalLMMixin, Qwen2ForCausalLM):
    config_class = NirvanaQwen2Config


#: nirvana model_type -> (config class, causal-LM class, stock model_type)
NIRVANA_CLASSES = {
    "nirvana_llama": (NirvanaLlamaConfig, NirvanaLlamaForCausalLM, "llama"),
    "nirvana_mistral": (NirvanaMistralConfig, NirvanaMistralForCausalLM, "mistral"),
    "nirvana_qwen2": (NirvanaQwen2Config, NirvanaQwen2ForCausalLM, "qwen2"),
}

__all__ = [
    "NIRVANA_CLASSES",
    "NirvanaLlamaConfig",
    "NirvanaLlamaForCausalLM",
    "NirvanaMistralConfig",
    "NirvanaMistralForCausalLM",
    "NirvanaQwen2Config",
    "NirvanaQwen2ForCausalLM",
    "apply_layer_widths",
    "check_layer_widths",
]
