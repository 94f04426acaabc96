"""Fault injection: SIGKILL a pruning fit at random steps, resume from ``last.ckpt``, compare with an uninterrupted fit.

For each strategy (``single``: one CPU process; ``ddp``: 2 CPU processes, gloo; ``zero2``: DeepSpeed ZeRO-2 on 2
CPU processes, :class:`~nirvana_pl.deepspeed.CPUDeepSpeedStrategy`) the driver

1. runs the fit once without interruption (the reference): a tiny random byte-level Llama
   (:class:`~nirvana_pl.modules.CausalLMModule`) on :class:`~nirvana_pl.datamodule.TextDataModule` (resumable
   training loader), :class:`~nirvana_pl.NirvanaPruningCallback` (sparsity 0.4, ``adam_fisher``) pruning at
   ``--prune-at`` after a ``--warmup``-step saliency window, and
   ``PruneCheckpoint(save_top_k=0, save_last=True, every_n_train_steps=--ckpt-every)``, which also refreshes
   ``last.ckpt`` right after the prune event;
2. for each trial draws one or two kills (step, place, rank) from the phases below, launches the fit, lets a rank
   SIGKILL itself there, kills what is left of the process group (a surviving rank would hang in a collective), checks
   that no process of the group is left, and resumes from ``last.ckpt`` (from scratch when there is none yet) until a
   launch completes;
3. compares every tensor of the final model ``state_dict`` and of the Adam state (``exp_avg``, ``exp_avg_sq``; under
   ZeRO-2 gathered with DeepSpeed's ``safe_get_full_optimizer_state``) with the reference: ``torch.equal``, so a
   trial *survives* only when it completes with bit-equal weights and optimizer state, the same pruning plan and the
   same final step. Nothing is compared with a tolerance; the max |diff| is reported when not equal.

Phases (``P`` = prune step, ``W`` = warm-up; the saliency window is steps ``P-W+1 .. P``):

===============  ==================================================================================================
before-warmup    a step before the saliency window (kill at ``on_train_batch_end``, before the checkpoint of the step)
warm-up          a step inside the saliency window (the resumed fit must carry the accumulated saliency)
at-prune         step ``P`` after its optimizer step, before the prune (the callback is killed before pruning)
in-prune         step ``P`` after the prune and before its checkpoint (between the surgery and ``prune-step=P.ckpt``)
after-prune      step ``P+1`` or ``P+2`` (resume from the checkpoint the prune event wrote)
late             a later step
mid-save         inside the write of ``last.ckpt`` at a checkpointing step: single/DDP between the temporary file and
                 its rename (Lightning's fsspec transaction); ZeRO-2 after the model-states file and before the rank's
                 ZeRO optimizer-states file of the checkpoint folder
===============  ==================================================================================================

Under DDP/ZeRO-2 the killed rank is drawn from {0, 1}. A worker that kills itself first appends a line to
``progress.jsonl`` in its run folder, so the driver knows a kill happened on a rank that is not its direct child.

Usage:
    python benchmarks/fault_injection.py [--strategies single,ddp,zero2] [--trials 4] [--quick] [--seed 0]
    python benchmarks/fault_injection.py worker ...     (one fit; started by the driver)

Writes benchmarks/results/fault_injection.{json,md} (``--quick``: fault_injection_quick.*, not committed); each
strategy's section records the command that produced it, and a later run of a strategy replaces only its section.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RESULTS = HERE.parent / "results"
STRATEGIES = ("single", "ddp", "zero2")
PHASES = ("before-warmup", "warm-up", "at-prune", "in-prune", "after-prune", "late", "mid-save")

MODEL_CONFIG = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
)
DATA = dict(source="embedded:pydoc", tokenizer="bytes", seq_len=32, batch_size=4, val_windows=8, max_train_windows=40)


# =============================================================================================== worker
def worker_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fault_injection.py worker")
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--root", required=True, help="run folder (checkpoints in ROOT/ckpt)")
    p.add_argument("--out", required=True, help="final state file (rank 0)")
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--prune-at", type=int, default=7)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--ckpt-path", default=None)
    p.add_argument("--save-last", choices=("true", "link"), default="true")
    p.add_argument("--kill-step", type=int, default=None)
    p.add_argument("--kill-where", choices=("pre", "post", "save"), default="pre")
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument("--launch", type=int, default=0, help="launch number within the trial (for progress.jsonl)")
    return p.parse_args(argv)


class Worker:
    """One fit: progress notes, the kill switch, and the final state (weights, Adam state, plan, step, LR)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.root)
        self.trainer: Any = None
        self.pruner: Any = None

    def note(self, payload: dict[str, Any]) -> None:
        with open(self.root / "progress.jsonl", "a") as fh:
            fh.write(json.dumps({"launch": self.args.launch, **payload}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def kill_due(self) -> bool:
        t, a = self.trainer, self.args
        if t is None or a.kill_step is None:
            return False
        return t.global_step == a.kill_step and t.global_rank == a.kill_rank

    def die(self, where: str) -> None:
        self.note({"event": "kill", "step": self.trainer.global_step, "where": where, "rank": self.trainer.global_rank})
        os.kill(os.getpid(), signal.SIGKILL)

    def callbacks(self) -> list[Any]:
        from lightning.pytorch.callbacks import Callback

        worker = self

        class KillAtBatchEnd(Callback):
            """SIGKILL this rank at ``on_train_batch_end`` of the kill step (placed before or after the pruner)."""

            def __init__(self, where: str) -> None:
                self.where = where

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if worker.args.kill_where == self.where and worker.kill_due():
                    worker.die(self.where)

        class Recorder(Callback):
            """Where each launch starts (the resumed step), and the final state (every rank: collectives under ZeRO)."""

            def on_train_start(self, trainer, pl_module):
                worker.trainer = trainer
                if trainer.global_rank == 0:
                    worker.note({"event": "start", "step": trainer.global_step, "ckpt": worker.args.ckpt_path,
                                 "prunes": len(worker.pruner.records)})

            def on_train_end(self, trainer, pl_module):
                import torch

                final = worker.final_state(trainer, pl_module)
                if trainer.global_rank == 0:
                    torch.save(final, worker.args.out)
                    worker.note({"event": "end", "step": trainer.global_step})

        return [KillAtBatchEnd("pre"), KillAtBatchEnd("post"), Recorder()]

    def final_state(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        from nirvana_pl.deepspeed import is_deepspeed

        weights = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        adam = zero_adam_state(trainer, pl_module) if is_deepspeed(trainer.strategy) else torch_adam_state(
            trainer, pl_module)
        scheduler = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        return {
            "weights": weights,
            "adam": adam,
            "step": trainer.global_step,
            "plans": [plan.fingerprint() for plan in self.pruner.plans],
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
            "scheduler_last_epoch": getattr(scheduler, "last_epoch", None),
        }

    def strategy(self) -> tuple[Any, int]:
        if self.args.strategy == "ddp":
            return "ddp", 2
        if self.args.strategy == "zero2":
            from nirvana_pl.deepspeed import CPUDeepSpeedStrategy

            return CPUDeepSpeedStrategy(stage=2), 2
        return "auto", 1

    def checkpoint(self) -> Any:
        from nirvana_pl.modules import PruneCheckpoint

        if self.args.save_last == "link":  # each save to its own file/folder; last.ckpt a symlink to the newest one
            return PruneCheckpoint(dirpath=self.root / "ckpt", save_top_k=1, save_last="link",
                                   every_n_train_steps=self.args.ckpt_every)
        return PruneCheckpoint(dirpath=self.root / "ckpt", save_top_k=0, save_last=True,
                               every_n_train_steps=self.args.ckpt_every)

    def run(self) -> None:
        import lightning.pytorch as pl
        import torch.distributed as dist
        from lightning.pytorch.loggers import CSVLogger

        from nirvana_pl import NirvanaPruningCallback
        from nirvana_pl.datamodule import TextDataModule
        from nirvana_pl.modules import CausalLMModule

        args = self.args
        pl.seed_everything(0, workers=True)
        strategy, devices = self.strategy()
        if args.kill_where == "save" and args.kill_step is not None:
            install_save_kill(self)
        module = CausalLMModule(config=dict(MODEL_CONFIG), tokenizer="bytes", lr=3e-3, warmup_steps=2)
        data = TextDataModule(**DATA)
        self.pruner = NirvanaPruningCallback(sparsity=0.4, prune_at=args.prune_at, warmup_steps=args.warmup,
                                             saliency="adam_fisher")
        kill_pre, kill_post, recorder = self.callbacks()
        trainer = pl.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.max_steps, deterministic=True,
            logger=CSVLogger(self.root, name="logs"), default_root_dir=self.root, num_sanity_val_steps=0,
            limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False,
            # (Lightning runs checkpoint callbacks last: both kill points come before the checkpoint of the step)
            callbacks=[kill_pre, self.pruner, kill_post, recorder, self.checkpoint()],
        )
        trainer.fit(module, datamodule=data, ckpt_path=args.ckpt_path)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def zero_adam_state(trainer: Any, pl_module: Any) -> dict[str, Any]:
    """name.exp_avg / name.exp_avg_sq, gathered from the ZeRO partitions (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from nirvana_pl.deepspeed import link_optimizer_state

    link_optimizer_state(trainer.optimizers[0])
    adam = {}
    for name, param in pl_module.named_parameters():
        if param.numel() == 0:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            adam[f"{name}.{key}"] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
    return adam


def torch_adam_state(trainer: Any, pl_module: Any) -> dict[str, Any]:
    import torch

    opt = trainer.optimizers[0]
    return {f"{name}.{key}": value.detach().cpu().clone() for name, param in pl_module.named_parameters()
            for key, value in opt.state.get(param, {}).items() if isinstance(value, torch.Tensor)}


def worker_main(argv: list[str]) -> None:
    Worker(worker_args(argv)).run()


def install_save_kill(worker: Worker) -> None:
    """SIGKILL inside the write of ``last.ckpt`` at the kill step (see the module docstring, phase ``mid-save``).

    With ``--save-last link`` the checkpoint that ``last.ckpt`` will point to is written under its own name: the kill
    is then inside the first checkpoint write of the kill step.
    """
    target = "last.ckpt" if worker.args.save_last == "true" else ".ckpt"
    if worker.args.strategy == "zero2":
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        original = TorchCheckpointEngine.save

        def save(self: Any, state_dict: Any, path: str) -> Any:
            # after the model-states file (rank 0), before this rank's ZeRO optimizer-states file
            if worker.kill_due() and target in str(path) and "optim_states" in str(path):
                worker.die("save")
            return original(self, state_dict, path)

        TorchCheckpointEngine.save = save
        return
    from fsspec.implementations.local import LocalFileOpener

    original_commit = LocalFileOpener.commit

    def commit(self: Any) -> Any:
        if worker.kill_due() and str(self.path).endswith(target):
            worker.die("save")  # the temporary file is written, the rename to last.ckpt not done
        return original_commit(self)

    LocalFileOpener.commit = commit


# =============================================================================================== driver
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of the live (non-zombie) processes of process group ``pgid``, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append((int(entry), fields[0]))
    return found


def kill_group(pgid: int, wait_s: float = 20.0) -> list[tuple[int, str]]:
    """SIGKILL the group until no live member is left; returns what is still alive after ``wait_s`` (should be [])."""
    deadline = time.monotonic() + wait_s
    while True:
        members = group_members(pgid)
        if not members or time.monotonic() > deadline:
            return members
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.1)


def read_progress(run: Path, launch: int) -> list[dict[str, Any]]:
    path = run / "progress.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:  # (a line cut by a kill)
            continue
        if item.get("launch") == launch:
            out.append(item)
    return out


def launch_fit(strategy: str, run: Path, out: Path, launch: int, ckpt: Path | None, kill: dict[str, Any] | None,
               cfg: argparse.Namespace) -> dict[str, Any]:
    """One launch of the worker; returns what happened (killed, completed, failed) and where it started."""
    cmd = [sys.executable, str(HERE), "worker", "--strategy", strategy, "--root", str(run), "--out", str(out),
           "--max-steps", str(cfg.max_steps), "--prune-at", str(cfg.prune_at), "--warmup", str(cfg.warmup),
           "--ckpt-every", str(cfg.ckpt_every), "--launch", str(launch), "--save-last", cfg.save_last]
    if ckpt is not None:
        cmd += ["--ckpt-path", str(ckpt)]
    if kill is not None:
        cmd += ["--kill-step", str(kill["step"]), "--kill-where", kill["where"], "--kill-rank", str(kill["rank"])]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=cfg.torch_extensions, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    log = run / f"launch{launch}.log"
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    pgid = proc.pid
    timed_out = False
    while True:
        rc = proc.poll()
        if rc is not None:
            break
        if any(e["event"] == "kill" for e in read_progress(run, launch)):
            time.sleep(0.5)  # (a surviving rank may still be writing; it then blocks in a collective)
            kill_group(pgid)
        if time.monotonic() - start > cfg.launch_timeout:
            timed_out = True
            kill_group(pgid)
        time.sleep(0.2)
    left = kill_group(pgid)  # ranks left behind by a dead rank 0
    seconds = time.monotonic() - start
    events = read_progress(run, launch)
    kills = [e for e in events if e["event"] == "kill"]
    starts = [e for e in events if e["event"] == "start"]
    ended = any(e["event"] == "end" for e in events)
    result = {
        "launch": launch,
        "ckpt": str(ckpt.relative_to(run)) if ckpt is not None else None,
        "started_at_step": starts[0]["step"] if starts else None,
        "prunes_restored": starts[0]["prunes"] if starts else None,
        "planned_kill": kill,
        "killed": kills[0] if kills else None,
        "returncode": rc,
        "completed": ended and rc == 0 and not kills,
        "timed_out": timed_out,
        "left_running": left,
        "seconds": round(seconds, 1),
    }
    if not result["completed"] and not kills:
        tail = log.read_text()[-6000:]
        result["log_tail"] = tail[-3000:]
        errors = [line.strip() for line in tail.splitlines() if "Error" in line and "Connection closed" not in line]
        result["error"] = errors[-1][-400:] if errors else ("timed out" if timed_out else f"exit code {rc}")
    return result


def compare(reference: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    import torch

    def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, bool, float | None, list[str]]:
        same_shapes = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        if not same_shapes:
            bad = sorted(set(a) ^ set(b)) + [k for k in a if k in b and a[k].shape != b[k].shape]
            return False, False, None, bad[:5]
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        worst = max((float((a[k].double() - b[k].double()).abs().max()) for k in unequal), default=0.0)
        return True, not unequal, worst, unequal[:5]

    shapes_w, equal_w, max_w, bad_w = diff(reference["weights"], final["weights"])
    shapes_a, equal_a, max_a, bad_a = diff(reference["adam"], final["adam"])
    return {
        "shapes_equal": shapes_w,
        "weights_bit_equal": equal_w,
        "weights_max_abs_diff": max_w,
        "weights_differing": bad_w,
        "adam_bit_equal": equal_a,
        "adam_max_abs_diff": max_a,
        "adam_differing": bad_a,
        "plan_equal": reference["plans"] == final["plans"],
        "step_equal": reference["step"] == final["step"],
        "lr_equal": reference["lr"] == final["lr"],
    }


def phase_steps(phase: str, cfg: argparse.Namespace) -> tuple[list[int], str]:
    """The steps a kill of ``phase`` may happen at, and where in the step (pre / post the pruner, or save)."""
    P, W, N, every = cfg.prune_at, cfg.warmup, cfg.max_steps, cfg.ckpt_every
    start = P - W + 1
    table = {
        "before-warmup": (list(range(1, start)), "pre"),
        "warm-up": (list(range(start, P)), "pre"),
        "at-prune": ([P], "pre"),
        "in-prune": ([P], "post"),
        "after-prune": ([s for s in (P + 1, P + 2) if s <= N], "pre"),
        "late": (list(range(P + 3, N + 1)), "pre"),
        "mid-save": (sorted({s for s in range(every, N + 1, every)} | {P}), "save"),
    }
    return table[phase]


def draw_kills(rng: random.Random, phase: str, strategy: str, cfg: argparse.Namespace) -> list[dict[str, Any]]:
    """One kill in ``phase``; with probability ``cfg.second_kill`` a second one at a later step of a random phase."""
    def ranks(where: str) -> list[int]:
        # (single/DDP: only rank 0 writes checkpoints, so a kill inside the write is a rank-0 kill)
        return [0] if strategy == "single" or (where == "save" and strategy != "zero2") else [0, 1]

    steps, where = phase_steps(phase, cfg)
    kills = [{"phase": phase, "step": rng.choice(steps), "where": where, "rank": rng.choice(ranks(where))}]
    if rng.random() < cfg.second_kill:
        later = [(ph, [s for s in phase_steps(ph, cfg)[0] if s > kills[0]["step"]]) for ph in PHASES]
        later = [(ph, s) for ph, s in later if s]
        if later:
            ph, s = rng.choice(later)
            where = phase_steps(ph, cfg)[1]
            kills.append({"phase": ph, "step": rng.choice(s), "where": where, "rank": rng.choice(ranks(where))})
    return kills


def describe_kill(kill: dict[str, Any] | None) -> str:
    return f"{kill['phase']}@{kill['step']}/{kill['where']}/r{kill['rank']}" if kill else "-"


def describe_outcome(result: dict[str, Any]) -> str:
    if result["killed"]:
        text = f"killed at step {result['killed']['step']}"
    else:
        text = "completed" if result["completed"] else f"FAILED rc={result['returncode']}: {result.get('error')}"
    return text + (f" LEFT RUNNING {result['left_running']}" if result["left_running"] else "")


def run_trial(strategy: str, run: Path, kills: list[dict[str, Any]], reference: dict[str, Any] | None,
              cfg: argparse.Namespace) -> dict[str, Any]:
    import torch

    run.mkdir(parents=True, exist_ok=True)
    out = run / "final.pt"
    launches = []
    completed = False
    for launch in range(len(kills) + 2):  # every planned kill, then the launch that completes (one spare)
        last = run / "ckpt" / "last.ckpt"
        ckpt = last if last.exists() else None
        kill = kills[launch] if launch < len(kills) else None
        result = launch_fit(strategy, run, out, launch, ckpt, kill, cfg)
        launches.append(result)
        print(f"    launch {launch}: from {result['ckpt'] or 'scratch'} (step {result['started_at_step']}) "
              f"kill={describe_kill(kill)} -> {describe_outcome(result)} [{result['seconds']} s]", flush=True)
        if result["completed"] or (not result["killed"]):
            completed = result["completed"]
            break
    versioned = sorted(p.name for p in (run / "ckpt").glob("last-v*")) if (run / "ckpt").exists() else []
    trial: dict[str, Any] = {
        "kills_planned": kills,
        "kills_fired": [r["killed"] for r in launches if r["killed"]],
        "launches": launches,
        "completed": completed,
        "stray_processes": any(r["left_running"] for r in launches),
        "versioned_last_checkpoints": versioned,
        "failure": next((r["error"] for r in launches if r.get("error")), None),
    }
    if completed and reference is not None:
        trial["comparison"] = compare(reference, torch.load(out, weights_only=False))
        c = trial["comparison"]
        trial["survived"] = all(c[k] for k in ("shapes_equal", "weights_bit_equal", "adam_bit_equal", "plan_equal",
                                               "step_equal", "lr_equal"))
    else:
        trial["survived"] = False
    return trial


def run_strategy(strategy: str, cfg: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    import shutil

    import torch

    base = Path(cfg.workdir) / strategy
    if base.exists():
        shutil.rmtree(base)
    print(f"== {strategy}: reference (uninterrupted) fit", flush=True)
    t0 = time.monotonic()
    ref_trial = run_trial(strategy, base / "reference", [], None, cfg)
    if not ref_trial["completed"]:
        print(ref_trial["launches"][-1].get("log_tail", ""), flush=True)
        return {"strategy": strategy, "error": "the reference fit failed", "reference": ref_trial}
    reference = torch.load(base / "reference" / "final.pt", weights_only=False)
    phases = list(cfg.phases)
    rng.shuffle(phases)
    trials = []
    for t in range(cfg.trials):
        kills = draw_kills(rng, phases[t % len(phases)], strategy, cfg)
        print(f"== {strategy}: trial {t}: kills {[(k['phase'], k['step'], k['where'], k['rank']) for k in kills]}",
              flush=True)
        trial = run_trial(strategy, base / f"trial{t}", kills, reference, cfg)
        c = trial.get("comparison") or {}
        print(f"    -> completed={trial['completed']} survived={trial['survived']} "
              f"weights_bit_equal={c.get('weights_bit_equal')} adam_bit_equal={c.get('adam_bit_equal')} "
              f"max|dw|={c.get('weights_max_abs_diff')}", flush=True)
        trials.append(trial)
    fired = sum(len(t["kills_fired"]) for t in trials)
    return {
        "strategy": strategy,
        "reference": {"seconds": ref_trial["launches"][0]["seconds"], "step": reference["step"],
                      "plans": reference["plans"], "params": sum(v.numel() for v in reference["weights"].values())},
        "trials": trials,
        "summary": {
            "trials": len(trials),
            "trials_survived": sum(t["survived"] for t in trials),
            "kills_tried": fired,
            "kills_survived": sum(len(t["kills_fired"]) for t in trials if t["survived"]),
            "stray_processes": sum(t["stray_processes"] for t in trials),
        },
        "seconds": round(time.monotonic() - t0, 1),
    }


# ----------------------------------------------------------------------------------------------- report
def trial_rows(section: dict[str, Any]) -> list[list[str]]:
    rows = []
    for i, t in enumerate(section.get("trials", [])):
        c = t.get("comparison") or {}
        kills = []
        for k in t["kills_fired"]:
            planned = next((p for p in t["kills_planned"] if p["step"] == k["step"] and p["where"] == k["where"]), {})
            kills.append(f"{planned.get('phase', '?')}: step {k['step']} {k['where']} r{k['rank']}")
        resumed = [("scratch" if r["ckpt"] is None else f"step {r['started_at_step']}") for r in t["launches"][1:]]
        rows.append([
            section["strategy"], str(i), "; ".join(kills) or "(no kill fired)", ", ".join(resumed) or "-",
            "yes" if t["completed"] else "NO", yn(c.get("shapes_equal")), yn(c.get("weights_bit_equal")),
            yn(c.get("adam_bit_equal")), yn(c.get("plan_equal")),
            max_diff_cell(c),
            "yes" if t["survived"] else "NO",
        ])
    return rows


def max_diff_cell(c: dict[str, Any]) -> str:
    if not c or c.get("weights_bit_equal"):
        return ""
    if not c.get("shapes_equal"):
        return "(other shapes)"
    return f"{c['weights_max_abs_diff']:.3g}"


def yn(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "NO")


HEADER = ["strategy", "trial", "kills (phase: step, place, rank)", "resumed from", "completed", "shapes",
          "weights bit-equal", "Adam bit-equal", "plan", "max abs diff (weights)", "survived"]


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Fault injection: SIGKILL and resume around a prune event", ""]
    m = results["machine"]
    link = results["config"].get("save_last", "true") == "link"
    checkpoint_args = "save_top_k=1, save_last='link'" if link else "save_top_k=0, save_last=True"
    lines += [
        f"Machine: {m['cpus']} CPU cores ({m['platform']}), shared with other jobs; torch {m['torch']}, "
        f"lightning {m['lightning']}, deepspeed {m['deepspeed']}.",
        "",
        f"Fit: random byte-level Llama (hidden {MODEL_CONFIG['hidden_size']}, "
        f"{MODEL_CONFIG['num_hidden_layers']} layers, "
        f"{MODEL_CONFIG['num_attention_heads']} heads / {MODEL_CONFIG['num_key_value_heads']} KV heads), "
        f"TextDataModule(seq_len {DATA['seq_len']}, batch {DATA['batch_size']} per rank, {DATA['max_train_windows']} "
        f"training windows), max_steps {results['config']['max_steps']}, NirvanaPruningCallback(sparsity 0.4, "
        f"adam_fisher, prune_at {results['config']['prune_at']}, warmup_steps {results['config']['warmup']}), "
        f"PruneCheckpoint({checkpoint_args}, every_n_train_steps={results['config']['ckpt_every']}).",
        "",
        "A trial kills a rank with SIGKILL at the drawn step(s), kills the rest of the process group, and resumes from "
        "`last.ckpt` (from scratch when none exists) until the fit completes. *Survived* = completed, and the final "
        "weights, the Adam moments, the pruning plan, the step and the LR are equal to the uninterrupted run "
        "(`torch.equal`, no tolerance). *Kills survived* counts the kills of survived trials.",
        "",
        "| strategy | command | date | wall time (s) | trials survived | kills tried | kills survived | stray ranks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in STRATEGIES:
        s = results["strategies"].get(name)
        if not s:
            continue
        if "summary" not in s:
            lines.append(f"| {name} | `{s['command']}` | {s['date']} | - | reference fit FAILED | - | - | - |")
            continue
        u = s["summary"]
        lines.append(f"| {name} | `{s['command']}` | {s['date']} | {s['seconds']} | "
                     f"{u['trials_survived']}/{u['trials']} | "
                     f"{u['kills_tried']} | {u['kills_survived']} | {u['stray_processes']} |")
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    for name in STRATEGIES:
        s = results["strategies"].get(name)
        for row in trial_rows(s) if s else []:
            lines.append("| " + " | ".join(row) + " |")
    failures = [(name, i, t["failure"]) for name in STRATEGIES for i, t in
                enumerate((results["strategies"].get(name) or {}).get("trials", [])) if t.get("failure")]
    if failures:
        lines += ["", "Launches that failed (not killed, not completed):", ""]
        lines += [f"- {name} trial {i}: `{err}`" for name, i, err in failures]
    notes = results.get("notes")
    if notes:
        lines += ["", "## Notes", "", notes]
    return "\n".join(lines) + "\n"


def print_table(section: dict[str, Any]) -> None:
    rows = [HEADER] + trial_rows(section)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def driver_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--trials", type=int, default=4, help="trials per strategy (default 4)")
    p.add_argument("--quick", action="store_true", help="1 trial per strategy; results to fault_injection_quick.*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"phases of the first kill of a trial ({', '.join(PHASES)})")
    p.add_argument("--notes", default=None, help="a Markdown file whose text is kept as the report's notes")
    p.add_argument("--render-only", action="store_true", help="only rewrite the .md from the .json (with --notes)")
    p.add_argument("--second-kill", type=float, default=0.5, help="probability of a second kill in a trial")
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--prune-at", type=int, default=7)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--save-last", choices=("true", "link"), default="true",
                   help="PruneCheckpoint(save_top_k=0, save_last=True) (default), or link: save_top_k=1, "
                        "save_last='link' (last.ckpt a symlink to the newest complete checkpoint); results to *_link.*")
    p.add_argument("--launch-timeout", type=float, default=600.0)
    p.add_argument("--workdir", default="/tmp/nirvana_fault_injection")
    p.add_argument("--torch-extensions", default=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/nirvana_torch_ext"))
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.trials = 1
    cfg.phases = [ph.strip() for ph in cfg.phases.split(",") if ph.strip()]
    if not cfg.phases or set(cfg.phases) - set(PHASES):
        p.error(f"--phases: choose from {list(PHASES)}")
    strategies = [s.strip() for s in cfg.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {unknown}; choose from {list(STRATEGIES)}")
    if cfg.prune_at - cfg.warmup + 1 < 1 or cfg.prune_at >= cfg.max_steps:
        p.error("need 1 <= prune_at - warmup + 1 and prune_at < max_steps")

    from importlib.metadata import version

    stem = ("fault_injection_quick" if cfg.quick else "fault_injection") + ("_link" if cfg.save_last == "link" else "")
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    results.setdefault("strategies", {})
    if cfg.notes:
        results["notes"] = Path(cfg.notes).read_text().strip()
    if cfg.render_only:
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        md_path.write_text(markdown(results))
        print(f"wrote {md_path}")
        return
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": version("torch"),
                          "lightning": version("lightning"), "deepspeed": version("deepspeed")}
    config = {k: getattr(cfg, k) for k in ("max_steps", "prune_at", "warmup", "ckpt_every", "save_last")}
    if results.get("config") not in (None, config):
        results["strategies"] = {}  # sections of another configuration are not mixed in
    results["config"] = config
    command = "python benchmarks/fault_injection.py " + " ".join(shlex.quote(a) for a in argv)
    for strategy in strategies:
        rng = random.Random(f"{cfg.seed}-{strategy}")
        section = run_strategy(strategy, cfg, rng)
        section["command"] = command
        section["date"] = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        section["trials_requested"] = cfg.trials
        section["seed"], section["second_kill"], section["phases"] = cfg.seed, cfg.second_kill, cfg.phases
        results["strategies"][strategy] = section
        RESULTS.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        md_path.write_text(markdown(results))
        print_table(section)
        if "summary" in section:
            print(f"{strategy}: {json.dumps(section['summary'])}  [{section['seconds']} s]", flush=True)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
    else:
        driver_main(sys.argv[1:])
