"""A user's own fit, with the library's defaults: 2 CPU processes (DDP or ZeRO-2), the Trainer's default
logger (or none), no report_dir, SavePrunedModel at the end (run by tests/test_user_runs.py).

Each rank prints one line ``USER_FIT {json}`` after the fit.

Usage: python tests/scripts/user_fit.py --out DIR [--strategy ddp|zero2] [--no-logger]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for lightning_helpers

import lightning.pytorch as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning_helpers import CausalLM, token_loader  # noqa: E402

from nirvana_pl import NirvanaPruningCallback  # noqa: E402
from nirvana_pl.modules import SavePrunedModel  # noqa: E402
from nirvana_pl.units import find_units  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "zero2"])
    parser.add_argument("--no-logger", action="store_true")
    args = parser.parse_args()
    strategy: object = "ddp"
    if args.strategy == "zero2":
        from nirvana_pl.deepspeed import CPUDeepSpeedStrategy

        strategy = CPUDeepSpeedStrategy(stage=2)
    pruner = NirvanaPruningCallback(sparsity=0.4, prune_at=5, warmup_steps=3)
    saver = SavePrunedModel()
    kwargs = {"logger": False} if args.no_logger else {}
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=8, default_root_dir=args.out,
        callbacks=[pruner, saver], enable_progress_bar=False, enable_checkpointing=False, **kwargs,
    )
    module = CausalLM()
    trainer.fit(module, token_loader())
    # as a user would, on every rank: global rank 0 writes, the others return at once
    exported = pruner.save_pretrained(Path(args.out) / "exported")
    print("USER_FIT " + json.dumps({
        "rank": trainer.global_rank, "step": trainer.global_step, "records": len(pruner.records),
        "shapes": [[u.num_kv_groups, u.mlp_width] for u in find_units(module.net)],
        "report": str(pruner.report_path) if pruner.report_path else None,
        "saved_to": str(saver.saved_to) if saver.saved_to else None,
        "exported": str(exported),
    }), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
