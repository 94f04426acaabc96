"""T5 export: pruned T5 folders reload with stock transformers (remote code) and with load_pruned;
NirvanaPruningCallback prunes a Seq2SeqLMModule T5 mid-fit and resumes from a checkpoint."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from conftest import VOCAB, tiny_t5
from lightning_helpers import Losses, trainer
from nirvana_pl import NirvanaPruningCallback
from nirvana_pl.export import load_pruned, save_pruned
from nirvana_pl.arch import architecture_for_type
from nirvana_pl.hub_code import modeling_nirvana_t5
from nirvana_pl.hub_code.modeling_nirvana_t5 import KEPT_HEADS
from nirvana_pl.oneshot import prune
from nirvana_pl.arch.t5 import t5_layers
from nirvana_pl.units import find_units
from nirvana_pl.surgery import apply_plan
from test_t5 import _greedy, _inputs, _plan
from without_nirvana_pl import run_without_nirvana_pl

CHILD = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForSeq2SeqLM

    exp = torch.load(expected_file, weights_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "NirvanaT5ForConditionalGeneration", type(model)
    assert "nirvana_pl" not in sys.modules
    inputs = exp["inputs"]
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
        gen = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True,
                             suppress_tokens=[0, 2], no_repeat_ngram_size=1)
    err = (logits - exp["logits"]).abs().max().item()
    assert torch.allclose(logits, exp["logits"], atol=1e-5, rtol=0), f"max |logits diff| = {err}"
    assert torch.equal(gen, exp["generated"]), (gen.tolist(), exp["generated"].tolist())
    print("CHILD_OK", err)
    """
)


def _pruned(gated: bool):
    model = tiny_t5(gated=gated)
    prune(model, 0.4, "magnitude", gamma=1.5)
    heads = [len(getattr(u.attn, KEPT_HEADS)) for u in find_units(model)]
    assert len(set(heads)) > 1, f"test needs attentions of different widths, got {heads}"
    return model


@torch.no_grad()
def _logits(model, inputs):
    return model(**inputs, use_cache=False).logits.float()


@pytest.mark.parametrize("gated", [False, True])
def test_pruned_t5_loads_with_stock_transformers_without_nirvana_pl(gated, tmp_path):
    model = _pruned(gated)
    folder = save_pruned(model, tmp_path / "pruned")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "nirvana_t5"
    assert cfg["nirvana_t5_layers"] == t5_layers(model)
    assert cfg["num_heads"] == 4
    assert cfg["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_nirvana_t5.NirvanaT5ForConditionalGeneration"
    shipped = (folder / "modeling_nirvana_t5.py").read_text()
    assert shipped.startswith(Path(modeling_nirvana_t5.__file__).read_text().rstrip())
    assert shipped == architecture_for_type("t5").hub_code()

    inputs = _inputs()
    expected = tmp_path / "expected.pt"
    torch.save({"inputs": inputs, "logits": _logits(model, inputs), "generated": _greedy(model, inputs)}, expected)
    run_without_nirvana_pl(CHILD, folder, expected, tmp_path)


@pytest.mark.parametrize("gated", [False, True])
def test_load_pruned_t5_equal_logits_generation_and_reprune(gated, tmp_path):
    model = _pruned(gated)
    folder = save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(folder).eval()
    inputs = _inputs()
    torch.testing.assert_close(_logits(loaded, inputs), _logits(model, inputs), atol=1e-6, rtol=0)
    assert torch.equal(_greedy(loaded, inputs), _greedy(model, inputs))
    assert t5_layers(loaded) == t5_layers(model)
    # A loaded model prunes further, relative to the dense model it remembers, and saves again.
    plan = prune(loaded, 0.55, "magnitude", gamma=1.5)
    assert abs(plan.realised_sparsity - 0.55) < 0.05
    again = load_pruned(save_pruned(loaded, tmp_path / "again")).eval()
    torch.testing.assert_close(_logits(again, inputs), _logits(loaded, inputs), atol=1e-6, rtol=0)


def test_ffn_only_uniform_pruning_saves_a_stock_t5_folder(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = tiny_t5(gated=True)
    apply_plan(model, _plan(model, [[0, 1, 2, 3]] * 6, ffn_keep=48))  # all heads, one FFN width
    assert model.config.d_ff == 48 and not hasattr(model.config, "nirvana_t5_layers")
    folder = save_pruned(model, tmp_path / "stock")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "t5" and "nirvana_t5_layers" not in cfg and "auto_map" not in cfg
    assert cfg["d_ff"] == 48
    stock = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    assert type(stock).__name__ == "T5ForConditionalGeneration"
    inputs = _inputs()
    torch.testing.assert_close(_logits(stock, inputs), _logits(model, inputs), atol=1e-6, rtol=0)
    assert type(load_pruned(folder)).__name__ == "T5ForConditionalGeneration"


def test_bad_nirvana_t5_layers_are_a_clear_error(tmp_path):
    folder = save_pruned(_pruned(False), tmp_path / "pruned")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["nirvana_t5_layers"]["decoder"][0]["cross_heads"] = [3, 1]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"nirvana_t5_layers\['decoder'\]\[0\]\['cross_heads'\]"):
        load_pruned(folder)


# ------------------------------------------------------------------------------------------ callback
T5_CONFIG = dict(
    model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
    num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
)  # fmt: skip


def _seq2seq_loader(n: int = 48, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(3, VOCAB, (n, 1), generator=gen)
    rows = (starts + torch.arange(16)) % (VOCAB - 3) + 3  # learnable: continue the count
    data = [{"input_ids": r[:10], "labels": r[10:]} for r in rows]
    return DataLoader(data, batch_size=batch_size)


def _module(seed: int = 0):
    from nirvana_pl.modules import Seq2SeqLMModule

    return Seq2SeqLMModule(config=T5_CONFIG, lr=3e-3, seed=seed)


@pytest.mark.parametrize("saliency", ["adam_taylor", "functional"])
def test_callback_prunes_t5_mid_fit_and_training_continues(saliency, tmp_path):
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=6, warmup_steps=3, saliency=saliency, gamma=1.5,
                                num_calibration_batches=3)
    losses = Losses()
    module = _module()
    dense = sum(p.numel() for p in module.parameters())
    t = trainer(tmp_path, 14, [cb, losses])
    t.fit(module, _seq2seq_loader())
    assert len(cb.plans) == 1 and t.global_step == 14
    assert abs(cb.plans[0].realised_sparsity - 0.4) < 0.05
    assert sum(p.numel() for p in module.parameters()) < dense
    assert len(losses.losses) == 14 and all(math.isfinite(x) for x in losses.losses)
    assert losses.losses[-1] < losses.losses[0]
    report = json.loads(cb.report_path.read_text())
    event = report["events"][0]
    assert {"heads_removed_encoder", "heads_removed_decoder_self", "heads_removed_decoder_cross"} <= set(event)
    assert event["layer_labels"][3] == "decoder.0.cross"


def test_callback_resumes_a_pruned_t5_from_a_checkpoint(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="adam_taylor", gamma=1.5)
    module = _module()
    t = trainer(tmp_path, 6, [cb, ckpt], enable_checkpointing=True)
    t.fit(module, _seq2seq_loader())
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    layers = t5_layers(module.model)

    fresh = _module(seed=1)  # dense, other weights
    cb2 = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2, saliency="adam_taylor", gamma=1.5)
    losses = Losses()

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {n: t.detach().clone() for n, t in pl_module.state_dict().items()}

    at_start = AtStart()
    t2 = trainer(tmp_path / "resumed", 9, [cb2, losses, at_start])
    t2.fit(fresh, _seq2seq_loader(), ckpt_path=path)
    assert t5_layers(fresh.model) == layers  # shapes and kept original heads restored
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert any(n.endswith(KEPT_HEADS) for n in saved)
    assert set(at_start.state) == set(saved)
    assert all(torch.equal(at_start.state[n], saved[n]) for n in saved)
    assert [r.event_step for r in cb2._records] == [4]
    assert t2.global_step == 9 and all(math.isfinite(x) for x in losses.losses)
    inputs = _inputs()
    with torch.no_grad():
        assert torch.isfinite(fresh.model(**inputs).logits).all()
