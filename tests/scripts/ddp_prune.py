"""A 2-process CPU DDP fit of the tiny Llama with NirvanaPruningCallback (run by tests/test_ddp.py).

Lightning's strategy="ddp" relaunches this very command for rank 1, so this must be a script,
not pytest. Every rank prints JSON lines prefixed with ``NIRVANA_DDP `` on stdout:
``{"event": "prune", ...}`` at the prune step and ``{"event": "end", ...}`` after the fit; with
``--resume``, ``resumed`` (after the checkpoint has loaded) and ``resumed_end``.

The fit runs as a user's would: Lightning's default logger (the report goes to its log dir).

Usage: python tests/scripts/ddp_prune.py --saliency adam_taylor --out DIR [--port N] [--save | --resume CKPT]
       [--distill] [--precision bf16-mixed]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for lightning_helpers

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning_helpers import CausalLM, token_loader  # noqa: E402
from plan_agreement import COMPENSATIONS, OWN_PLAN_MATCHED, record_compensations, record_plan_agreement  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from nirvana_pl import NirvanaPruningCallback  # noqa: E402
from nirvana_pl.units import find_units  # noqa: E402

PREFIX = "NIRVANA_DDP "


def _tamper_rank1() -> None:
    """--mismatch: rank 1 applies a different plan, so the fingerprint check must refuse."""
    import nirvana_pl.callback as callback_module

    original = callback_module.agree_on_plan

    def agree_on_plan(plan, src=0):
        chosen, agreed = original(plan, src)
        if dist.get_rank() == 1:
            layer = chosen.layers[0]
            layer.kept_mlp_channels = list(layer.kept_mlp_channels)[:-8]
        return chosen, agreed

    callback_module.agree_on_plan = agree_on_plan


def emit(payload: dict) -> None:
    print(PREFIX + json.dumps(payload, sort_keys=True), flush=True)


def parameters_checksum(module) -> float:
    """A float64, position-weighted sum of all parameters (cheap cross-rank comparison)."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(module.parameters())))


def gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class Probe(Callback):
    """Checksums and shapes right after the prune and at the end, compared across ranks."""

    def __init__(self, pruner: NirvanaPruningCallback, prune_at: int):
        self.pruner = pruner
        self.prune_at = prune_at
        self.marked = False
        self.losses_after: list[float] = []
        self.grad_norms_after: list[float] = []
        self.post_prune_checksum: float | None = None

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.model._nirvana_probe_old_wrapper = True  # ids can be reused: mark the dense wrapper
        self.marked = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.post_prune_checksum is not None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.grad_norms_after.append(float(sum(g.double().square().sum() for g in grads)) ** 0.5)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.post_prune_checksum is not None:
            self.losses_after.append(float(outputs["loss"]))
        if step == self.prune_at and self.post_prune_checksum is None and self.pruner.plans:
            model = trainer.strategy.model
            self.post_prune_checksum = parameters_checksum(pl_module)
            plan = self.pruner.plans[-1]
            shapes = [[u.num_kv_groups, u.mlp_width] for u in find_units(self.pruner.model)]
            ddp_params = (
                {id(p) for p in model.parameters()} if isinstance(model, DistributedDataParallel) else set()
            )
            info = {
                "event": "prune",
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "step": step,
                "fingerprint": plan.fingerprint(),
                "checksum": self.post_prune_checksum,
                "shapes": shapes,
                "realised_sparsity": plan.realised_sparsity,
                "wrapper_is_ddp": isinstance(model, DistributedDataParallel),
                "wrapper_replaced": self.marked and not getattr(model, "_nirvana_probe_old_wrapper", False),
                "wrapper_wraps_module": isinstance(model, DistributedDataParallel) and model.module is pl_module,
                "own_plan_matched_rank0": OWN_PLAN_MATCHED,
                "wrapper_same_params": ddp_params == {id(p) for p in pl_module.parameters()},
            }
            # each rank's own column updates (before DDP's new wrapper broadcasts rank 0's weights)
            updates = COMPENSATIONS[-1].updates.values() if plan.compensated else []
            info["compensated_weights"] = len(updates)
            own = [u.predict.double().sum().item() for u in updates]
            everyone = gather([info["fingerprint"], info["checksum"], own])
            info["all_fingerprints_equal"] = len({e[0] for e in everyone}) == 1
            info["all_checksums_equal"] = len({e[1] for e in everyone}) == 1
            info["own_compensation_equal_rank0"] = own == everyone[0][2]
            emit(info)

    def on_train_end(self, trainer, pl_module):
        checksum = parameters_checksum(pl_module)
        everyone = gather(checksum)
        # Bit-identical parameters across ranks: the strongest check that the rebuilt DDP
        # wrapper synchronised the pruned parameters' gradients (each rank sees other data).
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        rank0 = flat.clone()
        dist.broadcast(rank0, src=0)
        emit(
            {
                "event": "end",
                "rank": trainer.global_rank,
                "step": trainer.global_step,
                "checksum": checksum,
                "all_checksums_equal": len(set(everyone)) == 1,
                "params_equal_rank0": bool(torch.equal(flat, rank0)),
                "losses_after": self.losses_after,
                "losses_finite": all(math.isfinite(x) for x in self.losses_after),
                "grad_norms_after": self.grad_norms_after,
                "changed_since_prune": checksum != self.post_prune_checksum,
                "num_params": int(sum(p.numel() for p in pl_module.parameters())),
                "shapes": [[u.num_kv_groups, u.mlp_width] for u in find_units(self.pruner.model)],
                **distillation(self.pruner, trainer),
            }
        )


def distillation(pruner: NirvanaPruningCallback, trainer) -> dict:
    """--distill: the teacher's checksum, compared across ranks, and the distillation metrics logged last."""
    teacher = pruner._distiller.teacher if pruner._distiller is not None else None
    if teacher is None:
        return {}
    checksum = parameters_checksum(teacher)
    logged = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("nirvana/")}
    return {"teacher_checksum_equal": len(set(gather(checksum))) == 1,
            "teacher_dtype": str(next(teacher.parameters()).dtype), "logged": logged}  # fmt: skip


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat "index/key" -> tensor."""
    return {
        f"{i}/{key}": value.detach().clone()
        for i, state in optimizer.state_dict()["state"].items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


class SaveAtEnd(Callback):
    """--save: a Lightning checkpoint after the fit, and (rank 0) the weights and optimizer state to compare."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.out / "resume.ckpt")
        if trainer.is_global_zero:
            torch.save(
                {"params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                 "optimizer": optimizer_tensors(trainer.optimizers[0])},
                self.out / "saved_state.pt",
            )


class Resumed(Callback):
    """--resume: the pruned shapes, weights and optimizer state are the saved ones; training goes on in sync."""

    def __init__(self, pruner: NirvanaPruningCallback, saved: Path):
        self.pruner, self.saved = pruner, saved
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        saved = torch.load(self.saved, weights_only=False)
        params = {n: p.detach() for n, p in pl_module.named_parameters()}
        optimizer = optimizer_tensors(trainer.optimizers[0])
        model = trainer.strategy.model
        emit(
            {
                "event": "resumed",
                "rank": trainer.global_rank,
                "step": trainer.global_step,
                "records": len(self.pruner.records),
                "shapes": [[u.num_kv_groups, u.mlp_width] for u in find_units(self.pruner.model)],
                "params_equal_saved": params.keys() == saved["params"].keys()
                and all(torch.equal(params[n], saved["params"][n]) for n in params),
                "optimizer_equal_saved": optimizer.keys() == saved["optimizer"].keys()
                and all(torch.equal(optimizer[k], saved["optimizer"][k]) for k in optimizer),
                "wrapper_same_params": isinstance(model, DistributedDataParallel)
                and {id(p) for p in model.parameters()} == {id(p) for p in pl_module.parameters()},
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        rank0 = flat.clone()
        dist.broadcast(rank0, src=0)
        emit({"event": "resumed_end", "rank": trainer.global_rank, "step": trainer.global_step, "losses": self.losses,
              "losses_finite": all(math.isfinite(x) for x in self.losses),
              "params_equal_rank0": bool(torch.equal(flat, rank0))})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saliency", default="adam_taylor", help="an estimator, or 'default': the callback's own")
    ap.add_argument("--kind", default="llama", help="model_type of the tiny model (llama, qwen3 ...)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--prune-at", type=int, default=6)
    ap.add_argument("--steps-after", type=int, default=10)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=1, help="num_nodes (one process per node is started by the caller)")
    ap.add_argument("--mismatch", action="store_true", help="make rank 1's plan differ (must fail)")
    ap.add_argument("--save", action="store_true", help="save a checkpoint after the fit")
    ap.add_argument("--resume", default=None, help="resume from this checkpoint and train 4 more steps")
    ap.add_argument("--distill", action="store_true", help="distill=True (recovery distils from the dense model)")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--scoring-stages", type=int, default=None, help="scoring_stages (default: the callback's)")
    args = ap.parse_args()
    record_plan_agreement()
    record_compensations()
    if args.mismatch:
        _tamper_rank1()
    if args.port is not None:
        os.environ.setdefault("MASTER_PORT", str(args.port))
    torch.set_num_threads(1)

    prune_at = args.prune_at
    pruner = NirvanaPruningCallback(
        sparsity=0.5, prune_at=prune_at, warmup_steps=3, gamma=2.0, num_calibration_batches=4,
        **({} if args.saliency == "default" else {"saliency": args.saliency}),
        **({"distill": True} if args.distill else {}),
        **({"scoring_stages": args.scoring_stages} if args.scoring_stages else {}),
    )
    out = Path(args.out)
    max_steps = prune_at + args.steps_after
    if args.resume:
        callbacks = [pruner, Resumed(pruner, out / "saved_state.pt")]
        max_steps += 4
    else:
        callbacks = [pruner, Probe(pruner, prune_at)] + ([SaveAtEnd(out)] if args.save else [])
    trainer = pl.Trainer(
        default_root_dir=out, max_steps=max_steps, accelerator="cpu", devices=args.devices, num_nodes=args.nodes,
        strategy="ddp", callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, precision=args.precision,
    )
    # Same seed on every rank (DDP also broadcasts rank 0's weights); each rank gets its half
    # of the data through Lightning's DistributedSampler.
    module = CausalLM(kind=args.kind, seed=0)
    trainer.fit(module, token_loader(n=128, batch_size=4), ckpt_path=args.resume)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
