"""Distillation during recovery: the chunked KL, the teacher copy, the loss mix and the callback's distill= option."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tiny_t5
from lightning_helpers import CausalLM, Losses, token_loader, trainer

from nirvana_pl import DistillConfig, NirvanaPruningCallback
from nirvana_pl.arch import architecture_of
from nirvana_pl.distill import Distiller, chunked_kl, distill_config, make_teacher, teacher_dtype


def reference_kl(student, teacher, mask, t):
    """T^2 * mean over masked positions of KL(softmax(teacher/T) || softmax(student/T)), all at once."""
    log_q = (student.float() / t).log_softmax(-1)
    log_p = (teacher.float() / t).log_softmax(-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    w = mask.float() if mask is not None else torch.ones_like(per_position)
    return t * t * (per_position * w).sum() / w.sum()


@pytest.mark.parametrize("t, chunk", [(1.0, 3), (2.0, 64), (0.5, 1)])
def test_chunked_kl_value_and_gradient_equal_the_whole_computation(t, chunk):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    flat_teacher = teacher.reshape(-1, 11)

    value = chunked_kl(student, lambda a, b: flat_teacher[a:b], mask, t, chunk)
    (grad,) = torch.autograd.grad(value * 3.0, student)
    student_ref = student.detach().clone().requires_grad_(True)
    expected = reference_kl(student_ref, teacher, mask, t)
    (grad_ref,) = torch.autograd.grad(expected * 3.0, student_ref)

    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    assert grad[0, 3:].abs().sum() == 0  # padded positions get no gradient


def test_tokens_the_teacher_rules_out_add_nothing():
    student = torch.randn(1, 2, 5, requires_grad=True)
    teacher = torch.randn(1, 2, 5)
    teacher[..., 0] = float("-inf")
    value = chunked_kl(student, lambda a, b: teacher.reshape(-1, 5)[a:b], None)
    value.backward()
    expected = reference_kl(student.detach(), teacher.clamp_min(-1e4), None, 1.0)
    torch.testing.assert_close(value.detach(), expected)
    assert torch.isfinite(student.grad).all()


def test_chunked_kl_never_builds_the_teacher_rows_of_padding_and_is_zero_for_equal_logits():
    logits = torch.randn(1, 8, 7, requires_grad=True)
    asked = []

    def rows(a, b):
        asked.append((a, b))
        return logits.detach().reshape(-1, 7)[a:b]

    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]])
    value = chunked_kl(logits, rows, mask, 1.0, 2)
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6)
    assert asked == [(0, 2)]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"weight": 0.0}, "weight"),
        ({"weight": 1.5}, "weight"),
        ({"temperature": 0}, "temperature"),
        ({"teacher": "original"}, "teacher"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"alpha": 0.5}, "unknown key"),
    ],
)
def test_bad_distill_options_name_the_field(options, match):
    with pytest.raises(ValueError, match=match):
        distill_config(options)
    with pytest.raises(TypeError, match="distill="):
        distill_config("yes")


def test_distill_config_forms():
    assert distill_config(True) == DistillConfig()
    assert distill_config(None) is None and distill_config(False) is None
    assert distill_config({"weight": 1}).weight == 1.0


def test_teacher_is_a_frozen_hookless_copy_in_the_training_dtype():
    model = tiny_llama()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    teacher = make_teacher(model, torch.bfloat16)
    assert not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched
    for (name, b), (_, b_ref) in zip(teacher.named_buffers(), model.named_buffers()):
        assert b.dtype == b_ref.dtype, name  # rotary frequencies keep their precision
    ids = torch.randint(0, 128, (2, 6))
    teacher(input_ids=ids)
    assert calls == []  # the hook stayed on the model
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(teacher.lm_head.weight.float(), model.lm_head.weight)  # a copy, not shared storage
    assert teacher_dtype("bf16-mixed") == torch.bfloat16 and teacher_dtype("16-mixed") == torch.float16
    assert teacher_dtype("32-true") is None


def _student_and_distiller(weight=0.5, t=1.0, chunk=4):
    model = tiny_llama()
    distiller = Distiller(DistillConfig(weight=weight, temperature=t, chunk_tokens=chunk))
    distiller.attach(model, architecture_of(model).body_and_head)
    distiller.set_teacher(make_teacher(model))
    distiller.active = True
    with torch.no_grad():  # the student drifts from the teacher
        gen = torch.Generator().manual_seed(1)
        for p in model.model.layers[0].mlp.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return model, distiller


def test_hook_mixes_the_kl_into_outputs_loss():
    model, distiller = _student_and_distiller(weight=0.25, t=2.0)
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, labels=ids)  # no grad: the hook leaves it alone
        teacher_logits = distiller.teacher(input_ids=ids, attention_mask=mask).logits
    kl = reference_kl(plain.logits, teacher_logits, mask, 2.0)
    torch.testing.assert_close(out.loss.detach(), 0.75 * plain.loss + 0.25 * kl, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    metrics = distiller.pop_metrics()
    assert metrics["distill_kl"] == pytest.approx(float(kl), rel=1e-5)
    assert metrics["student_loss"] == pytest.approx(float(plain.loss), rel=1e-5)
    assert distiller.pop_metrics() == {}


def test_forwards_outside_training_steps_and_calls_without_labels_are_not_mixed():
    model, distiller = _student_and_distiller()
    ids = torch.randint(0, 128, (2, 9))
    distiller.active = False  # e.g. a validation batch, or the callback's own scoring
    plain = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        assert float(plain) == pytest.approx(float(model(input_ids=ids, labels=ids).loss))
    assert distiller.pop_metrics() == {}
    distiller.active = True
    model.eval()  # a training step of a model left in eval mode (from_pretrained does that) is distilled
    assert float(model(input_ids=ids, labels=ids).loss) != pytest.approx(float(plain))
    out = model(input_ids=ids)
    assert out.loss is None and distiller.unmixed_forwards == 1
    own = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    mixed = distiller.mix(own, out)
    assert float(mixed.detach()) != pytest.approx(float(own.detach()))
    with pytest.raises(ValueError, match="outputs must be"):
        distiller.mix(own, out)  # the term of one forward is used once


def test_t5_teacher_runs_whole_with_decoder_inputs_from_the_labels():
    model = tiny_t5()
    distiller = Distiller(DistillConfig(weight=1.0))
    distiller.attach(model, architecture_of(model).body_and_head)
    distiller.set_teacher(make_teacher(model))
    distiller.active = True
    ids, labels = torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (2, 5))
    labels[1, 3:] = -100
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert float(out.loss) == pytest.approx(0.0, abs=1e-5)  # the teacher is the student itself: KL 0
    with torch.no_grad():
        for p in model.decoder.block[0].parameters():
            p.mul_(0.5)
    out = model(input_ids=ids, labels=labels)
    with torch.no_grad():
        t_logits = distiller.teacher(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(out.loss.detach(), reference_kl(out.logits.detach(), t_logits, labels != -100, 1.0))


# ------------------------------------------------------------------------------------------------ the callback
class OwnLossLM(CausalLM):
    """A module that computes its own loss from the logits and hands it to the callback."""

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        out = self.net(input_ids=ids)
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
        cb = next(c for c in self.trainer.callbacks if isinstance(c, NirvanaPruningCallback))
        loss = cb.distilled_loss(loss, out) if self.use_callback else loss
        self.log("train_loss", loss)
        return loss


def _fit(tmp_path, module, cb, steps=8, **kw):
    losses = Losses()
    t = trainer(tmp_path, steps, [cb, losses], **kw)
    t.fit(module, token_loader())
    return t, losses


@pytest.mark.parametrize("eval_mode", [False, True])
def test_fit_distills_after_the_prune_logs_and_reports(tmp_path, eval_mode):
    module = CausalLM()
    if eval_mode:  # a model from from_pretrained is in eval mode, and Lightning leaves submodules as they are
        module.net.eval()
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=4, warmup_steps=2, distill={"weight": 0.5})
    t, losses = _fit(tmp_path, module, cb)
    teacher = cb._distiller.teacher
    assert teacher is not None and teacher.model.layers[0].mlp.up_proj.weight.shape[0] == 176  # dense
    assert module.net.model.layers[0].mlp.up_proj.weight.shape[0] < 176 or any(
        layer.mlp.up_proj.weight.shape[0] < 176 for layer in module.net.model.layers
    )
    metrics = t.logged_metrics
    for name in ("nirvana/distill_kl", "nirvana/student_loss", "nirvana/distill_loss"):
        assert name in metrics, name
    # what the module returned is the mixed loss
    assert losses.losses[-1] == pytest.approx(float(metrics["nirvana/distill_loss"]), rel=1e-5)
    mixed = 0.5 * metrics["nirvana/student_loss"] + 0.5 * metrics["nirvana/distill_kl"]
    assert float(metrics["nirvana/distill_loss"]) == pytest.approx(float(mixed), rel=1e-5)
    assert cb.records[0].distill == DistillConfig(weight=0.5).to_dict()
    report = cb.report_path.read_text()
    assert '"recovery_distill"' in report
    assert "distilled from the dense model" in cb.report_path.with_suffix(".md").read_text()


def test_a_module_with_its_own_loss_distils_through_distilled_loss_and_is_warned_without_it(tmp_path):
    module = OwnLossLM()
    module.use_callback = True
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=4, warmup_steps=2, saliency="adam_fisher", distill=True)
    t, _ = _fit(tmp_path / "a", module, cb)
    assert "nirvana/distill_loss" in t.logged_metrics and cb._distiller.mixed_by_call > 0

    module = OwnLossLM()
    module.use_callback = False
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=4, warmup_steps=2, saliency="adam_fisher", distill=True)
    with pytest.warns(UserWarning, match="distilled_loss"):
        _fit(tmp_path / "b", module, cb)


def test_resume_while_distilling_restores_the_teacher_and_the_same_losses(tmp_path):
    def run(path, steps, ckpt=None, save=False):
        module = CausalLM()
        cb = NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, distill={"weight": 0.7, "temperature": 2})
        every5 = pl.callbacks.ModelCheckpoint(dirpath=path / "ckpt", every_n_train_steps=5, save_top_k=-1)
        extra = [every5] if save else []
        losses = Losses()
        t = trainer(path, steps, [cb, losses, *extra], enable_checkpointing=save)
        t.fit(module, token_loader(n=20), ckpt_path=ckpt)  # 5 batches an epoch: the checkpoint ends epoch 0
        return cb, losses.losses

    full_cb, full = run(tmp_path / "full", 9, save=True)
    ckpt = next((tmp_path / "full" / "ckpt").glob("*step=5*.ckpt"))
    resumed_cb, tail = run(tmp_path / "resumed", 9, ckpt=str(ckpt))
    assert resumed_cb._distiller.teacher is not None
    assert tail == full[5:]  # bit-exact: the same teacher, the same mixed loss
    for (name, a), (_, b) in zip(full_cb._distiller.teacher.state_dict().items(),
                                 resumed_cb._distiller.teacher.state_dict().items()):  # fmt: skip
        assert torch.equal(a, b), name


def test_previous_teacher_follows_each_event_of_a_schedule(tmp_path):
    module = CausalLM()
    cb = NirvanaPruningCallback(schedule={3: 0.2, 6: 0.4}, warmup_steps=2, distill={"teacher": "previous"})
    _fit(tmp_path, module, cb, steps=8)
    kept_first = cb.records[0].plan.mlp_widths_kept()
    teacher_widths = [layer.mlp.up_proj.weight.shape[0] for layer in cb._distiller.teacher.model.layers]
    assert teacher_widths == kept_first  # the model before the second cut


def test_dense_teacher_stays_the_model_before_the_first_cut(tmp_path):
    module = CausalLM()
    dense = copy.deepcopy(module.net)
    cb = NirvanaPruningCallback(schedule={3: 0.2, 6: 0.4}, warmup_steps=2, distill=True, saliency="adam_fisher")
    _fit(tmp_path, module, cb, steps=8)
    widths = [layer.mlp.up_proj.weight.shape[0] for layer in cb._distiller.teacher.model.layers]
    assert widths == [layer.mlp.up_proj.weight.shape[0] for layer in dense.model.layers]


def test_distillation_composes_with_lora_recovery(tmp_path):
    module = CausalLM()
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, distill=True,
                                recovery={"r": 4, "lora_alpha": 8})  # fmt: skip
    t, losses = _fit(tmp_path, module, cb, steps=7)
    teacher = cb._distiller.teacher
    assert not any("lora_" in name for name, _ in teacher.named_parameters())  # taken before the adapters
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert t.logged_metrics["nirvana/distill_kl"] > 0 and all(math.isfinite(x) for x in losses.losses)


def test_resume_rebuilds_a_previous_teacher_with_the_earlier_cuts(tmp_path):
    """teacher='previous' after the second event of a schedule: the teacher has the first cut's shapes."""

    def run(path, ckpt=None):
        cb = NirvanaPruningCallback(schedule={3: 0.2, 6: 0.4}, warmup_steps=2, saliency="adam_fisher",
                                    distill={"teacher": "previous"})  # fmt: skip
        every5 = pl.callbacks.ModelCheckpoint(dirpath=path / "ckpt", every_n_train_steps=5, save_top_k=-1)
        losses = Losses()
        t = trainer(path, 12, [cb, losses, every5], enable_checkpointing=True)
        t.fit(CausalLM(), token_loader(n=20), ckpt_path=ckpt)
        return cb, losses.losses

    full_cb, full = run(tmp_path / "full")
    resumed_cb, tail = run(tmp_path / "resumed", str(next((tmp_path / "full" / "ckpt").glob("*step=10*.ckpt"))))
    assert tail == full[10:]
    teacher = resumed_cb._distiller.teacher
    assert [layer.mlp.up_proj.weight.shape[0] for layer in teacher.model.layers] == \
        full_cb.records[0].plan.mlp_widths_kept()  # fmt: skip
    for (name, a), (_, b) in zip(full_cb._distiller.teacher.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), name
