"""units.py: where the prunable units are and what they cost (METHOD.md section 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_gpt2, tiny_llama, tiny_llama_mha, tiny_mistral, tiny_qwen2
from nirvana_pl.arch import supported_model_types
from nirvana_pl.units import (
    UnsupportedModelError,
    find_units,
    head_dim_of,
    prunable_parameter_count,
    unit_index,
)


@pytest.mark.parametrize("n_units,g,h", [(4, 2, 16), (2, 4, 16), (4, 1, 16), (3, 3, 8)])
def test_unit_index_covers_gqa_group_ranges(n_units, g, h):
    for k in range(n_units):
        qo = unit_index(n_units, g * h, [k])
        assert qo.tolist() == list(range(k * g * h, (k + 1) * g * h))
        kv = unit_index(n_units, h, [k])
        assert kv.tolist() == list(range(k * h, (k + 1) * h))
    # several groups: concatenated ranges in the given order, disjoint, total size
    kept = [0, n_units - 1] if n_units > 1 else [0]
    idx = unit_index(n_units, g * h, kept)
    assert idx.dtype == torch.long
    assert idx.numel() == len(kept) * g * h
    assert len(set(idx.tolist())) == idx.numel()
    assert unit_index(n_units, h, []).numel() == 0


def test_unit_index_out_of_range():
    with pytest.raises(IndexError):
        unit_index(4, 16, [4])
    with pytest.raises(IndexError):
        unit_index(4, 16, [-1])


def test_unit_index_matches_model_layout():
    """The group-k query rows really are the heads that attend with KV head k (repeat_kv layout)."""
    model = tiny_llama(num_kv=2, heads=8)
    u = find_units(model)[0]
    g, h = u.group_size, u.head_dim
    assert (g, h) == (4, 16)
    # transformers' repeat_kv maps query head j to KV head j // g
    for k in range(u.num_kv_groups):
        heads = [j for j in range(8) if j // g == k]
        rows = sorted(r for j in heads for r in range(j * h, (j + 1) * h))
        assert unit_index(u.num_kv_groups, g * h, [k]).tolist() == rows


@pytest.mark.parametrize(
    "factory,kw,bias",
    [
        (tiny_llama, {}, False),
        (tiny_llama, {"num_kv": 2}, False),
        (tiny_llama_mha, {}, False),
        (tiny_mistral, {}, False),
        (tiny_qwen2, {}, True),
        (tiny_qwen2, {"heads": 8, "num_kv": 4, "head_dim": 16}, True),
    ],
)
def test_unit_costs(factory, kw, bias):
    model = factory(**kw)
    cfg = model.config
    d = cfg.hidden_size
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = n_q // n_kv
    h = head_dim_of(cfg)
    units = find_units(model)
    assert len(units) == cfg.num_hidden_layers
    for u in units:
        assert u.group_size == g
        assert u.head_dim == h
        assert u.num_kv_groups == n_kv
        assert u.mlp_width == cfg.intermediate_size
        expected = 2 * h * (g + 1) * d + ((g + 2) * h if bias else 0)
        assert u.kv_group_cost == expected
        assert u.mlp_channel_cost == 3 * d
        # the costs account for every attention/MLP parameter of the dense layer
        attn_params = sum(p.numel() for p in u.attn.parameters())
        mlp_params = sum(p.numel() for p in u.mlp.parameters())
        assert n_kv * u.kv_group_cost == attn_params
        assert u.mlp_width * u.mlp_channel_cost == mlp_params
    assert prunable_parameter_count(model) == sum(
        u.num_kv_groups * u.kv_group_cost + u.mlp_width * u.mlp_channel_cost for u in units
    )


def test_head_dim_default_without_config_field():
    model = tiny_qwen2()  # Qwen2Config has no head_dim attribute
    assert getattr(model.config, "head_dim", None) is None
    cfg = model.config
    assert head_dim_of(cfg) == cfg.hidden_size // cfg.num_attention_heads
    u = find_units(model)[0]
    assert u.head_dim == model.model.layers[0].self_attn.head_dim == 16


def test_head_dim_explicit_differs_from_default():
    model = tiny_llama(num_kv=4, heads=8, head_dim=16)  # d / n_q would be 8
    assert model.config.hidden_size // model.config.num_attention_heads == 8
    assert find_units(model)[0].head_dim == 16


def test_prunable_count_excludes_embeddings_and_norms():
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    emb = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert prunable_parameter_count(model) == total - emb - norms


@pytest.mark.parametrize("make", [tiny_gpt2, lambda: nn.Linear(4, 4)], ids=["gpt2", "linear"])
def test_unsupported_model_raises(make):
    with pytest.raises(UnsupportedModelError) as info:
        find_units(make())
    msg = str(info.value)
    for t in supported_model_types():
        assert t in msg
    assert issubclass(UnsupportedModelError, ValueError)
