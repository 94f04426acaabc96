"""KL calibration selection and gamma='auto' through prune() and the callback."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from lightning_helpers import VOCAB, CausalLM, token_loader, trainer

from nirvana_pl import CalibrationSelector, NirvanaPruningCallback, prune
from nirvana_pl.units import prunable_parameter_count


def _selector(num_candidates: int = 3, seed: int = 0, **kw) -> CalibrationSelector:
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, VOCAB, (40, 16), generator=gen)
    args = dict(num_candidates=num_candidates, samples_per_candidate=4, probe_windows=8, probe_seq_len=16, seed=seed)
    args.update(kw)
    return CalibrationSelector(pool, **args)


def test_prune_with_selector_keeps_the_least_kl_candidate():
    model = tiny_llama()
    plan = prune(model, 0.4, "functional", calibration=_selector(), gamma=2.0)
    sel = plan.score_summary["selection"]
    kls = sel["candidate_kls"]
    assert len(kls) == 3 and sel["best_index"] == min(range(3), key=lambda i: (kls[i], i))
    assert sel["kl"] == kls[sel["best_index"]]
    assert prunable_parameter_count(model) == plan.params_after


def test_prune_gamma_auto_picks_the_argmin_of_its_curve():
    model = tiny_llama()
    grid = (1.0, 2.0, 3.0)
    plan = prune(model, 0.3, "functional", calibration=_selector(), gamma="auto", gamma_grid=grid)
    curve = {float(g): kl for g, kl in plan.score_summary["selection"]["gamma_search"]["curve"].items()}
    assert set(curve) == set(grid)
    assert plan.gamma == min(curve, key=curve.get)


def test_gamma_auto_with_data_free_scores_chooses_only_gamma():
    plan = prune(tiny_llama(), 0.3, "magnitude", calibration=_selector(), gamma="auto", gamma_grid=(1.0, 3.0))
    search = plan.score_summary["selection"]["gamma_search"]
    assert plan.gamma == search["best_gamma"] and len(search["curve"]) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(saliency="functional", gamma="auto"), "gamma='auto' .*calibration=CalibrationSelector"),
        (dict(saliency="magnitude", gamma=3.0, calibration="selector"), "nothing to choose"),
        (dict(saliency="functional", gamma="big"), "gamma='big'"),
    ],
)
def test_selection_arguments_that_cannot_work_are_refused(kwargs, match):
    if kwargs.get("calibration") == "selector":
        kwargs["calibration"] = _selector()
    with pytest.raises(ValueError, match=match):
        prune(tiny_llama(), 0.3, **kwargs)
    with pytest.raises(ValueError, match=match):
        NirvanaPruningCallback(sparsity=0.3, prune_at=4, warmup_steps=2, **kwargs)


def test_callback_runs_the_selection_and_logs_every_candidate(tmp_path):
    cb = NirvanaPruningCallback(
        sparsity=0.4, prune_at=4, warmup_steps=2, saliency="functional", gamma=2.0, calibration=_selector()
    )
    t = trainer(tmp_path, 6, [cb])
    t.fit(CausalLM(), token_loader())
    metrics = t.callback_metrics
    kls = [float(metrics[f"nirvana/candidate_kl_{i}"]) for i in range(3)]
    assert float(metrics["nirvana/calibration_kl"]) == pytest.approx(min(kls))
    event = json.loads(cb.report_path.read_text())["events"][0]
    assert event["scores"]["selection"]["candidate_kls"] == pytest.approx(kls)


def test_callback_adam_scores_with_gamma_auto(tmp_path):
    grid = (1.0, 2.0, 4.0)
    cb = NirvanaPruningCallback(
        sparsity=0.3, prune_at=4, warmup_steps=2, saliency="adam_taylor", gamma="auto", gamma_grid=grid,
        calibration=_selector(),
    )
    t = trainer(tmp_path, 5, [cb])
    t.fit(CausalLM(), token_loader())
    curve = {g: float(t.callback_metrics[f"nirvana/gamma_kl_{g}"]) for g in grid}
    assert cb.plans[0].gamma == min(curve, key=curve.get)
    assert float(t.callback_metrics["nirvana/gamma"]) == cb.plans[0].gamma


def test_selection_result_keeps_every_candidate_plan():
    model = tiny_llama()
    sel = _selector()
    from nirvana_pl.allocate import AllocationConfig

    result = sel.select(model, "functional", AllocationConfig(0.4, 2.0))
    assert len(result.candidate_plans) == 3
    assert result.candidate_plans[result.best_index].fingerprint() == result.plan.fingerprint()


def test_callback_with_adam_scores_keeps_the_least_kl_estimator(tmp_path):
    cb = NirvanaPruningCallback(
        sparsity=0.4, prune_at=4, warmup_steps=2, saliency="adam_taylor", gamma=2.0, calibration=_selector()
    )
    t = trainer(tmp_path, 5, [cb])
    t.fit(CausalLM(), token_loader())
    selection = cb.plans[0].score_summary["selection"]
    assert selection["candidates"] == ["adam_taylor", "adam_fisher", "adam_momentum"]
    kls = selection["candidate_kls"]
    best = min(range(3), key=lambda i: (kls[i], i))
    assert cb.plans[0].saliency == selection["candidates"][best]
    assert float(t.callback_metrics["nirvana/calibration_kl"]) == pytest.approx(kls[best])
