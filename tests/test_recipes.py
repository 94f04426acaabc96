"""Recipes and drop-in callback configs parse; the runnable ones run (shortened); the building blocks
(modules, datamodule, perplexity callback) behave."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

import nirvana_pl
from nirvana_pl import cli
from nirvana_pl.callback import NirvanaPruningCallback
from nirvana_pl.datamodule import ByteTokenizer, TextDataModule
from nirvana_pl.modules import (
    CausalLMModule, HeldOutPerplexity, SavePrunedModel, Seq2SeqLMModule, load_model, perplexity,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CALLBACK_CONFIGS = sorted((ROOT / "callbacks").glob("*.yaml"))

#: Arguments a recipe uses that this version's classes do not accept yet (stated in its header).
PENDING: dict[str, set[str]] = {}
#: Recipes that parse but do not run here (stated in their headers): gated hub model on 32 GPUs.
NOT_RUN = {"llama3_8b_deepspeed.yaml", "smollm2_pydoc.yaml"}

TINY_LLAMA = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
)


def _strip(node, keys):
    if isinstance(node, dict):
        return {k: _strip(v, keys) for k, v in node.items() if k not in keys}
    if isinstance(node, list):
        return [_strip(v, keys) for v in node]
    return node


def test_every_recipe_and_callback_config_is_listed():
    assert {p.name for p in RECIPES} >= {
        "smollm2_pydoc.yaml", "tiny_llama_pydoc.yaml", "iterative_schedule.yaml", "lora_recovery.yaml",
        "qwen2_tiny.yaml", "t5_seq2seq.yaml", "llama3_8b_deepspeed.yaml",
    }
    assert {p.name for p in CALLBACK_CONFIGS} >= {
        "nirvana.yaml", "nirvana_functional_kl.yaml", "nirvana_adam_state.yaml", "nirvana_iterative.yaml",
    }
    for path in RECIPES + CALLBACK_CONFIGS:
        assert path.read_text().startswith("#"), f"{path.name} needs a header comment saying what it does"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(path, tmp_path):
    pending = PENDING.get(path.name, set())
    if pending:
        # Until the argument exists, the parse must fail on exactly that key, and the rest must parse.
        assert "NOT RUNNABLE" in path.read_text()
        try:
            cli.parse_recipe(path)
        except Exception as err:  # noqa: BLE001 - jsonargparse.ArgumentError
            assert any(key in str(err) for key in pending), str(err)
        stripped = tmp_path / path.name
        stripped.write_text(yaml.safe_dump(_strip(yaml.safe_load(path.read_text()), pending)))
        path = stripped
    config = cli.parse_recipe(path)
    fit = config.fit
    assert fit.model.class_path.startswith("nirvana_pl.modules.")
    assert fit.data.class_path == "nirvana_pl.datamodule.TextDataModule"
    callbacks = [c.class_path for c in fit.trainer.callbacks]
    assert callbacks[-1] == "nirvana_pl.callback.NirvanaPruningCallback"  # last: CLI overrides edit it


@pytest.mark.parametrize("path", CALLBACK_CONFIGS, ids=lambda p: p.name)
def test_callback_config_appends_to_a_recipe(path):
    config = cli.parse_recipe(ROOT / "recipes" / "tiny_llama_pydoc.yaml", overrides=["--config", str(path)])
    callbacks = [c.class_path for c in config.fit.trainer.callbacks]
    assert callbacks[:4] == [
        "nirvana_pl.modules.PruneCheckpoint", "nirvana_pl.modules.HeldOutPerplexity",
        "nirvana_pl.modules.SavePrunedModel", "nirvana_pl.callback.NirvanaPruningCallback",
    ]
    # (appended, not merged: the Trainer then refuses the second NirvanaPruningCallback with the schedule= fix)
    assert callbacks[-1] == "nirvana_pl.callback.NirvanaPruningCallback" and len(callbacks) == 6


# ------------------------------------------------------------------------------------------ runs
def _short(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--trainer.max_steps", "6", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1", "--data.init_args.val_windows", "4", "--data.init_args.batch_size", "4",
        "--data.init_args.max_train_windows", "64", "--model.init_args.config.num_hidden_layers", "2", *extra,
    ]


def _fit(args: list[str]):
    return cli.run_command(["fit", *args])


def test_qwen2_recipe_runs(tmp_path):
    run = _fit(["--config", str(ROOT / "recipes" / "qwen2_tiny.yaml"), *_short(
        tmp_path, "--trainer.callbacks.init_args.prune_at", "4", "--trainer.callbacks.init_args.warmup_steps", "2",
        "--trainer.callbacks.init_args.num_calibration_batches", "2")])
    nirvana = run.trainer.callbacks[-1] if isinstance(run.trainer.callbacks[-1], NirvanaPruningCallback) else next(
        cb for cb in run.trainer.callbacks if isinstance(cb, NirvanaPruningCallback))
    (plan,) = nirvana.plans
    assert plan.saliency == "functional" and abs(plan.realised_sparsity - 0.4) < 0.05
    model = nirvana_pl.load_pruned(Path(run.trainer.log_dir) / "pruned_model")
    assert type(model).__name__.endswith("Qwen2ForCausalLM")
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_lora_recovery_recipe_runs(tmp_path):
    run = _fit(["--config", str(ROOT / "recipes" / "lora_recovery.yaml"), "--model.init_args.name_or_path", "null",
                "--model.init_args.config", json.dumps(TINY_LLAMA), "--model.init_args.tokenizer", "bytes",
                "--data.init_args.seq_len", "64", "--trainer.precision", "32", *_short(
                    tmp_path, "--trainer.callbacks.init_args.prune_at", "3",
                    "--trainer.callbacks.init_args.warmup_steps", "2")])
    nirvana = next(cb for cb in run.trainer.callbacks if isinstance(cb, NirvanaPruningCallback))
    (plan,) = nirvana.plans
    assert abs(plan.realised_sparsity - 0.3) < 0.05
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    saver = next(cb for cb in run.trainer.callbacks if type(cb).__name__ == "SavePrunedModel")
    assert saver.reload_max_abs_diff is not None and saver.reload_max_abs_diff < 1e-3
    reloaded = nirvana_pl.load_pruned(saver.saved_to)
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())  # merged


def test_iterative_recipe_runs(tmp_path):
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: nirvana_pl.modules.HeldOutPerplexity\n"
        "    - class_path: nirvana_pl.callback.NirvanaPruningCallback\n"
        "      init_args: {schedule: {2: 0.2, 4: 0.4}, warmup_steps: 1, saliency: adam_taylor}\n"
    )
    run = _fit(["--config", str(ROOT / "recipes" / "iterative_schedule.yaml"), "--config", str(schedule),
                *_short(tmp_path)])
    nirvana = next(cb for cb in run.trainer.callbacks if isinstance(cb, NirvanaPruningCallback))
    assert [round(p.target_sparsity, 2) for p in nirvana.plans] == [0.2, 0.4]
    held = next(cb for cb in run.trainer.callbacks if isinstance(cb, HeldOutPerplexity))
    assert [e["step"] for e in held.results["after_prune"]] == [2, 4]
    report = json.loads(nirvana.report_path.read_text())
    assert len(report["events"]) == 2


def test_functional_kl_callback_config_runs(tmp_path):
    config = yaml.safe_load((ROOT / "callbacks" / "nirvana_functional_kl.yaml").read_text())
    args = config["trainer"]["callbacks+"][-1]["init_args"]
    args.update(prune_at=4, gamma_grid=[2.0, 3.0])
    args["calibration"]["init_args"].update(
        tokenizer="bytes", seq_len=32, pool_windows=24, num_candidates=2, samples_per_candidate=4, probe_windows=4,
        probe_seq_len=32, batch_size=4,
    )
    small = tmp_path / "kl.yaml"
    small.write_text(yaml.safe_dump(config))
    run = _fit(["--config", str(ROOT / "recipes" / "tiny_llama_pydoc.yaml"), "--trainer.callbacks", "null",
                "--config", str(small), *_short(tmp_path)])
    (nirvana,) = [cb for cb in run.trainer.callbacks if isinstance(cb, NirvanaPruningCallback)]
    assert nirvana.selector is not None
    (plan,) = nirvana.plans
    assert plan.saliency == "functional" and plan.gamma in (2.0, 3.0)
    assert abs(plan.realised_sparsity - 0.3) < 0.05


def test_t5_recipe_prunes_and_trains(tmp_path):
    """The T5 recipe, shortened: the callback prunes the T5 mid-fit and training goes on."""
    run = cli.run_command([
        "fit", "--config", str(ROOT / "recipes" / "t5_seq2seq.yaml"),
        "--trainer.max_steps", "6", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "4",
        "--data.init_args.max_train_windows", "32", "--data.init_args.val_windows", "4",
        "--trainer.callbacks.init_args.prune_at", "4", "--trainer.callbacks.init_args.warmup_steps", "2",
    ])
    assert isinstance(run.model, Seq2SeqLMModule) and run.trainer.global_step == 6
    (nirvana,) = [cb for cb in run.trainer.callbacks if isinstance(cb, NirvanaPruningCallback)]
    (plan,) = nirvana.plans
    assert abs(plan.realised_sparsity - 0.3) < 0.05
    assert plan.layers[-1].label == "decoder.1.cross"
    (saver,) = [cb for cb in run.trainer.callbacks if isinstance(cb, SavePrunedModel)]
    assert saver.reload_max_abs_diff is not None and saver.reload_max_abs_diff < 1e-5
    assert json.loads((saver.saved_to / "config.json").read_text())["model_type"] == "nirvana_t5"
    batch = next(iter(run.datamodule.val_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 64)
    assert math.isfinite(perplexity(run.model.model, [batch], seq2seq=True))


# ------------------------------------------------------------------------------------------ building blocks
def test_datamodule_splits_are_disjoint_and_seeded(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("".join(chr(97 + i % 26) * 7 + " " for i in range(800)))
    dm = TextDataModule(source=str(text), tokenizer="bytes", seq_len=16, val_windows=5, test_windows=3, seed=1)
    dm.setup()
    splits = dm.splits
    assert splits["val"].shape == (5, 16) and splits["test"].shape == (3, 16)
    assert splits["train"].shape[0] == 6400 // 16 - 8
    rows = lambda t: {tuple(r.tolist()) for r in t}  # noqa: E731
    # Windows are cut without overlap; identical rows can only come from repeated text.
    again = TextDataModule(source=str(text), tokenizer="bytes", seq_len=16, val_windows=5, test_windows=3, seed=1)
    again.setup()
    assert torch.equal(again.splits["val"], splits["val"]) and torch.equal(again.splits["train"], splits["train"])
    assert rows(splits["val"]) | rows(splits["test"]) | rows(splits["train"]) <= rows(
        torch.tensor(list(text.read_bytes()))[: 400 * 16].view(400, 16)
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids"} and batch["input_ids"].shape == (4, 16)


def test_datamodule_reads_jsonl_and_rejects_bad_sources(tmp_path):
    rows = tmp_path / "docs.jsonl"
    rows.write_text("\n".join(json.dumps({"body": "word " * 50}) for _ in range(10)))
    dm = TextDataModule(source=[str(rows)], tokenizer="bytes", seq_len=32, val_windows=2, text_column="body")
    dm.setup()
    assert dm.splits["train"].shape[1] == 32
    with pytest.raises(FileNotFoundError, match="no such file"):
        TextDataModule(source="missing/corpus.txt")
    with pytest.raises(ValueError, match="not an embedded corpus"):
        TextDataModule(source="embedded:nothing")
    with pytest.raises(ValueError, match="format='mlm'"):
        TextDataModule(format="mlm")
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(seq_len=1)
    with pytest.raises(ValueError, match="no tokenizer"):
        TextDataModule().setup()


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok(["héllo"])["input_ids"][0]
    assert max(ids) < 256 and tok.decode(ids) == "héllo"


def test_module_loads_models_and_checks_arguments(tmp_path, monkeypatch):
    module = CausalLMModule(config=TINY_LLAMA, tokenizer="bytes")
    assert type(module.model).__name__ == "LlamaForCausalLM" and isinstance(module.tokenizer, ByteTokenizer)
    module.model.save_pretrained(tmp_path / "m")
    again = CausalLMModule(name_or_path=str(tmp_path / "m"), tokenizer="bytes", dtype="bfloat16")
    assert next(again.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="exactly one of name_or_path"):
        CausalLMModule()
    with pytest.raises(ValueError, match="model_type"):
        CausalLMModule(config={"hidden_size": 8})
    with pytest.raises(ValueError, match="lr="):
        CausalLMModule(config=TINY_LLAMA, lr=0)

    # embedded:smollm2 goes through nirvana_pl.embedded.load_smollm2 (a tiny stand-in here).
    import nirvana_pl.embedded as embedded

    stand_in = load_model(config=TINY_LLAMA)
    calls = []
    monkeypatch.setattr(embedded, "load_smollm2", lambda dtype: calls.append(dtype) or (stand_in, None))
    assert load_model("embedded:smollm2", dtype="bfloat16") is stand_in and calls == [torch.bfloat16]


def test_lora_option_trains_adapters_only():
    module = CausalLMModule(config=TINY_LLAMA, tokenizer="bytes", lora={"r": 4, "lora_alpha": 8})
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = module.training_step({"input_ids": torch.randint(0, 256, (2, 16))}, 0)
    loss.backward()


def test_perplexity_matches_the_model_loss():
    model = load_model(config=TINY_LLAMA).eval()
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, [{"input_ids": ids}]) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    mask = torch.ones_like(ids)
    mask[:, -5:] = 0  # padding is skipped
    with torch.no_grad():
        masked_loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    got = perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
    assert got == pytest.approx(math.exp(float(masked_loss)), rel=1e-4)


class _SnapshotAtPrune(pl.Callback):
    def __init__(self, step):
        self.step, self.dense = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.dense is None:
            self.dense = copy.deepcopy(pl_module.model)


def test_held_out_perplexity_measures_the_dense_model_whatever_the_callback_order(tmp_path):
    module = CausalLMModule(config=TINY_LLAMA, tokenizer="bytes", lr=3e-3)
    dm = TextDataModule(tokenizer="bytes", seq_len=32, batch_size=4, val_windows=4, max_train_windows=64)
    snapshot = _SnapshotAtPrune(3)
    nirvana = NirvanaPruningCallback(sparsity=0.5, prune_at=3, warmup_steps=2)
    held = HeldOutPerplexity(progress=False)
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", devices=1, callbacks=[snapshot, nirvana, held],
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    assert trainer.callbacks.index(held) < trainer.callbacks.index(nirvana)
    batches = dm.held_out_batches("val")
    assert held.results["dense"] == pytest.approx(perplexity(snapshot.dense, batches), rel=1e-5)
    (after,) = held.results["after_prune"]
    assert after["step"] == 3 and after["ppl"] != held.results["dense"]
    assert held.results["final"] == pytest.approx(perplexity(module.model, batches), rel=1e-5)


def test_held_out_perplexity_on_other_text_is_measured_at_the_same_points_on_windows_never_trained_on(tmp_path):
    module = CausalLMModule(config=TINY_LLAMA, tokenizer="bytes", lr=3e-3)
    dm = TextDataModule(tokenizer="bytes", seq_len=32, batch_size=4, val_windows=4, eval_batch_size=3,
                        max_train_windows=64)  # fmt: skip
    snapshot = _SnapshotAtPrune(3)
    held = HeldOutPerplexity(progress=False, other_text={"pysrc": "embedded:pysrc"})
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", devices=1,
        callbacks=[snapshot, NirvanaPruningCallback(sparsity=0.5, prune_at=3, warmup_steps=2), held],
        logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    other = dm.held_out_of("embedded:pysrc")
    assert [tuple(b["input_ids"].shape) for b in other] == [(3, 32), (1, 32)]  # val_windows, eval_batch_size
    windows = torch.cat([b["input_ids"] for b in other])
    assert torch.equal(windows, torch.cat([b["input_ids"] for b in dm.held_out_of("embedded:pysrc")]))
    code = ByteTokenizer().decode(windows.flatten())
    assert any(word in code for word in ("def ", "import ", "self", "return")), code
    train = {tuple(w.tolist()) for w in dm.splits["train"]}
    assert not any(tuple(w.tolist()) in train for w in windows)
    results = held.results["other_text"]["pysrc"]
    assert results["dense"] == pytest.approx(perplexity(snapshot.dense, other), rel=1e-5)
    (after,) = results["after_prune"]
    assert after != results["dense"] and after != held.results["after_prune"][0]["ppl"]
    assert results["final"] == pytest.approx(perplexity(module.model, other), rel=1e-5)
    assert results["dense_control"] is None and results["windows"] == 4
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"heldout/pysrc/ppl_dense", "heldout/pysrc/ppl_pruned", "heldout/pysrc/ppl_final"} <= set(metrics)


@pytest.mark.parametrize("other_text, match", [
    ("embedded:pysrc", "must map names to sources"),
    ({"a/b": "embedded:pysrc"}, "the name 'a/b' must be a non-empty word"),
    ({"": "embedded:pysrc"}, "the name '' must be a non-empty word"),
    ({"code": "embedded:nope"}, "not an embedded corpus; available: .*embedded:pysrc"),
])  # fmt: skip
def test_held_out_perplexity_refuses_bad_other_text(other_text, match):
    with pytest.raises(ValueError, match=match):
        HeldOutPerplexity(other_text=other_text)


def test_held_out_perplexity_on_other_text_needs_a_text_datamodule(tmp_path):
    batches = [{"input_ids": torch.randint(0, 256, (4, 16))} for _ in range(4)]
    held = HeldOutPerplexity(progress=False, other_text={"pysrc": "embedded:pysrc"})
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, callbacks=[held], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="other_text.*the datamodule is NoneType; use .*TextDataModule, or drop"):
        trainer.fit(CausalLMModule(config=TINY_LLAMA, tokenizer="bytes"), train_dataloaders=batches)


def test_deepspeed_recipe_uses_the_stock_strategy():
    text = (ROOT / "recipes" / "llama3_8b_deepspeed.yaml").read_text()
    assert "NOT RUNNABLE" not in text
    assert "class_path: lightning.pytorch.strategies.DeepSpeedStrategy" in text and "CPUDeepSpeedStrategy" not in text
