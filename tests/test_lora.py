"""LoRA (peft) through a prune: adapters sliced with their base weights, recovery with LoRA, export."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from conftest import tiny_llama, tiny_qwen2, tiny_qwen3  # noqa: E402
from lightning_helpers import CausalLM, token_loader, trainer  # noqa: E402

from nirvana_pl import NirvanaPruningCallback, load_pruned, masked, save_pruned  # noqa: E402
from nirvana_pl.allocate import DenseReference  # noqa: E402
from nirvana_pl.oneshot import allocation_config, make_plan  # noqa: E402
from nirvana_pl.saliency import SaliencyError, compute_scores  # noqa: E402
from nirvana_pl.surgery import apply_plan  # noqa: E402
from nirvana_pl.units import UnsupportedModelError, find_units, prunable_parameter_count  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lora_model(factory=tiny_llama, targets=ALL, seed=0, **kw):
    """A peft model whose adapters are non-zero (init_lora_weights=False), so they change the output."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)
    return peft.get_peft_model(factory(seed=seed), config)


def tiny_phi3(seed: int = 0):
    """Phi-3: fused qkv_proj and gate_up_proj (a KV group owns three row blocks of one weight)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    return Phi3ForCausalLM(config).eval()


def test_lora_factors_of_fused_projections_follow_their_index_maps():
    """LoRA B rows of qkv_proj / gate_up_proj are sliced block by block like the weight: pruned == masked twin."""
    model = _lora_model(tiny_phi3, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    base = model.base_model.model
    plan = _plan(base)
    assert not plan.is_identity and plan.kv_groups_kept() != [4, 4, 4]
    ids = _ids(0)
    with torch.no_grad(), masked(base, plan):
        expected = base(ids).logits
    apply_plan(base, plan)
    attn = base.model.layers[0].self_attn
    assert attn.qkv_proj.lora_B["default"].weight.shape[0] == attn.qkv_proj.base_layer.weight.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, expected, atol=1e-5, rtol=1e-5)


class LM(CausalLM):
    """The helpers' user-style module around a given transformers model."""

    def __init__(self, net):
        super().__init__()
        self.net = net


def _plan(model, sparsity=0.4, saliency="functional"):
    cal = [_ids(1), _ids(2)]
    plan, _ = make_plan(model, saliency, allocation_config(sparsity, 2.0), DenseReference.of(model), calibration=cal)
    return plan


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_qwen3])
@pytest.mark.parametrize("targets", [ALL, ["q_proj", "o_proj", "lm_head"], ["down_proj", "up_proj"]])
def test_pruned_lora_model_equals_its_masked_twin_and_keeps_training(factory, targets):
    model = _lora_model(factory, targets)
    base = model.base_model.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in (5, 6):  # give the adapters Adam state
        base(_ids(seed)).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    plan = _plan(base)
    assert not plan.is_identity
    ids = _ids(0)
    with torch.no_grad(), masked(base, plan):
        expected = base(ids).logits
    states_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    shapes_before = {id(p): p.shape for p in opt.state}
    apply_plan(base, plan, [opt])
    with torch.no_grad():
        got = base(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # adapter shapes follow their layers, and their Adam state was sliced (not dropped)
    for u in find_units(base):
        for w in u.attn_weights + u.mlp_weights:
            for ad in w.adapters:
                assert ad.A.weight.shape[1] == w.weight.shape[1] and ad.B.weight.shape[0] == w.weight.shape[0]
                for p in (ad.A.weight, ad.B.weight):
                    assert opt.state[p]["exp_avg"].shape == p.shape
                    assert float(opt.state[p]["step"]) == float(states_before[id(p)]["step"])
    assert any(opt.state[p]["exp_avg"].shape != shapes_before[id(p)] for p in opt.state)
    # the adapters keep training on the smaller model; the frozen base does not move
    adapters = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if not p.requires_grad}
    base(_ids(7)).logits.float().pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(p, adapters[n]) for n, p in base.named_parameters() if n in adapters)
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters() if n in frozen)


def test_sliced_adapter_state_equals_the_state_before_sliced():
    model = _lora_model(targets=["o_proj", "gate_proj"])
    base = model.base_model.model
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    base(_ids(5)).logits.float().pow(2).mean().backward()
    opt.step()
    plan = _plan(base, 0.5)
    layer0 = plan.layers[0]
    o = base.model.layers[0].self_attn.o_proj
    gate = base.model.layers[0].mlp.gate_proj
    a_before = opt.state[o.lora_A["default"].weight]["exp_avg_sq"].clone()
    b_before = opt.state[gate.lora_B["default"].weight]["exp_avg"].clone()
    apply_plan(base, plan, [opt])
    g, h = 2, 16  # tiny_llama: 8 query heads over 4 KV heads, head_dim 16
    cols = torch.tensor([k * g * h + i for k in layer0.kept_kv_groups for i in range(g * h)])
    torch.testing.assert_close(opt.state[o.lora_A["default"].weight]["exp_avg_sq"], a_before[:, cols])
    rows = torch.tensor(layer0.kept_mlp_channels)
    torch.testing.assert_close(opt.state[gate.lora_B["default"].weight]["exp_avg"], b_before[rows])


def test_saliency_reads_the_effective_weight():
    model = _lora_model(targets=ALL)
    base = model.base_model.model
    merged = copy.deepcopy(model).merge_and_unload()
    cal = [_ids(1)]
    for estimator in ("magnitude", "functional", "wanda_sp", "taylor_loss"):
        with_adapters = compute_scores(base, estimator, calibration=cal)
        plain = compute_scores(merged, estimator, calibration=cal)
        for a, b in zip(with_adapters.attn + with_adapters.mlp, plain.attn + plain.mlp):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # nothing is left behind by the gradient estimators: no .grad on the frozen base, flags restored
    assert all(p.grad is None for p in base.parameters())
    assert all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)


def test_adapters_are_not_counted_as_prunable_parameters():
    plain = tiny_llama()
    model = _lora_model(targets=ALL)
    assert prunable_parameter_count(model.base_model.model) == prunable_parameter_count(plain)


@pytest.mark.parametrize("saliency", ["adam_taylor", None])  # None: the default, whose fisher half reads it too
def test_adam_state_saliency_on_a_frozen_lora_base_suggests_functional(tmp_path, saliency):
    module = LM(_lora_model(targets=["q_proj", "v_proj"]).base_model.model)
    chosen = {} if saliency is None else {"saliency": saliency}
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, **chosen)
    fit = trainer(tmp_path, max_steps=4, callbacks=[cb])
    with pytest.raises(SaliencyError, match=f"{cb.saliency}.*frozen base weight of a LoRA layer.*'functional'"):
        fit.fit(module, token_loader())
    assert fit.global_step == 0  # refused before the first step


def test_lora_model_pruned_mid_fit_keeps_training_its_adapters(tmp_path):
    module = LM(_lora_model(targets=ALL).base_model.model)
    cb = NirvanaPruningCallback(sparsity=0.4, prune_at=3, warmup_steps=2, saliency="functional", gamma=2.0)
    snapshots = {}
    from lightning.pytorch.callbacks import Callback

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step in (4, 7):
                snapshots[trainer.global_step] = {
                    n: p.detach().clone() for n, p in pl_module.named_parameters() if "lora_" in n
                }

    trainer(tmp_path, max_steps=7, callbacks=[cb, Watch()]).fit(module, token_loader())
    assert cb.records and cb.records[0].prunable_params_after < cb.records[0].plan.params_before
    changed = [not torch.equal(snapshots[4][n], snapshots[7][n]) for n in snapshots[4]]
    assert changed and all(changed)


def test_recovery_attaches_lora_and_trains_only_the_adapters(tmp_path):
    model = tiny_llama()
    module = LM(model)
    cb = NirvanaPruningCallback(
        sparsity=0.4, prune_at=3, warmup_steps=2, saliency="adam_taylor", gamma=2.0,
        recovery={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    )
    snapshots = {}
    from lightning.pytorch.callbacks import Callback

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step in (4, 8):
                snapshots[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                snapshots[f"opt{trainer.global_step}"] = {
                    id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]
                }

    t = trainer(tmp_path, max_steps=8, callbacks=[cb, Watch()])
    t.fit(module, token_loader())
    names = list(snapshots[8])
    adapters = [n for n in names if "lora_" in n]
    assert adapters and all(".lora_" in n for n in adapters)
    assert {id(p) for n, p in module.named_parameters() if "lora_" in n} == snapshots["opt8"]
    for n in names:
        moved = not torch.equal(snapshots[4][n], snapshots[8][n])
        assert moved == (n in adapters), n
    metrics = t.callback_metrics
    assert int(metrics["nirvana/trainable_params"]) == sum(snapshots[8][n].numel() for n in adapters)
    # sizes reported for the model do not count the recovery adapters
    assert cb.records[0].total_params_after == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    # export: merged, and base + adapter folder that peft loads; both give the trained model's logits
    ids = _ids(0)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    merged = load_pruned(save_pruned(model, tmp_path / "merged"))
    folder = save_pruned(model, tmp_path / "separate", adapters="separate")
    base = load_pruned(folder)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert (base(ids).logits - expected).abs().max() > 1e-3  # the base alone lacks the adapters
        restored = peft.PeftModel.from_pretrained(base, folder / "adapter")
        torch.testing.assert_close(restored(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_recovery_resumes_from_a_checkpoint_after_the_prune(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    recovery = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj", "up_proj"]}

    def run(max_steps, ckpt=None, seed=0):
        module = LM(tiny_llama(seed=seed))
        cb = NirvanaPruningCallback(sparsity=0.4, prune_at=3, warmup_steps=2, saliency="magnitude", recovery=recovery)
        saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=4)
        t = trainer(tmp_path, max_steps=max_steps, callbacks=[cb, saver], enable_checkpointing=True)
        t.fit(module, token_loader(n=16), ckpt_path=ckpt)  # 4 batches an epoch: step 4 ends an epoch
        return module, cb, t

    straight, _, _ = run(6)
    ckpt = next(tmp_path.glob("*step=4*.ckpt"))
    resumed, cb, t = run(6, ckpt=str(ckpt), seed=3)
    assert len(cb.records) == 1  # the prune did not run again
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for g in t.optimizers[0].param_groups for p in g["params"]} == {
        id(p) for p in resumed.parameters() if p.requires_grad
    }
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)


def test_recovery_arguments_are_checked_early(tmp_path):
    with pytest.raises(ValueError, match="use_dora"):
        NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, recovery={"use_dora": True})
    with pytest.raises(ValueError, match="keys are those of peft.LoraConfig"):
        NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, recovery={"rank": 8})
    with pytest.raises(TypeError, match="LoraConfig or a dict"):
        NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, recovery="lora")
    with pytest.raises(ValueError, match="iterative schedule"):
        NirvanaPruningCallback(schedule={3: 0.2, 6: 0.4}, warmup_steps=2, saliency="adam_taylor", recovery={})
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, saliency="magnitude",
                                recovery={"target_modules": ["query_key_value"]})
    with pytest.raises(ValueError, match="matches no linear layer.*q_proj"):
        trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(LM(tiny_llama()), token_loader())
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=3, warmup_steps=2, saliency="magnitude", recovery={})
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(LM(_lora_model().base_model.model), token_loader())


def test_adapters_that_cannot_be_sliced_are_refused_with_the_fix():
    dora = _lora_model(targets=["q_proj"], use_dora=True).base_model.model
    with pytest.raises(UnsupportedModelError, match="DoRA"):
        find_units(dora)
    ia3 = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))
    with pytest.raises(UnsupportedModelError, match="cannot slice.*merge"):
        find_units(ia3.base_model.model)
    with pytest.raises(ValueError, match="adapters='merge' or 'separate'|choose 'merge' or 'separate'"):
        save_pruned(tiny_llama(), "unused", adapters="both")


def test_recovery_can_keep_the_norms_trainable(tmp_path):
    module = LM(tiny_llama())
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=2, warmup_steps=1, saliency="magnitude",
                                recovery={"r": 2, "target_modules": ["q_proj"]}, recovery_train_norms=True)
    trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(module, token_loader())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if "norm" in n}
    assert norms and any("lora_" in n for n in trainable)
    assert trainable == norms | {n for n in trainable if "lora_" in n}
    assert len(norms) == 2 * 4 + 1  # input and post-attention norm of 4 layers, and the final norm
