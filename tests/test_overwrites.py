"""Overwrites: `nirvana-pl prune --out` refuses a non-empty folder unless --overwrite and never writes into or
around its input model; `save_pruned` replaces an earlier folder whole (no stale shards, remote code or adapter)
and refuses folders that are not saved models."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import calib_batches, tiny_llama  # noqa: E402
from nirvana_pl import cli  # noqa: E402
from nirvana_pl.export import load_pruned, save_pruned  # noqa: E402
from nirvana_pl.oneshot import prune  # noqa: E402
from nirvana_pl.surgery import layer_widths  # noqa: E402

DATA = ["--data.seq_len", "32", "--data.val_windows", "4", "--data.eval_batch_size", "4"]


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _no_temporaries(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if p.name.endswith((".saving", ".old"))]
    assert not left, left


def _prune_args(model: Path, out: Path, sparsity: str = "0.4") -> list[str]:
    return ["prune", "--model", str(model), "--tokenizer", "bytes", "--sparsity", sparsity,
            "--calibration_windows", "4", "--calibration_batch_size", "2", "--out", str(out), *DATA]


@pytest.fixture
def no_loading(monkeypatch):
    """Refusals must come before any work: loading a model or tokenizer fails the test."""
    import nirvana_pl.modules as modules

    def fail(*args, **kwargs):
        raise AssertionError("prune loaded something before refusing its --out")

    monkeypatch.setattr(modules, "load_model", fail)
    monkeypatch.setattr(modules, "load_tokenizer", fail)


def _refused(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.run_command(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------ nirvana-pl prune --out
def test_prune_twice_into_one_out_needs_overwrite_and_leaves_no_stale_files(
    byte_model_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    cli.run_command(_prune_args(byte_model_dir, out, "0.4"))
    capsys.readouterr()
    first = _files(out)
    assert "nirvana_allocation.png" in first
    (out / "pruned_model" / "model-00002-of-00002.safetensors").write_bytes(b"stale shard of an earlier run")
    (out / "notes.txt").write_text("the user's own notes")
    before = _files(out)

    with monkeypatch.context() as m:  # refused before loading anything, and nothing in OUT changed
        import nirvana_pl.modules as modules

        m.setattr(modules, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing --out"))
        err = _refused(_prune_args(byte_model_dir, out, "0.2"), capsys)
    assert f"out={str(out)!r}" in err and "not empty" in err and "--overwrite" in err
    assert _files(out) == before

    # With --overwrite: the new result replaces the old one; this run draws no plot, so no old plot may remain.
    monkeypatch.setattr("nirvana_pl.plots.matplotlib_available", lambda: False)
    result = cli.run_command([*_prune_args(byte_model_dir, out, "0.2"), "--overwrite", "true"])
    capsys.readouterr()
    assert 0.15 < result["realised_sparsity"] < 0.25
    after = _files(out)
    assert not (out / "nirvana_allocation.png").exists()
    assert "nirvana_allocation.png" not in (out / "nirvana_prune_report.md").read_text()
    assert not (out / "pruned_model" / "model-00002-of-00002.safetensors").exists()
    assert (out / "notes.txt").read_text() == "the user's own notes"  # not a prune output: left alone
    assert set(after) == (set(first) - {"nirvana_allocation.png"}) | {"notes.txt"}
    assert after["plan.json"] != first["plan.json"] and after["run_summary.json"] != first["run_summary.json"]
    model = load_pruned(out / "pruned_model")
    assert sum(p.numel() for p in model.parameters()) == result["params_pruned"]
    _no_temporaries(out)


def test_prune_into_a_non_empty_folder_is_refused_before_loading(byte_model_dir, tmp_path, capsys, no_loading):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("1,2,3")
    err = _refused(_prune_args(byte_model_dir, out), capsys)
    assert f"out={str(out)!r}" in err and "data.csv" in err and "--overwrite" in err

    (out / "file").write_text("x")  # --out naming a file
    err = _refused(_prune_args(byte_model_dir, out / "file"), capsys)
    assert "is a file" in err

    # --overwrite replaces a prune result, never a user's folder sitting where the pruned model goes
    (out / "pruned_model").mkdir()
    (out / "pruned_model" / "thesis.tex").write_text("months of work")
    err = _refused([*_prune_args(byte_model_dir, out), "--overwrite", "true"], capsys)
    assert "pruned_model" in err and "no config.json" in err
    assert (out / "pruned_model" / "thesis.tex").read_text() == "months of work"


@pytest.mark.parametrize("where", ["same", "holds", "inside"])
def test_prune_never_writes_into_or_around_its_input_model(tmp_path, byte_model_dir, capsys, no_loading, where):
    out = tmp_path / "out"
    model_dir = out / "pruned_model"  # `--model OUT/pruned_model --out OUT`: a re-prune of an earlier result
    model_dir.parent.mkdir()
    byte_model_dir.rename(model_dir)
    target = {"same": model_dir, "holds": out, "inside": model_dir / "again"}[where]
    before = _files(out)
    for extra in ([], ["--overwrite", "true"]):
        err = _refused(_prune_args(model_dir, target) + extra, capsys)
        assert f"out={str(target)!r}" in err and f"model={str(model_dir)!r}" in err and "even with --overwrite" in err
    assert _files(out) == before
    assert not (model_dir / "again").exists()


def test_prune_refuses_out_holding_its_tokenizer_folder(tmp_path, byte_model_dir, capsys, no_loading):
    tok_dir = tmp_path / "out" / "tok"
    tok_dir.mkdir(parents=True)
    (tok_dir / "tokenizer_config.json").write_text("{}")
    args = _prune_args(byte_model_dir, tmp_path / "out")
    args[args.index("--tokenizer") + 1] = str(tok_dir)
    err = _refused([*args, "--overwrite", "true"], capsys)
    assert f"tokenizer={str(tok_dir)!r}" in err


# ------------------------------------------------------------------------------------ save_pruned
def _logits(model) -> torch.Tensor:
    ids = calib_batches(n=1, batch=2, seq=9, seed=3)[0]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_save_pruned_over_a_larger_sharded_nirvana_folder_leaves_nothing_stale(tmp_path):
    big = tiny_llama()
    prune(big, 0.1, "magnitude", gamma=3.0)  # layers differ: the nirvana format, with modeling_nirvana.py
    assert len({tuple(sorted(w.items())) for w in layer_widths(big)}) > 1
    folder = save_pruned(big, tmp_path / "model", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file() and (folder / "modeling_nirvana.py").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2

    small = tiny_llama(seed=1)
    prune(small, 0.2, "magnitude", uniform=True, gamma=3.0)  # uniform and valid for LlamaConfig: a stock folder
    assert save_pruned(small, tmp_path / "model") == tmp_path / "model"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    torch.testing.assert_close(_logits(load_pruned(folder).eval()), _logits(small.eval()), atol=1e-5, rtol=0)
    _no_temporaries(tmp_path)


def test_save_pruned_over_a_folder_with_an_adapter_drops_it(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    prune(model, 0.4, "magnitude", gamma=3.0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    folder = save_pruned(lora, tmp_path / "model", adapters="separate")
    assert (folder / "adapter").is_dir()
    adapter_config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(folder)
    save_pruned(lora, folder, adapters="merge")
    assert not (folder / "adapter").exists()
    _no_temporaries(tmp_path)


def test_save_pruned_refuses_folders_that_are_not_saved_models(tmp_path):
    model = tiny_llama()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes\.txt.*no config\.json.*new or empty folder"):
        save_pruned(model, mine)
    assert _files(mine) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}

    clone = tmp_path / "clone"  # a git clone of a model repository: saving would drop its history
    (clone / ".git").mkdir(parents=True)
    (clone / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="git repository"):
        save_pruned(model, clone)
    assert (clone / ".git").is_dir()

    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert (save_pruned(model, tmp_path / "empty") / "config.json").is_file()
    _no_temporaries(tmp_path)


def test_save_pruned_that_fails_leaves_the_earlier_folder_as_it_was(tmp_path):
    folder = save_pruned(tiny_llama(), tmp_path / "model")
    before = _files(folder)

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    other = tiny_llama(seed=1)
    prune(other, 0.4, "magnitude", gamma=3.0)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(other, folder, tokenizer=BrokenTokenizer())
    assert _files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind
