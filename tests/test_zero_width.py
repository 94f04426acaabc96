"""A global allocation may remove a whole MLP; the model, training and export must cope."""

from __future__ import annotations

import torch
from conftest import tiny_llama

from nirvana_pl import load_pruned, save_pruned
from nirvana_pl.plan import LayerPlan, PruningPlan
from nirvana_pl.surgery import apply_plan


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
