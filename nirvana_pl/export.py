"""Save pruned models so that plain transformers can load them, and load them back.

Two folder formats, chosen by the model's real (per-module) widths:

* **stock** - every layer has the same width and the stock config can describe it: a normal
  ``save_pretrained`` folder; ``AutoModelForCausalLM.from_pretrained(folder)`` loads it anywhere.
* **nirvana** - layers differ in width (or the stock config rejects the uniform widths, e.g.
  ``LlamaConfig`` wants ``hidden_size % num_attention_heads == 0``): the weights as usual, a config
  with ``model_type="nirvana_<base>"``, ``nirvana_layer_widths`` and an ``auto_map`` into the
  ``modeling_nirvana.py`` copied next to it. Any machine with transformers (no nirvana_pl) loads it
  with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``;
  :func:`load_pruned` loads it without remote code.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .hub_code import modeling_nirvana
from .hub_code import modeling_nirvana_t5
from .hub_code.modeling_nirvana import NIRVANA_CLASSES
from .hub_code.modeling_nirvana_t5 import NIRVANA_T5_CLASSES
from .lora import base_state_dict, has_lora, save_adapter
from .surgery import layer_widths
from .units import UnsupportedModelError, base_model_type, check_supported, head_dim_of, try_stock_config

ADAPTER_SUBFOLDER = "adapter"
CONFIG_FILE = "config.json"

#: stock model_type -> nirvana model_type
NIRVANA_TYPE_OF = {base: ntype for ntype, (_, _, base) in NIRVANA_CLASSES.items()}

# Keys that describe the saved format, not the model; rebuilt on every save.
_NIRVANA_KEYS = ("auto_map", "nirvana_layer_widths", "nirvana_base_model_type")
_FORMAT_KEYS = ("model_type", "architectures") + _NIRVANA_KEYS


def _stock_classes(base: str) -> tuple[type, type]:
    """The stock config class and causal-LM class of a stock model_type."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return CONFIG_MAPPING[base], getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base])


def _config_dict(config) -> dict[str, Any]:
    d = config.to_dict()
    for key in _FORMAT_KEYS + ("transformers_version",):
        d.pop(key, None)
    return d



def save_pruned(
    model: nn.Module,
    directory: str | Path,
    *,
    tokenizer: Any | None = None,
    safe_serialization: bool = True,
    adapters: str = "merge",
    **save_pretrained_kwargs: Any,
) -> Path:
    """Write ``model`` (a pruned or dense Llama/Mistral/Qwen2 causal LM) to ``directory``.

    Uniform widths that the stock config accepts give a stock folder; anything else gives a
    nirvana folder (see the module docstring). ``tokenizer`` is saved alongside when given. Extra
    keyword arguments go to ``model.save_pretrained`` (e.g. ``max_shard_size``). Returns the folder.

    A model with LoRA adapters (peft, also a ``PeftModel``) is saved with ``adapters="merge"`` as the
    plain model with the adapters folded into its weights, or with ``adapters="separate"`` as the
    pruned base in ``directory`` plus the adapters in ``directory/adapter``, which
    ``peft.PeftModel.from_pretrained(base, directory / "adapter")`` loads onto that base.
    The model itself is not changed.

    The folder is written whole into a new hidden sibling and then swapped in, so that nothing of an
    earlier save (shards of a larger model, its index, ``modeling_nirvana.py``, ``adapter/``) is left
    to change what loads, and a save that fails leaves the earlier folder as it was. ``directory``
    may be new, an empty folder, or a saved model folder (one with ``config.json``), which is then
    replaced with everything in it; any other folder (user files and no ``config.json``, or a git
    clone) and an existing file are refused.
    """
    if adapters not in ("merge", "separate"):
        raise ValueError(f"save_pruned(adapters={adapters!r}): choose 'merge' or 'separate'.")
    if hasattr(model, "get_base_model"):  # a peft PeftModel: its base model carries the LoRA layers
        model = model.get_base_model()
    check_supported(model)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "save_pruned: the model's weights are DeepSpeed ZeRO-3 partitions (each rank holds a slice). Save a "
            "checkpoint, convert it with convert_zero_checkpoint_to_fp32_state_dict and load it with "
            "nirvana_pl.load_pruned_state_dict into a fresh model, then save_pruned that (README, "
            "'Multi-node and DeepSpeed')."
        )
    if has_lora(model):
        if "state_dict" in save_pretrained_kwargs:
            raise ValueError("save_pruned: a model with LoRA adapters builds its own state_dict; drop state_dict=.")
        save_pretrained_kwargs["state_dict"] = base_state_dict(model, merge=adapters == "merge")
    path = Path(directory)
    check_save_target(path)
    _check_serialization(model, safe_serialization, save_pretrained_kwargs)
    if save_pretrained_kwargs.get("push_to_hub"):  # (the hub repo is named after the folder, not the temporary one)
        save_pretrained_kwargs.setdefault("repo_id", Path(os.path.abspath(path)).name)
    with _swapped_in(path) as fresh:
        _write_folder(model, fresh, str(path), tokenizer, adapters, save_pretrained_kwargs)
    return path


def check_save_target(path: str | Path) -> None:
    """Refuse a ``save_pruned`` target that is a file or a folder that is not a saved model (see there)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"save_pruned(directory={str(path)!r}): that path is a file; pass a folder path.")
    if not path.is_dir():
        return
    names = sorted(p.name for p in path.iterdir())
    if ".git" in names:
        raise FileExistsError(
            f"save_pruned(directory={str(path)!r}): that folder is a git repository, and saving replaces the whole "
            "folder. Save to a new folder and copy the files into the repository."
        )
    if names and CONFIG_FILE not in names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FileExistsError(
            f"save_pruned(directory={str(path)!r}): that folder holds files ({shown}) but no {CONFIG_FILE}, so it "
            "is not a saved model folder, and saving replaces the whole folder. Pass a new or empty folder, or one "
            "written by save_pruned / save_pretrained."
        )


@contextmanager
def _swapped_in(target: Path) -> Iterator[Path]:
    """A new empty sibling folder of ``target`` to write into; on success it replaces ``target`` (the old folder,
    if any, is renamed aside and then removed), on failure it is removed and ``target`` is left as it was."""
    target = Path(os.path.realpath(target))  # through a symlink: replace the folder it points to, keep the link
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    fresh = target.parent / f".{target.name}.{tag}.saving"  # same parent: the renames stay on one filesystem
    fresh.mkdir()
    try:
        yield fresh
        if not target.exists():
            os.rename(fresh, target)
            return
        old = target.parent / f".{target.name}.{tag}.old"
        os.rename(target, old)
        try:
            os.rename(fresh, target)
        except BaseException:
            os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_folder(
    model: nn.Module,
    path: Path,
    name: str,
    tokenizer: Any | None,
    adapters: str,
    save_pretrained_kwargs: dict[str, Any],
) -> None:
    """The body of :func:`save_pruned`: write the folder into ``path`` (``name``: the folder it will become)."""
    if base_model_type(model.config) == "t5":
        _save_t5(model, path, save_pretrained_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return

    config = model.config
    base = base_model_type(config)
    stock_config_cls, stock_model_cls = _stock_classes(base)
    widths = layer_widths(model)  # measured on the modules, not read from the config
    d = _config_dict(config)
    d["head_dim"] = head_dim_of(config)

    save_config = None
    if all(w == widths[0] for w in widths):
        save_config, why = try_stock_config(stock_config_cls, {**d, **widths[0]})
        if save_config is None:
            warnings.warn(
                f"save_pruned: the uniform widths {widths[0]} are not a valid stock {stock_config_cls.__name__} "
                f"({why}); writing the nirvana format instead. Load it with nirvana_pl.load_pruned(folder) or "
                "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).",
                stacklevel=3,  # the caller of save_pruned
            )

    if save_config is not None:
        arch = type(model).__name__
        if arch.startswith("Nirvana") or isinstance(model, stock_model_cls):
            arch = stock_model_cls.__name__
        _save_with_config(model, save_config, path, save_pretrained_kwargs)
        _patch_config_json(path, {"architectures": [arch]}, drop=_NIRVANA_KEYS)
    else:
        if not isinstance(model, stock_model_cls):
            raise UnsupportedModelError(
                f"save_pruned: a model whose layers differ in width can only be exported as a causal LM "
                f"({stock_model_cls.__name__}); got {type(model).__name__}. Save the *ForCausalLM that wraps it."
            )
        ntype = NIRVANA_TYPE_OF[base]
        nconfig_cls, nmodel_cls, _ = NIRVANA_CLASSES[ntype]
        nconfig = nconfig_cls.from_dict({**d, "nirvana_layer_widths": widths, "nirvana_base_model_type": base})
        _write_remote_code_folder(
            model, path, save_pretrained_kwargs, nconfig, nmodel_cls, ntype, modeling_nirvana,
            "AutoModelForCausalLM", {"nirvana_base_model_type": base, "nirvana_layer_widths": widths},
        )

    if adapters == "separate" and has_lora(model):
        save_adapter(model, path / ADAPTER_SUBFOLDER, base_model_name_or_path=name)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _check_serialization(model: nn.Module, safe_serialization: bool, kwargs: dict[str, Any]) -> None:
    # transformers 4.x takes `safe_serialization`; 5.x always writes safetensors and has no such argument.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = safe_serialization
    elif not safe_serialization:
        raise ValueError(
            "save_pruned(safe_serialization=False): this transformers version only writes safetensors; "
            "drop the argument (or pass True)."
        )


def _save_with_config(model: nn.Module, config, path: Path, kwargs: dict[str, Any]) -> None:
    """``model.save_pretrained`` with ``config`` written in place of ``model.config`` (restored after)."""
    original = model.config
    model.config = config
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        model.config = original


def _patch_config_json(path: Path, updates: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    cfg_file = path / CONFIG_FILE
    data = json.loads(cfg_file.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(updates)
    cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_pruned(directory: str | Path, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a folder written by :func:`save_pruned` (either format), without remote code.

    Also loads a non-uniform model written by plain ``model.save_pretrained`` (a stock model_type with
    ``nirvana_layer_widths`` in its config). Keyword arguments go to ``from_pretrained``
    (``dtype``, ``device_map``, ...).
    """
    from transformers import AutoModelForCausalLM

    path = Path(directory)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"load_pruned({str(path)!r}): no {CONFIG_FILE} in that folder. Pass the folder written by "
            "nirvana_pl.save_pruned(model, folder) (or by model.save_pretrained)."
        )
    data = json.loads(cfg_file.read_text())
    mtype = data.get("model_type")
    if mtype in NIRVANA_T5_CLASSES or (mtype == "t5" and data.get("nirvana_t5_layers") is not None):
        return _load_t5(path, data, from_pretrained_kwargs)
    if mtype == "t5":
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(path, **from_pretrained_kwargs)
    if isinstance(mtype, str) and mtype.startswith("nirvana_"):
        if mtype not in NIRVANA_CLASSES:
            raise ValueError(
                f"load_pruned({str(path)!r}): unknown model_type {mtype!r}; this nirvana_pl knows "
                f"{sorted(NIRVANA_CLASSES)}. Upgrade nirvana_pl, or load the folder with "
                "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)."
            )
        _, model_cls, _ = NIRVANA_CLASSES[mtype]
        return model_cls.from_pretrained(path, **from_pretrained_kwargs)
    if data.get("nirvana_layer_widths") is not None:
        if mtype not in NIRVANA_TYPE_OF:
            raise ValueError(
                f"load_pruned({str(path)!r}): config has nirvana_layer_widths but model_type {mtype!r} is not one "
                f"of {sorted(NIRVANA_TYPE_OF)}."
            )
        config_cls, model_cls, _ = NIRVANA_CLASSES[NIRVANA_TYPE_OF[mtype]]
        if "config" not in from_pretrained_kwargs:
            d = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "auto_map")}
            from_pretrained_kwargs["config"] = config_cls.from_dict({**d, "nirvana_base_model_type": mtype})
        return model_cls.from_pretrained(path, **from_pretrained_kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)


# ---------------------------------------------------------------------------------------------- T5
_T5_NIRVANA_KEYS = ("auto_map", "nirvana_t5_layers", "nirvana_base_model_type")


def load_pruned_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> None:
    """Load a pruned model's state dict into ``module`` built from the dense config, resizing it first.

    The DeepSpeed convert path: ``convert_zero_checkpoint_to_fp32_state_dict`` writes one fp32 state
    dict (``torch.load(path)["state_dict"]``) keyed like the LightningModule; pass a fresh instance of
    it (or the bare transformers model) as ``module``. ``model``: the transformers model inside
    ``module`` (found when None). The dense sizes are recorded in the config first, as a prune does,
    so that later prune targets stay relative to the dense model. DeepSpeed's converter records any
    weight with no elements (an MLP pruned away) in one shape; such a weight loads as the module's own
    empty tensor. Then export with :func:`save_pruned`.
    """
    from .allocate import DenseReference
    from .surgery import resize_from_state_dict
    from .units import locate_model

    if any(".lora_A." in key for key in state_dict):
        raise ValueError(
            "load_pruned_state_dict: the state dict holds LoRA adapter weights (lora_A/lora_B); build the module "
            "with the same adapters, or merge them (peft's merge_and_unload) before saving the state dict."
        )
    model = model if model is not None else locate_model(module)
    reference = DenseReference.of(model)  # (the dense sizes, or those a pruned model's config records)
    held = resize_from_state_dict(model, module, state_dict)
    own = module.state_dict()
    if not held:
        placeholders = [k for k, v in state_dict.items() if v.dim() == 1 and k in own and own[k].dim() == 2]
        if placeholders:
            raise ValueError(
                f"load_pruned_state_dict: {placeholders[0]} is a 1-D placeholder, as in a DeepSpeed ZeRO-3 "
                "checkpoint's model states; convert the checkpoint first with lightning.pytorch.utilities."
                "deepspeed.convert_zero_checkpoint_to_fp32_state_dict and load its 'state_dict'."
            )
        raise ValueError(
            "load_pruned_state_dict: the state dict does not hold every layer's attention and MLP weights "
            "(keys relative to module). Pass the module the state dict was saved from (e.g. the "
            "LightningModule for a converted DeepSpeed checkpoint)."
        )
    module.load_state_dict(
        {
            key: own[key] if value.numel() == 0 and key in own and own[key].numel() == 0 else value
            for key, value in state_dict.items()
        }
    )
    reference.attach(model)


def _save_t5(model: nn.Module, path: Path, kwargs: dict[str, Any]) -> None:
    """A dense-headed T5 whose FFNs share one width: a stock folder; anything else: the ``nirvana_t5`` format
    (per-attention kept heads and per-FFN widths in ``nirvana_t5_layers``, remote code next to the weights)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from .t5 import stock_d_ff, t5_layers

    if not isinstance(model, T5ForConditionalGeneration):
        raise UnsupportedModelError(
            f"save_pruned: T5 models are exported as T5ForConditionalGeneration; got {type(model).__name__}. For a "
            "T5EncoderModel use model.save_pretrained(folder) and rebuild with nirvana_pl.t5.resize_to_t5_layers."
        )
    layers = t5_layers(model)  # measured on the modules, not read from the config
    d = {k: v for k, v in _config_dict(model.config).items() if k not in _T5_NIRVANA_KEYS}
    d_ff = stock_d_ff(layers, model.config.num_heads)
    stock = None
    if d_ff is not None:
        stock, _ = try_stock_config(T5Config, {**d, "d_ff": d_ff})
    if stock is not None:
        # A stock T5Attention has no kept-heads buffer: write the weights without it.
        with _stock_t5_attention(model):
            _save_with_config(model, stock, path, kwargs)
        _patch_config_json(path, {"architectures": ["T5ForConditionalGeneration"]}, drop=_T5_NIRVANA_KEYS)
        return
    ntype = "nirvana_t5"
    nconfig_cls, nmodel_cls, _ = NIRVANA_T5_CLASSES[ntype]
    nconfig = nconfig_cls.from_dict({**d, "nirvana_t5_layers": layers})
    _write_remote_code_folder(
        model, path, kwargs, nconfig, nmodel_cls, ntype, modeling_nirvana_t5,
        "AutoModelForSeq2SeqLM", {"nirvana_base_model_type": "t5", "nirvana_t5_layers": layers},
    )


def _write_remote_code_folder(
    model: nn.Module, path: Path, kwargs: dict[str, Any], nconfig: Any, nmodel_cls: type, ntype: str,
    hub_module: Any, auto_class: str, fields: dict[str, Any],
) -> None:
    """Weights with ``nconfig``, a config.json whose ``auto_map`` points into a copy of ``hub_module``'s file."""
    _save_with_config(model, nconfig, path, kwargs)
    hub_file = Path(hub_module.__file__)
    module = hub_file.stem
    _patch_config_json(
        path,
        {
            "model_type": ntype,
            **fields,
            "architectures": [nmodel_cls.__name__],
            "auto_map": {
                "AutoConfig": f"{module}.{type(nconfig).__name__}",
                auto_class: f"{module}.{nmodel_cls.__name__}",
            },
        },
    )
    shutil.copyfile(hub_file, path / hub_file.name)


class _stock_t5_attention:
    """Within the block, every NirvanaT5Attention that keeps all heads in order looks stock (no buffer)."""

    def __init__(self, model: nn.Module) -> None:
        from .hub_code.modeling_nirvana_t5 import KEPT_HEADS, NirvanaT5Attention

        self.saved = []
        for m in model.modules():
            if isinstance(m, NirvanaT5Attention):
                self.saved.append((m, m._buffers[KEPT_HEADS]))
        self.key = KEPT_HEADS

    def __enter__(self) -> None:
        from transformers.models.t5.modeling_t5 import T5Attention

        for m, _ in self.saved:
            del m._buffers[self.key]
            m.__class__ = T5Attention

    def __exit__(self, *exc: Any) -> None:
        from .hub_code.modeling_nirvana_t5 import NirvanaT5Attention

        for m, buf in self.saved:
            m.__class__ = NirvanaT5Attention
            m._buffers[self.key] = buf


def _load_t5(path: Path, data: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    nconfig_cls, nmodel_cls, _ = NIRVANA_T5_CLASSES["nirvana_t5"]
    if "config" not in kwargs:
        d = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "auto_map")}
        kwargs["config"] = nconfig_cls.from_dict(d)
    return nmodel_cls.from_pretrained(path, **kwargs)


__all__ = ["load_pruned", "save_pruned"]
