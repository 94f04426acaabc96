"""Inputs that used to give a traceback, silently wrong results or wrong advice: each is refused with
a message that names the input, its value and the fix (or, where the input is meaningful, now works)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from lightning_helpers import CausalLM, token_loader, trainer

import nirvana_pl
from nirvana_pl import InfeasibleSparsityError, NirvanaPruningCallback
from nirvana_pl import cli
from nirvana_pl.allocate import AllocationConfig, DenseReference, allocate, max_feasible_sparsity
from nirvana_pl.data import token_windows
from nirvana_pl.datamodule import TextDataModule
from nirvana_pl.modules import load_model, load_tokenizer
from nirvana_pl.saliency import random_scores
from nirvana_pl.units import find_units, locate_model, prunable_parameter_count

TINY_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_llama_pydoc.yaml")


def _removed(plan) -> tuple[int, int]:
    kv = sum(lp.kv_groups_before - len(lp.kept_kv_groups) for lp in plan.layers)
    mlp = sum(lp.mlp_channels_before - len(lp.kept_mlp_channels) for lp in plan.layers)
    return kv, mlp


# ------------------------------------------------------------------------------ 1. mlp_round_to
def test_mlp_round_to_wider_than_the_mlp_is_refused_by_one_shot_prune():
    model = tiny_llama()  # MLP width 176
    before = prunable_parameter_count(model)
    with pytest.raises(ValueError, match=r"mlp_round_to=256 is larger than the MLP width of the layers \(176 channels\)"
                       r".*mlp_round_to <= 176, e\.g\. mlp_round_to=16"):
        nirvana_pl.prune(model, 0.1, "magnitude", mlp_round_to=256)
    assert prunable_parameter_count(model) == before  # refused before any surgery
    # as wide as the MLP is allowed (whole layers go), and so is the uniform variant below it
    nirvana_pl.prune(tiny_llama(), 0.3, "magnitude", mlp_round_to=176)


def test_mlp_round_to_wider_than_the_mlp_is_refused_in_a_fit(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=2, warmup_steps=1, saliency="magnitude", mlp_round_to=256)
    with pytest.raises(ValueError, match=r"mlp_round_to=256 is larger than the MLP width.*176"):
        trainer(tmp_path, 3, [cb]).fit(CausalLM(), token_loader())
    assert not cb.plans


def test_mlp_width_not_a_multiple_of_round_to_does_not_overshoot_the_target():
    # 176 = 2 * 64 + 48: a layer that loses a few channels used to be floored to 128 and never given back
    # (realised 0.18 for a 0.1 target); now it may keep its whole width again.
    model = tiny_llama()
    ref = DenseReference.of(model)
    cfg = AllocationConfig(sparsity=0.1, gamma=3.0, mlp_round_to=64)
    plan = allocate(model, random_scores(model, seed=1), cfg)
    kv_removed, mlp_removed = _removed(plan)
    mlp_target = (0.1 * ref.prunable_params - kv_removed * ref.kv_group_cost) / ref.mlp_channel_cost
    assert abs(mlp_removed - mlp_target) <= 64 / 2 + 0.5, (plan.mlp_widths_kept(), mlp_target)
    assert all(w % 64 == 0 or w == 176 for w in plan.mlp_widths_kept())


def test_uniform_rounding_of_a_non_multiple_width_picks_the_nearest_kept_width():
    model = tiny_llama()
    ref = DenseReference.of(model)
    # about 20 channels per layer to remove: 156 kept is nearer to the whole 176 than to 128
    s = 20 * ref.num_layers * ref.mlp_channel_cost / ref.prunable_params
    plan = allocate(model, random_scores(model), AllocationConfig(sparsity=s, mlp_round_to=64, uniform=True))
    assert plan.kv_groups_kept() == [4] * 4
    assert plan.mlp_widths_kept() == [176] * 4  # it was 128: 48 channels removed per layer, 2.4x the target


# ------------------------------------------------------------------------------ 2. text files
def _setup(path: Path, seq_len: int = 16) -> None:
    TextDataModule(source=str(path), tokenizer="bytes", seq_len=seq_len, val_windows=1).setup("fit")


def test_binary_training_file_names_the_file_and_says_it_is_not_utf8(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"training file '.*weights\.bin' is not UTF-8 text") as info:
        _setup(path)
    assert "calibration" not in str(info.value)
    # a .txt that is binary inside, and NUL bytes (valid UTF-8 but not text)
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00a" * 10)
    with pytest.raises(ValueError, match=r"b\.txt' is not UTF-8 text"):
        _setup(tmp_path / "b.txt")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00" * 40)
    with pytest.raises(ValueError, match=r"nul\.txt' holds NUL bytes: it is a binary file"):
        _setup(tmp_path / "nul.txt")


def test_empty_training_file_is_named(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(ValueError, match=r"the training data \(file '.*empty\.txt'\) is empty") as info:
        _setup(path)
    assert "calibration" not in str(info.value)


def test_tiny_training_file_names_the_source_seq_len_and_the_fix(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hello")
    expected = (r"the training data \(file '.*tiny\.txt'\) has 5 tokens, fewer than one window "
                r"of seq_len=16; give more text or lower seq_len to <= 5")
    with pytest.raises(ValueError, match=expected) as info:
        _setup(path)
    assert "calibration" not in str(info.value)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"training file '.*rows\.jsonl' line 2 is not JSON"):
        _setup(path)


def test_token_windows_says_what_the_data_is_for(tmp_path):
    with pytest.raises(ValueError, match=r"the calibration data .* fewer than one window"):
        token_windows("hi", load_tokenizer("bytes"), seq_len=8)
    with pytest.raises(ValueError, match=r"the probe data .* fewer than one window"):
        token_windows("hi", load_tokenizer("bytes"), seq_len=8, purpose="probe")


# ------------------------------------------------------------------------------ 3./4. model paths and folders
@pytest.mark.parametrize("name", ["./no_such_model", "/no/such/model", "no/such/model", "~/no_such_model_xyz"])
def test_missing_model_path_is_named_not_taken_for_a_repo_id(name):
    with pytest.raises(
        FileNotFoundError, match=r"name_or_path=.*: no such folder; give a model folder, a hub id"
    ) as info:
        load_model(name)
    assert "Repo id" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"tokenizer=.*: no such folder"):
        load_tokenizer(name)


def _eval_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.run_command(["eval", *args, "--data.seq_len", "16", "--data.val_windows", "2"])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_eval_of_a_missing_model_blames_the_model_not_the_tokenizer(tmp_path, capsys):
    err = _eval_error(["--model", str(tmp_path / "nope")], capsys)
    assert f"model='{tmp_path / 'nope'}': no such folder" in err and "embedded:smollm2" in err
    assert "tokenizer=" not in err and "Repo id" not in err


def test_eval_of_a_folder_without_weights_names_the_folder(byte_model_dir, capsys):
    (byte_model_dir / "model.safetensors").unlink()
    err = _eval_error(["--model", str(byte_model_dir), "--tokenizer", "bytes"], capsys)
    assert f"model='{byte_model_dir}': the folder has config.json but no weights file" in err
    assert "Traceback" not in err


def test_eval_of_truncated_weights_names_the_file(byte_model_dir, capsys):
    weights = byte_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _eval_error(["--model", str(byte_model_dir), "--tokenizer", "bytes"], capsys)
    assert f"weights file '{weights}' cannot be read" in err and "truncated or damaged" in err


def test_sharded_folder_with_a_missing_shard_is_named(byte_model_dir):
    (byte_model_dir / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "model-00002-of-00002.safetensors"}}'
    )
    with pytest.raises(FileNotFoundError, match=r"lists weights files that are not in the folder: \['model-00002"):
        load_model(str(byte_model_dir))


def test_fit_recipe_with_a_missing_model_folder_names_the_key(tmp_path, capsys):
    missing = tmp_path / "my_model"
    with pytest.raises(SystemExit) as exc:
        cli.run_command(["fit", "--config", TINY_RECIPE, "--model.init_args.config", "null",
                         "--model.init_args.name_or_path", str(missing), "--trainer.default_root_dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model (CausalLMModule)" in err and f"name_or_path='{missing}': no such folder" in err
    assert "Repo id" not in err


# ------------------------------------------------------------------------------ 5. min_kv_groups >= KV groups
def test_min_kv_groups_keeping_every_group_prunes_the_mlp_only():
    model = tiny_llama()  # 4 KV groups per layer
    ref = DenseReference.of(model)
    s_mlp = max_feasible_sparsity(ref, 3.0, min_kv_groups=4)
    assert s_mlp == pytest.approx(ref.total_mlp_channels * ref.mlp_channel_cost / ref.prunable_params)
    plan = nirvana_pl.prune(model, 0.3, "magnitude", min_kv_groups=4)
    assert plan.kv_groups_kept() == [4] * 4
    assert abs(plan.realised_sparsity - 0.3) <= 8 * ref.mlp_channel_cost / ref.prunable_params
    assert all(u.num_kv_groups == 4 for u in find_units(model)) and min(plan.mlp_widths_kept()) < 176


@pytest.mark.parametrize("min_kv", [4, 6])
def test_min_kv_groups_at_the_group_count_gives_the_mlp_only_limit_not_gamma_advice(min_kv):
    model = tiny_llama()
    with pytest.raises(InfeasibleSparsityError) as info:
        allocate(model, random_scores(model), AllocationConfig(sparsity=0.7, gamma=3.0, min_kv_groups=min_kv))
    msg = str(info.value)
    assert f"min_kv_groups={min_kv} keeps all 4 KV groups of every layer" in msg
    assert "the largest feasible sparsity is 0.578" in msg and "lower min_kv_groups below 4" in msg
    assert "or gamma" not in msg


def test_min_kv_groups_at_the_group_count_fails_at_setup_of_a_fit(tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.7, prune_at=2, warmup_steps=1, min_kv_groups=4)
    with pytest.raises(InfeasibleSparsityError, match=r"min_kv_groups=4 keeps all 4 KV groups.*lower min_kv_groups"):
        trainer(tmp_path, 3, [cb]).fit(CausalLM(), token_loader())


def test_when_the_kv_pool_runs_out_first_the_advice_is_to_raise_gamma():
    model = tiny_llama()
    # gamma=0.5 with 3 of 4 groups kept: the KV pool (25%) is exhausted long before the MLP pool
    with pytest.raises(InfeasibleSparsityError) as info:
        allocate(model, random_scores(model), AllocationConfig(sparsity=0.3, gamma=0.5, min_kv_groups=3))
    msg = str(info.value)
    assert "a lower gamma cannot help" in msg and "raise gamma" in msg and "lower min_kv_groups" in msg
    assert "Lower sparsity or gamma" not in msg


# ------------------------------------------------------------------------------ 6. model_attr naming a PeftModel
def test_model_attr_naming_a_peft_model_finds_the_model_inside(tmp_path):
    peft = pytest.importorskip("peft")

    class LM(CausalLM):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
            self.m = peft.get_peft_model(tiny_llama(), config)
            del self.net

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.m(input_ids=ids, labels=ids).loss

    module = LM()
    inner = module.m.get_base_model()
    assert locate_model(module, "m") is inner is locate_model(module)
    assert locate_model(module, "m.base_model") is inner
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=1, warmup_steps=1, saliency="magnitude", model_attr="m")
    trainer(tmp_path, 2, [cb]).fit(module, token_loader(n=16))
    assert cb.model is inner and len(cb.plans) == 1


class _WithReference(CausalLM):
    """A frozen reference model built before the trained one (as in DPO or a KL-regularised fine-tune)."""

    def __init__(self, freeze_reference: bool = True):
        torch.manual_seed(1)
        reference = tiny_llama()
        super().__init__()
        net = self.net
        del self.net
        self.ref = reference  # registered first: named_modules() meets it before net
        self.ref.requires_grad_(not freeze_reference)
        self.net = net

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def test_the_trained_model_is_pruned_not_a_frozen_reference_beside_it(tmp_path):
    module = _WithReference()
    reference_width = [u.mlp_width for u in find_units(module.ref)]
    dense = prunable_parameter_count(module.net)
    assert next(name for name, m in module.named_modules() if hasattr(m, "config")) == "ref"
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=4, warmup_steps=2)  # the default saliency reads Adam's state
    trainer(tmp_path, 5, [cb]).fit(module, token_loader(n=24))
    assert cb.model is module.net and cb.records
    assert abs(prunable_parameter_count(module.net) / dense - 0.5) < 0.05
    assert [u.mlp_width for u in find_units(module.ref)] == reference_width


def test_several_trained_models_ask_for_model_attr():
    module = _WithReference(freeze_reference=False)
    listed = r"2 prunable models: 'ref' .*trained.*'net' .*trained.*model_attr="
    with pytest.raises(ValueError, match=listed):
        locate_model(module)
    assert locate_model(module, "ref") is module.ref and locate_model(module, "net") is module.net
    bare = tiny_llama()  # a transformers model itself (load_pruned_state_dict takes one): not its inner LlamaModel
    assert locate_model(bare) is bare


def test_with_two_trained_models_model_attr_also_tells_save_pruned_model_which_to_save(tmp_path):
    from nirvana_pl.modules import SavePrunedModel

    module = _WithReference(freeze_reference=False)
    cb = NirvanaPruningCallback(sparsity=0.5, prune_at=3, warmup_steps=2, saliency="adam_taylor", model_attr="net")
    saver = SavePrunedModel(dirpath=tmp_path / "pruned")
    trainer(tmp_path, 4, [saver, cb]).fit(module, token_loader(n=24))
    assert cb.model is module.net and saver.reload_max_abs_diff == 0.0
    saved = nirvana_pl.load_pruned(tmp_path / "pruned")
    pruned = prunable_parameter_count(module.net)
    assert prunable_parameter_count(saved) == pruned < prunable_parameter_count(module.ref)
