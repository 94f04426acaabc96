"""Multi-process fits as users run them: the library's defaults (no report_dir, the Trainer's default
logger), the shipped recipe and drop-in config as they are (shortened on the command line), under
2-process DDP and DeepSpeed ZeRO-2, with SavePrunedModel at the end.

Every child runs under a SIGKILL timeout of its whole process group (tests/processes.py): a rank that
hangs after the prune fails its test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from processes import run_killable

from nirvana_pl import load_pruned
from nirvana_pl.units import find_units

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
RECIPE = ROOT / "recipes" / "tiny_llama_pydoc.yaml"
DROP_IN = ROOT / "callbacks" / "nirvana.yaml"


def _env(extensions_dir: str | None = None) -> dict:
    launcher_keys = ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher_keys}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if extensions_dir:
        env["TORCH_EXTENSIONS_DIR"] = extensions_dir
    return env


def _lines(proc, prefix: str) -> list[dict]:
    return [json.loads(line.split(prefix, 1)[1]) for line in proc.stdout.splitlines() if prefix in line]


def _check_saved(folder: Path, shapes) -> None:
    model = load_pruned(folder)
    assert [[u.num_kv_groups, u.mlp_width] for u in find_units(model)] == shapes


@pytest.mark.parametrize("logger", ["default", "none"])
def test_ddp_fit_with_the_defaults_goes_on_after_the_prune(tmp_path, logger):
    """The report folder is agreed by every rank (trainer.log_dir is a collective): no hang after the prune."""
    args = [] if logger == "default" else ["--no-logger"]
    proc = run_killable([sys.executable, str(SCRIPTS / "user_fit.py"), "--out", str(tmp_path), *args], 240,
                        cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ends = {r["rank"]: r for r in _lines(proc, "USER_FIT ")}
    assert set(ends) == {0, 1}
    assert all(r["step"] == 8 and r["records"] == 1 for r in ends.values())
    assert ends[0]["shapes"] == ends[1]["shapes"] != [[4, 176]] * 4
    expected_dir = tmp_path / ("lightning_logs/version_0" if logger == "default" else "nirvana_logs/version_0")
    assert Path(ends[0]["report"]) == expected_dir / "nirvana_prune_report.json" and Path(ends[0]["report"]).is_file()
    assert Path(ends[0]["saved_to"]) == expected_dir / "pruned_model"
    _check_saved(expected_dir / "pruned_model", ends[0]["shapes"])
    assert ends[0]["exported"] == ends[1]["exported"] == str(tmp_path / "exported")
    _check_saved(tmp_path / "exported", ends[0]["shapes"])


def _recipe_args(tmp_path: Path) -> list[str]:
    """recipes/tiny_llama_pydoc.yaml as shipped, shortened and on two CPU processes from the command line."""
    return [
        "fit", "--config", str(RECIPE),
        "--trainer.devices", "2",
        "--trainer.max_steps", "8",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.val_windows", "8",
        "--data.init_args.batch_size", "4",
        "--model.init_args.config.num_hidden_layers", "2",
        "--trainer.callbacks.init_args.prune_at", "5",
        "--trainer.callbacks.init_args.warmup_steps", "3",
    ]


def _check_recipe_run(proc, tmp_path: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("=== nirvana-pl fit: done") == 1  # rank 0 prints the summary
    log_dir = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((log_dir / "run_summary.json").read_text())
    assert summary["global_step"] == 8 and summary["prune_steps"] == [5]
    assert 0.45 < summary["realised_sparsity"] < 0.55
    report = json.loads((log_dir / "nirvana_prune_report.json").read_text())
    _check_saved(Path(summary["pruned_model"]), [list(x) for x in zip(report["events"][0]["kept_kv_groups_per_layer"],
                                                                        report["events"][0]["kept_mlp_width_per_layer"])])
    checkpoints = {p.name for p in (log_dir / "checkpoints").iterdir()}
    assert {"prune-step=5.ckpt", "last.ckpt"} <= checkpoints, checkpoints
    assert not [name for name in checkpoints if name.endswith(".partial")]  # every save was swapped in whole


def test_recipe_as_shipped_under_ddp(tmp_path):
    proc = run_killable([sys.executable, "-m", "nirvana_pl.cli", *_recipe_args(tmp_path), "--trainer.strategy", "ddp"],
                        300, cwd=ROOT, env=_env())
    _check_recipe_run(proc, tmp_path)


def test_recipe_as_shipped_under_zero2(tmp_path, extensions_dir):
    pytest.importorskip("deepspeed", reason="DeepSpeed tests need `pip install nirvana-pl[deepspeed]`")
    proc = run_killable(
        [sys.executable, "-m", "nirvana_pl.cli", *_recipe_args(tmp_path),
         "--trainer.strategy", "nirvana_pl.deepspeed.CPUDeepSpeedStrategy", "--trainer.strategy.stage", "2"],
        600, cwd=ROOT, env=_env(extensions_dir),
    )  # fmt: skip
    _check_recipe_run(proc, tmp_path)


def test_drop_in_config_under_ddp_in_a_users_own_cli(tmp_path):
    proc = run_killable(
        [sys.executable, str(SCRIPTS / "user_cli.py"), "fit", "--config", str(DROP_IN),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.max_steps", "8", "--trainer.default_root_dir", str(tmp_path),
         "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks.init_args.prune_at", "5", "--trainer.callbacks.init_args.warmup_steps", "3"],
        240, cwd=ROOT, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert sorted(proc.stdout.count(f"USER_CLI_DONE rank={r} step=8") for r in (0, 1)) == [1, 1]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    report = json.loads((log_dir / "nirvana_prune_report.json").read_text())
    event = report["events"][0]
    assert event["step"] == 5 and abs(event["realised_sparsity"] - 0.3) < 0.05
    _check_saved(log_dir / "pruned_model", [list(x) for x in zip(event["kept_kv_groups_per_layer"],
                                                                   event["kept_mlp_width_per_layer"])])


def test_main_jobs_dense_control_and_gguf_file_under_ddp(tmp_path):
    """The main job's extra callbacks on the tiny recipe, two DDP processes: HeldOutPerplexity(dense_control=true),
    whose control's gradients are averaged over ranks as the fit's are, and SavePrunedModel's Q8_0 GGUF with the
    SmolLM2 GGUF's tokenizer, which rank 0 writes once the other rank is done, holding the pruned model's widths."""
    from gguf_reference import metadata

    from nirvana_pl.gguf_export import read_gguf_tensors

    main_job = (ROOT / "recipes" / "smollm2_pydoc.yaml").read_text()
    assert "dense_control: true" in main_job
    assert "        gguf_dtype: q8_0\n        gguf_tokenizer: embedded:smollm2\n" in main_job
    held_out = "    - class_path: nirvana_pl.modules.HeldOutPerplexity\n"
    save = "    - class_path: nirvana_pl.modules.SavePrunedModel\n"
    recipe = tmp_path / "tiny_as_the_main_job.yaml"
    recipe.write_text(RECIPE.read_text()
                      .replace(held_out, held_out + "      init_args:\n        dense_control: true\n")
                      .replace(save, save + "      init_args:\n        gguf_dtype: q8_0\n"
                               "        gguf_tokenizer: embedded:smollm2\n"))  # fmt: skip
    args = _recipe_args(tmp_path)
    args[args.index(str(RECIPE))] = str(recipe)
    args += ["--model.init_args.config.vocab_size", "49152"]  # (the SmolLM2 vocabulary; the bytes stay ids < 256)
    proc = run_killable([sys.executable, "-m", "nirvana_pl.cli", *args, "--trainer.strategy", "ddp"], 300, cwd=ROOT,
                        env=_env())  # fmt: skip
    _check_recipe_run(proc, tmp_path)
    assert "the dense model at the prune, trained the same 3 steps on the same batches" in proc.stdout
    summary = json.loads((tmp_path / "lightning_logs" / "version_0" / "run_summary.json").read_text())
    ppl = summary["perplexity"]
    assert ppl["dense_control"] > 1 and ppl["dense_control"] != ppl["dense"]
    folder = Path(summary["pruned_model"])
    assert proc.stdout.count("llama.cpp file") == 1, proc.stdout[-3000:]
    meta = metadata(folder / "model.gguf")
    units = find_units(load_pruned(folder))
    assert meta["general.architecture"] == "deci"
    assert meta["deci.feed_forward_length"] == [u.mlp_width for u in units]
    assert meta["deci.attention.head_count_kv"] == [u.num_kv_groups for u in units]
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    tensors = read_gguf_tensors(folder / "model.gguf")
    assert tensors["blk.0.ffn_down.weight"].shape == (256, units[0].mlp_width)
    assert not list(folder.glob(".*writing"))
