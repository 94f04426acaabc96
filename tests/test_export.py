"""export.py: pruned models saved so that transformers (with or without nirvana_pl) loads them back."""

from __future__ import annotations

import ast
import json
import os
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import calib_batches, tiny_llama, tiny_mistral, tiny_qwen2  # noqa: E402
from nirvana_pl.export import load_pruned, save_pruned  # noqa: E402
from nirvana_pl.arch import architecture_for_type  # noqa: E402
from nirvana_pl.hub_code import modeling_nirvana, modeling_nirvana_t5  # noqa: E402
from nirvana_pl.oneshot import prune  # noqa: E402
from nirvana_pl.surgery import layer_widths  # noqa: E402
from without_nirvana_pl import run_without_nirvana_pl  # noqa: E402

NEW_TOKENS = 6


def tiny_llama_tied(seed: int = 0):
    """Llama with tied input/output embeddings (lm_head.weight is not in the checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
        intermediate_size=176, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


# 8 query heads over 4 KV heads (g = 2), head_dim 16, everywhere: uniform pruning can drop a KV group.
FACTORIES = {
    "llama": tiny_llama,
    "llama_tied": tiny_llama_tied,
    "qwen2": partial(tiny_qwen2, num_kv=4, heads=8, head_dim=16),
    "mistral": partial(tiny_mistral, num_kv=4, heads=8, head_dim=16),
}
BASE_TYPE = {"llama": "llama", "llama_tied": "llama", "qwen2": "qwen2", "mistral": "mistral"}


def _pruned(arch: str, sparsity: float = 0.4, uniform: bool = False, gamma: float = 3.0):
    # gamma pinned (not the library default): the uniform cases below rely on the widths it gives
    model = FACTORIES[arch]()
    prune(model, sparsity, "magnitude", uniform=uniform, gamma=gamma)
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = calib_batches(n=1, batch=2, seq=9, seed=3)[0]
    return ids, torch.ones_like(ids)


@torch.no_grad()
def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits.float()


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip


def _assert_non_uniform(model) -> None:
    widths = layer_widths(model)
    assert any(w != widths[0] for w in widths), f"test needs a non-uniform model, got {widths}"
    assert model.config.nirvana_layer_widths == widths


def _config_json(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# Checked in a child interpreter that cannot import nirvana_pl (see without_nirvana_pl.py).
CHILD = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM

    exp = torch.load(expected_file, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__.startswith("Nirvana"), type(model)
    assert "nirvana_pl" not in sys.modules
    ids, mask = exp["input_ids"], exp["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=exp["new_tokens"],
                             min_new_tokens=exp["new_tokens"], do_sample=False, pad_token_id=0)
    err = (logits - exp["logits"]).abs().max().item()
    assert torch.allclose(logits, exp["logits"], atol=1e-5, rtol=0), f"max |logits diff| = {err}"
    assert torch.equal(gen, exp["generated"]), (gen.tolist(), exp["generated"].tolist())
    print("CHILD_OK", err)
    """
)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_non_uniform_loads_with_stock_transformers_without_nirvana_pl(arch, tmp_path):
    model = _pruned(arch)
    _assert_non_uniform(model)
    folder = save_pruned(model, tmp_path / "pruned")

    cfg = _config_json(folder)
    base = BASE_TYPE[arch]
    assert cfg["model_type"] == f"nirvana_{base}"
    assert cfg["nirvana_base_model_type"] == base
    assert cfg["nirvana_layer_widths"] == layer_widths(model)
    assert cfg["architectures"] == [f"Nirvana{type(model).__name__}"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == f"modeling_nirvana.Nirvana{type(model).__name__}"
    assert cfg["auto_map"]["AutoConfig"].startswith("modeling_nirvana.Nirvana")
    shipped = (folder / "modeling_nirvana.py").read_text()
    assert shipped.startswith(Path(modeling_nirvana.__file__).read_text().rstrip())
    assert shipped == architecture_for_type(base).hub_code()

    ids, mask = _inputs()
    expected = tmp_path / "expected.pt"
    torch.save(
        {"input_ids": ids, "attention_mask": mask, "logits": _logits(model, ids, mask),
         "generated": _greedy(model, ids, mask), "new_tokens": NEW_TOKENS},
        expected,
    )  # fmt: skip
    run_without_nirvana_pl(CHILD, folder, expected, tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_load_pruned_non_uniform_equal_logits_and_generation(arch, tmp_path):
    model = _pruned(arch)
    _assert_non_uniform(model)
    folder = save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(folder).eval()

    assert isinstance(loaded, architecture_for_type(BASE_TYPE[arch]).nirvana_classes()[1])
    assert layer_widths(loaded) == layer_widths(model)
    for (name, p), (name2, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert name == name2 and p.shape == q.shape and torch.equal(p, q), name
    ids, mask = _inputs()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), atol=1e-5, rtol=0)
    assert torch.equal(_greedy(loaded, ids, mask), _greedy(model, ids, mask))


def test_static_cache_with_chunked_prefill(tmp_path):
    # Eager static-cache allocation would size every layer from the global num_key_value_heads.
    model = _pruned("llama")
    loaded = load_pruned(save_pruned(model, tmp_path / "pruned"))
    ids, mask = _inputs()
    with torch.no_grad():
        out = loaded.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0, cache_implementation="static", prefill_chunk_size=4,
        )  # fmt: skip
    assert torch.equal(out, _greedy(model, ids, mask))


def test_load_pruned_tied_embeddings_stay_tied(tmp_path):
    model = _pruned("llama_tied")
    folder = save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(folder)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids, mask = _inputs()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,sparsity", [("qwen2", 0.4), ("mistral", 0.4), ("llama", 0.2)])
def test_uniform_saves_a_stock_folder(arch, sparsity, tmp_path):
    from transformers import AutoModelForCausalLM

    dense_kv = FACTORIES[arch]().config.num_key_value_heads
    model = _pruned(arch, sparsity, uniform=True)
    assert not hasattr(model.config, "nirvana_layer_widths")
    if arch != "llama":  # llama at 0.2 keeps all KV groups (fewer would break hidden % heads, see below)
        assert model.config.num_key_value_heads < dense_kv
    folder = save_pruned(model, tmp_path / "pruned")

    cfg = _config_json(folder)
    assert cfg["model_type"] == BASE_TYPE[arch]
    assert cfg["architectures"] == [type(model).__name__]
    assert not {"auto_map", "nirvana_layer_widths", "nirvana_base_model_type"} & set(cfg)
    assert not (folder / "modeling_nirvana.py").exists()

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code
    assert type(loaded) is type(model)
    ids, mask = _inputs()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), atol=1e-5, rtol=0)
    assert type(load_pruned(folder)) is type(model)


def test_uniform_widths_the_stock_config_rejects_use_the_nirvana_format(tmp_path):
    # LlamaConfig requires hidden_size % num_attention_heads == 0; 3 of 4 KV groups = 6 heads over 64.
    model = _pruned("llama", 0.4, uniform=True)
    assert {w["num_attention_heads"] for w in layer_widths(model)} == {6} and model.config.hidden_size == 64
    # surgery already kept the per-layer description, so a plain save_pretrained works too
    assert model.config.nirvana_layer_widths == layer_widths(model)
    model.save_pretrained(tmp_path / "plain")
    folder = save_pruned(model, tmp_path / "pruned")
    cfg = _config_json(folder)
    assert cfg["model_type"] == "nirvana_llama"
    assert cfg["nirvana_layer_widths"] == layer_widths(model)
    loaded = load_pruned(folder)
    ids, mask = _inputs()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), atol=1e-5, rtol=0)


def test_reprune_a_loaded_model_and_save_again(tmp_path):
    from nirvana_pl.allocate import DenseReference

    reference = DenseReference.of(tiny_llama())
    model = _pruned("llama")
    loaded = load_pruned(save_pruned(model, tmp_path / "first"))
    prune(loaded, 0.5, "magnitude", reference=reference)  # second prune event: 0.4 -> 0.5 of the dense model
    _assert_non_uniform(loaded)
    folder = save_pruned(loaded, tmp_path / "second")
    cfg = _config_json(folder)
    assert cfg["architectures"] == ["NirvanaLlamaForCausalLM"] and cfg["model_type"] == "nirvana_llama"
    again = load_pruned(folder)
    assert layer_widths(again) == layer_widths(loaded)
    ids, mask = _inputs()
    torch.testing.assert_close(_logits(again, ids, mask), _logits(loaded, ids, mask), atol=1e-5, rtol=0)


def test_bf16_roundtrip_keeps_dtype(tmp_path):
    model = _pruned("qwen2")
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    # .to() also casts the rotary buffer; from_pretrained keeps it fp32. Compare like with like.
    model.model.rotary_emb.inv_freq = inv_freq
    folder = save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(folder)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name
    ids, mask = _inputs()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), atol=0, rtol=0)


def test_load_pruned_reads_plain_save_pretrained_of_a_non_uniform_model(tmp_path):
    model = _pruned("mistral")
    model.save_pretrained(tmp_path / "plain")  # stock model_type + nirvana_layer_widths
    assert _config_json(tmp_path / "plain")["model_type"] == "mistral"
    loaded = load_pruned(tmp_path / "plain")
    ids, mask = _inputs()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), atol=1e-5, rtol=0)


def test_tokenizer_is_saved_when_given(tmp_path):
    class FakeTokenizer:
        def save_pretrained(self, directory):
            Path(directory, "tokenizer_config.json").write_text("{}")

    folder = save_pruned(_pruned("llama"), tmp_path / "pruned", tokenizer=FakeTokenizer())
    assert (folder / "tokenizer_config.json").is_file()
    assert not (save_pruned(_pruned("qwen2"), tmp_path / "no_tok") / "tokenizer_config.json").exists()


def test_load_pruned_without_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*save_pruned"):
        load_pruned(tmp_path / "empty")


def test_load_pruned_unknown_nirvana_type_is_a_clear_error(tmp_path):
    folder = save_pruned(_pruned("llama"), tmp_path / "pruned")
    cfg = _config_json(folder)
    cfg["model_type"] = "nirvana_gpt9"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model_type 'nirvana_gpt9'.*trust_remote_code"):
        load_pruned(folder)


def test_save_pruned_rejects_unsupported_and_file_paths(tmp_path):
    from conftest import tiny_gpt2
    from nirvana_pl.units import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        save_pruned(tiny_gpt2(), tmp_path / "gpt2")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="pass a folder"):
        save_pruned(_pruned("llama"), tmp_path / "file")


def test_save_pruned_of_a_peft_model_merges_or_keeps_the_adapter_apart(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lora = peft.get_peft_model(
        _pruned("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    merged = save_pruned(lora, tmp_path / "merged")
    assert _config_json(merged)["model_type"] == "nirvana_llama"
    assert not (merged / "adapter").exists()
    separate = save_pruned(lora, tmp_path / "separate", adapters="separate")
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(merged)(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        restored = peft.PeftModel.from_pretrained(load_pruned(separate), separate / "adapter")
        torch.testing.assert_close(restored(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
    assert any("lora_" in n for n, _ in lora.named_parameters())  # saving left the adapters in place


def test_direct_construction_initialises_resized_layers():
    widths = [
        {"num_key_value_heads": 1, "num_attention_heads": 2, "intermediate_size": 24},
        {"num_key_value_heads": 3, "num_attention_heads": 6, "intermediate_size": 40},
    ]
    config_cls, model_cls = architecture_for_type("llama").nirvana_classes()
    config = config_cls(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
        intermediate_size=176, vocab_size=128, nirvana_layer_widths=widths,
    )  # fmt: skip
    model = model_cls(config).eval()
    assert layer_widths(model) == widths
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (32, 64) and layer.self_attn.o_proj.weight.shape == (64, 32)
    assert layer.mlp.down_proj.weight.shape == (64, 24)
    # transformers' init (normal, std=initializer_range), not torch's kaiming default (std ~0.07 here)
    assert layer.mlp.gate_proj.weight.std().item() < 0.03
    ids, mask = _inputs()
    assert _logits(model, ids, mask).shape == (2, 9, 128)


@pytest.mark.parametrize("hub_module", [modeling_nirvana, modeling_nirvana_t5], ids=["decoder", "t5"])
def test_hub_code_imports_only_torch_transformers_and_the_stdlib(hub_module):
    tree = ast.parse(Path(hub_module.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports do not survive the copy into a checkpoint folder"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "typing", "warnings", "torch", "transformers"}, roots
