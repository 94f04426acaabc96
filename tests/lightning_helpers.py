"""A user-style LightningModule and data for callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128


#: the expert sizes of the mixture-of-experts kinds whose config defaults are full-size models (Mixtral's experts
#: take ``intermediate_size``)
_EXPERTS = {
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
}


def tiny_config(kind: str = "llama", **overrides):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
        **_EXPERTS.get(kind, {}),
    )
    common.update(overrides)
    return AutoConfig.for_model(kind, **common)  # llama, qwen2 (q/k/v biases), qwen3 (q_norm/k_norm) ...


class CausalLM(pl.LightningModule):
    """What a user already has: a transformers model under some attribute, AdamW, a scheduler."""

    def __init__(
        self, kind: str = "llama", lr: float = 3e-3, seed: int = 0, optimizer: str = "adamw", **config_overrides
    ):
        super().__init__()
        torch.manual_seed(seed)
        config = tiny_config(kind, **config_overrides)
        self.net = AutoModelForCausalLM.from_config(config)
        self.lr = lr
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.net(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Losses(pl.Callback):
    """The training loss of every batch, as the LightningModule returned it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def token_loader(n: int = 64, seq: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    # A learnable pattern: each sequence counts up from a random start, so loss can fall.
    starts = torch.randint(0, VOCAB, (n, 1), generator=gen)
    ids = (starts + torch.arange(seq)) % VOCAB
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, max_steps: int, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False, log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)
