"""Every registered architecture adapter, end to end, on a tiny random model of its family.

Parametrized from the registry (``nirvana_pl.arch.supported_model_types()``) with the configs of
``tests/arch_configs.py``: registering a new adapter adds it to every test here, and it fails until it has a
tiny config. Per model type: a one-shot prune equals the masked dense model, cached and uncached greedy
generation agree, the export reloads without nirvana_pl (and with ``load_pruned``), and a Lightning fit
prunes and resumes from a checkpoint on a freshly built dense module.
"""

from __future__ import annotations

import ast
import copy
import io
import json
import math
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from arch_configs import TINY_CONFIGS, VOCAB, build, is_seq2seq, model_from_config, tiny_config
from lightning_helpers import Losses, trainer
from nirvana_pl import NirvanaPruningCallback
from nirvana_pl.arch import architecture_for_type, registered_architectures, supported_model_types
from nirvana_pl.arch.decoder import DecoderArchitecture
from nirvana_pl.calibration import masked
from nirvana_pl.export import load_pruned, save_pruned
from nirvana_pl.oneshot import prune
from nirvana_pl.report import MARKDOWN_NAME
from nirvana_pl.surgery import layer_widths
from nirvana_pl.units import prunable_parameter_count
from without_nirvana_pl import run_without_nirvana_pl

SUPPORTED = supported_model_types()
DECODER_TYPES = [t for t, arch in registered_architectures().items() if isinstance(arch, DecoderArchitecture)]
SPARSITY = 0.3
GAMMA = 1.5  # removes KV groups and MLP channels, in differing numbers per layer, on every tiny model
NEW_TOKENS = 8
PAD = 0


def test_every_supported_model_type_has_a_tiny_config():
    missing = sorted(set(SUPPORTED) - set(TINY_CONFIGS))
    assert not missing, f"add a tiny config to tests/arch_configs.py for the newly registered type(s) {missing}"
    assert len(DECODER_TYPES) >= 9 and "t5" in SUPPORTED  # the built-in families are all registered


# ------------------------------------------------------------------------------------------ helpers
def _inputs(model_type: str) -> dict[str, torch.Tensor]:
    """Two rows of 11 tokens (longer than every sliding window); the second padded (left for a decoder LM, whose
    generation continues it; right for T5's encoder), with T5's decoder inputs."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    if not is_seq2seq(model_type):
        ids[1, :3], mask[1, :3] = PAD, 0
        return {"input_ids": ids, "attention_mask": mask}
    ids[1, -3:], mask[1, -3:] = PAD, 0
    decoder_ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    decoder_ids[:, 0] = tiny_config(model_type).decoder_start_token_id
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}


def _real_positions(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which logits positions are real tokens (a decoder LM's padding positions attend to nothing)."""
    if "decoder_input_ids" in inputs:
        return torch.ones_like(inputs["decoder_input_ids"], dtype=torch.bool)
    return inputs["attention_mask"].bool()


@torch.no_grad()
def _logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of the real positions, [n, vocab] in fp32."""
    return model(**inputs, use_cache=False).logits.float()[_real_positions(inputs)]


@torch.no_grad()
def _greedy(model, inputs: dict[str, torch.Tensor], use_cache: bool = True) -> torch.Tensor:
    return model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD, use_cache=use_cache,
    )  # fmt: skip


def _pruned(model_type: str):
    """(a copy of the dense model, the model pruned one-shot, the plan)."""
    model = build(model_type)
    dense = copy.deepcopy(model)
    plan = prune(model, SPARSITY, "magnitude", gamma=GAMMA)
    return dense, model, plan


def _exact(model_type: str) -> bool:
    """Whether the adapter promises that the pruned model computes what the masked dense one does."""
    return architecture_for_type(model_type).exact


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert actual.shape == expected.shape and torch.isfinite(expected).all()
    err = (actual - expected).abs().max().item()
    assert err < atol, f"max |logits diff| = {err}"


# ------------------------------------------------------------------------------------------ (a) one-shot
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_pruned_model_computes_what_the_masked_dense_model_does(model_type):
    dense, model, plan = _pruned(model_type)
    assert abs(plan.realised_sparsity - SPARSITY) < 0.03
    removed = plan.fraction_removed()
    assert removed["kv_groups"] > 0 and removed["mlp_channels"] > 0, removed
    assert any(len(lp.kept_kv_groups) < lp.kv_groups_before for lp in plan.layers), plan.kv_groups_kept()
    widths = layer_widths(model)
    entries = widths if isinstance(widths, list) else [e for stack in widths.values() for e in stack]
    assert any(e != entries[0] for e in entries), f"the test wants layers of differing widths, got {widths}"
    assert prunable_parameter_count(model) < prunable_parameter_count(dense)

    inputs = _inputs(model_type)
    with masked(dense, plan):
        expected = _logits(dense, inputs)
    assert (_logits(dense, inputs) - expected).abs().max() > 1e-3  # the hooks are gone, and the prune mattered
    if _exact(model_type):
        _assert_close(_logits(model, inputs), expected)
    else:  # (OLMo 2/3: a q/k norm over all heads normalises the kept heads over fewer; the adapter says so)
        assert torch.isfinite(_logits(model, inputs)).all()
        assert (_logits(model, inputs) - expected).abs().max() > 1e-5, "exact after all: drop `exact = False`"


# ------------------------------------------------------------------------------------------ (b) generation
def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)  # (as ddp_spawn, torch.save(model) or a multiprocessing queue would)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_pruned_and_loaded_models_pickle(model_type, tmp_path):
    _, model, _ = _pruned(model_type)
    loaded = load_pruned(save_pruned(model, tmp_path / "pruned")).eval()
    inputs = _inputs(model_type)
    with torch.no_grad():
        expected = _logits(model, inputs)
        for m in (model, loaded):
            again = _pickled(m)
            assert type(again) is type(m)
            torch.testing.assert_close(_logits(again, inputs), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_body_and_head_give_the_logits_the_model_returns(model_type):
    """The KL calibration splits the model into body and head: soft-capped (Gemma 2/3), divided (Granite) or scaled
    (Cohere) logits must come out as the model's own."""
    model = build(model_type)
    body, head = architecture_for_type(model_type).body_and_head(model)
    ids = _inputs(model_type)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(head(body(input_ids=ids).last_hidden_state), model(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_greedy_generation_with_and_without_the_kv_cache_agree(model_type):
    dense, model, plan = _pruned(model_type)
    inputs = _inputs(model_type)
    cached = _greedy(model, inputs, use_cache=True)
    assert cached.shape[-1] - (0 if is_seq2seq(model_type) else inputs["input_ids"].shape[1]) >= NEW_TOKENS
    assert torch.equal(_greedy(model, inputs, use_cache=False), cached)
    if _exact(model_type):
        with masked(dense, plan):
            assert torch.equal(_greedy(dense, inputs, use_cache=True), cached)


# ------------------------------------------------------------------------------------------ (c) export
# Checked in ONE child interpreter that cannot import nirvana_pl (see without_nirvana_pl.py), for every folder
# at once (a child start costs seconds): it gets the folder of all exports and writes one verdict per model type.
CHILD = textwrap.dedent(
    """
    import json, pathlib, traceback
    import torch
    import transformers

    def check(folder, exp):
        auto = transformers.AutoModelForSeq2SeqLM if exp["seq2seq"] else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__ == exp["class_name"], type(model)
        inputs = exp["inputs"]
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits.float()[exp["positions"]]
            gen = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 max_new_tokens=exp["new_tokens"], min_new_tokens=exp["new_tokens"],
                                 do_sample=False, pad_token_id=0)
        err = (logits - exp["logits"]).abs().max().item()
        assert torch.allclose(logits, exp["logits"], atol=1e-5, rtol=0), f"max |logits diff| = {err}"
        assert torch.equal(gen, exp["generated"]), (gen.tolist(), exp["generated"].tolist())
        return f"ok {err}"

    verdicts = {}
    for expected in sorted(pathlib.Path(folder).glob("*.pt")):
        try:
            verdicts[expected.stem] = check(expected.with_suffix(""), torch.load(expected, weights_only=True))
        except Exception:
            verdicts[expected.stem] = traceback.format_exc()
    assert "nirvana_pl" not in sys.modules
    pathlib.Path(expected_file).write_text(json.dumps(verdicts))
    print("CHILD_OK")
    """
)


def _transformers_imports(source: str) -> set[str]:
    """Names the module imports from transformers (``import transformers...`` counts as its dotted name)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "transformers"}
    return names


def _stock_class_names(model_type: str) -> set[str]:
    """The family's stock config and causal-LM class names, as transformers' auto mappings name them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {CONFIG_MAPPING_NAMES[model_type], MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}


def _check_folder(model_type: str, model, folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == f"nirvana_{model_type}" and cfg["nirvana_base_model_type"] == model_type
    assert cfg["architectures"] == [f"Nirvana{type(model).__name__}"]
    if model_type in DECODER_TYPES:
        assert cfg["nirvana_layer_widths"] == layer_widths(model)
        shipped = (folder / "modeling_nirvana.py").read_text()
        assert _transformers_imports(shipped) == _stock_class_names(model_type)


def _export(model_type: str, root: Path):
    """Prune and save ``model_type`` to ``root/<type>``, with what the child expects in ``root/<type>.pt``;
    (model, folder), or the exception it raised (reported by that type's test alone)."""
    try:
        _, model, _ = _pruned(model_type)
        folder = save_pruned(model, root / model_type)
        inputs = _inputs(model_type)
        torch.save(
            {"inputs": inputs, "positions": _real_positions(inputs), "logits": _logits(model, inputs),
             "generated": _greedy(model, inputs), "new_tokens": NEW_TOKENS, "seq2seq": is_seq2seq(model_type),
             "class_name": f"Nirvana{type(model).__name__}"},
            root / f"{model_type}.pt",
        )  # fmt: skip
    except Exception as exc:
        return exc
    return model, folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every supported type pruned and saved, and the verdicts of one child without nirvana_pl on all folders."""
    root = tmp_path_factory.mktemp("exports")
    exported = {t: _export(t, root / "folders") for t in SUPPORTED}
    (root / "folders").mkdir(exist_ok=True)
    run_without_nirvana_pl(CHILD, root / "folders", root / "verdicts.json", root)
    return exported, json.loads((root / "verdicts.json").read_text())


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_export_reloads_without_nirvana_pl_and_with_load_pruned(model_type, exports):
    exported, verdicts = exports
    if isinstance(exported[model_type], Exception):
        raise exported[model_type]
    model, folder = exported[model_type]
    _check_folder(model_type, model, folder)
    assert verdicts[model_type].startswith("ok"), f"reloading without nirvana_pl failed:\n{verdicts[model_type]}"

    loaded = load_pruned(folder).eval()
    assert type(loaded).__name__ == f"Nirvana{type(model).__name__}"
    assert layer_widths(loaded) == layer_widths(model)
    inputs = _inputs(model_type)
    _assert_close(_logits(loaded, inputs), _logits(model, inputs))
    assert torch.equal(_greedy(loaded, inputs), _greedy(model, inputs))


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_registry_and_export_classes_agree(model_type):
    arch = architecture_for_type(model_type)
    nconfig, nmodel = arch.nirvana_classes()
    assert nconfig.model_type == f"nirvana_{model_type}" and nconfig.nirvana_base_model_type == model_type
    assert nmodel.config_class is nconfig
    assert architecture_for_type(f"nirvana_{model_type}") is arch
    stock_config, stock_model = arch.stock_classes()
    assert issubclass(nconfig, stock_config) and issubclass(nmodel, stock_model)
    assert {stock_config.__name__, stock_model.__name__} == _stock_class_names(model_type)

    code = arch.hub_code()
    made = [node for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "nirvana_classes"]  # fmt: skip
    assert len(made) == 1, "hub_code() should make its classes with one nirvana_classes(...) call"
    assert [t.id for t in made[0].targets[0].elts] == [nconfig.__name__, nmodel.__name__]
    namespace: dict = {"__name__": "modeling_nirvana"}
    exec(compile(code, "modeling_nirvana.py", "exec"), namespace)  # what the folder's code defines
    folder_config, folder_model = namespace[nconfig.__name__], namespace[nmodel.__name__]
    assert folder_config.model_type == nconfig.model_type and folder_model.config_class is folder_config
    assert issubclass(folder_model, stock_model) and issubclass(folder_config, stock_config)


# ------------------------------------------------------------------------------------------ (d) Lightning
class UserLM(pl.LightningModule):
    """A user's module: a tiny transformers LM of some family under ``self.net``, plain AdamW."""

    def __init__(self, model_type: str, seed: int = 0, lr: float = 3e-3):
        super().__init__()
        torch.manual_seed(seed)
        self.net = model_from_config(tiny_config(model_type))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        labels = batch.get("labels", batch["input_ids"])
        return self.net(input_ids=batch["input_ids"], labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def _loader(model_type: str, n: int = 32, seq: int = 16, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(3, VOCAB, (n, 1), generator=gen)
    rows = (starts + torch.arange(seq)) % (VOCAB - 3) + 3  # learnable: each row counts up
    if is_seq2seq(model_type):
        data = [{"input_ids": r[: seq // 2], "labels": r[seq // 2:]} for r in rows]
    else:
        data = [{"input_ids": r} for r in rows]
    return DataLoader(data, batch_size=batch_size)


def _callback() -> NirvanaPruningCallback:
    return NirvanaPruningCallback(sparsity=SPARSITY, prune_at=3, warmup_steps=2, saliency="adam_fisher", gamma=GAMMA)


# (the resumed fit has no ModelCheckpoint, and its plain list of dicts cannot restore a position mid-epoch)
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended:UserWarning")
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_fit_prunes_and_a_fresh_module_resumes_from_the_checkpoint(model_type, tmp_path):
    module = UserLM(model_type)
    dense_params = prunable_parameter_count(module.net)
    cb, losses = _callback(), Losses()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    t = trainer(tmp_path / "first", 5, [cb, losses, ckpt], enable_checkpointing=True)
    t.fit(module, _loader(model_type))
    assert t.global_step == 5 and len(cb._records) == 1 and cb._records[0].event_step == 3
    assert prunable_parameter_count(module.net) < dense_params
    caveat = architecture_for_type(model_type).caveat  # (OLMo 2/3: the norms over all heads) in the report
    assert (caveat != "") == (not _exact(model_type))
    event = json.loads(Path(cb._report_path).read_text())["events"][0]
    assert event.get("caveat", "") == caveat and (not caveat or f"Note: {caveat}" in
                                                  (Path(cb._report_path).parent / MARKDOWN_NAME).read_text())
    assert len(losses.losses) == 5 and all(math.isfinite(x) for x in losses.losses), losses.losses
    widths = layer_widths(module.net)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")

    fresh = UserLM(model_type, seed=1)  # dense, other weights
    cb2, losses2 = _callback(), Losses()
    t2 = trainer(tmp_path / "resumed", 7, [cb2, losses2])
    t2.fit(fresh, _loader(model_type), ckpt_path=path)
    assert t2.global_step == 7 and [r.event_step for r in cb2._records] == [3]  # restored, not pruned again
    assert layer_widths(fresh.net) == widths
    assert prunable_parameter_count(fresh.net) == prunable_parameter_count(module.net)
    assert len(losses2.losses) == 2 and all(math.isfinite(x) for x in losses2.losses), losses2.losses
