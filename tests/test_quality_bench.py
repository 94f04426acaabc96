"""The FLOP counter of benchmarks/quality.py (the 'ideal speed-up' it reports) on a tiny GQA Llama."""

import importlib.util
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nirvana_pl import prune

_SPEC = importlib.util.spec_from_file_location(
    "quality_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
)
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_flop_counter_matches_shapes_and_pruning():
    model = _tiny()
    d, i, h, nq, nkv, L, V = 64, 96, 16, 4, 2, 2, 128
    per_layer = 2 * d * (nq * h + 2 * nkv * h) + 2 * nq * h * d + 2 * 3 * d * i
    assert quality.linear_flops(model) == L * per_layer + 2 * d * V
    assert quality.attention_flops(model, seq_len=32) == L * 4 * 32 * nq * h
    dense_lin = quality.linear_flops(model)
    dense_params = quality.attn_mlp_params(model)
    prune(model, 0.5, saliency="magnitude", gamma=1.0, mlp_round_to=1)
    removed = dense_params - quality.attn_mlp_params(model)
    assert removed > 0
    # no biases: every removed attention/MLP weight is one multiply-add per token
    assert dense_lin - quality.linear_flops(model) == 2 * removed
    assert quality.nonzero_attn_mlp_params(model) <= quality.attn_mlp_params(model)
    x = torch.randint(0, V, (1, 8))
    assert model(input_ids=x).logits.shape == (1, 8, V)


def test_zero_shot_comparison_flags_any_changed_plan_or_perplexity():
    spec = importlib.util.spec_from_file_location(
        "compare_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "compare_quality.py"
    )
    compare_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_quality)
    run = {"zero_shot": {"functional|3.0|0.2": {"fingerprint": "ab12", "ppl": {"pydoc": 26.7431, "plays": 134.5}}},
           "dense": {"pretrained": {"pydoc": 16.59}}, "warmup": {"losses": [2.1, 2.0]}}  # fmt: skip
    lines, same = compare_quality.compare(run, run)
    assert same and "identical plan and perplexities: 1." in lines[2]
    for path, value in ((("zero_shot", "functional|3.0|0.2", "fingerprint"), "cd34"),
                        (("zero_shot", "functional|3.0|0.2", "ppl"), {"pydoc": 26.7432, "plays": 134.5}),
                        (("dense", "pretrained"), {"pydoc": 16.6})):  # fmt: skip
        changed = json.loads(json.dumps(run))
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert not compare_quality.compare(run, changed)[1], path


def test_results_sections_of_other_benchmarks_survive_a_re_render(tmp_path):
    md = tmp_path / "RESULTS.md"
    quality.write_results(md, "# Quality\n\nold table\n")
    quality.write_section(md, "cross-domain", "## Cross-domain\n\nv1")
    quality.write_section(md, "other", "## Other\n\nx")
    quality.write_section(md, "cross-domain", "## Cross-domain\n\nv2")  # replaced in place, not appended
    quality.write_results(md, "# Quality\n\nnew table\n")  # quality.py re-renders its own part
    text = md.read_text()
    assert "new table" in text and "old table" not in text
    assert "v2" in text and "v1" not in text and text.count("## Cross-domain") == 1
    assert text.index("## Cross-domain") < text.index("## Other")
    assert quality.kept_sections(text)[0].startswith("<!-- section: cross-domain -->")


def test_the_benchmarks_machine_line_states_the_cpus_bf16_speed_and_warns_where_it_is_slow(monkeypatch, capsys):
    from nirvana_pl import hardware

    monkeypatch.setattr(hardware, "cpu_bf16_slowdown", lambda: 9.0)
    assert "bf16 linear layer 9.0x the fp32 time" in quality.environment()["machine"]
    assert "no native bf16" in capsys.readouterr().err
    monkeypatch.setattr(hardware, "cpu_bf16_slowdown", lambda: 0.5)
    assert "bf16 linear layer 0.5x the fp32 time" in quality.environment()["machine"]
    assert capsys.readouterr().err == ""
