"""A small torch forward of a GGUF file as llama.cpp's graphs compute it, for every graph GGUF export writes.

It reads only the file (metadata and tensors), so comparing its logits with the transformers model's checks what
the file means: the rotary layout (adjacent pairs for llama/deci/granite/smollm3/command-r, halves for the others,
partial rotary, NoPE layers), the per-layer head counts and MLP widths, zero-width layers, biases, the q/k norms
(per head, over all heads, per-head LayerNorm), the norms a layer has and where (Gemma's sandwich, OLMo's post
norms, Command-R's parallel block, LayerNorm or RMSNorm), soft-capping, multipliers, sliding-window layers, rope
factors and bases, and mixtures of experts (routing, shared expert). It follows llama.cpp's source (the graphs in
``src/models/*.cpp``), which ``benchmarks/gguf_llamacpp.py`` runs on the same kinds of files; this one runs in the
fast suite.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGUFReader

from nirvana_pl.gguf_export import read_gguf_tensors

PAIRS_ROTARY = ("llama", "deci", "granite", "smollm3", "command-r")
GELU = ("gemma", "gemma2", "gemma3")
RENORMALISED_ROUTING = ("llama", "qwen3moe")


def metadata(path) -> dict:
    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def _per_layer(value, n_layers: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return x if b is None else x + b


def _rotate(x: torch.Tensor, pos: torch.Tensor, n_rot: int, base: float, factors: torch.Tensor | None,
            pairs: bool) -> torch.Tensor:  # fmt: skip
    """x: [T, heads, d]; the first ``n_rot`` dimensions of each head rotate."""
    x, rest = x[..., :n_rot], x[..., n_rot:]
    freqs = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    if factors is not None:
        freqs = freqs / factors.double()
    angle = (pos[:, None].double() * freqs[None]).float()  # [T, n_rot/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    if pairs:
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = x[..., : n_rot // 2], x[..., n_rot // 2 :]
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((out, rest), dim=-1)


class _File:
    """The file's hyper-parameters and tensors, as the graph reads them."""

    def __init__(self, path):
        self.meta = metadata(path)
        self.arch = self.meta["general.architecture"]
        self.t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in read_gguf_tensors(path).items()}
        self.n_layers = int(self.get("block_count"))
        self.heads = _per_layer(self.get("attention.head_count"), self.n_layers)
        self.kv_heads = _per_layer(self.get("attention.head_count_kv"), self.n_layers)
        self.ff = _per_layer(self.get("feed_forward_length"), self.n_layers)
        self.d = int(self.get("attention.key_length"))
        self.layer_norm = self.get("attention.layer_norm_epsilon") is not None
        self.eps = float(self.get("attention.layer_norm_epsilon") or self.get("attention.layer_norm_rms_epsilon"))

    def get(self, key: str, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.t[f"{name}.weight"]
        if self.layer_norm:
            return _layer_norm(x, w, self.t.get(f"{name}.bias"), self.eps)
        return _rms(x, w, self.eps)

    def sliding(self, i: int) -> bool:
        pattern = self.get("attention.sliding_window_pattern")
        return bool(pattern and pattern[i])


def gguf_logits(path, input_ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of the GGUF model at ``path`` for one sequence."""
    f = _File(path)
    ids = torch.tensor(input_ids)
    x = f.t["token_embd.weight"][ids]
    if f.arch in GELU:
        x = x * math.sqrt(x.shape[-1])
    x = x * float(f.get("embedding_scale", 1.0))
    residual_scale = float(f.get("residual_scale", 1.0))
    for i in range(f.n_layers):
        blk = f"blk.{i}."
        if f.arch == "deci" and f.ff[i] == 0:
            continue  # llama.cpp's deci graph skips the whole layer (its attention too) when the MLP width is 0
        if f.arch == "command-r" or (f.arch == "stablelm" and f"{blk}ffn_norm.weight" not in f.t):  # parallel block
            h = f.norm(f"{blk}attn_norm", x)
            x = x + _attention(f, i, h, ids) + _ffn(f, i, h)
            continue
        h = f.norm(f"{blk}attn_norm", x) if f"{blk}attn_norm.weight" in f.t else x
        a = _attention(f, i, h, ids)
        if f"{blk}post_attention_norm.weight" in f.t:
            a = f.norm(f"{blk}post_attention_norm", a)
        x = x + residual_scale * a
        h = f.norm(f"{blk}ffn_norm", x) if f"{blk}ffn_norm.weight" in f.t else x
        m = _ffn(f, i, h)
        if f"{blk}post_ffw_norm.weight" in f.t:
            m = f.norm(f"{blk}post_ffw_norm", m)
        x = x + residual_scale * m
    x = f.norm("output_norm", x)
    logits = x @ f.t.get("output.weight", f.t["token_embd.weight"]).T
    if f.arch == "granite":
        logits = logits / float(f.get("logit_scale"))
    if f.arch == "command-r":
        logits = logits * float(f.get("logit_scale"))
    cap = f.get("final_logit_softcapping")
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _lin(f: _File, name: str, h: torch.Tensor) -> torch.Tensor:
    out = h @ f.t[f"{name}.weight"].T
    bias = f.t.get(f"{name}.bias")
    return out if bias is None else out + bias


def _attention(f: _File, i: int, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    blk, d, T = f"blk.{i}.", f.d, len(ids)
    heads, kv = f.heads[i], f.kv_heads[i]
    if heads == 0:
        return torch.zeros_like(h)
    if f"{blk}attn_qkv.weight" in f.t:
        q, k, v = _lin(f, f"{blk}attn_qkv", h).split([heads * d, kv * d, kv * d], dim=-1)
    else:
        q, k, v = (_lin(f, f"{blk}attn_{p}", h) for p in "qkv")
    qn, kn = f.t.get(f"{blk}attn_q_norm.weight"), f.t.get(f"{blk}attn_k_norm.weight")
    if qn is not None and qn.dim() == 1 and qn.numel() == heads * d:  # one norm over all heads (OLMo 2)
        q, k = _rms(q, qn, f.eps), _rms(k, kn, f.eps)
    q, k, v = q.view(T, heads, d), k.view(T, kv, d), v.view(T, kv, d)
    if qn is not None and qn.dim() == 2:  # a LayerNorm weight per head (Command-R)
        q, k = _layer_norm(q, qn, None, f.eps), _layer_norm(k, kn, None, f.eps)
    elif qn is not None and qn.numel() == d:  # one head's norm, shared by every head
        q, k = _rms(q, qn, f.eps), _rms(k, kn, f.eps)
    q, k = _rope(f, i, q), _rope(f, i, k)
    group = heads // kv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = float(f.get("attention.scale", 0.0)) or 1 / math.sqrt(d)
    if (f.arch, f.n_layers) in (("gemma2", 46), ("gemma3", 62)):  # llama.cpp's rule for the 27B models
        scale = 1 / math.sqrt(int(f.get("embedding_length")) // heads)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if f.arch == "gemma2":
        cap = float(f.get("attn_logit_softcapping"))
        scores = torch.tanh(scores / cap) * cap
    pos = torch.arange(T)
    allowed = pos[None, :] <= pos[:, None]
    if f.sliding(i):
        allowed &= pos[:, None] - pos[None, :] < int(f.get("attention.sliding_window"))
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, heads * d)
    return _lin(f, f"{blk}attn_output", out)


def _rope(f: _File, i: int, x: torch.Tensor) -> torch.Tensor:
    if f.arch == "smollm3" and (i + 1) % 4 == 0:  # llama.cpp's smollm3 graph: NoPE in every 4th layer
        return x
    n_rot = int(f.get("rope.dimension_count", f.d))
    base, factors = float(f.get("rope.freq_base", 10000.0)), f.t.get("rope_freqs.weight")
    if f.sliding(i) and f.get("rope.freq_base_swa") is not None:
        base = float(f.get("rope.freq_base_swa"))
    elif f.get("rope.scaling.type") == "linear":
        factors = torch.full((n_rot // 2,), float(f.get("rope.scaling.factor")))
    return _rotate(x, torch.arange(x.shape[0]), n_rot, base, factors, f.arch in PAIRS_ROTARY)


def _gated(f: _File, prefix: str, suffix: str, h: torch.Tensor) -> torch.Tensor:
    act = (lambda t: F.gelu(t, approximate="tanh")) if f.arch in GELU else F.silu
    if f"{prefix}ffn_gate{suffix}.weight" in f.t:
        gate, up = _lin(f, f"{prefix}ffn_gate{suffix}", h), _lin(f, f"{prefix}ffn_up{suffix}", h)
    else:  # fused gate|up rows (Phi-3)
        gate, up = _lin(f, f"{prefix}ffn_up{suffix}", h).chunk(2, dim=-1)
    return _lin(f, f"{prefix}ffn_down{suffix}", act(gate) * up)


def _ffn(f: _File, i: int, h: torch.Tensor) -> torch.Tensor:
    blk = f"blk.{i}."
    if f"{blk}ffn_gate_inp.weight" not in f.t:
        return _gated(f, blk, "", h) if f.ff[i] > 0 else torch.zeros_like(h)
    probs = (h @ f.t[f"{blk}ffn_gate_inp.weight"].T).softmax(-1)
    weights, chosen = probs.topk(int(f.get("expert_used_count")), dim=-1)
    if f.arch in RENORMALISED_ROUTING:
        weights = weights / weights.sum(-1, keepdim=True)
    gate, up, down = (f.t[f"{blk}ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for w, e in zip(weights[t], chosen[t]):
            out[t] += w * (down[e] @ (F.silu(gate[e] @ h[t]) * (up[e] @ h[t])))
    if f"{blk}ffn_gate_inp_shexp.weight" in f.t:
        share = torch.sigmoid(h @ f.t[f"{blk}ffn_gate_inp_shexp.weight"])[:, None]
        out = out + share * _gated(f, blk, "_shexp", h)
    return out
