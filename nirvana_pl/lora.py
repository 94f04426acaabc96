"""LoRA (peft) around pruning: recovery adapters attached after a prune, and base/adapter views for export.

Slicing adapters together with their base weights is surgery's job (``units.WeightSlice`` knows a
layer's LoRA pairs); this module builds LoRA configs, attaches recovery adapters, and separates
base and adapter weights when a model is saved. peft is imported only when LoRA is used.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .units import is_adapter_parameter

#: LoraConfig arguments used when a recovery/training option gives only some of them
#: (the paper recovers with r 8, alpha 16).
DEFAULT_LORA: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def lora_config(options: Any, *, seq2seq: bool = False, what: str = "lora") -> Any:
    """A ``peft.LoraConfig`` from a LoraConfig or a mapping of its arguments (``DEFAULT_LORA`` filled in)."""
    try:
        from peft import LoraConfig, TaskType
    except ImportError as err:  # pragma: no cover - peft is an optional dependency
        raise ImportError(f"{what}= needs peft: pip install 'nirvana-pl[lora]'.") from err
    if isinstance(options, LoraConfig):
        config = options
    elif isinstance(options, Mapping):
        kwargs = {**DEFAULT_LORA, **dict(options)}
        kwargs.setdefault("task_type", TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM)
        try:
            config = LoraConfig(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{what}={dict(options)!r}: {err}. The keys are those of peft.LoraConfig (r, lora_alpha, "
                "lora_dropout, target_modules, ...)."
            ) from err
    else:
        raise TypeError(
            f"{what}={options!r}: expected a peft.LoraConfig or a dict of its arguments, e.g. "
            "{'r': 8, 'lora_alpha': 16, 'target_modules': 'all-linear'}."
        )
    if getattr(config, "use_dora", False):
        raise ValueError(
            f"{what}: use_dora=True is not supported: DoRA's magnitude depends on whole weight columns, so it "
            "does not survive a later structured prune. Use plain LoRA."
        )
    return config


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> peft LoRA layer, for every LoRA-wrapped module of ``model``."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def check_recovery_targets(model: nn.Module, config: Any) -> list[str]:
    """Names of the modules ``config`` would adapt; raise with what exists when it matches none."""
    if config.target_modules == "all-linear" or config.target_modules is None:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    from peft.tuners.tuners_utils import check_target_module_exists

    matched = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and check_target_module_exists(config, n)
    ]
    if not matched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"recovery LoRA target_modules={config.target_modules!r} matches no linear layer of "
            f"{type(model).__name__}; its linear layers are named {suffixes} (or use 'all-linear')."
        )
    return matched


def attach_recovery_adapters(model: nn.Module, config: Any, train_norms: bool = False) -> list[nn.Parameter]:
    """Attach LoRA adapters to ``model`` in place and freeze everything else (norms optionally stay trainable).

    Returns the parameters that train from now on.
    """
    from peft import inject_adapter_in_model

    if has_lora(model):
        raise ValueError(
            "recovery= attaches new LoRA adapters, but the model already carries LoRA adapters; train with "
            "one or the other (drop recovery=, or start from the plain model)."
        )
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_parameter(name) or (train_norms and _is_norm(name)))
    return [p for p in model.parameters() if p.requires_grad]


def _is_norm(name: str) -> bool:
    owner = name.rsplit(".", 1)[0]  # the module holding the parameter, e.g. model.layers.0.input_layernorm
    return "norm" in owner.rsplit(".", 1)[-1].lower()


def adapter_anchors(model: nn.Module) -> dict[nn.Parameter, nn.Parameter]:
    """Each adapter parameter -> the base weight it adapts (to put it in that weight's optimizer group)."""
    out: dict[nn.Parameter, nn.Parameter] = {}
    for layer in lora_layers(model).values():
        base = layer.get_base_layer().weight
        for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
            out[p] = base
    return out


def base_state_dict(model: nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    """``model``'s state dict as the plain model (no adapters) would have it.

    ``merge=True`` folds every active, unmerged adapter into its base weight (``W + scaling * B @ A``);
    otherwise the base weights are returned as they are. Nothing in ``model`` changes.
    """
    layers = lora_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        if is_adapter_parameter(key):
            continue
        state[key.replace(".base_layer.", ".")] = value
    if merge:
        from .units import WeightSlice

        for name, layer in layers.items():
            w = WeightSlice(name, layer, 0, 1)  # the axis is irrelevant for the effective weight
            key = f"{name}.weight"
            state[key] = w.effective_weight().to(state[key].dtype)
    return state


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s LoRA adapters as a folder that ``peft.PeftModel.from_pretrained(base, directory)`` loads.

    The adapters have the pruned shapes, so the base must be the pruned model saved next to them.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        raise ValueError(f"{type(model).__name__} carries no LoRA adapters to save.")
    if len(peft_config) != 1:
        raise ValueError(
            f"the model carries {len(peft_config)} adapters ({sorted(peft_config)}); save_adapter writes one. "
            "Delete or merge the others first."
        )
    (name, config), = peft_config.items()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=name)
    save_file(
        {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}, str(path / ADAPTER_WEIGHTS_FILE)
    )
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_model_name_or_path
    config.save_pretrained(str(path))
    return path
