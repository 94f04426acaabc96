"""Whether this machine's CPU computes bf16 layers natively, measured.

Where the CPU has no native bf16 support (no AVX512-BF16 or AMX; an AVX2-only x86 CPU, for instance), torch
computes bf16 matrix products through slow fallbacks: on a 2-core AMD EPYC with AVX2, one thread, a bf16 linear
layer of 1024 x 576 inputs and 1536 outputs took 9x the time of the fp32 one, a square 1024 x 1024 bf16 product
72x, and a training step of SmolLM2-135M on 4 x 256 tokens (2 threads) 240 s in bf16 autocast against 13 s in
fp32. A fit in ``bf16-mixed`` precision on such a CPU, and the passes of its prune events, run many times slower
than the same fit in fp32, where bf16 was meant to make them faster.
"""

from __future__ import annotations

import functools
import math
import time

import torch

SLOW_BF16_RATIO = 3.0
"""A bf16 linear layer taking more than this many times the fp32 one means the CPU has no native bf16 (the fallback
measured 8.7-9.4x on the AVX2 CPU above)."""


@functools.lru_cache(maxsize=1)
def cpu_bf16_slowdown(size: int = 512, repeats: int = 5) -> float:
    """How many times longer a bf16 linear layer (``size`` inputs, ``size`` outputs, ``size`` rows) takes than the
    fp32 one on this CPU, on one thread so that other work on the machine weighs less (the fastest of ``repeats``
    each, after one untimed call; about 0.2 s where bf16 is slow). Measured once per process."""
    generator = torch.Generator().manual_seed(0)
    inputs, weight = (torch.randn(size, size, generator=generator) for _ in range(2))
    seconds = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x, w = inputs.to(dtype), weight.to(dtype)
            torch.nn.functional.linear(x, w)
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best = min(best, time.perf_counter() - start)
            seconds[dtype] = best
    finally:
        torch.set_num_threads(threads)
    return seconds[torch.bfloat16] / max(seconds[torch.float32], 1e-9)


FIT_IN_FP32 = (
    "Set the Trainer's precision='32-true' (on the command line: --trainer.precision 32-true), or run on a GPU or "
    "on a CPU with native bf16."
)


def slow_bf16_message(precision: str, on_cpu: bool, who: str, fix: str = FIT_IN_FP32) -> str | None:
    """What to tell a user whose work computes in bf16 (``precision``: a Lightning precision, or ``bfloat16`` for
    a model's dtype) on a CPU without native bf16, naming the ``fix``; None where the work is not on the CPU, not in
    bf16, or the CPU's bf16 is fast."""
    if not on_cpu or not str(precision).startswith(("bf16", "bfloat16")):
        return None
    ratio = cpu_bf16_slowdown()
    if ratio <= SLOW_BF16_RATIO:
        return None
    return (
        f"{who}: this CPU multiplies bf16 matrices {ratio:.0f}x slower than fp32 (it has no native bf16, such as "
        f"AVX512-BF16 or AMX), so {str(precision)!r} makes this run many times slower than it would be in fp32. "
        + fix
    )
