"""The measured check for CPUs without native bf16, and the callback's warning where a bf16 fit runs on one."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning_helpers import CausalLM, token_loader, trainer

from nirvana_pl import NirvanaPruningCallback, hardware
from nirvana_pl.hardware import SLOW_BF16_RATIO, cpu_bf16_slowdown, slow_bf16_message


@pytest.fixture
def measured(monkeypatch):
    """Set the bf16 / fp32 time ratio the check reads (None: measuring fails the test)."""

    def set_ratio(ratio: float | None) -> None:
        def fake() -> float:
            if ratio is None:
                raise AssertionError("measured although the fit is not a bf16 fit on the CPU")
            return ratio

        monkeypatch.setattr(hardware, "cpu_bf16_slowdown", fake)

    return set_ratio


def test_slowdown_is_a_measured_ratio_taken_once_per_process():
    ratio = cpu_bf16_slowdown()
    assert math.isfinite(ratio) and ratio > 0
    assert cpu_bf16_slowdown() == ratio  # cached: a second callback does not measure again
    assert cpu_bf16_slowdown.cache_info().hits >= 1


@pytest.mark.parametrize("precision,on_cpu", [("32-true", True), ("16-mixed", True), ("bf16-mixed", False)])
def test_no_measurement_unless_the_fit_computes_in_bf16_on_the_cpu(measured, precision, on_cpu):
    measured(None)
    assert slow_bf16_message(precision, on_cpu, "X") is None


def test_the_message_names_the_ratio_and_the_fix(measured):
    measured(90.0)
    message = slow_bf16_message("bf16-mixed", True, "NirvanaPruningCallback")
    assert message.startswith("NirvanaPruningCallback: this CPU multiplies bf16 matrices 90x slower than fp32")
    assert "'bf16-mixed' makes this run many times slower" in message and "--trainer.precision 32-true" in message
    assert slow_bf16_message("bf16-true", True, "X") is not None
    measured(SLOW_BF16_RATIO)  # at the limit: not yet slow
    assert slow_bf16_message("bf16-mixed", True, "X") is None


def _fit_warnings(tmp_path, precision: str) -> list[str]:
    torch.manual_seed(0)
    callback = NirvanaPruningCallback(sparsity=0.3, prune_at=2, warmup_steps=2, saliency="adam_fisher")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 3, [callback], precision=precision).fit(CausalLM(), token_loader(n=16))
    assert callback.records, "the fit pruned"
    return [str(w.message) for w in caught if "multiplies bf16 matrices" in str(w.message)]


def test_a_bf16_fit_on_a_cpu_without_native_bf16_is_told_to_use_fp32(tmp_path, measured):
    measured(90.0)
    (message,) = _fit_warnings(tmp_path, "bf16-mixed")
    assert message.startswith("NirvanaPruningCallback: this CPU multiplies bf16 matrices 90x slower")
    measured(1.0)
    assert _fit_warnings(tmp_path / "native", "bf16-mixed") == []
    measured(None)
    assert _fit_warnings(tmp_path / "fp32", "32-true") == []


def test_the_cpu_commands_tell_a_bfloat16_user_to_pass_float32(byte_model_dir, measured):
    from nirvana_pl import cli

    args = ["eval", "--model", str(byte_model_dir), "--tokenizer", "bytes", "--data.seq_len", "16",
            "--data.val_windows", "2", "--data.eval_batch_size", "2"]  # fmt: skip
    measured(90.0)
    with pytest.warns(UserWarning, match=r"nirvana-pl eval: this CPU .* 90x slower .* Pass --dtype float32\."):
        cli.run_command([*args, "--dtype", "bfloat16"])
    measured(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.run_command([*args, "--dtype", "float32"])
    assert not [w for w in caught if "multiplies bf16" in str(w.message)]


def test_the_benchmark_times_training_steps_in_both_precisions_and_trains(monkeypatch):
    import importlib.util
    from pathlib import Path

    from conftest import tiny_llama

    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # it writes its RESULTS.md section with quality.py's helper
    spec = importlib.util.spec_from_file_location("cpu_bf16", benchmarks / "cpu_bf16.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny_llama().train()
    before = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for bf16 in (False, True):
        times = bench.step_seconds(model, ids, bf16=bf16, steps=2)
        assert len(times) == 2 and all(t > 0 for t in times)
    assert not torch.equal(model.lm_head.weight, before), "the steps update the weights"
