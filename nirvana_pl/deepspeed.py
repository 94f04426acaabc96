"""DeepSpeed ZeRO support for NirvanaPruningCallback: every DeepSpeed detail lives here.

Under ZeRO the fp32 master weights and the Adam moments are partitioned across ranks, and the
engine's flat buffers are sized for the dense model, so a prune event

1. reads each parameter's full fp32 master and Adam moments with DeepSpeed's
   ``safe_get_full_*`` collectives (every rank, the same parameters, the same order; one
   parameter at a time) and keeps the kept slices; each rank keeps only the parameters it owns
   (round robin), so no rank holds a copy of the whole model's optimizer state;
2. tears the engine down, shrinks the modules (:func:`nirvana_pl.surgery.apply_plan`),
3. builds a new engine and optimizer through the strategy (``configure_optimizers`` again) and
   gives the LR scheduler its old state, so the schedule continues;
4. installs the carried fp32 masters, ``exp_avg``, ``exp_avg_sq`` and the step count with the
   ``safe_set_*`` functions (each owner broadcasts its parameters; every rank writes its partitions).

ZeRO-3 partitions the module parameters themselves as well: there, step 2 gathers one weight at
a time, slices it and partitions it again with its new shape (:func:`zero3_resized`), so no rank
ever holds the whole model. Saliency under ZeRO-3 reads the gathered fp32 masters (``adam_*``);
estimators that run the module outside the engine (``functional``, ``wanda_sp``, ...) are refused.

:class:`CPUDeepSpeedStrategy` runs Lightning's ``DeepSpeedStrategy`` in CPU processes (gloo); on
GPUs use the stock ``DeepSpeedStrategy``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .allocate import AllocationConfig
from .lora import has_lora
from .plan import PruningPlan
from .surgery import apply_plan, planned_slices
from .arch import architecture_of
from .units import base_model_type, find_units, parameter_numel

if TYPE_CHECKING:
    from .compensation import Compensation

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
SUPPORTED_STAGES = (1, 2, 3)
# estimators that only read the optimizer state (or nothing) work on partitioned ZeRO-3 weights
ZERO3_SALIENCIES = ("adam_taylor", "adam_fisher", "adam_momentum", "random")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` in CPU processes (gloo), for CPU users and tests.

    Lightning refuses DeepSpeed without CUDA; this subclass skips that check and the GPU
    device-index validation, and passes the local rank to ``deepspeed.initialize`` (a CPU device has
    no index). Everything else (ZeRO config, checkpoints, precision) is the stock strategy. bf16 works
    on CPU, fp16 does not.
    """

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        # DDPStrategy.setup_environment without DeepSpeedStrategy's CUDA check
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


def is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def zero_stage(strategy: Any) -> int:
    config = getattr(strategy, "config", None) or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def check_deepspeed_strategy(
    strategy: Any, saliency: str | None = None, runs_model: bool = False, compensates: bool = False
) -> None:
    """Refuse what the engine rebuild cannot carry: unknown ZeRO stages, an optimizer defined in the
    DeepSpeed config and, under ZeRO-3, estimators, a KL selection or a compensation that run the partitioned
    module outside the engine (``runs_model``: a calibration selector or ``gamma="auto"``)."""
    stage = zero_stage(strategy)
    config = strategy.config or {}
    if stage not in SUPPORTED_STAGES:
        raise ValueError(
            f"NirvanaPruningCallback supports DeepSpeed ZeRO stages {SUPPORTED_STAGES}; the strategy's config has "
            f"zero_optimization.stage={stage}. Use DeepSpeedStrategy(stage=2) (or 1 or 3)."
        )
    if "optimizer" in config:
        raise ValueError(
            "NirvanaPruningCallback rebuilds the optimizer after pruning through "
            "LightningModule.configure_optimizers(); the DeepSpeed config defines 'optimizer' instead. "
            "Remove it from the config and return the optimizer from configure_optimizers()."
        )
    if stage == 3:
        _check_zero3(config, saliency, runs_model, compensates)


def _check_zero3(config: Mapping[str, Any], saliency: str | None, runs_model: bool, compensates: bool) -> None:
    """ZeRO-3's refusals (see :func:`check_deepspeed_strategy`)."""
    if saliency is not None and saliency not in ZERO3_SALIENCIES:
        raise ValueError(
            f"NirvanaPruningCallback(saliency={saliency!r}) runs or reads the module weights outside the engine, "
            "but ZeRO-3 partitions them across ranks. Under ZeRO-3 use saliency='adam_fisher' (or another adam_* "
            f"estimator; {', '.join(ZERO3_SALIENCIES)} are supported), or train with DeepSpeedStrategy(stage=2)."
        )
    if compensates:
        raise ValueError(
            "NirvanaPruningCallback(compensate=True) runs the model on the calibration batches to fit the kept "
            "columns, which ZeRO-3's partitioned weights do not allow outside the engine. Pass compensate=False "
            "under ZeRO-3, or use DeepSpeedStrategy(stage=2)."
        )
    if runs_model:
        raise ValueError(
            "NirvanaPruningCallback: a KL calibration selection (calibration=<selector> or gamma='auto') runs "
            "pruned candidates of the model outside the engine, which ZeRO-3's partitioned weights do not allow. "
            "Give a fixed gamma (e.g. gamma=2.0) and no selector under ZeRO-3, or use DeepSpeedStrategy(stage=2)."
        )
    zero = config.get("zero_optimization") or {}
    if int(zero.get("zero_hpz_partition_size", 1)) > 1:
        raise ValueError(
            "NirvanaPruningCallback does not support ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1) "
            "yet: the secondary weight partitions would have to be rebuilt after a prune. Set it to 1."
        )
    if int(zero.get("mics_shard_size", -1)) > 0:
        raise ValueError(
            "NirvanaPruningCallback does not support MiCS (zero_optimization.mics_shard_size > 0) yet: its "
            "sharding groups would have to be rebuilt after a prune. Remove mics_shard_size."
        )
    for key in ("offload_param", "offload_optimizer"):
        if (zero.get(key) or {}).get("device") == "nvme":
            raise ValueError(
                f"NirvanaPruningCallback does not support ZeRO-3 NVMe offload (zero_optimization.{key}.device="
                "'nvme') yet: the swapped-out state is not rebuilt after a prune. Offload to 'cpu' or not at all."
            )


def deepspeed_allocations(
    strategy: Any, model: nn.Module, allocs: Sequence[AllocationConfig], recovery: Any = None
) -> list[AllocationConfig]:
    """Refuse what the callback cannot do under this DeepSpeed strategy (LoRA; under ZeRO-3 a family whose adapter
    says ``zero3=False``; under ZeRO-1 and ZeRO-3 a layer whose MLP was pruned away before) and return ``allocs``
    with the MLP floor of those stages (see :data:`NO_EMPTY_WEIGHTS`)."""
    if recovery is not None or has_lora(model):
        raise ValueError(
            "NirvanaPruningCallback: LoRA adapters (recovery= or a peft model) are not supported under "
            "DeepSpeed yet (the engine would have to be rebuilt around the adapters). Use DDP or a single "
            "device for LoRA, or recover with full fine-tuning under DeepSpeed."
        )
    stage = zero_stage(strategy)
    if stage == 3 and not architecture_of(model).zero3:
        mtype = base_model_type(model.config)
        raise ValueError(
            f"NirvanaPruningCallback does not support {mtype!r} models under DeepSpeed ZeRO-3 yet; use "
            f"DeepSpeedStrategy(stage=2) (or 1) for {mtype!r}."
        )
    if stage not in NO_EMPTY_WEIGHTS:
        return list(allocs)
    widths = {i: u.mlp_width for i, u in enumerate(find_units(model)) if u.mlp_weights}
    check_no_empty_mlp(widths, "the model", stage)
    floored = [mlp_floor_allocation(a) for a in allocs]
    raised = sorted({a.min_mlp_channels for a, b in zip(allocs, floored) if a != b})
    if raised:
        rank_zero_info(
            f"NirvanaPruningCallback: under DeepSpeed ZeRO-{stage} every layer keeps at least "
            f"{floored[0].min_mlp_channels} MLP channels (min_mlp_channels raised from {raised[0]}): "
            f"{NO_EMPTY_WEIGHTS[stage]}."
        )
    return floored


#: the ZeRO stages that cannot carry a weight with no elements (a layer's MLP pruned away), and why
NO_EMPTY_WEIGHTS = {
    1: "DeepSpeed ZeRO-1 checkpoints record no shape for a weight with no elements, so their fp32 export "
       "(convert_zero_checkpoint_to_fp32_state_dict) would drop it",
    3: "DeepSpeed ZeRO-3 cannot hold a weight with no elements (it never gathers one for the forward or backward)",
}  # fmt: skip


def mlp_floor_allocation(config: AllocationConfig) -> AllocationConfig:
    """``config`` with every layer keeping at least ``mlp_round_to`` MLP channels (see :data:`NO_EMPTY_WEIGHTS`)."""
    return dataclasses.replace(config, min_mlp_channels=max(config.min_mlp_channels, config.mlp_round_to))


def check_no_empty_mlp(mlp_widths: Mapping[int, int], where: str, stage: int) -> None:
    """Refuse MLPs of width 0 under ZeRO ``stage`` (one of :data:`NO_EMPTY_WEIGHTS`); ``mlp_widths``: layer index ->
    MLP channels, for layers with an MLP."""
    empty = [i for i, width in mlp_widths.items() if width == 0]
    if empty:
        raise ValueError(
            f"{where} has no MLP channels in layers {empty}, but {NO_EMPTY_WEIGHTS[stage]}. Keep some channels in "
            f"every layer (min_mlp_channels=mlp_round_to, the callback's default under ZeRO-{stage}), or train this "
            "model under DeepSpeedStrategy(stage=2), DDP or one device."
        )


# ---------------------------------------------------------------------------------------
# reading the partitioned state
# ---------------------------------------------------------------------------------------
def _lp_groups(ds_optimizer: Any) -> list[list[nn.Parameter]]:
    for attr in ("bit16_groups", "bf16_groups", "fp16_groups"):
        groups = getattr(ds_optimizer, attr, None)
        if groups:
            return groups
    raise TypeError(f"{type(ds_optimizer).__name__} is not a DeepSpeed ZeRO optimizer (no parameter groups found).")


def _flat_partitions(ds_optimizer: Any) -> list[torch.Tensor]:
    """The fp32 tensors the base optimizer steps (keys of its state), one per group of :func:`_lp_groups`."""
    zero3_flats = getattr(ds_optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3: one per sub-group
    if zero3_flats is not None:
        return list(zero3_flats)
    return [g["params"][0] for g in ds_optimizer.optimizer.param_groups]


def _hyperparameters(ds_optimizer: Any, group: int) -> dict:
    """The base optimizer's param group (betas, lr, ...) of group ``group`` of :func:`_lp_groups`."""
    to_param_group = getattr(ds_optimizer, "sub_group_to_group_id", None)  # ZeRO-3 sub-groups
    return ds_optimizer.optimizer.param_groups[to_param_group[group] if to_param_group is not None else group]


def _group_index(ds_optimizer: Any) -> dict[int, int]:
    return {id(p): i for i, group in enumerate(_lp_groups(ds_optimizer)) for p in group}


def _step_counts(ds_optimizer: Any) -> list[Any]:
    """Adam's step count of each group of :func:`_lp_groups` (None where the optimizer has not stepped)."""
    link_optimizer_state(ds_optimizer)
    base = ds_optimizer.optimizer
    return [base.state.get(flat, {}).get("step") for flat in _flat_partitions(ds_optimizer)]


def _gather_full(p: nn.Parameter, with_moments: bool) -> dict[str, torch.Tensor]:
    """The whole fp32 master (``"fp32"``) and, optionally, Adam moments of ``p`` (collectives)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"fp32": safe_get_full_fp32_param(p)}
    if with_moments:
        out.update({key: safe_get_full_optimizer_state(p, key) for key in ADAM_KEYS})
    return out


def adam_state_reader(ds_optimizer: Any) -> Callable[[nn.Parameter], tuple[torch.Tensor, dict, dict | None]]:
    """A :data:`~nirvana_pl.saliency.AdamStateReader` over a ZeRO optimizer (collective per call)."""
    index = _group_index(ds_optimizer)
    steps = _step_counts(ds_optimizer)

    def read(p: nn.Parameter) -> tuple[torch.Tensor, dict, dict | None]:
        gi = index.get(id(p))
        if gi is None:
            return p.detach(), {}, None
        if steps[gi] is None:
            return p.detach(), {}, _hyperparameters(ds_optimizer, gi)
        state = _gather_full(p, with_moments=True)
        return state.pop("fp32"), {**state, "step": steps[gi]}, _hyperparameters(ds_optimizer, gi)

    return read


def reader_for(strategy: Any, optimizers: Any) -> Any:
    """The Adam-state reader for ``strategy`` (None when ``optimizer.state`` can be read directly)."""
    if not is_deepspeed(strategy):
        return None
    return adam_state_reader(list(optimizers)[0])


# ---------------------------------------------------------------------------------------
# the prune event
# ---------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_from(tensor: torch.Tensor | None, shape: torch.Size, owner: int, device: torch.device) -> torch.Tensor:
    rank, world = _rank_world()
    if world == 1:
        assert tensor is not None
        return tensor.to(device)
    buf = tensor.to(device) if rank == owner else torch.empty(shape, dtype=torch.float32, device=device)
    dist.broadcast(buf, src=owner)
    return buf


def prune_engine(
    strategy: Any, model: nn.Module, plan: PruningPlan, compensation: Compensation | None = None
) -> dict[str, Any]:
    """Apply ``plan`` to a model trained by a DeepSpeed engine and rebuild the engine around it.

    Every rank must call this with the same plan (checked by the caller). ``compensation``: column updates applied
    to the fp32 masters of the trainable weights before they are sliced (a frozen weight: to its own values), the
    same on every rank; not under ZeRO-3 (:func:`check_deepspeed_strategy`). Returns a summary
    (``step``: the carried Adam step counts per group, ``params``: parameters carried over).
    """
    check_deepspeed_strategy(strategy)
    stage = zero_stage(strategy)
    if stage in NO_EMPTY_WEIGHTS:
        kept = {i: len(layer.kept_mlp_channels) for i, layer in enumerate(plan.layers) if layer.mlp_channels_before}
        check_no_empty_mlp(kept, "the pruning plan", stage)
    pl_module = strategy.lightning_module
    ds_optimizer = strategy.optimizers[0]
    slices = {id(p): take for p, take in planned_slices(model, plan)}  # validates the plan
    index = _group_index(ds_optimizer)
    steps = _common_step_counts(ds_optimizer)
    has_state = all(s is not None for s in steps)

    # 1. the kept slices of every trainable parameter's fp32 master and moments
    params = [p for p in pl_module.parameters() if p.requires_grad]
    updates = compensation.updates if compensation is not None else {}
    carried, shapes = _gather_kept_state(params, index, slices, has_state, updates)
    scheduler_states = [c.scheduler.state_dict() for c in strategy.lr_scheduler_configs]

    # 2. tear the engine down (freeing its flat buffers before the new ones exist) and shrink the modules
    del ds_optimizer
    _teardown_engine(strategy)
    if compensation is not None:  # weights the optimizer does not hold (frozen by the user): their own values
        compensation.apply_(only=[p for p in compensation.params.values() if id(p) not in index])
    apply_plan(model, plan, (), materialize=zero3_resized)

    # 3. a new engine and optimizer from configure_optimizers(); the scheduler continues
    strategy._initialize_deepspeed_train(pl_module)
    new_optimizer = strategy.optimizers[0]
    _restore_schedulers(strategy, scheduler_states)

    # 4. install the carried state: create the Adam state a first step would create, then overwrite
    if has_state:  # (the number of groups may change: ZeRO-3 sub-groups are sized in elements)
        _create_adam_state(new_optimizer, steps[0])
    _install_carried_state(strategy, new_optimizer, params, carried, shapes, has_state)
    carried_count = sum(1 for shape in shapes.values() if shape.numel())
    return {"step": [float(s) if s is not None else 0.0 for s in steps], "params": carried_count}


def _common_step_counts(ds_optimizer: Any) -> list[Any]:
    """Adam's step count of each group (see :func:`_step_counts`), refused when the groups disagree."""
    steps = _step_counts(ds_optimizer)
    has_state = all(s is not None for s in steps)
    if has_state and len({float(s) for s in steps}) != 1:  # DeepSpeed steps every group together
        raise RuntimeError(f"the DeepSpeed optimizer's groups disagree on Adam's step count ({steps}).")
    return steps


def _gather_kept_state(
    params: Sequence[nn.Parameter],
    index: Mapping[int, int],
    slices: Mapping[int, Callable[[torch.Tensor], torch.Tensor]],
    has_state: bool,
    updates: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] = {},
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, torch.Size]]:
    """The kept slices of each parameter's fp32 master (and Adam moments when ``has_state``); ``updates``: what
    changes a master before it is sliced (:class:`~nirvana_pl.compensation.ColumnUpdate`, by parameter ``id``).

    One parameter at a time, on every rank in the same order (the gathers are collectives); the owner
    rank (round robin over ``params``) keeps a CPU copy. Returns (owned copies by parameter position,
    kept shape of every carried parameter).
    """
    rank, world = _rank_world()
    carried: dict[int, dict[str, torch.Tensor]] = {}
    shapes: dict[int, torch.Size] = {}
    for i, p in enumerate(params):
        if id(p) not in index or parameter_numel(p) == 0:  # (an MLP pruned to width 0 earlier has no state)
            continue
        values = _gather_full(p, with_moments=has_state)
        if id(p) in updates:
            values["fp32"] = updates[id(p)](values["fp32"])
        if id(p) in slices:
            values = {k: slices[id(p)](v) for k, v in values.items()}
        shapes[i] = values["fp32"].shape
        if i % world == rank:
            carried[i] = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in values.items()}
    return carried, shapes


def _restore_schedulers(strategy: Any, scheduler_states: Sequence[dict]) -> None:
    """Give the rebuilt LR schedulers their old state and their optimizers the current learning rates."""
    for config, state in zip(strategy.lr_scheduler_configs, scheduler_states):
        config.scheduler.load_state_dict(state)
        last = getattr(config.scheduler, "_last_lr", None)
        if last is not None:
            for group, lr in zip(config.scheduler.optimizer.param_groups, last):
                group["lr"] = lr


def _create_adam_state(ds_optimizer: Any, step: Any) -> None:
    """The Adam state a first step would create (zero moments at ``step``), to be overwritten by the carried one."""
    base = ds_optimizer.optimizer
    for flat in _flat_partitions(ds_optimizer):
        base.state[flat] = {
            "step": step.clone() if isinstance(step, torch.Tensor) else step,
            **{key: torch.zeros_like(flat) for key in ADAM_KEYS},
        }
    _relink_optimizer_state(ds_optimizer)


def _install_carried_state(
    strategy: Any,
    ds_optimizer: Any,
    params: Sequence[nn.Parameter],
    carried: dict[int, dict[str, torch.Tensor]],
    shapes: Mapping[int, torch.Size],
    has_state: bool,
) -> None:
    """Write the carried masters (and moments) into the rebuilt optimizer's partitions.

    Each owner broadcasts its parameters, one at a time, in the order of ``params``; every rank writes
    its own partitions. ``carried`` is emptied as it goes.
    """
    _, world = _rank_world()
    new_index = _group_index(ds_optimizer)
    device = strategy.root_device  # the collectives' device (the flat buffers may be offloaded to the CPU)
    for i, p in enumerate(params):
        if i not in shapes or shapes[i].numel() == 0:  # (nothing to carry into an MLP pruned to width 0)
            continue
        if id(p) not in new_index:
            raise RuntimeError(f"parameter {i} ({tuple(p.shape)}) is missing from the rebuilt DeepSpeed optimizer.")
        owner = i % world
        mine = carried.pop(i, None)
        fp32 = _broadcast_from(mine["fp32"] if mine else None, shapes[i], owner, device)
        _set_full(p, fp32)
        if not _is_zero3_parameter(p):  # (a ZeRO-3 weight was sliced, as the cast of its master, by zero3_resized)
            with torch.no_grad():
                p.data.copy_(fp32.to(p.dtype))  # the module weight is the cast of the fp32 master
        if has_state:
            for key in ADAM_KEYS:
                _set_full(p, _broadcast_from(mine[key] if mine else None, shapes[i], owner, device), key)


def _is_zero3_parameter(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _set_full(p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Write the whole fp32 master (``key=None``) or Adam moment ``key`` of ``p`` into its partitions.

    ``value`` is the same whole tensor on every rank. Under ZeRO-3 each rank writes its own
    partition: DeepSpeed's ``safe_set_full_*`` cannot fill the last rank's partition when ZeRO-3
    padded it (element count not divisible by the number of ranks).
    """
    from deepspeed import utils

    if not _is_zero3_parameter(p):
        if key is None:
            utils.safe_set_full_fp32_param(p, value)
        else:
            utils.safe_set_full_optimizer_state(p, value, key)
        return
    # as DeepSpeed partitions
    local = local_partition(value, p.ds_tensor.numel(), dist.get_rank(group=p.ds_process_group))
    if key is None:
        utils.safe_set_local_fp32_param(p, local)
    else:
        utils.safe_set_local_optimizer_state(p, local, key)


def local_partition(value: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 partition (``size`` elements) of ``value`` flattened; zeros past its end."""
    flat = value.reshape(-1)
    piece = flat[min(size * rank, flat.numel()) : size * (rank + 1)]
    return torch.cat([piece, piece.new_zeros(size - piece.numel())]) if piece.numel() < size else piece


@contextmanager
def zero3_resized(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Let the surgery slice ZeRO-3 parameters: whole inside, partitioned again with their new shape after.

    Gathers ``params`` (one weight and its bias; a collective, every rank in the same order), and
    after the body has replaced their ``.data`` with the kept slices, records the new full shape and
    partitions them from scratch. Parameters that ZeRO-3 does not partition pass through untouched.
    """
    zero3 = [p for p in params if _is_zero3_parameter(p)]
    if zero3:
        zero3[0].all_gather(param_list=zero3)
    yield
    if not zero3:
        return
    for p in zero3:
        p.ds_shape, p.ds_numel, p.ds_tensor = p.shape, p.numel(), None  # a new partition of the new size
    zero3[0].partition(param_list=zero3)


def _teardown_engine(strategy: Any) -> None:
    """Destroy the strategy's engine (hooks, optimizer) and leave the bare LightningModule in its place."""
    pl_module = strategy.lightning_module
    engine = strategy.model
    if engine is not pl_module and hasattr(engine, "destroy"):
        engine.destroy()
    strategy.model = pl_module
    strategy.optimizers = []
    strategy.lr_scheduler_configs = []
    for p in pl_module.parameters():
        for attr in ("_hp_mapping", "_dp_group", "_z3_optimizer"):  # references that keep the old buffers alive
            if hasattr(p, attr):
                delattr(p, attr)
    gc.collect()


def _relink_optimizer_state(ds_optimizer: Any) -> None:
    """Point the ZeRO parameters' fragment mappings at the (new) base-optimizer state tensors."""
    if hasattr(ds_optimizer, "_hp_optimizer_states_linked"):
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()


def link_optimizer_state(ds_optimizer: Any) -> None:
    """Make ``safe_get_full_optimizer_state`` see the Adam state of every parameter group (ZeRO-1/2).

    ZeRO-1/2 link the per-parameter views of the Adam state lazily, once, right after the *first*
    group's first step: the groups after it (e.g. a no-weight-decay group of norms) have no state yet
    then and stay unlinked, and a state loaded from a checkpoint exists before any step. So the views
    are linked again whenever every group has state (they are views: cheap). A no-op without state.
    """
    base = ds_optimizer.optimizer
    if not hasattr(ds_optimizer, "_hp_optimizer_states_linked") or not all(
        f in base.state for f in _flat_partitions(ds_optimizer)
    ):
        return
    _relink_optimizer_state(ds_optimizer)


# ---------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------
def checkpoint_shapes(checkpoint_dir: str | Path) -> dict[str, torch.Size] | None:
    """Parameter shapes (name -> shape) recorded in a DeepSpeed checkpoint directory, or None.

    Reads the model-states file of the tag in ``latest`` (else any tag): ``mp_rank_00_model_states.pt``
    under ZeRO-1/2, one rank's ``zero_pp_rank_*_mp_rank_00_model_states.pt`` under ZeRO-3 (any rank's
    records the same shapes; a node without a shared filesystem holds only its own ranks' files). The
    file is memory-mapped; only the recorded shapes are read. A weight pruned to no elements (a layer's whole
    MLP) is not the optimizer's, and DeepSpeed records its shape with the frozen weights only under ZeRO-2/3; under
    ZeRO-1 it is read from the module's state dict, which holds it whole.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    latest = root / "latest"
    tags = [latest.read_text().strip()] if latest.is_file() else ["*"]
    candidates = [
        path
        for tag in tags + [""]
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_*_mp_rank_00_model_states.pt")
        for path in sorted(root.glob(f"{tag}/{name}" if tag else name))
    ]
    if not candidates:
        return None
    state = torch.load(candidates[0], map_location="cpu", weights_only=False, mmap=True)
    shapes: dict[str, torch.Size] = {}
    for group in state.get("param_shapes") or []:
        shapes.update({name: torch.Size(shape) for name, shape in group.items()})
    shapes.update({name: torch.Size(shape) for name, shape in (state.get("frozen_param_shapes") or {}).items()})
    module = state.get("module") if isinstance(state.get("module"), Mapping) else {}
    if not shapes:
        shapes = {name: t.shape for name, t in module.items() if isinstance(t, torch.Tensor)}
    shapes.update({name: t.shape for name, t in module.items()
                   if name not in shapes and isinstance(t, torch.Tensor) and t.numel() == 0})  # fmt: skip
    return shapes or None


def shape_placeholders(shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Meta tensors of the given shapes: a state dict the shape-only load hook can read."""
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def install_resume_reshape(strategy: Any, reshape: Callable[..., None]) -> None:
    """Make ``strategy.load_checkpoint`` give the model a checkpoint's pruned shapes first.

    Lightning builds the DeepSpeed engine before it loads a checkpoint, with the shapes the
    LightningModule has (dense); the engine's flat buffers cannot take a pruned checkpoint. The
    wrapped ``load_checkpoint`` reads the parameter shapes the checkpoint records; when they differ,
    it reshapes the modules with ``reshape(module, state_dict, prefix, materialize=zero3_resized)``
    (the callback's shape-only load hook) and builds the engine again (``configure_optimizers``),
    then loads as usual.
    """
    if getattr(strategy, "_nirvana_resume_reshape", False):
        return
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        shapes = checkpoint_shapes(checkpoint_path)
        pl_module = strategy.lightning_module
        if _same_on_every_rank(shapes is not None and _shapes_differ(pl_module, shapes), strategy.root_device):
            training = pl_module.trainer is not None and pl_module.trainer.training
            _teardown_engine(strategy)
            reshape(pl_module, shape_placeholders(shapes), "", materialize=zero3_resized)
            if training:
                strategy._initialize_deepspeed_train(pl_module)
            else:
                strategy._initialize_deepspeed_inference(pl_module)
        return original(checkpoint_path, *args, **kwargs)

    strategy.load_checkpoint = load_checkpoint
    strategy._nirvana_resume_reshape = True


def _same_on_every_rank(reshape: bool, device: torch.device) -> bool:
    """``reshape`` when every rank decided the same (the engine rebuild is a collective); else an error."""
    if _rank_world()[1] == 1:
        return reshape
    votes = torch.tensor([int(reshape), -int(reshape)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)  # [any rank reshapes, -(every rank reshapes)]
    if int(votes[0]) != -int(votes[1]):
        raise RuntimeError(
            "the ranks disagree on whether the DeepSpeed checkpoint holds a pruned model: some ranks cannot read its "
            "model-states file. Put the checkpoint on a filesystem every node sees (or copy it to each node)."
        )
    return reshape


def _shapes_differ(pl_module: nn.Module, shapes: Mapping[str, torch.Size]) -> bool:
    own = {name: (p.ds_shape if hasattr(p, "ds_shape") else p.shape) for name, p in pl_module.named_parameters()}
    return any(name in own and torch.Size(own[name]) != shape for name, shape in shapes.items())
