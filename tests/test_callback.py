"""NirvanaPruningCallback inside real (tiny) Lightning fits."""

from __future__ import annotations

import copy
import csv
import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_helpers import CausalLM, token_loader, trainer

from nirvana_pl import NirvanaPruningCallback, UnsupportedModelError, load_pruned_state_dict
from nirvana_pl.saliency import SaliencyError
from nirvana_pl.surgery import PlanMismatchError
from nirvana_pl.units import find_units, prunable_parameter_count


class Snapshots(Callback):
    """Copies of the model's parameters and the optimizer state at chosen global steps."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.optim: dict[int, dict] = {}
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        step = trainer.global_step
        if step in self.steps and step not in self.params:
            self.params[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            opt = trainer.optimizers[0]
            self.optim[step] = {
                n: copy.deepcopy(opt.state[p]) for n, p in pl_module.named_parameters() if p in opt.state
            }


def _shapes(module):
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


@pytest.mark.parametrize("saliency", ["adam_taylor", "functional"])
def test_fit_prunes_midway_and_keeps_training(tmp_path, saliency):
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=8, warmup_steps=4, saliency=saliency, gamma=2.0)
    # The pruning callback runs first, so snapshots at step 8 see the pruned model.
    snaps = Snapshots([7, 8, 20])
    module = CausalLM()
    dense_params = sum(p.numel() for p in module.parameters())
    t = trainer(tmp_path, 20, [cb, snaps])
    t.fit(module, token_loader())

    assert len(cb.plans) == 1
    assert sum(p.numel() for p in module.parameters()) < dense_params
    assert abs(cb.plans[0].realised_sparsity - 0.5) < 0.05
    assert all(math.isfinite(x) for x in snaps.losses)
    # Kept weights keep changing after the prune.
    changed = [n for n, p in snaps.params[20].items() if not torch.equal(p, snaps.params[8][n])]
    assert any("q_proj" in n for n in changed) and any("gate_proj" in n for n in changed)
    # The optimizer Lightning keeps stepping holds state of the pruned shapes.
    opt = t.optimizers[0]
    for p in module.parameters():
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert int(st["step"]) == 20
    # The LR scheduler went on counting through the prune.
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 20


def test_optimizer_state_after_prune_is_the_sliced_old_state(tmp_path):
    """Adam moments of kept weights right after the prune equal the moments just before, sliced."""

    class BeforePrune(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 6:
                opt = trainer.optimizers[0]
                self.state = {n: copy.deepcopy(opt.state[p]) for n, p in pl_module.named_parameters()}

    before = BeforePrune()
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=6, warmup_steps=3, saliency="adam_fisher", gamma=3.0)
    after = Snapshots([6])
    module = CausalLM()
    t = trainer(tmp_path, 6, [before, cb, after])  # order: snapshot, prune, snapshot
    t.fit(module, token_loader())

    plan = cb.plans[0]
    units = find_units(module.net)
    for li, (u, lp) in enumerate(zip(units, plan.layers)):
        h, g = u.head_dim, u.group_size
        kv = torch.tensor(lp.kept_kv_groups)
        q_rows = (kv[:, None] * g * h + torch.arange(g * h)).reshape(-1)
        ch = torch.tensor(lp.kept_mlp_channels)
        prefix = f"net.model.layers.{li}."
        for name, axis, idx in (
            ("self_attn.q_proj.weight", 0, q_rows),
            ("self_attn.o_proj.weight", 1, q_rows),
            ("mlp.gate_proj.weight", 0, ch),
            ("mlp.down_proj.weight", 1, ch),
        ):
            old, new = before.state[prefix + name], after.optim[6][prefix + name]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[key], old[key].index_select(axis, idx)), (name, key)
            assert float(new["step"]) == float(old["step"])


def test_gradient_accumulation_prunes_on_an_optimizer_step_boundary(tmp_path):
    seen = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, trainer.global_step, prunable_parameter_count(pl_module.net)))

    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, saliency="adam_taylor")
    t = trainer(tmp_path, 5, [cb, Watch()], accumulate_grad_batches=2)
    t.fit(CausalLM(), token_loader())
    dense = seen[0][2]
    first_pruned = next(i for i, (_, _, n) in enumerate(seen) if n < dense)
    batch_idx, step, _ = seen[first_pruned]
    assert step == 3 and (batch_idx + 1) % 2 == 0  # right after the 3rd optimizer step
    assert cb._records[0].event_step == 3


def test_iterative_schedule_targets_are_relative_to_dense(tmp_path):
    cb = NirvanaPruningCallback(schedule={4: 0.2, 8: 0.35, 12: 0.5}, warmup_steps=3, saliency="adam_momentum")
    module = CausalLM()
    dense = prunable_parameter_count(module.net)
    t = trainer(tmp_path, 14, [cb])
    t.fit(module, token_loader())
    assert [r.event_step for r in cb._records] == [4, 8, 12]
    for record, target in zip(cb._records, (0.2, 0.35, 0.5)):
        assert abs(record.realised_sparsity - target) < 0.05
    assert abs(1 - prunable_parameter_count(module.net) / dense - 0.5) < 0.05


@pytest.mark.parametrize("every", [50, 4])  # Lightning's default; a cadence the prune step falls between
def test_event_metrics_reach_the_logger_at_the_prune_step(tmp_path, every):
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=6, warmup_steps=2, saliency="adam_taylor")
    t = trainer(tmp_path, 10, [cb], log_every_n_steps=every)
    t.fit(CausalLM(), token_loader())
    with open(t.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    (event,) = [r for r in rows if r.get("nirvana/realised_sparsity")]
    assert int(event["step"]) == 5  # the batch of optimizer step 6, numbered as Lightning numbers its rows
    assert float(event["nirvana/realised_sparsity"]) == pytest.approx(cb.records[0].realised_sparsity)
    # Lightning's own cadence is left as it was
    assert {int(r["step"]) for r in rows if r.get("train_loss")} == set(range(every - 1, 10, every))
    assert t.callback_metrics["nirvana/realised_sparsity"] == pytest.approx(cb.records[0].realised_sparsity)


def test_a_callback_reused_for_a_new_fit_starts_afresh(tmp_path):
    """A notebook re-run or a sweep reuses the callback object: each fit from step 0 is a run of its own."""

    def fit(cb, module, steps, data_seed=0):
        trainer(tmp_path, steps, [cb]).fit(module, token_loader(seed=data_seed))
        return module

    fresh = NirvanaPruningCallback(sparsity=0.5, prune_at=6, warmup_steps=4)  # the default saliency
    fit(fresh, CausalLM(), 8)
    (expected,) = fresh.records
    reused = NirvanaPruningCallback(sparsity=0.5, prune_at=6, warmup_steps=4)
    fit(reused, CausalLM(seed=1), 4, data_seed=1)  # a trial fit that ends inside the warm-up window, other data
    assert not reused.records
    for _ in range(2):  # the real fit; then again on a new dense module, after a fit that pruned
        module = fit(reused, CausalLM(), 8)
        (record,) = reused.records
        assert record.plan.fingerprint() == expected.plan.fingerprint()
        assert prunable_parameter_count(module.net) == record.prunable_params_after == expected.prunable_params_after
    # a new fit of the module this callback pruned keeps its record: nothing is pruned twice
    fit(reused, module, 8)
    assert reused.records[0] is record and prunable_parameter_count(module.net) == record.prunable_params_after


def test_metrics_logged_and_report_written(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=5, warmup_steps=2, saliency="adam_taylor")
    t = trainer(tmp_path, 6, [cb])
    t.fit(CausalLM(), token_loader())
    report = json.loads(cb.report_path.read_text())
    (event,) = report["events"]
    assert event["step"] == 5 and len(event["kept_mlp_width_per_layer"]) == 4
    assert event["params_after"] < event["params_before"]
    with open(t.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("nirvana/realised_sparsity")]
    assert logged and abs(float(logged[0]["nirvana/realised_sparsity"]) - event["realised_sparsity"]) < 1e-6
    for key in ("params_before", "params_after", "kv_groups_removed", "mlp_channels_removed", "prune_seconds"):
        assert logged[0][f"nirvana/{key}"] != ""


def _fit_with_checkpoints(tmp_path, module: pl.LightningModule, every: int):
    """6 steps, pruned at step 4 (adam_taylor), a checkpoint every ``every`` steps in tmp_path / "ckpt"."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=4, warmup_steps=2, saliency="adam_taylor")
    t = trainer(tmp_path, 6, [cb, ckpt], enable_checkpointing=True)
    t.fit(module, token_loader())
    return cb, t


def test_resume_after_prune_recreates_shapes_and_does_not_reprune(tmp_path):
    module = CausalLM()
    _fit_with_checkpoints(tmp_path, module, every=6)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    pruned_shapes = _shapes(module)

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    fresh = CausalLM(seed=1)  # dense, different weights
    cb2 = NirvanaPruningCallback(sparsity=0.5, prune_at=4, warmup_steps=2, saliency="adam_taylor")
    at_start = AtStart()
    t2 = trainer(tmp_path / "resumed", 9, [cb2, at_start])
    t2.fit(fresh, token_loader(), ckpt_path=path)
    assert _shapes(fresh) == pruned_shapes
    saved_weights = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(at_start.params[n], saved_weights[n]) for n in at_start.params)
    assert [r.event_step for r in cb2._records] == [4]  # restored, not re-pruned
    assert t2.global_step == 9
    saved = torch.load(path, map_location="cpu", weights_only=False)
    opt = t2.optimizers[0]
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in fresh.parameters())
    assert int(saved["optimizer_states"][0]["state"][0]["step"]) == 6


class _WithValidation(CausalLM):
    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val_loss", self.net(input_ids=ids, labels=ids).loss)


def test_a_checkpoint_from_before_the_prune_names_the_module_to_load_it_into(tmp_path):
    """trainer.validate(ckpt_path="best") after a fit may pick a checkpoint written before the prune."""
    module = _WithValidation()
    cb, t = _fit_with_checkpoints(tmp_path, module, every=3)
    before = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    with pytest.raises(PlanMismatchError, match="pruned at step 4; a checkpoint saved before that.*newly built dense"):
        t.validate(module, token_loader(n=8), ckpt_path=before)
    dense = _WithValidation(seed=1)
    shapes = _shapes(dense)
    (result,) = t.validate(dense, token_loader(n=8), ckpt_path=before)  # what the error says to do
    saved = torch.load(before, map_location="cpu", weights_only=False)["state_dict"]
    assert _shapes(dense) == shapes and all(torch.equal(p, saved[n]) for n, p in dense.named_parameters())
    assert math.isfinite(result["val_loss"])
    # the fit's model and record stay what the callback saves (the checkpoint's own state, no prune yet, is not taken)
    (record,) = cb.records
    assert cb.model is module.net and record.event_step == 4
    # a checkpoint after the prune, outside a Trainer (README "Loading a pruned model")
    after = torch.load(next((tmp_path / "ckpt").glob("*step=6.ckpt")), map_location="cpu", weights_only=False)
    reloaded = _WithValidation(seed=1)
    load_pruned_state_dict(reloaded, after["state_dict"])
    assert _shapes(reloaded) == _shapes(module)
    assert all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), module.parameters(), strict=True))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0, prune_at=5), "sparsity=1.0"),
        (dict(sparsity=-0.1, prune_at=5), "sparsity=-0.1"),
        (dict(sparsity=0.5, prune_at=5, gamma=0.0), "gamma=0.0"),
        (dict(sparsity=0.5, prune_at=0), "prune_at=0"),
        (dict(sparsity=0.5, prune_at=5, warmup_steps=10), "warmup_steps <= 5"),
        (dict(sparsity=0.5, prune_at=5, warmup_steps=0, saliency="adam_taylor"), "warmup_steps >= 1"),
        (dict(sparsity=0.5, prune_at=5, saliency="nope"), "saliency='nope'"),
        (dict(schedule={4: 0.3, 6: 0.2}), "must not decrease"),
        (dict(schedule={4: 0.2, 6: 0.3}, warmup_steps=3), "previous prune at step 4"),
        (dict(prune_at=5), "sparsity= and prune_at="),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NirvanaPruningCallback(**{"warmup_steps": 2, **kwargs})


def test_prune_step_beyond_max_steps_warns(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=50, warmup_steps=2)
    with pytest.warns(UserWarning, match="about 3 optimizer steps .*the prune at step 50 will not happen"):
        trainer(tmp_path, 3, [cb]).fit(CausalLM(), token_loader())
    assert cb.plans == []


def test_model_without_prunable_layers_fails_at_setup(tmp_path):
    class NotAnLLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0].float()).sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=2, warmup_steps=1)
    with pytest.raises(UnsupportedModelError, match=r"prunes models of type .*llama.*qwen3.*t5"):
        trainer(tmp_path, 3, [cb]).fit(NotAnLLM(), token_loader())


def test_model_built_in_configure_model_is_named_at_setup(tmp_path):
    class BuiltLate(CausalLM):
        """Builds the transformers model in configure_model, as under DeepSpeed ZeRO-3's zero.Init."""

        def __init__(self):
            super().__init__()
            del self.net

        def configure_model(self):
            if not hasattr(self, "net"):
                self.net = CausalLM().net

    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=2, warmup_steps=1)
    with pytest.raises(UnsupportedModelError, match=r"BuiltLate builds its layers in configure_model\(\).*in __init__"):
        trainer(tmp_path, 3, [cb]).fit(BuiltLate(), token_loader())


def test_a_lightning_modules_own_config_attribute_is_not_taken_for_the_model(tmp_path):
    module = CausalLM()
    module.config = {"lr": 3e-3}
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=2, warmup_steps=1)
    trainer(tmp_path, 3, [cb]).fit(module, token_loader())
    assert cb.model is module.net and len(cb.plans) == 1


def test_model_attr_wrong_path_is_named(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=2, warmup_steps=1, model_attr="backbone")
    with pytest.raises(AttributeError, match="model_attr='backbone'"):
        trainer(tmp_path, 3, [cb]).fit(CausalLM(), token_loader())


def test_calibration_of_wrong_shape_fails_at_setup(tmp_path):
    cb = NirvanaPruningCallback(
        sparsity=0.5, prune_at=2, warmup_steps=1, saliency="functional", calibration=[torch.arange(10)]
    )
    with pytest.raises(ValueError, match="calibration batch 0"):
        trainer(tmp_path, 3, [cb]).fit(CausalLM(), token_loader())


def test_adam_saliency_with_sgd_is_a_clear_error(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=3, warmup_steps=2, saliency="adam_taylor")
    with pytest.raises(SaliencyError, match="functional"):
        trainer(tmp_path, 4, [cb]).fit(CausalLM(optimizer="sgd"), token_loader())


def test_infeasible_sparsity_fails_at_setup_with_the_largest_feasible_value(tmp_path):
    from nirvana_pl import InfeasibleSparsityError

    cb = NirvanaPruningCallback(sparsity=0.95, prune_at=3, warmup_steps=2, gamma=3.0)
    with pytest.raises(InfeasibleSparsityError, match="largest feasible sparsity is 0\\.[0-9]{3}"):
        trainer(tmp_path, 4, [cb]).fit(CausalLM(), token_loader())


def test_callback_export_of_a_pruned_qwen2_reloads_with_equal_outputs(tmp_path):
    from nirvana_pl import load_pruned

    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="adam_taylor", gamma=2.0)
    module = CausalLM(kind="qwen2")
    trainer(tmp_path, 6, [cb]).fit(module, token_loader())
    assert module.net.model.layers[0].self_attn.q_proj.bias is not None
    folder = cb.save_pretrained(tmp_path / "pruned")
    reloaded = load_pruned(folder)
    ids = next(iter(token_loader()))[0]
    module.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module.net(ids).logits, atol=1e-5, rtol=0)


def test_warmup_zero_with_given_calibration_prunes_at_the_step(tmp_path):
    calibration = [next(iter(token_loader()))[0]]
    cb = NirvanaPruningCallback(
        sparsity=0.3, prune_at=3, warmup_steps=0, saliency="functional", calibration=calibration
    )
    trainer(tmp_path, 4, [cb]).fit(CausalLM(), token_loader())
    assert [r.event_step for r in cb.records] == [3]


def test_fisher_functional_reads_the_adam_state_and_the_warmup_batches(tmp_path, monkeypatch):
    """The hybrid estimator: Adam state averaged over the warm-up window, functional on its training batches."""
    import nirvana_pl.oneshot as oneshot

    seen = []
    real = oneshot.compute_scores

    def spy(model, saliency, calibration=None, optimizer_scores=None, **kwargs):
        seen.append((saliency, [b["input_ids"].clone() for b in calibration or []], optimizer_scores))
        return real(model, saliency, calibration, optimizer_scores, **kwargs)

    monkeypatch.setattr(oneshot, "compute_scores", spy)

    class Batches(Callback):
        def __init__(self):
            self.ids = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.ids[trainer.global_step + 1] = batch[0].clone()  # the batch of optimizer step n

    batches = Batches()
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=6, warmup_steps=3, saliency="fisher_functional", gamma=2.0,
                                num_calibration_batches=2)  # fmt: skip
    module = CausalLM()
    t = trainer(tmp_path, 10, [batches, cb])
    t.fit(module, token_loader())
    assert len(cb.plans) == 1 and cb.plans[0].saliency == "fisher_functional"
    assert abs(cb.plans[0].realised_sparsity - 0.4) < 0.05
    (saliency, calibration, adam), = seen
    assert saliency == "fisher_functional" and adam is not None
    # the last two training batches of the warm-up window (steps 5 and 6), as the functional part's calibration
    assert len(calibration) == 2
    assert torch.equal(calibration[0], batches.ids[5]) and torch.equal(calibration[1], batches.ids[6])
    assert int(t.optimizers[0].state[next(module.parameters())]["step"]) == 10


def test_fisher_functional_self_samples_windows_like_the_warmup_batches_and_leaves_the_random_stream(
    tmp_path, monkeypatch
):
    """The self-sampling hybrid: its windows copy the warm-up batches' shapes, and the fit's random state after the
    prune is the one the plain hybrid leaves (the sampler draws from its own generator)."""
    import nirvana_pl.callback as callback_module
    import nirvana_pl.saliency as saliency

    shapes, windows = [], []
    real = saliency.sample_like

    def spy(model, batches, seed, rank=0, progress=False):
        out = real(model, batches, seed, rank=rank, progress=progress)
        shapes.append(([tuple(b["input_ids"].shape) for b in batches], [tuple(b["input_ids"].shape) for b in out]))
        windows.append(torch.cat([b["input_ids"] for b in out]))
        return out

    monkeypatch.setattr(saliency, "sample_like", spy)
    fitted_on = []
    real_fit = callback_module.plan_compensation

    def spy_fit(model, plan, batches, damping, reduce=None):
        fitted_on.append(torch.cat([b["input_ids"] for b in batches]))
        return real_fit(model, plan, batches, damping, reduce=reduce)

    monkeypatch.setattr(callback_module, "plan_compensation", spy_fit)

    class RandomState(Callback):
        def on_train_end(self, trainer, pl_module):
            self.state = torch.random.get_rng_state()

    runs = {}
    for name in ("fisher_functional", "fisher_functional_self"):
        state = RandomState()
        cb = NirvanaPruningCallback(sparsity=0.4, prune_at=6, warmup_steps=3, saliency=name, gamma=2.0,
                                    num_calibration_batches=2)  # fmt: skip
        torch.manual_seed(0)
        trainer(tmp_path / name, 8, [state, cb]).fit(CausalLM(), token_loader())
        assert cb.plans[0].saliency == name and abs(cb.plans[0].realised_sparsity - 0.4) < 0.05
        runs[name] = (state.state, cb.plans[0].fingerprint())
    # one event, scored in the default 2 stages: each stage samples windows like the event's two batches, and the
    # compensation fits on the event's two batches and the first stage's windows, handed over (not sampled again)
    assert shapes == [([(4, 16), (4, 16)], [(4, 16), (4, 16)])] * 2
    assert not torch.equal(windows[1], windows[0])
    assert len(fitted_on) == 1 and torch.equal(fitted_on[0][-8:], windows[0])
    assert cb.scoring_stages == 2 and cb.plans[0].score_summary["scoring_stages"] == 2
    assert cb.plans[0].score_summary["compensation"]["tokens"] == 2 * 2 * 4 * 16  # both texts
    assert torch.equal(runs["fisher_functional"][0], runs["fisher_functional_self"][0])
    assert runs["fisher_functional"][1] != runs["fisher_functional_self"][1]


def test_num_sampled_batches_sets_how_many_batches_the_prune_event_samples(tmp_path, monkeypatch):
    import nirvana_pl.saliency as saliency

    shapes = []
    real = saliency.sample_like

    def spy(model, batches, seed, rank=0, progress=False):
        shapes.append([tuple(b["input_ids"].shape) for b in batches])
        return real(model, batches, seed, rank=rank, progress=progress)

    monkeypatch.setattr(saliency, "sample_like", spy)
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, gamma=2.0, num_calibration_batches=2,
                                num_sampled_batches=5)  # fmt: skip
    trainer(tmp_path, 5, [cb]).fit(CausalLM(), token_loader())
    assert cb.plans[0].saliency == "fisher_functional_self"
    assert shapes == [[(4, 16)] * 5] * 2  # (once per scoring stage, 2 by default; the compensation reuses the first)
    assert cb.plans[0].score_summary["compensation"]["tokens"] == (2 + 5) * 4 * 16
    with pytest.raises(ValueError, match="saliency='fisher_functional' samples none.*Drop num_sampled_batches"):
        NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="fisher_functional",
                               num_sampled_batches=2)  # fmt: skip
    with pytest.raises(ValueError, match="num_sampled_batches=0 must be an integer >= 1"):
        NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, num_sampled_batches=0)


def test_the_default_scores_the_prune_event_again_with_the_first_stage_masked_out(tmp_path, monkeypatch):
    import nirvana_pl.calibration as calibration
    import nirvana_pl.saliency as saliency

    samples, masks = [], []
    real_sample, real_masked = saliency.sample_like, calibration.masked

    def spy_sample(model, batches, seed, rank=0, progress=False):
        samples.append(len(masks))
        return real_sample(model, batches, seed, rank=rank, progress=progress)

    def spy_masked(model, plan):
        masks.append(plan.realised_sparsity)
        return real_masked(model, plan)

    monkeypatch.setattr(saliency, "sample_like", spy_sample)
    monkeypatch.setattr("nirvana_pl.oneshot.masked", spy_masked)
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, gamma=2.0, num_calibration_batches=2)
    trainer(tmp_path, 5, [cb]).fit(CausalLM(), token_loader())  # the defaults: fisher_functional_self, 2 stages
    plan = cb.plans[0]
    assert plan.saliency == "fisher_functional_self" and plan.score_summary["scoring_stages"] == 2
    assert abs(plan.realised_sparsity - 0.4) < 0.05
    # sampled again, halfway masked out (the compensation fits on the first windows: no third sampling)
    assert samples == [0, 1] and len(masks) == 1 and 0.1 < masks[0] < 0.3
    once = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, gamma=2.0, num_calibration_batches=2,
                                  scoring_stages=1, compensate=False)  # fmt: skip
    trainer(tmp_path / "once", 5, [once]).fit(CausalLM(), token_loader())
    assert samples == [0, 1, 1] and len(masks) == 1 and "scoring_stages" not in once.plans[0].score_summary
    assert "compensation" not in once.plans[0].score_summary
    # the other estimators score once unless told otherwise; those a mask cannot change refuse more stages
    assert NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="adam_fisher").scoring_stages == 1
    assert NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="functional").scoring_stages == 1
    with pytest.raises(ValueError, match="saliency='adam_fisher' reads the optimizer's Adam state"):
        NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="adam_fisher", scoring_stages=2)


def test_fisher_functional_self_is_refused_for_a_model_that_cannot_sample_its_text(tmp_path):
    from arch_configs import build

    class Seq2Seq(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build("t5")

    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=4, warmup_steps=2, saliency="fisher_functional_self")
    with pytest.raises(ValueError, match="not a decoder-only language model.*saliency='fisher_functional'"):
        cb.setup(trainer(tmp_path, 4, [cb]), Seq2Seq(), "fit")


def test_default_saliency_refuses_a_calibration_selector_and_a_window_without_steps():
    from nirvana_pl import CalibrationSelector

    pool = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(0))
    selector = CalibrationSelector(pool, num_candidates=2, samples_per_candidate=4, probe_windows=8, probe_seq_len=16)
    with pytest.raises(ValueError, match="fisher_functional.*not supported with it yet.*adam_fisher"):
        NirvanaPruningCallback(sparsity=0.5, prune_at=5, warmup_steps=2, gamma="auto", calibration=selector)
    with pytest.raises(ValueError, match="averages Adam state.*warmup_steps >= 1"):
        NirvanaPruningCallback(sparsity=0.5, prune_at=5, warmup_steps=0)
    from conftest import tiny_llama

    from nirvana_pl import prune

    with pytest.raises(SaliencyError, match="not available in one-shot prune"):
        prune(tiny_llama(), 0.3, saliency="fisher_functional", calibration=[torch.randint(0, 64, (2, 8))])


def test_the_default_compensates_the_kept_columns_before_the_cut(tmp_path, monkeypatch):
    """The default event fits the column updates on its batches and applies them before the surgery; the same fit
    with compensate=False cuts the same units and differs only in o_proj / down_proj."""
    import nirvana_pl.callback as callback_module

    cut_from = {}
    real_apply = callback_module.apply_plan

    def spy_apply(model, plan, optimizers=()):
        cut_from["down"] = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        return real_apply(model, plan, optimizers)

    monkeypatch.setattr(callback_module, "apply_plan", spy_apply)
    runs = {}
    for compensate in (None, False):
        cb = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, gamma=2.0, num_calibration_batches=2,
                                    compensate=compensate)  # fmt: skip
        module = CausalLM()
        torch.manual_seed(0)
        trainer(tmp_path / str(compensate), 4, [cb]).fit(module, token_loader())
        runs[compensate] = (cb, module, cut_from.pop("down"))
    (on, on_module, on_cut), (off, off_module, off_cut) = runs[None], runs[False]
    assert on.compensate and not off.compensate
    summary = on.plans[0].score_summary["compensation"]
    assert summary["weights"] >= 4 and summary["damping"] == 1.0 and "compensation" not in off.plans[0].score_summary
    assert on.plans[0].fingerprint() == off.plans[0].fingerprint()
    kept = on.plans[0].layers[0].kept_mlp_channels
    removed = sorted(set(range(on_cut.shape[1])) - set(kept))
    assert removed and torch.equal(on_cut[:, removed], off_cut[:, removed])  # only the kept columns move
    assert not torch.allclose(on_cut[:, kept], off_cut[:, kept])
    for (name, a), (_, b) in zip(on_module.named_parameters(), off_module.named_parameters()):
        assert a.shape == b.shape
        assert torch.equal(a, b) or name.endswith(("down_proj.weight", "o_proj.weight")), name


def test_compensation_arguments_are_checked_when_the_callback_is_built():
    from nirvana_pl.compensation import CompensationError

    with pytest.raises(CompensationError, match="compensation_damping=-1 must be a number >= 0.01"):
        NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, compensation_damping=-1)
    with pytest.raises(ValueError, match="compensate=True needs calibration batches"):
        NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=0, saliency="magnitude", compensate=True)
    # an Adam-state saliency collects the warm-up batches for the fit when asked to compensate; by default it
    # prunes as the paper does
    assert NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="adam_fisher",
                                  compensate=True)._collects_batches  # fmt: skip
    assert not NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="adam_fisher").compensate
