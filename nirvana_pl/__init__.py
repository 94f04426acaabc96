"""nirvana-pl: structured pruning of LLMs inside a Lightning fit (NIRVANA saliency).

Public API::

    from nirvana_pl import NirvanaPruningCallback, prune, PruningPlan, save_pruned, load_pruned
    from nirvana_pl import CalibrationSelector, token_windows   # KL-selected calibration data
"""

from .allocate import AllocationConfig, DenseReference, InfeasibleSparsityError
from .calibration import CalibrationSelector, kl_divergence, masked
from .data import token_windows
from .distill import DistillConfig
from .oneshot import prune
from .plan import LayerPlan, PruningPlan
from .saliency import ESTIMATORS, SaliencyError
from .surgery import PlanMismatchError
from .arch import register_architecture, supported_model_types
from .units import UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "AllocationConfig",
    "CalibrationSelector",
    "DenseReference",
    "DistillConfig",
    "ESTIMATORS",
    "InfeasibleSparsityError",
    "LayerPlan",
    "NirvanaPruningCallback",
    "PlanMismatchError",
    "PruningPlan",
    "SUPPORTED_MODEL_TYPES",
    "SaliencyError",
    "UnsupportedModelError",
    "kl_divergence",
    "load_pruned",
    "load_pruned_state_dict",
    "masked",
    "prune",
    "register_architecture",
    "save_pruned",
    "supported_model_types",
    "token_windows",
]


def __getattr__(name: str):
    # Lightning and the export code load only when asked for, so `prune()` stays light.
    if name == "NirvanaPruningCallback":
        from .callback import NirvanaPruningCallback

        return NirvanaPruningCallback
    if name == "SUPPORTED_MODEL_TYPES":  # (earlier releases' constant; the registry is extensible now)
        return tuple(supported_model_types())
    if name in ("save_pruned", "load_pruned", "load_pruned_state_dict"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'nirvana_pl' has no attribute {name!r}")
