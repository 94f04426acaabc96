"""How llama.cpp reads a Llama-like decoder family: :class:`GGUFLayout` (data, one per family) and the builder that
turns a model's state dict into a :class:`~nirvana_pl.gguf_layout.GGUFTarget` through it.

Every family's llama.cpp graph builds its layers from layer 0's widths, except ``deci`` (a Llama layer with its own
head counts and MLP width per layer). So a model whose layers differ in width is written as ``deci`` where the
family's layer is a plain Llama layer (Llama, Mistral, Qwen2), and is refused otherwise; a model whose layers share
one width keeps its family's own graph. What differs between the families' graphs is data here: which norms a
layer has and where, Gemma's ``1 + w`` norms, LayerNorm or RMSNorm, whether the file must (or must not) hold an
LM head of its own, which biases a graph adds, fused projections (Phi-3), sliding-window layers, rope scalings,
and a family's own hyper-parameters (soft-capping, Granite's multipliers) with the settings its graph cannot
compute (``GGUFLayout.extra``). The
conventions follow llama.cpp's own converter (``convert_hf_to_gguf.py``) and model loader; each family is run in
llama.cpp by ``benchmarks/gguf_llamacpp.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..gguf_layout import GGUFTarget, GGUFTensor, interleave_rotary
from ..units import LayerUnits, UnsupportedModelError, head_dim_of

if TYPE_CHECKING:
    from .decoder import DecoderArchitecture

#: a Llama layer's norms: (GGUF name, the layer's module)
LLAMA_NORMS = (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"))
#: Gemma 2 / 3: a norm before and after attention and before and after the MLP
SANDWICH_NORMS = (
    ("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
)  # fmt: skip
#: OLMo 2 / 3: norms after attention and after the MLP only
POST_NORMS = (("post_attention_norm", "post_attention_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"))
#: Cohere: one norm before the parallel attention and MLP
PARALLEL_NORM = (("attn_norm", "input_layernorm"),)


@dataclass(frozen=True)
class GGUFLayout:
    """How one family's llama.cpp graph reads a model.

    ``arch``: the graph of a model whose layers share one width; ``per_layer_arch``: the one that reads a width
    per layer and computes this family exactly (``deci``; None: such models are refused). ``reorder_qk``: ``arch``
    rotates adjacent pairs of a head's dimensions where the model rotates its two halves (transformers'
    ``rotate_half``), so the q/k rows are re-ordered (False: both rotate the same dimensions, e.g. llama.cpp's
    NEOX graphs, or Cohere, which rotates adjacent pairs in transformers too). ``deci`` always re-orders.
    ``norms``: a layer's norms as (GGUF name, module name); a module the layer lacks is skipped (StableLM's
    parallel residual has no second norm). ``norm_offset``: added to every norm weight (Gemma's RMSNorm computes
    ``x * (1 + w)``, llama.cpp's ``x * w``). ``layer_norm``: the norms are LayerNorms (eps from
    ``config.layer_norm_eps``). ``output``: "optional" (an LM head tied to the embedding is left out), "tied" (the
    graph always reads the embedding: an untied head is refused) or "required" (written even when tied).
    ``full_query``: the graph sizes the query and output projections by ``hidden_size``, so every query head must
    be kept. ``projection_biases``: the graph adds biases to the attention output and the MLP projections (every
    graph adds q/k/v biases). ``sliding_pattern``: the graph reads which layers attend over a sliding window
    (``config.layer_types``). ``swa_rope_base``: it reads a rope base of its own for those layers.
    ``rope_freqs``: it reads per-frequency rope factors (Llama 3.1's scaling); ``linear_rope``: a linear rope
    scaling (``rope.scaling.factor``). ``query_scale_layers``: the family scales queries by
    ``config.query_pre_attn_scalar ** -0.5`` (Gemma 2/3), and the graph by ``head_dim ** -0.5``, or by
    ``(hidden_size // heads) ** -0.5`` in models of this many layers (the 27B models): the difference is folded
    into the file. ``expert_norm``: a mixture of experts' graph renormalises the top-k routing weights (True) or
    not (False); the model's ``norm_topk_prob`` must agree. ``expert_width_key``: where the graph reads an
    expert's width. ``extra``: the family's own hyper-parameters from the builder, called before anything else is
    read; it raises UnsupportedModelError for settings the graph cannot compute.
    """

    arch: str
    reorder_qk: bool = True
    per_layer_arch: str | None = None
    norms: tuple[tuple[str, str], ...] = LLAMA_NORMS
    norm_offset: float = 0.0
    layer_norm: bool = False
    output: str = "optional"
    full_query: bool = False
    projection_biases: bool = False
    sliding_pattern: bool = False
    swa_rope_base: bool = False
    rope_freqs: bool = False
    linear_rope: bool = False
    query_scale_layers: int | None = None
    expert_norm: bool | None = None
    expert_width_key: str = "expert_feed_forward_length"
    extra: Callable[["GGUFBuilder"], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.output not in ("optional", "tied", "required"):
            raise ValueError(f"GGUFLayout(output={self.output!r}): choose 'optional', 'tied' or 'required'.")

    def support(self) -> str:
        """What GGUF export writes for the family, for the README's table."""
        if self.per_layer_arch is None:
            return f"`{self.arch}`, uniform widths only" + (", every query head kept" if self.full_query else "")
        return f"`{self.per_layer_arch}` (per-layer widths), `{self.arch}` (uniform)"


def refuse(message: str) -> UnsupportedModelError:
    """The error for a model llama.cpp's graph cannot compute; it names the folder as the way out."""
    if "save_pruned(model, path)" not in message:
        message += " Save a folder instead: save_pruned(model, path)."
    return UnsupportedModelError(f"save_pruned(format='gguf'): {message}")


class GGUFBuilder:
    """The :class:`GGUFTarget` of one Llama-like decoder model (see :meth:`DecoderArchitecture.gguf_target`).

    ``gguf_arch`` is ``layout.arch`` for a model whose layers share one width, else ``layout.per_layer_arch``. A
    layer whose MLP was pruned away is written with one all-zero channel, which adds exactly 0: deci would skip
    the layer's whole output, its attention included, for an MLP width of 0. (Every layer keeps a KV group.)
    """

    def __init__(
        self, arch: "DecoderArchitecture", model: nn.Module, state: Mapping[str, torch.Tensor],
        units: Sequence[LayerUnits], gguf_arch: str,
    ) -> None:  # fmt: skip
        self.arch, self.model, self.state, self.units = arch, model, state, units
        self.layout: GGUFLayout = arch.gguf
        self.gguf_arch = gguf_arch
        self.per_layer = gguf_arch != self.layout.arch  # (deci: a plain Llama layer, with every Llama option)
        self.reorder_qk = self.per_layer or self.layout.reorder_qk
        self.projection_biases = self.per_layer or self.layout.projection_biases
        self.used: set[str] = set()
        self.tensors: list[GGUFTensor] = []
        self.notes: list[str] = []
        self.config = model.config
        self.head_dim = head_dim_of(self.config)

    # --- tensors
    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise refuse(f"the model has no weight {key!r}.")
        self.used.add(key)
        return self.state[key]

    def add(
        self, name: str, key: str | None, shape: Sequence[int] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None, matrix: bool | None = None,
    ) -> None:  # fmt: skip
        """Tensor ``name`` from state dict entry ``key`` (through ``transform``), or zeros of ``shape`` (key None).
        ``matrix``: whether the file's weight type applies (default: 2-D and more)."""
        if key is None:
            size = tuple(int(n) for n in shape)
            self.tensors.append(GGUFTensor(name, size, lambda: torch.zeros(size), len(size) >= 2))
            return
        value = self.take(key)
        fn = transform or (lambda t: t)
        make = lambda: fn(value.detach().float().cpu())  # noqa: E731
        size = tuple(value.shape) if shape is None else tuple(int(n) for n in shape)
        self.tensors.append(GGUFTensor(name, size, make, value.dim() >= 2 if matrix is None else matrix))

    def add_norm(self, name: str, module_key: str, scale: float = 1.0) -> bool:
        """The norm at ``module_key`` (``.weight``, and ``.bias`` when it has one) as ``name``; False if absent."""
        if f"{module_key}.weight" not in self.state:
            return False
        offset = self.layout.norm_offset
        self.add(f"{name}.weight", f"{module_key}.weight", transform=lambda t: (t + offset) * scale, matrix=False)
        if f"{module_key}.bias" in self.state:
            self.add(f"{name}.bias", f"{module_key}.bias", matrix=False)
        return True

    def target(self) -> GGUFTarget:
        family = self.layout.extra(self) if self.layout.extra is not None else {}
        body = self.arch.body
        self.add("token_embd.weight", f"{body}.embed_tokens.weight")
        kv_heads, heads, ff = [], [], []
        for u in self.units:
            prefix = f"{self.arch.layers}.{u.index}."
            for gguf_name, module in self.layout.norms:
                self.add_norm(f"blk.{u.index}.{gguf_name}", f"{prefix}{module}")
            kv = self.attention(u)
            kv_heads.append(kv)
            heads.append(kv * u.group_size)
            ff.append(self.experts(u) if u.num_experts else self.mlp(u))
        self.add_norm("output_norm", f"{body}.norm")
        self.output()
        self.check_query_width(heads)
        hparams = {**self.hparams(heads, kv_heads, ff), **self.rope(), **family}
        left = sorted(set(self.state) - self.used)
        if left:
            raise refuse(
                f"{len(left)} weights have no place in llama.cpp's {self.gguf_arch!r} graph (e.g. {left[:3]}); this "
                f"model is not the plain {self.arch.model_types[0]} layout."
            )
        return GGUFTarget(self.gguf_arch, hparams, self.tensors, self.notes)

    def output(self) -> None:
        head_key = f"{self.arch.head}.weight"
        embed_key = f"{self.arch.body}.embed_tokens.weight"
        tied = head_key not in self.state or self.state[head_key].data_ptr() == self.state[embed_key].data_ptr()
        if self.layout.output == "tied" and not tied:
            raise refuse(
                f"llama.cpp's {self.gguf_arch!r} graph computes the logits with the token embedding, and this model "
                "has an LM head of its own (tie_word_embeddings=False); save a folder with save_pruned(model, path)."
            )
        if self.layout.output == "required" or not tied:
            self.add("output.weight", head_key if head_key in self.state else embed_key)
        self.used.add(head_key)

    def attention(self, u: LayerUnits) -> int:
        """Add layer ``u``'s attention tensors (a layer keeps at least one KV group); the KV heads written."""
        a, i, g = self.arch, u.index, u.group_size
        attn, blk, kv = f"{a.layers}.{i}.{a.attention}.", f"blk.{i}.", u.num_kv_groups
        scale = self.query_scale(kv * g)
        q_norm = f"{attn}q_norm"
        scale_q = (lambda t: t * scale) if scale != 1.0 and f"{q_norm}.weight" not in self.state else None
        if a.qkv is not None:  # fused q|k|v rows (Phi-3), written as they are (checked by the adapter)
            projections = {"attn_qkv": (a.qkv, None), "attn_output": (a.o, None)}
        else:
            rotate_q, rotate_k = self.rotary(kv * g), self.rotary(kv)
            q_fn = _compose(scale_q, rotate_q)
            projections = {"attn_q": (a.q, q_fn), "attn_k": (a.k, rotate_k), "attn_v": (a.v, None),
                           "attn_output": (a.o, None)}  # fmt: skip
        for gguf_name, (proj, transform) in projections.items():
            for part in ("weight", "bias"):
                key = f"{attn}{proj}.{part}"
                if key in self.state:
                    self.check_bias(gguf_name, part, "attention_bias")
                    self.add(f"{blk}{gguf_name}.{part}", key, transform=transform)
        self.add_norm(f"{blk}attn_q_norm", q_norm, scale)
        self.add_norm(f"{blk}attn_k_norm", f"{attn}k_norm")
        return kv

    def query_scale(self, heads: int) -> float:
        """What the query must be multiplied by for llama.cpp's attention scale to give the model's (Gemma 2/3:
        transformers scales by ``query_pre_attn_scalar ** -0.5``, llama.cpp by ``head_dim ** -0.5``, or
        ``(hidden_size / heads) ** -0.5`` for the layer counts of the 27B models)."""
        qpas = getattr(self.config, "query_pre_attn_scalar", None)
        if qpas is None or self.layout.query_scale_layers is None:
            return 1.0
        big = self.layout.query_scale_layers == len(self.units)
        cpp_scale = (self.config.hidden_size // heads) ** -0.5 if big else self.head_dim**-0.5  # (// as llama.cpp)
        return float(qpas) ** -0.5 / cpp_scale

    def mlp(self, u: LayerUnits) -> int:
        """Add layer ``u``'s MLP tensors; the width written (1 for a layer whose MLP was pruned away)."""
        a, i, hidden = self.arch, u.index, self.config.hidden_size
        mlp, blk = f"{a.layers}.{i}.{a.mlp}.", f"blk.{i}."
        empty = u.mlp_width == 0
        width = max(u.mlp_width, 1)
        if empty:
            self.notes.append(f"layer {i} has no MLP channel left; it is written with one all-zero channel (adds "
                              "0): llama.cpp's deci graph skips a layer's whole output when its MLP width is 0")
            self.used.update(k for k in self.state if k.startswith(mlp))
        if a.gate_up is not None:  # fused gate|up rows (Phi-3): llama.cpp's graph splits ffn_up the same way
            projections = {"ffn_up": (a.gate_up, (2 * width, hidden)), "ffn_down": (a.down, (hidden, width))}
        else:
            projections = {"ffn_gate": (a.gate, (width, hidden)), "ffn_up": (a.up, (width, hidden)),
                           "ffn_down": (a.down, (hidden, width))}  # fmt: skip
        for gguf_name, (proj, shape) in projections.items():
            for part, size in (("weight", shape), ("bias", shape[:1])):
                key = f"{mlp}{proj}.{part}"
                if key in self.state:
                    self.check_bias(gguf_name, part, "mlp_bias")
                    self.add(f"{blk}{gguf_name}.{part}", None if empty else key, size)
        return width

    def experts(self, u: LayerUnits) -> int:
        """Add a mixture-of-experts layer's router, experts (stacked, expert first) and shared expert; the
        width of one expert."""
        a, i = self.arch, u.index
        block, blk = f"{a.layers}.{i}.{a.mlp}.", f"blk.{i}."
        gate_up = self.take(f"{block}{a.experts}.{a.expert_gate_up}")
        width = gate_up.shape[1] // 2
        self.add(f"{blk}ffn_gate_inp.weight", f"{block}{a.router}.weight", matrix=False)  # (f32, as llama.cpp keeps it)
        key = f"{block}{a.experts}.{a.expert_gate_up}"
        self.add(f"{blk}ffn_gate_exps.weight", key, (u.num_experts, width, gate_up.shape[2]), lambda t: t[:, :width])
        self.add(f"{blk}ffn_up_exps.weight", key, (u.num_experts, width, gate_up.shape[2]), lambda t: t[:, width:])
        self.add(f"{blk}ffn_down_exps.weight", f"{block}{a.experts}.{a.expert_down}")
        if a.shared_expert is not None:
            shared = f"{block}{a.shared_expert}."
            hidden, s = self.config.hidden_size, u.shared_width
            if s == 0:
                self.notes.append(f"layer {i}'s shared expert has no channel left; it is written with one all-zero "
                                  "channel (adds 0): llama.cpp's graph always runs it")  # fmt: skip
                self.used.update(k for k in self.state if k.startswith(shared))
            for gguf_name, proj, shape in (("ffn_gate_shexp", a.gate, (1, hidden)), ("ffn_up_shexp", a.up, (1, hidden)),
                                           ("ffn_down_shexp", a.down, (hidden, 1))):  # fmt: skip
                self.add(f"{blk}{gguf_name}.weight", f"{shared}{proj}.weight" if s else None, None if s else shape)
            self.add(f"{blk}ffn_gate_inp_shexp.weight", f"{block}{a.shared_expert}_gate.weight", (hidden,),
                     lambda t: t.reshape(-1), matrix=False)  # fmt: skip
        return width

    def rotary(self, n_heads: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.reorder_qk:
            return None
        return lambda t: interleave_rotary(t, n_heads)

    def check_bias(self, gguf_name: str, part: str, setting: str) -> None:
        qkv = gguf_name in ("attn_q", "attn_k", "attn_v", "attn_qkv")  # (every graph adds these)
        if part == "bias" and not qkv and not self.projection_biases:
            raise refuse(f"this model has a bias on its {gguf_name} projection ({setting}=True), which llama.cpp's "
                         f"{self.gguf_arch!r} graph does not add.")  # fmt: skip

    def check_query_width(self, heads: list[int]) -> None:
        hidden, d = self.config.hidden_size, self.head_dim
        if self.layout.full_query and any(h * d != hidden for h in heads):
            kv = hidden // d // self.units[0].group_size  # (the dense model's KV groups)
            kept = f"{min(heads)}" if min(heads) == max(heads) else f"{min(heads)}-{max(heads)}"
            raise refuse(
                f"llama.cpp's {self.gguf_arch!r} graph sizes the query by hidden_size ({hidden} = {hidden // d} heads "
                f"of {d}), and this model keeps {kept} query heads. Prune only MLP channels for a GGUF file of this "
                f"family (min_kv_groups={kv} keeps every KV group), or save a folder (save_pruned(model, path))."
            )

    # --- hyper-parameters
    def hparams(self, heads: list[int], kv_heads: list[int], ff: list[int]) -> dict[str, Any]:
        cfg, d = self.config, self.head_dim

        def value(xs: list[int]) -> int | list[int]:
            return xs if self.per_layer else xs[0]

        out: dict[str, Any] = {
            "context_length": int(cfg.max_position_embeddings),
            "embedding_length": int(cfg.hidden_size),
            "block_count": len(self.units),
            "feed_forward_length": value(ff),
            "attention.head_count": value(heads),
            "attention.head_count_kv": value(kv_heads),
            "attention.key_length": d,
            "attention.value_length": d,
            "vocab_size": int(cfg.vocab_size),
        }
        if self.layout.layer_norm:
            out["attention.layer_norm_epsilon"] = float(cfg.layer_norm_eps)
        else:
            out["attention.layer_norm_rms_epsilon"] = float(cfg.rms_norm_eps)
        if self.units[0].num_experts:
            out.update(self.expert_hparams(ff))
        pattern = self.layer_pattern()
        window = getattr(cfg, "sliding_window", None)
        sliding = getattr(cfg, "use_sliding_window", True) and window and window < cfg.max_position_embeddings
        if sliding and not pattern:
            self.notes.append(f"the model attends over a sliding window of {window} tokens and llama.cpp's "
                              f"{self.gguf_arch} graph over the whole context: outputs agree up to {window} tokens")
        return {**out, **pattern}

    def expert_hparams(self, ff: list[int]) -> dict[str, Any]:
        counts = {(u.num_experts, w, u.shared_width) for u, w in zip(self.units, ff)}
        if len(counts) > 1:
            raise refuse(
                f"the layers keep different numbers or widths of experts ({sorted(counts)} as (experts, width, "
                f"shared width)), and llama.cpp's {self.gguf_arch!r} graph takes one for all layers. Prune with "
                "uniform=True for a GGUF file, or save a folder (save_pruned(model, path))."
            )
        norm = bool(getattr(self.config, "norm_topk_prob", True))
        if self.layout.expert_norm is not None and norm != self.layout.expert_norm:
            raise refuse(
                f"llama.cpp's {self.gguf_arch!r} graph {'renormalises' if self.layout.expert_norm else 'keeps'} the "
                f"top-k routing weights, and this model has norm_topk_prob={norm}."
            )
        experts, width, shared = counts.pop()
        # (a model keeping fewer experts than it routes a token to has that count in its config already)
        out = {"expert_count": experts, "expert_used_count": min(int(self.config.num_experts_per_tok), experts),
               "feed_forward_length": int(getattr(self.config, "intermediate_size", width)),
               self.layout.expert_width_key: width}  # fmt: skip
        if self.arch.shared_expert is not None:
            out["expert_shared_feed_forward_length"] = max(shared, 1)
        return out

    def layer_pattern(self) -> dict[str, Any]:
        """Sliding-window layers as llama.cpp's graphs with a per-layer pattern read them (Gemma 2/3, OLMo 3)."""
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if not self.layout.sliding_pattern or not types or not window:
            return {}
        return {"attention.sliding_window": int(window),
                "attention.sliding_window_pattern": [int(t == "sliding_attention") for t in types]}  # fmt: skip

    def rope_theta(self, kind: str) -> float:
        params = getattr(self.config, "rope_parameters", None) or {}
        params = params.get(kind, params)
        return float(params.get("rope_theta", getattr(self.config, "rope_theta", 10000.0)))

    def rope(self) -> dict[str, Any]:
        """Rotary hyper-parameters read from the model's own ``inv_freq`` (per layer type where it has two). A
        rope scaling that only rescales frequencies is written as llama.cpp's ``rope_freqs`` factors (llama,
        deci) or as a linear factor (graphs that read one); anything else is refused."""
        rotary = getattr(getattr(self.model, self.arch.body, None), "rotary_emb", None)
        full = getattr(rotary, "inv_freq", getattr(rotary, "full_attention_inv_freq", None))
        if full is None:
            raise refuse("the model has no rotary_emb.inv_freq to read.")
        n = 2 * full.numel()
        if n != self.head_dim and self.reorder_qk:
            raise refuse(f"llama.cpp's {self.gguf_arch!r} graph rotates whole heads, and this model rotates {n} of "
                         f"each head's {self.head_dim} dimensions.")  # fmt: skip
        scalings = [getattr(rotary, f"{kind}attention_scaling", None) for kind in ("", "full_attention_",
                                                                                  "sliding_attention_")]  # fmt: skip
        scaling = max((float(x) for x in scalings if x is not None), key=lambda x: abs(x - 1.0), default=1.0)
        if scaling != 1.0:
            raise refuse(f"the rope scaling {self.rope_type()!r} scales attention ({scaling}); nirvana_pl writes "
                         "rope scalings that only rescale frequencies.")  # fmt: skip
        theta = self.rope_theta("full_attention")
        out: dict[str, Any] = {"rope.dimension_count": n, "rope.freq_base": theta}
        factors = (_default_inv_freq(theta, n) / full.double()).float()
        if not torch.allclose(factors, torch.ones_like(factors), rtol=1e-5, atol=0):
            if self.per_layer or self.layout.rope_freqs:
                self.tensors.append(GGUFTensor("rope_freqs.weight", (n // 2,), lambda: factors.clone(), False))
            elif self.layout.linear_rope and torch.allclose(factors, factors[:1].expand_as(factors), rtol=1e-5):
                out.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(factors[0])})
            else:
                raise refuse(f"the rope scaling {self.rope_type()!r} of this model is not one llama.cpp's "
                             f"{self.gguf_arch!r} graph reads.")  # fmt: skip
        local = getattr(rotary, "sliding_attention_inv_freq", None)
        if local is not None:
            local_theta = self.rope_theta("sliding_attention")
            same = torch.allclose(_default_inv_freq(local_theta, n).float(), local.float(), rtol=1e-5)
            if not same or (not self.layout.swa_rope_base and local_theta != theta):
                raise refuse(f"the sliding-window layers' rotary embedding (base {local_theta:g}) is not one "
                             f"llama.cpp's {self.gguf_arch!r} graph reads.")  # fmt: skip
            if self.layout.swa_rope_base:
                out["rope.freq_base_swa"] = local_theta
        return out

    def rope_type(self) -> str:
        params = getattr(self.config, "rope_parameters", None) or {}
        return params.get("full_attention", params).get("rope_type", "default")


def _default_inv_freq(theta: float, n: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n))


def _compose(*fns: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    fns = tuple(f for f in fns if f is not None)
    if not fns:
        return None

    def apply(t: torch.Tensor) -> torch.Tensor:
        for f in fns:
            t = f(t)
        return t

    return apply


# ------------------------------------------------------------------------------------------------ families' extras
def gemma2_hparams(b: GGUFBuilder) -> dict[str, Any]:
    """Gemma 2's graph always soft-caps the attention scores and the logits. A model without a final cap gets one
    too large to act (on fp32 logits); one without an attention cap is refused, since a cap that large would
    underflow in a half-precision attention kernel."""
    attn, final = getattr(b.config, "attn_logit_softcapping", None), getattr(b.config, "final_logit_softcapping", None)
    if attn is None:
        raise refuse("llama.cpp's gemma2 graph always soft-caps the attention scores, and this model has "
                     "attn_logit_softcapping=None.")  # fmt: skip
    return {"attn_logit_softcapping": float(attn), "final_logit_softcapping": float(final or 1e30)}


def gemma3_hparams(b: GGUFBuilder) -> dict[str, Any]:
    cap = getattr(b.config, "final_logit_softcapping", None)
    return {} if cap is None else {"final_logit_softcapping": float(cap)}


def granite_hparams(b: GGUFBuilder) -> dict[str, Any]:
    """Granite's four multipliers: llama.cpp multiplies the embedding and each residual branch, uses the
    attention multiplier as the softmax scale and divides the logits, as transformers does."""
    c = b.config
    return {"embedding_scale": float(c.embedding_multiplier), "residual_scale": float(c.residual_multiplier),
            "attention.scale": float(c.attention_multiplier), "logit_scale": float(c.logits_scaling)}  # fmt: skip


def smollm3_hparams(b: GGUFBuilder) -> dict[str, Any]:
    """llama.cpp's smollm3 graph skips the rotary embedding in every 4th layer (3, 7, 11 ...), a rule of its own
    code, not of the file: a model whose NoPE layers are elsewhere is refused."""
    layers = len(b.units)
    want = [int((i + 1) % 4 != 0) for i in range(layers)]
    have = [int(x) for x in (getattr(b.config, "no_rope_layers", None) or want)]
    if have != want:
        nope = [i for i, x in enumerate(have) if not x]
        raise refuse(f"this SmolLM3 model has no rotary embedding in layers {nope}, and llama.cpp's smollm3 graph "
                     "drops it in every 4th layer (3, 7, 11, ...).")  # fmt: skip
    if getattr(b.config, "attention_bias", False) or getattr(b.config, "mlp_bias", False):
        raise refuse("llama.cpp's smollm3 graph has no bias on the attention output or the MLP projections.")
    return {}


def phi3_hparams(b: GGUFBuilder) -> dict[str, Any]:
    c = b.config
    if b.rope_type() != "default":
        raise refuse(f"Phi-3's rope scaling {b.rope_type()!r} (LongRoPE factors) is not written yet.")
    original = getattr(c, "original_max_position_embeddings", None) or c.max_position_embeddings
    return {"rope.scaling.original_context_length": int(original)}


def cohere_hparams(b: GGUFBuilder) -> dict[str, Any]:
    """Command-R's graph multiplies the logits by ``logit_scale``; it has per-head q/k norms exactly when the
    model has 64 layers or more (llama.cpp's rule for the 35B/104B models), so a model that differs is refused."""
    qk_norm = bool(getattr(b.config, "use_qk_norm", False))
    if qk_norm != (len(b.units) >= 64):
        raise refuse(f"llama.cpp's command-r graph has q/k norms exactly when a model has 64 layers or more; this one "
                     f"has {len(b.units)} layers and use_qk_norm={qk_norm}.")  # fmt: skip
    return {"logit_scale": float(b.config.logit_scale)}


__all__ = ["GGUFBuilder", "GGUFLayout", "LLAMA_NORMS", "PARALLEL_NORM", "POST_NORMS", "SANDWICH_NORMS"]
