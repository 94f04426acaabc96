"""Resuming a fit from a mid-epoch checkpoint continues the data where it stopped (bit-exact).

An uninterrupted fit (two epochs of 10 batches, a prune after the resume points) is compared with
fits resumed, by a fresh Trainer + module + datamodule, from its mid-epoch and epoch-end
checkpoints: the batches trained after the resume, the pruning plan and the final weights must be
the same.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from nirvana_pl.callback import NirvanaPruningCallback
from nirvana_pl.datamodule import EpochShuffleSampler, ResumableDataLoader, TextDataModule, WindowDataset
from nirvana_pl.modules import CausalLMModule

CONFIG = dict(
    model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
)
BATCHES_PER_EPOCH = 10  # 40 training windows, batch_size 4, drop_last
PRUNE_AT, WARMUP = 9, 5  # the saliency window (steps 4..9) straddles the resume at step 6


class RecordBatches(Callback):
    """Every training batch, keyed by (optimizer step, epoch, batch_idx)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, trainer.current_epoch, batch_idx, batch["input_ids"].clone()))


def _fit(root, max_steps: int, accumulate: int = 1, num_workers: int = 0, ckpt_path: str | None = None,
         save_every: int | None = None, prune_at: int = PRUNE_AT, warmup: int = WARMUP):
    module = CausalLMModule(config=dict(CONFIG), tokenizer="bytes", lr=3e-3, warmup_steps=2)
    data = TextDataModule(source="embedded:pydoc", tokenizer="bytes", seq_len=32, batch_size=4, val_windows=8,
                          max_train_windows=4 * BATCHES_PER_EPOCH, num_workers=num_workers)
    nirvana = NirvanaPruningCallback(sparsity=0.3, prune_at=prune_at, warmup_steps=warmup, saliency="adam_taylor")
    recorder = RecordBatches()
    callbacks = [recorder, nirvana]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=save_every, save_top_k=-1,
                                         filename="{step}"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        enable_checkpointing=bool(save_every), default_root_dir=root,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, nirvana, recorder


def _assert_same_continuation(full, resumed, resume_step: int) -> None:
    full_module, full_cb, full_rec = full
    module, cb, rec = resumed
    expected = [r for r in full_rec.seen if r[0] >= resume_step]
    assert [r[:3] for r in rec.seen] == [r[:3] for r in expected], "the resumed fit trained other batch positions"
    for got, want in zip(rec.seen, expected):
        assert torch.equal(got[3], want[3]), f"batch at step {got[0]} (epoch {got[1]}, batch_idx {got[2]}) differs"
    assert cb.plans and cb.plans[-1].fingerprint() == full_cb.plans[-1].fingerprint()
    full_params = dict(full_module.named_parameters())
    params = dict(module.named_parameters())
    assert params.keys() == full_params.keys()
    for name, p in params.items():
        assert torch.equal(p, full_params[name]), f"{name} differs after the resumed fit"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return root, _fit(root, max_steps=16, save_every=2)


# step 6: mid-epoch 0 (before the prune); 10: the end of epoch 0; 12: mid-epoch 1 (after the prune).
@pytest.mark.parametrize(("resume_step", "position"), [(6, (0, 6)), (10, (0, 10)), (12, (1, 2))])
def test_resume_is_bit_exact(uninterrupted, tmp_path, resume_step, position):
    root, full = uninterrupted
    # the uninterrupted run crosses the epoch boundary and visits every batch position of epoch 0 once
    assert [(r[1], r[2]) for r in full[2].seen[:12]] == [(0, i) for i in range(10)] + [(1, 0), (1, 1)]
    ckpt = root / "ckpt" / f"step={resume_step}.ckpt"
    saved = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    # the position is (epoch, batches trained in it); the checkpoint at step 10 closes epoch 0
    assert saved == [{"epoch": position[0], "batches": position[1]}]
    resumed = _fit(tmp_path, max_steps=16, ckpt_path=str(ckpt))
    _assert_same_continuation(full, resumed, resume_step)


def test_resume_with_gradient_accumulation_counts_batches(tmp_path):
    # accumulate 2: 5 optimizer steps per epoch; the checkpoint at step 3 is after batch 6 of epoch 0
    kwargs = dict(max_steps=8, accumulate=2, prune_at=5, warmup=3)
    full = _fit(tmp_path / "full", save_every=3, **kwargs)
    resumed = _fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "full/ckpt/step=3.ckpt"), **kwargs)
    _assert_same_continuation(full, resumed, 3)


def test_resume_with_a_worker_process(tmp_path):
    # mid-epoch 1: the worker starts reading ahead only after Lightning has set the resumed epoch
    kwargs = dict(max_steps=14, num_workers=1, prune_at=13, warmup=3)
    full = _fit(tmp_path / "full", save_every=4, **kwargs)
    resumed = _fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "full/ckpt/step=12.ckpt"), **kwargs)
    _assert_same_continuation(full, resumed, 12)


# ---------------------------------------------------------------- the sampler and the loader alone
def _windows(n: int = 12) -> WindowDataset:
    return WindowDataset(torch.arange(n * 2).reshape(n, 2))


def test_epoch_order_follows_from_seed_and_epoch_alone():
    a, b = EpochShuffleSampler(12, seed=3), EpochShuffleSampler(12, seed=3)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert sorted(first) == sorted(second) == list(range(12)) and first != second
    b.set_epoch(1)  # a fresh sampler at epoch 1 does not need epoch 0 to have been drawn
    assert list(b) == second
    assert list(EpochShuffleSampler(12, seed=4)) != first


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resumes_at_the_saved_batch_of_the_same_epoch_only(num_workers):
    def loader():
        return ResumableDataLoader(_windows(), batch_size=2, sampler=EpochShuffleSampler(12, seed=0), drop_last=True,
                                   num_workers=num_workers)

    full = loader()
    epoch0 = [b["input_ids"] for b in full]
    it = iter(full)
    for _ in range(4):
        next(it)
    state = full.state_dict()
    assert state == {"epoch": 0, "batches": 4}

    fresh = loader()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state  # loaded, not yet iterated: still the position to resume from
    rest = [b["input_ids"] for b in fresh]
    assert len(rest) == 2 and all(torch.equal(x, y) for x, y in zip(rest, epoch0[4:]))
    assert fresh.state_dict() == {"epoch": 0, "batches": 6}
    assert len([b for b in fresh]) == 6  # the loaded position is used once

    later = loader()
    later.load_state_dict(state)
    later.sampler.set_epoch(1)  # a state from epoch 0 says nothing about epoch 1
    assert len(list(later)) == 6


def test_loader_rejects_a_foreign_state():
    with pytest.raises(ValueError, match="batches"):
        ResumableDataLoader(_windows(), batch_size=2).load_state_dict({"sampler_iter_yielded": 3})
