"""surgery.py: a pruned model computes exactly what the masked dense model computes (METHOD.md section 4)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS, tiny_llama, tiny_qwen2
from nirvana_pl.allocate import AllocationConfig, DenseReference, allocate
from nirvana_pl.plan import LayerPlan, PruningPlan
from nirvana_pl.saliency import magnitude_scores, random_scores
from nirvana_pl.surgery import PlanMismatchError, apply_plan
from nirvana_pl.units import find_units, head_dim_of, prunable_parameter_count, unit_index

ATOL = 1e-5


def _ids(seed: int = 0, batch: int = 2, seq: int = 10) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, seq), generator=gen)


@torch.no_grad()
def _logits(model, ids, **kw):
    return model(input_ids=ids, use_cache=False, **kw).logits


def _removed(kept: list[int], n: int) -> list[int]:
    return [i for i in range(n) if i not in set(kept)]


@torch.no_grad()
def _mask_dense(model, plan: PruningPlan) -> None:
    """Zero the weights (and q/k/v biases) of every unit the plan removes, in place."""
    for u, lp in zip(find_units(model), plan.layers):
        g, h = u.group_size, u.head_dim
        gone = torch.as_tensor(_removed(lp.kept_kv_groups, u.num_kv_groups), dtype=torch.long)
        if gone.numel():
            qo = unit_index(u.num_kv_groups, g * h, gone)
            kv = unit_index(u.num_kv_groups, h, gone)
            a = u.attn
            a.q_proj.weight[qo] = 0
            a.k_proj.weight[kv] = 0
            a.v_proj.weight[kv] = 0
            a.o_proj.weight[:, qo] = 0
            for lin, idx in ((a.q_proj, qo), (a.k_proj, kv), (a.v_proj, kv)):
                if lin.bias is not None:
                    lin.bias[idx] = 0
        ch = torch.as_tensor(_removed(lp.kept_mlp_channels, u.mlp_width), dtype=torch.long)
        if ch.numel():
            m = u.mlp
            m.gate_proj.weight[ch] = 0
            m.up_proj.weight[ch] = 0
            m.down_proj.weight[:, ch] = 0


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _plan(model, sparsity=0.4, gamma=2.0, saliency="random", uniform=False, seed=0):
    scores = random_scores(model, seed=seed) if saliency == "random" else magnitude_scores(model)
    cfg = AllocationConfig(sparsity=sparsity, gamma=gamma, uniform=uniform)
    return allocate(model, scores, cfg, saliency=saliency)


# ---------------------------------------------------------------------------------------
# the key test
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("saliency", ["random", "magnitude"])
@pytest.mark.parametrize("uniform", [False, True], ids=["global", "uniform"])
def test_pruned_equals_masked_dense(arch_model, saliency, uniform):
    name, model = arch_model
    model.eval()
    # gamma=1 so that even the 2-KV-group models lose a group per layer in uniform mode
    plan = _plan(model, sparsity=0.4, gamma=1.0, saliency=saliency, uniform=uniform)
    assert not plan.is_identity
    assert any(len(lp.kept_kv_groups) < lp.kv_groups_before for lp in plan.layers), "no KV group removed"
    masked = copy.deepcopy(model)
    _mask_dense(masked, plan)
    g_before = [u.group_size for u in find_units(model)]

    apply_plan(model, plan)

    ids = _ids()
    out, ref = _logits(model, ids), _logits(masked, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # also with padding in the attention mask
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    torch.testing.assert_close(
        _logits(model, ids, attention_mask=mask), _logits(masked, ids, attention_mask=mask), atol=ATOL, rtol=0
    )
    # the removal is real: shapes and the parameter count the plan promised
    assert prunable_parameter_count(model) == plan.params_after < plan.params_before
    for u, lp in zip(find_units(model), plan.layers):
        h = u.head_dim
        assert u.num_kv_groups == len(lp.kept_kv_groups)
        assert u.mlp_width == len(lp.kept_mlp_channels)
        a = u.attn
        assert a.q_proj.weight.shape[0] == a.q_proj.out_features == len(lp.kept_kv_groups) * u.group_size * h
        assert a.o_proj.weight.shape[1] == a.o_proj.in_features == a.q_proj.out_features
        assert a.k_proj.weight.shape[0] == a.v_proj.weight.shape[0] == len(lp.kept_kv_groups) * h
        if a.q_proj.bias is not None:
            assert a.q_proj.bias.shape[0] == a.q_proj.out_features
            assert a.k_proj.bias.shape[0] == a.k_proj.out_features
        assert u.mlp.down_proj.in_features == u.mlp.gate_proj.out_features == u.mlp.up_proj.out_features
    assert [u.group_size for u in find_units(model)] == g_before


def test_pruned_kv_cache_decoding_matches_full_forward():
    model = tiny_llama()
    apply_plan(model, _plan(model, sparsity=0.4))
    ids = _ids(seq=8)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=ATOL, rtol=0)


def test_two_plans_in_a_row_equal_masked_dense():
    """Iterative pruning: indices of the second plan refer to the model after the first."""
    model = tiny_qwen2()
    dense = copy.deepcopy(model)
    ref = DenseReference.of(model)
    plan1 = allocate(model, random_scores(model, seed=1), AllocationConfig(sparsity=0.2), reference=ref)
    apply_plan(model, plan1)
    plan2 = allocate(model, random_scores(model, seed=2), AllocationConfig(sparsity=0.4), reference=ref)
    assert not plan2.is_identity
    apply_plan(model, plan2)
    # compose: kept indices of the dense model
    composed = []
    for lp1, lp2 in zip(plan1.layers, plan2.layers):
        composed.append(
            LayerPlan(
                kv_groups_before=lp1.kv_groups_before,
                mlp_channels_before=lp1.mlp_channels_before,
                kept_kv_groups=[lp1.kept_kv_groups[i] for i in lp2.kept_kv_groups],
                kept_mlp_channels=[lp1.kept_mlp_channels[i] for i in lp2.kept_mlp_channels],
            )
        )
    _mask_dense(dense, PruningPlan(layers=composed, target_sparsity=0.4, gamma=3.0, saliency="x"))
    ids = _ids(seed=3)
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------
# s = 0 is an exact no-op
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_zero_sparsity_is_bit_identical(arch):
    model = ARCHS[arch]()
    ids = _ids()
    before_out = _logits(model, ids)
    before = _snapshot(model)
    objects = {n: p for n, p in model.named_parameters()}
    config_before = model.config.to_dict()
    plan = _plan(model, sparsity=0.0)
    assert plan.is_identity
    apply_plan(model, plan)
    assert torch.equal(_logits(model, ids), before_out)
    for n, p in model.named_parameters():
        assert p is objects[n]
        assert torch.equal(p, before[n])
    assert model.config.to_dict() == config_before


# ---------------------------------------------------------------------------------------
# optimizer state follows the kept weights
# ---------------------------------------------------------------------------------------
def _kept_index_by_param(model, plan) -> dict[int, tuple[int, torch.Tensor]]:
    """id(param) -> (axis, kept indices) for every parameter the plan slices."""
    out = {}
    for u, lp in zip(find_units(model), plan.layers):
        for w in u.attn_weights:
            idx = unit_index(u.num_kv_groups, w.rows_per_unit, lp.kept_kv_groups)
            out[id(w.weight)] = (w.axis, idx)
            if w.bias is not None:
                out[id(w.bias)] = (0, idx)
        for w in u.mlp_weights:
            idx = unit_index(u.mlp_width, w.rows_per_unit, lp.kept_mlp_channels)
            out[id(w.weight)] = (w.axis, idx)
    return out


def _train_steps(model, opt, n=2, seed=0):
    model.train()
    for i in range(n):
        ids = _ids(seed=seed + i)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize(
    "make_opt,keys",
    [
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95)), ("exp_avg", "exp_avg_sq")),
        (
            lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        ),
    ],
    ids=["adamw", "adam_amsgrad"],
)
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_optimizer_state_is_sliced(make_opt, keys, factory):
    model = factory()
    opt = make_opt(model.parameters())
    _train_steps(model, opt)
    params_before = [list(g["params"]) for g in opt.param_groups]
    settings_before = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state_before = {id(p): copy.deepcopy(opt.state[p]) for p in model.parameters()}
    weights_before = {id(p): p.detach().clone() for p in model.parameters()}

    plan = _plan(model, sparsity=0.4)
    kept = _kept_index_by_param(model, plan)
    apply_plan(model, plan, [opt])

    assert [list(g["params"]) for g in opt.param_groups] == params_before  # same objects (by identity below)
    for g_now, g_then in zip(opt.param_groups, params_before):
        assert all(a is b for a, b in zip(g_now["params"], g_then))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == settings_before

    n_sliced = 0
    for p in model.parameters():
        old, new = state_before[id(p)], opt.state[p]
        assert set(new) == set(old)
        assert torch.equal(new["step"], old["step"])
        if id(p) in kept:
            axis, idx = kept[id(p)]
            expect_w = weights_before[id(p)].index_select(axis, idx)
            assert torch.equal(p.detach(), expect_w)
            for k in keys:
                assert new[k].shape == p.shape
                assert torch.equal(new[k], old[k].index_select(axis, idx)), k
            n_sliced += int(idx.numel() < weights_before[id(p)].shape[axis])
        else:
            assert torch.equal(p.detach(), weights_before[id(p)])
            for k in keys:
                assert torch.equal(new[k], old[k])
    assert n_sliced > 0

    # training goes on with the same optimizer and changes the kept weights
    pruned = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model, opt, n=1, seed=10)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), pruned[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape


# ---------------------------------------------------------------------------------------
# bad plans leave the model untouched
# ---------------------------------------------------------------------------------------
def _assert_untouched(model, before, config_before):
    for n, p in model.named_parameters():
        assert p.shape == before[n].shape, n
        assert torch.equal(p, before[n]), n
    assert model.config.to_dict() == config_before
    for u in find_units(model):
        assert u.attn.q_proj.out_features == u.attn.q_proj.weight.shape[0]
        assert u.mlp.down_proj.in_features == u.mlp.down_proj.weight.shape[1]


@pytest.mark.parametrize("where", ["kv", "mlp"])
def test_out_of_range_index_in_last_layer_raises_and_changes_nothing(where):
    model = tiny_llama()
    plan = _plan(model, sparsity=0.4)
    last = plan.layers[-1]
    if where == "kv":
        last.kept_kv_groups = last.kept_kv_groups[:-1] + [last.kv_groups_before]
    else:
        last.kept_mlp_channels = last.kept_mlp_channels[:-1] + [last.mlp_channels_before + 3]
    before, config_before = _snapshot(model), model.config.to_dict()
    opt = torch.optim.AdamW(model.parameters())
    _train_steps(model, opt, n=1)
    before = _snapshot(model)
    state_shapes = {id(p): opt.state[p]["exp_avg"].shape for p in model.parameters()}
    with pytest.raises(PlanMismatchError, match="layer 3"):
        apply_plan(model, plan, [opt])
    _assert_untouched(model, before, config_before)
    assert all(opt.state[p]["exp_avg"].shape == state_shapes[id(p)] for p in model.parameters())


@pytest.mark.parametrize("defect", ["layers", "before", "unsorted", "duplicate", "no_kv"])
def test_mismatched_plans_raise_and_change_nothing(defect):
    model = tiny_llama()
    plan = _plan(model, sparsity=0.4)
    lp = plan.layers[-1]
    if defect == "layers":
        plan.layers.pop()
    elif defect == "before":
        lp.mlp_channels_before += 8
    elif defect == "unsorted":
        lp.kept_mlp_channels = list(reversed(lp.kept_mlp_channels))
    elif defect == "duplicate":
        lp.kept_kv_groups = [lp.kept_kv_groups[0]] * 2
    else:
        lp.kept_kv_groups = []
    before, config_before = _snapshot(model), model.config.to_dict()
    with pytest.raises(PlanMismatchError):
        apply_plan(model, plan)
    _assert_untouched(model, before, config_before)


def test_stale_params_after_is_refused_before_any_change():
    """A plan whose predicted count does not match its own kept lists (e.g. an edited JSON) must be
    refused up front, not detected after the weights were already sliced."""
    model = tiny_llama()
    plan = _plan(model, sparsity=0.4)
    plan.params_after += 1
    before, config_before = _snapshot(model), model.config.to_dict()
    with pytest.raises(PlanMismatchError):
        apply_plan(model, plan)
    _assert_untouched(model, before, config_before)


# ---------------------------------------------------------------------------------------
# dtype, requires_grad, config
# ---------------------------------------------------------------------------------------
def test_dtype_and_requires_grad_are_kept():
    model = tiny_llama().to(torch.bfloat16)
    frozen = model.model.layers[1].mlp.up_proj.weight
    frozen.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_plan(model, _plan(model, sparsity=0.4))
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, n
        assert p.requires_grad == flags[n], n
        assert p.is_contiguous(), n
    assert frozen.shape[0] < 176


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2_no_head_dim"])
def test_config_after_nonuniform_prune_has_real_layer_widths(factory):
    model = factory()
    h = head_dim_of(model.config)
    plan = _plan(model, sparsity=0.4, seed=3)
    assert len(set(plan.mlp_widths_kept())) > 1
    apply_plan(model, plan)
    cfg = model.config
    assert cfg.head_dim == h
    widths = cfg.nirvana_layer_widths
    assert len(widths) == cfg.num_hidden_layers
    for w, layer in zip(widths, model.model.layers):
        a, m = layer.self_attn, layer.mlp
        assert w["num_key_value_heads"] == a.k_proj.weight.shape[0] // h == a.v_proj.weight.shape[0] // h
        assert w["num_attention_heads"] == a.q_proj.weight.shape[0] // h == a.o_proj.weight.shape[1] // h
        assert w["intermediate_size"] == m.gate_proj.weight.shape[0] == m.down_proj.weight.shape[1]
    assert "nirvana_layer_widths" in cfg.to_json_string()


@pytest.mark.parametrize(
    "factory, sparsity", [(tiny_llama, 0.1), (tiny_qwen2, 0.4)], ids=["llama", "qwen2_no_head_dim"]
)
def test_config_after_uniform_prune_builds_same_shapes(factory, sparsity):
    model = factory()
    h = head_dim_of(model.config)
    plan = _plan(model, sparsity=sparsity, uniform=True)
    apply_plan(model, plan)
    cfg = model.config
    layer = model.model.layers[0]
    assert cfg.num_key_value_heads == layer.self_attn.k_proj.weight.shape[0] // h == plan.kv_groups_kept()[0]
    assert cfg.num_attention_heads == layer.self_attn.q_proj.weight.shape[0] // h
    assert cfg.intermediate_size == layer.mlp.gate_proj.weight.shape[0] == plan.mlp_widths_kept()[0]
    assert cfg.head_dim == h
    assert getattr(cfg, "nirvana_layer_widths", None) is None

    assert plan.kv_groups_kept()[0] < 4 or plan.mlp_widths_kept()[0] < 176  # something was pruned
    fresh = type(model)(copy.deepcopy(cfg)).eval()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert {n: p.shape for n, p in fresh.named_parameters()} == shapes
    fresh.load_state_dict(model.state_dict())
    ids = _ids()
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), atol=ATOL, rtol=0)


def test_uniform_widths_a_stock_config_rejects_stay_per_layer():
    """LlamaConfig wants hidden % heads == 0: 6 heads over hidden 64 must not enter the stock fields."""
    model = tiny_llama()
    dense_heads = model.config.num_attention_heads
    apply_plan(model, _plan(model, sparsity=0.4, uniform=True))
    widths = model.config.nirvana_layer_widths
    assert {w["num_attention_heads"] for w in widths} == {6}
    assert model.config.num_attention_heads == dense_heads
