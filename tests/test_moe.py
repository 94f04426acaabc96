"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): expert channels, whole experts and the channels of a
shared expert.

The references here are written independently of nirvana_pl's own masking (``calibration.masked``, which the
registry suite in ``test_architectures.py`` compares with): a removed expert is the dense model with that expert's
router logit at minus infinity, computed by a router forward written out below; a removed channel is the dense
model with that channel's gate/up rows and down column zeroed in a copy of the weights (a shared expert's channel
likewise, in its own gate/up/down projections).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arch_configs import VOCAB, build, model_from_config, tiny_config
from lightning_helpers import CausalLM, Losses, token_loader, trainer
from nirvana_pl import CalibrationSelector, NirvanaPruningCallback, prune, save_pruned
from nirvana_pl.allocate import AllocationConfig, allocate
from nirvana_pl.plan import LayerPlan, PruningPlan
from nirvana_pl.saliency import SaliencyError, UnitScores, compute_scores
from nirvana_pl.surgery import PlanMismatchError, apply_plan, planned_slices, resize_from_state_dict
from nirvana_pl.units import UnsupportedModelError, find_units, prunable_parameter_count

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _plan(
    model, experts: dict[int, list[int]], channels: dict[int, dict[int, list[int]]],
    shared: dict[int, list[int]] | None = None,
) -> PruningPlan:
    """Keep, in layer l, the experts ``experts[l]`` (default all) with the channels ``channels[l][e]`` each (default
    all), the shared expert's channels ``shared[l]`` (default all) and every KV group."""
    layers = []
    for u in find_units(model):
        kept = experts.get(u.index, list(range(u.num_experts)))
        per_expert = channels.get(u.index, {})
        flat = [e * u.channels_per_expert + c for e in kept for c in per_expert.get(e, range(u.channels_per_expert))]
        flat += [u.expert_units + c for c in (shared or {}).get(u.index, range(u.shared_width))]
        layers.append(LayerPlan(u.num_kv_groups, u.mlp_width, list(range(u.num_kv_groups)), flat,
                                experts_before=u.num_experts, kept_experts=kept,
                                shared_channels_before=u.shared_width))  # fmt: skip
    return PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="by hand")


def _mask_router_logits(model, removed: dict[int, list[int]]) -> None:
    """The reference for removed experts: each router computes softmax -> top-k -> renormalisation with the
    ``removed[l]`` experts' logits at minus infinity (written here, not taken from nirvana_pl)."""
    for i, layer in enumerate(model.model.layers):
        router = layer.mlp.gate
        gone = removed.get(i, [])

        def forward(hidden, router=router, gone=gone):
            logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            logits[:, gone] = float("-inf")
            probs = torch.softmax(logits.float(), dim=-1)
            top, index = torch.topk(probs, router.top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), index

        router.forward = forward


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_experts_equals_their_router_logits_at_minus_infinity(family):
    model = build(family)
    reference = copy.deepcopy(model)
    removed = {0: [1, 3], 1: [0], 2: [0, 1, 2]}  # layer 2 keeps one expert: fewer than num_experts_per_tok = 2
    kept = {i: [e for e in range(4) if e not in gone] for i, gone in removed.items()}
    ids = _ids()
    before = _logits(model, ids)
    apply_plan(model, _plan(model, kept, {}))
    _mask_router_logits(reference, removed)

    expected = _logits(reference, ids)
    assert (expected - before).abs().max() > 1e-3  # removing the experts mattered
    assert (_logits(model, ids) - expected).abs().max() < 1e-5
    units = find_units(model)
    assert [u.num_experts for u in units] == [2, 3, 1]
    assert [layer.mlp.gate.top_k for layer in model.model.layers] == [2, 2, 1]
    assert [layer.mlp.gate.weight.shape[0] for layer in model.model.layers] == [2, 3, 1]
    assert [layer.mlp.experts.num_experts for layer in model.model.layers] == [2, 3, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_channels_equals_zeroing_them(family):
    model = build(family)
    width = find_units(model)[0].channels_per_expert
    gen = torch.Generator().manual_seed(1)
    # every expert keeps all but 8 of its channels (grouped_mm widths are multiples of 8), each expert its own
    # ones; layer 1 is left as it is
    channels = {
        layer: {e: sorted(torch.randperm(width, generator=gen)[: width - 8].tolist()) for e in range(4)}
        for layer in (0, 2)
    }
    shared_width = find_units(model)[0].shared_width
    shared = {1: list(range(3, shared_width - 5))} if shared_width else {}  # layer 1 loses 8 shared channels
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, per_expert in channels.items():
            experts = reference.model.layers[layer].mlp.experts
            for e, kept in per_expert.items():
                gone = sorted(set(range(width)) - set(kept))
                experts.gate_up_proj[e, gone] = 0
                experts.gate_up_proj[e, [width + c for c in gone]] = 0
                experts.down_proj[e][:, gone] = 0
        for layer, kept in shared.items():
            mlp = reference.model.layers[layer].mlp.shared_expert
            gone = sorted(set(range(shared_width)) - set(kept))
            mlp.gate_proj.weight[gone] = 0
            mlp.up_proj.weight[gone] = 0
            mlp.down_proj.weight[:, gone] = 0
    ids = _ids()
    apply_plan(model, _plan(model, {}, channels, shared))

    expected = _logits(reference, ids)
    assert (expected - _logits(build(family), ids)).abs().max() > 1e-3
    assert (_logits(model, ids) - expected).abs().max() < 1e-5
    assert [u.channels_per_expert for u in find_units(model)] == [width - 8, width, width - 8]
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * (width - 8), 64)
    if shared_width:
        assert [u.shared_width for u in find_units(model)] == [shared_width, shared_width - 8, shared_width]
        assert model.model.layers[1].mlp.shared_expert.down_proj.weight.shape == (64, shared_width - 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_adam_state_follows_the_kept_experts_and_channels(family):
    model = build(family).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = _ids()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    experts = model.model.layers[0].mlp.experts
    router = model.model.layers[0].mlp.gate
    width = experts.down_proj.shape[2]
    old = {name: {k: v.clone() for k, v in opt.state[getattr(experts, name)].items()} for name in ("gate_up_proj",
                                                                                                  "down_proj")}
    old_router = opt.state[router.weight]["exp_avg_sq"].clone()
    kept_experts = [0, 2, 3]
    kept_channels = {e: sorted(torch.randperm(width, generator=torch.Generator().manual_seed(e))[:16].tolist())
                     for e in kept_experts}
    shared = getattr(model.model.layers[0].mlp, "shared_expert", None)
    kept_shared = {0: list(range(0, find_units(model)[0].shared_width, 2))} if shared is not None else {}
    old_shared = {k: opt.state[shared.down_proj.weight][k].clone() for k in ("exp_avg", "exp_avg_sq")} if kept_shared \
        else {}  # fmt: skip
    apply_plan(model, _plan(model, {0: kept_experts}, {0: kept_channels}, kept_shared), [opt])
    for key, before in old_shared.items():
        assert torch.equal(opt.state[shared.down_proj.weight][key], before[:, kept_shared[0]])

    for e_new, e in enumerate(kept_experts):
        rows = kept_channels[e] + [width + c for c in kept_channels[e]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[experts.gate_up_proj][key][e_new], old["gate_up_proj"][key][e][rows])
            assert torch.equal(opt.state[experts.down_proj][key][e_new], old["down_proj"][key][e][:, kept_channels[e]])
    assert torch.equal(opt.state[router.weight]["exp_avg_sq"], old_router[kept_experts])
    assert opt.state[experts.gate_up_proj]["step"] == old["gate_up_proj"]["step"]
    losses = []
    for _ in range(3):  # the same optimizer keeps training the pruned model
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("share, experts_go, channels_go", [(0.0, False, True), (0.5, True, True), (1.0, True, False)])
def test_expert_share_splits_the_mlp_cut_between_experts_and_channels(share, experts_go, channels_go):
    model = build("mixtral")
    dense_params = prunable_parameter_count(model)
    plan = prune(model, 0.4, "magnitude", gamma=3.0, expert_share=share)
    assert abs(plan.realised_sparsity - 0.4) < 0.03, plan.realised_sparsity
    assert prunable_parameter_count(model) == plan.params_after < dense_params
    units = find_units(model)
    assert any(u.num_experts < 4 for u in units) == experts_go
    assert any(u.channels_per_expert < 48 for u in units) == channels_go
    assert all(u.channels_per_expert % 8 == 0 for u in units)
    assert torch.isfinite(_logits(model, _ids())).all()


def test_shared_expert_channels_are_ranked_with_the_experts_width_steps():
    model = build("qwen2_moe")
    units = find_units(model)

    def scores(shared_score: float) -> UnitScores:
        mlp = [torch.cat([torch.linspace(1.0, 2.0, u.expert_units), torch.full((u.shared_width,), shared_score)])
               for u in units]  # fmt: skip
        return UnitScores(attn=[torch.ones(u.num_kv_groups) for u in units], mlp=mlp)

    config = AllocationConfig(sparsity=0.2, gamma=6.0, expert_share=0.0, min_kv_groups=2)
    low, high = allocate(model, scores(0.1), config), allocate(model, scores(10.0), config)
    assert sum(len(lp.kept_shared_channels) for lp in low.layers) < sum(u.shared_width for u in units)
    assert all(lp.expert_width_kept == u.channels_per_expert for lp, u in zip(low.layers, units))
    assert all(len(lp.kept_shared_channels) == u.shared_width for lp, u in zip(high.layers, units))
    assert abs(low.params_after - high.params_after) <= 8 * units[0].mlp_channel_cost * len(units)
    apply_plan(model, low)
    assert [u.shared_width for u in find_units(model)] == [len(lp.kept_shared_channels) for lp in low.layers]
    assert all(u.shared_width % 8 == 0 for u in find_units(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_functional_and_adam_scores_read_every_expert_channel(family):
    model = build(family)
    scores = compute_scores(model, "functional", [_ids(s) for s in range(2)])
    units = find_units(model)
    assert [s.numel() for s in scores.mlp] == [u.num_experts * u.channels_per_expert + u.shared_width for u in units]
    assert all(bool((s[: u.expert_units] > 0).any()) for s, u in zip(scores.mlp, units))
    assert all(bool((s[u.expert_units :] > 0).all()) for s, u in zip(scores.mlp, units))  # (every token's expert)
    with pytest.raises(SaliencyError, match="wanda_sp.*mixture-of-experts"):
        compute_scores(model, "wanda_sp", [_ids()])


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_a_pruned_state_dict_resizes_a_fresh_dense_model(family):
    model = build(family)
    prune(model, 0.5, "magnitude")
    fresh = build(family, seed=3)
    assert resize_from_state_dict(fresh, fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    ids = _ids()
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    def shapes(m):
        return [(u.num_experts, u.channels_per_expert, u.shared_width) for u in find_units(m)]

    assert shapes(fresh) == shapes(model)


def test_plans_that_do_not_fit_are_refused_before_anything_changes():
    model = build("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    uneven = _plan(model, {0: [0, 1]}, {0: {0: [0, 1, 2], 1: [0, 1]}})  # two experts of one tensor, two widths
    with pytest.raises(PlanMismatchError, match="same number of channels"):
        apply_plan(model, uneven)
    none_left = _plan(model, {0: []}, {})
    with pytest.raises(PlanMismatchError, match="at least one"):
        apply_plan(model, none_left)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    odd = _plan(model, {}, {0: {e: list(range(44)) for e in range(4)}})
    with pytest.raises(PlanMismatchError, match="grouped_mm.*mlp_round_to=8"):
        apply_plan(model, odd)



def test_planned_slices_keep_what_surgery_keeps():
    """(what a DeepSpeed engine's fp32 masters and moments go through)"""
    model = build("qwen3_moe")
    plan = _plan(model, {0: [1, 3], 2: [0, 2, 3]}, {0: {1: list(range(8, 40)), 3: list(range(32))}})
    before = {id(p): p.detach().clone() for p in model.parameters()}
    slices = planned_slices(model, plan)
    expected = {id(p): take(before[id(p)]) for p, take in slices}
    assert len(slices) == 6  # layers 0 and 2: gate_up, down and the router
    apply_plan(model, plan)
    assert all(torch.equal(p.detach(), expected[id(p)]) for p, _ in slices)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_uniform_prune_is_a_stock_folder_that_transformers_loads(family, tmp_path):
    model = build(family)
    plan = prune(model, 0.4, "magnitude", gamma=3.0, uniform=True)
    assert abs(plan.realised_sparsity - 0.4) < 0.05, plan.realised_sparsity
    shapes = {(u.num_kv_groups, u.num_experts, u.channels_per_expert, u.shared_width) for u in find_units(model)}
    assert len(shapes) == 1 and next(iter(shapes))[1] < 4, shapes
    path = save_pruned(model, tmp_path / "pruned")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family and "nirvana_layer_widths" not in config
    assert not (path / "modeling_nirvana.py").exists()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is type(model)
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_moe_models_this_release_cannot_prune_are_refused_by_name():
    mixed = tiny_config("qwen3_moe")
    mixed.mlp_only_layers = [1]
    with pytest.raises(UnsupportedModelError, match="mixes dense MLP layers"):
        prune(model_from_config(mixed), 0.3, "magnitude")
    sparse_step = tiny_config("qwen2_moe")
    sparse_step.decoder_sparse_step = 2
    with pytest.raises(UnsupportedModelError, match="mixes dense MLP layers"):
        prune(model_from_config(sparse_step), 0.3, "magnitude")


def test_functional_scores_count_the_tokens_routed_to_each_expert():
    model = build("mixtral")
    batches = [_ids(s) for s in range(3)]
    scores = compute_scores(model, "functional", batches)
    tokens = sum(b.numel() for b in batches)
    assert [float(c.sum()) for c in scores.expert_load] == [2.0 * tokens] * 3  # two experts per token
    assert len(scores.summary()["expert_load"]) == 3


def test_the_router_load_decides_between_experts_whose_channels_score_alike():
    model = build("mixtral")
    units = find_units(model)
    # every channel scores the same; layer 0's expert 2 received few tokens
    scores = UnitScores(attn=[torch.ones(u.num_kv_groups) for u in units], mlp=[torch.ones(u.mlp_width) for u in units],
                        expert_load=[torch.tensor([50.0, 40.0, 2.0, 45.0]), *[torch.full((4,), 30.0)] * 2])
    config = AllocationConfig(sparsity=0.1, gamma=6.0, expert_share=1.0, min_kv_groups=4)
    plan = allocate(model, scores, config)
    assert plan.layers[0].kept_experts == [0, 1, 3]
    unweighted = allocate(model, scores, dataclasses.replace(config, router_load=0.0))
    assert unweighted.layers[0].kept_experts != [0, 1, 3]  # ties, broken by position instead
    bad = UnitScores(attn=scores.attn, mlp=scores.mlp, expert_load=[torch.ones(3)] * 3)
    with pytest.raises(ValueError, match="router load covers experts"):
        allocate(model, bad, config)


@pytest.mark.parametrize("saliency", ["adam_fisher", "magnitude"])  # (the load reaches data-free scores too)
def test_a_fit_counts_the_router_load_of_its_warm_up_window_and_trains_on_after_the_cut(tmp_path, saliency):
    module = CausalLM("mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=3, saliency=saliency, gamma=3.0)
    losses = Losses()
    t = trainer(tmp_path, 14, [cb, losses])
    t.fit(module, token_loader())
    (plan,) = cb.plans
    loads = plan.score_summary["expert_load"]
    assert [sum(layer) for layer in loads] == [3 * 4 * 16 * 2] * 4  # 3 warm-up batches of 4 x 16 tokens, top-2
    assert any(lp.experts_kept < 4 for lp in plan.layers) and plan.realised_sparsity > 0.35
    event = json.loads(Path(cb.report_path).read_text())["events"][0]
    assert event["scores"]["expert_load"] == loads
    assert event["kept_experts_per_layer"] == [lp.experts_kept for lp in plan.layers]
    after = losses.losses[4:]
    assert all(math.isfinite(x) for x in losses.losses) and sum(after[-3:]) < sum(after[:3]), losses.losses


def test_the_load_balancing_loss_is_kept_working_or_the_cut_refused():
    model = build("mixtral")
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="load-balancing loss.*uniform=True"):
        prune(model, 0.4, "magnitude")
    prune(model, 0.4, "magnitude", uniform=True)  # the same experts count everywhere: the loss still computes
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)



def test_a_fit_whose_cut_would_break_the_load_balancing_loss_stops_before_training(tmp_path):
    module = CausalLM("mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                      output_router_logits=True)  # fmt: skip
    cb, losses = NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2), Losses()
    with pytest.raises(ValueError, match="load-balancing loss"):
        trainer(tmp_path, 5, [cb, losses]).fit(module, token_loader())
    assert losses.losses == []


def test_gamma_auto_chooses_by_kl_on_a_mixture_of_experts_model():
    model = build("qwen3_moe")
    pool = torch.randint(3, VOCAB, (64, 16), generator=torch.Generator().manual_seed(0))
    selector = CalibrationSelector(pool, num_candidates=2, samples_per_candidate=4, probe_windows=8, probe_seq_len=16)
    plan = prune(model, 0.4, "functional", selector, gamma="auto", gamma_grid=(1.0, 3.0))
    assert plan.gamma in (1.0, 3.0) and abs(plan.realised_sparsity - 0.4) < 0.05
    assert "selection" in plan.score_summary and torch.isfinite(_logits(model, _ids())).all()


def test_lora_on_a_mixture_of_experts_model_is_refused_before_training(tmp_path):
    module = CausalLM("mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)
    cb, losses = NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, recovery={"r": 4}), Losses()
    with pytest.raises(ValueError, match="LoRA \\(recovery=\\) is not supported for 'mixtral'"):
        trainer(tmp_path, 5, [cb, losses]).fit(module, token_loader())
    assert losses.losses == []


def test_a_fit_prunes_the_shared_expert_with_the_experts_and_reports_both(tmp_path, caplog):
    module = CausalLM("qwen2_moe")
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=3, gamma=3.0)
    losses = Losses()
    with caplog.at_level("INFO"):
        trainer(tmp_path, 24, [cb, losses]).fit(module, token_loader())
    (plan,) = cb.plans
    units = find_units(module.net)
    assert [u.shared_width for u in units] == [len(lp.kept_shared_channels) for lp in plan.layers]
    assert any(u.num_experts < 4 for u in units) and plan.realised_sparsity > 0.35
    assert module.net.config.nirvana_layer_widths[0]["shared_expert_intermediate_size"] == units[0].shared_width
    event = json.loads(Path(cb.report_path).read_text())["events"][0]
    assert event["kept_shared_expert_width_per_layer"] == [u.shared_width for u in units]
    assert event["kept_expert_width_per_layer"] == [u.channels_per_expert for u in units]
    assert all(f"{lp.experts_kept}/4 x {lp.expert_width_kept} + shared {u.shared_width}/64" in caplog.text
               for lp, u in zip(plan.layers, units))  # fmt: skip
    after = losses.losses[4:]
    assert all(math.isfinite(x) for x in losses.losses) and sum(after[-3:]) < sum(after[:3]), losses.losses
