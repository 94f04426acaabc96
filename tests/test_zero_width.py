"""A global allocation may remove a whole MLP; the model, training and export must cope."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_t5

from nirvana_pl import load_pruned, save_pruned
from nirvana_pl.allocate import DenseReference
from nirvana_pl.plan import LayerPlan, PruningPlan
from nirvana_pl.surgery import apply_plan
from nirvana_pl.units import find_units


def test_zero_width_mlp_trains_and_reloads(tmp_path):
    model = tiny_llama()
    layers = [LayerPlan(4, 176, [0, 1, 2, 3], list(range(176))) for _ in range(4)]
    layers[2] = LayerPlan(4, 176, [1], [])  # layer 2 loses its whole MLP and 3 of 4 KV groups
    apply_plan(model, PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="manual"))
    assert model.model.layers[2].mlp.gate_proj.weight.shape == (0, 64)

    ids = torch.randint(0, 128, (2, 10))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    model.zero_grad()

    model.eval()
    folder = save_pruned(model, tmp_path / "zero")
    reloaded = load_pruned(folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_resume_reshape_recreates_a_zero_width_mlp():
    """A checkpoint of a model whose layer lost its whole MLP gives a fresh dense model those shapes."""
    from nirvana_pl import NirvanaPruningCallback

    pruned = tiny_llama()
    layers = [LayerPlan(4, 176, [0, 1, 2, 3], list(range(176))) for _ in range(4)]
    layers[1] = LayerPlan(4, 176, [0, 2], [])
    apply_plan(pruned, PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="manual"))
    fresh = tiny_llama(seed=1)
    callback = NirvanaPruningCallback(sparsity=0.5, prune_at=4, warmup_steps=2)
    callback._model = callback._loads_into = fresh  # (as setup sets them for a fit)
    handle = fresh.register_load_state_dict_pre_hook(callback._reshape_before_load)
    fresh.load_state_dict(pruned.state_dict())
    handle.remove()
    assert fresh.model.layers[1].mlp.gate_proj.weight.shape == (0, 64)
    assert fresh.model.layers[1].self_attn.k_proj.weight.shape == (32, 64)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, pruned(ids).logits)


def test_load_pruned_state_dict_resizes_a_dense_module_and_takes_empty_weights_of_any_shape():
    """The DeepSpeed convert path: a LightningModule's pruned state dict into a fresh dense instance
    (DeepSpeed's converter records an empty down_proj as (0, hidden) instead of (hidden, 0))."""
    from lightning_helpers import CausalLM

    from nirvana_pl import load_pruned_state_dict

    trained = CausalLM(seed=0)
    layers = [LayerPlan(4, 176, [0, 1, 2, 3], list(range(176))) for _ in range(4)]
    layers[1] = LayerPlan(4, 176, [0, 3], [])
    layers[3] = LayerPlan(4, 176, [2], list(range(0, 176, 2)))
    apply_plan(trained.net, PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="manual"))
    state = dict(trained.state_dict())
    state["net.model.layers.1.mlp.down_proj.weight"] = torch.empty(0, 64)
    fresh = CausalLM(seed=1)
    fresh.config = {"lr": 3e-3}  # a LightningModule's own config attribute is not the model's
    load_pruned_state_dict(fresh, state)
    assert fresh.net.model.layers[1].mlp.down_proj.weight.shape == (64, 0)
    # the dense sizes are recorded, so the export's later prune targets stay relative to the dense model
    assert fresh.net.config.nirvana_dense_reference == DenseReference.of(CausalLM(seed=2).net).to_dict()
    assert fresh.net.model.layers[3].self_attn.k_proj.weight.shape == (16, 64)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh.net(ids).logits, trained.net(ids).logits)
    with pytest.raises(ValueError, match="every layer"):
        load_pruned_state_dict(CausalLM(seed=1), {"net.lm_head.weight": state["net.lm_head.weight"]})
    zero3_model_states = {**state, "net.model.layers.0.self_attn.k_proj.weight": torch.empty(0)}
    with pytest.raises(ValueError, match="k_proj.weight is a 1-D placeholder.*convert_zero_checkpoint_to_fp32"):
        load_pruned_state_dict(CausalLM(seed=1), zero3_model_states)
    with pytest.raises(ValueError, match="LoRA adapter weights.*merge_and_unload"):
        load_pruned_state_dict(
            CausalLM(seed=1), {**state, "net.model.layers.0.mlp.up_proj.lora_A.default.weight": torch.zeros(8, 64)}
        )


@pytest.mark.parametrize("gated", [False, True])
def test_load_pruned_state_dict_reads_a_t5_ffn_width_from_its_input_projection(gated):
    """DeepSpeed's converter gives every empty weight one recorded shape: an FFN pruned away can arrive
    with wo of shape (0, d_model); its width (0) comes from wi / wi_0."""
    from nirvana_pl import load_pruned_state_dict
    from nirvana_pl.arch.t5 import t5_layers

    trained = tiny_t5(gated=gated)
    units = find_units(trained)
    layers = [
        LayerPlan(u.num_kv_groups, u.mlp_width, list(range(u.num_kv_groups)), list(range(u.mlp_width))) for u in units
    ]
    emptied = next(i for i, u in enumerate(units) if u.mlp_width)
    layers[emptied] = LayerPlan(units[emptied].num_kv_groups, units[emptied].mlp_width, [0], [])
    apply_plan(trained, PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="manual"))
    state = dict(trained.state_dict())
    wo = next(k for k, v in state.items() if k.endswith(".wo.weight") and v.numel() == 0)
    state[wo] = torch.empty(0, trained.config.d_model)
    fresh = tiny_t5(gated=gated, seed=1)
    load_pruned_state_dict(fresh, state)
    assert t5_layers(fresh) == t5_layers(trained)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(input_ids=ids, decoder_input_ids=ids).logits, trained(input_ids=ids, decoder_input_ids=ids).logits
        )
