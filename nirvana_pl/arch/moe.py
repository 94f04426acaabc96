"""Sparse mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): Llama-like attention, and an MLP of routed
experts (and, in Qwen2-MoE, a shared expert beside them).

transformers keeps a layer's experts in fused 3-D parameters: ``gate_up_proj`` ``[E, 2I, H]`` (every expert's gate
rows, then its up rows) and ``down_proj`` ``[E, H, I]``, with a router ``gate.weight`` ``[E, H]``. Two kinds of MLP
unit come out of that (issue: "prune expert channels and whole experts"):

* an **expert channel**, channel c of expert e: its gate and up rows and its down column (unit ``e * I + c`` of the
  layer's MLP pool), scored like a dense MLP channel;
* a **whole expert**: all its channels and its router row;
* a **shared expert channel** (Qwen2-MoE): the shared expert is an ordinary gated MLP that every token goes through,
  scaled by a sigmoid gate of its own; its channels are the last units of the layer's MLP pool (after the
  ``E * I`` expert channels) and cost what an expert channel costs (a gate row, an up row, a down column), so the
  allocation ranks them with the experts' width steps. Its one-row gate is not pruned.

The experts of a layer stay in one fused tensor, so every kept expert of a layer keeps the same number of
channels (each its own best ones): splitting the tensor per expert would give up the fused kernels
(``grouped_mm``) that make MoE layers fast, and a stock config could no longer describe the model. Removing an
expert removes its router row, which is exactly the dense model with that expert's router logit at minus infinity:
the softmax, the top-k and its renormalisation then see only the kept experts. A layer keeping fewer experts than
``num_experts_per_tok`` routes each token to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..hub_code import modeling_nirvana
from ..plan import LayerPlan, PruningPlan
from ..units import LayerUnits, UnsupportedModelError, WeightSlice, expert_channels
from . import register_architecture
from .decoder import DecoderArchitecture, layer_widths
from .gguf_decoder import GGUFLayout


#: expert widths transformers' grouped_mm kernel computes: its rows must span a multiple of 16 bytes (bf16: 8 values)
GROUPED_MM_CHANNELS = 8


@dataclass(eq=False)
class MoEDecoderArchitecture(DecoderArchitecture):
    """A decoder whose MLP is a block of routed experts in fused 3-D parameters.

    ``experts`` / ``router``: the MoE block's children (the fused experts module, the top-k router with a
    ``weight`` of one row per expert); ``expert_gate_up`` / ``expert_down``: the experts' fused parameters;
    ``num_experts_key`` / ``expert_width_key``: the config fields of the expert count and an expert's width.
    """

    experts: str = "experts"
    router: str = "gate"
    expert_gate_up: str = "gate_up_proj"
    expert_down: str = "down_proj"
    num_experts_key: str = "num_experts"
    expert_width_key: str = "moe_intermediate_size"
    #: the MoE block's shared expert (a gated MLP with this family's ``gate`` / ``up`` / ``down`` names; None: the
    #: family has none) and the config field of its width
    shared_expert: str | None = None
    shared_width_key: str | None = None
    lora: bool = False
    zero3: bool = False

    def find_units(self, model: nn.Module) -> list[LayerUnits]:
        config = model.config
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise UnsupportedModelError(
                f"{type(model).__name__} mixes dense MLP layers with expert layers (config.mlp_only_layers="
                f"{getattr(config, 'mlp_only_layers', None)}, decoder_sparse_step="
                f"{getattr(config, 'decoder_sparse_step', 1)}); nirvana_pl prunes models whose every layer has experts."
            )
        units = super().find_units(model)
        for u in units:
            router = self._router(model, u.index, u.mlp)
            u.num_experts = u.mlp_weights[0].experts
            u.expert_followers = [WeightSlice.follower(f"{self.router}.weight", router, 0, 1)]
            if u.shared_width and u.shared_channel_cost != u.mlp_channel_cost:
                raise UnsupportedModelError(
                    f"{type(model).__name__} layer {u.index}: a channel of its shared expert holds "
                    f"{u.shared_channel_cost} parameters and an expert channel {u.mlp_channel_cost}; nirvana_pl ranks "
                    "them in one pool and needs them equal."
                )
        return units

    def _router(self, model: nn.Module, i: int, block: nn.Module) -> nn.Module:
        router = getattr(block, self.router, None)
        if router is None or getattr(router, "bias", None) is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} layer {i}: expected a router `{self.router}` with a weight and no bias."
            )
        return router

    def _mlp_weights(self, model: nn.Module, i: int, mlp: nn.Module) -> list[WeightSlice]:
        experts = getattr(mlp, self.experts, None)
        if experts is None or not hasattr(experts, self.expert_gate_up):
            raise UnsupportedModelError(
                f"{type(model).__name__} layer {i}: its `{self.mlp}` ({type(mlp).__name__}) has no fused experts "
                f"`{self.experts}.{self.expert_gate_up}`; the {self.model_types[0]!r} adapter knows the transformers "
                "5 layout of experts in 3-D parameters."
            )
        routed = [
            WeightSlice.of_experts(self.expert_gate_up, experts, self.expert_gate_up, 1, 1, 1),
            WeightSlice.of_experts(self.expert_down, experts, self.expert_down, 2, 1),
        ]
        if self.shared_expert is None:
            if hasattr(mlp, "shared_expert"):
                raise UnsupportedModelError(
                    f"{type(model).__name__} layer {i} has a shared expert, which the {self.model_types[0]!r} adapter "
                    "does not know."
                )
            return routed
        shared = getattr(mlp, self.shared_expert, None)
        if shared is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} layer {i} has no shared expert `{self.shared_expert}`."
            )
        offset = routed[0].num_units  # (the shared expert's channels follow every expert's)
        return routed + [w.shifted(offset) for w in super()._mlp_weights(model, i, shared)]

    # ------------------------------------------------------------------------------------------- after a cut
    def after_slicing(self, model: nn.Module, units: Sequence[LayerUnits], plan: PruningPlan) -> None:
        cut = self.find_units(model)  # as they are now (``units`` were found before the cut)
        layout = self.layout()
        for u in cut:
            n_kv = u.num_kv_groups
            # (the attention's head counts; the experts block has no intermediate_size of its own)
            modeling_nirvana.set_layer_attributes(u.attn, u.mlp, layout, n_kv * u.group_size, n_kv, 0)
            modeling_nirvana.set_expert_attributes(u.mlp, layout, u.num_experts, u.channels_per_expert, u.shared_width)
        self.update_config(model, self._widths(cut))

    def widths(self, model: nn.Module) -> list[dict[str, int]]:
        return self._widths(self.find_units(model))

    def _widths(self, units: Sequence[LayerUnits]) -> list[dict[str, int]]:
        shared = (lambda u: {self.shared_width_key: u.shared_width}) if self.shared_expert else (lambda u: {})
        return [
            {"num_key_value_heads": w["num_key_value_heads"], "num_attention_heads": w["num_attention_heads"],
             self.expert_width_key: u.channels_per_expert, self.num_experts_key: u.num_experts, **shared(u)}
            for u, w in zip(units, layer_widths(units))
        ]  # fmt: skip

    def update_config(self, model: nn.Module, widths: list[dict[str, int]]) -> None:
        super().update_config(model, widths)
        config = model.config
        if not hasattr(config, "nirvana_layer_widths"):  # uniform: the stock fields describe the model
            n_experts = widths[0][self.num_experts_key]
            config.num_experts_per_tok = min(int(config.num_experts_per_tok), n_experts)
            if hasattr(model, "num_experts"):  # (the load-balancing loss of the causal LM reads these)
                model.num_experts, model.num_experts_per_tok = n_experts, config.num_experts_per_tok

    def resize_plan(self, u: LayerUnits, widths: dict[str, int]) -> LayerPlan:
        from ..surgery import PlanMismatchError

        kv, width = int(widths["num_key_value_heads"]), int(widths[self.expert_width_key])
        n_experts = int(widths[self.num_experts_key])
        shared = int(widths[self.shared_width_key]) if self.shared_expert else 0
        now = (u.num_kv_groups, u.channels_per_expert, u.num_experts, u.shared_width)
        if any(w > n for w, n in zip((kv, width, n_experts, shared), now)):
            raise PlanMismatchError(
                f"layer {u.index}: cannot grow from {u.num_kv_groups} KV groups / {u.num_experts} experts of "
                f"{u.channels_per_expert} channels / a shared expert of {u.shared_width} to {kv} / {n_experts} of "
                f"{width} / {shared}; build the model from the dense config."
            )
        channels = [e * u.channels_per_expert + c for e in range(n_experts) for c in range(width)]
        channels += [u.expert_units + c for c in range(shared)]
        return LayerPlan(u.num_kv_groups, u.mlp_width, list(range(kv)), channels, experts_before=u.num_experts,
                         kept_experts=list(range(n_experts)), shared_channels_before=u.shared_width)  # fmt: skip

    def saved_mlp_widths(self, u: LayerUnits, mlp_tensors: Sequence[torch.Tensor]) -> dict[str, int]:
        gate_up, saved = u.mlp_weights[0], mlp_tensors[0]
        widths = {self.expert_width_key: saved.shape[gate_up.axis] // gate_up.rows_per_unit,
                  self.num_experts_key: saved.shape[0]}  # fmt: skip
        if self.shared_expert:  # (read from its first weight, the first that is not a fused expert parameter)
            i = next(i for i, w in enumerate(u.mlp_weights) if not w.experts)
            first = u.mlp_weights[i]
            widths[self.shared_width_key] = mlp_tensors[i].shape[first.axis] // first.rows_per_unit
        return widths

    def check_plan(self, model: nn.Module, units: Sequence[LayerUnits], plan: PruningPlan) -> None:
        implementation = getattr(model.config, "_experts_implementation", None)
        if implementation not in (None, "grouped_mm"):
            return
        for u, lp in zip(units, plan.layers):
            width = lp.expert_width_kept
            if width % GROUPED_MM_CHANNELS or not width:
                from ..surgery import PlanMismatchError

                raise PlanMismatchError(
                    f"layer {u.index}: its experts would keep {width} channels each, and transformers' grouped_mm "
                    f"expert kernel (this model's experts implementation) needs expert widths that are positive "
                    f"multiples of {GROUPED_MM_CHANNELS} (rows of 16 bytes in bf16). Prune with mlp_round_to="
                    f"{GROUPED_MM_CHANNELS} (or a multiple; the allocation then keeps one block per expert and removes "
                    "whole experts instead), or load the model with experts_implementation='eager'."
                )

    # ------------------------------------------------------------------------------------------- masking
    def mask_experts(self, units: LayerUnits, plan: LayerPlan) -> list[Any]:
        """A removed expert's router logit at minus infinity (the softmax, top-k and renormalisation see only the
        kept experts), and a removed channel's down-projection column at zero, per forward (a shared expert is an
        ordinary MLP, masked with the dense ones)."""
        block = units.mlp
        handles: list[Any] = []
        experts = list(range(units.num_experts)) if plan.kept_experts is None else plan.kept_experts
        removed = sorted(set(range(units.num_experts)) - set(experts))
        if removed:
            handles.append(getattr(block, self.router).register_forward_hook(_masked_routing(removed)))
        keep = torch.zeros(units.num_experts, units.channels_per_expert, dtype=torch.bool)
        for e, channels in zip(experts, expert_channels(plan.kept_expert_units, units.channels_per_expert, experts)):
            keep[e, channels] = True
        keep[removed] = True  # (a removed expert is never routed to; its channels need no mask)
        if not bool(keep.all()):
            handles.append(_MaskedParameter(getattr(block, self.experts), self.expert_down, keep[:, None, :]))
        return handles

    def count_routing(self, units: LayerUnits, add: Callable[[torch.Tensor], None]) -> Any:
        # (the routers of these families return (logits, top-k weights, top-k expert indices))
        return getattr(units.mlp, self.router).register_forward_hook(lambda _router, _args, output: add(output[2]))

    # ------------------------------------------------------------------------------------------- export
    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "mlp_width_key": self.expert_width_key, "num_experts_key": self.num_experts_key,
                "shared_expert": self.shared_expert, "shared_width_key": self.shared_width_key}

    def save(self, model: nn.Module, path: Path, save_pretrained_kwargs: dict[str, Any]) -> None:
        # The fused 3-D expert tensors as they are: transformers would otherwise write them back in the original
        # per-expert layout, which it converts on load only for its own classes, not for the folder's code.
        super().save(model, path, {"save_original_format": False, **save_pretrained_kwargs})


MOE_FAMILIES = [
    MoEDecoderArchitecture(("mixtral",), num_experts_key="num_local_experts", expert_width_key="intermediate_size",
                           gguf=GGUFLayout("llama", expert_norm=True, expert_width_key="feed_forward_length"),
                           notes="Mixtral 8x7B / 8x22B; expert channels and whole experts (fused 3-D experts)"),
    MoEDecoderArchitecture(("qwen2_moe",), shared_expert="shared_expert",
                           shared_width_key="shared_expert_intermediate_size",
                           gguf=GGUFLayout("qwen2moe", reorder_qk=False, output="required", full_query=True,
                                           expert_norm=False),
                           notes="Qwen1.5-MoE / Qwen2-57B-A14B; expert and shared-expert channels, whole experts"),
    MoEDecoderArchitecture(("qwen3_moe",), gguf=GGUFLayout("qwen3moe", reorder_qk=False, expert_norm=True),
                           notes="Qwen3-30B-A3B / 235B-A22B; expert channels and whole experts"),
]  # fmt: skip
for _arch in MOE_FAMILIES:
    register_architecture(_arch)


def _masked_routing(removed: Sequence[int]):
    """A router forward hook: its outputs recomputed with the ``removed`` experts' logits at minus infinity.

    The routers of the adapted families (Mixtral, Qwen2-MoE, Qwen3-MoE) return ``(logits, top-k weights, top-k
    indices)``: softmax in fp32, top-k, renormalised unless ``norm_topk_prob`` is False."""

    def hook(router: nn.Module, _args: Any, output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        logits, weights, _ = output
        masked = logits.index_fill(-1, torch.as_tensor(list(removed), device=logits.device), float("-inf"))
        probs = torch.softmax(masked, dim=-1, dtype=torch.float)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        return masked, top.to(weights.dtype), index

    return hook


class _MaskedParameter:
    """During each forward of ``module``, its parameter ``name`` reads as ``parameter * keep`` (the parameter itself
    untouched; gradients reach it through the product). ``remove()`` restores it, also after a failed forward."""

    def __init__(self, module: nn.Module, name: str, keep: torch.Tensor) -> None:
        self.module, self.name = module, name
        self.parameter = module._parameters[name]
        self.keep = keep
        self.handles = [module.register_forward_pre_hook(self._mask), module.register_forward_hook(self._restore)]

    def _mask(self, module: nn.Module, _args: Any) -> None:
        p = self.parameter
        module._parameters[self.name] = p * self.keep.to(device=p.device, dtype=p.dtype)

    def _restore(self, module: nn.Module, _args: Any, _output: Any) -> None:
        module._parameters[self.name] = self.parameter

    def remove(self) -> None:
        self._restore(self.module, None, None)
        for h in self.handles:
            h.remove()
