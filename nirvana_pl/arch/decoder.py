"""Decoder LLMs laid out like Llama: q/k/v/o attention with grouped KV heads and a gated gate/up/down MLP.

One :class:`DecoderArchitecture` per family, registered by ``config.model_type``. What differs between the
families is data: the module names (a user's own model registers its own), fused projections (Phi-3's
``qkv_proj`` and ``gate_up_proj``), how q/k norms follow the heads (shared by every head as in Qwen3 and
Gemma 3, per head as in Cohere, or over all heads as in OLMo 2), how the LM head's output becomes the logits
(Gemma 2/3 soft-cap them, Granite divides, Cohere multiplies), and which stock transformers classes describe
the model (looked up by model type, only when needed).

Export: a model whose layers share one width that the stock config accepts is a stock folder; anything else is
the ``nirvana_<type>`` format: the stock config plus ``nirvana_layer_widths``, and a ``modeling_nirvana.py``
next to the weights that imports only this family's stock classes.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..hf_folder import config_dict, patch_config_json, save_with_config, try_stock_config, write_remote_code_folder
from ..gguf_layout import GGUFTarget
from ..hub_code import modeling_nirvana
from ..plan import LayerPlan, PruningPlan
from ..units import LayerUnits, UnsupportedModelError, WeightSlice, check_wrapper, full_shape, head_dim_of
from . import Architecture, Materialize, register_architecture
from .gguf_decoder import (
    PARALLEL_NORM, POST_NORMS, SANDWICH_NORMS, GGUFBuilder, GGUFLayout, cohere_hparams, gemma2_hparams,
    gemma3_hparams, granite_hparams, phi3_hparams, smollm3_hparams,
)  # fmt: skip

_NIRVANA_KEYS = ("auto_map", "nirvana_layer_widths", "nirvana_base_model_type")
HUB_FILE = "modeling_nirvana.py"


def softcapped_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Gemma 2 / 3: ``cap * tanh(logits / cap)`` with ``config.final_logit_softcapping``."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def divided_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Granite: ``logits / config.logits_scaling``."""
    return logits / model.config.logits_scaling


def scaled_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Cohere: ``logits * config.logit_scale``."""
    return logits * model.config.logit_scale


@dataclass(eq=False)
class DecoderArchitecture(Architecture):
    """A Llama-like decoder family: where its layers and projections are, as module names.

    ``layers``: dotted path from the causal-LM model to the decoder layers (a base model without the first
    part, e.g. ``LlamaModel.layers``, is found too); ``attention`` / ``mlp``: the layer's children; ``q`` ...
    ``down``: the projections (``nn.Linear``, or peft LoRA layers around them); ``qkv`` / ``gate_up``: a fused
    projection used instead of q, k, v (q rows, then k, then v: a KV group owns one block of each) or of gate
    and up (Phi-3). ``qk_norm``: how the attention's ``q_norm`` / ``k_norm`` follow the heads: "shared" (none,
    or one head's width shared by every head: untouched), "per_head" (a ``[heads, head_dim]`` weight: its rows
    are sliced; exact) or "flat" (a ``[heads * head_dim]`` RMSNorm over all heads together, as OLMo 2's: its
    entries are sliced, and the kept heads are then normalised over fewer heads, which changes the function;
    see :attr:`exact`). ``per_layer_config``: the attention reads its head counts from ``self.config`` in its
    forward (Phi-3), so each pruned layer gets a view of the config with its own counts. ``refused``: config
    settings this adapter cannot prune, as (field, value, why). ``config_head_dim``: whether the stock model takes
    its head width from ``config.head_dim`` (False: from ``hidden_size / num_attention_heads``, as StableLM, so a
    pruned head count is written in the nirvana format). ``body`` / ``head``: the causal LM's decoder
    body and LM head; ``logits``: what the model does to the head's output before it returns it (None:
    nothing). ``config_class`` / ``model_class``: the stock config and causal-LM classes of the export (None:
    transformers' classes for the model type). ``gguf``: how llama.cpp reads a model of this family
    (:class:`~nirvana_pl.arch.gguf_decoder.GGUFLayout`; None: no GGUF export). ``notes``: shown in the README table.
    """

    model_types: tuple[str, ...] = ()
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    qkv: str | None = None
    gate_up: str | None = None
    qk_norm: str = "shared"
    per_layer_config: bool = False
    refused: tuple[tuple[str, Any, str], ...] = ()
    config_head_dim: bool = True
    body: str = "model"
    head: str = "lm_head"
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    config_class: type | None = None
    model_class: type | None = None
    gguf: GGUFLayout | None = None
    notes: str = ""
    saved_model_types: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.model_types = tuple(self.model_types)
        if len(self.model_types) != 1:  # (its export writes that type's classes and nirvana_<type>)
            raise ValueError(
                f"DecoderArchitecture(model_types={self.model_types!r}): give exactly one model type; register one "
                "DecoderArchitecture per type (they may share every other argument)."
            )
        self.saved_model_types = tuple(f"nirvana_{t}" for t in self.model_types)
        if self.qk_norm not in ("shared", "per_head", "flat"):
            raise ValueError(f"DecoderArchitecture(qk_norm={self.qk_norm!r}): choose 'shared', 'per_head' or 'flat'.")
        if self.qkv is not None and self.gguf is not None and (self.gguf.reorder_qk or self.gguf.per_layer_arch):
            raise ValueError("DecoderArchitecture: a fused qkv projection is written as it is, for a llama.cpp graph "
                             "that rotates as the model does (GGUFLayout(reorder_qk=False, per_layer_arch=None)).")

    @property
    def caveat(self) -> str:
        if self.exact:
            return ""
        return (f"{self.model_types[0]}'s q_norm/k_norm normalise over all heads together; the pruned layers "
                "normalise their kept heads over fewer heads, so the pruned model is not exactly the dense one with "
                "the removed heads masked")

    @property
    def exact(self) -> bool:
        """Whether the pruned model computes exactly what the dense one does with the removed units masked (False
        where a norm spans all heads: removing heads changes how the kept ones are normalised)."""
        return self.qk_norm != "flat"

    # ------------------------------------------------------------------------------------------- units
    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        path = self.layers.split(".")
        for start in (0, 1):  # the causal LM, or its base model
            obj: Any = model
            for part in path[start:]:
                obj = getattr(obj, part, None)
            if isinstance(obj, (nn.ModuleList, list, tuple)):
                return list(obj)
        return []

    def check(self, model: nn.Module) -> None:
        for key, value, why in self.refused:
            if getattr(model.config, key, None) == value:
                raise UnsupportedModelError(
                    f"{type(model).__name__} has config.{key}={value!r}, which nirvana_pl cannot prune yet: {why}."
                )
        if not self.find_units(model):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no decoder layers to prune (found no `{self.layers}` holding modules "
                f"with `{self.attention}` and `{self.mlp}`)."
            )

    def find_units(self, model: nn.Module) -> list[LayerUnits]:
        config_h = head_dim_of(model.config)
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            attn, mlp = getattr(layer, self.attention, None), getattr(layer, self.mlp, None)
            if attn is None or mlp is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} layer {i} ({type(layer).__name__}) has no `{self.attention}` and "
                    f"`{self.mlp}`; it is not the layer kind the {self.model_types[0]!r} adapter knows."
                )
            g, h = attn.num_key_value_groups, getattr(attn, "head_dim", None) or config_h
            unit = LayerUnits(
                index=i, attn=attn, mlp=mlp, head_dim=h, group_size=g,
                attn_weights=self._attn_weights(model, i, attn, g, h), mlp_weights=self._mlp_weights(model, i, mlp),
                attn_followers=self._attn_followers(attn, g, h),
            )  # fmt: skip
            for w in unit.attn_weights + unit.mlp_weights:
                check_wrapper(w, f"layer {i}")
            out.append(unit)
        return out

    def _projection(self, model: nn.Module, i: int, owner: nn.Module, name: str) -> nn.Module:
        module = getattr(owner, name, None)
        if module is None:
            raise UnsupportedModelError(f"{type(model).__name__} layer {i} has no projection `{name}`.")
        return module

    def _attn_weights(self, model: nn.Module, i: int, attn: nn.Module, g: int, h: int) -> list[WeightSlice]:
        o = WeightSlice.of(self.o, self._projection(model, i, attn, self.o), 1, g * h)
        if self.qkv is not None:  # a KV group owns its q block, its k block and its v block of one weight
            return [WeightSlice.of(self.qkv, self._projection(model, i, attn, self.qkv), 0, g * h, h, h), o]
        return [
            WeightSlice.of(self.q, self._projection(model, i, attn, self.q), 0, g * h),
            WeightSlice.of(self.k, self._projection(model, i, attn, self.k), 0, h),
            WeightSlice.of(self.v, self._projection(model, i, attn, self.v), 0, h),
            o,
        ]

    def _mlp_weights(self, model: nn.Module, i: int, mlp: nn.Module) -> list[WeightSlice]:
        down = WeightSlice.of(self.down, self._projection(model, i, mlp, self.down), 1, 1)
        if self.gate_up is not None:  # a channel owns one gate row and one up row
            return [WeightSlice.of(self.gate_up, self._projection(model, i, mlp, self.gate_up), 0, 1, 1), down]
        return [WeightSlice.of(self.gate, self._projection(model, i, mlp, self.gate), 0, 1),
                WeightSlice.of(self.up, self._projection(model, i, mlp, self.up), 0, 1), down]  # fmt: skip

    def _attn_followers(self, attn: nn.Module, g: int, h: int) -> list[WeightSlice]:
        if self.qk_norm == "shared":
            return []
        per_head = self.qk_norm == "per_head"  # rows are heads; else entries of the flat [heads * head_dim] weight
        return [
            WeightSlice.follower(name, getattr(attn, name), 0, rows)
            for name, rows in (("q_norm", g if per_head else g * h), ("k_norm", 1 if per_head else h))
            if getattr(attn, name, None) is not None
        ]

    # ------------------------------------------------------------------------------------------- after a cut
    def after_slicing(self, model: nn.Module, units: Sequence[LayerUnits], plan: PruningPlan) -> None:
        cut = self.find_units(model)  # as they are now (``units`` were found before the cut)
        for u in cut:  # the attributes the layers' forward reads its sizes from
            n_kv = u.num_kv_groups
            modeling_nirvana.set_layer_attributes(u.attn, u.mlp, self.layout(), n_kv * u.group_size, n_kv, u.mlp_width)
        self.update_config(model, layer_widths(cut))

    def widths(self, model: nn.Module) -> list[dict[str, int]]:
        return layer_widths(self.find_units(model))

    def update_config(self, model: nn.Module, widths: list[dict[str, int]]) -> None:
        """Write the real per-layer ``widths`` (:meth:`widths`, measured on the modules) into ``model.config``.

        When every layer has the same width (and the stock config class accepts it) the stock fields
        describe the model and the per-layer list is dropped; otherwise ``config.nirvana_layer_widths`` holds
        one entry per layer. ``head_dim`` is always written explicitly, because stock configs derive it from
        ``hidden_size / num_attention_heads``, which pruning changes.
        """
        config = model.config
        config.head_dim = head_dim_of(config)
        values = {**config.to_dict(), "head_dim": config.head_dim}
        if all(w == widths[0] for w in widths) and self.stock_config(type(config), values, widths[0])[0] is not None:
            for key, value in widths[0].items():
                setattr(config, key, value)
            if hasattr(config, "nirvana_layer_widths"):
                del config.nirvana_layer_widths
        else:
            config.nirvana_layer_widths = widths

    def stock_config(self, config_cls: type, values: dict[str, Any], widths: dict[str, int]) -> tuple[Any, str | None]:
        """(the stock config of ``values`` with the uniform ``widths``, None) when it describes the pruned model,
        else (None, why)."""
        heads = widths["num_attention_heads"]
        if not self.config_head_dim and heads * values["head_dim"] != values["hidden_size"]:
            return None, (f"{config_cls.__name__} derives head_dim from hidden_size / num_attention_heads, which "
                          f"{heads} heads of {values['head_dim']} do not fill")  # fmt: skip
        return try_stock_config(config_cls, {**values, **widths})

    def resize_to_widths(
        self, model: nn.Module, widths: Sequence[dict[str, int]], materialize: Materialize | None = None
    ) -> None:
        """Give ``model`` the per-layer shapes ``widths`` (keeping the first units): before loading a pruned
        state dict into a freshly built dense model, where only the shapes matter."""
        from ..surgery import PlanMismatchError, apply_plan

        units = self.find_units(model)
        if len(widths) != len(units):
            raise PlanMismatchError(f"{len(widths)} layer widths given, the model has {len(units)} layers.")
        layers = [self.resize_plan(u, w) for u, w in zip(units, widths)]
        plan = PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="resize")
        apply_plan(model, plan, (), materialize)

    def resize_plan(self, u: LayerUnits, widths: dict[str, int]) -> LayerPlan:
        """The plan that keeps the first units of layer ``u`` up to ``widths`` (see :meth:`resize_to_widths`)."""
        from ..surgery import PlanMismatchError

        kv, mlp = int(widths["num_key_value_heads"]), int(widths["intermediate_size"])
        if kv > u.num_kv_groups or mlp > u.mlp_width:
            raise PlanMismatchError(
                f"layer {u.index}: cannot grow from {u.num_kv_groups} KV groups / {u.mlp_width} MLP channels "
                f"to {kv} / {mlp}; build the model from the dense config."
            )
        return LayerPlan(u.num_kv_groups, u.mlp_width, list(range(kv)), list(range(mlp)))

    def widths_from_state_dict(
        self, model: nn.Module, module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = ""
    ) -> list[dict[str, int]] | None:
        """The per-layer widths of the pruned model ``state_dict`` was saved from, read from every layer's first
        attention and MLP weights (q or qkv, gate or gate_up); None when it does not hold every projection of every
        layer as a 2-D tensor (a partial state dict, DeepSpeed ZeRO-3's 1-D placeholders)."""
        saved = _saved_tensors(module, state_dict, prefix)
        widths = []
        for u in self.find_units(model):
            tensors = [saved(w.weight) for w in u.attn_weights + u.mlp_weights]
            weights = u.attn_weights + u.mlp_weights
            if any(t is None or t.dim() != len(full_shape(w.weight)) for t, w in zip(tensors, weights)):
                return None  # (ZeRO-3's 1-D placeholders; a 2-D gate with no rows: the MLP was pruned away)
            q, q_saved = u.attn_weights[0], tensors[0]
            n_kv = q_saved.shape[0] // q.rows_per_unit
            widths.append({"num_key_value_heads": n_kv, "num_attention_heads": n_kv * u.group_size,
                           **self.saved_mlp_widths(u, tensors[len(u.attn_weights):])})  # fmt: skip
        return widths

    def saved_mlp_widths(self, u: LayerUnits, mlp_tensors: Sequence[torch.Tensor]) -> dict[str, int]:
        """The MLP entries of :meth:`widths` for layer ``u``, read from the saved tensors of its MLP weights."""
        return {"intermediate_size": mlp_tensors[0].shape[0] // u.mlp_weights[0].rows_per_unit}

    def resize_from_state_dict(
        self, model: nn.Module, module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
        materialize: Materialize | None = None,
    ) -> bool:
        widths = self.widths_from_state_dict(model, module, state_dict, prefix)
        if widths is None:
            return False
        if widths != self.widths(model):
            self.resize_to_widths(model, widths, materialize)
        return True

    # ------------------------------------------------------------------------------------------- calibration
    def body_and_head(self, model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        body, head = getattr(model, self.body, None), getattr(model, self.head, None)
        if body is None or head is None:
            raise ValueError(
                f"KL calibration needs a causal LM with a decoder body `.{self.body}` and an `.{self.head}`; "
                f"{type(model).__name__} has {f'no {self.head}' if head is None else f'no .{self.body}'}. Pass the "
                "*ForCausalLM model (e.g. LlamaForCausalLM), not the base model."
            )
        if self.logits is None:
            return body, head
        post = self.logits
        return body, lambda hidden: post(model, head(hidden))

    # ------------------------------------------------------------------------------------------- export
    def stock_classes(self) -> tuple[type, type]:
        """The stock config class and causal-LM class of this family."""
        if self.config_class is not None and self.model_class is not None:
            return self.config_class, self.model_class
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        base = self.model_types[0]
        try:
            return CONFIG_MAPPING[base], getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base])
        except (KeyError, AttributeError) as err:
            raise UnsupportedModelError(
                f"this transformers {transformers.__version__} has no causal LM of model_type {base!r}; upgrade "
                "transformers, or register the architecture with config_class= and model_class=."
            ) from err

    def model_class_name(self) -> str:
        return self.stock_classes()[1].__name__

    def layout(self) -> dict[str, Any]:
        """Where this family's layers keep their parts, as the exported folder's code reads them."""
        return {key: getattr(self, key, default) for key, default in modeling_nirvana.LLAMA_LAYOUT.items()}

    def nirvana_classes(self) -> tuple[type, type]:
        """The in-process (config, causal-LM) classes of the ``nirvana_<type>`` format (the folder's code)."""
        return _nirvana_classes(self)

    def hub_code(self) -> str:
        """``modeling_nirvana.py`` for this family: the shared code, then this family's classes from its stock ones."""
        config_cls, model_cls = self.stock_classes()
        base = self.model_types[0]
        imports = "".join(
            f"from {'transformers' if c.__module__.startswith('transformers.') else c.__module__} import "
            f"{c.__name__}  # noqa: E402\n" for c in (config_cls, model_cls)
        )
        nconfig, nmodel = self.nirvana_classes()
        return inspect.getsource(modeling_nirvana).rstrip() + "\n\n\n" + (
            f"# The classes of this folder's family ({base!r}), written by nirvana_pl.save_pruned.\n"
            f"{imports}\n"
            f"{nconfig.__name__}, {nmodel.__name__} = nirvana_classes(\n"
            f"    {config_cls.__name__}, {model_cls.__name__}, {base!r}, {self.layout()!r}\n)\n"
        )

    def save(self, model: nn.Module, path: Path, save_pretrained_kwargs: dict[str, Any]) -> None:
        config = model.config
        base = self.model_types[0]
        stock_config_cls, stock_model_cls = self.stock_classes()
        widths = self.widths(model)  # measured on the modules, not read from the config
        d = config_dict(config, _NIRVANA_KEYS)
        d["head_dim"] = head_dim_of(config)
        save_config = None
        if all(w == widths[0] for w in widths):
            save_config, why = self.stock_config(stock_config_cls, d, widths[0])
            if save_config is None:
                warnings.warn(
                    f"save_pruned: the uniform widths {widths[0]} are not a valid stock {stock_config_cls.__name__} "
                    f"({why}); writing the nirvana format instead. Load it with nirvana_pl.load_pruned(folder) or "
                    "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).",
                    stacklevel=4,  # the caller of save_pruned
                )
        if save_config is not None:
            arch = type(model).__name__
            if arch.startswith("Nirvana") or isinstance(model, stock_model_cls):
                arch = stock_model_cls.__name__
            save_with_config(model, save_config, path, save_pretrained_kwargs)
            patch_config_json(path, {"architectures": [arch]}, drop=_NIRVANA_KEYS)
            return
        if not isinstance(model, stock_model_cls):
            raise UnsupportedModelError(
                f"save_pruned: a model whose layers differ in width can only be exported as a causal LM "
                f"({stock_model_cls.__name__}); got {type(model).__name__}. Save the *ForCausalLM that wraps it."
            )
        nconfig_cls, nmodel_cls = self.nirvana_classes()
        nconfig = nconfig_cls.from_dict({**d, "nirvana_layer_widths": widths, "nirvana_base_model_type": base})
        write_remote_code_folder(
            model, path, save_pretrained_kwargs, nconfig, nmodel_cls, HUB_FILE, self.hub_code(),
            "AutoModelForCausalLM", {"nirvana_base_model_type": base, "nirvana_layer_widths": widths},
        )

    def load(self, path: Path, config: dict[str, Any], from_pretrained_kwargs: dict[str, Any]) -> nn.Module:
        mtype = config.get("model_type")
        if mtype not in self.saved_model_types and config.get("nirvana_layer_widths") is None:
            return self.stock_classes()[1].from_pretrained(path, **from_pretrained_kwargs)
        config_cls, model_cls = self.nirvana_classes()
        if mtype not in self.saved_model_types and "config" not in from_pretrained_kwargs:
            # a non-uniform model written by plain save_pretrained: a stock model_type with nirvana_layer_widths
            d = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map")}
            from_pretrained_kwargs["config"] = config_cls.from_dict({**d, "nirvana_base_model_type": mtype})
        return model_cls.from_pretrained(path, **from_pretrained_kwargs)

    # ------------------------------------------------------------------------------------------- GGUF
    @property
    def writes_gguf(self) -> bool:
        return self.gguf is not None

    def gguf_support(self) -> str:
        return "not yet" if self.gguf is None else self.gguf.support()

    def gguf_target(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> GGUFTarget:
        base = self.model_types[0]
        if self.gguf is None:
            raise UnsupportedModelError(
                f"save_pruned(format='gguf'): nirvana_pl knows no llama.cpp layout for {base!r} models yet (GGUF "
                f"export covers {', '.join(gguf_model_types())}); save a folder with save_pruned(model, path)."
            )
        units = self.find_units(model)
        widths = layer_widths(units)
        uniform = all(w == widths[0] for w in widths)
        if uniform and widths[0]["intermediate_size"] > 0:
            arch = self.gguf.arch
        elif self.gguf.per_layer_arch is not None:
            arch = self.gguf.per_layer_arch
        elif uniform:
            raise UnsupportedModelError(
                f"save_pruned(format='gguf'): every layer of this {base} model had its MLP pruned away, and "
                f"llama.cpp's {self.gguf.arch!r} graph needs an MLP width. Prune with min_mlp_channels > 0 for a GGUF "
                "file, or save a folder (save_pruned(model, path))."
            )
        else:
            raise UnsupportedModelError(
                f"save_pruned(format='gguf'): this {base} model's layers differ in width (KV heads "
                f"{sorted({w['num_key_value_heads'] for w in widths})}, MLP widths "
                f"{min(w['intermediate_size'] for w in widths)}-{max(w['intermediate_size'] for w in widths)}), and "
                f"llama.cpp's {self.gguf.arch!r} graph takes one width for all layers, while its per-layer graph "
                f"('deci') is a plain Llama layer, which a {base} layer is not. Prune with uniform=True for a GGUF "
                "file, or save a folder (save_pruned(model, path))."
            )
        return GGUFBuilder(self, model, state, units, arch).target()


@functools.cache
def _nirvana_classes(arch: DecoderArchitecture) -> tuple[type, type]:
    config_cls, model_cls = arch.stock_classes()
    return modeling_nirvana.nirvana_classes(config_cls, model_cls, arch.model_types[0], arch.layout(), __name__)


def __getattr__(name: str) -> type:
    """``Nirvana<stock class>`` of a registered family (the classes are made on first use), so that pickle finds
    the classes of loaded and pruned models (``ddp_spawn``, ``torch.save(model)``)."""
    from . import registered_architectures

    if name.startswith("Nirvana"):
        for arch in registered_architectures().values():
            if isinstance(arch, DecoderArchitecture):
                found = [cls for cls in arch.nirvana_classes() if cls.__name__ == name]
                if found:
                    return found[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def gguf_model_types() -> list[str]:
    """The model types whose models :func:`nirvana_pl.save_pruned` writes as GGUF (uniform or per-layer widths)."""
    from . import registered_architectures

    return [t for t, a in registered_architectures().items() if a.writes_gguf]


def layer_widths(units: Sequence[LayerUnits]) -> list[dict[str, int]]:
    """Per-layer sizes of decoder layers as they stand: KV heads, query heads, MLP width."""
    return [
        {"num_key_value_heads": u.num_kv_groups, "num_attention_heads": u.num_kv_groups * u.group_size,
         "intermediate_size": u.mlp_width}
        for u in units
    ]  # fmt: skip


def _saved_tensors(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str
) -> Callable[[nn.Parameter], torch.Tensor | None]:
    """``saved(weight)``: what ``state_dict`` (keyed like ``module``, after ``prefix``) holds for that parameter of
    ``module``, also when it was saved from inside a LoRA layer; None when absent."""
    names = {id(p): n for n, p in module.named_parameters()}

    def saved(weight: nn.Parameter) -> torch.Tensor | None:
        name = prefix + names[id(weight)]
        base_name = name.replace(".base_layer.weight", ".weight").removesuffix(".weight") + ".base_layer.weight"
        return state_dict.get(name, state_dict.get(base_name))

    return saved


# ------------------------------------------------------------------------------------------------ the families
_OLMO_NOTE = ("q_norm/k_norm span all heads: sliced with them, and the kept heads are then normalised over fewer "
              "heads (not exact; see the prune report)")  # fmt: skip
_STABLELM_REFUSED = (("qk_layernorm", True, "its per-head LayerNorm modules are not sliced yet (StableLM models with "
                     "qk_layernorm=False prune)"),)  # fmt: skip
_LLAMA = GGUFLayout("llama", per_layer_arch="deci", projection_biases=True, rope_freqs=True)
_GEMMA = dict(reorder_qk=False, norm_offset=1.0)
_OLMO = GGUFLayout("olmo2", reorder_qk=False, norms=POST_NORMS, output="required", full_query=True,
                   sliding_pattern=True)
LLAMA_LIKE = [
    DecoderArchitecture(("llama",), gguf=_LLAMA, notes="Llama 2/3/3.1/3.2, SmolLM2, TinyLlama"),
    DecoderArchitecture(("mistral",), gguf=_LLAMA, notes="Mistral 7B, Mistral NeMo"),
    DecoderArchitecture(("qwen2",), gguf=GGUFLayout("qwen2", reorder_qk=False, per_layer_arch="deci"),
                        notes="q/k/v biases"),
    DecoderArchitecture(("qwen3",), gguf=GGUFLayout("qwen3", reorder_qk=False),
                        notes="per-head q_norm/k_norm (one head's width, shared)"),
    DecoderArchitecture(("gemma",), gguf=GGUFLayout("gemma", output="tied", **_GEMMA),
                        notes="head_dim independent of hidden_size"),
    DecoderArchitecture(("gemma2",), logits=softcapped_logits,
                        gguf=GGUFLayout("gemma2", norms=SANDWICH_NORMS, output="tied", sliding_pattern=True,
                                        query_scale_layers=46, extra=gemma2_hparams, **_GEMMA),
                        notes="attention and final-logit soft-capping, alternating sliding window"),
    DecoderArchitecture(("gemma3_text",), logits=softcapped_logits,
                        gguf=GGUFLayout("gemma3", norms=SANDWICH_NORMS, sliding_pattern=True, swa_rope_base=True,
                                        linear_rope=True, query_scale_layers=62, extra=gemma3_hparams, **_GEMMA),
                        notes="Gemma 3 text models (1B, or the text part); q_norm/k_norm, sliding window"),
    DecoderArchitecture(("granite",), logits=divided_logits,
                        gguf=GGUFLayout("granite", projection_biases=True, rope_freqs=True, extra=granite_hparams),
                        notes="embedding/residual/attention/logit multipliers"),
    DecoderArchitecture(("smollm3",), gguf=GGUFLayout("smollm3", extra=smollm3_hparams), notes="NoPE layers"),
    DecoderArchitecture(("phi3",), qkv="qkv_proj", gate_up="gate_up_proj", per_layer_config=True,
                        gguf=GGUFLayout("phi3", reorder_qk=False, full_query=True, extra=phi3_hparams),
                        notes="Phi-3, Phi-4-mini; fused qkv_proj (a KV group owns 3 blocks) and gate_up_proj"),
    DecoderArchitecture(("cohere",), qk_norm="per_head", logits=scaled_logits,
                        gguf=GGUFLayout("command-r", reorder_qk=False, norms=PARALLEL_NORM, layer_norm=True,
                                        output="tied", full_query=True, extra=cohere_hparams),
                        notes="Command-R; per-head q/k LayerNorm weights (use_qk_norm) sliced with the heads"),
    DecoderArchitecture(("stablelm",), config_head_dim=False, refused=_STABLELM_REFUSED,
                        gguf=GGUFLayout("stablelm", reorder_qk=False, layer_norm=True, output="required",
                                        full_query=True),
                        notes="StableLM 2; partial rotary, q/k/v biases; qk_layernorm=True refused"),
    DecoderArchitecture(("olmo2",), qk_norm="flat", notes=_OLMO_NOTE, gguf=_OLMO),
    DecoderArchitecture(("olmo3",), qk_norm="flat", notes=_OLMO_NOTE, gguf=_OLMO),
]  # fmt: skip
for _arch in LLAMA_LIKE:
    register_architecture(_arch)
