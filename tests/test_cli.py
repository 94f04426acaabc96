"""The `nirvana-pl` command line: a tiny recipe end to end, prune/eval, readable config errors,
and a user's own LightningCLI with `--config callbacks/nirvana.yaml`."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning_helpers import CausalLM, token_loader
from processes import run_killable

import nirvana_pl
from nirvana_pl import cli
from nirvana_pl.allocate import DEFAULT_GAMMA
from nirvana_pl.callback import NirvanaPruningCallback
from nirvana_pl.modules import SavePrunedModel

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_llama_pydoc.yaml")


def _small_tiny_args(tmp_path: Path) -> list[str]:
    """tiny_llama_pydoc.yaml cut to a few steps (prune at 4, warm-up 2) writing under tmp_path."""
    return [
        "--config", TINY,
        "--trainer.max_steps", "6",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
        "--data.init_args.val_windows", "8",
        "--data.init_args.batch_size", "4",
        "--model.init_args.config.num_hidden_layers", "2",
        "--trainer.callbacks.init_args.prune_at", "4",
        "--trainer.callbacks.init_args.warmup_steps", "2",
    ]


def test_fit_tiny_recipe_end_to_end_in_a_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # the tiny recipe with the main job's HeldOutPerplexity(dense_control=true, other_text={pysrc: ...})
    recipe = tmp_path / "tiny_with_dense_control.yaml"
    text = Path(TINY).read_text()
    entry = "    - class_path: nirvana_pl.modules.HeldOutPerplexity\n"
    held_out = "      init_args:\n        dense_control: true\n        other_text: {pysrc: embedded:pysrc}\n"
    assert text.count(entry) == 1 and held_out in (ROOT / "recipes" / "smollm2_pydoc.yaml").read_text()
    recipe.write_text(text.replace(entry, entry + held_out))
    args = _small_tiny_args(tmp_path)
    args[args.index(TINY)] = str(recipe)
    proc = run_killable([sys.executable, "-m", "nirvana_pl.cli", "fit", *args], 300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "=== nirvana-pl fit: done" in out
    for label in ("held-out ppl", "dense control", "held-out pysrc", "pruned model", "prune report",
                  "allocation plot", "metrics", "run summary"):  # fmt: skip
        assert label in out, out

    log_dir = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((log_dir / "run_summary.json").read_text())
    assert 0.45 < summary["realised_sparsity"] < 0.55
    ppl = summary["perplexity"]
    assert all(ppl[k] > 1 for k in ("dense", "just_pruned", "recovered", "dense_control"))
    # the recipe's dense control: the dense model at the prune (step 4), trained the 2 steps after it
    assert "trained the same 2 steps" in out and ppl["dense_control"] != ppl["dense"]
    other = summary["perplexity_other_text"]["pysrc"]
    assert all(other[k] > 1 for k in ("dense", "final", "dense_control")) and len(other["after_prune"]) == 1
    assert other["dense"] != ppl["dense"]
    line = next(ln for ln in out.splitlines() if ln.startswith("held-out pysrc"))
    assert f"dense {other['dense']:.3f} | just pruned {other['after_prune'][0]:.3f} | recovered" in line
    assert line.endswith("(8 windows, never trained on)")  # as many as --data.init_args.val_windows
    if ppl["gap_closed"] is not None:
        assert ppl["gap_closed"] == pytest.approx(
            math.log(ppl["just_pruned"] / ppl["recovered"]) / math.log(ppl["just_pruned"] / ppl["dense_control"]))

    report = json.loads((log_dir / "nirvana_prune_report.json").read_text())
    assert [e["step"] for e in report["events"]] == [4]
    assert (log_dir / "nirvana_allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (log_dir / "nirvana_prune_report.md").read_text()
    assert "held-out perplexity" in md and "**total**" in md

    model = nirvana_pl.load_pruned(log_dir / "pruned_model")
    kept = report["events"][0]["kept_mlp_width_per_layer"]
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == kept

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        # The Trainer's default logger without TensorBoard: CSV.
        with (log_dir / "metrics.csv").open() as fh:
            columns = set(next(csv.reader(fh)))
        assert {"nirvana/realised_sparsity", "heldout/ppl_dense", "heldout/ppl_final", "train/loss"} <= columns


def test_overview_help(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("fit", "validate", "test", "prune", "eval", "callbacks/nirvana.yaml"):
        assert command in text


def test_fit_help_lists_module_and_callback_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.run_command(["fit", "--config", TINY, "--model.help", "CausalLMModule"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--model.name_or_path" in text and "embedded:smollm2" in text and "--model.lora" in text


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prnue"])
    assert exc.value.code == 2
    assert "unknown command 'prnue'" in capsys.readouterr().err


def _error_of(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.run_command(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_misspelt_key_in_a_config_file_is_named_with_what_is_accepted(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text().replace("prune_at: 150", "prune_att: 150"))
    err = _error_of(["fit", "--config", str(bad)], capsys)
    assert "NirvanaPruningCallback" in err and "'prune_att' is not accepted" in err
    assert "did you mean 'prune_at'" in err and "accepts: sparsity, prune_at" in err


def test_misspelt_trainer_option_suggests_the_right_one(capsys):
    err = _error_of(["fit", "--config", TINY, "--trainer.max_step", "3"], capsys)
    assert "trainer.max_step" in err and "did you mean 'trainer.max_steps'" in err


def test_wrong_type_names_the_key(capsys):
    err = _error_of(["fit", "--config", TINY, "--trainer.max_steps", "many"], capsys)
    assert 'trainer.max_steps' in err and "int" in err


def test_rejected_value_names_the_config_key_and_the_choices(capsys, tmp_path):
    err = _error_of(
        ["fit", *_small_tiny_args(tmp_path), "--trainer.callbacks.init_args.saliency", "adam_taylr"], capsys
    )
    # index 3: after PruneCheckpoint, HeldOutPerplexity, SavePrunedModel
    assert "trainer.callbacks[3] (NirvanaPruningCallback)" in err
    assert "saliency='adam_taylr'" in err and "adam_taylor" in err and "functional" in err

    err = _error_of(["fit", *_small_tiny_args(tmp_path), "--model.init_args.dtype", "fp64"], capsys)
    assert "model (CausalLMModule)" in err and "dtype='fp64'" in err and "float32" in err

    err = _error_of(["fit", *_small_tiny_args(tmp_path), "--data.init_args.source", "missing.txt"], capsys)
    assert "data (TextDataModule)" in err and "missing.txt" in err


# ------------------------------------------------------------------------------------ prune / eval
def test_prune_then_eval_commands(byte_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    data = ["--data.seq_len", "32", "--data.val_windows", "4", "--data.eval_batch_size", "4"]
    result = cli.run_command([
        "prune", "--model", str(byte_model_dir), "--tokenizer", "bytes", "--sparsity", "0.4",
        "--calibration_windows", "4", "--calibration_batch_size", "2", "--out", str(out), *data,
    ])
    printed = capsys.readouterr().out
    assert "=== nirvana-pl prune: done" in printed and "KV groups kept" in printed
    assert 0.35 < result["realised_sparsity"] < 0.45
    for name in ("plan.json", "nirvana_prune_report.json", "nirvana_prune_report.md", "nirvana_allocation.png",
                 "run_summary.json"):
        assert (out / name).is_file(), name
    plan = nirvana_pl.PruningPlan.load(out / "plan.json")
    assert plan.gamma == DEFAULT_GAMMA == 3.0  # no --gamma: the callback's and prune()'s gamma
    model = nirvana_pl.load_pruned(out / "pruned_model")
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == plan.mlp_widths_kept()

    evaluated = cli.run_command(["eval", "--model", str(out / "pruned_model"), "--tokenizer", "bytes", *data])
    # The same data options give the same held-out windows as the prune command's "after" number.
    assert evaluated["perplexity"] == pytest.approx(result["perplexity"]["just_pruned"], rel=1e-5)
    assert evaluated["windows"] == 4


def test_prune_rejects_bad_values_readably(byte_model_dir, capsys):
    with pytest.raises(SystemExit):
        cli.run_command(["prune", "--model", str(byte_model_dir), "--saliency", "adam_taylor"])
    err = capsys.readouterr().err
    assert "saliency" in err and "functional" in err
    with pytest.raises(SystemExit):
        cli.run_command(["prune", "--model", str(byte_model_dir), "--tokenizer", "bytes", "--sparsity", "1.5",
                         "--data.seq_len", "32"])
    assert "sparsity=1.5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ user's own LightningCLI
class UserTokens(pl.LightningDataModule):
    """A user's datamodule: token batches as 1-tuples (what tests/lightning_helpers.CausalLM takes)."""

    def __init__(self, n: int = 64, seq: int = 16, batch_size: int = 4):
        super().__init__()
        self.n, self.seq, self.batch_size = n, seq, batch_size

    def train_dataloader(self):
        return token_loader(self.n, self.seq, self.batch_size)


def test_users_lightning_cli_with_the_drop_in_callback_config(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["user_cli.py"])
    user_config = tmp_path / "user.yaml"
    user_config.write_text(
        "trainer:\n"
        "  max_steps: 6\n"
        "  accelerator: cpu\n"
        "  devices: 1\n"
        "  enable_progress_bar: false\n"
        "  enable_checkpointing: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  logger:\n"
        "    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args: {{save_dir: {tmp_path}}}\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
        "model:\n"
        "  lr: 0.003\n"
    )
    run = LightningCLI(
        CausalLM, UserTokens, args=[
            "fit", "--config", str(user_config), "--config", str(ROOT / "callbacks" / "nirvana.yaml"),
            "--trainer.callbacks.init_args.prune_at", "4", "--trainer.callbacks.init_args.warmup_steps", "2",
            "--trainer.callbacks.init_args.sparsity", "0.5",
            "--trainer.callbacks.init_args.distill", "{weight: 0.5}",  # the drop-in's commented option, switched on
        ],
    )
    names = [type(cb).__name__ for cb in run.trainer.callbacks]
    assert "LearningRateMonitor" in names  # the user's callbacks are kept, the drop-in is appended
    nirvana = next(cb for cb in run.trainer.callbacks if isinstance(cb, NirvanaPruningCallback))
    assert len(nirvana.plans) == 1 and nirvana.plans[0].realised_sparsity == pytest.approx(0.5, abs=0.05)
    assert sum(layer.mlp.gate_proj.out_features for layer in run.model.net.model.layers) < 4 * 176
    saver = next(cb for cb in run.trainer.callbacks if isinstance(cb, SavePrunedModel))
    assert saver.saved_to is not None and nirvana_pl.load_pruned(saver.saved_to) is not None
    assert nirvana.report_path is not None and nirvana.report_path.with_suffix(".md").is_file()
    assert nirvana.records[0].distill["weight"] == 0.5 and "nirvana/distill_kl" in run.trainer.logged_metrics


def test_users_lightning_cli_reads_the_kl_callback_config_as_it_is(tmp_path):
    # A fresh process: nothing of nirvana_pl.cli has run, only the user's own LightningCLI.
    script = tmp_path / "user_cli.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import lightning.pytorch as pl\n"
        "from lightning.pytorch.cli import LightningCLI\n"
        "from lightning_helpers import CausalLM, token_loader\n"
        "class Tokens(pl.LightningDataModule):\n"
        "    def train_dataloader(self):\n"
        "        return token_loader()\n"
        "cli = LightningCLI(CausalLM, Tokens, run=False)\n"
        "from nirvana_pl import NirvanaPruningCallback\n"
        "cb = next(c for c in cli.trainer.callbacks if isinstance(c, NirvanaPruningCallback))\n"
        "print('SELECTOR', type(cb).__name__, type(cb.selector).__name__, cb.gamma)\n"
    )
    config = ROOT / "callbacks" / "nirvana_functional_kl.yaml"
    out = run_killable(
        [sys.executable, str(script), "--config", str(config), "--trainer.accelerator", "cpu",
         "--trainer.default_root_dir", str(tmp_path)], 600, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SELECTOR NirvanaPruningCallback TextCalibrationSelector auto" in out.stdout


def test_prune_command_prunes_experts_of_a_mixture_of_experts_folder(tmp_path, capsys):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(tmp_path / "dense")
    out = tmp_path / "pruned"
    data = ["--data.seq_len", "32", "--data.val_windows", "4", "--data.eval_batch_size", "4"]
    result = cli.run_command([
        "prune", "--model", str(tmp_path / "dense"), "--tokenizer", "bytes", "--sparsity", "0.4", "--expert_share",
        "1.0", "--calibration_windows", "4", "--calibration_batch_size", "2", "--out", str(out), *data,
    ])
    assert "experts kept x width" in capsys.readouterr().out
    plan = nirvana_pl.PruningPlan.load(out / "plan.json")
    # (whole experts only: one expert is an eighth of this tiny model's MLP parameters, a coarse step)
    assert any(layer.experts_kept < 4 for layer in plan.layers) and 0.34 < result["realised_sparsity"] < 0.46
    model = nirvana_pl.load_pruned(out / "pruned_model")
    assert [layer.mlp.experts.num_experts for layer in model.model.layers] == [lp.experts_kept for lp in plan.layers]
    evaluated = cli.run_command(["eval", "--model", str(out / "pruned_model"), "--tokenizer", "bytes", *data])
    assert evaluated["perplexity"] == pytest.approx(result["perplexity"]["just_pruned"], rel=1e-5)
