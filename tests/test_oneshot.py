"""oneshot.prune: score, allocate and cut in one call."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import calib_batches, tiny_llama, tiny_qwen2
from nirvana_pl.allocate import DEFAULT_GAMMA, DenseReference, InfeasibleSparsityError
from nirvana_pl.oneshot import prune
from nirvana_pl.plan import PruningPlan
from nirvana_pl.units import prunable_parameter_count


@pytest.mark.parametrize(
    "factory,saliency,uniform",
    [
        (tiny_llama, "functional", False),
        (tiny_qwen2, "functional", True),
        (tiny_llama, "magnitude", False),
        (tiny_qwen2, "wanda_sp", False),
        (tiny_llama, "taylor_loss", True),
    ],
)
def test_prune_returns_plan_matching_model(factory, saliency, uniform):
    model = factory()
    dense = prunable_parameter_count(model)
    plan = prune(model, 0.4, saliency=saliency, calibration=calib_batches(), gamma=2.0, uniform=uniform)
    assert isinstance(plan, PruningPlan)
    assert plan.saliency == saliency
    assert plan.dense_prunable_params == plan.params_before == dense
    assert prunable_parameter_count(model) == plan.params_after < dense
    assert plan.realised_sparsity == pytest.approx(1 - plan.params_after / dense)
    back = PruningPlan.from_json(plan.to_json())
    assert back == plan and back.fingerprint() == plan.fingerprint()
    assert back.kv_groups_kept() == [layer.self_attn.k_proj.out_features // 16 for layer in model.model.layers]
    assert back.mlp_widths_kept() == [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    with torch.no_grad():
        out = model(input_ids=calib_batches(n=1)[0], use_cache=False).logits
    assert torch.isfinite(out).all()


def test_prune_is_deterministic():
    a, b = tiny_llama(), tiny_llama()
    pa = prune(a, 0.3, calibration=calib_batches())
    pb = prune(b, 0.3, calibration=calib_batches())
    assert pa.fingerprint() == pb.fingerprint()


def test_prune_iteratively_with_reference():
    model = tiny_llama()
    ref = DenseReference.of(copy.deepcopy(model))
    assert prune(model, 0.2, saliency="magnitude").gamma == DEFAULT_GAMMA  # (gamma not given)
    plan = prune(model, 0.4, saliency="magnitude", reference=ref)
    block = 8 * ref.mlp_channel_cost + ref.kv_group_cost
    assert abs(plan.realised_sparsity - 0.4) * ref.prunable_params <= block
    assert prunable_parameter_count(model) == plan.params_after


def test_prune_zero_is_noop():
    model = tiny_llama()
    ids = calib_batches(n=1)[0]
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    plan = prune(model, 0.0, calibration=calib_batches())
    assert plan.is_identity
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)


@pytest.mark.parametrize("saliency", ["functional", "taylor_loss", "wanda_sp"])
def test_prune_without_calibration_says_pass_calibration(saliency):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="calibration"):
        prune(model, 0.3, saliency=saliency)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "kw,param",
    [({"sparsity": 1.2}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"gamma": 0.0}, "gamma"),
     ({"saliency": "nope"}, "saliency")],
)
def test_prune_bad_arguments_name_the_parameter(kw, param):
    args = {"sparsity": 0.3, "saliency": "magnitude", **kw}
    with pytest.raises(ValueError, match=param):
        prune(tiny_llama(), **args)


def test_prune_infeasible_leaves_model_untouched():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InfeasibleSparsityError):
        prune(model, 0.95, saliency="magnitude", gamma=3.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_scoring_stages_score_again_without_the_units_of_the_earlier_stages():
    """Two stages: the plan of the first scores at half the target, then scores of the model with those units
    masked out (zero for them), and the plan at the target from those; a second prune keeps its own start."""
    from nirvana_pl.allocate import AllocationConfig, allocate
    from nirvana_pl.calibration import masked
    from nirvana_pl.saliency import compute_scores

    batches = calib_batches()
    model = tiny_llama()
    reference = DenseReference.of(model)
    first = compute_scores(model, "functional", batches)
    half = allocate(model, first, AllocationConfig(sparsity=0.2, gamma=2.0), reference, saliency="functional")
    with masked(model, half):
        second = compute_scores(model, "functional", batches)
    for lp, attn, mlp in zip(half.layers, second.attn, second.mlp):
        assert torch.all(mlp[sorted(set(range(mlp.numel())) - set(lp.kept_mlp_channels))] == 0)
        assert torch.all(attn[sorted(set(range(attn.numel())) - set(lp.kept_kv_groups))] == 0)
    want = allocate(model, second, AllocationConfig(sparsity=0.4, gamma=2.0), reference, saliency="functional")
    one_stage = prune(copy.deepcopy(model), 0.4, saliency="functional", calibration=batches, gamma=2.0)
    plan = prune(model, 0.4, saliency="functional", calibration=batches, gamma=2.0, scoring_stages=2)
    assert plan.layers == want.layers and plan.score_summary["scoring_stages"] == 2
    assert plan.layers != one_stage.layers  # (the second scoring changed the choice on this model)
    assert "scoring_stages" not in one_stage.score_summary
    for lh, lp in zip(half.layers, plan.layers):  # the first stage's units stay out
        assert set(lp.kept_mlp_channels) <= set(lh.kept_mlp_channels)
        assert set(lp.kept_kv_groups) <= set(lh.kept_kv_groups)
    # a later prune of the pruned model goes from its sparsity (0.4) to the new target in as many stages
    again = prune(model, 0.6, saliency="functional", calibration=batches, gamma=2.0, scoring_stages=3,
                  reference=reference)  # fmt: skip
    assert again.realised_sparsity == pytest.approx(0.6, abs=0.05) and again.score_summary["scoring_stages"] == 3


@pytest.mark.parametrize(
    "saliency,stages,match",
    [
        ("adam_fisher", 2, "reads the optimizer's Adam state, which a mask does not change. Use scoring_stages=1"),
        ("magnitude", 2, "reads only the weights"),
        ("functional", 0, "scoring_stages=0 must be an integer >= 1"),
        ("functional", True, "must be an integer"),
    ],
)
def test_scoring_stages_refuses_what_it_cannot_do(saliency, stages, match):
    from nirvana_pl.oneshot import check_scoring_stages

    with pytest.raises(ValueError, match=match):
        check_scoring_stages(saliency, None, stages)
    check_scoring_stages(saliency, None, 1)  # one scoring: every estimator


def test_scoring_stages_refuses_a_calibration_selector():
    from nirvana_pl.calibration import CalibrationSelector

    selector = CalibrationSelector(torch.randint(3, 128, (40, 16)), num_candidates=3, samples_per_candidate=4,
                                   probe_windows=8, probe_seq_len=8, batch_size=4)  # fmt: skip
    with pytest.raises(ValueError, match="not supported with a CalibrationSelector yet"):
        prune(tiny_llama(), 0.4, saliency="functional", calibration=selector, gamma=2.0, scoring_stages=2)
