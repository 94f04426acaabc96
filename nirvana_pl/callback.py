"""NirvanaPruningCallback: decides *when* to score and prune inside a Lightning fit.

How is elsewhere: saliency.py scores, allocate.py plans, surgery.py cuts (and slices the
optimizer state), report.py writes what happened, export.py saves the result.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from .allocate import DEFAULT_GAMMA, DenseReference, check_feasible, check_router_loss
from .arch import architecture_of
from .calibration import DEFAULT_GAMMA_GRID, CalibrationSelector
from .compensation import (
    DEFAULT_DAMPING,
    Compensation,
    check_compensate,
    compensates_anything,
    plan_compensation,
    resolve_compensate,
)
from .deepspeed import (
    deepspeed_allocations,
    install_resume_reshape,
    is_deepspeed,
    prune_engine,
    reader_for,
    zero_stage,
)
from .distill import Distiller, distill_config, make_teacher, teacher_dtype
from .distributed import (
    agree_on_plan,
    check_same_plan,
    check_strategy,
    gradient_reduce_hook,
    rewrap_ddp,
    run_directory,
    sum_over_processes,
)
from .hardware import slow_bf16_message
from .lora import adapter_anchors, attach_recovery_adapters, check_recovery_targets, has_lora, lora_config
from .oneshot import (
    allocation_config,
    check_scoring_stages,
    check_selection_args,
    make_plan,
    resolve_scoring_stages,
)
from .optim import retarget_optimizers
from .plan import PruningPlan
from .report import PruneRecord, format_summary, write_report
from .router_load import RouterLoad
from .saliency import (
    ADAM_ESTIMATORS,
    SELF_SAMPLING_ESTIMATORS,
    AdamStateSaliency,
    accumulate_adam_saliency,
    adam_part,
    check_adam_optimizers,
    check_calibration,
    check_estimator,
    check_num_sampled_batches,
    gradient_reduce,
    needs_calibration,
    self_sampled_windows,
)
from .schedule import PruneEvent, PruningSchedule
from .surgery import PlanMismatchError, apply_plan, resize_from_state_dict
from .units import (
    UnsupportedModelError,
    base_model_type,
    base_parameter_count,
    find_units,
    locate_model,
    parameter_numel,
    prunable_parameter_count,
)


class NirvanaPruningCallback(Callback):
    """Prune whole KV groups and MLP channels of a transformers LLM in the middle of a fit.

    Args:
        sparsity: fraction of the dense model's attention+MLP parameters to remove at ``prune_at``.
        prune_at: optimizer step (``trainer.global_step``) after which to prune.
        warmup_steps: optimizer steps before each prune over which saliency is accumulated
            (``adam_*``, ``fisher_functional*``) or training batches are collected as calibration (when
            ``calibration`` is not given).
        saliency: ``fisher_functional_self`` (default: the geometric mean of ``adam_fisher`` and ``functional``,
            both also on windows the model samples itself at the prune event, as many as the warm-up batches it
            scores and of their shapes, different on each rank; see :mod:`nirvana_pl.sampling`; decoder-only models)
            | ``fisher_functional`` (the same hybrid without the sampled windows: ``functional`` on the warm-up
            window's last ``num_calibration_batches`` training batches, or on ``calibration``) | ``adam_taylor`` |
            ``adam_fisher`` | ``adam_momentum`` | ``functional`` | ``magnitude`` | ``wanda_sp`` | ``taylor_loss`` |
            ``random``.
        gamma: MLP-fraction-removed over KV-fraction-removed (METHOD.md section 3).
        schedule: ``{step: target_sparsity}`` for iterative pruning (targets relative to the
            original dense model), instead of ``sparsity``/``prune_at``.
        calibration: token-id batches (LongTensor[B, T] or dicts with ``input_ids``) for the
            data-driven estimators (if None they are collected from the warm-up window), or a
            :class:`~nirvana_pl.CalibrationSelector` that chooses the calibration set at each prune
            event by the KL test (and gamma, with ``gamma="auto"``).
        gamma_grid: the gammas ``gamma="auto"`` chooses from.
        num_calibration_batches: how many training batches to collect when ``calibration`` is None.
        num_sampled_batches: ``fisher_functional_self`` only: how many batches of windows the model samples itself
            at a prune event, shaped like the calibration batches in turn (default None: one per calibration
            batch). More windows cost more sampling and passes and make the sampled text's share less noisy; the
            training batches and the sampled windows weigh half each in the functional half, whatever their number.
        scoring_stages: how many times a prune event scores the model (estimators computed from passes): each
            stage after the first scores it again with the units planned so far masked out (see
            :func:`~nirvana_pl.oneshot.staged_plan`); the scoring cost grows in proportion. None (default): 2 for
            ``fisher_functional_self``, 1 for the others.
        compensate: after the plan is chosen and before the cut, update the kept input columns of o_proj /
            down_proj by least squares so that they carry what the removed units contributed, as far as the kept
            inputs predict it (:mod:`nirvana_pl.compensation`), fitted on the event's calibration batches (and,
            for ``fisher_functional_self``, the windows its first scoring sampled). Costs forward passes
            over those batches (once per group of layers whose Gram matrices fit in 2 GiB) and a solve per weight;
            fused expert weights stay as they are. None (default): on for ``fisher_functional_self``, off for the
            others (which then prune as the paper does); True with an Adam-state or data-free saliency collects the
            warm-up batches for it.
        compensation_damping: the ridge of that least-squares fit, relative to each kept input's mean square
            (larger: a smaller update).
        model_attr: dotted path of the transformers model inside the LightningModule; found
            automatically when None.
        min_kv_groups, min_mlp_channels, mlp_round_to, uniform: allocation constraints (see
            ``AllocationConfig``). Under DeepSpeed ZeRO-3 every layer keeps at least ``mlp_round_to``
            MLP channels (ZeRO-3 cannot hold a weight with no elements).
        expert_share, min_experts, router_load: mixture-of-experts models: the share of the MLP cut taken as whole
            experts (the rest as channels inside the kept experts), the experts every layer keeps, and the power of
            an expert's share of the tokens routed during the warm-up window in its score.
        report_dir: where the JSON report goes (default: the trainer's log dir; without a logger, a fresh
            ``<default_root_dir>/nirvana_logs/version_N`` per run).
        recovery: recover with LoRA after the (first) prune: a ``peft.LoraConfig`` or a dict of its
            arguments (defaults r 8, alpha 16, all linear layers). At the prune event the adapters are
            attached to the pruned model, every other weight is frozen, and the optimizers step only
            the adapters from then on (same param groups and LR schedule).
        recovery_train_norms: with ``recovery``, keep the norm weights trainable too.
        distill: distil from the model as it was before the prune during recovery: ``True`` or a
            :class:`~nirvana_pl.DistillConfig` (or a dict of its fields: ``weight``, ``temperature``,
            ``teacher``, ``chunk_tokens``). A frozen copy of the model (in bf16/fp16 when the fit computes in it)
            runs on every training batch after the prune, and ``outputs.loss`` of the model's training forwards
            becomes ``(1 - weight) * loss + weight * T^2 * KL(teacher || student)``. A LightningModule that
            computes its own loss passes it through :meth:`distilled_loss`. Not under DeepSpeed ZeRO-3.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        prune_at: int | None = None,
        warmup_steps: int = 100,
        saliency: str = "fisher_functional_self",
        gamma: float | str = DEFAULT_GAMMA,
        *,
        schedule: Mapping[int, float] | None = None,
        calibration: Iterable[Any] | CalibrationSelector | None = None,
        gamma_grid: Sequence[float] = DEFAULT_GAMMA_GRID,
        num_calibration_batches: int = 8,
        num_sampled_batches: int | None = None,
        scoring_stages: int | None = None,
        compensate: bool | None = None,
        compensation_damping: float = DEFAULT_DAMPING,
        model_attr: str | None = None,
        min_kv_groups: int = 1,
        min_mlp_channels: int = 0,
        mlp_round_to: int = 8,
        uniform: bool = False,
        expert_share: float = 0.5,
        min_experts: int = 1,
        router_load: float = 1.0,
        seed: int = 0,
        report_dir: str | Path | None = None,
        recovery: Any = None,
        recovery_train_norms: bool = False,
        distill: Any = None,
    ) -> None:
        super().__init__()
        check_estimator(saliency)
        check_selection_args(saliency, calibration, gamma)
        scoring_stages = resolve_scoring_stages(saliency, scoring_stages)
        check_scoring_stages(saliency, calibration, scoring_stages)
        compensate = resolve_compensate(saliency, compensate)
        check_compensate(compensate, compensation_damping, isinstance(calibration, CalibrationSelector))
        self.schedule = PruningSchedule.build(sparsity, prune_at, schedule, warmup_steps)
        # Validate every target with the allocation rules now, not at the prune step.
        self._configured_alloc = [
            allocation_config(
                e.sparsity, gamma, min_kv_groups=min_kv_groups, min_mlp_channels=min_mlp_channels,
                mlp_round_to=mlp_round_to, uniform=uniform, expert_share=expert_share, min_experts=min_experts,
                router_load=router_load,
            )
            for e in self.schedule.events
        ]
        self._alloc = list(self._configured_alloc)  # what this fit's strategy allows of them (see setup)
        if adam_part(saliency) is not None and warmup_steps < 1:
            raise ValueError(
                f"saliency={saliency!r} averages Adam state over the warm-up window; warmup_steps={warmup_steps} "
                "leaves no step to average. Use warmup_steps >= 1."
            )
        if (needs_calibration(saliency) or compensate) and calibration is None and warmup_steps < 1:
            needs = f"saliency={saliency!r}" if needs_calibration(saliency) else "compensate=True"
            raise ValueError(
                f"{needs} needs calibration batches: pass calibration=[LongTensor[B, T], ...] or "
                "warmup_steps >= 1 so that training batches of the warm-up window are used."
            )
        self.recovery = lora_config(recovery, what="recovery") if recovery is not None else None
        self.recovery_train_norms = bool(recovery_train_norms)
        self.distill = distill_config(distill)
        self._distiller = Distiller(self.distill) if self.distill is not None else None
        self._teacher_skeleton: nn.Module | None = None  # resume: a copy of the model before the checkpoint's cut
        self._teacher_dtype: torch.dtype | None = None
        self._warned_unmixed = False
        self._fitting = False
        if self.recovery is not None and adam_part(saliency) is not None and len(self.schedule.events) > 1:
            raise ValueError(
                f"recovery= freezes the base weights at the first prune, so saliency={saliency!r} (read from their "
                "Adam state) has nothing to read for the later events of the schedule. Use saliency='functional' "
                "for an iterative schedule with LoRA recovery, or a single prune."
            )
        if not (isinstance(num_calibration_batches, int) and num_calibration_batches >= 1):
            raise ValueError(f"num_calibration_batches={num_calibration_batches!r} must be an integer >= 1.")
        check_num_sampled_batches(num_sampled_batches)
        if num_sampled_batches is not None and saliency not in SELF_SAMPLING_ESTIMATORS:
            raise ValueError(
                f"num_sampled_batches={num_sampled_batches} sets how much text saliency='fisher_functional_self' "
                f"samples; saliency={saliency!r} samples none. Drop num_sampled_batches, or use "
                "saliency='fisher_functional_self'."
            )
        self.saliency = saliency
        self.gamma = gamma
        self.selector = calibration if isinstance(calibration, CalibrationSelector) else None
        self.calibration = list(calibration) if calibration is not None and self.selector is None else None
        self.gamma_auto = gamma == "auto"
        self.gamma_grid = tuple(gamma_grid)
        self.num_calibration_batches = num_calibration_batches
        self.num_sampled_batches = num_sampled_batches
        self.scoring_stages = scoring_stages
        self.compensate = compensate
        self.compensation_damping = float(compensation_damping)
        self.model_attr = model_attr
        self.seed = seed
        self.report_dir = Path(report_dir) if report_dir is not None else None

        self._model: nn.Module | None = None
        # the model of this stage, which a checkpoint loads into: another than _model in a validate/test/predict of
        # another module after a fit
        self._loads_into: nn.Module | None = None
        self._reference: DenseReference | None = None
        # Adam-state accumulators: the configured estimator, or all of them when a selector
        # chooses among their plans by KL.
        kinds = ADAM_ESTIMATORS if self.selector is not None and saliency in ADAM_ESTIMATORS else (adam_part(saliency),)
        self._adam = {kind: AdamStateSaliency(kind) for kind in kinds if kind is not None}
        self._collected: deque[dict[str, torch.Tensor]] = deque(maxlen=num_calibration_batches)
        # tokens routed to each expert during the warm-up window (mixture-of-experts models)
        self._router_load = RouterLoad()
        self._counts_routing = False
        self._records: list[PruneRecord] = []
        self._last_step = -1
        self._report_dir: Path | None = None
        self._report_path: Path | None = None
        self._load_hook: Any = None
        self._warned_stride = False
        self._is_global_zero = True

    @property
    def state_key(self) -> str:
        # (the saliency and the schedule in the key: a checkpoint of another configuration is not loaded silently)
        return self._generate_state_key(
            saliency=self.saliency, schedule=[(e.step, e.sparsity) for e in self.schedule.events]
        )

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("the callback has not been set up by a Trainer yet.")
        return self._model

    @property
    def plans(self) -> list[PruningPlan]:
        return [r.plan for r in self._records]

    @property
    def records(self) -> list[PruneRecord]:
        """Every prune event so far: its plan and the parameter counts measured after surgery."""
        return list(self._records)

    @property
    def report_path(self) -> Path | None:
        return self._report_path

    @property
    def pending_events(self) -> list[PruneEvent]:
        """The events of the schedule that have not happened (yet, or at all when the fit has ended)."""
        return [e for e in self.schedule.events if not self._done(e)]

    def event_due(self, step: int) -> PruneEvent | None:
        """The event that prunes at the optimizer-step boundary ``step`` (the first pending one at or before it).

        A boundary may step past ``prune_at`` (manual optimization with several optimizers advances
        ``global_step`` by one per optimizer): the event then happens at the first boundary after it.
        """
        return next((e for e in self.pending_events if e.step <= step), None)

    def save_pretrained(self, directory: str | Path, allow_unpruned: bool = False, **kwargs: Any) -> Path:
        """Write the (pruned) model so that transformers can load it; see :func:`nirvana_pl.save_pruned`.

        Refuses a model that no prune event has touched (the fit ended before ``prune_at``), unless
        ``allow_unpruned=True``; warns when some events of a schedule did not happen. In a multi-process
        fit only global rank 0 writes (the others return the path at once), so it may be called on every
        rank or on rank 0 alone.
        """
        from .export import save_pruned

        pending = self.pending_events
        if not self._is_global_zero:  # every rank of a DDP run may call this: rank 0 writes, the others do not
            return Path(directory)
        if pending and not self._records and not allow_unpruned:
            raise RuntimeError(
                f"NirvanaPruningCallback.save_pretrained({str(directory)!r}): nothing was pruned, the model is dense "
                f"({_describe_pending(pending, self._last_step)}). Prune earlier (prune_at=) or train longer, or pass "
                "allow_unpruned=True to save the dense model anyway."
            )
        if pending and self._records:
            rank_zero_warn(f"NirvanaPruningCallback.save_pretrained: {_describe_pending(pending, self._last_step)}.")
        return save_pruned(self.model, directory, **kwargs)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._refuse_other_instances(trainer)
        self._fitting = stage == "fit"
        self._is_global_zero = trainer.is_global_zero
        model = self._locate_model(pl_module)
        # validate/test/predict of another module after a fit: the fit's model and records stay what cb.model and
        # cb.save_pretrained see, and a checkpoint only gives the other module its shapes
        self._loads_into = model
        if self._fitting or self._model is None:
            self._model = model
        if self._fitting and trainer.global_step == 0:
            self._begin_fit()
        # validate/test/predict with ckpt_path= also need the pruned shapes before the weights load
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._reshape_before_load)
        self._alloc = list(self._configured_alloc)
        if is_deepspeed(trainer.strategy):
            # what DeepSpeed cannot take is refused in every stage (a checkpoint load reshapes the model too)
            self._alloc = deepspeed_allocations(trainer.strategy, model, self._configured_alloc, self.recovery)
            # a pruned DeepSpeed checkpoint needs an engine of its shapes
            install_resume_reshape(trainer.strategy, self._reshape_before_load)
        self._teacher_dtype = teacher_dtype(trainer.precision)
        if stage != "fit":
            return
        if self._distiller is not None:
            self._check_distill(trainer)
            self._distiller.attach(self._model, architecture_of(self._model).body_and_head)
        if not isinstance(trainer.strategy, SingleDeviceStrategy):
            # DDP and DeepSpeed ZeRO are supported (ZeRO-3 with adam_* saliency); FSDP is refused
            check_strategy(trainer.strategy, self.saliency, runs_model=self.selector is not None or self.gamma_auto,
                           compensates=self.compensate)  # fmt: skip
        self._check_recovery()
        if self._reference is None:
            self._reference = DenseReference.of(self._model)
        self._counts_routing = RouterLoad.applies_to(self._model)
        self._check_schedule_feasible()
        self._check_calibration()
        if trainer.is_global_zero:  # (measured on rank 0 alone: no collective)
            on_cpu = trainer.strategy.root_device.type == "cpu"
            if slow := slow_bf16_message(trainer.precision, on_cpu, "NirvanaPruningCallback"):
                rank_zero_warn(slow)

    def _begin_fit(self) -> None:
        """A fit from step 0 (a checkpoint it resumes from restores its own state after this) drops what an earlier
        fit with this callback object left: its Adam-state scores, warm-up batches and step count; and, unless the
        model has the shapes its last prune left (a new fit of the model it pruned, which prunes nothing twice), its
        prune records, dense reference and teacher: a new run. Its one-time warnings may come again."""
        self._reset_window()
        self._last_step = -1
        self._warned_stride = self._warned_unmixed = False
        if self._model_has_last_plan():
            return
        self._records.clear()
        self._reference = None
        self._report_path = None
        if self._distiller is not None:
            self._distiller.detach()
            self._distiller = Distiller(self.distill)

    def _reset_window(self) -> None:
        """Empty what a warm-up window gathers: the Adam-state scores, the routed-token counts and the batches."""
        for accumulator in self._adam.values():
            accumulator.reset()
        self._router_load.reset()
        self._collected.clear()

    def _model_has_last_plan(self) -> bool:
        """Whether the model has the widths this callback's latest prune left (False before any prune)."""
        return bool(self._records) and self._last_plan_widths() == self._model_widths()

    def _last_plan_widths(self) -> list[tuple[int, int]]:
        return [(len(layer.kept_kv_groups), len(layer.kept_mlp_channels)) for layer in self._records[-1].plan.layers]

    def _model_widths(self) -> list[tuple[int, int]]:
        return [(u.num_kv_groups, u.mlp_width) for u in find_units(self.model)]

    def _refuse_other_instances(self, trainer: pl.Trainer) -> None:
        """Two callbacks would each plan against shapes the other has already cut."""
        others = [cb for cb in trainer.callbacks if isinstance(cb, NirvanaPruningCallback) and cb is not self]
        if others:
            steps = sorted(e.step for cb in [self, *others] for e in cb.schedule.events)
            raise ValueError(
                f"the Trainer has {len(others) + 1} NirvanaPruningCallback instances (prune steps {steps}); each would "
                "plan against shapes another has already cut, and a checkpoint could not be resumed. Use one callback "
                "with a schedule: NirvanaPruningCallback(schedule={4: 0.3, 8: 0.5}) prunes to 30 % at step 4 and to "
                "50 % at step 8 (targets are fractions of the dense model)."
            )

    def _locate_model(self, pl_module: pl.LightningModule) -> nn.Module:
        """The transformers model inside ``pl_module``; says why when it is built too late to be found."""
        try:
            return locate_model(pl_module, self.model_attr)
        except UnsupportedModelError as exc:
            if is_overridden("configure_model", pl_module, pl.LightningModule):
                raise UnsupportedModelError(
                    f"{exc} {type(pl_module).__name__} builds its layers in configure_model(), which Lightning calls "
                    "after callbacks are set up (e.g. for DeepSpeed ZeRO-3's zero.Init); NirvanaPruningCallback needs "
                    "the model built in __init__."
                ) from exc
            raise

    def _check_recovery(self) -> None:
        """recovery= attaches LoRA adapters at the prune: the model must have none yet, and the targets it names."""
        if (self.recovery is not None or has_lora(self._model)) and not architecture_of(self._model).lora:
            mtype = base_model_type(self._model.config)
            raise ValueError(
                f"NirvanaPruningCallback: LoRA ({'recovery=' if self.recovery is not None else 'a peft model'}) is not "
                f"supported for {mtype!r} models yet; recover with full fine-tuning (drop recovery=), or merge the "
                "adapters first (model.merge_and_unload())."
            )
        if self.recovery is None:
            return
        if has_lora(self._model):
            raise ValueError(
                "NirvanaPruningCallback(recovery=...) attaches LoRA adapters after the prune, but the model "
                "already carries LoRA adapters; drop recovery= or start from the plain model."
            )
        check_recovery_targets(self._model, self.recovery)

    def _check_distill(self, trainer: pl.Trainer) -> None:
        if is_deepspeed(trainer.strategy) and zero_stage(trainer.strategy) == 3:
            raise ValueError(
                "NirvanaPruningCallback(distill=...) is not supported under DeepSpeed ZeRO-3: the teacher would be a "
                "second model outside the engine, whole on every rank, which is what ZeRO-3 exists to avoid. Use "
                "ZeRO stage 1 or 2 (the teacher is replicated, outside the optimizer), or drop distill=."
            )

    def _check_schedule_feasible(self) -> None:
        """Every event's target must be reachable on this model's shapes (with every gamma that may be chosen)."""
        for event, alloc in zip(self.schedule.events, self._alloc):
            check_router_loss(self._model, alloc)
            gammas = self.gamma_grid if self.gamma_auto else [alloc.gamma]
            check_feasible(
                self._reference, event.sparsity, gammas, alloc.min_kv_groups, f" (prune at step {event.step})",
                min_mlp_channels=alloc.min_mlp_channels, mlp_round_to=alloc.mlp_round_to,
            )

    def _check_calibration(self) -> None:
        """Validate given calibration batches; warn when fewer training batches can be collected than asked."""
        if self.calibration is not None:
            self.calibration = check_calibration(self._model, self.calibration)
        if self.saliency in SELF_SAMPLING_ESTIMATORS and not architecture_of(self._model).generates:
            raise ValueError(
                f"saliency={self.saliency!r} scores windows the model samples itself, which "
                f"{type(self._model).__name__} (not a decoder-only language model) cannot write; use "
                "saliency='fisher_functional' for this model."
            )
        collects = self._collects_batches
        if collects and self.num_calibration_batches > self.schedule.events[0].warmup_steps:
            rank_zero_warn(
                f"NirvanaPruningCallback: num_calibration_batches={self.num_calibration_batches} but one training "
                f"batch is kept per optimizer step of the warm-up window (warmup_steps="
                f"{self.schedule.events[0].warmup_steps}); at most that many are used. Raise warmup_steps or pass "
                "calibration=[...]."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        if self._distiller is not None:
            self._distiller.detach()
        self._teacher_skeleton = None

    def _reshape_before_load(
        self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any, materialize: Any = None
    ) -> None:
        """Give a freshly built dense model the pruned shapes (and recovery adapters) of the checkpoint before it loads.

        ``materialize``: see :func:`nirvana_pl.surgery.apply_plan` (DeepSpeed ZeRO-3 passes one).
        """
        model = self._loads_into
        skeleton = None
        if self._distiller is not None and self._fitting and not self._records:
            # a checkpoint written while distilling holds the teacher's weights but not its module: keep a copy of
            # the dense model as it is built now, to load them into (see load_state_dict)
            skeleton = make_teacher(model, self._teacher_dtype)
            widths = architecture_of(model).widths(model)
        try:
            held = resize_from_state_dict(model, module, state_dict, prefix, materialize)
        except PlanMismatchError as exc:
            if model is not self._model or not self._model_has_last_plan():
                raise
            raise PlanMismatchError(
                f"{exc} This model was pruned at step {self._records[-1].at_step}; a checkpoint saved before that "
                "(ckpt_path='best' may pick one) loads into a newly built dense module instead, e.g. "
                "trainer.fit/validate/test(MyModule(), ckpt_path=...): the callback gives it the checkpoint's shapes."
            ) from exc
        if skeleton is not None and held and architecture_of(model).widths(model) != widths:
            self._teacher_skeleton = skeleton
        # (not a full model state dict: shapes left alone; a family without LoRA support has no adapters to restore)
        if not held or not architecture_of(model).lora:
            return
        saved_adapters = any(".lora_A." in key for key in state_dict if key.startswith(prefix))
        if saved_adapters and self.recovery is not None and not has_lora(model):
            attach_recovery_adapters(model, self.recovery, self.recovery_train_norms)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming after a LoRA recovery began: the optimizers were just built over every weight; make
        # them step the adapters only, before their saved state is loaded into them.
        if self.recovery is not None and has_lora(self.model):
            self._retarget_optimizers(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank agrees on the folder now, so that the prune event writes on rank 0 with no collective
        self._report_dir = self.report_dir or run_directory(trainer)
        pending = self.pending_events
        if self._adam and not is_deepspeed(trainer.strategy) and pending:
            check_adam_optimizers(self.model, trainer.optimizers, self.saliency)
        # (batches, not global steps, under manual optimization; -1 or inf when Lightning cannot know)
        total = trainer.estimated_stepping_batches
        known = pl_module.automatic_optimization and 0 < total < float("inf")
        late = [e.step for e in pending if known and e.step > total]
        if late:
            rank_zero_warn(
                f"NirvanaPruningCallback: this fit makes about {int(total)} optimizer steps "
                f"(max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs}), so the prune at "
                f"step{'s' if len(late) > 1 else ''} "
                f"{', '.join(map(str, late))} will not happen and the model would stay "
                f"{'dense' if len(late) == len(self.schedule.events) else 'less pruned than scheduled'}. "
                "Lower prune_at (or the schedule's steps), or raise max_steps / max_epochs."
            )

    # ------------------------------------------------------------------ training
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._distiller is not None:
            self._distiller.active = True  # the forwards of this training step are distilled (after a prune)
        upcoming = next(iter(self.pending_events), None)
        if self._counts_routing and upcoming is not None and trainer.global_step + 1 >= upcoming.warmup_start:
            self._router_load.attach(self.model)  # the training forwards of the warm-up window only

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._distiller is not None:
            self._distiller.active = False
        self._router_load.detach()
        step = trainer.global_step
        if step == self._last_step:  # still accumulating gradients: not an optimizer-step boundary
            return
        if self._last_step >= 0 and step - self._last_step > 1 and not self._warned_stride:
            self._warned_stride = True
            rank_zero_warn(
                f"NirvanaPruningCallback: trainer.global_step went from {self._last_step} to {step} in one batch "
                "(manual optimization with several optimizers counts each optimizer's step, as max_steps does). "
                "prune_at and warmup_steps count these steps too: each event prunes at the first batch that reaches "
                "its step, with saliency from the batches whose steps fall in its warm-up window."
            )
        self._last_step = step
        upcoming = next(iter(self.pending_events), None)
        if upcoming is not None and step >= upcoming.warmup_start:
            if self._adam:
                # every kind in one pass: each weight's state is read once (a set of collectives under ZeRO)
                reader = reader_for(trainer.strategy, trainer.optimizers)
                accumulate_adam_saliency(list(self._adam.values()), self.model, trainer.optimizers, reader)
            if self._collects_batches:
                self._collected.append(_input_ids_of(batch))
        event = self.event_due(step)
        if event is not None:
            self._prune(trainer, pl_module, event)
        if self._distiller is not None:
            self._log_distillation(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = self.pending_events
        if not pending:
            return
        # loud, in the report, and in save_pretrained: a fit that ends unpruned must not pass for a pruned one
        message = f"NirvanaPruningCallback: {_describe_pending(pending, trainer.global_step)}."
        if not self._records:
            message += " The model is DENSE: nothing was pruned."
        rank_zero_warn(message + " Lower prune_at (or the schedule's steps), or raise max_steps / max_epochs.")
        if trainer.is_global_zero and self._report_dir is not None:
            self._report_path = write_report(self._report_dir, self._records, self._reference, pending=pending)

    def distilled_loss(self, loss: torch.Tensor, outputs: Any) -> torch.Tensor:
        """The loss to return from ``training_step`` when the LightningModule computes its own ``loss``.

        ``outputs``: what the model returned in this step. Before the prune, and without ``distill=``, it is
        ``loss`` itself; afterwards ``(1 - weight) * loss + weight * T^2 * KL(teacher || student)``. Not needed
        when ``training_step`` returns ``outputs.loss`` of a call with ``labels``: that loss is mixed already.
        """
        return loss if self._distiller is None else self._distiller.mix(loss, outputs)

    def _log_distillation(self, pl_module: pl.LightningModule) -> None:
        """Log the distillation numbers of the batch; warn once when the module's loss was not mixed."""
        distiller = self._distiller
        for name, value in distiller.pop_metrics().items():
            pl_module.log(f"nirvana/{name}", value, on_step=True, on_epoch=False, batch_size=1)
        if distiller.unmixed_forwards and not distiller.mixed_by_call and not self._warned_unmixed:
            self._warned_unmixed = True
            rank_zero_warn(
                "NirvanaPruningCallback(distill=...): the model's training forward returned no loss (it was called "
                "without labels), so the distillation term was computed but not trained on. Return "
                "`callback.distilled_loss(loss, outputs)` from training_step, or call the model with labels= and "
                "return outputs.loss."
            )

    @property
    def _collects_batches(self) -> bool:
        """Whether the warm-up window's training batches are kept as the calibration batches of the event."""
        wanted = needs_calibration(self.saliency) or self.compensate
        return wanted and self.calibration is None and self.selector is None

    def _done(self, event: PruneEvent) -> bool:
        return any(r.event_step == event.step for r in self._records)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruneEvent) -> None:
        start = time.perf_counter()
        model = self.model
        total_before = base_parameter_count(model)
        index = self.schedule.events.index(event)
        batches = self._calibration_batches()
        sampled = self._sampled_windows(trainer, index, batches)
        plan, selection = self._agreed_plan(trainer, index, batches, sampled)
        compensation = self._compensation(trainer, plan, batches, sampled)
        if self._distiller is not None and self._distiller.wants_new_teacher():
            self._distiller.set_teacher(make_teacher(model, self._teacher_dtype))  # the model before the cut
        self._cut(trainer, pl_module, plan, compensation)
        seconds = time.perf_counter() - start
        record = PruneRecord(
            event_step=event.step,
            at_step=trainer.global_step,
            plan=plan,
            total_params_before=total_before,
            total_params_after=base_parameter_count(model),  # recovery adapters are not the model's size
            prunable_params_after=prunable_parameter_count(model),
            seconds=seconds,
            caveat=architecture_of(model).caveat,
            distill=self.distill.to_dict() if self.distill is not None else None,
        )
        self._records.append(record)
        self._reset_window()

        self._log_event(trainer, pl_module, self._event_metrics(pl_module, record, selection))
        if trainer.is_global_zero:  # (no collective in here: the folder was agreed in on_train_start)
            self._write_event_report(record, selection)

    def _sampled_windows(
        self, trainer: pl.Trainer, index: int, batches: list[Any] | None
    ) -> list[dict[str, torch.Tensor]] | None:
        """The windows the self-sampling saliency samples from the model before event ``index`` (shaped like the
        calibration ``batches``), which its first scoring and the compensation both read; None for the others
        (and without batches, which the scoring then refuses with the fix)."""
        if self.saliency not in SELF_SAMPLING_ESTIMATORS or not batches:
            return None
        with trainer.precision_plugin.forward_context():
            return self_sampled_windows(
                self.model, batches, self.seed + index, trainer.global_rank, self.num_sampled_batches,
                progress=trainer.is_global_zero,
            )

    def _agreed_plan(
        self, trainer: pl.Trainer, index: int, batches: list[Any] | None, sampled: list[Any] | None
    ) -> tuple[PruningPlan, dict[str, Any] | None]:
        """The plan of event ``index`` that every rank applies (rank 0's), and its KL selection summary if any;
        ``batches``, ``sampled``: the event's calibration batches and sampled windows."""
        calibration: Any = self.selector or batches
        optimizer_scores = {kind: acc.scores() for kind, acc in self._adam.items()}
        expert_load = None
        if self._counts_routing:  # (a collective: every rank, every event)
            self._router_load.reduce(sum_over_processes)
            expert_load = self._router_load.loads()
        # Every rank computes (gradient saliency all-reduces the signed gradients across ranks,
        # so all ranks must take part); rank 0's plan is then the one every rank applies.
        with trainer.precision_plugin.forward_context(), gradient_reduce(gradient_reduce_hook()):
            plan, selection = make_plan(
                self.model, self.saliency, self._alloc[index], self._reference, calibration=calibration,
                gamma_auto=self.gamma_auto, gamma_grid=self.gamma_grid, optimizer_scores=optimizer_scores or None,
                expert_load=expert_load, seed=self.seed + index, rank=trainer.global_rank,
                num_sampled_batches=self.num_sampled_batches, sampled=sampled, scoring_stages=self.scoring_stages,
                progress=trainer.is_global_zero,
            )
        plan, agreed = agree_on_plan(plan)
        if selection is not None:  # rank 0's summary travels inside its plan
            selection = plan.score_summary.get("selection", selection)
        if not agreed:
            warnings.warn(
                f"NirvanaPruningCallback: rank {trainer.global_rank}'s own plan differed from rank 0's "
                "(numerical noise in the scores); every rank applies rank 0's plan.",
                stacklevel=3,
            )
        check_same_plan(plan)
        return plan, selection

    def _calibration_batches(self) -> list[dict[str, torch.Tensor]] | None:
        """The event's calibration batches, normalised for the sampling and the compensation's fit: the given ones,
        else those collected in the warm-up window; None or empty when there are none (the scoring and the
        compensation then refuse with the fix)."""
        batches = list(self._collected) if self._collects_batches else self.calibration
        return check_calibration(self.model, batches) if batches else batches

    def _compensation(
        self, trainer: pl.Trainer, plan: PruningPlan, batches: list[Any] | None, sampled: list[Any] | None
    ) -> Compensation | None:
        """The column updates of ``plan`` (see ``compensate``), fitted on the event's calibration ``batches`` and
        ``sampled`` windows, the same on every rank (the Gram matrices are averaged over the ranks' batches: a
        collective), or None when compensation is off."""
        if not self.compensate or not compensates_anything(self.model, plan):
            return None
        fit_on = list(batches or []) + list(sampled or [])
        with trainer.precision_plugin.forward_context():
            compensation = plan_compensation(
                self.model, plan, fit_on, self.compensation_damping, reduce=gradient_reduce_hook()
            )
        plan.score_summary["compensation"] = compensation.summary()
        return compensation

    def _cut(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: PruningPlan, compensation: Compensation | None
    ) -> None:
        """Compensate and apply ``plan`` through the strategy, then attach recovery adapters and rewrap DDP."""
        model = self.model
        if is_deepspeed(trainer.strategy):  # shrinks the modules and rebuilds the engine
            prune_engine(trainer.strategy, model, plan, compensation)
        else:
            if compensation is not None:
                compensation.apply_()
            apply_plan(model, plan, trainer.optimizers)
        self._reference.attach(model)
        if self.recovery is not None and not has_lora(model):
            attach_recovery_adapters(model, self.recovery, self.recovery_train_norms)
            self._retarget_optimizers(trainer, pl_module)
        rewrap_ddp(trainer.strategy)

    def _event_metrics(
        self, pl_module: pl.LightningModule, record: PruneRecord, selection: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """What a prune event logs under ``nirvana/``: the record's counts, gamma, and the KL selection's numbers."""
        metrics = record.metrics(self._reference)
        metrics["gamma"] = record.plan.gamma
        metrics["trainable_params"] = sum(parameter_numel(p) for p in pl_module.parameters() if p.requires_grad)
        if selection is not None:
            metrics["calibration_kl"] = selection["kl"]
            for i, kl in enumerate(selection.get("candidate_kls", [])):
                metrics[f"candidate_kl_{i}"] = kl
            for g, kl in (selection.get("gamma_search") or {}).get("curve", {}).items():
                metrics[f"gamma_kl_{g}"] = kl
        return metrics

    @staticmethod
    def _log_event(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: Mapping[str, Any]) -> None:
        """Write an event's ``metrics`` under ``nirvana/`` to the loggers at this step, and to callback_metrics.

        Straight to the loggers, as LearningRateMonitor does: through ``self.log`` they would wait for Lightning's
        ``log_every_n_steps`` cadence, reach the loggers at a later step, or never when the epoch ends first.
        """
        logged = {f"nirvana/{name}": float(value) for name, value in metrics.items()}
        for name, value in logged.items():  # (for callbacks that monitor them; the loggers get them below)
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1, logger=False)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs this batch's metrics at
        for logger in trainer.loggers:  # (Lightning's loggers write on global rank 0 only)
            logger.log_metrics(logged, step=step)

    def _write_event_report(self, record: PruneRecord, selection: Mapping[str, Any] | None) -> None:
        self._report_path = write_report(self._report_dir, self._records, self._reference)
        message = format_summary(record, self._reference)
        if selection is not None:
            message += f"\n  KL selection: {_describe_selection(selection)}"
        rank_zero_info(message + f"\n  report: {self._report_path}")

    def _retarget_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        retarget_optimizers(trainer.optimizers, trainable, adapter_anchors(self.model))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "records": [r.to_dict() for r in self._records],
            "reference": self._reference.to_dict() if self._reference else None,
            "adam": {kind: acc.state_dict() for kind, acc in self._adam.items()},
            "last_step": self._last_step,
            "collected": list(self._collected),
            "router_load": self._router_load.state_dict(),
            **({"teacher": self._distiller.state_dict()} if self._distiller is not None else {}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._loads_into is not self._model:  # (a validate/test of another module after a fit: its state stays)
            return
        self._records = [PruneRecord.from_dict(r) for r in state_dict["records"]]
        if state_dict.get("reference"):
            self._reference = DenseReference(**state_dict["reference"])
        for kind, acc_state in (state_dict.get("adam") or {}).items():
            if kind in self._adam:
                self._adam[kind].load_state_dict(acc_state)
        self._last_step = state_dict.get("last_step", -1)
        self._collected.clear()
        self._collected.extend(state_dict.get("collected", []))
        self._router_load.load_state_dict(state_dict.get("router_load") or {})
        self._restore_teacher(state_dict.get("teacher"))
        if self._model is not None and self._records:
            expected, actual = self._last_plan_widths(), self._model_widths()
            if expected != actual:
                raise RuntimeError(
                    "the checkpoint's pruning record does not match the model's shapes after loading "
                    f"(expected {expected}, found {actual}); was the checkpoint written by another run?"
                )

    def _restore_teacher(self, teacher_state: Mapping[str, Any] | None) -> None:
        """Rebuild the teacher of a checkpoint written while distilling, in the copy taken before its weights loaded."""
        skeleton, self._teacher_skeleton = self._teacher_skeleton, None
        if self._distiller is None or not self._records:
            return
        if teacher_state is None:
            rank_zero_warn(
                "NirvanaPruningCallback(distill=...): the checkpoint was written without distillation, so it holds "
                "no teacher; recovery goes on with the plain loss. Start the fit from before the prune to distil."
            )
            return
        if skeleton is None:
            raise RuntimeError(
                "NirvanaPruningCallback could not rebuild the distillation teacher: the model's weights were loaded "
                "without passing through the callback. Resume with trainer.fit(..., ckpt_path=...)."
            )
        if self.distill.teacher == "previous":  # the model before the latest cut: the earlier cuts applied
            for record in self._records[:-1]:
                apply_plan(skeleton, record.plan)
        self._distiller.load_teacher(skeleton, teacher_state)


def _input_ids_of(batch: Any) -> dict[str, torch.Tensor]:
    """Token ids (and the padding mask, when the batch has one) of a training batch, on the CPU."""
    ids, mask = None, None
    if isinstance(batch, torch.Tensor):
        ids = batch
    elif isinstance(batch, Mapping):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        ids = batch[0]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(
            "NirvanaPruningCallback could not find token ids (a [batch, seq_len] tensor, a dict with "
            f"'input_ids', or a tuple starting with one) in the training batch ({type(batch).__name__}); "
            "pass calibration=[...] to the callback."
        )
    out = {"input_ids": ids.detach().to("cpu", copy=True)}
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        out["attention_mask"] = mask.detach().to("cpu", copy=True)
    if isinstance(batch, Mapping):  # encoder-decoder batches: the decoder side (dropped for decoder LLMs)
        for key in ("labels", "decoder_input_ids", "decoder_attention_mask"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == ids.shape[0]:
                out[key] = value.detach().to("cpu", copy=True)
    return out


def _describe_pending(pending: Sequence[PruneEvent], step: int) -> str:
    events = ", ".join(f"step {e.step} (sparsity {e.sparsity:g})" for e in pending)
    return (
        f"the fit stopped at optimizer step {max(step, 0)} before the prune "
        f"event{'s' if len(pending) > 1 else ''} at {events}"
    )


def _describe_selection(selection: Mapping[str, Any]) -> str:
    parts = []
    if selection.get("candidate_kls"):
        names = selection.get("candidates") or [f"#{i}" for i in range(len(selection["candidate_kls"]))]
        kls = ", ".join(f"{n}: {k:.4g}" for n, k in zip(names, selection["candidate_kls"]))
        parts.append(f"candidate KLs {{{kls}}} -> {names[selection['best_index']]} ({selection.get('mode', 'sets')})")
    search = selection.get("gamma_search")
    if search:
        curve = ", ".join(f"{g}: {k:.4g}" for g, k in search["curve"].items())
        parts.append(f"gamma curve {{{curve}}} -> gamma={search['best_gamma']}")
    parts.append(f"KL {selection['kl']:.4g}")
    return "; ".join(parts)


def _accept_selector_subclasses_in_configs() -> None:
    """Let LightningCLI configs give ``calibration: {class_path: <a CalibrationSelector subclass>}``.

    jsonargparse accepts only a dataclass itself unless told otherwise; the setting is additive and
    global, and it must be in place before a parser reads this class's signature, i.e. at import.
    """
    try:
        from jsonargparse import set_parsing_settings
    except ImportError:  # configs are not used without jsonargparse
        return
    set_parsing_settings(subclasses_enabled=[CalibrationSelector])


_accept_selector_subclasses_in_configs()
