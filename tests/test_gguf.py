"""GGUF export: the file llama.cpp reads, checked with the gguf reader and a small torch forward of the file.

llama.cpp itself runs the same files in benchmarks/gguf_llamacpp.py (a separate command: it builds llama.cpp).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_mistral, tiny_qwen2, tiny_qwen3
from gguf_reference import gguf_logits, metadata

from nirvana_pl import prune, save_pruned
from nirvana_pl.arch import architecture_of
from nirvana_pl.gguf_export import read_gguf_tensors, write_gguf
from nirvana_pl.gguf_layout import deinterleave_rotary, interleave_rotary
from nirvana_pl.plan import LayerPlan, PruningPlan
from nirvana_pl.surgery import apply_plan
from nirvana_pl.units import UnsupportedModelError, find_units

VOCAB = 320
FAMILIES = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3}


@functools.cache
def bpe_tokenizer():
    """A byte-level BPE tokenizer of 320 tokens trained on Python's docs (offline, a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nirvana_pl.embedded import pydoc_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator([pydoc_text()[:40000]], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def model_of(family: str, seed: int = 0) -> torch.nn.Module:
    model = FAMILIES[family](seed=seed)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    return model.eval()


def pruned(family: str, sparsity: float = 0.4) -> torch.nn.Module:
    model = model_of(family)
    prune(model, sparsity, "magnitude", [torch.randint(3, VOCAB, (2, 12))], 2.0, mlp_round_to=1)
    return model


def with_widths(family: str, kv: list[list[int]], mlp: list[int]) -> torch.nn.Module:
    """A model whose layer i keeps KV groups ``kv[i]`` and its first ``mlp[i]`` MLP channels."""
    model = model_of(family)
    units = find_units(model)
    layers = [LayerPlan(u.num_kv_groups, u.mlp_width, k, list(range(m))) for u, k, m in zip(units, kv, mlp)]
    apply_plan(model, PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="manual"))
    return model


TEXT_IDS = [5, 77, 130, 9, 250, 31, 64, 200, 17, 3, 99, 180]


def assert_same_logits(model, path, atol=2e-4) -> None:
    with torch.no_grad():
        want = model(torch.tensor([TEXT_IDS])).logits[0]
    got = gguf_logits(path, TEXT_IDS)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= atol * max(1.0, scale), float((got - want).abs().max())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_pruned_model_is_a_deci_file_that_computes_the_model(family, tmp_path):
    model = pruned(family)
    widths = architecture_of(model).widths(model)
    assert len({w["intermediate_size"] for w in widths}) > 1  # layers of different widths
    result = write_gguf(model, tmp_path / "m.gguf", tokenizer=bpe_tokenizer(), dtype="f32", progress=False)
    meta = metadata(result.path)
    assert meta["general.architecture"] == "deci" and result.arch == "deci"
    assert meta["deci.feed_forward_length"] == [w["intermediate_size"] for w in widths]
    assert meta["deci.attention.head_count"] == [w["num_attention_heads"] for w in widths]
    assert meta["deci.attention.head_count_kv"] == [w["num_key_value_heads"] for w in widths]
    assert meta["deci.block_count"] == len(widths)
    assert meta["deci.vocab_size"] == VOCAB
    assert_same_logits(model, result.path)


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_uniform_model_keeps_its_own_llama_cpp_architecture(family, arch, tmp_path):
    model = model_of(family)
    path = save_pruned(model, tmp_path / "dense.gguf", format="gguf", gguf_dtype="f32", tokenizer=bpe_tokenizer())
    meta = metadata(path)
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.feed_forward_length"] == model.config.intermediate_size  # one number, not a list
    assert_same_logits(model, path)


def test_tensors_are_the_weights_with_q_k_rows_in_llama_cpp_order(tmp_path):
    model = pruned("llama")
    path = save_pruned(model, tmp_path / "m.gguf", format="gguf", gguf_dtype="f32", tokenizer=bpe_tokenizer())
    tensors = read_gguf_tensors(path)
    attn = model.model.layers[1].self_attn
    n_heads = attn.q_proj.weight.shape[0] // 16
    q = torch.from_numpy(tensors["blk.1.attn_q.weight"])
    assert not torch.equal(q, attn.q_proj.weight)  # re-ordered ...
    torch.testing.assert_close(deinterleave_rotary(q, n_heads), attn.q_proj.weight, rtol=0, atol=0)  # ... only
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], attn.v_proj.weight.detach().numpy())
    down = model.model.layers[2].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.2.ffn_down.weight"], down)
    np.testing.assert_array_equal(tensors["output.weight"], model.lm_head.weight.detach().numpy())
    assert len(tensors) == 2 + 1 + 4 * 9  # embedding, final norm, head; 9 tensors a layer


def test_interleave_rotary_round_trips():
    w = torch.randn(6 * 8, 5)
    torch.testing.assert_close(deinterleave_rotary(interleave_rotary(w, 6), 6), w, rtol=0, atol=0)
    row = interleave_rotary(torch.arange(8.0), 1)
    assert row.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_a_layer_without_mlp_keeps_its_attention_in_the_file(tmp_path):
    """llama.cpp's deci graph drops a layer's whole output (attention too) when its MLP width is 0, so such a
    layer is written with one all-zero channel; the reference forward reproduces deci's skip."""
    model = with_widths("llama", kv=[[0], [0, 2], [1], [1, 3]], mlp=[100, 0, 0, 60])
    result = write_gguf(model, tmp_path / "z.gguf", tokenizer=bpe_tokenizer(), dtype="f32", progress=False)
    meta = metadata(result.path)
    assert meta["deci.attention.head_count_kv"] == [1, 2, 1, 2]
    assert meta["deci.feed_forward_length"] == [100, 1, 1, 60]
    tensors = read_gguf_tensors(result.path)
    assert tensors["blk.1.ffn_down.weight"].shape == (64, 1) and not tensors["blk.1.ffn_down.weight"].any()
    assert len(result.notes) == 2 and "layer 1 has no MLP channel" in result.notes[0]
    assert_same_logits(model, result.path)


def test_q8_0_and_half_precision_files(tmp_path):
    model = pruned("qwen2")
    tok = bpe_tokenizer()
    sizes = {}
    for dtype, atol in (("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)):
        result = write_gguf(model, tmp_path / f"{dtype}.gguf", tokenizer=tok, dtype=dtype, progress=False)
        sizes[dtype] = result.bytes
        assert_same_logits(model, result.path, atol=atol)
        tensors = read_gguf_tensors(result.path)
        v = model.model.layers[0].self_attn.v_proj.weight.detach().numpy()
        err = np.abs(tensors["blk.0.attn_v.weight"] - v).max()
        assert 0 < err < (0.02 if dtype != "f16" else 1e-3)  # stored in that type, close to the weight
        if dtype == "q8_0":  # rows of a width not a multiple of 32 stay f16, and are named
            widths = [u.mlp_width for u in find_units(model)]
            assert len(result.not_quantized) == sum(w % 32 != 0 for w in widths)
    assert sizes["q8_0"] < sizes["f16"]


def test_llama3_rope_scaling_is_written_as_rope_factors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = save_pruned(model, tmp_path / "l3.gguf", format="gguf", gguf_dtype="f32", tokenizer=bpe_tokenizer())
    tensors = read_gguf_tensors(path)
    assert "rope_freqs.weight" in tensors and (tensors["rope_freqs.weight"] > 1).any()
    assert "output.weight" not in tensors  # tied: llama.cpp takes token_embd
    assert_same_logits(model, path)


def test_lora_adapters_are_merged_into_the_file(tmp_path):
    peft = pytest.importorskip("peft")
    model = pruned("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                      init_lora_weights=False))  # fmt: skip
    path = save_pruned(lora, tmp_path / "lora.gguf", format="gguf", gguf_dtype="f32", tokenizer=bpe_tokenizer())
    assert_same_logits(lora.eval(), path)
    assert not any("lora" in name for name in read_gguf_tensors(path))


def test_tokenizer_metadata_from_a_transformers_tokenizer(tmp_path):
    tok = bpe_tokenizer()
    path = save_pruned(pruned("llama"), tmp_path / "t.gguf", format="gguf", tokenizer=tok)
    meta = metadata(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tok.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and set(meta["tokenizer.ggml.token_type"][3:]) == {1}
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template


def test_smollm2_tokenizer_written_from_transformers_matches_the_original_file(tmp_path):
    """The SmolLM2 GGUF's own tokenizer against what nirvana_pl writes from the tokenizer transformers loads from it."""
    from transformers import AutoTokenizer

    from nirvana_pl.embedded import smollm2_gguf_path
    from nirvana_pl.gguf_vocab import metadata_from_gguf, metadata_from_tokenizer

    source = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    original = {e.key: e.value for e in metadata_from_gguf(source, 49152)}
    written = {e.key: e.value for e in metadata_from_tokenizer(tok, 49152)}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):  # fmt: skip
        assert written[key] == original[key], key
    # transformers' GGUF loader keeps only the byte-level rule: the original's digit split is not in the tokenizer
    assert original["tokenizer.ggml.pre"] == "smollm" and written["tokenizer.ggml.pre"] == "gpt-2"


def test_tokenizer_copied_from_a_gguf_file(tmp_path):
    first = save_pruned(pruned("llama"), tmp_path / "a.gguf", format="gguf", tokenizer=bpe_tokenizer())
    second = save_pruned(pruned("qwen2"), tmp_path / "b.gguf", format="gguf", tokenizer=str(first))
    a, b = metadata(first), metadata(second)
    assert {k: v for k, v in a.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in b.items() if k.startswith("tokenizer.")}  # fmt: skip


def test_refusals_say_what_to_do(tmp_path):
    tok = bpe_tokenizer()
    with pytest.raises(UnsupportedModelError, match="layers differ in width.*uniform=True"):
        save_pruned(pruned("qwen3"), tmp_path / "q3.gguf", format="gguf", tokenizer=tok)
    with pytest.raises(ValueError, match="needs tokenizer="):
        save_pruned(pruned("llama"), tmp_path / "x.gguf", format="gguf")
    with pytest.raises(ValueError, match="gguf_dtype='q4_k'"):
        save_pruned(pruned("llama"), tmp_path / "x.gguf", format="gguf", gguf_dtype="q4_k", tokenizer=tok)
    with pytest.raises(ValueError, match="should end in .gguf"):
        save_pruned(pruned("llama"), tmp_path / "folder", format="gguf", tokenizer=tok)
    with pytest.raises(ValueError, match="adapters='separate'"):
        save_pruned(pruned("llama"), tmp_path / "x.gguf", format="gguf", tokenizer=tok, adapters="separate")
    small = tiny_llama()  # 128 embedding rows: the 320-token tokenizer does not fit
    with pytest.raises(ValueError, match="only 128 embedding rows"):
        save_pruned(small, tmp_path / "x.gguf", format="gguf", tokenizer=tok)
    first = save_pruned(pruned("llama"), tmp_path / "a.gguf", format="gguf", tokenizer=tok)
    with pytest.raises(ValueError, match="has 320 tokens but the model has 128"):
        save_pruned(small, tmp_path / "x.gguf", format="gguf", tokenizer=str(first))
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*writing"))


def test_unsupported_family_is_refused_by_name(tmp_path):
    from arch_configs import build

    with pytest.raises(UnsupportedModelError, match="has no llama.cpp layout; GGUF export covers the decoder"):
        save_pruned(build("t5"), tmp_path / "t5.gguf", format="gguf", tokenizer=bpe_tokenizer())


# ------------------------------------------------------------------------------------------------ every family
#: on top of tests/arch_configs.py's tiny configs: what llama.cpp's graph of the family needs (a head tied to the
#: embedding, every query head of hidden_size / head_dim, NoPE layers where llama.cpp's smollm3 has them), and a
#: query scale that is not head_dim's (Gemma 2/3), so that folding it into the file is checked
GGUF_FAMILY_CONFIGS = {
    "gemma": dict(tie_word_embeddings=True),
    "gemma2": dict(tie_word_embeddings=True, query_pre_attn_scalar=24),
    "gemma3_text": dict(query_pre_attn_scalar=24, final_logit_softcapping=4.0),
    "granite": {}, "smollm3": dict(no_rope_layers=[1, 1, 1]), "qwen3_moe": {}, "mixtral": {},
    "phi3": dict(sliding_window=None),
    "cohere": dict(num_attention_heads=4, num_key_value_heads=2, use_qk_norm=False, tie_word_embeddings=True),
    "stablelm": {}, "olmo2": dict(num_attention_heads=4, num_key_value_heads=2),
    "olmo3": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen2_moe": {},
}  # fmt: skip
GGUF_ARCH = {"gemma3_text": "gemma3", "cohere": "command-r", "olmo3": "olmo2", "mixtral": "llama",
             "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}  # fmt: skip


def family_model(model_type: str, **overrides) -> torch.nn.Module:
    """A tiny random model of ``model_type`` (tests/arch_configs.py) with this suite's 320-token vocabulary."""
    from arch_configs import TINY_CONFIGS, model_from_config
    from transformers import AutoConfig

    kw = {**TINY_CONFIGS[model_type], **GGUF_FAMILY_CONFIGS.get(model_type, {}), "vocab_size": VOCAB, **overrides}
    torch.manual_seed(0)
    model = model_from_config(AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():  # norms away from their init, so that a misplaced one (or a missing Gemma offset) shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def uniform_pruned(model: torch.nn.Module) -> torch.nn.Module:
    """Pruned with uniform=True (so every layer keeps the same widths); only MLP channels where llama.cpp's graph
    sizes the query by hidden_size."""
    layout = architecture_of(model).gguf
    kw: dict = {"min_kv_groups": model.config.num_key_value_heads} if layout.full_query else {}
    if getattr(model.config, "num_experts_per_tok", None):
        kw["mlp_round_to"] = 8  # (expert widths transformers' grouped_mm computes)
    prune(model, 0.3, "magnitude", [torch.randint(3, VOCAB, (2, 12))], 2.0, uniform=True,
          **{"mlp_round_to": 1, **kw})  # fmt: skip
    return model


@pytest.mark.parametrize("model_type", sorted(GGUF_FAMILY_CONFIGS))
def test_every_family_is_written_for_its_own_llama_cpp_graph(model_type, tmp_path):
    arch = GGUF_ARCH.get(model_type, model_type)
    for name, model in (("dense", family_model(model_type)), ("pruned", uniform_pruned(family_model(model_type)))):
        result = write_gguf(model, tmp_path / f"{name}.gguf", tokenizer=bpe_tokenizer(), dtype="f32", progress=False)
        meta = metadata(result.path)
        assert meta["general.architecture"] == arch == result.arch
        units = find_units(model)
        assert meta[f"{arch}.attention.head_count_kv"] == units[0].num_kv_groups  # one number, not a list
        assert meta[f"{arch}.attention.head_count"] == units[0].num_kv_groups * units[0].group_size
        assert_same_logits(model, result.path)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in family_model(model_type).parameters())


def test_gemma_norms_are_written_with_their_offset_and_the_query_scale_folded_in(tmp_path):
    model = family_model("gemma2")
    path = save_pruned(model, tmp_path / "g.gguf", format="gguf", gguf_dtype="f32", tokenizer=bpe_tokenizer())
    tensors = read_gguf_tensors(path)
    layer = model.model.layers[0]
    np.testing.assert_allclose(tensors["blk.0.attn_norm.weight"], 1 + layer.input_layernorm.weight.detach(), 1e-6)
    np.testing.assert_allclose(tensors["blk.0.post_ffw_norm.weight"],
                               1 + layer.post_feedforward_layernorm.weight.detach(), 1e-6)  # fmt: skip
    q = layer.self_attn.q_proj.weight.detach()  # transformers scales by 24 ** -0.5, llama.cpp by head_dim ** -0.5
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight"], q * (16 / 24) ** 0.5, rtol=1e-5, atol=1e-7)
    assert "output.weight" not in tensors  # llama.cpp's gemma2 graph reads the embedding


def test_families_refuse_what_their_llama_cpp_graph_cannot_compute(tmp_path):
    tok = bpe_tokenizer()

    def write(model):
        return save_pruned(model, tmp_path / "x.gguf", format="gguf", tokenizer=tok)

    heads_cut = family_model("phi3")  # every layer keeps KV group 0 of 2 (uniform widths)
    layers = [LayerPlan(u.num_kv_groups, u.mlp_width, [0], list(range(u.mlp_width))) for u in find_units(heads_cut)]
    apply_plan(heads_cut, PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="manual"))
    with pytest.raises(UnsupportedModelError, match="sizes the query by hidden_size.*min_kv_groups=2"):
        write(heads_cut)
    with pytest.raises(UnsupportedModelError, match="computes the logits with the token embedding.*tie_word"):
        write(family_model("gemma", tie_word_embeddings=False))
    with pytest.raises(UnsupportedModelError, match=r"no rotary embedding in layers \[1\].*every 4th layer"):
        write(family_model("smollm3", no_rope_layers=[1, 0, 1]))
    with pytest.raises(UnsupportedModelError, match="q/k norms exactly when a model has 64 layers"):
        write(family_model("cohere", use_qk_norm=True))
    with pytest.raises(UnsupportedModelError, match="keeps the top-k routing weights.*norm_topk_prob=True"):
        write(family_model("qwen2_moe", norm_topk_prob=True))
    experts_cut = family_model("qwen3_moe")
    prune(experts_cut, 0.4, "magnitude", [torch.randint(3, VOCAB, (2, 12))], 2.0)
    with pytest.raises(UnsupportedModelError, match="layers differ in width.*uniform=True"):
        write(experts_cut)
    assert not (tmp_path / "x.gguf").exists()


def test_a_failed_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    import nirvana_pl.gguf_export as gguf_export

    tok = bpe_tokenizer()
    path = save_pruned(pruned("llama"), tmp_path / "m.gguf", format="gguf", tokenizer=tok)
    before = path.read_bytes()

    def broken(tensor, kind):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "_encode", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(pruned("qwen2"), path, format="gguf", tokenizer=tok)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*writing"))


def test_save_pruned_model_callback_also_writes_the_gguf_file(tmp_path):
    from lightning_helpers import CausalLM, token_loader, trainer

    from nirvana_pl import NirvanaPruningCallback
    from nirvana_pl.modules import SavePrunedModel

    module = CausalLM(vocab_size=VOCAB)
    module.tokenizer = bpe_tokenizer()
    saver = SavePrunedModel(gguf_dtype="q8_0")
    callbacks = [NirvanaPruningCallback(sparsity=0.4, prune_at=4, warmup_steps=2), saver]
    trainer(tmp_path, 6, callbacks).fit(module, token_loader())
    path = saver.saved_to / SavePrunedModel.GGUF_NAME
    meta = metadata(path)
    assert meta["general.architecture"] == "deci" and meta["general.file_type"] == 7  # mostly Q8_0
    assert meta["deci.feed_forward_length"] == [u.mlp_width or 1 for u in find_units(module.net)]
    assert_same_logits(module.net.eval(), path, atol=3e-2)


def test_export_command_writes_a_saved_folder_as_gguf(tmp_path, capsys):
    from nirvana_pl import cli

    model = pruned("qwen2")
    folder = save_pruned(model, tmp_path / "pruned", tokenizer=bpe_tokenizer())
    out = tmp_path / "pruned.gguf"
    result = cli.run_command(["export", "--model", str(folder), "--gguf", str(out), "--dtype", "f32"])
    assert result["arch"] == "deci" and "GGUF (deci, f32" in capsys.readouterr().out
    assert_same_logits(model, out)
    with pytest.raises(SystemExit):
        cli.run_command(["export", "--model", str(folder), "--gguf", str(out)])
    assert "exists; pass --overwrite true" in capsys.readouterr().err
    copied = cli.run_command(["export", "--model", str(folder), "--gguf", str(tmp_path / "b.gguf"),
                              "--tokenizer", str(out)])  # fmt: skip
    assert metadata(copied["gguf"])["tokenizer.ggml.tokens"] == metadata(out)["tokenizer.ggml.tokens"]


@pytest.mark.parametrize("rules, name", [
    ("llama3", "llama-bpe"), ("qwen2", "qwen2"), ("digits", "smollm"), ("bytelevel", "gpt-2"), ("other", None)])
def test_pre_tokenizer_is_recognised_from_the_tokenizers_rules(rules, name):
    """A tokenizer.json's pre-tokenizer as Llama 3 / Qwen 2 / SmolLM / GPT-2 state theirs, and one llama.cpp lacks."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    from nirvana_pl.gguf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT, pre_tokenizer_name

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=rules in ("digits", "bytelevel"))
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "other": r"\w+|[^\w\s]+"}.get(rules)
    parts = [pre_tokenizers.Split(Regex(split), behavior="isolated")] if split else []
    if rules == "digits":
        parts = [pre_tokenizers.Digits(individual_digits=True)]
    backend = Tokenizer.from_str(bpe_tokenizer().backend_tokenizer.to_str())  # (a copy: the fixture is shared)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*parts, byte_level]) if parts else byte_level
    spec = json.loads(backend.to_str())
    if name is None:
        with pytest.raises(ValueError, match="pass tokenizer='base.gguf'"):
            pre_tokenizer_name(spec)
    else:
        assert pre_tokenizer_name(spec) == name


def test_save_pruned_model_callback_refuses_a_gguf_it_cannot_write_before_the_fit():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning_helpers import CausalLM

    from nirvana_pl.modules import SavePrunedModel

    import lightning.pytorch as pl
    from arch_configs import build

    class Seq2Seq(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build("t5")

    trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), callbacks=[])
    with pytest.raises(ValueError, match="writes GGUF files of cohere, .*llama, .* not of 't5'; drop gguf_dtype"):
        SavePrunedModel(gguf_dtype="f16").setup(trainer, Seq2Seq(), "fit")
    with pytest.raises(ValueError, match="no transformers fast tokenizer .*pass gguf_tokenizer="):
        SavePrunedModel(gguf_dtype="f16").setup(trainer, CausalLM(), "fit")
    with pytest.raises(ValueError, match="gguf_dtype='q4'"):
        SavePrunedModel(gguf_dtype="q4")


def test_save_pruned_model_callback_warns_when_the_pruned_model_has_no_gguf_graph(tmp_path):
    """A Qwen3 pruned to different widths: the folder is saved already, so the GGUF is a warning, not a failed fit."""
    from nirvana_pl.modules import SavePrunedModel

    saver = SavePrunedModel(gguf_dtype="f16")
    with pytest.warns(UserWarning, match="but not as GGUF: .*layers differ in width"):
        saver._save_gguf(pruned("qwen3"), tmp_path / "model.gguf", bpe_tokenizer())
    assert saver.gguf_saved_to is None and not (tmp_path / "model.gguf").exists()


def test_more_family_features_compute_the_model(tmp_path):
    """NoPE layers, Gemma 3's linear rope on its global layers, Granite with Llama 3.1's rope factors, Gemma 2's
    query scale in a model of the 27B's layer count, and a Qwen2-MoE whose shared expert was pruned away (written
    as one all-zero channel), each through the reference."""
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8}  # fmt: skip
    gemma3_rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}  # fmt: skip
    no_shared = family_model("qwen2_moe")
    layers = [LayerPlan(u.num_kv_groups, u.mlp_width, list(range(u.num_kv_groups)), list(range(u.expert_units)),
                        experts_before=u.num_experts, kept_experts=list(range(u.num_experts)),
                        shared_channels_before=u.shared_width) for u in find_units(no_shared)]  # fmt: skip
    apply_plan(no_shared, PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="manual"))
    assert find_units(no_shared)[0].shared_width == 0
    models = {
        "nope": family_model("smollm3", num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0]),
        "gemma3 linear rope": family_model("gemma3_text", rope_parameters=gemma3_rope),
        "granite llama3 rope": family_model("granite", rope_parameters=llama3),
        # llama.cpp scales queries by (hidden_size // heads) ** -0.5 in a 46-layer Gemma 2 (27B): 8 ** -0.5 here
        "gemma2 of 46 layers": family_model("gemma2", num_hidden_layers=46, layer_types=None),
        "qwen2_moe without its shared expert": no_shared,
    }
    for name, model in models.items():
        result = write_gguf(model, tmp_path / "m.gguf", tokenizer=bpe_tokenizer(), dtype="f32", progress=False)
        tensors = read_gguf_tensors(result.path)
        if name.startswith("granite"):
            assert "rope_freqs.weight" in tensors
        if name.startswith("gemma3"):
            assert metadata(result.path)["gemma3.rope.scaling.factor"] == 8.0
        if name.startswith("qwen2_moe"):
            shared_up = tensors["blk.0.ffn_up_shexp.weight"]
            assert shared_up.shape == (1, 64) and not shared_up.any()
            assert any("shared expert has no channel left" in note for note in result.notes)
        assert_same_logits(model, result.path)


def test_a_q8_0_mixture_of_experts_keeps_its_router_in_f32(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    path = save_pruned(family_model("mixtral"), tmp_path / "m.gguf", format="gguf", gguf_dtype="q8_0",
                       tokenizer=bpe_tokenizer())  # fmt: skip
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == GGMLQuantizationType.F32
    assert types["blk.0.ffn_gate_exps.weight"] == GGMLQuantizationType.Q8_0


def test_biases_and_rope_bases_a_graph_does_not_read_are_refused_and_a_window_is_noted_once(tmp_path):
    tok = bpe_tokenizer()
    for model_type in ("qwen3", "gemma2"):
        with pytest.raises(UnsupportedModelError, match="bias on its attn_output projection.*does not add.*folder"):
            write_gguf(family_model(model_type, attention_bias=True), tmp_path / "x.gguf", tokenizer=tok)
    bases = {"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="sliding-window layers' rotary embedding.*olmo2"):
        save_pruned(family_model("olmo3", rope_parameters=bases), tmp_path / "x.gguf", format="gguf", tokenizer=tok)
    result = write_gguf(family_model("phi3", sliding_window=4), tmp_path / "p.gguf", tokenizer=tok, progress=False)
    assert sum("sliding window of 4 tokens" in note for note in result.notes) == 1
