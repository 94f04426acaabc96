"""saliency.py: estimators -> per-unit scores (METHOD.md section 2)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import MAX_POS, calib_batches, tiny_llama, tiny_qwen2
from nirvana_pl.allocate import AllocationConfig, allocate
from nirvana_pl.saliency import (
    ADAM_ESTIMATORS,
    ESTIMATORS,
    HYBRID_ESTIMATORS,
    AdamStateSaliency,
    SaliencyError,
    UnitScores,
    _gradient_saliency,
    accumulate_adam_saliency,
    adam_part,
    compute_scores,
    geometric_mean,
    random_scores,
)
from nirvana_pl.sampling import sample_like
from nirvana_pl.surgery import apply_plan
from nirvana_pl.units import find_units

NON_ADAM = [e for e in ESTIMATORS if adam_part(e) is None]


def _shapes_ok(model, scores: UnitScores) -> None:
    units = find_units(model)
    assert isinstance(scores, UnitScores)
    assert len(scores.attn) == len(scores.mlp) == len(units)
    for u, a, m in zip(units, scores.attn, scores.mlp):
        assert a.shape == (u.num_kv_groups,)
        assert m.shape == (u.mlp_width,)
        for v in (a, m):
            assert v.dtype == torch.float32
            assert torch.isfinite(v).all()
            assert (v >= 0).all()


def _unit_sums(model, per_weight) -> UnitScores:
    """Reference reduction: ``per_weight(name, linear) -> tensor like the weight``; unit = sum of its
    rows (q, k, v, gate, up) and columns (o, down)."""
    attn, mlp = [], []
    for u in find_units(model):
        a, m = u.attn, u.mlp
        G = u.num_kv_groups
        def rows(name, lin, n):
            return per_weight(name, lin).double().sum(1).view(n, -1).sum(1)
        def cols(name, lin, n):
            return per_weight(name, lin).double().sum(0).view(n, -1).sum(1)
        attn.append(
            (rows("q_proj", a.q_proj, G) + rows("k_proj", a.k_proj, G) + rows("v_proj", a.v_proj, G)
             + cols("o_proj", a.o_proj, G)).float()
        )
        width = u.mlp_width
        mlp.append((rows("gate_proj", m.gate_proj, width) + rows("up_proj", m.up_proj, width)
                    + cols("down_proj", m.down_proj, width)).float())
    return UnitScores(attn, mlp)


def _close(a: UnitScores, b: UnitScores, rtol=1e-4) -> None:
    for x, y in zip(a.attn + a.mlp, b.attn + b.mlp):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-7 + rtol * float(y.abs().max()))


# ---------------------------------------------------------------------------------------
# every non-Adam estimator through compute_scores
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NON_ADAM)
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_compute_scores_shapes_finite_fp32(name, factory):
    model = factory()
    model.train()  # estimators must restore the mode
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # frozen weights are still scored
    flags["model.layers.0.mlp.up_proj.weight"] = False
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = compute_scores(model, name, calibration=calib_batches())
    _shapes_ok(model, scores)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n], n
        assert p.grad is None, n
    again = compute_scores(model, name, calibration=calib_batches())
    for x, y in zip(scores.attn + scores.mlp, again.attn + again.mlp):
        assert torch.equal(x, y)  # deterministic
    if name != "random":
        # scores come from the weights: a unit whose weights are all zero scores exactly zero
        z = copy.deepcopy(model)
        with torch.no_grad():
            u = find_units(z)[1]
            u.mlp.gate_proj.weight[5] = 0
            u.mlp.up_proj.weight[5] = 0
            u.mlp.down_proj.weight[:, 5] = 0
        assert compute_scores(z, name, calibration=calib_batches()).mlp[1][5] == 0


@pytest.mark.parametrize("name", ["magnitude", "functional"])
def test_scores_are_fp32_for_bf16_model(name):
    model = tiny_llama().to(torch.bfloat16)
    scores = compute_scores(model, name, calibration=calib_batches(n=1))
    _shapes_ok(model, scores)


def test_scores_follow_pruned_shapes():
    model = tiny_llama()
    plan = allocate(model, random_scores(model, seed=1), AllocationConfig(sparsity=0.4))
    apply_plan(model, plan)
    for name in NON_ADAM:
        _shapes_ok(model, compute_scores(model, name, calibration=calib_batches(n=1)))


def test_magnitude_matches_reference():
    model = tiny_qwen2()
    ref = _unit_sums(model, lambda _n, lin: lin.weight.detach().abs())
    _close(compute_scores(model, "magnitude"), ref)


def test_random_is_seeded():
    model = tiny_llama()
    a, b, c = (compute_scores(model, "random", seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.attn + a.mlp, b.attn + b.mlp))
    assert not all(torch.equal(x, y) for x, y in zip(a.mlp, c.mlp))


def test_wanda_sp_matches_reference():
    model = tiny_llama()
    batches = calib_batches(n=2)
    norms_sq: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            def hook(mod, args):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                norms_sq[id(mod)] = norms_sq.get(id(mod), 0) + x.square().sum(0)
            hooks.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    n_samples = sum(b.shape[0] for b in batches)  # norms are per calibration sample (same ranking)
    ref = _unit_sums(
        model, lambda _n, lin: lin.weight.detach().double().abs() * (norms_sq[id(lin)] / n_samples).sqrt()[None, :]
    )
    _close(compute_scores(model, "wanda_sp", calibration=batches), ref)


# ---------------------------------------------------------------------------------------
# functional: signed gradients averaged over samples, |.| after the average
# ---------------------------------------------------------------------------------------
def _manual_functional_grads(model, batches, masks=None):
    units = find_units(model)
    lins = {}
    for u in units:
        for w in u.attn_weights + u.mlp_weights:
            lins[id(w.linear)] = w.linear
    params = [lin.weight for lin in lins.values()]
    n_total = sum(b.shape[0] for b in batches)
    total = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    per_batch_abs = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    for i, ids in enumerate(batches):
        mask = None if masks is None else masks[i]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        if mask is not None:
            logits = logits.masked_fill(mask[..., None] == 0, float("-inf"))
        F = logits.max(dim=1).values.mean()  # mean over b, v of max over t
        grads = torch.autograd.grad(F, params)
        for p, g in zip(params, grads):
            total[id(p)] += g.double() * ids.shape[0] / n_total
            per_batch_abs[id(p)] += (g.double() * p.detach().double()).abs() * ids.shape[0] / n_total
    return total, per_batch_abs


def test_functional_averages_signed_grads_before_abs():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randint(3, 128, (2, 9), generator=gen), torch.randint(3, 128, (3, 9), generator=gen)]
    G, abs_first = _manual_functional_grads(model, batches)
    ref = _unit_sums(model, lambda _n, lin: (G[id(lin.weight)] * lin.weight.detach().double()).abs())
    got = compute_scores(model, "functional", calibration=batches)
    _close(got, ref)
    # the order matters (the test can tell): |mean g*W| != mean |g*W|
    wrong = _unit_sums(model, lambda _n, lin: abs_first[id(lin.weight)])
    diff = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(got.mlp, wrong.mlp))
    assert diff > 1e-3


def test_functional_ignores_padded_positions():
    model = tiny_llama()
    ids = calib_batches(n=1, batch=2, seq=10)[0]
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    other = ids.clone()
    other[1, 7:] = 5  # different tokens under the padding
    a = compute_scores(model, "functional", calibration=[{"input_ids": ids, "attention_mask": mask}])
    b = compute_scores(model, "functional", calibration=[{"input_ids": other, "attention_mask": mask}])
    _close(a, b, rtol=1e-5)
    G, _ = _manual_functional_grads(model, [ids], masks=[mask])
    _close(a, _unit_sums(model, lambda _n, lin: (G[id(lin.weight)] * lin.weight.detach().double()).abs()))


@pytest.mark.parametrize("name", ["taylor_loss", "wanda_sp"])
def test_calibration_estimators_ignore_padded_positions(name):
    model = tiny_llama()
    ids = calib_batches(n=1, batch=2, seq=10)[0]
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    other = ids.clone()
    other[1, 7:] = 5
    a = compute_scores(model, name, calibration=[{"input_ids": ids, "attention_mask": mask}])
    b = compute_scores(model, name, calibration=[{"input_ids": other, "attention_mask": mask}])
    _close(a, b, rtol=1e-5)


def test_taylor_loss_matches_reference():
    model = tiny_llama()
    batches = calib_batches(n=2, batch=2, seq=9, seed=4)
    params = [w.weight for u in find_units(model) for w in u.attn_weights + u.mlp_weights]
    G = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    for ids in batches:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            G[id(p)] += g.double() / len(batches)
    ref = _unit_sums(model, lambda _n, lin: (G[id(lin.weight)] * lin.weight.detach().double()).abs())
    _close(compute_scores(model, "taylor_loss", calibration=batches), ref)


# ---------------------------------------------------------------------------------------
# Adam-state estimators
# ---------------------------------------------------------------------------------------
def _step(model, opt, seed):
    ids = calib_batches(n=1, batch=2, seq=8, seed=seed)[0]
    model.train()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()


def _adam_reference(model, opt, kind) -> UnitScores:
    b1, b2 = opt.param_groups[0]["betas"]

    def per_weight(_n, lin):
        st = opt.state[lin.weight]
        t = float(st["step"])
        W = lin.weight.detach().double()
        v_hat = st["exp_avg_sq"].double() / (1 - b2**t)
        m_hat = st["exp_avg"].double() / (1 - b1**t)
        if kind == "adam_taylor":
            return W.abs() * v_hat.sqrt()
        if kind == "adam_fisher":
            return W.square() * v_hat
        return (W * m_hat).abs()

    return _unit_sums(model, per_weight)


@pytest.mark.parametrize("kind", ADAM_ESTIMATORS)
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_adam_state_saliency_matches_direct_computation(kind, factory):
    model = factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.85, 0.97))
    acc = AdamStateSaliency(kind)
    refs = []
    for step in range(3):
        _step(model, opt, seed=step)
        acc.accumulate(model, opt)
        refs.append(_adam_reference(model, opt, kind))
    assert acc.steps == 3
    mean_ref = UnitScores(
        attn=[sum(r.attn[i] for r in refs) / 3 for i in range(len(refs[0].attn))],
        mlp=[sum(r.mlp[i] for r in refs) / 3 for i in range(len(refs[0].mlp))],
    )
    scores = acc.scores()
    _shapes_ok(model, scores)
    _close(scores, mean_ref)
    # compute_scores passes the accumulated scores through
    assert compute_scores(model, kind, optimizer_scores=scores) is scores
    # state_dict round trip
    other = AdamStateSaliency(kind)
    other.load_state_dict(acc.state_dict())
    _close(other.scores(), scores, rtol=0)
    assert other.steps == acc.steps


def test_adam_estimators_in_one_pass_equal_separate_passes_and_read_each_weight_once():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    together = [AdamStateSaliency(kind) for kind in ADAM_ESTIMATORS]
    separate = [AdamStateSaliency(kind) for kind in ADAM_ESTIMATORS]
    reads: list[int] = []

    def reader(p):  # what a DeepSpeed reader returns, counting the (collective) calls
        reads.append(id(p))
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        return p.detach(), opt.state[p], group

    for step in range(2):
        _step(model, opt, seed=step)
        accumulate_adam_saliency(together, model, opt, reader)
        for acc in separate:
            acc.accumulate(model, opt)
    n_weights = sum(len(u.attn_weights) + len(u.mlp_weights) for u in find_units(model))
    assert len(reads) == 2 * n_weights and len(set(reads)) == n_weights
    for a, b in zip(together, separate):
        assert a.steps == b.steps == 2
        _close(a.scores(), b.scores(), rtol=1e-6)


@pytest.mark.parametrize("kind", ADAM_ESTIMATORS)
def test_adam_state_saliency_with_sgd_points_to_functional(kind):
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    _step(model, opt, seed=0)
    with pytest.raises(SaliencyError, match="functional"):
        AdamStateSaliency(kind).accumulate(model, opt)


def test_adam_state_saliency_before_any_step_raises():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    acc = AdamStateSaliency("adam_taylor")
    with pytest.raises(SaliencyError):
        acc.scores()
    with pytest.raises(SaliencyError):
        acc.accumulate(model, opt)


def test_adam_state_saliency_frozen_weight_raises():
    model = tiny_llama()
    frozen = model.model.layers[2].mlp.down_proj.weight
    opt = torch.optim.AdamW([p for p in model.parameters() if p is not frozen])
    _step(model, opt, seed=0)
    with pytest.raises(SaliencyError, match="functional"):
        AdamStateSaliency("adam_fisher").accumulate(model, opt)


def test_loading_adam_state_saliency_copies_the_given_tensors():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt, 0)
    source = AdamStateSaliency("adam_fisher")
    source.accumulate(model, opt)
    saved = source.state_dict()
    before = [t.clone() for t in saved["total"]["attn"]]
    loaded = AdamStateSaliency("adam_fisher")
    loaded.load_state_dict(saved)
    _step(model, opt, 1)
    loaded.accumulate(model, opt)  # adds in place into its own copies
    assert all(torch.equal(a, b) for a, b in zip(saved["total"]["attn"], before))
    assert loaded.steps == 2


def test_adam_state_saliency_shape_change_needs_reset():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    acc = AdamStateSaliency("adam_taylor")
    _step(model, opt, 0)
    acc.accumulate(model, opt)
    apply_plan(model, allocate(model, acc.scores(), AllocationConfig(sparsity=0.3)), [opt])
    _step(model, opt, 1)
    with pytest.raises(SaliencyError, match="reset"):
        acc.accumulate(model, opt)
    acc.reset()
    acc.accumulate(model, opt)
    _shapes_ok(model, acc.scores())


def test_unknown_adam_kind_raises():
    with pytest.raises(ValueError):
        AdamStateSaliency("functional")


@pytest.mark.parametrize("kind", ADAM_ESTIMATORS + tuple(HYBRID_ESTIMATORS))
def test_compute_scores_adam_without_optimizer_scores_raises(kind):
    with pytest.raises(SaliencyError, match="functional"):
        compute_scores(tiny_llama(), kind, calibration=calib_batches(n=1))


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="functional"):
        compute_scores(tiny_llama(), "wanda")


# ---------------------------------------------------------------------------------------
# calibration validation
# ---------------------------------------------------------------------------------------
def _good():
    return calib_batches(n=1)[0]


@pytest.mark.parametrize(
    "bad",
    [
        torch.randint(0, 128, (12,)),  # 1-D
        torch.rand(2, 12),  # float
        torch.randint(0, 128, (1, MAX_POS + 1)),  # longer than max_position_embeddings
        "the quick brown fox",  # a string
        {"text": "hello"},  # dict without input_ids
        {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 7, dtype=torch.long)},
        torch.zeros(2, 0, dtype=torch.long),  # empty
    ],
    ids=["1d", "float", "too_long", "string", "no_input_ids", "mask_shape", "empty"],
)
@pytest.mark.parametrize("name", ["functional", "wanda_sp"])
def test_bad_calibration_raises_with_batch_index(bad, name):
    with pytest.raises(ValueError, match=r"batch 1\b"):
        compute_scores(tiny_llama(), name, calibration=[_good(), bad])


def test_missing_or_empty_calibration_raises():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calibration"):
        compute_scores(model, "functional")
    with pytest.raises(ValueError, match="calibration"):
        compute_scores(model, "taylor_loss", calibration=[])


# ---------------------------------------------------------------------------------------
# hybrid: Adam state x calibration
# ---------------------------------------------------------------------------------------
def test_fisher_functional_is_the_geometric_mean_of_its_parts():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = AdamStateSaliency("adam_fisher")
    for step in range(2):
        _step(model, opt, seed=step)
        acc.accumulate(model, opt)
    calibration = calib_batches(n=2)
    hybrid = compute_scores(model, "fisher_functional", calibration, optimizer_scores=acc.scores())
    functional = compute_scores(model, "functional", calibration)
    adam = acc.scores()
    for h, a, f in zip(hybrid.attn + hybrid.mlp, adam.attn + adam.mlp, functional.attn + functional.mlp):
        assert h.dtype == torch.float32
        torch.testing.assert_close(h, (a.double() * f.double()).sqrt().float())
    # a unit ranks low when either part ranks it low: one part at zero removes it first
    zeroed = UnitScores(attn=[t.clone() for t in functional.attn], mlp=[t.clone() for t in functional.mlp])
    zeroed.mlp[1][5] = 0.0
    assert geometric_mean(acc.scores(), zeroed).mlp[1][5] == 0.0
    with pytest.raises(ValueError, match="calibration"):
        compute_scores(model, "fisher_functional", None, optimizer_scores=acc.scores())


def _warmed_up_adam_fisher(model) -> UnitScores:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = AdamStateSaliency("adam_fisher")
    for step in range(2):
        _step(model, opt, seed=step)
        acc.accumulate(model, opt)
    return acc.scores()


def test_loss_fisher_sums_the_squared_loss_gradient_times_the_squared_weight_over_a_units_weights():
    model = tiny_llama()
    batches = calib_batches(n=2)
    scores = _gradient_saliency(model, [{"input_ids": x} for x in batches], "loss_fisher")
    mlp = model.model.layers[1].mlp
    parts = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    squares = [torch.zeros_like(p) for p in parts]
    for x in batches:
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        for sq, p in zip(squares, parts):
            sq += p.grad.square() / len(batches)
    gate, up, down = (sq * p.detach().square() for sq, p in zip(squares, parts))
    torch.testing.assert_close(scores.mlp[1], gate.sum(1) + up.sum(1) + down.sum(0), rtol=1e-4, atol=1e-12)


def test_fisher_functional_self_combines_adam_state_loss_fisher_and_functional_on_sampled_windows():
    model = tiny_llama()
    adam = _warmed_up_adam_fisher(model)
    calibration = calib_batches(n=2, seq=10)
    rng = torch.random.get_rng_state()
    hybrid = compute_scores(model, "fisher_functional_self", calibration, optimizer_scores=adam, seed=5)
    assert torch.equal(rng, torch.random.get_rng_state())  # the training's random stream is not consumed
    batches = [{"input_ids": x} for x in calibration]
    sampled = sample_like(model, batches, seed=5)
    assert [b["input_ids"].shape for b in sampled] == [x.shape for x in calibration]
    fisher = geometric_mean(adam, _gradient_saliency(model, sampled, "loss_fisher"))
    functional = compute_scores(model, "functional", batches + sampled)
    want = geometric_mean(fisher, functional)
    for got, expected in zip(hybrid.attn + hybrid.mlp, want.attn + want.mlp):
        torch.testing.assert_close(got, expected)
    # windows sampled already are scored as they are (a caller that also fits on them samples once)
    given = compute_scores(model, "fisher_functional_self", calibration, optimizer_scores=adam, sampled=sampled)
    _close(given, hybrid)
    other_windows = sample_like(model, batches, seed=6)
    moved = compute_scores(model, "fisher_functional_self", calibration, optimizer_scores=adam, sampled=other_windows)
    assert any(not torch.equal(a, b) for a, b in zip(hybrid.mlp, moved.mlp))
    with pytest.raises(ValueError, match="'fisher_functional' samples no windows of its own: pass sampled=None"):
        compute_scores(model, "fisher_functional", calibration, optimizer_scores=adam, sampled=sampled)
    with pytest.raises(ValueError, match="sampled holds no windows: pass at least one batch, or sampled=None"):
        compute_scores(model, "fisher_functional_self", calibration, optimizer_scores=adam, sampled=[])
    # the sampled windows count: the same estimator without them ranks differently
    plain = compute_scores(model, "fisher_functional", calibration, optimizer_scores=adam)
    assert any(not torch.equal(a.argsort(), b.argsort()) for a, b in zip(hybrid.mlp, plain.mlp))
    # another rank samples other windows (their scores are averaged by the reduce hook)
    other = compute_scores(model, "fisher_functional_self", calibration, optimizer_scores=adam, seed=5, rank=1)
    assert any(not torch.equal(a, b) for a, b in zip(hybrid.mlp, other.mlp))
    with pytest.raises(ValueError, match="warm-up window's batches"):
        compute_scores(model, "fisher_functional_self", None, optimizer_scores=adam)


def test_fisher_functional_self_samples_num_sampled_batches_shaped_like_the_calibration_batches_in_turn():
    model = tiny_llama()
    adam = _warmed_up_adam_fisher(model)
    calibration = [calib_batches(n=1, batch=3, seq=10)[0], calib_batches(n=1, batch=2, seq=7, seed=1)[0]]
    hybrid = compute_scores(model, "fisher_functional_self", calibration, optimizer_scores=adam, seed=2,
                            num_sampled_batches=3)  # fmt: skip
    batches = [{"input_ids": x} for x in calibration]
    sampled = sample_like(model, [batches[0], batches[1], batches[0]], seed=2)
    assert [tuple(b["input_ids"].shape) for b in sampled] == [(3, 10), (2, 7), (3, 10)]
    fisher = geometric_mean(adam, _gradient_saliency(model, sampled, "loss_fisher"))
    # the functional's gradient: half the calibration batches' mean, half the sampled windows' mean (5 and 8 samples)
    on_calibration, _ = _manual_functional_grads(model, calibration)
    on_sampled, _ = _manual_functional_grads(model, [b["input_ids"] for b in sampled])
    functional = _unit_sums(model, lambda _n, lin: ((on_calibration[id(lin.weight)] + on_sampled[id(lin.weight)]) / 2
                                                    * lin.weight.detach().double()).abs())  # fmt: skip
    _close(hybrid, geometric_mean(fisher, functional))
    # one mean over all 13 samples would weigh the sampled text 8:5, and rank otherwise
    pooled = geometric_mean(fisher, compute_scores(model, "functional", batches + sampled))
    assert any(not torch.equal(a.argsort(), b.argsort()) for a, b in zip(hybrid.mlp, pooled.mlp))
    default = compute_scores(model, "fisher_functional_self", calibration, optimizer_scores=adam, seed=2)
    assert any(not torch.equal(a, b) for a, b in zip(hybrid.mlp, default.mlp))  # the third batch counts
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"num_sampled_batches={bad!r} must be an integer >= 1"):
            compute_scores(model, "fisher_functional_self", calibration, optimizer_scores=adam,
                           num_sampled_batches=bad)  # fmt: skip


def test_sampled_windows_copy_the_batch_shapes_start_at_bos_and_are_deterministic_per_seed_and_rank():
    model = tiny_llama()
    model.train()
    batches = [{"input_ids": x} for x in (calib_batches(n=1, batch=3, seq=9)[0], calib_batches(n=1, seq=5)[0])]
    first = sample_like(model, batches, seed=1)
    assert model.training and all(m.training for m in model.modules())  # each module's mode is restored
    assert [b["input_ids"].shape for b in first] == [(3, 9), (2, 5)]
    assert all((b["input_ids"][:, 0] == model.config.bos_token_id).all() for b in first)
    assert len({int(t) for b in first for t in b["input_ids"][:, 1]}) > 1  # each window opens on its own token
    again, rank1 = sample_like(model, batches, seed=1), sample_like(model, batches, seed=1, rank=1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not torch.equal(first[0]["input_ids"], rank1[0]["input_ids"])
    # without a BOS token a window starts at the first token of the row it stands for
    model.config.bos_token_id = None
    no_bos = sample_like(model, batches, seed=1)
    assert torch.equal(no_bos[0]["input_ids"][:, 0], batches[0]["input_ids"][:, 0])


def test_sampling_over_the_kv_cache_continues_as_the_full_forward_does(monkeypatch):
    """With the nucleus draw replaced by argmax, the sampler must write what greedy generation writes (EOS banned)."""
    import nirvana_pl.sampling as sampling

    model = tiny_llama()
    monkeypatch.setattr(sampling, "_nucleus", lambda logits, generator: logits.argmax(-1))
    batches = [{"input_ids": calib_batches(n=1, batch=2, seq=8)[0]}]

    def greedy(start, banned):
        out = start
        with torch.no_grad():
            for _ in range(8 - start.shape[1]):
                logits = model(input_ids=out, use_cache=False).logits[:, -1]
                logits[:, banned] = float("-inf")
                out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out

    ids = sample_like(model, batches, seed=0)[0]["input_ids"]
    assert torch.equal(ids, greedy(ids[:, :2], [model.config.eos_token_id]))  # (BOS, the drawn opening token, ...)
    # the end-of-sequence token is never drawn: make the first greedy choice the EOS token
    eos = int(ids[0, 2])
    model.config.eos_token_id = eos
    banned = sample_like(model, batches, seed=0)[0]["input_ids"]
    assert not (banned[:, 1:] == eos).any()
    assert torch.equal(banned, greedy(banned[:, :2], [eos]))
    # from BOS alone (the sampler before windows opened from the vocabulary)
    monkeypatch.setattr(sampling, "OPEN_FROM_VOCABULARY", False)
    plain = sample_like(model, batches, seed=0)[0]["input_ids"]
    assert torch.equal(plain, greedy(plain[:, :1], [eos]))


def test_sampled_windows_open_with_tokens_drawn_uniformly_from_the_vocabulary_but_eos_and_padding():
    from nirvana_pl.sampling import _vocabulary_draw

    model = tiny_llama()
    vocab = model.get_input_embeddings().num_embeddings
    drawn = _vocabulary_draw(model, 40 * vocab, [model.config.eos_token_id, model.config.pad_token_id],
                             torch.Generator().manual_seed(0))  # fmt: skip
    counts = torch.bincount(drawn.flatten(), minlength=vocab)
    excluded = [model.config.eos_token_id, model.config.pad_token_id]
    assert (counts[excluded] == 0).all()
    others = counts[[t for t in range(vocab) if t not in excluded]]
    assert others.min() > 10 and others.max() < 80  # about 40 each: every other token is drawn, evenly
    ids = torch.cat([b["input_ids"] for b in sample_like(model, [{"input_ids": calib_batches(n=1, batch=64)[0]}],
                                                         seed=3)])  # fmt: skip
    assert not (ids[:, 1] == model.config.eos_token_id).any() and not (ids[:, 1] == model.config.pad_token_id).any()
    assert len(set(ids[:, 1].tolist())) > 32  # 64 openings from a vocabulary of 128


def test_nucleus_draws_only_from_the_top_p_mass():
    from nirvana_pl.sampling import _nucleus

    logits = torch.tensor([[0.50, 0.46, 0.04], [0.97, 0.02, 0.01]]).log().repeat(200, 1)
    drawn = _nucleus(logits, torch.Generator().manual_seed(0)).view(200, 2)
    assert set(drawn[:, 0].tolist()) == {0, 1}  # 0.50 alone is below 0.95: the second token stays in
    assert set(drawn[:, 1].tolist()) == {0}  # 0.97 alone reaches 0.95


def test_fisher_functional_self_refuses_a_model_that_cannot_sample_its_own_text():
    from conftest import tiny_t5
    from nirvana_pl.sampling import SamplingError

    model = tiny_t5()
    ids = calib_batches(n=1)[0]
    with pytest.raises(SamplingError, match="fisher_functional'"):
        sample_like(model, [{"input_ids": ids, "labels": ids}], seed=0)


def test_geometric_mean_of_scores_of_different_shapes_raises():
    a = UnitScores(attn=[torch.ones(2)], mlp=[torch.ones(8)])
    b = UnitScores(attn=[torch.ones(2)], mlp=[torch.ones(6)])
    with pytest.raises(SaliencyError, match="different shapes"):
        geometric_mean(a, b)
