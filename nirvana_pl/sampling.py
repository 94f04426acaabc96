"""Text a causal language model samples itself, for the estimators that also score the model's own distribution.

``fisher_functional_self`` (see :mod:`nirvana_pl.saliency`) scores the units on the training batches *and* on
windows the model writes itself, so that a unit the model needs off the training domain is not ranked low just
because the warm-up text never used it. :func:`sample_like` draws those windows: one per row of the given batches,
of the same lengths, each opened by the model's BOS token and one token drawn uniformly from its vocabulary, then
continued at temperature 1 and top-p 0.95, with a KV cache; the end-of-sequence token is never drawn, so each window
is one continuous text.

The drawn opening token makes the windows cover more of the model's domains: from BOS alone an instruct model writes
mostly one kind of text (SmolLM2: web prose, no code in 32 windows), so units that only code or markup use would be
ranked low; opened by a random token of its vocabulary, it continues in whatever kind of text that token begins
(SmolLM2: code or markup in 5 of 32 windows). See the cross-domain section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arch import architecture_of

TEMPERATURE = 1.0
TOP_P = 0.95
#: open each window with a token drawn uniformly from the vocabulary after BOS (False: BOS alone, as the library
#: sampled before; kept so that benchmarks/cross_domain.py can measure both)
OPEN_FROM_VOCABULARY = True
#: rows sampled together (one KV cache)
CHUNK_ROWS = 64


class SamplingError(RuntimeError):
    """The model cannot sample its own text as configured."""


def sample_like(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], seed: int, rank: int = 0, progress: bool = False
) -> list[dict[str, torch.Tensor]]:
    """For each batch (``{"input_ids": [B, T], ...}``), ``{"input_ids": [B, T]}`` that ``model`` sampled itself.

    Each window starts at the config's ``bos_token_id`` (or, without one, at the first token of the batch row it
    stands for), then a token drawn uniformly from the vocabulary (any but the EOS and padding tokens; see
    :data:`OPEN_FROM_VOCABULARY`), and continues with tokens drawn at temperature ``TEMPERATURE`` from the
    top-``TOP_P`` nucleus, never the config's ``eos_token_id`` (a window is one text, as
    ``generate(min_new_tokens=...)`` writes it).
    Deterministic in (``seed``, ``rank``): data-parallel ranks pass their rank to sample different windows, whose
    scores the saliency's ``reduce`` hook then averages. The global random state is left as it was, so a fit that
    samples at a prune event resumes on the same random stream.
    """
    arch = architecture_of(model)
    if not arch.generates:
        raise SamplingError(
            f"{type(model).__name__} is not a decoder-only language model, so it cannot sample the windows that "
            "saliency='fisher_functional_self' scores; use saliency='fisher_functional' for this model."
        )
    if not batches:
        raise ValueError("sample_like needs at least one batch to copy the shapes of.")
    device = batches[0]["input_ids"].device
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None:
        device = weight.device
    config = getattr(model, "config", None)
    bos, eos, pad = (getattr(config, f"{name}_token_id", None) for name in ("bos", "eos", "pad"))
    firsts = torch.cat([b["input_ids"][:, :1] for b in batches]).to(device)
    starts = torch.full_like(firsts, int(bos)) if isinstance(bos, int) else firsts
    length = max(b["input_ids"].shape[1] for b in batches)
    banned = [eos] if isinstance(eos, int) else [int(t) for t in eos or ()]
    generator = torch.Generator(device=device).manual_seed(_stream_seed(seed, rank))
    if OPEN_FROM_VOCABULARY and length > 1:
        openers = _vocabulary_draw(model, starts.shape[0], banned + ([pad] if isinstance(pad, int) else []), generator)
        starts = torch.cat([starts, openers.to(device)], dim=1)
    rows = [
        _sample(model, starts[i : i + CHUNK_ROWS], length, banned, generator, progress)
        for i in range(0, starts.shape[0], CHUNK_ROWS)
    ]
    ids = torch.cat(rows)
    out, i = [], 0
    for b in batches:
        n, t = b["input_ids"].shape
        out.append({"input_ids": ids[i : i + n, :t].to(b["input_ids"].device)})
        i += n
    return out


def _vocabulary_draw(model: nn.Module, n: int, excluded: list[int], generator: torch.Generator) -> torch.Tensor:
    """``[n, 1]`` token ids drawn uniformly from the input embedding's rows, none of ``excluded`` (the rows an
    embedding is padded with beyond the tokenizer's vocabulary, as in Qwen2, can be drawn too: a rare, harmless
    opening)."""
    vocab = model.get_input_embeddings().num_embeddings
    allowed = torch.ones(vocab, device=generator.device)
    allowed[[t for t in excluded if 0 <= t < vocab]] = 0.0
    return torch.multinomial(allowed, n, replacement=True, generator=generator)[:, None]


def _stream_seed(seed: int, rank: int) -> int:
    """One seed per (seed, rank) pair, distinct for any rank below a million."""
    return (int(seed) * 1_000_003 + int(rank)) % (2**63)


@torch.no_grad()
def _sample(
    model: nn.Module, start: torch.Tensor, length: int, banned: list[int], generator: torch.Generator, progress: bool
) -> torch.Tensor:
    """``start`` (``[N, k]``) continued to ``length`` tokens, one forward per token over a KV cache, in eval mode,
    never drawing a ``banned`` token."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    steps = range(length - start.shape[1])
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="nirvana-pl sampling the model's own text", leave=False)
    ids, token, past = start, start, None
    try:
        for _ in steps:
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            logits[:, [t for t in banned if t < logits.shape[-1]]] = float("-inf")
            token = _nucleus(logits, generator)[:, None]
            ids = torch.cat([ids, token], dim=1)
    finally:
        for m, training in modes:
            m.training = training
    return ids


def _nucleus(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from the smallest set of top tokens whose probability reaches ``TOP_P``."""
    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= TOP_P  # (the token that crosses TOP_P stays)
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)
