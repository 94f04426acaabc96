"""Save pruned models so that plain transformers can load them, and load them back.

Two folder formats, chosen by the model's architecture adapter from its real (per-module) widths:

* **stock** - every layer has the same width and the stock config can describe it: a normal
  ``save_pretrained`` folder; ``AutoModelForCausalLM.from_pretrained(folder)`` loads it anywhere.
* **nirvana** - layers differ in width (or the stock config rejects the uniform widths, e.g.
  ``LlamaConfig`` wants ``hidden_size % num_attention_heads == 0``): the weights as usual, a config
  with ``model_type="nirvana_<base>"``, the per-layer widths and an ``auto_map`` into the modeling
  code written next to it (``modeling_nirvana.py``, importing only that family's stock classes). Any
  machine with transformers (no nirvana_pl) loads it with
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; :func:`load_pruned` loads
  it without remote code.

``save_pruned(format="gguf")`` writes one GGUF file for llama.cpp instead (:mod:`nirvana_pl.gguf_export`).

This module does what is common to every family: input checks, LoRA adapters, the atomic folder swap.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .arch import architecture_for_type, architecture_of, supported_model_types
from .hf_folder import CONFIG_FILE
from .lora import base_state_dict, has_lora, save_adapter
from .units import check_supported

ADAPTER_SUBFOLDER = "adapter"


def save_pruned(
    model: nn.Module,
    directory: str | Path,
    *,
    tokenizer: Any | None = None,
    safe_serialization: bool = True,
    adapters: str = "merge",
    format: str = "folder",
    gguf_dtype: str = "f16",
    **save_pretrained_kwargs: Any,
) -> Path:
    """Write ``model`` (a pruned or dense model of a supported architecture) to ``directory``.

    ``format="gguf"`` writes one GGUF file (``directory`` is then the file's path, ending in ``.gguf``) that
    llama.cpp runs, with the weights in ``gguf_dtype`` (``f32``, ``f16``, ``bf16`` or ``q8_0``) and LoRA adapters
    merged; ``tokenizer`` is required there: a transformers tokenizer, or the path of a GGUF file of the base
    model whose tokenizer is copied. See :func:`nirvana_pl.gguf_export.write_gguf` and the README ("Run it in
    llama.cpp"). The rest of this docstring is about the default ``format="folder"``.

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
    if format not in ("folder", "gguf"):
        raise ValueError(f"save_pruned(format={format!r}): choose 'folder' or 'gguf'.")
    if format == "gguf":
        if adapters != "merge" or save_pretrained_kwargs:
            raise ValueError(
                "save_pruned(format='gguf') writes one file with any LoRA adapters merged; adapters='separate' and "
                f"save_pretrained arguments ({sorted(save_pretrained_kwargs)}) apply to folders only."
            )
        from .gguf_export import write_gguf

        return write_gguf(model, directory, tokenizer=tokenizer, dtype=gguf_dtype).path  # (it checks the model)
    model = exportable(model)
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


def exportable(model: nn.Module) -> nn.Module:
    """The transformers model to write (inside a peft ``PeftModel``), after checking that it can be written whole."""
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
    return model


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
    architecture_of(model).save(model, path, save_pretrained_kwargs)
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
    arch = architecture_for_type(mtype)  # a stock type, or the nirvana_<type> of a folder written by save_pruned
    if arch is not None:
        return arch.load(path, data, from_pretrained_kwargs)
    if (isinstance(mtype, str) and mtype.startswith("nirvana_")) or data.get("nirvana_layer_widths") is not None:
        raise ValueError(
            f"load_pruned({str(path)!r}): unknown model_type {mtype!r} of a pruned model (no registered "
            f"architecture); this nirvana_pl knows {sorted(supported_model_types())}. Upgrade nirvana_pl (or "
            "register the architecture), or load it with "
            "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)."
        )
    return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)


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


__all__ = ["load_pruned", "save_pruned"]
