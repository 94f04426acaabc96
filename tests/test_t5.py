"""T5 (encoder-decoder): units, surgery with the relative position bias, estimators, allocation, report."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from conftest import VOCAB, calib_batches, tiny_t5
from nirvana_pl import PruningPlan, UnsupportedModelError
from nirvana_pl.allocate import AllocationConfig, DenseReference, allocate
from nirvana_pl.calibration import masked
from nirvana_pl.arch import architecture_for_type
from nirvana_pl.hub_code.modeling_nirvana_t5 import KEPT_HEADS
from nirvana_pl.oneshot import prune
from nirvana_pl.plan import LayerPlan
from nirvana_pl.report import PruneRecord, format_summary, kind_fractions, write_report
from nirvana_pl.saliency import compute_scores, output_functional
from nirvana_pl.surgery import apply_plan
from nirvana_pl.units import find_units, prunable_parameter_count

GATED = [False, True]
NEW_TOKENS = 6


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the encoder input
    dec = torch.randint(3, VOCAB, (2, 7), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


@torch.no_grad()
def _outputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**inputs, use_cache=False)
    return out.encoder_last_hidden_state, out.logits


@torch.no_grad()
def _greedy(model, inputs, use_cache: bool = True) -> torch.Tensor:
    # pad/eos suppressed and no token repeated, so that the random model writes a varied sequence whose every
    # step depends on the ranking of the logits.
    return model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, suppress_tokens=[0, 2],
        no_repeat_ngram_size=1,
    )  # fmt: skip


def _plan(model, kept_heads: list[list[int]], ffn_keep: int) -> PruningPlan:
    """A hand-made plan: ``kept_heads`` per unit entry; every FFN keeps its last ``ffn_keep`` channels
    but one (so kept indices are not a prefix)."""
    layers = []
    for u, heads in zip(find_units(model), kept_heads):
        n = u.mlp_width
        mlp = [c for c in range(n) if c != n - 1][-ffn_keep:] if n else []
        layers.append(LayerPlan(u.num_kv_groups, n, heads, mlp, label=u.label, has_mlp=bool(u.mlp_weights)))
    return PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="hand")


# Entries: encoder.0, encoder.1, decoder.0.self, decoder.0.cross, decoder.1.self, decoder.1.cross.
# Head 0 goes in the first block of each stack (which owns the relative bias) and later blocks keep heads
# whose bias columns differ from a prefix, so a wrong column choice changes the outputs.
KEPT = [[1, 3], [0, 2, 3], [2, 3], [1, 2], [0, 1, 3], [3]]


# ----------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("gated", GATED)
def test_units_are_heads_and_ffn_channels(gated):
    model = tiny_t5(gated=gated)
    units = find_units(model)
    assert [u.label for u in units] == [
        "encoder.0", "encoder.1", "decoder.0.self", "decoder.0.cross", "decoder.1.self", "decoder.1.cross",
    ]  # fmt: skip
    assert [u.num_kv_groups for u in units] == [4] * 6
    assert [u.mlp_width for u in units] == [64, 64, 64, 0, 64, 0]
    d, dkv = 32, 8
    assert all(u.kv_group_cost == 4 * dkv * d for u in units)  # q, k, v rows and o columns of one head
    ffn_names = [w.name for w in units[0].mlp_weights]
    assert ffn_names == (["wi_0", "wi_1", "wo"] if gated else ["wi", "wo"])
    assert units[0].mlp_channel_cost == (3 if gated else 2) * d
    assert units[3].mlp_weights == []
    # every attention and FFN parameter, plus the two relative bias tables (never pruned)
    expected = sum(
        p.numel() for n, p in model.named_parameters()
        if any(k in n for k in ("SelfAttention", "EncDecAttention", "DenseReluDense"))
    )  # fmt: skip
    assert prunable_parameter_count(model) == expected
    ref = DenseReference.of(model)
    assert (ref.total_kv_groups, ref.total_mlp_channels) == (24, 4 * 64)


# ---------------------------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("gated", GATED)
def test_pruned_t5_equals_dense_with_removed_units_zeroed(gated):
    model = tiny_t5(gated=gated)
    dense = copy.deepcopy(model)
    plan = _plan(model, KEPT, ffn_keep=40)
    inputs = _inputs()
    with masked(dense, plan):
        enc_ref, logits_ref = _outputs(dense, inputs)
        gen_ref = _greedy(dense, inputs)
    enc_full, logits_full = _outputs(dense, inputs)
    assert not torch.allclose(logits_full, logits_ref, atol=1e-3)  # the plan does change the model

    apply_plan(model, plan)
    enc, logits = _outputs(model, inputs)
    torch.testing.assert_close(enc, enc_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=0)
    gen = _greedy(model, inputs)
    assert torch.equal(gen, gen_ref)
    assert torch.equal(gen, _greedy(model, inputs, use_cache=False))  # the cache path sees the same bias columns

    attns = [u.attn for u in find_units(model)]
    assert all(isinstance(a, architecture_for_type("t5").nirvana_classes()[0]) for a in attns)
    assert [getattr(a, KEPT_HEADS).tolist() for a in attns] == KEPT
    assert [a.n_heads for a in attns] == [len(k) for k in KEPT]
    assert all(a.inner_dim == a.n_heads * 8 and a.q.weight.shape == (a.inner_dim, 32) for a in attns)
    assert model.config.num_heads == 4  # the relative bias keeps one column per original head
    assert model.config.nirvana_t5_layers["decoder"][1] == {"self_heads": [0, 1, 3], "d_ff": 40, "cross_heads": [3]}


@pytest.mark.parametrize("gated", GATED)
def test_second_prune_composes_kept_original_heads(gated):
    model = tiny_t5(gated=gated, seed=4)
    dense = copy.deepcopy(model)
    first = _plan(model, [[0, 1, 3], [0, 2, 3], [1, 2, 3], [0, 1, 2], [0, 1, 3], [1, 3]], ffn_keep=48)
    apply_plan(model, first)
    second = _plan(model, [[1, 2], [0, 2], [0], [1, 2], [0, 1, 2], [1]], ffn_keep=32)
    apply_plan(model, second)

    # The same removal in one plan on the dense model.
    composed = []
    for a, b in zip(first.layers, second.layers):
        composed.append(LayerPlan(a.kv_groups_before, a.mlp_channels_before,
                                  [a.kept_kv_groups[i] for i in b.kept_kv_groups],
                                  [a.kept_mlp_channels[i] for i in b.kept_mlp_channels]))  # fmt: skip
    composed_plan = PruningPlan(layers=composed, target_sparsity=0.0, gamma=1.0, saliency="hand")
    assert [getattr(u.attn, KEPT_HEADS).tolist() for u in find_units(model)] == [c.kept_kv_groups for c in composed]
    inputs = _inputs(seed=5)
    with masked(dense, composed_plan):
        ref = _outputs(dense, inputs)
        gen_ref = _greedy(dense, inputs)
    out = _outputs(model, inputs)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=0)
    assert torch.equal(_greedy(model, inputs), gen_ref)


def test_optimizer_state_follows_the_t5_slices():
    model = tiny_t5(gated=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _inputs()
    model(input_ids=batch["input_ids"], labels=batch["decoder_input_ids"]).loss.backward()
    opt.step()
    q = find_units(model)[2].attn.q.weight
    before = opt.state[q]["exp_avg"].clone()
    apply_plan(model, _plan(model, KEPT, ffn_keep=40), [opt])
    idx = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in KEPT[2]])
    assert torch.equal(opt.state[q]["exp_avg"], before[idx])
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters() if p in opt.state)
    opt.zero_grad()
    model(input_ids=batch["input_ids"], labels=batch["decoder_input_ids"]).loss.backward()
    opt.step()  # training goes on with the sliced state


# -------------------------------------------------------------------------------------------- saliency
def test_functional_uses_teacher_forced_decoder_logits():
    model = tiny_t5(seed=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=gen)
    labels = torch.randint(3, VOCAB, (2, 6), generator=gen)
    labels[0, -2:] = -100
    scores = compute_scores(model, "functional", [{"input_ids": ids, "labels": labels}])

    # By hand: F over the decoder logits of shift_right(labels), label padding excluded.
    q = find_units(model)[2].attn.q.weight  # decoder.0.self
    logits = model(input_ids=ids, decoder_input_ids=model._shift_right(labels), use_cache=False).logits
    (g,) = torch.autograd.grad(output_functional(logits, (labels != -100).long()), [q])
    assert g.abs().sum() > 0
    # q's share of the head scores; compare through the full score of the entry
    by_hand = torch.zeros(4)
    for w in find_units(model)[2].attn_weights:
        (gw,) = torch.autograd.grad(
            output_functional(model(input_ids=ids, decoder_input_ids=model._shift_right(labels)).logits,
                              (labels != -100).long()),
            [w.weight],
        )  # fmt: skip
        s = (gw * w.weight).abs().sum(dim=1 - w.axis)
        by_hand += s.view(-1, 8).sum(1)
    torch.testing.assert_close(scores.attn[2], by_hand, rtol=1e-4, atol=1e-7)

    # Without labels the decoder reads the shift-right of the input ids (documented default).
    only_ids = compute_scores(model, "functional", [ids])
    same = compute_scores(model, "functional", [{"input_ids": ids, "labels": ids}])
    for a, b in zip(only_ids.attn + only_ids.mlp, same.attn + same.mlp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("saliency", ["functional", "taylor_loss", "wanda_sp", "magnitude", "random"])
def test_every_estimator_scores_and_prunes_t5(saliency):
    model = tiny_t5(gated=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    labels = torch.randint(3, VOCAB, (2, 5), generator=gen)  # decoder shorter than the encoder
    calib = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    scores = compute_scores(model, saliency, calib)
    assert [v.numel() for v in scores.attn] == [4] * 6
    assert [v.numel() for v in scores.mlp] == [64, 64, 64, 0, 64, 0]
    assert all(torch.isfinite(v).all() for v in scores.attn + scores.mlp)
    assert all(v.abs().sum() > 0 for v in scores.attn)
    plan = prune(model, 0.4, saliency, calibration=calib, gamma=2.0)
    assert abs(plan.realised_sparsity - 0.4) < 0.05
    out = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert math.isfinite(out.item())


def test_wanda_sp_masks_each_stream_with_its_own_padding():
    model = tiny_t5()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, 8), generator=gen)
    labels = torch.randint(3, VOCAB, (1, 5), generator=gen)
    padded_ids = torch.cat([ids, torch.randint(3, VOCAB, (1, 4), generator=gen)], 1)
    enc_mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], 1).long()
    padded_labels = torch.cat([labels, torch.full((1, 3), -100)], 1)
    plain = compute_scores(model, "wanda_sp", [{"input_ids": ids, "labels": labels}])
    padded = compute_scores(model, "wanda_sp", [{"input_ids": padded_ids, "attention_mask": enc_mask,
                                                  "labels": padded_labels}])  # fmt: skip
    # Padding on either side changes nothing: encoder weights, cross k/v (encoder stream), decoder weights.
    for a, b in zip(plain.attn + plain.mlp, padded.attn + padded.mlp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_seq2seq_calibration_is_a_clear_error():
    model = tiny_t5()
    ids = calib_batches(n=1)[0]
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        compute_scores(model, "functional", [{"input_ids": ids, "labels": torch.zeros(3, 4, dtype=torch.long)}])


# ----------------------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("gated", GATED)
def test_allocation_one_head_pool_one_ffn_pool(gated):
    model = tiny_t5(gated=gated, num_layers=3, num_decoder_layers=2)
    scores = compute_scores(model, "random", seed=3)
    plan = allocate(model, scores, AllocationConfig(sparsity=0.5, gamma=2.0, min_kv_groups=2, mlp_round_to=8))
    assert [layer.label for layer in plan.layers][-1] == "decoder.1.cross"
    assert all(len(layer.kept_kv_groups) >= 2 for layer in plan.layers)
    assert all(w % 8 == 0 for w in plan.mlp_widths_kept())
    assert [len(layer.kept_mlp_channels) for layer in plan.layers if layer.label.endswith(".cross")] == [0, 0]
    # the attention-only entries are known from the units (not from the labels), survive JSON, and stay out of
    # the fingerprint (which predates the flag)
    assert [plan.layers[i].label for i in plan.entries_without_mlp()] == ["decoder.0.cross", "decoder.1.cross"]
    assert PruningPlan.from_json(plan.to_json()).entries_without_mlp() == plan.entries_without_mlp()
    assert dataclasses.replace(plan, layers=[dataclasses.replace(layer, has_mlp=True) for layer in plan.layers]
                               ).fingerprint() == plan.fingerprint()  # fmt: skip
    assert abs(plan.realised_sparsity - 0.5) < 0.03
    ref = DenseReference.of(model)
    frac = plan.fraction_removed()
    assert frac["mlp_channels"] == pytest.approx(1 - sum(plan.mlp_widths_kept()) / ref.total_mlp_channels)
    assert frac["mlp_channels"] > frac["kv_groups"]  # gamma = 2
    # The plan is what surgery removes, counted on the real modules.
    apply_plan(model, plan)
    assert prunable_parameter_count(model) == plan.params_after
    assert PruningPlan.from_json(plan.to_json()).layers == plan.layers

    uniform = tiny_t5(gated=gated, num_layers=3, num_decoder_layers=2)
    uplan = allocate(uniform, scores, AllocationConfig(sparsity=0.5, gamma=2.0, uniform=True, mlp_round_to=8))
    assert len(set(uplan.kv_groups_kept())) == 1
    assert len({w for layer, w in zip(uplan.layers, uplan.mlp_widths_kept()) if not layer.label.endswith("cross")}) == 1


def test_iterative_targets_stay_relative_to_the_dense_t5():
    model = tiny_t5(gated=True)
    dense_params = prunable_parameter_count(model)
    prune(model, 0.25, "magnitude")
    plan = prune(model, 0.5, "magnitude")
    assert abs(plan.realised_sparsity - 0.5) < 0.05
    assert prunable_parameter_count(model) == pytest.approx(dense_params * (1 - plan.realised_sparsity), abs=1)
    assert DenseReference.of(model).num_mlp_layers == 4  # remembered in the config


def test_decoder_plans_keep_their_json():
    from conftest import tiny_llama

    model = tiny_llama()
    plan = prune(model, 0.3, "magnitude")
    assert "label" not in plan.to_dict()["layers"][0]
    assert "num_mlp_layers" not in DenseReference.of(tiny_llama()).to_dict()


# --------------------------------------------------------------------------------------------- report
def test_report_shows_the_share_each_kind_lost(tmp_path):
    model = tiny_t5(gated=True)
    ref = DenseReference.of(model)
    before = sum(p.numel() for p in model.parameters())
    plan = _plan(model, KEPT, ffn_keep=40)
    apply_plan(model, plan)
    record = PruneRecord(0, plan, before, sum(p.numel() for p in model.parameters()),
                         prunable_parameter_count(model), 0.1)  # fmt: skip
    kinds = kind_fractions(plan, ref)
    assert kinds == pytest.approx({"encoder": 1 - 5 / 8, "decoder.self": 1 - 5 / 8, "decoder.cross": 1 - 3 / 8})
    metrics = record.metrics(ref)
    assert metrics["heads_removed_decoder_cross"] == pytest.approx(5 / 8)
    text = format_summary(record, ref)
    assert "decoder.cross 62.5%" in text
    cross_row = next(line for line in text.splitlines() if line.strip().startswith("decoder.1.cross"))
    assert "1/4 (25%)" in cross_row and " - " in cross_row
    path = write_report(tmp_path, [record], ref)
    md = (tmp_path / "nirvana_prune_report.md").read_text()
    assert "decoder.cross" in md and "| decoder.0.cross |" in md
    assert path.is_file()


# ----------------------------------------------------------------------------------------- bad input
def test_heads_tied_across_layers_are_refused():
    model = tiny_t5()
    model.decoder.block[1].layer[1].EncDecAttention.k = model.decoder.block[0].layer[1].EncDecAttention.k
    with pytest.raises(
        UnsupportedModelError, match=r"decoder.block\[1\].EncDecAttention.k.weight is the same Parameter"
    ):
        find_units(model)


def test_ffn_tied_across_layers_is_refused():
    model = tiny_t5(gated=True)
    model.encoder.block[1].layer[-1].DenseReluDense.wo = model.encoder.block[0].layer[-1].DenseReluDense.wo
    with pytest.raises(UnsupportedModelError, match="FFN weights tied across layers"):
        prune(model, 0.3, "magnitude")


def test_relative_bias_in_a_later_block_is_refused():
    model = tiny_t5()
    attn = model.encoder.block[1].layer[0].SelfAttention
    attn.relative_attention_bias = torch.nn.Embedding(8, 4)
    match = r"encoder.block\[1\].SelfAttention owns relative_attention_bias, but.*only the self-attention of the first"
    with pytest.raises(UnsupportedModelError, match=match):
        find_units(model)


def test_missing_relative_bias_in_the_first_block_is_refused():
    model = tiny_t5()
    del model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias
    with pytest.raises(UnsupportedModelError, match="has no relative_attention_bias"):
        find_units(model)


def test_kl_selection_refuses_t5_clearly():
    from nirvana_pl import CalibrationSelector

    pool = torch.randint(3, VOCAB, (40, 8))
    selector = CalibrationSelector(
        pool=pool, num_candidates=2, samples_per_candidate=4, probe_windows=8, probe_seq_len=None
    )
    with pytest.raises(ValueError, match="causal LM"):
        selector.select(tiny_t5(), "functional", AllocationConfig(sparsity=0.3))
