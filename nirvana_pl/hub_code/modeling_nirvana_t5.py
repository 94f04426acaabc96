"""Modeling code for NIRVANA-pruned T5 (encoder-decoder) checkpoints whose attentions and FFNs differ in width.

Structured pruning removes whole attention heads (encoder self-attention, decoder self-attention,
decoder cross-attention) and FFN channels, a different number in every block, so the stock ``T5Config``
(one ``num_heads`` / ``d_ff`` for all blocks) cannot describe the model. This file ships inside such a
checkpoint folder and is loaded with::

    AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)

``config.nirvana_t5_layers`` = ``{"encoder": [{"self_heads": [...], "d_ff": n}, ...],
"decoder": [{"self_heads": [...], "cross_heads": [...], "d_ff": n}, ...]}``: for every attention the
ORIGINAL indices of the heads it keeps, and every FFN width. ``config.num_heads`` stays the dense head
count: it is the width of the relative position bias, which the first block of each stack computes
for all original heads and passes on; each pruned attention adds the bias columns of its own kept
heads (:class:`NirvanaT5AttentionMixin`). UMT5, whose every self-attention owns its bias, needs no
original indices: its lists are ``0 .. n-1`` for an attention of n heads, and each attention's bias is built
with n columns. Self-contained on purpose: it imports only torch and transformers, never nirvana_pl.

The classes of a folder are made at the end of the file by :func:`nirvana_t5_classes` from the stock classes
of that folder's family only (T5 or MT5, whose attention is T5's under another name; ``save_pruned`` appends
those lines).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import nn

#: name of the buffer holding the original indices of the heads an attention keeps
KEPT_HEADS = "nirvana_kept_heads"


class NirvanaT5AttentionMixin:
    """On top of the family's stock attention: keeps a subset of the original heads and reads their relative-bias
    columns.

    The position bias that travels between the blocks of a stack always has one column per ORIGINAL
    head (``nirvana_bias_heads``); this attention uses the columns of the heads it kept
    (buffer ``nirvana_kept_heads``) and passes the full bias on, so every later block, pruned or not,
    finds the columns of its own heads. The zero bias of an attention without a relative bias (the
    decoder's cross-attention) is passed on with the full head count too.
    """

    nirvana_bias_heads: int

    def forward(
        self,
        hidden_states,
        mask=None,
        key_value_states=None,
        position_bias=None,
        past_key_values=None,
        **kwargs: Any,
    ):
        kept = getattr(self, KEPT_HEADS)
        own = position_bias.index_select(1, kept) if position_bias is not None else None
        self._nirvana_full_bias = None
        out, used_bias, weights = super().forward(
            hidden_states, mask=mask, key_value_states=key_value_states, position_bias=own,
            past_key_values=past_key_values, **kwargs,
        )  # fmt: skip
        if position_bias is None:
            position_bias = self._nirvana_full_bias
            if position_bias is None:  # the zero bias of an attention without relative bias
                b, _, q, k = used_bias.shape
                position_bias = used_bias[:, :1].expand(b, self.nirvana_bias_heads, q, k)
        self._nirvana_full_bias = None
        return out, position_bias, weights

    def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        full = super().compute_bias(query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)
        self._nirvana_full_bias = full  # passed on by forward(); this attention uses its own columns
        return full.index_select(1, getattr(self, KEPT_HEADS).to(full.device))


def make_pruned_attention(
    attn: nn.Module, kept_heads: Sequence[int] | torch.Tensor, bias_heads: int, nirvana_cls: type
) -> None:
    """Turn ``attn`` (in place, parameters kept) into a ``nirvana_cls`` (its family's pruned attention class, from
    :func:`nirvana_t5_classes`) with these kept heads.

    Only the bookkeeping changes (class, ``n_heads``, ``inner_dim``, the kept-heads buffer); the q/k/v/o
    weights must already have (or be given) ``len(kept_heads) * d_kv`` rows/columns.
    """
    device = attn.q.weight.device
    kept = torch.as_tensor(kept_heads, dtype=torch.long, device=device).reshape(-1)
    if not isinstance(attn, NirvanaT5AttentionMixin):
        attn.__class__ = nirvana_cls
    if KEPT_HEADS in attn._buffers:
        setattr(attn, KEPT_HEADS, kept)
    else:
        attn.register_buffer(KEPT_HEADS, kept, persistent=True)
    attn.nirvana_bias_heads = int(bias_heads)
    set_head_count(attn, int(kept.numel()))


def check_t5_layers(config) -> dict[str, list[dict[str, Any]]] | None:
    """``config.nirvana_t5_layers`` validated against the config, or None when absent."""
    layers = getattr(config, "nirvana_t5_layers", None)
    if layers is None:
        return None
    n_dec = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
    expect = {"encoder": (config.num_layers, ("self_heads",)), "decoder": (n_dec, ("self_heads", "cross_heads"))}
    if not isinstance(layers, dict) or set(layers) != set(expect):
        raise ValueError(
            f"config.nirvana_t5_layers must be a dict with keys 'encoder' and 'decoder'; got {layers!r}. "
            "Re-export the model with nirvana_pl.save_pruned."
        )
    for stack, (n, head_keys) in expect.items():
        entries = layers[stack]
        if not isinstance(entries, (list, tuple)) or len(entries) != n:
            raise ValueError(
                f"config.nirvana_t5_layers[{stack!r}] must have one entry per block ({n}); got "
                f"{len(entries) if isinstance(entries, (list, tuple)) else entries!r}."
            )
        for i, entry in enumerate(entries):
            for key in head_keys:
                heads = entry.get(key) if isinstance(entry, dict) else None
                if (
                    not isinstance(heads, (list, tuple)) or not heads
                    or list(heads) != sorted(set(heads)) or heads[0] < 0 or heads[-1] >= config.num_heads
                ):  # fmt: skip
                    raise ValueError(
                        f"config.nirvana_t5_layers[{stack!r}][{i}][{key!r}] = {heads!r} must be a non-empty sorted "
                        f"list of distinct head indices in [0, num_heads={config.num_heads})."
                    )
            d_ff = entry.get("d_ff")
            if not isinstance(d_ff, int) or d_ff < 0:
                raise ValueError(
                    f"config.nirvana_t5_layers[{stack!r}][{i}]['d_ff'] = {d_ff!r} must be an integer >= 0."
                )
    return layers


class _NirvanaT5ConfigMixin:
    def validate_architecture(self) -> None:
        super().validate_architecture()
        check_t5_layers(self)


def _reshaped(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """``old`` if it already has this shape, else a fresh Linear like it (bias, dtype, device)."""
    if old.in_features == in_features and old.out_features == out_features:
        return old
    w = old.weight
    with warnings.catch_warnings():  # a pruned-away MLP has zero-width Linears: nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features, bias=old.bias is not None, device=w.device, dtype=w.dtype)


def _ffn_weights(ffn: nn.Module) -> tuple[list[str], str]:
    rows = ["wi_0", "wi_1"] if hasattr(ffn, "wi_0") else ["wi"]
    return rows, "wo"


def set_head_count(attn: nn.Module, n_heads: int) -> None:
    """The attributes an attention reads its head count from (and its own position bias's width, UMT5)."""
    attn.n_heads = int(n_heads)
    attn.inner_dim = attn.n_heads * attn.key_value_proj_dim
    bias = getattr(attn, "relative_attention_bias", None)
    if bias is not None and getattr(attn, KEPT_HEADS, None) is None:  # (T5's first block: the dense width)
        bias.embedding_dim = int(bias.weight.shape[1])


def _resize_own_bias(attn: nn.Module, n_heads: int) -> bool:
    """UMT5: an attention's own relative position bias, one column per head it has."""
    bias = getattr(attn, "relative_attention_bias", None)
    if bias is None or bias.weight.shape[1] == n_heads:
        return False
    w = bias.weight
    attn.relative_attention_bias = nn.Embedding(bias.num_embeddings, n_heads, device=w.device, dtype=w.dtype)
    return True


def resize_attention(attn: nn.Module, kept_heads: Sequence[int], bias_heads: int, nirvana_cls: type | None) -> bool:
    """Give ``attn`` the shapes of ``len(kept_heads)`` heads and make it a ``nirvana_cls``; True if resized.

    ``nirvana_cls`` None: the attention owns its position bias (UMT5), which is resized with the heads instead."""
    inner = len(kept_heads) * attn.key_value_proj_dim
    changed = False
    for name in ("q", "k", "v"):
        old = getattr(attn, name)
        new = _reshaped(old, old.in_features, inner)
        if new is not old:
            setattr(attn, name, new)
            changed = True
    new_o = _reshaped(attn.o, inner, attn.o.out_features)
    if new_o is not attn.o:
        attn.o = new_o
        changed = True
    if nirvana_cls is None:
        changed |= _resize_own_bias(attn, len(kept_heads))
        set_head_count(attn, len(kept_heads))
    else:
        make_pruned_attention(attn, kept_heads, bias_heads, nirvana_cls)
    return changed


def resize_ffn(ffn: nn.Module, width: int) -> bool:
    """Give a T5 FFN (``wi``/``wo`` or ``wi_0``/``wi_1``/``wo``) ``width`` channels; True if resized."""
    rows, col = _ffn_weights(ffn)
    changed = False
    for name in rows:
        old = getattr(ffn, name)
        new = _reshaped(old, old.in_features, width)
        if new is not old:
            setattr(ffn, name, new)
            changed = True
    old = getattr(ffn, col)
    new = _reshaped(old, width, old.out_features)
    if new is not old:
        setattr(ffn, col, new)
        changed = True
    return changed


def apply_t5_layers(
    model: nn.Module, layers: dict[str, list[dict[str, Any]]], bias_heads: int, nirvana_cls: type
) -> bool:
    """Give every attention and FFN of a T5 model the widths ``layers`` describes (pruned attentions become
    ``nirvana_cls``); True if anything was resized."""
    changed = False
    for stack_name, entries in layers.items():
        stack = getattr(model, stack_name)
        if len(stack.block) != len(entries):
            raise ValueError(f"{len(entries)} {stack_name} entries for a stack of {len(stack.block)} blocks.")
        for block, entry in zip(stack.block, entries):
            changed |= resize_attention(block.layer[0].SelfAttention, entry["self_heads"], bias_heads, nirvana_cls)
            if stack_name == "decoder":
                changed |= resize_attention(block.layer[1].EncDecAttention, entry["cross_heads"], bias_heads,
                                            nirvana_cls)  # fmt: skip
            changed |= resize_ffn(block.layer[-1].DenseReluDense, int(entry["d_ff"]))
    return changed


class _NirvanaT5ModelMixin:
    """Builds the stock model, then gives each attention and FFN its pruned width (``config.nirvana_t5_layers``)."""

    nirvana_attention_class: type

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        layers = check_t5_layers(config)
        if layers is not None and apply_t5_layers(self, layers, config.num_heads, self.nirvana_attention_class):
            # Initialises only the new modules; a no-op on the meta device used by from_pretrained.
            self.post_init()


def nirvana_t5_classes(
    attention_cls: type | None, config_cls: type, model_cls: type, base_model_type: str, module: str = __name__
) -> tuple[type | None, type, type]:
    """(pruned attention class, config class, model class) of the ``nirvana_<base_model_type>`` format on top of a
    family's stock classes, named ``Nirvana<stock name>`` (e.g. ``NirvanaT5Attention``) and defined in this module.
    ``attention_cls`` None: the family's attentions own their position bias (UMT5) and stay stock. ``module``: where
    pickle finds them (this file binds them by name at its end; a caller may resolve them itself)."""
    attention = None if attention_cls is None else type(
        f"Nirvana{attention_cls.__name__}", (NirvanaT5AttentionMixin, attention_cls), {"__module__": module}
    )
    config = type(
        f"Nirvana{config_cls.__name__}", (_NirvanaT5ConfigMixin, config_cls),
        {"__module__": module, "model_type": f"nirvana_{base_model_type}",
         "nirvana_base_model_type": base_model_type},
    )  # fmt: skip
    model = type(
        f"Nirvana{model_cls.__name__}", (_NirvanaT5ModelMixin, model_cls),
        {"__module__": module, "config_class": config, "nirvana_attention_class": attention},
    )
    return attention, config, model


__all__ = [
    "KEPT_HEADS",
    "NirvanaT5AttentionMixin",
    "apply_t5_layers",
    "check_t5_layers",
    "make_pruned_attention",
    "nirvana_t5_classes",
    "resize_attention",
    "resize_ffn",
    "set_head_count",
]
