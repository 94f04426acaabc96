"""Step time before and after a prune under DeepSpeed ZeRO-2 or ZeRO-3 (2 ranks), against the FLOP ratio.

A ~30M-parameter Llama (random weights, random tokens) trains under ZeRO (``--stage``, default 2) with two ranks; the
callback prunes to s = 0.5 (adam_taylor, gamma 2) at step ``--prune-at``. Reported: the median
step time before and after the prune, their ratio next to the ratio of training FLOPs the two
models need per step (matmuls and attention scores, forward + backward = 3x forward), and the
prune event's wall time (scoring, plan, surgery, engine rebuild, state carry-over) over one dense
step. Writes benchmarks/results/zero{stage}_bench.{json,md}.

On a machine without GPUs it runs on CPU processes (``CPUDeepSpeedStrategy``, gloo); with
``--gpu`` it uses the stock ``DeepSpeedStrategy`` on two GPUs.

Usage: python benchmarks/zero_bench.py [--stage 2|3] [--prune-at 8] [--steps-after 8] [--seq 256] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from nirvana_pl import NirvanaPruningCallback  # noqa: E402
from nirvana_pl.deepspeed import CPUDeepSpeedStrategy  # noqa: E402
from nirvana_pl.units import find_units, head_dim_of, parameter_numel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False,
)


class LM(pl.LightningModule):
    def __init__(self, lr: float = 1e-3):
        super().__init__()
        torch.manual_seed(0)
        self.net = LlamaForCausalLM(LlamaConfig(**CONFIG))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.net(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """Forward+backward FLOPs per token: 2 x matmul parameters + attention scores, times 3."""
    cfg = model.config
    linear = sum(parameter_numel(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = sum(2 * 2 * u.num_kv_groups * u.group_size * head_dim_of(cfg) * seq / 2 for u in find_units(model))
    return 3.0 * (2.0 * linear + attn)


class Timer(Callback):
    def __init__(self, pruner: NirvanaPruningCallback, prune_at: int):
        self.pruner, self.prune_at = pruner, prune_at
        self.steps: list[tuple[int, float]] = []
        self.flops: dict[str, float] = {}
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and not self.flops:
            self.flops["before"] = train_flops_per_token(self.pruner.model, batch[0].shape[1])
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Runs after the pruner (callback order), so a prune step's time includes the prune event.
        self.steps.append((trainer.global_step, time.perf_counter() - self._t0))
        if trainer.global_step == self.prune_at and "after" not in self.flops and self.pruner.records:
            self.flops["after"] = train_flops_per_token(self.pruner.model, batch[0].shape[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prune-at", type=int, default=8)
    ap.add_argument("--steps-after", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--stage", type=int, choices=(1, 2, 3), default=2, help="DeepSpeed ZeRO stage")
    args = ap.parse_args()
    name = f"zero{args.stage}_bench"
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    pruner = NirvanaPruningCallback(sparsity=0.5, prune_at=args.prune_at, warmup_steps=3, saliency="adam_taylor",
                                    gamma=2.0, report_dir=RESULTS / f"{name}_report")
    timer = Timer(pruner, args.prune_at)
    if args.gpu:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy, accelerator = DeepSpeedStrategy(stage=args.stage), "gpu"
    else:
        strategy, accelerator = CPUDeepSpeedStrategy(stage=args.stage), "cpu"
    trainer = pl.Trainer(
        max_steps=args.prune_at + args.steps_after, accelerator=accelerator, devices=2, strategy=strategy,
        precision="bf16-mixed" if args.gpu else "32-true", callbacks=[pruner, timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=RESULTS / f"{name}_run",
    )
    gen = torch.Generator().manual_seed(0)
    n = 2 * args.batch_size * (args.prune_at + args.steps_after + 2)
    data = DataLoader(TensorDataset(torch.randint(0, CONFIG["vocab_size"], (n, args.seq), generator=gen)),
                      batch_size=args.batch_size)
    trainer.fit(LM(), data)

    steps = dict(timer.steps)
    dense = [t for s, t in steps.items() if 2 <= s < args.prune_at]  # skip warm-up steps 1
    pruned = [t for s, t in steps.items() if s > args.prune_at + 1]  # skip the first step after the rebuild
    record = pruner.records[0]
    dense_step = statistics.median(dense)
    pruned_step = statistics.median(pruned)
    flop_ratio = timer.flops["after"] / timer.flops["before"]
    result = {
        "device": "2 x GPU" if args.gpu else f"2 CPU processes ({platform.processor() or platform.machine()})",
        "config": CONFIG,
        "seq_len": args.seq,
        "micro_batch_per_rank": args.batch_size,
        "zero_stage": args.stage,
        "sparsity": 0.5,
        "params_before": record.total_params_before,
        "params_after": record.total_params_after,
        "dense_step_s": dense_step,
        "pruned_step_s": pruned_step,
        "step_time_ratio": pruned_step / dense_step,
        "flop_ratio": flop_ratio,
        "step_time_ratio_over_flop_ratio": (pruned_step / dense_step) / flop_ratio,
        "prune_event_s": record.seconds,
        "prune_event_over_dense_step": record.seconds / dense_step,
        "dense_steps_s": dense,
        "pruned_steps_s": pruned,
    }
    if trainer.is_global_zero:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        md = [
            f"# ZeRO-{args.stage} step time before/after pruning (s = 0.5)",
            "",
            f"Device: {result['device']}; ~{record.total_params_before / 1e6:.1f}M-parameter Llama, seq {args.seq}, "
            f"micro-batch {args.batch_size} per rank, 2 ranks, ZeRO stage {args.stage}.",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| parameters before / after | {record.total_params_before:,} / {record.total_params_after:,} |",
            f"| median dense step (s) | {dense_step:.3f} |",
            f"| median pruned step (s) | {pruned_step:.3f} |",
            f"| step-time ratio (pruned / dense) | {result['step_time_ratio']:.3f} |",
            f"| FLOP ratio (pruned / dense) | {flop_ratio:.3f} |",
            f"| step-time ratio / FLOP ratio | {result['step_time_ratio_over_flop_ratio']:.3f} |",
            f"| prune event wall time (s) | {record.seconds:.3f} |",
            f"| prune event / dense step | {result['prune_event_over_dense_step']:.2f} |",
            "",
            "Goal: step-time ratio within 10% of the FLOP ratio (ratio / FLOP ratio <= 1.10).",
        ]
        (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
