"""NirvanaPruningCallback under DeepSpeed ZeRO (2 CPU ranks, gloo) and a two-"node" launch.

Each fit runs tests/scripts/deepspeed_prune.py as a subprocess (Lightning relaunches the command for
rank 1). DeepSpeed compiles its CPU communication op on first use; every case shares one
TORCH_EXTENSIONS_DIR per test session, so it is compiled once per suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed tests need `pip install nirvana-pl[deepspeed]`")

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy  # noqa: E402
from processes import run_all_killable, run_killable, spawn_killable  # noqa: E402

from nirvana_pl import distributed  # noqa: E402
from nirvana_pl.deepspeed import CPUDeepSpeedStrategy, checkpoint_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "deepspeed_prune.py"
DDP_SCRIPT = ROOT / "tests" / "scripts" / "ddp_prune.py"
PREFIX = ("NIRVANA_DS ", "NIRVANA_DDP ")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extensions_dir: str, port: int, **extra: str) -> dict:
    env = dict(os.environ)
    for key in ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    paths = [str(ROOT), str(ROOT / "tests")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=os.pathsep.join(paths),
        TORCH_EXTENSIONS_DIR=extensions_dir, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1", **extra,
    )
    return env


def _records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        for prefix in PREFIX:  # two ranks share the pipe; a line may carry more than one record
            for chunk in line.split(prefix)[1:]:
                chunk = chunk.split("NIRVANA_")[0].strip()
                if chunk.startswith("{"):
                    out.append(json.JSONDecoder().raw_decode(chunk)[0])
    return out


def _run(
    extensions_dir: str, out: Path, *args: str, script: Path = SCRIPT
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = run_killable(
        [sys.executable, str(script), "--out", str(out), *args],
        timeout=600, cwd=ROOT, env=_env(extensions_dir, _free_port()),
    )
    return proc, _records(proc.stdout + "\n" + proc.stderr)


def _by_rank(records: list[dict], event: str) -> dict[int, dict]:
    return {r["rank"]: r for r in records if r["event"] == event}


def _check_prune(records: list[dict], world_size: int = 2) -> dict[int, dict]:
    prune, end = _by_rank(records, "prune"), _by_rank(records, "end")
    assert set(prune) == set(range(world_size)) and set(end) == set(range(world_size)), records
    assert len({p["fingerprint"] for p in prune.values()}) == 1
    for p in prune.values():
        assert p["nirvana_pl_file"].startswith(str(ROOT))
        assert p["world_size"] == world_size
        # identical parameters (module and fp32 masters) on every rank right after the prune
        assert p["params_equal_across_ranks"] and p["fp32_equal_across_ranks"]
        # the fp32 masters and Adam moments equal the stock single-process surgery of the same plan on
        # the dense state gathered before the prune (i.e. the kept slices, bit for bit)
        assert p["equal_to_single_process_plan"], p["mismatched"]
        assert p["compared"] > 30 and p["module_is_cast_of_fp32"]
        # under ZeRO-3 every weight is again held as a partition (1/world) of its new whole shape
        assert p["zero3_partitions"] in ("ok", "not zero3")
        # a new engine and optimizer; Adam's step count and the LR schedule carried over
        assert p["engine_replaced"] and p["optimizer_is_engine_optimizer"]
        assert p["step_after"] == p["step_before"] == 6
        assert p["lr_after"] == p["lr_before"] and p["sched_epoch_after"] == p["sched_epoch_before"] == 6
        if p["removed_mlp_of_layer"]:  # the script's plan also removed that layer's whole MLP
            assert p["realised_sparsity"] > 0.5 and p["shapes"][p["removed_mlp_of_layer"][0]][1] == 0
        else:
            assert abs(p["realised_sparsity"] - 0.5) < 0.05
        assert p["shapes"] != p["dense_shapes"]
        assert all(0 < kv <= kv0 and 0 <= mlp <= mlp0 for (kv, mlp), (kv0, mlp0) in zip(p["shapes"], p["dense_shapes"]))
    for e in end.values():
        losses = e["losses_after"]
        assert e["losses_finite"] and len(losses) == 10 and e["step"] == 16
        assert sum(losses[-3:]) < sum(losses[:3])  # training goes on and the loss falls
        assert e["params_equal_across_ranks"] and e["shapes"] == prune[0]["shapes"]
    return prune


def _check_stage(prune: dict[int, dict], stage: int) -> None:
    """What a prune must hold under ZeRO ``stage`` beyond :func:`_check_prune`."""
    assert all(p["zero3_partitions"] == ("ok" if stage == 3 else "not zero3") for p in prune.values())
    # under ZeRO-1 and ZeRO-3 the callback raises the MLP floor to mlp_round_to (7 in the ZeRO-3 runs, else 8)
    assert all(p["min_mlp_channels"] == {1: [8], 2: [0], 3: [7]}[stage] for p in prune.values())
    if stage == 3:
        for p in prune.values():
            # odd sizes: ZeRO-3 padded the last rank's partition of some weights, among them weights the prune
            # sliced, which the carried state fills
            assert p["padded_sliced_partitions"] > 0
            # the surgery held one weight whole at a time (the largest is 1/22 of this model), never the model
            assert 0 < p["max_whole_elements"] <= p["largest_dense_weight_elements"] < p["model_elements"] / 8
            # ZeRO-3 sub-groups are sized in elements: fewer after the prune, Adam's step carried into each
            assert p["optimizer_groups"] < p["optimizer_groups_before"]


# Each run starts 2 processes (about 8 s of imports each on 2 cores), so the ZeRO stages and precisions are spread
# over the tests rather than crossed in each: stage 3 in fp32 here; stage 1 bf16, stage 2 fp32 (with a layer's whole
# MLP removed) and stage 3 bf16 through the same checks in test_zero_resume_after_prune_and_fp32_export; stage 2 bf16
# (and a whole MLP) in test_zero2_calibration_estimators_reduce_across_ranks and the two tests after it. (ZeRO-1 and
# ZeRO-3 keep mlp_round_to channels per layer: test_zero1_and_zero3_raise_the_mlp_floor_...)
def test_zero3_prune_keeps_ranks_identical_and_carries_adam_state(tmp_path, extensions_dir):
    proc, records = _run(extensions_dir, tmp_path, "--stage", "3", "--precision", "32-true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    _check_stage(_check_prune(records), 3)


# (the default estimator: test_zero2_distillation_of_a_qwen3_with_the_defaults; taylor_loss reduces its gradients
# through the same hook as functional, checked in process by test_ddp's test_gradient_reduce_hook_sees_signed_grads)
@pytest.mark.parametrize("saliency", ["functional", "wanda_sp"])
def test_zero2_calibration_estimators_reduce_across_ranks(tmp_path, extensions_dir, saliency):
    """Each rank scores its own training batches; the reduced scores give every rank rank 0's plan. The plan also
    removes a layer's whole MLP (an empty weight through the bf16 engine rebuild)."""
    proc, records = _run(extensions_dir, tmp_path, "--stage", "2", "--precision", "bf16-mixed", "--saliency", saliency,
                         "--remove-mlp-of-layer", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    prune = _check_prune(records)
    _check_stage(prune, 2)
    assert all(p["own_plan_matched_rank0"] == [True] for p in prune.values())
    assert all(p["removed_mlp_of_layer"] == [1] for p in prune.values())


def test_zero2_distillation_of_a_qwen3_with_the_defaults(tmp_path, extensions_dir):
    """ZeRO-2 bf16, the default estimator (sampled text, 2 scoring stages), distill=True, on a family beyond Llama
    (Qwen3: q_norm/k_norm stay whole): every rank computes rank 0's plan, ranks stay identical, and the teacher is
    replicated outside the engine."""
    proc, records = _run(extensions_dir, tmp_path, "--stage", "2", "--precision", "bf16-mixed", "--saliency",
                         "default", "--distill", "--kind", "qwen3")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    prune = _check_prune(records)  # ranks identical, training goes on and the (mixed) loss falls
    _check_stage(prune, 2)
    assert all(p["own_plan_matched_rank0"] == [True] and p["scoring_stages"] == 2 for p in prune.values())
    # the default compensates: the fp32 masters of o_proj / down_proj carry the column updates (checked against the
    # same updates and surgery on the dense masters in one process, by _check_prune)
    assert all(p["compensated_weights"] >= 4 for p in prune.values())
    for e in _by_rank(records, "end").values():
        assert e["teacher_equal_across_ranks"] and e["teacher_outside_engine"] and e["teacher_frozen"]
        assert e["logged"]["nirvana/distill_kl"] > 0
        assert e["losses_after"][-1] == pytest.approx(e["logged"]["nirvana/distill_loss"], rel=1e-5)


def test_zero2_prunes_experts_and_expert_channels_of_a_qwen2_moe(tmp_path, extensions_dir):
    """ZeRO-2 bf16 with the default estimator on a mixture of experts with a shared expert: the fused 3-D expert
    tensors' fp32 masters and Adam moments are carried per expert and channel, the router's rows with its experts,
    the shared expert's with its channels; ranks stay identical."""
    proc, records = _run(extensions_dir, tmp_path, "--stage", "2", "--precision", "bf16-mixed", "--saliency",
                         "default", "--kind", "qwen2_moe")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    prune = _check_prune(records)
    _check_stage(prune, 2)
    assert all(p["own_plan_matched_rank0"] == [True] and p["compensated_weights"] > 0 for p in prune.values())
    assert any(kept < 4 for kept in prune[0]["experts_kept"]), prune[0]["experts_kept"]
    assert any(width < 64 for width in prune[0]["shared_widths"]), prune[0]["shared_widths"]


def test_zero3_refuses_distillation_at_setup():
    from types import SimpleNamespace

    from conftest import tiny_llama

    from nirvana_pl import NirvanaPruningCallback

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=3), callbacks=[], is_global_zero=True,
                              precision="bf16-mixed", global_step=0)  # fmt: skip
    cb = NirvanaPruningCallback(sparsity=0.3, prune_at=5, warmup_steps=2, distill=True)
    with pytest.raises(ValueError, match=r"distill=.*ZeRO-3.*ZeRO stage 1 or 2"):
        cb.setup(trainer, tiny_llama(), "fit")


def test_zero3_refuses_estimators_that_run_the_partitioned_module(tmp_path, extensions_dir):
    proc, _ = _run(extensions_dir, tmp_path, "--stage", "3", "--saliency", "functional", "--devices", "1")
    assert proc.returncode != 0
    assert "ZeRO-3 partitions them" in proc.stderr and "saliency='adam_fisher'" in proc.stderr


@pytest.mark.parametrize("stage,precision", [(1, "bf16-mixed"), (2, "32-true"), (3, "bf16-mixed")])
def test_zero_resume_after_prune_and_fp32_export(tmp_path, extensions_dir, stage, precision):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    from lightning_helpers import CausalLM

    from nirvana_pl import load_pruned, load_pruned_state_dict, save_pruned
    from nirvana_pl.units import find_units

    args = ("--stage", str(stage), "--precision", precision)
    if stage == 2:  # a layer whose whole MLP was pruned away goes through the checkpoint, resume and export
        args += ("--remove-mlp-of-layer", "1")
    proc, records = _run(extensions_dir, tmp_path, *args, "--save")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    prune = _check_prune(records)
    _check_stage(prune, stage)
    shapes = prune[0]["shapes"]
    recorded = checkpoint_shapes(tmp_path / "ckpt")
    assert recorded["net.model.layers.0.mlp.gate_proj.weight"][0] == shapes[0][1]

    proc, records = _run(extensions_dir, tmp_path, *args, "--resume", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    resumed, resumed_end = _by_rank(records, "resumed"), _by_rank(records, "resumed_end")
    assert set(resumed) == {0, 1} and set(resumed_end) == {0, 1}, records
    for r in resumed.values():
        # the engine was rebuilt with the pruned shapes; weights, moments and step are the saved ones
        assert r["shapes"] == shapes and r["records"] == 1 and r["step"] == 16
        assert r["state_equal_saved"] and r["adam_step"] == r["saved_adam_step"] == 16
        assert r["module_is_cast_of_saved_fp32"]
    for r in resumed_end.values():
        assert r["step"] == 20 and r["losses_finite"] and len(r["losses"]) == 4

    # the ZeRO checkpoint -> one fp32 state dict -> a transformers directory that loads on its own
    fp32 = tmp_path / "fp32.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(str(tmp_path / "ckpt"), str(fp32))
    state = torch.load(fp32, map_location="cpu", weights_only=False)["state_dict"]
    module = CausalLM(seed=1, **prune[0]["model_shape"])  # dense, other weights
    load_pruned_state_dict(module, state)
    saved = torch.load(tmp_path / "saved_state.pt", weights_only=False)["state"]
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), saved[name]["fp32"]), name
    save_pruned(module.net, tmp_path / "export")
    loaded = load_pruned(tmp_path / "export")
    assert [[u.num_kv_groups, u.mlp_width] for u in find_units(loaded)] == shapes
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.net.eval()(ids).logits)


def _two_nodes(
    extensions_dir: str, out: Path, script: Path, *args: str
) -> tuple[list[subprocess.CompletedProcess], list[dict]]:
    """Two processes standing for two nodes: num_nodes=2, devices=1, NODE_RANK 0 and 1 on loopback."""
    port = _free_port()
    done = run_all_killable(
        [[sys.executable, str(script), "--out", str(out / f"node{rank}"), "--devices", "1", "--nodes", "2", *args]
         for rank in (0, 1)],
        600, [dict(cwd=ROOT, env=_env(extensions_dir, port, NODE_RANK=str(rank))) for rank in (0, 1)],
    )  # fmt: skip
    return done, _records("\n".join(d.stdout + "\n" + d.stderr for d in done))


def test_two_node_deepspeed_run(tmp_path, extensions_dir):
    """ZeRO-3 (the stage that partitions the weights themselves) across two "nodes"."""
    done, records = _two_nodes(extensions_dir, tmp_path, SCRIPT, "--stage", "3")
    for d in done:
        assert d.returncode == 0, d.stdout[-3000:] + d.stderr[-6000:]
    prune = _check_prune(records)
    _check_stage(prune, 3)
    assert {p["node_rank"] for p in prune.values()} == {0, 1}
    assert all(p["num_nodes"] == 2 for p in prune.values())


def test_two_node_ddp_run(tmp_path, extensions_dir):
    done, records = _two_nodes(extensions_dir, tmp_path, DDP_SCRIPT, "--saliency", "adam_taylor")
    for d in done:
        assert d.returncode == 0, d.stdout[-3000:] + d.stderr[-6000:]
    prune, end = _by_rank(records, "prune"), _by_rank(records, "end")
    assert set(prune) == {0, 1} and set(end) == {0, 1}, records
    assert prune[0]["fingerprint"] == prune[1]["fingerprint"] and prune[0]["checksum"] == prune[1]["checksum"]
    assert all(e["params_equal_rank0"] and e["losses_finite"] for e in end.values())


# ---------------------------------------------------------------------------------------
# in-process pieces
# ---------------------------------------------------------------------------------------
def test_check_strategy_accepts_zero_1_2_3_and_refuses_others():
    for stage in (1, 2, 3):
        for saliency in ("adam_fisher", "adam_taylor", "random"):
            distributed.check_strategy(DeepSpeedStrategy(stage=stage), saliency)
            distributed.check_strategy(CPUDeepSpeedStrategy(stage=stage), saliency)
    for saliency in ("functional", "taylor_loss", "wanda_sp", "magnitude"):
        distributed.check_strategy(DeepSpeedStrategy(stage=2), saliency, runs_model=True)
        with pytest.raises(ValueError, match=rf"saliency='{saliency}'.*ZeRO-3.*adam_fisher.*stage=2"):
            distributed.check_strategy(DeepSpeedStrategy(stage=3), saliency)
    with pytest.raises(ValueError, match=r"KL calibration selection.*gamma=2.0.*stage=2"):
        distributed.check_strategy(DeepSpeedStrategy(stage=3), "adam_fisher", runs_model=True)
    distributed.check_strategy(DeepSpeedStrategy(stage=2), "adam_fisher", compensates=True)
    with pytest.raises(ValueError, match=r"compensate=True.*Pass compensate=False under ZeRO-3.*stage=2"):
        distributed.check_strategy(DeepSpeedStrategy(stage=3), "adam_fisher", compensates=True)
    hpz = {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}
    with pytest.raises(ValueError, match="zero_hpz_partition_size"):
        distributed.check_strategy(DeepSpeedStrategy(config=hpz), "adam_fisher")
    mics = {"zero_optimization": {"stage": 3, "mics_shard_size": 2}}
    with pytest.raises(ValueError, match="MiCS"):
        distributed.check_strategy(DeepSpeedStrategy(config=mics), "adam_fisher")
    for key in ("offload_param", "offload_optimizer"):
        nvme = {"zero_optimization": {"stage": 3, key: {"device": "nvme"}}}
        with pytest.raises(ValueError, match=rf"NVMe offload.*{key}"):
            distributed.check_strategy(DeepSpeedStrategy(config=nvme), "adam_fisher")
    cpu_offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    distributed.check_strategy(DeepSpeedStrategy(config=cpu_offload), "adam_fisher")
    with pytest.raises(ValueError, match=r"zero_optimization.stage=0.*stage=2"):
        distributed.check_strategy(DeepSpeedStrategy(stage=0))
    with pytest.raises(ValueError, match="configure_optimizers"):
        distributed.check_strategy(
            DeepSpeedStrategy(config={"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}})
        )
    with pytest.raises(ValueError, match="FSDPStrategy yet.*FSDP"):
        distributed.check_strategy(object.__new__(FSDPStrategy))
    distributed.check_strategy(object.__new__(DDPStrategy))


def test_zero1_and_zero3_raise_the_mlp_floor_and_refuse_empty_mlps_and_zero3_lora_and_t5():
    from types import SimpleNamespace

    from conftest import tiny_llama, tiny_t5

    from nirvana_pl import NirvanaPruningCallback
    from nirvana_pl.allocate import AllocationConfig
    from nirvana_pl.deepspeed import deepspeed_allocations, prune_engine
    from nirvana_pl.plan import LayerPlan, PruningPlan
    from nirvana_pl.surgery import apply_plan

    allocs = [AllocationConfig(sparsity=0.3), AllocationConfig(sparsity=0.5, min_mlp_channels=16)]
    assert deepspeed_allocations(DeepSpeedStrategy(stage=2), tiny_llama(), allocs) == allocs
    for stage in (1, 3):  # ZeRO-3 cannot hold an empty weight; a ZeRO-1 checkpoint records no shape for one
        floored = deepspeed_allocations(DeepSpeedStrategy(stage=stage), tiny_llama(), allocs)
        assert [a.min_mlp_channels for a in floored] == [8, 16]
    with pytest.raises(ValueError, match="LoRA.*not supported under DeepSpeed"):
        deepspeed_allocations(DeepSpeedStrategy(stage=2), tiny_llama(), allocs, recovery={"r": 4})
    with pytest.raises(ValueError, match=r"'t5' models under DeepSpeed ZeRO-3.*stage=2"):
        deepspeed_allocations(DeepSpeedStrategy(stage=3), tiny_t5(), allocs)
    # also when only loading a checkpoint (validate/test/predict): the load would reshape the model
    with pytest.raises(ValueError, match=r"'t5' models under DeepSpeed ZeRO-3"):
        NirvanaPruningCallback(sparsity=0.3, prune_at=5, warmup_steps=2).setup(
            SimpleNamespace(strategy=DeepSpeedStrategy(stage=3), callbacks=[], is_global_zero=True),
            tiny_t5(),
            "validate",
        )

    def plan_emptying(layer: int) -> PruningPlan:
        layers = [LayerPlan(4, 176, [0, 1, 2, 3], list(range(176))) for _ in range(4)]
        layers[layer] = LayerPlan(4, 176, [0, 1, 2, 3], [])
        return PruningPlan(layers=layers, target_sparsity=0.0, gamma=1.0, saliency="manual")

    emptied = tiny_llama()  # its layer 2 MLP was pruned away before (say under ZeRO-2)
    apply_plan(emptied, plan_emptying(2))
    deepspeed_allocations(DeepSpeedStrategy(stage=2), emptied, allocs)
    with pytest.raises(ValueError, match=r"no MLP channels in layers \[2\], but DeepSpeed ZeRO-3 cannot.*stage=2"):
        deepspeed_allocations(DeepSpeedStrategy(stage=3), emptied, allocs)
    with pytest.raises(ValueError, match=r"layers \[2\], but DeepSpeed ZeRO-1 checkpoints record no shape.*fp32"):
        deepspeed_allocations(DeepSpeedStrategy(stage=1), emptied, allocs)
    for stage in (1, 3):
        with pytest.raises(ValueError, match=rf"the pruning plan has no MLP channels in layers \[1\].*ZeRO-{stage}"):
            prune_engine(DeepSpeedStrategy(stage=stage), tiny_llama(), plan_emptying(1))


def _resume_votes(rank: int, port: int, cases: list[list[bool]], out: str) -> None:
    import torch.distributed as dist

    from nirvana_pl.deepspeed import _same_on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for votes in cases:
        try:
            results.append(str(_same_on_every_rank(votes[rank], torch.device("cpu"))))
        except RuntimeError as exc:
            results.append(str(exc))
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_ranks_that_disagree_about_a_checkpoints_shapes_stop_with_an_error(tmp_path):
    """A node that cannot read the checkpoint would skip the engine rebuild (a collective) and hang the job."""
    cases = [[True, True], [False, False], [True, False], [False, True]]
    spawn_killable(_resume_votes, (_free_port(), cases, str(tmp_path)), nprocs=2, timeout=120)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results[:2] == ["True", "False"]
        assert all("ranks disagree" in r and "filesystem every node sees" in r for r in results[2:])


def test_local_partition_pads_the_last_ranks_share_with_zeros():
    from nirvana_pl.deepspeed import local_partition

    value = torch.arange(7.0).reshape(7, 1)  # 7 elements over 2 ranks: partitions of 4, the last padded
    assert local_partition(value, 4, 0).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert local_partition(value, 4, 1).tolist() == [4.0, 5.0, 6.0, 0.0]
    assert local_partition(torch.arange(2.0), 1, 2).tolist() == [0.0]  # a rank past the end holds padding only


def test_cpu_strategy_is_a_deepspeed_strategy():
    assert issubclass(CPUDeepSpeedStrategy, DeepSpeedStrategy)
    assert CPUDeepSpeedStrategy(stage=2).zero_stage_3 is False and CPUDeepSpeedStrategy(stage=3).zero_stage_3
    assert checkpoint_shapes(Path("/nonexistent")) is None


def test_checkpoint_shapes_reads_a_weight_pruned_to_nothing_that_zero1_records_only_in_the_module(tmp_path):
    """ZeRO-1 records the shapes of the optimizer's weights only (no frozen_param_shapes): a layer's MLP pruned to
    width 0 is found in the module's state dict, so that a resume gives the model that shape before the load."""
    (tmp_path / "global_step16").mkdir()
    (tmp_path / "latest").write_text("global_step16")
    torch.save({
        "param_shapes": [{"mlp.up_proj.weight": torch.Size([8, 4]), "attn.q_proj.weight": torch.Size([4, 4])}],
        "frozen_param_shapes": None,
        "module": {"mlp.up_proj.weight": torch.zeros(8, 4), "attn.q_proj.weight": torch.zeros(4, 4),
                   "mlp.gate_proj.weight": torch.zeros(0, 4), "mlp.down_proj.weight": torch.zeros(4, 0)},
    }, tmp_path / "global_step16" / "mp_rank_00_model_states.pt")  # fmt: skip
    assert checkpoint_shapes(tmp_path) == {
        "mlp.up_proj.weight": torch.Size([8, 4]), "attn.q_proj.weight": torch.Size([4, 4]),
        "mlp.gate_proj.weight": torch.Size([0, 4]), "mlp.down_proj.weight": torch.Size([4, 0]),
    }  # fmt: skip


def test_save_pruned_refuses_zero3_partitioned_weights_and_names_the_convert_path(tmp_path):
    from conftest import tiny_llama

    from nirvana_pl import save_pruned

    model = tiny_llama()
    next(model.parameters()).ds_id = 0  # what deepspeed.zero.Init marks a partitioned weight with
    with pytest.raises(ValueError, match="ZeRO-3.*convert_zero_checkpoint_to_fp32_state_dict.*load_pruned_state_dict"):
        save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_pruned_model_callback_refuses_zero3_with_the_convert_path():
    from types import SimpleNamespace

    from nirvana_pl.modules import SavePrunedModel

    SavePrunedModel().setup(SimpleNamespace(strategy=DeepSpeedStrategy(stage=2)), None, "fit")
    with pytest.raises(ValueError, match="ZeRO-3.*convert_zero_checkpoint_to_fp32_state_dict.*save_pruned"):
        SavePrunedModel().setup(SimpleNamespace(strategy=DeepSpeedStrategy(stage=3)), None, "fit")
