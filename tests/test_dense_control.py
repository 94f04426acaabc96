"""The dense control: a copy of the model and its optimizer state, trained on the fit's batches."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import tiny_llama
from nirvana_pl.dense_control import DenseControl
from nirvana_pl.modules import gap_closed


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_the_control_trains_exactly_as_the_model_it_was_copied_from():
    model = tiny_llama().train()
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if "norm" not in n], "weight_decay": 0.1},
         {"params": [p for n, p in model.named_parameters() if "norm" in n], "weight_decay": 0.0}], lr=1e-3,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 128, (2, 12), generator=gen) for _ in range(5)]
    for ids in batches[:2]:
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    control = DenseControl(model, opt, _loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), control.model.parameters()))
    for lr, ids in zip((1e-3, 5e-4, 2e-4), batches[2:]):
        for group in opt.param_groups:  # (a scheduler changes the fit's lr; the control follows it)
            group["lr"] = lr
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        control.step(ids, opt, contextlib.nullcontext)
    assert control.steps == 3
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), control.model.parameters()))
    assert control.optimizer.param_groups[0]["weight_decay"] == 0.1 and control.optimizer.param_groups[0]["lr"] == 2e-4


def test_gap_closed_is_the_share_of_the_log_perplexity_gap():
    assert gap_closed(40.0, 20.0, 10.0) == pytest.approx(0.5)
    assert gap_closed(40.0, 50.0, 10.0) < 0  # recovery that made it worse
    assert gap_closed(10.0, 9.0, 12.0) is None and gap_closed(None, 9.0, 12.0) is None


def test_a_module_without_loss_of_is_refused_before_training(tmp_path):
    from lightning_helpers import CausalLM, Losses, token_loader, trainer

    from nirvana_pl import NirvanaPruningCallback
    from nirvana_pl.modules import HeldOutPerplexity

    losses = Losses()
    cbs = [HeldOutPerplexity(batches=[{"input_ids": torch.zeros(1, 8, dtype=torch.long)}], dense_control=True),
           NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2), losses]  # fmt: skip
    with pytest.raises(ValueError, match="dense_control=True.*loss_of"):
        trainer(tmp_path, 5, cbs).fit(CausalLM(), token_loader())
    assert losses.losses == []
