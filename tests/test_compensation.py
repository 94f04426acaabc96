"""Compensation: the kept input columns of o_proj / down_proj take over what the removed units contributed."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import calib_batches, tiny_llama, tiny_qwen2, tiny_t5
from nirvana_pl.allocate import AllocationConfig, DenseReference, allocate
from nirvana_pl.calibration import masked
from nirvana_pl.compensation import CompensationError, _column_update, _column_weights, plan_compensation
from nirvana_pl.oneshot import prune
from nirvana_pl.saliency import compute_scores
from nirvana_pl.surgery import apply_plan
from nirvana_pl.units import find_units


def _plan(model, sparsity=0.4, saliency="magnitude"):
    scores = compute_scores(model, saliency, calib_batches())
    return allocate(model, scores, AllocationConfig(sparsity=sparsity, gamma=2.0), DenseReference.of(model))


def _down_inputs(model, batches, layer=0):
    seen = []
    mlp = model.model.layers[layer].mlp.down_proj
    handle = mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    handle.remove()
    return torch.cat(seen)


def test_update_is_the_ridge_regression_of_the_removed_inputs_on_the_kept():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen) @ torch.randn(6, 6, generator=gen)  # correlated inputs
    kept, removed = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 4])
    update = _column_update((x.T @ x).double(), kept, damping=1e-9)
    exact = torch.linalg.lstsq(x[:, kept].double(), x[:, removed].double()).solution  # [kept, removed]
    torch.testing.assert_close(update.predict.double(), exact.T, rtol=1e-4, atol=1e-4)
    w = torch.randn(3, 6, generator=gen)
    new = update(w)
    assert torch.equal(new[:, removed], w[:, removed])  # the removed columns are left to the surgery
    torch.testing.assert_close(new[:, kept], w[:, kept] + w[:, removed] @ exact.T.float(), rtol=1e-4, atol=1e-4)


def test_damping_shrinks_the_update_toward_none():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 5, generator=gen) @ torch.randn(5, 5, generator=gen)
    kept = torch.tensor([0, 1, 3])
    sizes = [_column_update(x.T @ x, kept, d).predict.norm() for d in (1e-3, 1.0, 1e3)]
    assert sizes[0] > sizes[1] > sizes[2] and sizes[2] < 1e-2 * sizes[0]


def test_compensation_lowers_a_layers_output_error_on_its_batches():
    model, batches = tiny_llama(), calib_batches(n=4, batch=4, seq=16)
    plan = _plan(model)
    layer = next(i for i, lp in enumerate(plan.layers) if len(lp.kept_mlp_channels) < lp.mlp_channels_before)
    kept = torch.tensor(plan.layers[layer].kept_mlp_channels)
    x = _down_inputs(model, batches, layer)
    w = model.model.layers[layer].mlp.down_proj.weight.detach().clone()
    target = x @ w.T
    compensation = plan_compensation(model, plan, batches, damping=0.01)
    assert torch.equal(model.model.layers[layer].mlp.down_proj.weight, w)  # planning changes no weight
    compensation.apply_()
    w_new = model.model.layers[layer].mlp.down_proj.weight.detach()
    plain = (x[:, kept] @ w[:, kept].T - target).square().sum()
    compensated = (x[:, kept] @ w_new[:, kept].T - target).square().sum()
    assert compensated < 0.98 * plain
    assert compensation.summary() == {"weights": len(compensation.updates), "tokens": 4 * 4 * 16, "damping": 0.01}


def test_groups_of_layers_give_the_same_updates_as_one_pass():
    model, batches = tiny_qwen2(), calib_batches()
    plan = _plan(model)
    one = plan_compensation(model, plan, batches)
    several = plan_compensation(model, plan, batches, max_gram_bytes=1)  # one weight per pass
    assert one.updates.keys() == several.updates.keys() and len(one.updates) >= 2
    for key, update in one.updates.items():
        torch.testing.assert_close(several.updates[key].predict, update.predict)


def test_ranks_fit_on_the_gram_matrices_reduce_gives_them():
    """Under data parallelism ``reduce`` replaces each rank's mean Gram matrices by the mean over all ranks' batches:
    here by those of another rank's batches (the updates must then be that rank's), and what it receives is this
    rank's mean (the Gram over its batches / its samples), one tensor per weight updated."""
    model, mine, theirs = tiny_llama(), calib_batches(seed=0), calib_batches(seed=7)
    plan = _plan(model)
    captured = {}

    def capture(tensors, n_samples):
        captured["means"] = [t.clone() for t in tensors]

    plan_compensation(model, plan, theirs, reduce=capture, max_gram_bytes=1 << 40)  # (one group)
    received = []

    def reduce(tensors, n_samples):
        received.append(([t.clone() for t in tensors], n_samples))
        for t, other in zip(tensors, captured["means"]):
            t.copy_(other)

    reduced = plan_compensation(model, plan, mine, reduce=reduce, max_gram_bytes=1 << 40)
    expected = plan_compensation(model, plan, theirs)
    assert len(received) == 1 and received[0][1] == 4 and len(received[0][0]) == len(expected.updates)
    for key, update in expected.updates.items():
        torch.testing.assert_close(reduced.updates[key].predict, update.predict)
    local = plan_compensation(model, plan, mine)
    assert any(not torch.allclose(local.updates[k].predict, u.predict) for k, u in expected.updates.items())
    jobs = [w for u, lp in zip(find_units(model), plan.layers) for w, _ in _column_weights(u, lp)]
    down0 = jobs.index(next(w for w in find_units(model)[0].mlp_weights if w.axis == 1))
    x = _down_inputs(model, mine, 0).double()  # this rank's mean for layer 0's down_proj: its Gram / its 4 samples
    torch.testing.assert_close(received[0][0][down0].double(), x.T @ x / 4, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_and_lora_adapters_take_the_same_update():
    from peft import LoraConfig, get_peft_model

    t5 = tiny_t5()
    src = calib_batches(seq=10)
    batches = [{"input_ids": b, "labels": b} for b in src]
    plan = _plan_t5(t5, batches)
    comp = plan_compensation(t5, plan, batches)
    assert comp.updates  # the o / wo weights of the encoder and decoder stacks

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    inner = model.base_model.model
    plan = _plan(inner)
    comp = plan_compensation(inner, plan, calib_batches())
    layer = find_units(inner)[0].mlp_weights
    down = next(w for w in layer if w.axis == 1)
    a = down.adapters[0].A.weight
    assert id(down.weight) in comp.updates and id(a) in comp.updates
    assert comp.updates[id(a)] is comp.updates[id(down.weight)]


def _plan_t5(model, batches):
    scores = compute_scores(model, "functional", batches)
    return allocate(model, scores, AllocationConfig(sparsity=0.3, gamma=2.0), DenseReference.of(model))


def test_prune_compensates_before_the_cut_and_records_it():
    model, batches = tiny_llama(), calib_batches(n=4, batch=4, seq=16)
    twin = copy.deepcopy(model)
    plan = prune(model, 0.4, "functional", batches, compensate=True)
    assert plan.score_summary["compensation"]["weights"] > 0
    plain = prune(twin, 0.4, "functional", batches)
    assert plain.fingerprint() == plan.fingerprint() and "compensation" not in plain.score_summary
    # same shapes; only the weights units own by column (o_proj, down_proj) differ
    changed = set()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert a.shape == b.shape
        if not torch.equal(a, b):
            changed.add(name.split(".")[-2])
    assert changed == {"down_proj", "o_proj"}


def test_compensated_cut_is_what_the_mask_computes_with_the_updated_weights():
    model, batches = tiny_llama(), calib_batches()
    plan = _plan(model)
    plan_compensation(model, plan, batches).apply_()
    x = calib_batches(n=1, seed=5)[0]
    with masked(model, plan), torch.no_grad():
        want = model(input_ids=x).logits
    apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(compensate=True), "pass calibration"),
        (dict(compensate="yes", calibration=calib_batches()), "compensate='yes'"),
        (dict(compensate=True, compensation_damping=1e-3, calibration=calib_batches()), "must be a number >= 0.01"),
    ],
)
def test_prune_refuses_bad_compensation_arguments(kw, match):
    with pytest.raises(CompensationError, match=match):
        prune(tiny_llama(), 0.3, "magnitude", **kw)


def test_a_bf16_autocast_fit_sums_and_solves_in_fp32():
    from nirvana_pl.compensation import _column_weights, _grams

    model, batches = tiny_llama(), [{"input_ids": b} for b in calib_batches()]
    plan = _plan(model)
    units = find_units(model)
    group = [(u, w, kept) for u, lp in zip(units, plan.layers) for w, kept in _column_weights(u, lp)]
    inputs = []
    handle = group[0][1].linear.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grams, _ = _grams(model, group, batches)
        handle.remove()
        mixed = plan_compensation(model, plan, batches)
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()
    gram = grams[id(group[0][1])]
    assert gram.dtype == torch.float32  # (autocast would have summed x^T x in bf16)
    torch.testing.assert_close(gram.double(), x.T @ x, rtol=1e-5, atol=1e-5)
    assert mixed.updates  # (and the solve ran with autocast on around it)


def test_nothing_to_compensate_when_no_column_weight_shrinks():
    from nirvana_pl.compensation import compensates_anything

    model = tiny_llama()
    none = AllocationConfig(sparsity=0.0)
    identity = allocate(model, compute_scores(model, "magnitude"), none, DenseReference.of(model))
    assert not compensates_anything(model, identity) and compensates_anything(model, _plan(model))
    assert plan_compensation(model, identity, calib_batches()).updates == {}
    batches = (b for b in calib_batches(n=4, batch=4, seq=16))  # a generator: read by the scores, then the fit
    assert prune(model, 0.4, "functional", batches, compensate=True).compensated
