"""NirvanaPruningCallback under Lightning DDP (2 CPU processes, gloo).

Lightning's strategy="ddp" relaunches the whole command line for rank 1, so the fit runs in
tests/scripts/ddp_prune.py as a subprocess; each rank prints ``NIRVANA_DDP {json}`` lines.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from processes import run_killable

from nirvana_pl import NirvanaPruningCallback, distributed
from nirvana_pl.saliency import compute_scores, gradient_reduce
from nirvana_pl.units import find_units

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_prune.py"
PREFIX = "NIRVANA_DDP "
DENSE_SHAPES = [[4, 176]] * 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ)
    for key in ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
    )
    proc = run_killable([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], timeout=180, cwd=ROOT, env=env)
    records = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        # Two ranks share the pipe; a line may carry more than one record.
        for chunk in line.split(PREFIX)[1:]:
            chunk = chunk.strip()
            if chunk:
                records.append(json.JSONDecoder().raw_decode(chunk)[0])
    return proc, records


def _by_rank(records: list[dict], event: str) -> dict[int, dict]:
    return {r["rank"]: r for r in records if r["event"] == event}


def _assert_ranks_agree_through_the_prune(proc, records, tmp_path: Path, saliency: str) -> tuple[dict, dict]:
    """The DDP invariants every 2-process fit must hold; returns the prune and end records by rank."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    prune, end = _by_rank(records, "prune"), _by_rank(records, "end")
    assert set(prune) == {0, 1} and set(end) == {0, 1}, records

    # Same decision on both ranks, and every rank's own (pre-broadcast) plan already agreed:
    # for `functional` that needs the signed gradients averaged across ranks before |.|.
    assert prune[0]["fingerprint"] == prune[1]["fingerprint"]
    assert all(p["all_fingerprints_equal"] and p["own_plan_matched_rank0"] == [True] for p in prune.values())
    # Identical parameters across ranks right after the prune and at the end of the fit.
    assert prune[0]["checksum"] == prune[1]["checksum"]
    assert all(p["all_checksums_equal"] for p in prune.values())
    assert end[0]["checksum"] == end[1]["checksum"]
    assert all(e["all_checksums_equal"] and e["params_equal_rank0"] for e in end.values())
    # Training went on after the prune through a fresh DDP wrapper over the pruned module.
    for p in prune.values():
        assert p["world_size"] == 2
        assert p["wrapper_is_ddp"] and p["wrapper_replaced"] and p["wrapper_wraps_module"] and p["wrapper_same_params"]
        assert abs(p["realised_sparsity"] - 0.5) < 0.05
    for e in end.values():
        assert e["losses_finite"] and len(e["losses_after"]) == 10
        assert e["changed_since_prune"] and e["checksum"] != prune[e["rank"]]["checksum"]
        assert e["step"] == 16
    # Each rank saw its own data (different losses) but the same averaged gradients.
    assert end[0]["losses_after"] != end[1]["losses_after"]
    assert end[0]["grad_norms_after"] == end[1]["grad_norms_after"]
    # Pruned shapes, the same on both ranks, smaller than the dense ones, kept to the end.
    shapes = prune[0]["shapes"]
    assert shapes == prune[1]["shapes"] == end[0]["shapes"] == end[1]["shapes"]
    assert shapes != DENSE_SHAPES
    assert all(kv <= 4 and mlp <= 176 and mlp % 8 == 0 for kv, mlp in shapes)
    assert sum(kv * 1000 + mlp for kv, mlp in shapes) < sum(kv * 1000 + mlp for kv, mlp in DENSE_SHAPES)
    (report_path,) = tmp_path.glob("lightning_logs/version_0/nirvana_prune_report.json")  # the logger's run folder
    report = json.loads(report_path.read_text())
    expected = inspect.signature(NirvanaPruningCallback).parameters["saliency"].default
    assert report["events"][0]["saliency"] == (expected if saliency == "default" else saliency)
    if saliency == "default":  # the default saliency scores the prune event in 2 stages and compensates
        assert report["events"][0]["scores"]["scoring_stages"] == 2
    if saliency in ("default", "fisher_functional_self"):  # every rank fitted the same column updates itself
        assert report["events"][0]["scores"]["compensation"]["weights"] > 0
        assert all(p["compensated_weights"] > 0 and p["own_compensation_equal_rank0"] for p in prune.values())
    else:
        assert all(p["compensated_weights"] == 0 for p in prune.values())
    return prune, end


# (an Adam-state saliency, on Qwen3, goes through the same checks in test_ddp_resume_after_prune: each run starts
# 2 processes, about 8 s of imports each on 2 cores)
def test_ddp_fit_prunes_identically_and_keeps_syncing(tmp_path):
    proc, records = _run(tmp_path, "--saliency", "functional")
    _assert_ranks_agree_through_the_prune(proc, records, tmp_path, "functional")


def test_ddp_default_saliency_with_distillation_in_bf16(tmp_path):
    """The callback's defaults plus distill=True under 2-process DDP, bf16: ranks agree through the prune as above,
    both hold the same bf16 teacher, the metrics are logged and the report says so."""
    proc, records = _run(tmp_path, "--saliency", "default", "--distill", "--precision", "bf16-mixed")
    prune, end = _assert_ranks_agree_through_the_prune(proc, records, tmp_path, "default")
    for e in end.values():
        assert e["teacher_checksum_equal"] and e["teacher_dtype"] == "torch.bfloat16"
        assert {"nirvana/distill_kl", "nirvana/student_loss", "nirvana/distill_loss"} <= set(e["logged"])
        assert e["logged"]["nirvana/distill_kl"] > 0
    # what the module returned is the mixed loss, and each rank distils on its own batches
    assert end[0]["losses_after"][-1] == pytest.approx(end[0]["logged"]["nirvana/distill_loss"], rel=1e-5)
    assert end[0]["logged"]["nirvana/distill_kl"] != end[1]["logged"]["nirvana/distill_kl"]
    (report_path,) = tmp_path.glob("lightning_logs/version_0/nirvana_prune_report.json")
    assert json.loads(report_path.read_text())["events"][0]["recovery_distill"]["weight"] == 0.5


def test_ddp_three_scoring_stages_agree_across_ranks(tmp_path):
    """The default saliency scored three times at the prune (each time with the earlier stages masked out) under
    2-process DDP in fp32: each rank samples its own windows, the gradients are averaged, and every rank's own plan
    is rank 0's."""
    proc, records = _run(tmp_path, "--saliency", "default", "--scoring-stages", "3")
    _assert_ranks_agree_through_the_prune(proc, records, tmp_path, "fisher_functional_self")
    (report_path,) = tmp_path.glob("lightning_logs/version_0/nirvana_prune_report.json")
    assert json.loads(report_path.read_text())["events"][0]["scores"]["scoring_stages"] == 3


def test_ddp_resume_after_prune(tmp_path):
    """An Adam-state saliency on Qwen3 (q_norm / k_norm) prunes identically on 2 ranks, and a checkpoint saved after
    the prune resumes on 2 ranks: pruned shapes, weights and Adam state as saved."""
    model = ("--saliency", "adam_taylor", "--kind", "qwen3")
    proc, records = _run(tmp_path, *model, "--save")
    _, end = _assert_ranks_agree_through_the_prune(proc, records, tmp_path, "adam_taylor")
    shapes = end[0]["shapes"]
    proc, records = _run(tmp_path, *model, "--resume", str(tmp_path / "resume.ckpt"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    resumed, end = _by_rank(records, "resumed"), _by_rank(records, "resumed_end")
    assert set(resumed) == {0, 1} and set(end) == {0, 1}, records
    for r in resumed.values():
        assert r["shapes"] == shapes and r["records"] == 1 and r["step"] == 16
        assert r["params_equal_saved"] and r["optimizer_equal_saved"] and r["wrapper_same_params"]
    for e in end.values():  # the prune does not run again; training goes on in sync
        assert e["step"] == 20 and len(e["losses"]) == 4 and e["losses_finite"] and e["params_equal_rank0"]


def test_ddp_plan_mismatch_across_ranks_raises(tmp_path):
    proc, records = _run(tmp_path, "--mismatch")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "pruning plans differ across DDP ranks" in text
    assert "ranks [0]" in text and "ranks [1]" in text
    assert not _by_rank(records, "prune")  # no surgery happened


# ---------------------------------------------------------------------------------------
# in-process pieces
# ---------------------------------------------------------------------------------------
def test_check_strategy_accepts_ddp_and_refuses_fsdp():
    distributed.check_strategy(object.__new__(SingleDeviceStrategy))
    distributed.check_strategy(object.__new__(DDPStrategy))
    with pytest.raises(ValueError, match="FSDPStrategy yet.*FSDP"):
        distributed.check_strategy(object.__new__(FSDPStrategy))
    # DeepSpeed (a DDPStrategy subclass) is checked in tests/test_deepspeed.py


def test_single_process_helpers_are_no_ops():
    from nirvana_pl.allocate import DenseReference
    from nirvana_pl.oneshot import allocation_config, make_plan

    assert not distributed.is_distributed()
    assert distributed.gradient_reduce_hook() is None
    model = tiny_llama()
    plan, _ = make_plan(model, "magnitude", allocation_config(0.3, 2.0), DenseReference.of(model))
    assert distributed.agree_on_plan(plan) == (plan, True)
    distributed.check_same_plan(plan)
    assert distributed.rewrap_ddp(object.__new__(SingleDeviceStrategy)) is False
    grads = [torch.ones(3)]
    distributed.average_gradients(grads, 4)
    assert torch.equal(grads[0], torch.ones(3))


@pytest.mark.parametrize("name", ["functional", "taylor_loss"])
def test_gradient_reduce_hook_sees_signed_grads_before_abs(name):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = {}

    def negate(grads, n):  # a sign flip before |.| must not change the scores
        seen["n"], seen["count"] = n, len(grads)
        seen["signs"] = any(bool((g < 0).any()) for g in grads)
        for g in grads:
            g.neg_()

    plain = compute_scores(model, name, calibration=[ids])
    with gradient_reduce(negate):
        flipped = compute_scores(model, name, calibration=[ids])
    n_weights = sum(len(u.attn_weights) + len(u.mlp_weights) for u in find_units(model))
    assert seen == {"n": 2, "count": n_weights, "signs": True}
    for a, b in zip(plain.attn + plain.mlp, flipped.attn + flipped.mlp):
        assert torch.equal(a, b)

    def zero(grads, n):
        for g in grads:
            g.zero_()

    zeroed = compute_scores(model, name, calibration=[ids], reduce=zero)
    assert all(float(t.abs().sum()) == 0 for t in zeroed.attn + zeroed.mlp)
    assert any(float(t.abs().sum()) > 0 for t in plain.attn + plain.mlp)


def test_wanda_sp_reduce_averages_activation_norms_over_all_ranks_samples():
    """Two "ranks" with different calibration data score like one process holding both."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    rank0, rank1 = torch.randint(0, 128, (2, 8), generator=gen), torch.randint(0, 128, (3, 8), generator=gen)
    other_rank: dict = {}

    def keep(tensors, n):  # what rank 1 would contribute to the all-reduce
        other_rank["tensors"], other_rank["n"] = [t.clone() for t in tensors], n

    def all_reduce(tensors, n):  # average_gradients' arithmetic over the two ranks
        total = n + other_rank["n"]
        for t, o in zip(tensors, other_rank["tensors"]):
            t.mul_(n / total).add_(o, alpha=other_rank["n"] / total)

    compute_scores(model, "wanda_sp", calibration=[rank1], reduce=keep)
    reduced = compute_scores(model, "wanda_sp", calibration=[rank0], reduce=all_reduce)
    both = compute_scores(model, "wanda_sp", calibration=[rank0, rank1])
    alone = compute_scores(model, "wanda_sp", calibration=[rank0])
    for a, b in zip(reduced.attn + reduced.mlp, both.attn + both.mlp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, b) for a, b in zip(alone.mlp, both.mlp))
