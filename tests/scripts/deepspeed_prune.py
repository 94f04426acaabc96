"""A 2-rank CPU DeepSpeed ZeRO fit of the tiny Llama with NirvanaPruningCallback (run by tests/test_deepspeed.py).

Lightning relaunches this command for local rank 1 (``--devices 2``); with ``--nodes 2`` the test
starts one process per "node" itself (NODE_RANK 0 and 1). Every rank prints JSON lines prefixed
with ``NIRVANA_DS `` on stdout: ``prune`` (right after the prune), ``end`` (after the fit) and, with
``--resume``, ``resumed`` (after the checkpoint has loaded).

Usage: python tests/scripts/deepspeed_prune.py --out DIR --stage 2|1|3 [--precision bf16-mixed]
       [--devices 2 | --nodes 2] [--resume CKPT_DIR] [--remove-mlp-of-layer L] [--distill]

The fit runs with Lightning's default logger, as a user's would (the prune report goes to its log dir).
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
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
import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning_helpers import CausalLM, token_loader  # noqa: E402
from plan_agreement import COMPENSATIONS, OWN_PLAN_MATCHED, record_compensations, record_plan_agreement  # noqa: E402

import nirvana_pl  # noqa: E402
from nirvana_pl import NirvanaPruningCallback  # noqa: E402
from nirvana_pl.deepspeed import CPUDeepSpeedStrategy, link_optimizer_state  # noqa: E402
from nirvana_pl.surgery import apply_plan, predicted_params_after  # noqa: E402
from nirvana_pl.units import find_units  # noqa: E402

PREFIX = "NIRVANA_DS "
KEYS = ("exp_avg", "exp_avg_sq")


def emit(payload: dict) -> None:
    print(PREFIX + json.dumps(payload, sort_keys=True), flush=True)


def full_state(pl_module) -> dict[str, dict[str, torch.Tensor]]:
    """name -> fp32 master and Adam moments, gathered (collective: every rank, same order)."""
    link_optimizer_state(pl_module.trainer.optimizers[0])
    out = {}
    for name, p in pl_module.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)
        if shape.numel() == 0:  # an MLP pruned to width 0: ZeRO keeps no state for it
            out[name] = {key: torch.zeros(shape) for key in ("fp32", *KEYS)}
            continue
        entry = {"fp32": safe_get_full_fp32_param(p).detach().clone()}
        for key in KEYS:
            entry[key] = safe_get_full_optimizer_state(p, key).detach().clone()
        out[name] = entry
    return out


def module_weights(pl_module) -> dict[str, torch.Tensor]:
    """name -> the module's whole weight (gathered one at a time under ZeRO-3; collective there)."""
    out = {}
    for name, p in pl_module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=getattr(p, "ds_numel", 0) > 0):
            out[name] = p.detach().clone()
    return out


def flat_module_weights(pl_module) -> torch.Tensor:
    return torch.cat([w.float().reshape(-1) for w in module_weights(pl_module).values()])


def zero3_partitions(pl_module, world_size: int) -> str:
    """Under ZeRO-3: 'ok' when every weight is held as this rank's partition of its whole (new) size."""
    params = list(pl_module.parameters())
    if not hasattr(params[0], "ds_id"):
        return "not zero3"
    bad = [
        tuple(p.ds_shape) for p in params
        if p.ds_tensor.numel() != math.ceil(p.ds_numel / world_size) or p.ds_numel != math.prod(p.ds_shape)
        or (p.numel() and not p.ds_persist)  # released (empty) between uses, unless persistent
    ]
    bad += [
        name for name, m in pl_module.named_modules()
        if isinstance(m, torch.nn.Linear) and tuple(m.weight.ds_shape) != (m.out_features, m.in_features)
    ]
    return "ok" if not bad else f"wrong partitions: {bad[:4]}"


def adam_step(trainer) -> float:
    base = trainer.optimizers[0].optimizer
    return float(next(iter(base.state.values()))["step"])


def all_equal_across_ranks(flat: torch.Tensor) -> bool:
    rank0 = flat.clone()
    dist.broadcast(rank0, src=0)
    same = torch.tensor([float(torch.equal(flat, rank0))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item() == 1.0)


class Before(Callback):
    """At the prune step, before the pruner: the dense state, and a plain copy with a torch AdamW."""

    def __init__(self, prune_at: int):
        self.prune_at = prune_at
        self.state = None
        self.lr = None
        self.sched_epoch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.prune_at or self.state is not None:
            return
        self.state = full_state(pl_module)
        self.step = adam_step(trainer)
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.sched_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        self.engine_id = id(trainer.strategy.model)
        self.stage3 = hasattr(next(pl_module.parameters()), "ds_id")
        self.kind = pl_module.net.config.model_type
        self.groups = len(trainer.optimizers[0].fp16_groups) if self.stage3 else 0
        self.largest = max(v["fp32"].numel() for v in self.state.values())
        self.shapes = [[u.num_kv_groups, u.mlp_width] for u in find_units(pl_module.net)]


class After(Callback):
    """Right after the prune; then the losses of the steps that follow, and the end state."""

    def __init__(self, pruner: NirvanaPruningCallback, before: Before, prune_at: int, out: Path, save: bool):
        self.pruner, self.before, self.prune_at, self.out, self.save = pruner, before, prune_at, out, save
        self.losses_after: list[float] = []
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.done:
            self.losses_after.append(float(outputs["loss"]))
        if trainer.global_step != self.prune_at or self.done or not self.pruner.plans:
            return
        self.done = True
        plan = self.pruner.plans[-1]
        after = full_state(pl_module)
        # The same plan applied in one process to a plain copy holding the dense fp32 masters, with
        # a torch AdamW holding the dense moments: the stock surgery path slices both.
        dense = self.before.state
        # dense, same architecture; values from the gathered state
        ref = CausalLM(seed=0, **model_shape(self.before.stage3, self.before.kind)).net.float()
        names = {id(p): n for n, p in pl_module.named_parameters()}
        model_names = [names[id(p)] for p in self.pruner.model.parameters()]
        opt = torch.optim.AdamW(ref.parameters())
        with torch.no_grad():
            for name, p in zip(model_names, ref.parameters()):
                p.data = dense[name]["fp32"].clone()
                opt.state[p] = {"step": torch.tensor(self.before.step), **{k: dense[name][k].clone() for k in KEYS}}
        if plan.compensated:  # the callback's column updates, on the dense masters, before the same surgery
            real = dict(pl_module.named_parameters())
            updates = COMPENSATIONS[-1].updates
            with torch.no_grad():
                for name, p in zip(model_names, ref.parameters()):
                    if id(real[name]) in updates:
                        p.data = updates[id(real[name])](p.data)
        apply_plan(ref, plan, [opt])
        mismatched = []
        for name, p in zip(model_names, ref.parameters()):
            got = after[name]
            if not torch.equal(got["fp32"], p.data) or any(not torch.equal(got[k], opt.state[p][k]) for k in KEYS):
                mismatched.append(name)
        weights = module_weights(pl_module)
        module_cast_ok = all(torch.equal(w, after[name]["fp32"].to(w.dtype)) for name, w in weights.items())
        flat = torch.cat([w.float().reshape(-1) for w in weights.values()])
        flat_fp32 = torch.cat([after[n]["fp32"].reshape(-1) for n, _ in pl_module.named_parameters()])
        emit(
            {
                "event": "prune",
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "node_rank": trainer.node_rank,
                "num_nodes": trainer.num_nodes,
                "fingerprint": plan.fingerprint(),
                "shapes": [[u.num_kv_groups, u.mlp_width] for u in find_units(self.pruner.model)],
                "dense_shapes": self.before.shapes,
                "experts_kept": [u.num_experts for u in find_units(self.pruner.model)],
                "shared_widths": [u.shared_width for u in find_units(self.pruner.model)],
                "model_shape": model_shape(self.before.stage3),
                "removed_mlp_of_layer": REMOVED_MLP_OF_LAYER,
                "min_mlp_channels": [a.min_mlp_channels for a in self.pruner._alloc],
                "padded_sliced_partitions": sum(  # weights the prune sliced whose new partitions are padded
                    p.ds_numel % trainer.world_size != 0 and tuple(p.ds_shape) != tuple(dense[n]["fp32"].shape)
                    for n, p in pl_module.named_parameters() if hasattr(p, "ds_id")
                ),
                "realised_sparsity": plan.realised_sparsity,
                "scoring_stages": plan.scoring_stages,
                "compensated_weights": len(COMPENSATIONS[-1].updates) if plan.compensated else 0,
                "params_equal_across_ranks": all_equal_across_ranks(flat),
                "fp32_equal_across_ranks": all_equal_across_ranks(flat_fp32),
                "equal_to_single_process_plan": not mismatched,
                "mismatched": mismatched[:5],
                "compared": len(model_names),
                "module_is_cast_of_fp32": module_cast_ok,
                "zero3_partitions": zero3_partitions(pl_module, trainer.world_size),
                "own_plan_matched_rank0": OWN_PLAN_MATCHED,
                "max_whole_elements": max(WHOLE_ELEMENTS, default=0),
                "largest_dense_weight_elements": self.before.largest,
                "model_elements": sum(v["fp32"].numel() for v in self.before.state.values()),
                "optimizer_groups": len(trainer.optimizers[0].fp16_groups if self.before.stage3 else []),
                "optimizer_groups_before": self.before.groups,
                "step_before": self.before.step,
                "step_after": adam_step(trainer),
                "lr_before": self.before.lr,
                "lr_after": trainer.optimizers[0].param_groups[0]["lr"],
                "sched_epoch_before": self.before.sched_epoch,
                "sched_epoch_after": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
                "engine_replaced": id(trainer.strategy.model) != self.before.engine_id,
                "optimizer_is_engine_optimizer": trainer.optimizers[0] is trainer.strategy.model.optimizer,
                "nirvana_pl_file": nirvana_pl.__file__,
            }
        )

    def on_train_end(self, trainer, pl_module):
        state = full_state(pl_module)
        flat = flat_module_weights(pl_module)
        if self.save:
            path = self.out / "ckpt"
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                torch.save({"state": state, "step": adam_step(trainer)}, self.out / "saved_state.pt")
        emit(
            {
                "event": "end",
                "rank": trainer.global_rank,
                "step": trainer.global_step,
                "losses_after": self.losses_after,
                "losses_finite": all(math.isfinite(x) for x in self.losses_after),
                "params_equal_across_ranks": all_equal_across_ranks(flat),
                "shapes": [[u.num_kv_groups, u.mlp_width] for u in find_units(self.pruner.model)],
                **distillation(self.pruner, trainer),
            }
        )


def distillation(pruner: NirvanaPruningCallback, trainer) -> dict:
    """--distill: the teacher (equal on every rank, outside the engine) and the distillation metrics logged last."""
    teacher = pruner._distiller.teacher if pruner._distiller is not None else None
    if teacher is None:
        return {}
    engine_params = {id(p) for p in trainer.strategy.model.parameters()}
    flat = torch.cat([p.reshape(-1).float() for p in teacher.parameters()])
    return {
        "teacher_equal_across_ranks": all_equal_across_ranks(flat),
        "teacher_outside_engine": not any(id(p) in engine_params for p in teacher.parameters()),
        "teacher_frozen": not any(p.requires_grad for p in teacher.parameters()),
        "logged": {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("nirvana/")},
    }


class Resumed(Callback):
    """--resume: the loaded state equals the state saved after the prune; training goes on."""

    def __init__(self, pruner: NirvanaPruningCallback, saved: Path):
        self.pruner, self.saved = pruner, saved
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        saved = torch.load(self.saved, weights_only=False)
        state = full_state(pl_module)
        same = all(
            torch.equal(state[n][k], saved["state"][n][k]) for n in saved["state"] for k in ("fp32",) + KEYS
        )
        emit(
            {
                "event": "resumed",
                "rank": trainer.global_rank,
                "step": trainer.global_step,
                "records": len(self.pruner.records),
                "shapes": [[u.num_kv_groups, u.mlp_width] for u in find_units(self.pruner.model)],
                "state_equal_saved": same and set(state) == set(saved["state"]),
                "module_is_cast_of_saved_fp32": all(
                    torch.equal(w, saved["state"][name]["fp32"].to(w.dtype))
                    for name, w in module_weights(pl_module).items()
                ),
                "adam_step": adam_step(trainer),
                "saved_adam_step": saved["step"],
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        emit({"event": "resumed_end", "rank": trainer.global_rank, "step": trainer.global_step, "losses": self.losses,
              "losses_finite": all(math.isfinite(x) for x in self.losses)})


def strategy_for(stage: int) -> CPUDeepSpeedStrategy:
    """ZeRO-3 as a large model sees it: weights partitioned between uses (only the norms, below
    1000 elements, stay whole) and several optimizer sub-groups (whose number the prune changes)."""
    if stage != 3:
        return CPUDeepSpeedStrategy(stage=stage)
    strategy = CPUDeepSpeedStrategy(stage=3, sub_group_size=20_000)
    strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    return strategy


def model_shape(stage3: bool, kind: str = "llama") -> dict:
    """ZeRO-3 runs use an odd hidden size and MLP width (and SmolLM2's 9 query / 3 KV heads), and
    MLP widths rounded to multiples of 7 (``mlp_round_to_for``): norm and MLP weights then have odd
    element counts before and after the prune, so ZeRO-3 pads the last rank's partition of them,
    which the state carried over a prune must fill exactly."""
    if not stage3:
        return dict(kind=kind)
    return dict(kind=kind, hidden_size=63, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                intermediate_size=175)  # fmt: skip


def mlp_round_to_for(stage3: bool) -> int:
    return 7 if stage3 else 8


REMOVED_MLP_OF_LAYER: list[int] = []


def remove_whole_mlp(layer: int) -> None:
    """Make the pruner's plans also remove layer ``layer``'s whole MLP: a width-0 MLP goes through
    the engine rebuild and the training that follows."""
    import nirvana_pl.callback as callback_module

    original = callback_module.make_plan

    def make_plan(model, *args, **kwargs):
        plan, selection = original(model, *args, **kwargs)
        plan.layers[layer].kept_mlp_channels = []
        plan.params_after = predicted_params_after(find_units(model), plan)
        return plan, selection

    callback_module.make_plan = make_plan  # the name the callback looks up
    REMOVED_MLP_OF_LAYER.append(layer)


WHOLE_ELEMENTS: list[int] = []  # per weight the ZeRO-3 surgery slices: elements held whole on this rank meanwhile


def record_whole_elements(module) -> None:
    """Wrap the surgery's ZeRO-3 gather so that each use records how much of the model is whole."""
    import nirvana_pl.deepspeed as ds

    original = ds.zero3_resized

    @contextmanager
    def zero3_resized(params):
        with original(params):
            WHOLE_ELEMENTS.append(sum(p.numel() for p in module.parameters() if not getattr(p, "ds_persist", False)))
            yield

    ds.zero3_resized = zero3_resized  # the name prune_engine looks up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--saliency", default="adam_taylor", help="an estimator, or 'default': the callback's own")
    ap.add_argument("--kind", default="llama", help="model_type of the tiny model (llama, qwen3 ...)")
    ap.add_argument("--prune-at", type=int, default=6)
    ap.add_argument("--steps-after", type=int, default=10)
    ap.add_argument("--save", action="store_true", help="save a DeepSpeed checkpoint at the end")
    ap.add_argument("--resume", default=None, help="resume from this DeepSpeed checkpoint directory")
    ap.add_argument("--remove-mlp-of-layer", type=int, default=None, help="the plan also removes this layer's MLP")
    ap.add_argument("--distill", action="store_true", help="distill=True (recovery distils from the dense model)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    record_plan_agreement()
    record_compensations()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prune_at = args.prune_at
    pruner = NirvanaPruningCallback(
        sparsity=0.5, prune_at=prune_at, warmup_steps=3, gamma=2.0,
        mlp_round_to=mlp_round_to_for(args.stage == 3),
        **({} if args.saliency == "default" else {"saliency": args.saliency}),
        **({"distill": True} if args.distill else {}),
    )
    max_steps = prune_at + args.steps_after
    if args.resume:
        callbacks = [pruner, Resumed(pruner, out / "saved_state.pt")]
        max_steps += 4
    else:
        before = Before(prune_at)
        callbacks = [before, pruner, After(pruner, before, prune_at, out, args.save)]
    trainer = pl.Trainer(
        default_root_dir=out, max_steps=max_steps, accelerator="cpu", devices=args.devices, num_nodes=args.nodes,
        strategy=strategy_for(args.stage), precision=args.precision, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    module = CausalLM(seed=0, **model_shape(args.stage == 3, args.kind))
    record_whole_elements(module)
    if args.remove_mlp_of_layer is not None:
        remove_whole_mlp(args.remove_mlp_of_layer)
    trainer.fit(module, token_loader(n=256, batch_size=4), ckpt_path=args.resume)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
