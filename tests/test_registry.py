"""The architecture registry: the README's table and registration example, refusals, and no model-type branches
in the shared modules."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import nirvana_pl.arch as arch_registry
from nirvana_pl import prune, register_architecture, supported_model_types
from nirvana_pl.arch import architecture_for_type, architecture_of, architectures_table
from nirvana_pl.arch.decoder import DecoderArchitecture
from nirvana_pl.calibration import masked
from nirvana_pl.export import load_pruned, save_pruned
from nirvana_pl.surgery import layer_widths
from nirvana_pl.units import UnsupportedModelError, find_units

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip


@pytest.fixture
def registry(monkeypatch):
    """Registrations made in a test are undone after it."""
    arch_registry.supported_model_types()  # (built-ins loaded before the snapshot)
    monkeypatch.setattr(arch_registry, "_REGISTRY", dict(arch_registry._REGISTRY))


def _between(text: str, marker: str) -> str:
    return text.split(f"<!-- {marker} -->\n", 1)[1].split(f"<!-- /{marker} -->", 1)[0]


def test_readme_table_is_the_registry():
    assert _between(README, "architectures-table") == architectures_table()
    for mtype in supported_model_types():
        assert f"| `{mtype}` |" in README


def test_readme_registration_example_prunes_and_exports_a_custom_model(registry, tmp_path):
    code = re.search(r"```python\n(.*?)```", _between(README, "register-example"), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README register-example", "exec"), namespace)  # noqa: S102 - the README's own code
    assert "my_llama" in supported_model_types()
    torch.manual_seed(0)
    model = namespace["MyForCausalLM"](namespace["MyConfig"](**TINY)).eval()
    assert isinstance(architecture_of(model), DecoderArchitecture)
    dense = copy.deepcopy(model)
    plan = prune(model, 0.3, "magnitude", gamma=1.0)
    assert plan.kv_groups_kept() != [4, 4, 4] and len({tuple(w.values()) for w in layer_widths(model)}) > 1
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad(), masked(dense, plan):
        expected = dense(input_ids=ids).logits
    with torch.no_grad():
        assert (model(input_ids=ids).logits - expected).abs().max().item() < 1e-5
    loaded = load_pruned(save_pruned(model, tmp_path / "mine")).eval()
    assert type(loaded).__name__ == "NirvanaMyForCausalLM" and isinstance(loaded, namespace["MyForCausalLM"])
    stock = load_pruned(save_pruned(dense, tmp_path / "dense")).eval()  # a stock folder of a type transformers lacks
    assert type(stock) is namespace["MyForCausalLM"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(stock(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_registering_a_taken_model_type_needs_replace(registry):
    with pytest.raises(ValueError, match=r"'llama'.*already have an adapter.*replace=True"):
        register_architecture(DecoderArchitecture(("llama",)))
    mine = register_architecture(DecoderArchitecture(("llama",), notes="mine"), replace=True)
    assert architecture_for_type("llama") is mine and architecture_for_type("nirvana_llama") is mine
    with pytest.raises(TypeError, match="expected an Architecture"):
        register_architecture("llama")
    with pytest.raises(ValueError, match="exactly one model type"):
        DecoderArchitecture(("llama", "mistral"))


def _tiny(model_type: str, **extra):
    config = AutoConfig.for_model(model_type, **{**TINY, "num_hidden_layers": 2, **extra})
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("model_type", "extra", "names"),
    [
        ("qwen3_next", dict(layer_types=["linear_attention", "full_attention"], num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                            linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                            linear_value_head_dim=16), ["linear_attn"]),
        ("olmoe", dict(num_experts=4, num_experts_per_tok=2), ["mixture of experts"]),
        ("gpt2", dict(n_embd=64, n_layer=2, n_head=4), []),
    ],
    ids=["qwen3_next", "olmoe", "gpt2"],
)  # fmt: skip
def test_unsupported_models_are_refused_naming_the_types_and_the_unknown_layer_kind(model_type, extra, names):
    model = _tiny(model_type, **extra)
    with pytest.raises(UnsupportedModelError) as info:
        find_units(model)
    msg = str(info.value)
    assert f"model_type {model_type!r}" in msg and "llama" in msg and "qwen3" in msg and "register_architecture" in msg
    for name in names:
        assert name in msg


SHARED_MODULES = ("saliency", "allocate", "surgery", "optim", "calibration", "report", "export", "deepspeed",
                  "units", "callback", "oneshot", "plan", "schedule", "router_load")  # fmt: skip


def _code_words(source: str) -> set[str]:
    """Names, attributes, imported names and non-docstring string constants of ``source`` (comments and docstrings
    may mention a family as an example; code may not branch on one)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words |= {a.name for a in node.names} | ({node.module} if getattr(node, "module", None) else set())
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", node.value))
    return {part for word in words for part in re.split(r"[._]", word.lower()) if part} | {w.lower() for w in words}


@pytest.mark.parametrize("module", SHARED_MODULES)
def test_shared_modules_hold_no_model_type_branches(module):
    words = _code_words((ROOT / "nirvana_pl" / f"{module}.py").read_text())
    families = set(supported_model_types()) | {"t5", "seq2seq", "encoder"}
    assert not words & families, f"nirvana_pl/{module}.py: {sorted(words & families)} belong to an architecture adapter"
    assert "is_encoder_decoder" not in words
