"""calibration: masks == surgery, chunked KL, the selector and the gamma search."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import MAX_POS, VOCAB, tiny_llama, tiny_qwen2
from nirvana_pl.allocate import (
    AllocationConfig,
    DenseReference,
    InfeasibleSparsityError,
    allocate,
    max_feasible_sparsity,
)
from nirvana_pl.calibration import (
    DEFAULT_GAMMA_GRID,
    CalibrationSelector,
    DenseProbe,
    choose_gamma,
    kl_divergence,
    masked,
)
from nirvana_pl.data import as_batches
from nirvana_pl.saliency import compute_scores, magnitude_scores
from nirvana_pl.surgery import PlanMismatchError, apply_plan


def _pool(n: int = 40, T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def _selector(pool: torch.Tensor | None = None, **kw) -> CalibrationSelector:
    args = dict(num_candidates=3, samples_per_candidate=4, probe_windows=8, probe_seq_len=8, batch_size=4)
    args.update(kw)
    return CalibrationSelector(_pool() if pool is None else pool, **args)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bit_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = dict(model.named_parameters())
    assert now.keys() == before.keys()
    for name, p in before.items():
        assert torch.equal(now[name], p), name
        assert now[name].grad is None, name


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def _plan(model, s: float, gamma: float = 2.0):
    return allocate(model, magnitude_scores(model), AllocationConfig(s, gamma=gamma))


def _padded_batch() -> dict[str, torch.Tensor]:
    ids = _pool(3, 12, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _reference_kl(model, plan, batch) -> float:
    """Unchunked KL from the full logits of model(...), the computation the chunks must reproduce."""
    with torch.no_grad():
        p = model(**batch, use_cache=False).logits.float().log_softmax(-1)
        with masked(model, plan):
            q = model(**batch, use_cache=False).logits.float().log_softmax(-1)
    per_token = (p.exp() * (p - q)).sum(-1)
    mask = batch["attention_mask"].bool()
    return float(per_token[mask].mean())


# ---------------------------------------------------------------------------- masks
def test_masked_equals_surgery(arch_model):
    _, model = arch_model
    plan = _plan(model, 0.5)
    assert not plan.is_identity
    batch = _padded_batch()
    before = _params(model)
    cut = copy.deepcopy(model)
    apply_plan(cut, plan)
    with torch.no_grad():
        expected = cut(**batch, use_cache=False).logits
        dense = model(**batch, use_cache=False).logits
        with masked(model, plan) as m:
            assert m is model
            got = model(**batch, use_cache=False).logits
        after = model(**batch, use_cache=False).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    assert not torch.allclose(got[mask], dense[mask], atol=1e-3)  # the masks did something
    assert torch.equal(after, dense)  # hooks gone: the dense model again
    assert _hook_count(model) == 0
    _assert_bit_identical(model, before)


def test_masked_removes_hooks_on_error_and_rejects_bad_plans():
    model = tiny_llama()
    plan = _plan(model, 0.4)
    with pytest.raises(RuntimeError, match="boom"):
        with masked(model, plan):
            assert _hook_count(model) > 0
            raise RuntimeError("boom")
    assert _hook_count(model) == 0
    other = _plan(tiny_qwen2(), 0.4)
    with pytest.raises(PlanMismatchError):
        with masked(model, other):
            pass
    assert _hook_count(model) == 0


# ---------------------------------------------------------------------------- KL
def test_kl_of_model_against_itself_is_zero():
    model = tiny_llama()
    probe = DenseProbe.build(model, [_padded_batch(), _pool(4, 16)])
    assert probe.num_tokens == 12 + 9 + 4 + 4 * 16
    assert probe.nbytes == probe.num_tokens * 64 * 4
    assert abs(kl_divergence(model, probe)) < 1e-6
    with masked(model, _plan(model, 0.0)):
        assert abs(kl_divergence(model, probe, chunk_tokens=7)) < 1e-6


def test_kl_grows_with_sparsity_for_fixed_scores():
    model = tiny_llama()
    scores = magnitude_scores(model)
    probe = DenseProbe.build(model, as_batches(_pool(8, 16), 4))
    kls = []
    for s in (0.2, 0.4, 0.6):
        plan = allocate(model, scores, AllocationConfig(s, gamma=1.5))
        with masked(model, plan):
            kls.append(kl_divergence(model, probe))
    assert 0 < kls[0] < kls[1] < kls[2], kls


@pytest.mark.parametrize("chunk", [1, 5, 16, 10_000])
def test_chunked_kl_equals_unchunked_reference(chunk):
    model = tiny_qwen2()
    plan = _plan(model, 0.4)
    batch = _padded_batch()
    probe = DenseProbe.build(model, [batch])
    with masked(model, plan):
        got = kl_divergence(model, probe, chunk_tokens=chunk)
    expected = _reference_kl(model, plan, batch)
    assert expected > 0
    # fp32 log-probs are ~log(V) = 4.9, so each log p - log q carries ~1e-6 rounding; chunks of one
    # row take another matmul kernel than the full batch. Agreement is to that rounding.
    assert got == pytest.approx(expected, rel=1e-5, abs=2e-7)


def test_kl_restores_training_mode_and_rejects_base_models():
    model = tiny_llama()
    probe = DenseProbe.build(model, [_pool(2, 8)])
    model.train()
    model.model.layers[0].eval()  # e.g. a frozen block: its mode must survive too
    kl_divergence(model, probe)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    with pytest.raises(ValueError, match="lm_head"):
        DenseProbe.build(model.model, [_pool(2, 8)])
    with pytest.raises(ValueError, match="chunk_tokens"):
        kl_divergence(model, probe, chunk_tokens=0)


# ---------------------------------------------------------------------------- selector
def test_select_returns_argmin_and_leaves_parameters_untouched():
    model = tiny_llama()
    before = _params(model)
    sel = _selector()
    config = AllocationConfig(0.3, gamma=2.0)
    result = sel.select(model, "functional", config)
    _assert_bit_identical(model, before)
    assert _hook_count(model) == 0
    kls = result.candidate_kls
    assert len(kls) == 3 and all(k > 0 for k in kls)
    assert result.best_index == min(range(3), key=lambda i: kls[i])
    assert result.kl == kls[result.best_index]
    assert torch.equal(result.selected_indices, result.candidate_indices[result.best_index])
    assert torch.equal(result.windows, sel.pool[result.selected_indices])
    assert torch.equal(torch.cat(result.calibration), result.windows)
    # The winning plan is the plan of the winning windows, re-derivable by anyone.
    scores = compute_scores(model, "functional", calibration=as_batches(result.windows, 4))
    again = allocate(model, scores, config, saliency="functional")
    assert again.fingerprint() == result.plan.fingerprint()
    assert result.gamma == 2.0 and result.gamma_search is None
    assert result.summary()["best_index"] == result.best_index


def test_probe_never_overlaps_candidates():
    for mode, kw in (("sets", {}), ("samples", {"num_candidates": 10})):
        for seed in range(3):
            sel = _selector(mode=mode, seed=seed, **kw)
            probe, candidates = sel.split()
            assert probe.numel() == sel.probe_pool_windows == 4  # 8 probe windows of 8 from windows of 16
            for rows in candidates:
                assert not set(rows.tolist()) & set(probe.tolist())
            probe_tokens = sel.probe_tokens(probe)
            assert probe_tokens.shape == (8, 8)
            assert torch.equal(probe_tokens, sel.pool[probe].reshape(8, 8))


def test_select_is_deterministic_under_a_seed():
    model = tiny_llama()
    config = AllocationConfig(0.3, gamma=2.0)
    a = _selector(seed=1).select(model, "functional", config)
    b = _selector(seed=1).select(model, "functional", config)
    c = _selector(seed=2).select(model, "functional", config)
    assert a.candidate_kls == b.candidate_kls
    assert torch.equal(a.selected_indices, b.selected_indices) and a.plan.fingerprint() == b.plan.fingerprint()
    assert not torch.equal(a.probe_indices, c.probe_indices)
    assert [r.tolist() for r in a.candidate_indices] != [r.tolist() for r in c.candidate_indices]
    assert a.candidate_kls != c.candidate_kls


def test_samples_mode_keeps_the_n_best_single_windows():
    model = tiny_qwen2()
    sel = _selector(mode="samples", num_candidates=6, samples_per_candidate=3)
    result = sel.select(model, "wanda_sp", AllocationConfig(0.3, gamma=2.0))
    assert len(result.candidate_kls) == 6 and all(r.numel() == 1 for r in result.candidate_indices)
    best3 = sorted(range(6), key=lambda i: result.candidate_kls[i])[:3]
    expected = [int(result.candidate_indices[i]) for i in best3]
    assert result.selected_indices.tolist() == expected
    assert len(set(expected)) == 3
    assert torch.equal(result.windows, sel.pool[expected])
    assert result.best_index == best3[0]
    # The plan is derived from the assembled set; its KL is measured, not copied.
    probe = sel.dense_probe(model)
    with masked(model, result.plan):
        assert kl_divergence(model, probe) == pytest.approx(result.kl, rel=1e-6)
        with pytest.raises(RuntimeError, match="inside masked"):
            sel.dense_probe(model)  # a probe built under masks would not be the dense reference


def test_choose_gamma_returns_argmin_of_its_curve_and_skips_infeasible():
    model = tiny_llama()
    ref = DenseReference.of(model)
    s = 0.7
    feasible = [g for g in DEFAULT_GAMMA_GRID if s <= max_feasible_sparsity(ref, g)]
    assert 0 < len(feasible) < len(DEFAULT_GAMMA_GRID)  # the grid straddles the limit at this sparsity
    sel = _selector()
    search = sel.choose_gamma(model, magnitude_scores(model), AllocationConfig(s, gamma=2.0))
    assert list(search.curve) == feasible
    assert set(search.skipped) == set(DEFAULT_GAMMA_GRID) - set(feasible)
    assert all("largest feasible sparsity" in why for why in search.skipped.values())
    assert search.best_gamma == min(search.curve, key=search.curve.get)
    assert search.best_kl == search.curve[search.best_gamma]
    assert search.plan.gamma == search.best_gamma
    with pytest.raises(InfeasibleSparsityError, match="every gamma"):
        choose_gamma(model, magnitude_scores(model), (5.0, 6.0), probe=sel.dense_probe(model),
                     alloc_config=AllocationConfig(0.8, gamma=2.0))
    with pytest.raises(ValueError, match="grid"):
        choose_gamma(model, magnitude_scores(model), (), probe=sel.dense_probe(model),
                     alloc_config=AllocationConfig(0.3))


def test_select_with_gamma_grid_picks_set_then_gamma():
    model = tiny_llama()
    before = _params(model)
    sel = _selector()
    fixed = sel.select(model, "functional", AllocationConfig(0.4, gamma=2.0))
    auto = sel.select(model, "functional", AllocationConfig(0.4, gamma=2.0), gamma_grid=(1.0, 2.0, 4.0), progress=True)
    assert auto.best_index == fixed.best_index  # the set is chosen at the configured gamma
    assert auto.gamma_search is not None and auto.gamma == auto.gamma_search.best_gamma == auto.plan.gamma
    assert auto.gamma_search.curve[2.0] == pytest.approx(fixed.kl)
    assert auto.kl == min(auto.gamma_search.curve.values()) <= fixed.kl
    _assert_bit_identical(model, before)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num_candidates": 0}, r"num_candidates=0 must be an integer >= 1"),
        ({"samples_per_candidate": 40}, r"samples_per_candidate=40 is larger than the 36 pool windows.*lower"),
        ({"probe_windows": 80}, r"probe_windows=80 .* needs 40 of the pool's 40 windows.*lower probe_windows"),
        ({"probe_seq_len": 32}, r"probe_seq_len=32 must be .*\[1, 16\]"),
        ({"mode": "best"}, r"mode='best'.*'sets' or 'samples'"),
        ({"mode": "samples", "num_candidates": 3}, r"num_candidates=3 < samples_per_candidate=4.*raise num_candidates"),
        ({"mode": "samples", "num_candidates": 37}, r"num_candidates=37 single windows.*only 36"),
        ({"batch_size": 0}, r"batch_size=0"),
    ],
)
def test_selector_rejects_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        _selector(**kw)


def test_selector_rejects_bad_pools_and_models():
    with pytest.raises(ValueError, match=r"pool is empty.*token_windows"):
        CalibrationSelector(torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pool must be a LongTensor\[N, T\]"):
        CalibrationSelector(torch.rand(10, 16))
    model = tiny_llama()
    long_pool = _pool(20, MAX_POS + 16)
    with pytest.raises(ValueError, match=rf"seq_len={MAX_POS + 16} > the model's max_position_embeddings={MAX_POS}"):
        _selector(long_pool).select(model, "functional", AllocationConfig(0.3))
    with pytest.raises(ValueError, match=r"saliency='magnitude' does not depend on calibration data"):
        _selector().select(model, "magnitude", AllocationConfig(0.3))
    bad_ids = _pool()
    bad_ids[0, 0] = VOCAB
    with pytest.raises(ValueError, match=r"token id 128 outside the model's vocabulary"):
        _selector(bad_ids).select(model, "functional", AllocationConfig(0.3))
