"""A fit that must not silently do nothing or lose work: one callback, pending events, interrupts, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning_helpers import CausalLM, token_loader, trainer

from nirvana_pl import NirvanaPruningCallback, load_pruned
from nirvana_pl.modules import PruneCheckpoint, SavePrunedModel
from nirvana_pl.report import REPORT_NAME
from nirvana_pl.units import find_units

DENSE = [(4, 176)] * 4


def _shapes(module) -> list[tuple[int, int]]:
    return [(u.num_kv_groups, u.mlp_width) for u in find_units(module.net)]


# ------------------------------------------------------------------------------------ one callback
def test_a_second_pruning_callback_is_refused_with_the_schedule_fix(tmp_path):
    first = NirvanaPruningCallback(sparsity=0.3, prune_at=4, warmup_steps=2)
    second = NirvanaPruningCallback(sparsity=0.5, prune_at=8, warmup_steps=2)
    with pytest.raises(
        ValueError, match=r"2 NirvanaPruningCallback instances \(prune steps \[4, 8\]\).*schedule="
    ) as err:
        trainer(tmp_path, 10, [first, second]).fit(CausalLM(), token_loader())
    assert "schedule={4: 0.3, 8: 0.5}" in str(err.value)
    assert first.plans == [] and second.plans == []


# ------------------------------------------------------------------------------------ pending events
def test_fit_bounded_by_epochs_that_ends_before_the_prune_says_so_everywhere(tmp_path):
    """max_epochs (no max_steps) with prune_at past the end: warned at the start and the end, recorded, refused."""
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=40, warmup_steps=3)
    saver = SavePrunedModel(check_reload=False)
    fit = trainer(tmp_path, -1, [cb, saver], max_epochs=2)  # 64 windows / batch 4 = 16 steps per epoch
    with pytest.warns(UserWarning) as caught:
        fit.fit(CausalLM(), token_loader())
    messages = [str(w.message) for w in caught]
    assert any("about 32 optimizer steps" in m and "step 40 will not happen" in m for m in messages), messages
    assert any("stopped at optimizer step 32 before the prune event at step 40" in m and "DENSE" in m for m in messages)
    assert any("SavePrunedModel: no prune event happened" in m for m in messages)
    assert cb.plans == [] and [e.step for e in cb.pending_events] == [40]
    report = json.loads(cb.report_path.read_text())
    assert report["events"] == [] and report["events_not_reached"] == [{"step": 40, "target_sparsity": 0.4}]
    assert "Not pruned as scheduled" in (cb.report_path.parent / "nirvana_prune_report.md").read_text()
    with pytest.raises(RuntimeError, match="nothing was pruned, the model is dense.*allow_unpruned=True"):
        cb.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cb.save_pretrained(tmp_path / "out", allow_unpruned=True)
    assert (tmp_path / "out" / "config.json").is_file()


class TwoOptimizers(CausalLM):
    """Manual optimization with two AdamW optimizers (attention and the rest): global_step grows by 2 a batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.net(input_ids=ids, labels=ids).loss
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        return loss

    def configure_optimizers(self):
        attn = [p for n, p in self.named_parameters() if "self_attn" in n]
        rest = [p for n, p in self.named_parameters() if "self_attn" not in n]
        return torch.optim.AdamW(attn, lr=self.lr), torch.optim.AdamW(rest, lr=self.lr)


@pytest.mark.parametrize("prune_at", [5, 6])
def test_manual_optimization_with_two_optimizers_prunes_at_an_odd_step_too(tmp_path, prune_at):
    seen = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(trainer.global_step)

    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=prune_at, warmup_steps=4)
    averaged = []
    accumulator = cb._adam["adam_fisher"]
    scores = accumulator.scores
    accumulator.scores = lambda: (averaged.append(accumulator.steps), scores())[1]
    module = TwoOptimizers()
    with pytest.warns(UserWarning, match="global_step went from 2 to 4 in one batch"):
        trainer(tmp_path, 12, [cb, Steps()]).fit(module, token_loader())
    assert seen[:3] == [2, 4, 6]
    assert len(cb.records) == 1 and cb.records[0].event_step == prune_at
    assert cb.records[0].at_step == 6  # the first boundary that reaches the step
    assert _shapes(module) != DENSE
    # the warm-up window (steps prune_at-3 .. prune_at, reached at 6) holds the batches ending at steps 2..6 in it
    assert averaged == [len([s for s in (2, 4, 6) if s >= prune_at - 3])]


def test_a_callback_reused_for_a_new_fit_warns_again(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=5, warmup_steps=4)
    for _ in range(2):
        with pytest.warns(UserWarning, match="global_step went from 2 to 4 in one batch"):
            trainer(tmp_path, 8, [cb]).fit(TwoOptimizers(), token_loader())
        assert len(cb.records) == 1


# ------------------------------------------------------------------------------------ output folders
def test_without_a_logger_each_run_writes_its_own_report_folder(tmp_path):
    folders = []
    for _ in range(2):
        cb = NirvanaPruningCallback(sparsity=0.4, prune_at=3, warmup_steps=2)
        trainer(tmp_path, 4, [cb], logger=False).fit(CausalLM(), token_loader())
        folders.append(cb.report_path.parent)
    assert folders[0] != folders[1]
    assert [f.relative_to(tmp_path).as_posix() for f in folders] == ["nirvana_logs/version_0", "nirvana_logs/version_1"]
    assert all((f / REPORT_NAME).is_file() for f in folders)


# ------------------------------------------------------------------------------------ nothing lost
class StopAt(pl.Callback):
    def __init__(self, step: int, exception: type[BaseException]):
        self.step, self.exception = step, exception

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise self.exception("stopped by the test")


def test_an_error_after_the_prune_still_leaves_the_pruned_model_and_a_checkpoint(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=3, warmup_steps=2)
    saver = SavePrunedModel()
    ckpt = PruneCheckpoint(save_top_k=0, save_last=True, save_on_exception=True)
    module = CausalLM()
    fit = trainer(tmp_path, 20, [cb, saver, StopAt(6, RuntimeError), ckpt], enable_checkpointing=True)
    with pytest.warns(UserWarning, match="the pruned model as it was then is saved to"):
        with pytest.raises(RuntimeError, match="stopped by the test"):
            fit.fit(module, token_loader())
    assert saver.saved_to is not None and saver.reload_max_abs_diff < 1e-4
    reloaded = load_pruned(saver.saved_to)
    assert [(u.num_kv_groups, u.mlp_width) for u in find_units(reloaded)] == _shapes(module) != DENSE
    names = sorted(p.name for p in Path(ckpt.dirpath).iterdir())
    assert "prune-step=3.ckpt" in names and "last.ckpt" in names
    # the checkpoint of the prune event resumes the pruned fit (and the prune does not run again)
    cb2 = NirvanaPruningCallback(sparsity=0.4, prune_at=3, warmup_steps=2)
    resumed = CausalLM()
    trainer(tmp_path / "resume", 8, [cb2]).fit(
        resumed, token_loader(), ckpt_path=str(Path(ckpt.dirpath) / "prune-step=3.ckpt")
    )
    assert _shapes(resumed) == _shapes(module) and len(cb2.records) == 1


def test_an_interrupt_before_the_prune_saves_no_model(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=8, warmup_steps=2)
    saver = SavePrunedModel(check_reload=False)
    with pytest.raises(RuntimeError):
        trainer(tmp_path, 20, [cb, saver, StopAt(3, RuntimeError)]).fit(CausalLM(), token_loader())
    assert saver.saved_to is None


def test_a_folder_checkpoint_is_swapped_in_whole(tmp_path):
    """DeepSpeed checkpoints are folders: last.ckpt is replaced by a complete folder or not at all."""
    from nirvana_pl.modules import swap_in_folder

    def folder(name: str, step: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "latest").write_text(f"step {step}")
        return path

    last = tmp_path / "last.ckpt"
    swap_in_folder(folder("a.partial", 8), last)
    first = last.resolve()
    assert last.is_symlink() and first.name.startswith("last.ckpt.") and (last / "latest").read_text() == "step 8"
    swap_in_folder(folder("b.partial", 10), last)  # over an existing one: the symlink is replaced atomically
    assert last.is_symlink() and (last / "latest").read_text() == "step 10"
    assert not first.exists()  # the folder it pointed to before is gone
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.endswith(".partial") or n.endswith(".link")], names
    assert len([n for n in names if n.startswith("last.ckpt.")]) == 1

    plain = tmp_path / "old.ckpt"  # a plain folder written before: replaced too
    folder("old.ckpt", 3)
    swap_in_folder(folder("c.partial", 12), plain)
    assert plain.is_symlink() and (plain / "latest").read_text() == "step 12"


def test_removing_a_swapped_in_checkpoint_removes_its_folder_and_nothing_else(tmp_path):
    from nirvana_pl.modules import swapped_folder

    def folder(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "latest").write_text(name)
        return path

    from nirvana_pl.modules import swap_in_folder

    top = tmp_path / "epoch=0-step=250.ckpt"
    swap_in_folder(folder("a.partial"), top)
    assert swapped_folder(top) is not None and swapped_folder(top).name.startswith("epoch=0-step=250.ckpt.")
    # a link that points elsewhere (e.g. last.ckpt -> a top-k checkpoint, save_last="link") is not "its" folder
    last = tmp_path / "last.ckpt"
    last.symlink_to(top.name)
    assert swapped_folder(last) is None
    swap_in_folder(folder("b.partial"), last)  # replacing that link must not delete the top-k folder
    assert (top / "latest").read_text() == "a.partial"
    assert swapped_folder(tmp_path / "missing.ckpt") is None


def test_save_pretrained_writes_on_global_rank_zero_only(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=3, warmup_steps=2)
    trainer(tmp_path, 4, [cb]).fit(CausalLM(), token_loader())
    cb._is_global_zero = False  # as on rank 1 of a DDP run
    assert cb.save_pretrained(tmp_path / "rank1") == tmp_path / "rank1" and not (tmp_path / "rank1").exists()
    cb._is_global_zero = True
    cb.save_pretrained(tmp_path / "rank0")
    assert (tmp_path / "rank0" / "config.json").is_file()


def test_manual_optimization_is_not_warned_about_by_batch_count(tmp_path, recwarn):
    """estimated_stepping_batches counts batches; with two optimizers global_step runs twice as fast."""
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=20, warmup_steps=3)
    module = TwoOptimizers()
    trainer(tmp_path, -1, [cb], max_epochs=1).fit(module, token_loader())  # 16 batches = 32 global steps
    assert len(cb.records) == 1
    assert not [w for w in recwarn if "will not happen" in str(w.message)]
