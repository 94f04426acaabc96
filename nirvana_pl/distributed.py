"""Data-parallel (DDP) support for NirvanaPruningCallback: every torch.distributed detail lives here.

Under DDP each rank holds a full replica, so each rank must cut exactly the same units:

* gradient saliency (``functional``, ``taylor_loss``) averages the *signed* gradient over the
  calibration samples of all ranks before the absolute value (:func:`average_gradients`);
* the plan is decided on rank 0 and broadcast (:func:`agree_on_plan`), and every rank checks the
  plan's fingerprint against all others before surgery (:func:`check_same_plan`);
* after surgery the DDP wrapper's reducer still has buckets of the old sizes (and holds the
  parameters' old gradient accumulators), so the LightningModule is wrapped again
  (:func:`rewrap_ddp`). Surgery keeps the Parameter objects, so the optimizers need no rebuild;
* the folder a run writes its report and pruned model into is agreed once, by every rank, before
  training (:func:`run_directory`): ``trainer.log_dir`` is a collective, and reading it on rank 0
  alone (to write a file there) leaves rank 0 waiting for ranks that never join.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .plan import PruningPlan

_UNSUPPORTED = {
    "FSDP": "FSDP shards parameters across ranks (flattened parameters)",
    "ModelParallel": "model-parallel strategies shard parameters across ranks",
    "XLA": "XLA strategies are not tested with structured surgery",
}


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is running."""
    return world_size() > 1


def check_strategy(
    strategy: Any, saliency: str | None = None, runs_model: bool = False, compensates: bool = False
) -> None:
    """Accept single-device, DDP and DeepSpeed ZeRO strategies; refuse other sharded ones with a clear message.

    ``saliency``, ``runs_model`` (a KL calibration selection) and ``compensates`` (``compensate=True``) are checked
    against ZeRO-3's partitioned weights.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from .deepspeed import check_deepspeed_strategy, is_deepspeed

    if is_deepspeed(strategy):
        check_deepspeed_strategy(strategy, saliency, runs_model, compensates)
        return
    names = [c.__name__ for c in type(strategy).__mro__]
    for key, why in _UNSUPPORTED.items():
        if any(key in n for n in names):
            raise ValueError(
                f"NirvanaPruningCallback does not support strategy {type(strategy).__name__} yet: {why}, and "
                "the callback's surgery needs whole parameters on every rank. Use a single device "
                "(Trainer(devices=1)), data parallel training (Trainer(strategy='ddp')) or DeepSpeed ZeRO "
                "(Trainer(strategy=DeepSpeedStrategy(stage=2 or 3)))."
            )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"NirvanaPruningCallback supports single-device and DDP training; strategy "
            f"{type(strategy).__name__} is not supported yet. Use Trainer(devices=1) or Trainer(strategy='ddp')."
        )


# ---------------------------------------------------------------------------------------
# where a run writes: one folder, agreed by every rank
# ---------------------------------------------------------------------------------------
_RUN_DIRECTORIES: "weakref.WeakKeyDictionary[Any, Path]" = weakref.WeakKeyDictionary()
RUNS_WITHOUT_LOGGER = "nirvana_logs"


def run_directory(trainer: Any) -> Path:
    """The folder where this fit's reports and pruned model go, the same on every rank.

    A collective the first time it is called for a trainer (``trainer.log_dir`` is one, and so is
    the broadcast of a fresh folder): call it on every rank, never inside ``if is_global_zero``.
    Later calls return the cached folder without communication, so hooks that run on one rank
    only (``on_exception``) can use it. With a logger it is the logger's folder; without one, each
    run gets its own ``<default_root_dir>/nirvana_logs/version_N`` instead of the working directory.
    """
    cached = _RUN_DIRECTORIES.get(trainer)
    if cached is not None:
        return cached
    if trainer.loggers:
        directory = Path(trainer.log_dir or trainer.default_root_dir)
    else:
        chosen = None
        if trainer.is_global_zero:
            chosen = str(_next_version(Path(trainer.default_root_dir) / RUNS_WITHOUT_LOGGER))
        directory = Path(trainer.strategy.broadcast(chosen, src=0))  # every rank: a collective
    _RUN_DIRECTORIES[trainer] = directory
    return directory


def _next_version(root: Path) -> Path:
    """``root/version_N`` for the first N not taken, created at once so that it stays this run's."""
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = root / f"version_{n}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


# ---------------------------------------------------------------------------------------
# saliency
# ---------------------------------------------------------------------------------------
def _flat_apply(tensors: Sequence[torch.Tensor], op) -> None:
    """Run ``op`` on one flat fp32 buffer holding ``tensors`` (grouped by device), copy back."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        flat = torch.cat([t.reshape(-1).float() for t in group])
        op(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def average_gradients(grads: Sequence[torch.Tensor], n_samples: int) -> None:
    """In place: per-rank sample means of the signed gradient -> the mean over all ranks' samples.

    Each rank's mean is weighted by its number of calibration samples, so unequal calibration
    sets give the exact global mean. A no-op without a multi-rank process group.
    """
    if not is_distributed() or not grads:
        return
    device = grads[0].device
    count = torch.tensor([float(n_samples)], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    total = float(count.item())
    if total <= 0:
        return
    scale = float(n_samples) / total

    def op(flat: torch.Tensor) -> None:
        flat.mul_(scale)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)

    _flat_apply(grads, op)


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process of the group (a collective: every rank calls it); ``t`` itself without one."""
    if not is_distributed():
        return t
    total = t.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gradient_reduce_hook():
    """The ``reduce`` hook for :func:`nirvana_pl.saliency.gradient_reduce`, or None when not distributed."""
    return average_gradients if is_distributed() else None


# ---------------------------------------------------------------------------------------
# the decision
# ---------------------------------------------------------------------------------------
def agree_on_plan(plan: PruningPlan, src: int = 0) -> tuple[PruningPlan, bool]:
    """Rank ``src``'s plan on every rank (broadcast as a dict). Returns (plan, whether the local
    plan already had the same fingerprint). Without a multi-rank group: (plan, True)."""
    if not is_distributed():
        return plan, True
    payload: list[Any] = [plan.to_dict() if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src)
    chosen = PruningPlan.from_dict(payload[0])
    return chosen, chosen.fingerprint() == plan.fingerprint()


def check_same_plan(plan: PruningPlan) -> None:
    """Raise RuntimeError on every rank unless all ranks hold a plan with the same fingerprint."""
    if not is_distributed():
        return
    prints: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(prints, plan.fingerprint())
    if len(set(prints)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, fp in enumerate(prints):
            groups.setdefault(fp, []).append(rank)
        described = "; ".join(f"ranks {ranks}: {fp[:12]}" for fp, ranks in groups.items())
        raise RuntimeError(
            "NirvanaPruningCallback: the pruning plans differ across DDP ranks "
            f"(this is rank {dist.get_rank()}; plan fingerprints {described}); refusing to cut "
            "different units on different replicas."
        )


# ---------------------------------------------------------------------------------------
# the DDP wrapper
# ---------------------------------------------------------------------------------------
def rewrap_ddp(strategy: Any) -> bool:
    """Wrap the (pruned) LightningModule in a fresh DistributedDataParallel inside ``strategy``.

    The old wrapper's reducer has buckets sized for the dense parameters and keeps their
    gradient accumulators (with the old shapes) alive; it is dropped (and collected) before the
    new wrapper is built, so the new one registers fresh accumulators. Returns whether a wrapper
    was replaced (False when the strategy's model is not wrapped in DDP).
    """
    old = getattr(strategy, "model", None)
    if not isinstance(old, DistributedDataParallel):
        return False
    pl_module = strategy.lightning_module
    gone = weakref.ref(old)
    strategy.model = pl_module
    del old
    gc.collect()
    if gone() is not None:
        raise RuntimeError(
            "NirvanaPruningCallback: the old DistributedDataParallel wrapper is still referenced after "
            "pruning; its reducer would keep gradient hooks of the dense parameter shapes. Do not keep "
            "references to trainer.strategy.model across the prune step."
        )
    strategy.configure_ddp()  # Lightning's own wrapping: same device ids, DDP kwargs and comm hooks
    new = strategy.model
    if not isinstance(new, DistributedDataParallel):  # pragma: no cover - a strategy that does not wrap
        raise RuntimeError(f"{type(strategy).__name__}.configure_ddp() did not produce a DDP wrapper.")
    return True

