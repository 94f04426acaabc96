"""bf16 against fp32 on this CPU: the check the library warns with, and a real training step, side by side.

Measures, in one run: ``nirvana_pl.hardware.cpu_bf16_slowdown()`` (a 512 x 512 bf16 linear layer against the fp32
one, one thread: the ratio the callback, ``nirvana-pl prune`` / ``eval`` and ``scripts/demo.sh`` compare with
``SLOW_BF16_RATIO``), and one AdamW training step of SmolLM2-135M (the main job's model) on 4 x 256 tokens, with
torch's threads, in fp32 and in bf16 autocast (the recipe's ``bf16-mixed``). On a CPU with native bf16 the autocast
step is the faster one; without it, many times slower. Writes benchmarks/results/cpu_bf16.{json,md} and the
section "cpu-bf16" of benchmarks/RESULTS.md.

Usage: python benchmarks/cpu_bf16.py [--fp32-steps 2] [--bf16-steps 1]   (about 5 minutes where bf16 is slow)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from core_bench import machine_info  # noqa: E402

from nirvana_pl.embedded import load_smollm2  # noqa: E402
from nirvana_pl.hardware import SLOW_BF16_RATIO, cpu_bf16_slowdown  # noqa: E402
from quality import RESULTS_MD, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def step_seconds(model: torch.nn.Module, ids: torch.Tensor, bf16: bool, steps: int) -> list[float]:
    """Wall time of ``steps`` AdamW steps (forward, backward, update) on ``ids``, in bf16 autocast or fp32."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32-steps", type=int, default=2)
    ap.add_argument("--bf16-steps", type=int, default=1)
    args = ap.parse_args()

    ratio = cpu_bf16_slowdown()
    print(f"bf16 linear layer: {ratio:.1f}x the fp32 time (the library's limit: {SLOW_BF16_RATIO:g}x)", flush=True)
    model = load_smollm2()[0].train()
    ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    fp32 = step_seconds(model, ids, bf16=False, steps=args.fp32_steps)
    print(f"fp32 step: {min(fp32):.1f} s", flush=True)
    bf16 = step_seconds(model, ids, bf16=True, steps=args.bf16_steps)
    print(f"bf16 autocast step: {min(bf16):.1f} s ({min(bf16) / min(fp32):.1f}x the fp32 step)", flush=True)

    info = machine_info()
    out = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{info['cpu_count']} CPU cores ({info['cpu_model']}), torch {info['torch']} "
                   f"({torch.backends.cpu.get_cpu_capability()}), {info['torch_num_threads']} threads",
        "linear_bf16_over_fp32": ratio,
        "slow_bf16_ratio": SLOW_BF16_RATIO,
        "step_seconds": {"fp32": fp32, "bf16_autocast": bf16},
        "step_bf16_over_fp32": min(bf16) / min(fp32),
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_bf16.json").write_text(json.dumps(out, indent=2) + "\n")
    verdict = "no native bf16: the library warns" if ratio > SLOW_BF16_RATIO else "native bf16"
    text = (
        f"## bf16 against fp32 on the CPU\n\nProduced by `python benchmarks/cpu_bf16.py`, {out['date']}; "
        f"{out['machine']}.\n\n"
        "| measure | fp32 | bf16 | bf16 / fp32 |\n|---|---:|---:|---:|\n"
        f"| 512 x 512 linear layer, one thread (the library's check) | | | {ratio:.1f}x ({verdict}) |\n"
        f"| SmolLM2-135M AdamW step, 4 x 256 tokens (bf16: autocast) | {min(fp32):.1f} s | {min(bf16):.1f} s "
        f"| {out['step_bf16_over_fp32']:.1f}x |\n"
    )
    (RESULTS / "cpu_bf16.md").write_text("#" + text)
    write_section(RESULTS_MD, "cpu-bf16", text)
    print(f"wrote {RESULTS / 'cpu_bf16.md'} and the section cpu-bf16 of {RESULTS_MD}")


if __name__ == "__main__":
    main()
