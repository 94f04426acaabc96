"""A user's own LightningCLI (their module and data, nothing of nirvana-pl), to which the drop-in
``--config callbacks/nirvana.yaml`` adds pruning (run by tests/test_user_runs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for lightning_helpers

import lightning.pytorch as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning_helpers import CausalLM, token_loader  # noqa: E402


class Tokens(pl.LightningDataModule):
    def train_dataloader(self):
        return token_loader()


if __name__ == "__main__":
    cli = LightningCLI(CausalLM, Tokens)
    print(f"USER_CLI_DONE rank={cli.trainer.global_rank} step={cli.trainer.global_step}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
