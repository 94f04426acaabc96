"""bf16 matrix products computed by the fp32 kernels, for CPUs whose bf16 kernels are slow fallbacks.

On a CPU without native bf16 (no AVX512-BF16 or AMX) torch's bf16 matrix products take 9-70x the fp32 time
(``nirvana_pl.hardware``), so a benchmark fit in bf16 autocast that takes minutes on a CPU with native bf16 takes
hours. Inside :class:`Bf16ProductsInFp32`, each matrix product and CPU attention whose inputs are bf16 is computed
by the fp32 kernel on those same bf16 values (exact in fp32) and its result rounded to bf16, as a bf16 kernel that
accumulates in fp32 returns it; what autocast keeps in fp32, and every other bf16 operation, run unchanged. What
differs is where intermediate values are rounded: a bf16 kernel's partial sums, and inside attention the bf16
kernel's probabilities, are not rounded to bf16 here. Measured on SmolLM2-135M (2-core AVX2 AMD EPYC, one batch of
64 tokens): the gradients differ from those of this CPU's own bf16 kernels by 2.4 % (relative norm),
as much as either differs from an fp32 pass (2.2 %); a training step on 4 x 128 tokens takes 3.9 s,
against 3.2 s in fp32.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
PRODUCTS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})
ATTENTION = _aten._scaled_dot_product_flash_attention_for_cpu.default
ATTENTION_BACKWARD = _aten._scaled_dot_product_flash_attention_for_cpu_backward.default
COMPUTED_IN_FP32 = PRODUCTS | {ATTENTION, ATTENTION_BACKWARD}


def _is_bf16(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


def _to_fp32(value):
    return value.float() if _is_bf16(value) else value


def _to_bf16(value):
    return value.to(torch.bfloat16) if isinstance(value, torch.Tensor) and value.dtype == torch.float32 else value


class Bf16ProductsInFp32(TorchDispatchMode):
    """While entered (on the thread that runs the forward and, on the CPU, the backward), bf16 matrix products
    and CPU attention are computed in fp32 from their bf16 inputs and returned in bf16. ``calls`` counts them."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in COMPUTED_IN_FP32 and any(map(_is_bf16, args)):
            self.calls += 1
            out = func(*map(_to_fp32, args), **{k: _to_fp32(v) for k, v in kwargs.items()})  # (attn_mask too)
            if func is ATTENTION:  # (output, logsumexp): the logsumexp stays fp32, as the bf16 kernel keeps it
                return (_to_bf16(out[0]), *out[1:])
            return tuple(map(_to_bf16, out)) if isinstance(out, tuple) else _to_bf16(out)
        return func(*args, **kwargs)
