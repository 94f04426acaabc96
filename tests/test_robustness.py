"""Inputs a library meets in the wild: other optimizers, re-pruning, adapters, checkpoints in validate."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import CausalLM, token_loader, trainer

from nirvana_pl import NirvanaPruningCallback, load_pruned, prune, save_pruned
from nirvana_pl.allocate import AllocationConfig, allocate
from nirvana_pl.saliency import magnitude_scores
from nirvana_pl.surgery import PlanMismatchError, apply_plan
from nirvana_pl.units import prunable_parameter_count


def _step(model, opt):
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_factored_optimizer_state_follows_the_slice():
    model = tiny_llama()
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-3)
    _step(model, opt)
    gate = model.model.layers[0].mlp.gate_proj.weight
    row_before = opt.state[gate]["row_var"].clone()
    plan = allocate(model, magnitude_scores(model), AllocationConfig(0.4, 2.0))
    apply_plan(model, plan, [opt])
    kept = torch.tensor(plan.layers[0].kept_mlp_channels)
    assert torch.equal(opt.state[gate]["row_var"], row_before[kept])
    _step(model, opt)  # and it keeps stepping


def test_optimizer_state_that_cannot_follow_is_refused_before_any_change():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    gate = model.model.layers[3].mlp.gate_proj.weight
    opt.state[gate]["blockwise_absmax"] = torch.ones(7)  # like a quantised optimizer's block statistics
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = allocate(model, magnitude_scores(model), AllocationConfig(0.4, 2.0))
    with pytest.raises(PlanMismatchError, match="blockwise_absmax"):
        apply_plan(model, plan, [opt])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_pruned_model_remembers_its_dense_reference_through_export(tmp_path):
    model = tiny_llama()
    dense = prunable_parameter_count(model)
    prune(model, 0.3, "magnitude", uniform=True)
    reloaded = load_pruned(save_pruned(model, tmp_path / "first"))
    plan = prune(reloaded, 0.5, "magnitude")
    assert plan.dense_prunable_params == dense
    assert abs(1 - prunable_parameter_count(reloaded) / dense - 0.5) < 0.03


def test_uniform_after_a_non_uniform_prune_is_refused():
    model = tiny_llama()
    prune(model, 0.3, "random")
    with pytest.raises(ValueError, match="uniform=True needs a model whose layers have equal widths"):
        prune(model, 0.5, "random", uniform=True)


def test_validate_with_a_pruned_checkpoint_recreates_the_shapes(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=3, warmup_steps=2)
    module = CausalLM()
    trainer(tmp_path, 5, [cb, ckpt], enable_checkpointing=True).fit(module, token_loader())
    path = next((tmp_path / "ckpt").glob("*.ckpt"))

    class WithVal(CausalLM):
        def validation_step(self, batch, batch_idx):
            (ids,) = batch
            self.log("val_loss", self.net(input_ids=ids, labels=ids).loss)

    fresh = WithVal(seed=3)
    cb2 = NirvanaPruningCallback(sparsity=0.4, prune_at=3, warmup_steps=2)
    trainer(tmp_path / "val", 5, [cb2]).validate(fresh, token_loader(n=8), ckpt_path=path)
    assert {n: p.shape for n, p in fresh.net.named_parameters()} == {
        n: p.shape for n, p in module.net.named_parameters()
    }
