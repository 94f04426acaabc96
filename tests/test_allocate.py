"""allocate.py: global, module-balanced allocation (METHOD.md section 3)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import tiny_llama, tiny_llama_mha, tiny_qwen2
from nirvana_pl.allocate import (
    AllocationConfig,
    DenseReference,
    InfeasibleSparsityError,
    allocate,
    max_feasible_sparsity,
)
from nirvana_pl.plan import PruningPlan
from nirvana_pl.saliency import UnitScores, magnitude_scores, random_scores
from nirvana_pl.surgery import apply_plan
from nirvana_pl.units import find_units, prunable_parameter_count


def _removed(plan: PruningPlan) -> tuple[int, int]:
    """(KV groups removed, MLP channels removed) by this plan."""
    kv = sum(lp.kv_groups_before - len(lp.kept_kv_groups) for lp in plan.layers)
    mlp = sum(lp.mlp_channels_before - len(lp.kept_mlp_channels) for lp in plan.layers)
    return kv, mlp


def _const_scores(model, value: float = 1.0) -> UnitScores:
    units = find_units(model)
    return UnitScores(
        attn=[torch.full((u.num_kv_groups,), value) for u in units],
        mlp=[torch.full((u.mlp_width,), value) for u in units],
    )


def _check_plan_consistent(model, plan: PruningPlan) -> None:
    units = find_units(model)
    assert len(plan.layers) == len(units)
    removed = 0
    for u, lp in zip(units, plan.layers):
        for kept, n in ((lp.kept_kv_groups, u.num_kv_groups), (lp.kept_mlp_channels, u.mlp_width)):
            assert kept == sorted(set(kept))
            assert all(0 <= i < n for i in kept)
        removed += (u.num_kv_groups - len(lp.kept_kv_groups)) * u.kv_group_cost
        removed += (u.mlp_width - len(lp.kept_mlp_channels)) * u.mlp_channel_cost
    assert plan.params_before == prunable_parameter_count(model)
    assert plan.params_after == plan.params_before - removed


# ---------------------------------------------------------------------------------------
# gamma: ratio of the removed fractions
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,sparsity", [(1.0, 0.3), (1.0, 0.45), (3.0, 0.3), (3.0, 0.5), (2.0, 0.4)])
def test_gamma_sets_ratio_of_removed_fractions(gamma, sparsity):
    model = tiny_llama()
    cfg = AllocationConfig(sparsity=sparsity, gamma=gamma)
    plan = allocate(model, random_scores(model, seed=1), cfg)
    _check_plan_consistent(model, plan)
    ref = DenseReference.of(model)
    frac = plan.fraction_removed()
    f_a, f_m = frac["kv_groups"], frac["mlp_channels"]
    assert f_a > 0 and f_m > 0
    # granularity: one KV group (moved onto the MLP pool), one MLP channel, one rounding block
    n_a, n_m = ref.total_kv_groups, ref.total_mlp_channels
    tol = (
        gamma * 0.5 / n_a
        + 0.5 * ref.kv_group_cost / (n_m * ref.mlp_channel_cost)
        + (0.5 + cfg.mlp_round_to) / n_m
    )
    assert abs(f_m - gamma * f_a) <= tol, (f_a, f_m, tol)
    # the ratio differs for different gammas (not an accident of rounding)
    if gamma == 3.0:
        assert f_m > 2 * f_a


# ---------------------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory,kw",
    [(tiny_llama, {}), (tiny_llama_mha, {}), (tiny_qwen2, {}), (tiny_llama, {"intermediate": 100})],
    ids=["llama_gqa", "llama_mha", "qwen2", "llama_i100"],
)
@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.4, 0.48])
@pytest.mark.parametrize("gamma", [1.0, 3.0])
@pytest.mark.parametrize("round_to", [1, 8])
def test_removed_params_hit_target_within_one_block(factory, kw, sparsity, gamma, round_to):
    model = factory(**kw)
    ref = DenseReference.of(model)
    cfg = AllocationConfig(sparsity=sparsity, gamma=gamma, mlp_round_to=round_to)
    plan = allocate(model, random_scores(model, seed=3), cfg)
    _check_plan_consistent(model, plan)
    removed = plan.params_before - plan.params_after
    block = round_to * ref.mlp_channel_cost + ref.kv_group_cost
    assert abs(removed - sparsity * ref.prunable_params) <= block
    assert plan.realised_sparsity == pytest.approx(removed / ref.prunable_params)
    # the MLP pool itself lands within one rounding block of what the attention pool left over
    kv_removed, mlp_removed = _removed(plan)
    mlp_target = (sparsity * ref.prunable_params - kv_removed * ref.kv_group_cost) / ref.mlp_channel_cost
    assert abs(mlp_removed - mlp_target) <= round_to + 0.5, (mlp_removed, mlp_target)


# ---------------------------------------------------------------------------------------
# exact top-k with a deterministic tie-break
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity,gamma", [(0.3, 1.0), (0.4, 3.0)])
def test_ties_remove_exactly_k_lowest_positions(sparsity, gamma):
    model = tiny_llama()
    ref = DenseReference.of(model)
    cfg = AllocationConfig(sparsity=sparsity, gamma=gamma, mlp_round_to=1, min_kv_groups=1)
    plan = allocate(model, _const_scores(model), cfg)
    n_a, n_m = ref.total_kv_groups, ref.total_mlp_channels
    budget = sparsity * ref.prunable_params
    p_a = budget / (n_a * ref.kv_group_cost + gamma * n_m * ref.mlp_channel_cost)
    k_a = round(p_a * n_a)
    k_m = round((budget - k_a * ref.kv_group_cost) / ref.mlp_channel_cost)
    assert 0 < k_a < n_a and 0 < k_m < n_m
    assert _removed(plan) == (k_a, k_m)  # exactly k: a `<=` threshold would remove everything

    # KV: each layer's protected group is its best; with all ties the highest index survives
    # (lower index removed first), the others go in (layer, index) order.
    G = ref.kv_groups_per_layer
    candidates = [(layer, i) for layer in range(ref.num_layers) for i in range(G) if i != G - 1]
    removed_kv = set(candidates[:k_a])
    for layer, lp in enumerate(plan.layers):
        assert lp.kept_kv_groups == [i for i in range(G) if (layer, i) not in removed_kv]
    # MLP: the first k_m positions in (layer, index) order
    width = ref.mlp_width
    flat_kept = [layer * width + c for layer, lp in enumerate(plan.layers) for c in lp.kept_mlp_channels]
    assert flat_kept == list(range(k_m, ref.num_layers * width))

    again = allocate(model, _const_scores(model), cfg)
    assert again.fingerprint() == plan.fingerprint()


def test_partial_ties_at_threshold_remove_exactly_k():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    units = find_units(model)
    # three score levels only: many ties straddle the cut
    scores = UnitScores(
        attn=[torch.randint(0, 3, (u.num_kv_groups,), generator=gen).float() for u in units],
        mlp=[torch.randint(0, 3, (u.mlp_width,), generator=gen).float() for u in units],
    )
    ref = DenseReference.of(model)
    cfg = AllocationConfig(sparsity=0.35, gamma=2.0, mlp_round_to=1)
    plan = allocate(model, scores, cfg)
    kv_removed, mlp_removed = _removed(plan)
    budget = cfg.sparsity * ref.prunable_params
    k_m = round((budget - kv_removed * ref.kv_group_cost) / ref.mlp_channel_cost)
    assert mlp_removed == k_m
    # nothing kept scores lower than anything removed (global pool)
    kept = torch.cat([scores.mlp[layer][lp.kept_mlp_channels] for layer, lp in enumerate(plan.layers)])
    gone = torch.cat(
        [scores.mlp[layer][[c for c in range(u.mlp_width) if c not in lp.kept_mlp_channels]]
         for layer, (u, lp) in enumerate(zip(units, plan.layers))]
    )
    assert gone.max() <= kept.min()


def test_global_pool_removes_lowest_scores_across_layers():
    model = tiny_llama()
    units = find_units(model)
    # layer 2's MLP channels all score lowest: the global pool takes them first
    mlp = [torch.full((u.mlp_width,), 10.0) + torch.arange(u.mlp_width) * 1e-3 for u in units]
    mlp[2] = torch.linspace(0.0, 1.0, units[2].mlp_width)
    attn = [torch.full((u.num_kv_groups,), 5.0) for u in units]
    plan = allocate(model, UnitScores(attn, mlp), AllocationConfig(sparsity=0.2, gamma=1.0, mlp_round_to=8))
    widths = plan.mlp_widths_kept()
    assert widths[2] < min(w for i, w in enumerate(widths) if i != 2)
    # within layer 2, the kept channels are the best ones (the highest indices)
    kept2 = plan.layers[2].kept_mlp_channels
    assert kept2 == list(range(units[2].mlp_width - len(kept2), units[2].mlp_width))


# ---------------------------------------------------------------------------------------
# min_kv_groups
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_kv", [1, 2])
def test_min_kv_groups_spares_best_group(min_kv):
    model = tiny_llama()  # 4 KV groups per layer, 4 layers
    units = find_units(model)
    gen = torch.Generator().manual_seed(0)
    attn = [1.0 + torch.rand(u.num_kv_groups, generator=gen) for u in units]
    attn[1] = torch.tensor([0.01, 0.04, 0.02, 0.03])  # layer 1: all groups lowest of the pool
    mlp = [torch.rand(u.mlp_width, generator=gen) for u in units]
    cfg = AllocationConfig(sparsity=0.45, gamma=1.0, min_kv_groups=min_kv)
    plan = allocate(model, UnitScores(attn, mlp), cfg)
    kv_removed, _ = _removed(plan)
    assert kv_removed >= 4  # the budget would have taken all of layer 1
    best = sorted(torch.argsort(attn[1], descending=True)[:min_kv].tolist())
    assert plan.layers[1].kept_kv_groups == best
    assert all(len(lp.kept_kv_groups) >= min_kv for lp in plan.layers)


@pytest.mark.parametrize("min_mlp", [0, 8, 16])
def test_min_mlp_channels_keeps_the_best_channels_of_a_layer_the_pool_would_empty(min_mlp):
    model = tiny_llama()
    units = find_units(model)
    ref = DenseReference.of(model)
    mlp = [torch.full((u.mlp_width,), 10.0) + torch.arange(u.mlp_width) * 1e-3 for u in units]
    mlp[2] = torch.linspace(0.0, 1.0, units[2].mlp_width)  # layer 2: all channels lowest of the pool
    attn = [torch.full((u.num_kv_groups,), 5.0) for u in units]
    cfg = AllocationConfig(sparsity=0.5, gamma=3.0, min_mlp_channels=min_mlp)
    plan = allocate(model, UnitScores(attn, mlp), cfg)
    _check_plan_consistent(model, plan)
    kept2 = plan.layers[2].kept_mlp_channels
    assert len(kept2) == min_mlp  # without the floor the pool takes the whole MLP
    assert kept2 == list(range(units[2].mlp_width - min_mlp, units[2].mlp_width))  # its best channels
    # the channels the floor spares are taken from the other layers: the budget still holds to one block
    block = cfg.mlp_round_to * ref.mlp_channel_cost / ref.prunable_params
    assert abs(plan.realised_sparsity - 0.5) <= block
    assert all(w >= min_mlp and w % cfg.mlp_round_to == 0 for w in plan.mlp_widths_kept())


@pytest.mark.parametrize("uniform", [False, True])
def test_min_mlp_channels_lowers_the_largest_feasible_sparsity(uniform):
    model = tiny_llama()
    ref = DenseReference.of(model)
    scores = random_scores(model, seed=4)
    s_free = max_feasible_sparsity(ref, 3.0)  # every MLP channel removed
    s_floor = max_feasible_sparsity(ref, 3.0, min_mlp_channels=16)
    assert s_floor < s_free
    plan = allocate(model, scores, AllocationConfig(sparsity=s_floor, gamma=3.0, uniform=uniform, min_mlp_channels=16))
    _check_plan_consistent(model, plan)
    assert min(plan.mlp_widths_kept()) == 16 and (not uniform or set(plan.mlp_widths_kept()) == {16})
    between = AllocationConfig(sparsity=(s_floor + s_free) / 2, gamma=3.0, uniform=uniform, min_mlp_channels=16)
    largest = f"{math.floor(s_floor * 1000) / 1000:.3f}"
    expected = f"min_mlp_channels=16 per layer: the largest feasible sparsity is {largest}"
    with pytest.raises(InfeasibleSparsityError, match=expected):
        allocate(model, scores, between)


def test_min_mlp_channels_must_be_a_multiple_of_mlp_round_to():
    with pytest.raises(
        ValueError, match="min_mlp_channels=12 must be a multiple of mlp_round_to=8.*min_mlp_channels=16"
    ):
        AllocationConfig(sparsity=0.3, min_mlp_channels=12)
    assert AllocationConfig(sparsity=0.3, min_mlp_channels=12, mlp_round_to=4).min_mlp_channels == 12


# ---------------------------------------------------------------------------------------
# rounding, identity, uniform
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("round_to", [8, 16])
@pytest.mark.parametrize("intermediate", [176, 100])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])
def test_kept_mlp_widths_are_multiples_of_round_to(round_to, intermediate, sparsity):
    model = tiny_llama(intermediate=intermediate)
    plan = allocate(model, random_scores(model, seed=5), AllocationConfig(sparsity=sparsity, mlp_round_to=round_to))
    widths = plan.mlp_widths_kept()
    assert any(w < intermediate for w in widths)
    for w in widths:
        assert w % round_to == 0 or w == intermediate, widths


@pytest.mark.parametrize("uniform", [False, True])
def test_zero_sparsity_is_identity(uniform):
    model = tiny_llama()
    plan = allocate(model, random_scores(model), AllocationConfig(sparsity=0.0, uniform=uniform))
    assert plan.is_identity
    assert plan.params_after == plan.params_before == prunable_parameter_count(model)
    assert plan.realised_sparsity == 0.0
    units = find_units(model)
    for u, lp in zip(units, plan.layers):
        assert lp.kept_kv_groups == list(range(u.num_kv_groups))
        assert lp.kept_mlp_channels == list(range(u.mlp_width))


@pytest.mark.parametrize("sparsity,gamma", [(0.2, 1.0), (0.4, 3.0), (0.5, 2.0)])
def test_uniform_gives_equal_widths(sparsity, gamma):
    model = tiny_llama()
    ref = DenseReference.of(model)
    cfg = AllocationConfig(sparsity=sparsity, gamma=gamma, uniform=True)
    plan = allocate(model, random_scores(model, seed=2), cfg)
    _check_plan_consistent(model, plan)
    assert plan.uniform
    assert len(set(plan.kv_groups_kept())) == 1
    assert len(set(plan.mlp_widths_kept())) == 1
    assert not plan.is_identity
    w = plan.mlp_widths_kept()[0]
    assert w % cfg.mlp_round_to == 0 or w == ref.mlp_width
    # per-layer rounding: within one block per layer
    removed = plan.params_before - plan.params_after
    tol = ref.num_layers * (cfg.mlp_round_to * ref.mlp_channel_cost) + ref.kv_group_cost
    assert abs(removed - sparsity * ref.prunable_params) <= tol


# ---------------------------------------------------------------------------------------
# infeasible and invalid input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [3.0, 0.5])
def test_infeasible_sparsity_names_largest_feasible(gamma):
    model = tiny_llama()
    scores = random_scores(model)
    with pytest.raises(InfeasibleSparsityError) as info:
        allocate(model, scores, AllocationConfig(sparsity=0.95, gamma=gamma))
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    m = re.search(r"largest feasible sparsity is (\d+(?:\.\d+)?)", msg)
    assert m, msg
    s_max = float(m.group(1))
    assert 0.0 < s_max < 0.95
    plan = allocate(model, scores, AllocationConfig(sparsity=s_max, gamma=gamma))
    _check_plan_consistent(model, plan)
    assert all(len(lp.kept_kv_groups) >= 1 for lp in plan.layers)
    # and a clearly larger request is still refused
    with pytest.raises(InfeasibleSparsityError):
        allocate(model, scores, AllocationConfig(sparsity=min(0.99, s_max + 0.02), gamma=gamma))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", None])
def test_bad_sparsity_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        AllocationConfig(sparsity=bad)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_bad_gamma_raises(bad):
    with pytest.raises(ValueError, match="gamma"):
        AllocationConfig(sparsity=0.3, gamma=bad)


@pytest.mark.parametrize(
    "field,bad", [("min_kv_groups", 0), ("mlp_round_to", 0), ("mlp_round_to", 2.5), ("min_mlp_channels", -1)]
)
def test_bad_integers_raise(field, bad):
    with pytest.raises(ValueError, match=field):
        AllocationConfig(sparsity=0.3, **{field: bad})


@pytest.mark.parametrize("kind", ["attn", "mlp"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scores_raise(kind, value):
    model = tiny_llama()
    scores = random_scores(model)
    getattr(scores, kind)[2][1] = value
    with pytest.raises(ValueError, match="NaN"):
        allocate(model, scores, AllocationConfig(sparsity=0.3))


def test_wrong_score_shapes_raise():
    model = tiny_llama()
    scores = random_scores(model)
    scores.mlp[0] = scores.mlp[0][:-1]
    with pytest.raises(ValueError, match="layer 0"):
        allocate(model, scores, AllocationConfig(sparsity=0.3))
    scores = random_scores(model)
    scores.attn.pop()
    with pytest.raises(ValueError):
        allocate(model, scores, AllocationConfig(sparsity=0.3))


# ---------------------------------------------------------------------------------------
# iterative pruning: targets relative to the ORIGINAL dense model
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("uniform", [False, True])
def test_iterative_targets_are_relative_to_original(uniform):
    original = tiny_llama()
    ref = DenseReference.of(original)
    model = tiny_llama()  # same seed: an identical copy we prune
    block = 8 * ref.mlp_channel_cost + ref.kv_group_cost
    tol = (ref.num_layers if uniform else 1) * block

    plan1 = allocate(model, magnitude_scores(model), AllocationConfig(sparsity=0.2, uniform=uniform), reference=ref)
    apply_plan(model, plan1)
    assert abs(plan1.realised_sparsity - 0.2) * ref.prunable_params <= tol

    plan2 = allocate(model, magnitude_scores(model), AllocationConfig(sparsity=0.4, uniform=uniform), reference=ref)
    assert plan2.dense_prunable_params == ref.prunable_params
    assert plan2.params_before == plan1.params_after == prunable_parameter_count(model)
    apply_plan(model, plan2)
    assert prunable_parameter_count(model) == plan2.params_after
    assert abs(plan2.realised_sparsity - 0.4) * ref.prunable_params <= tol
    assert plan2.realised_sparsity == pytest.approx(1 - prunable_parameter_count(model) / ref.prunable_params)

    # going "back" to a smaller target removes nothing
    plan3 = allocate(model, magnitude_scores(model), AllocationConfig(sparsity=0.3, uniform=uniform), reference=ref)
    assert plan3.is_identity


def test_dense_reference_refuses_nonuniform_model():
    model = tiny_llama()
    plan = allocate(model, random_scores(model, seed=7), AllocationConfig(sparsity=0.4))
    apply_plan(model, plan)
    assert len(set(plan.mlp_widths_kept())) > 1
    with pytest.raises(ValueError, match="original_dense_model"):
        DenseReference.of(model)


# ---------------------------------------------------------------------------------------
# plan serialisation
# ---------------------------------------------------------------------------------------
def test_plan_json_round_trip(tmp_path):
    model = tiny_qwen2()
    plan = allocate(model, random_scores(model, seed=4), AllocationConfig(sparsity=0.4, gamma=2.5), saliency="random")
    back = PruningPlan.from_json(plan.to_json())
    assert back == plan
    assert back.fingerprint() == plan.fingerprint()
    assert back.realised_sparsity == plan.realised_sparsity
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = PruningPlan.load(path)
    assert loaded == plan and loaded.fingerprint() == plan.fingerprint()
    # the fingerprint sees the decision
    other = allocate(model, random_scores(model, seed=5), AllocationConfig(sparsity=0.4, gamma=2.5))
    assert other.fingerprint() != plan.fingerprint()
    assert math.isfinite(plan.score_summary["mlp"]["mean"])
