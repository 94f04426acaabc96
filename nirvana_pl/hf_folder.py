"""Writing transformers model folders: stock configs that may reject pruned widths, config.json patches, and
folders whose ``auto_map`` points into modeling code shipped next to the weights. Shared by the adapters'
exports; knows no architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

CONFIG_FILE = "config.json"


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


def config_dict(config: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """``config.to_dict()`` without the keys that describe a saved format (``model_type``, ``auto_map`` ...)."""
    d = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version") + drop:
        d.pop(key, None)
    return d


def save_with_config(model: nn.Module, config: Any, path: Path, kwargs: dict[str, Any]) -> None:
    """``model.save_pretrained`` with ``config`` written in place of ``model.config`` (restored after)."""
    original = model.config
    model.config = config
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        model.config = original


def patch_config_json(path: Path, updates: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    cfg_file = path / CONFIG_FILE
    data = json.loads(cfg_file.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(updates)
    cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_remote_code_folder(
    model: nn.Module, path: Path, kwargs: dict[str, Any], nconfig: Any, nmodel_cls: type, code_file: str,
    code: str, auto_class: str, fields: dict[str, Any],
) -> None:
    """Weights with ``nconfig``, and a config.json whose ``auto_map`` points into ``code`` written as ``code_file``
    (``fields``: config keys written as they are, e.g. the per-layer widths)."""
    save_with_config(model, nconfig, path, kwargs)
    module = Path(code_file).stem
    patch_config_json(
        path,
        {
            "model_type": nconfig.model_type,
            **fields,
            "architectures": [nmodel_cls.__name__],
            "auto_map": {
                "AutoConfig": f"{module}.{type(nconfig).__name__}",
                auto_class: f"{module}.{nmodel_cls.__name__}",
            },
        },
    )
    (path / code_file).write_text(code)
