"""T5, MT5 and UMT5 (encoder-decoder) support: where the units are, what surgery does besides slicing, the
teacher-forced inputs of the data-driven estimators, and the export. MT5's modules are T5's under other
names and UMT5's differ only in where the position bias lives, so one :class:`T5Architecture` per family,
naming its stock classes, covers all three.

T5 is described to the generic allocate/plan/surgery code as a list of *unit entries*, each a
:class:`T5Units` (a :class:`~nirvana_pl.units.LayerUnits` with a label):

* ``encoder.<i>``: the heads of encoder block i's self-attention and its FFN channels;
* ``decoder.<i>.self``: the heads of decoder block i's self-attention and its FFN channels;
* ``decoder.<i>.cross``: the heads of decoder block i's cross-attention (no FFN: width 0).

A head is a unit of group size 1 (rows ``d_kv`` of q, k, v; columns of o). All heads share one pool
and all FFN channels another (METHOD.md section 3). T5 and MT5 never prune the relative position bias: the
first block of each stack computes it for every original head and each pruned attention
(:class:`~nirvana_pl.hub_code.modeling_nirvana_t5.NirvanaT5AttentionMixin` on the family's attention class)
reads the columns of the original heads it keeps, recorded in its buffer ``nirvana_kept_heads`` (saved with
the weights). UMT5 has a bias in every self-attention: its columns go with that attention's heads.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..hf_folder import config_dict, patch_config_json, save_with_config, try_stock_config, write_remote_code_folder
from ..hub_code import modeling_nirvana_t5
from ..hub_code.modeling_nirvana_t5 import KEPT_HEADS, NirvanaT5AttentionMixin, make_pruned_attention, set_head_count
from ..plan import PruningPlan
from ..units import LayerUnits, UnsupportedModelError, WeightSlice
from . import Architecture, Materialize, ModelInputs, architecture_of, register_architecture


@dataclass
class T5Units(LayerUnits):
    """One unit entry of a T5 model: the heads of one attention and (optionally) one FFN.

    ``mlp`` is the FFN module (``DenseReluDense``) or None for a cross-attention entry.
    """

    kind: str = ""
    stream: str = "encoder"  # which sequence the attention's queries (and the FFN) read

    @property
    def mlp_channel_cost(self) -> int:
        if self.mlp is None:  # no FFN in this entry; the cost of a channel anywhere else
            d = self.attn.o.out_features
            return d * 3 if self._gated else d * 2
        return super().mlp_channel_cost

    _gated: bool = False

    def input_stream(self, w: WeightSlice) -> str:
        """Which sequence feeds ``w`` (``encoder`` or ``decoder``).

        The key/value of cross-attention read the encoder.
        """
        if self.kind == "decoder.cross" and w.name in ("k", "v"):
            return "encoder"
        return self.stream


def _attn_weights(a: nn.Module, h: int) -> list[WeightSlice]:
    return [WeightSlice.of("q", a.q, 0, h), WeightSlice.of("k", a.k, 0, h), WeightSlice.of("v", a.v, 0, h),
            WeightSlice.of("o", a.o, 1, h)]  # fmt: skip


def _mlp_weights(m: nn.Module | None) -> list[WeightSlice]:
    if m is None:
        return []
    rows = [WeightSlice.of(n, getattr(m, n), 0, 1) for n in (("wi_0", "wi_1") if hasattr(m, "wi_0") else ("wi",))]
    return rows + [WeightSlice.of("wo", m.wo, 1, 1)]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    attention_cls = _family(model).stock_classes()[0]
    return [m for m in model.modules() if isinstance(m, attention_cls)]


def _family(model: nn.Module) -> "T5Architecture":
    return architecture_of(model)  # type: ignore[return-value]  (this module's functions get T5-family models)


def _make_pruned(model: nn.Module, attn: nn.Module, kept: Any, bias_heads: int) -> None:
    make_pruned_attention(attn, kept, bias_heads, _family(model).nirvana_classes()[0])


def check_t5(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a T5 whose units this library understands."""
    name = type(model).__name__
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "block"):
        raise UnsupportedModelError(
            f"{name} is a T5 model without an `.encoder` stack of blocks; nirvana_pl prunes "
            "T5ForConditionalGeneration. Pass that model, not a sub-module."
        )
    decoder = getattr(model, "decoder", None)
    if decoder is not None and not hasattr(decoder, "block"):
        raise UnsupportedModelError(f"{name}.decoder has no `.block` list; it is not a T5 stack.")
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise UnsupportedModelError(
            f"{name} carries LoRA adapters (peft); pruning adapter-wrapped layers is not supported yet. Prune the "
            "base model first and attach the adapters afterwards, or merge them (model.merge_and_unload())."
        )
    seen: dict[int, str] = {}
    for stack_name, stack in (("encoder", encoder), ("decoder", decoder)):
        if stack is None:
            continue
        for i, block in enumerate(stack.block):
            _check_t5_block(model, block, i, stack_name, seen)


def _check_t5_block(model: nn.Module, block: nn.Module, i: int, stack_name: str, seen: dict[int, str]) -> None:
    """Block ``i`` of a stack: its attentions' position bias where T5 has it, and untied q/k/v/o and FFN weights."""
    where = f"{stack_name}.block[{i}]"
    attns = [("SelfAttention", block.layer[0].SelfAttention)]
    if stack_name == "decoder":
        attns.append(("EncDecAttention", block.layer[1].EncDecAttention))
    per_attention = _family(model).bias_per_attention
    for attr, attn in attns:
        owns = attr == "SelfAttention" and (i == 0 or per_attention)
        _check_position_bias(model, attn, f"{where}.{attr}", owns, per_attention)
        for pname in ("q", "k", "v", "o"):
            _check_untied_linear(getattr(attn, pname, None), f"{where}.{attr}.{pname}", "heads", seen)
    ffn = block.layer[-1].DenseReluDense
    for pname in ("wi_0", "wi_1", "wo") if hasattr(ffn, "wi_0") else ("wi", "wo"):
        _check_untied_linear(getattr(ffn, pname, None), f"{where}.DenseReluDense.{pname}", "FFN weights", seen)


def _check_position_bias(model: nn.Module, attn: nn.Module, name: str, owns_bias: bool, per_attention: bool) -> None:
    """T5: only the first block's self-attention of a stack owns the relative position bias, of the dense head count.
    UMT5 (``per_attention``): every self-attention owns one, with one column per head it has.

    ``owns_bias``: whether ``attn`` (called ``name`` in messages) is such a self-attention.
    """
    has_bias = getattr(attn, "relative_attention_bias", None) is not None
    layout = ("every self-attention owns its own" if per_attention else
              "only the self-attention of the first block of each stack does (the later blocks reuse its bias)")
    if has_bias != owns_bias:
        raise UnsupportedModelError(
            f"{name} {'owns' if has_bias else 'has no'} relative_attention_bias, but in {type(model).__name__} "
            f"{layout}. Pruning heads needs that layout; this model's position bias is wired differently, so it "
            "cannot be pruned."
        )
    width = int(attn.n_heads) if per_attention else int(model.config.num_heads)
    if has_bias and attn.relative_attention_bias.embedding_dim != width:
        raise UnsupportedModelError(
            f"{name}.relative_attention_bias has {attn.relative_attention_bias.embedding_dim} head columns for "
            f"{width} heads; they must match."
        )


def _check_untied_linear(lin: Any, name: str, what: str, seen: dict[int, str]) -> None:
    """``lin`` must be an nn.Linear whose weight no other checked module shares (``seen``: id -> name)."""
    if not isinstance(lin, nn.Linear):
        raise UnsupportedModelError(f"{name} is {type(lin).__name__}, not nn.Linear.")
    key = id(lin.weight)
    if key in seen:
        raise UnsupportedModelError(
            f"{name}.weight is the same Parameter as {seen[key]}: {what} tied across layers cannot be pruned per "
            "layer. Untie them (give each layer its own weights) before pruning."
        )
    seen[key] = f"{name}.weight"


def find_t5_units(model: nn.Module) -> list[T5Units]:
    """The unit entries of a T5 model: ``encoder.i`` for every encoder block, then ``decoder.i.self`` and
    ``decoder.i.cross`` for every decoder block."""
    check_t5(model)
    h = int(model.config.d_kv)
    gated = bool(getattr(model.config, "is_gated_act", False))
    out: list[T5Units] = []

    per_attention = _family(model).bias_per_attention

    def add(attn, mlp, label, kind, stream):
        bias = getattr(attn, "relative_attention_bias", None) if per_attention else None
        followers = [WeightSlice.follower("relative_attention_bias", bias, 1, 1)] if bias is not None else []
        out.append(T5Units(index=len(out), attn=attn, mlp=mlp, head_dim=h, group_size=1,
                           attn_weights=_attn_weights(attn, h), mlp_weights=_mlp_weights(mlp), label=label, kind=kind,
                           stream=stream, _gated=gated, attn_followers=followers))  # fmt: skip

    for i, block in enumerate(model.encoder.block):
        add(block.layer[0].SelfAttention, block.layer[-1].DenseReluDense, f"encoder.{i}", "encoder", "encoder")
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for i, block in enumerate(decoder.block):
            add(block.layer[0].SelfAttention, block.layer[-1].DenseReluDense, f"decoder.{i}.self", "decoder.self",
                "decoder")  # fmt: skip
            add(block.layer[1].EncDecAttention, None, f"decoder.{i}.cross", "decoder.cross", "decoder")
    return out


# ---------------------------------------------------------------------------------------------- surgery
def kept_original_heads(attn: nn.Module) -> torch.Tensor:
    """Original indices of the heads ``attn`` has now (all of them for a stock, never pruned attention)."""
    kept = getattr(attn, KEPT_HEADS, None)
    if kept is None:  # a stock attention: n_heads is its head count until make_pruned_attention updates it
        return torch.arange(int(attn.n_heads))
    return kept.detach().cpu()


def after_slicing(model: nn.Module, units: Sequence[T5Units], kept_heads: Sequence[Sequence[int]]) -> None:
    """Bookkeeping after the q/k/v/o of every entry were sliced to ``kept_heads`` (indices before the slice).

    T5 / MT5: every attention of the model becomes its family's pruned attention (so the full position bias
    travels between blocks whatever each one kept), with its kept original heads composed over all prune events.
    UMT5: each attention keeps its stock class; its head count follows its sliced weights and own bias.
    """
    if _family(model).bias_per_attention:  # UMT5: each attention's own bias lost the removed heads' columns
        for u in units:
            set_head_count(u.attn, int(u.attn.q.weight.shape[0]) // int(u.attn.key_value_proj_dim))
        update_t5_config(model)
        return
    bias_heads = int(model.config.num_heads)
    for u, kept in zip(units, kept_heads):
        before = kept_original_heads(u.attn)
        _make_pruned(model, u.attn, before[torch.as_tensor(list(kept), dtype=torch.long)], bias_heads)
    for attn in _attention_modules(model):  # e.g. a T5EncoderModel has no decoder entries
        if not isinstance(attn, NirvanaT5AttentionMixin):
            _make_pruned(model, attn, kept_original_heads(attn), bias_heads)
    update_t5_config(model)


def t5_layers(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """Per block: the original indices of the kept heads of each attention and the FFN width, measured on the
    modules."""
    out: dict[str, list[dict[str, Any]]] = {"encoder": [], "decoder": []}
    for u in find_t5_units(model):
        heads = kept_original_heads(u.attn).tolist()
        if u.kind == "encoder":
            out["encoder"].append({"self_heads": heads, "d_ff": u.mlp_width})
        elif u.kind == "decoder.self":
            out["decoder"].append({"self_heads": heads, "d_ff": u.mlp_width})
        else:
            out["decoder"][-1]["cross_heads"] = heads
    if getattr(model, "decoder", None) is None:
        del out["decoder"]
    return out


def is_dense_heads(layers: dict[str, list[dict[str, Any]]], num_heads: int) -> bool:
    full = list(range(num_heads))
    return all(
        entry.get(key, full) == full
        for entries in layers.values()
        for entry in entries
        for key in ("self_heads", "cross_heads")
    )


def update_t5_config(model: nn.Module) -> None:
    """Write the real widths into ``model.config``: ``nirvana_t5_layers`` when heads were pruned or FFN widths
    differ, else the stock ``d_ff``. ``num_heads`` stays the dense head count (the relative bias width)."""
    config = model.config
    layers = t5_layers(model)
    d_ff = stock_d_ff(layers, config.num_heads)
    if d_ff is not None:
        config.d_ff = d_ff
        if hasattr(config, "nirvana_t5_layers"):
            del config.nirvana_t5_layers
    else:
        config.nirvana_t5_layers = layers


def stock_d_ff(layers: dict[str, list[dict[str, Any]]], num_heads: int) -> int | None:
    """The one FFN width when ``layers`` is what a stock T5 config describes (every attention keeps all its
    heads, every FFN has the same width); None otherwise."""
    widths = {e["d_ff"] for entries in layers.values() for e in entries}
    return widths.pop() if is_dense_heads(layers, num_heads) and len(widths) == 1 else None


def resize_to_t5_layers(model: nn.Module, layers: dict[str, list[dict[str, Any]]]) -> None:
    """Give ``model`` the shapes (and kept-heads buffers) of ``layers``; values are to be loaded afterwards."""
    from ..hub_code.modeling_nirvana_t5 import apply_t5_layers

    apply_t5_layers(model, layers, int(model.config.num_heads), _family(model).nirvana_classes()[0])
    for attn in _attention_modules(model) if not _family(model).bias_per_attention else ():
        if not isinstance(attn, NirvanaT5AttentionMixin):
            _make_pruned(model, attn, kept_original_heads(attn), int(model.config.num_heads))
    update_t5_config(model)


def layers_from_state_dict(
    model: nn.Module, state_dict: Any, names: dict[int, str], prefix: str
) -> dict[str, list[dict[str, Any]]] | None:
    """The widths a state dict of ``model`` holds (kept-heads buffers and FFN shapes), or None when it is not
    a full state dict of this model (or holds DeepSpeed ZeRO-3's 1-D placeholders).

    An FFN's width is the row count of its input projection (``wi`` / ``wi_0``): DeepSpeed's fp32
    converter records any weight with no elements in one shape, so ``wo`` of an FFN pruned away
    does not tell its width."""
    layers: dict[str, list[dict[str, Any]]] = {"encoder": [], "decoder": []}
    for u in find_t5_units(model):
        q_name = names.get(id(u.attn.q.weight))
        if q_name is None:
            return None
        q = state_dict.get(prefix + q_name)
        if q is None or q.dim() != 2:
            return None
        n_heads = q.shape[0] // u.head_dim
        buf = state_dict.get(prefix + q_name[: -len("q.weight")] + KEPT_HEADS)
        heads = buf.tolist() if buf is not None else list(range(n_heads))
        if len(heads) != n_heads:
            raise UnsupportedModelError(
                f"the checkpoint's {q_name} has {n_heads} heads but its {KEPT_HEADS} lists {len(heads)}; the "
                "checkpoint is inconsistent."
            )
        if u.mlp is not None:
            wi = u.mlp.wi_0 if hasattr(u.mlp, "wi_0") else u.mlp.wi
            wi_saved = state_dict.get(prefix + names[id(wi.weight)])
            if wi_saved is None or wi_saved.dim() != 2:
                return None
            entry = {"self_heads": heads, "d_ff": int(wi_saved.shape[0])}
            layers["encoder" if u.kind == "encoder" else "decoder"].append(entry)
        else:
            layers["decoder"][-1]["cross_heads"] = heads
    if getattr(model, "decoder", None) is None:
        del layers["decoder"]
    return layers


def resize_t5_from_state_dict(model: nn.Module, module: nn.Module, state_dict: Any, prefix: str) -> bool:
    """Before ``module.load_state_dict(state_dict)``: give the T5 ``model`` inside ``module`` the checkpoint's
    pruned shapes; False when ``state_dict`` does not hold them (see :func:`layers_from_state_dict`)."""
    names = {id(p): n for n, p in module.named_parameters()}
    layers = layers_from_state_dict(model, state_dict, names, prefix)
    if layers is None:
        return False
    if layers != t5_layers(model):
        resize_to_t5_layers(model, layers)
    return True


# ---------------------------------------------------------------------------------------------- data
SEQ2SEQ_KEYS = ("labels", "decoder_input_ids", "decoder_attention_mask")


def seq2seq_inputs(
    model: nn.Module, batch: dict[str, torch.Tensor], with_labels: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Teacher-forced model inputs of a calibration batch: (kwargs, decoder padding mask, labels).

    The decoder reads ``decoder_input_ids`` when given, else the model's shift-right of ``labels``,
    else the shift-right of ``input_ids`` (the batch has no target: the decoder then reconstructs
    the input, so the output functional is still taken over real decoder logits). The decoder
    padding mask is ``decoder_attention_mask``, else ``labels != -100``, else ``attention_mask``.
    ``with_labels`` adds the loss labels (``labels``, else ``input_ids`` with padding as -100).
    """
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    labels = batch.get("labels")
    dec_ids, dec_mask = batch.get("decoder_input_ids"), batch.get("decoder_attention_mask")
    if labels is None and dec_ids is None:
        labels_src = ids.masked_fill(mask == 0, -100) if mask is not None else ids
        if dec_mask is None:
            dec_mask = mask
    else:
        labels_src = labels
    if dec_ids is None:
        dec_ids = model._shift_right(labels_src)
    if dec_mask is None and labels is not None:
        dec_mask = (labels != -100).long()
    kwargs = {"input_ids": ids, "decoder_input_ids": dec_ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if dec_mask is not None and batch.get("decoder_attention_mask") is not None:
        kwargs["decoder_attention_mask"] = dec_mask
    loss_labels = None
    if with_labels:
        loss_labels = labels_src if labels_src is not None else ids
        if loss_labels.shape != dec_ids.shape:
            raise ValueError(
                f"calibration batch: labels shape {tuple(loss_labels.shape)} differs from decoder_input_ids "
                f"shape {tuple(dec_ids.shape)}; give labels that match the decoder inputs."
            )
    return kwargs, dec_mask, loss_labels


def check_seq2seq_batch(batch: dict[str, Any], index: int) -> None:
    """Shapes of the seq2seq keys of one calibration batch (the decoder side may differ in length)."""
    n = batch["input_ids"].shape[0]
    for key in SEQ2SEQ_KEYS:
        t = batch.get(key)
        if t is None:
            continue
        integer_ids = isinstance(t, torch.Tensor) and t.dtype in (torch.long, torch.int32)
        if not integer_ids or t.dim() != 2 or t.shape[0] != n:
            raise ValueError(
                f"calibration batch {index}: {key} must be an integer tensor [batch={n}, target_len]; got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}."
            )
    for a, b in (("decoder_attention_mask", "decoder_input_ids"), ("decoder_attention_mask", "labels")):
        if batch.get(a) is not None and batch.get(b) is not None and batch[a].shape != batch[b].shape:
            raise ValueError(f"calibration batch {index}: {a} shape {tuple(batch[a].shape)} differs from {b} shape "
                             f"{tuple(batch[b].shape)}.")  # fmt: skip


# ---------------------------------------------------------------------------------------------- export
_T5_NIRVANA_KEYS = ("auto_map", "nirvana_t5_layers", "nirvana_base_model_type")


class _stock_t5_attention:
    """Within the block, every pruned attention that keeps all heads in order looks stock (its family's class, no
    buffer)."""

    def __init__(self, model: nn.Module) -> None:
        self.stock_cls = _family(model).stock_classes()[0]
        self.saved = [(m, type(m), m._buffers[KEPT_HEADS]) for m in model.modules()
                      if isinstance(m, NirvanaT5AttentionMixin)]  # fmt: skip

    def __enter__(self) -> None:
        for m, _, _ in self.saved:
            del m._buffers[KEPT_HEADS]
            m.__class__ = self.stock_cls

    def __exit__(self, *exc: Any) -> None:
        for m, cls, buf in self.saved:
            m.__class__ = cls
            m._buffers[KEPT_HEADS] = buf


# ---------------------------------------------------------------------------------------------- the adapter
class T5Architecture(Architecture):
    """A T5-layout family (``T5ForConditionalGeneration``, ``MT5ForConditionalGeneration``; a ``T5EncoderModel``
    too for everything but the export). ``prefix`` names its stock classes (``<prefix>Attention``,
    ``<prefix>Config``, ``<prefix>ForConditionalGeneration`` in ``transformers.models.<type>.modeling_<type>``).
    ``bias_per_attention``: every self-attention owns its relative position bias (UMT5), whose columns are then
    sliced with its heads; else the first block of a stack computes it for all heads and passes it on (T5, MT5)."""

    zero3 = False  # (the position-bias bookkeeping of pruned heads is not rebuilt under ZeRO-3 partitions yet)
    lora = False
    batch_keys = SEQ2SEQ_KEYS
    generates = False  # (an encoder-decoder model: the decoder's text depends on an encoder input)

    def __init__(self, model_type: str, prefix: str, notes: str, bias_per_attention: bool = False) -> None:
        self.model_types, self.saved_model_types = (model_type,), (f"nirvana_{model_type}",)
        self.prefix, self.notes, self.bias_per_attention = prefix, notes, bias_per_attention

    def stock_classes(self) -> tuple[type, type, type]:
        """(attention class, config class, model class) of this family in transformers."""
        import transformers

        mtype = self.model_types[0]
        module = importlib.import_module(f"transformers.models.{mtype}.modeling_{mtype}")
        p = self.prefix
        return (getattr(module, f"{p}Attention"), getattr(transformers, f"{p}Config"),
                getattr(transformers, f"{p}ForConditionalGeneration"))  # fmt: skip

    def nirvana_classes(self) -> tuple[type, type, type]:
        """The in-process (attention, config, model) classes of the ``nirvana_<type>`` format (the folder's code)."""
        return _nirvana_t5_classes(self)

    def hub_code(self) -> str:
        """``modeling_nirvana_t5.py`` for this family: the shared code, then the classes made from its stock ones."""
        attention_cls, config_cls, model_cls = self.stock_classes()
        attention, nconfig, nmodel = self.nirvana_classes()
        # (a family whose attentions own their bias keeps its stock attention class: none to import)
        attention_import = (f"from {attention_cls.__module__} import {attention_cls.__name__}  # noqa: E402\n"
                            if attention is not None else "")  # fmt: skip
        return inspect.getsource(modeling_nirvana_t5).rstrip() + "\n\n\n" + (
            f"# The classes of this folder's family ({self.model_types[0]!r}), written by nirvana_pl.save_pruned.\n"
            f"{attention_import}from transformers import {config_cls.__name__}, {model_cls.__name__}  # noqa: E402\n\n"
            f"{attention.__name__ if attention is not None else '_'}, {nconfig.__name__}, {nmodel.__name__} = "
            f"nirvana_t5_classes(\n    {attention_cls.__name__ if attention is not None else None}, "
            f"{config_cls.__name__}, {model_cls.__name__}, {self.model_types[0]!r}\n)\n"
        )

    def model_class_name(self) -> str:
        return f"{self.prefix}ForConditionalGeneration"

    def check(self, model: nn.Module) -> None:
        check_t5(model)

    def find_units(self, model: nn.Module) -> list[LayerUnits]:
        return find_t5_units(model)

    def after_slicing(self, model: nn.Module, units: Sequence[LayerUnits], plan: PruningPlan) -> None:
        after_slicing(model, units, [lp.kept_kv_groups for lp in plan.layers])

    def widths(self, model: nn.Module) -> dict[str, list[dict[str, Any]]]:
        return t5_layers(model)

    def resize_from_state_dict(
        self, model: nn.Module, module: nn.Module, state_dict: Any, prefix: str = "",
        materialize: Materialize | None = None,
    ) -> bool:
        return resize_t5_from_state_dict(model, module, state_dict, prefix)

    def model_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor], with_labels: bool = False) -> ModelInputs:
        kwargs, dec_mask, labels = seq2seq_inputs(model, batch, with_labels)
        return ModelInputs(kwargs, dec_mask, labels, {"encoder": batch.get("attention_mask"), "decoder": dec_mask})

    def check_batch(self, batch: dict[str, Any], index: int) -> None:
        check_seq2seq_batch(batch, index)

    def body_and_head(self, model: nn.Module):
        raise ValueError(
            f"KL calibration needs a causal LM with a decoder body `.model` and an `.lm_head`; {type(model).__name__} "
            "is an encoder-decoder model. Choose the calibration of a T5 model without KL selection."
        )

    def save(self, model: nn.Module, path: Path, kwargs: dict[str, Any]) -> None:
        """Every attention keeping all its heads and every FFN one width: a stock folder; anything else: the
        ``nirvana_<type>`` format (per-attention kept heads and per-FFN widths in ``nirvana_t5_layers``, remote code
        next to the weights)."""
        _, config_cls, model_cls = self.stock_classes()
        if not isinstance(model, model_cls):
            raise UnsupportedModelError(
                f"save_pruned: {self.prefix} models are exported as {model_cls.__name__}; got {type(model).__name__}. "
                "For an encoder-only model use model.save_pretrained(folder) and rebuild with "
                "nirvana_pl.arch.t5.resize_to_t5_layers."
            )
        layers = t5_layers(model)  # measured on the modules, not read from the config
        d = config_dict(model.config, _T5_NIRVANA_KEYS)
        d_ff = stock_d_ff(layers, model.config.num_heads)
        stock = try_stock_config(config_cls, {**d, "d_ff": d_ff})[0] if d_ff is not None else None
        if stock is not None:
            with _stock_t5_attention(model):  # a stock attention has no kept-heads buffer
                save_with_config(model, stock, path, kwargs)
            patch_config_json(path, {"architectures": [model_cls.__name__]}, drop=_T5_NIRVANA_KEYS)
            return
        _, nconfig_cls, nmodel_cls = self.nirvana_classes()
        nconfig = nconfig_cls.from_dict({**d, "nirvana_t5_layers": layers})
        write_remote_code_folder(
            model, path, kwargs, nconfig, nmodel_cls, HUB_FILE, self.hub_code(), "AutoModelForSeq2SeqLM",
            {"nirvana_base_model_type": self.model_types[0], "nirvana_t5_layers": layers},
        )

    def load(self, path: Path, config: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
        if config.get("model_type") not in self.saved_model_types and config.get("nirvana_t5_layers") is None:
            from transformers import AutoModelForSeq2SeqLM

            return AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
        _, nconfig_cls, nmodel_cls = self.nirvana_classes()
        if "config" not in kwargs:
            d = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map")}
            kwargs["config"] = nconfig_cls.from_dict(d)
        return nmodel_cls.from_pretrained(path, **kwargs)


HUB_FILE = "modeling_nirvana_t5.py"


@functools.cache
def _nirvana_t5_classes(arch: T5Architecture) -> tuple[type | None, type, type]:
    attention_cls, config_cls, model_cls = arch.stock_classes()
    attention_cls = None if arch.bias_per_attention else attention_cls  # (its stock attention needs no subclass)
    return modeling_nirvana_t5.nirvana_t5_classes(attention_cls, config_cls, model_cls, arch.model_types[0], __name__)


def __getattr__(name: str) -> type:
    """``Nirvana<stock class>`` of a registered T5-layout family (made on first use), so that pickle finds the
    classes of loaded and pruned models."""
    from . import registered_architectures

    if name.startswith("Nirvana"):
        for arch in registered_architectures().values():
            if isinstance(arch, T5Architecture):
                found = [cls for cls in arch.nirvana_classes() if cls is not None and cls.__name__ == name]
                if found:
                    return found[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_T5_NOTES = "heads of every attention and FFN channels; the relative position bias is kept whole"
register_architecture(T5Architecture("t5", "T5", f"encoder-decoder; {_T5_NOTES}"))
register_architecture(T5Architecture("mt5", "MT5", f"multilingual T5 (mT5); {_T5_NOTES}"))
register_architecture(T5Architecture(
    "umt5", "UMT5", "encoder-decoder with a relative position bias in every self-attention, sliced with its heads",
    bias_per_attention=True,
))

