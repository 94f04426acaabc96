"""A small torch forward of a GGUF file as llama.cpp's ``llama``, ``deci``, ``qwen2`` and ``qwen3`` graphs compute it.

It reads only the file (metadata and tensors), so comparing its logits with the transformers model's checks what
the file means: the rotary layout (adjacent pairs for llama/deci, halves for qwen2/qwen3), the per-layer head
counts and MLP widths, zero-width layers, biases, q/k norms and rope factors. llama.cpp itself is the check of
``benchmarks/gguf_llamacpp.py``; this one runs in the fast suite.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf import GGUFReader

from nirvana_pl.gguf_export import read_gguf_tensors

PAIRS_ROTARY = ("llama", "deci")


def metadata(path) -> dict:
    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def _per_layer(value, n_layers: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, pos: torch.Tensor, base: float, factors: torch.Tensor | None, pairs: bool) -> torch.Tensor:
    """x: [T, heads, d]."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if factors is not None:
        freqs = freqs / factors.double()
    angle = (pos[:, None].double() * freqs[None]).float()  # [T, d/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    if pairs:
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return out.flatten(-2)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def gguf_logits(path, input_ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of the GGUF model at ``path`` for one sequence."""
    meta = metadata(path)
    arch = meta["general.architecture"]
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in read_gguf_tensors(path).items()}
    n_layers = int(meta[f"{arch}.block_count"])
    heads = _per_layer(meta[f"{arch}.attention.head_count"], n_layers)
    kv_heads = _per_layer(meta[f"{arch}.attention.head_count_kv"], n_layers)
    ff = _per_layer(meta[f"{arch}.feed_forward_length"], n_layers)
    eps = float(meta[f"{arch}.attention.layer_norm_rms_epsilon"])
    d = int(meta[f"{arch}.attention.key_length"])
    base = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    factors = t.get("rope_freqs.weight")
    pairs = arch in PAIRS_ROTARY
    ids = torch.tensor(input_ids)
    pos = torch.arange(len(input_ids))
    x = t["token_embd.weight"][ids]
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    for i in range(n_layers):
        blk = f"blk.{i}."
        if arch == "deci" and ff[i] == 0:
            continue  # llama.cpp's deci graph skips the whole layer (its attention too) when the MLP width is 0

        def lin(name: str, h: torch.Tensor) -> torch.Tensor:
            out = h @ t[f"{blk}{name}.weight"].T
            bias = t.get(f"{blk}{name}.bias")
            return out if bias is None else out + bias

        if heads[i] > 0:
            h = _rms(x, t[f"{blk}attn_norm.weight"], eps)
            q = lin("attn_q", h).view(len(ids), heads[i], d)
            k = lin("attn_k", h).view(len(ids), kv_heads[i], d)
            v = lin("attn_v", h).view(len(ids), kv_heads[i], d)
            if f"{blk}attn_q_norm.weight" in t:
                q, k = _rms(q, t[f"{blk}attn_q_norm.weight"], eps), _rms(k, t[f"{blk}attn_k_norm.weight"], eps)
            q, k = _rotate(q, pos, base, factors, pairs), _rotate(k, pos, base, factors, pairs)
            group = heads[i] // kv_heads[i]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(len(ids), heads[i] * d)
            x = x + lin("attn_output", attn)
        if ff[i] > 0:
            h = _rms(x, t[f"{blk}ffn_norm.weight"], eps)
            x = x + lin("ffn_down", torch.nn.functional.silu(lin("ffn_gate", h)) * lin("ffn_up", h))
    x = _rms(x, t["output_norm.weight"], eps)
    head = t.get("output.weight", t["token_embd.weight"])
    return x @ head.T
