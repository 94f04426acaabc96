"""When to prune and to which target (fractions of the original dense model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class PruneEvent:
    """Prune after optimizer step ``step`` to ``sparsity``; score over steps (step-warmup, step]."""

    step: int
    sparsity: float
    warmup_steps: int

    @property
    def warmup_start(self) -> int:
        """First optimizer step (1-based, as ``trainer.global_step`` after it) of the window."""
        return self.step - self.warmup_steps + 1


@dataclass(frozen=True)
class PruningSchedule:
    events: tuple[PruneEvent, ...]

    @classmethod
    def build(
        cls,
        sparsity: float | None,
        prune_at: int | None,
        schedule: Mapping[int, float] | None,
        warmup_steps: int,
    ) -> "PruningSchedule":
        """Validate the callback's arguments and return the schedule, or raise naming the fix."""
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps={warmup_steps!r} must be an integer >= 0.")
        events, prev_step, prev_target = [], 0, 0.0
        for step, target in _steps_and_targets(sparsity, prune_at, schedule):
            _check_event(step, target, warmup_steps, prev_step, prev_target)
            events.append(PruneEvent(step=step, sparsity=float(target), warmup_steps=warmup_steps))
            prev_step, prev_target = step, target
        return cls(tuple(events))

    @property
    def last_step(self) -> int:
        return self.events[-1].step


def _steps_and_targets(
    sparsity: float | None, prune_at: int | None, schedule: Mapping[int, float] | None
) -> list[tuple[int, float]]:
    """(step, target) pairs in step order, from either ``schedule`` or ``sparsity`` with ``prune_at``."""
    if schedule is not None:
        if sparsity is not None or prune_at is not None:
            raise ValueError(
                "pass either schedule={step: sparsity, ...} or sparsity= with prune_at=, not both."
            )
        if not isinstance(schedule, Mapping) or not schedule:
            raise ValueError(f"schedule={schedule!r} must be a non-empty dict {{step: target_sparsity}}.")
        return sorted((int(k), v) for k, v in schedule.items())
    if sparsity is None or prune_at is None:
        raise ValueError(
            "NirvanaPruningCallback needs sparsity= and prune_at= (or schedule={step: sparsity}); "
            f"got sparsity={sparsity!r}, prune_at={prune_at!r}."
        )
    return [(prune_at, sparsity)]


def _check_event(step: Any, target: Any, warmup_steps: int, prev_step: int, prev_target: float) -> None:
    """One event's step and target, and its warm-up window against the event before it (step 0: none)."""
    if not (isinstance(step, int) and step >= 1):
        raise ValueError(f"prune_at={step!r}: prune steps count optimizer steps and must be >= 1.")
    if not (isinstance(target, (int, float)) and 0.0 <= target < 1.0):
        raise ValueError(f"sparsity={target!r} (prune at step {step}) must be in [0, 1).")
    if target < prev_target:
        raise ValueError(
            f"schedule targets must not decrease (targets are fractions of the original dense model): "
            f"{prev_target} then {target} at step {step}."
        )
    if step - warmup_steps < prev_step:
        where = "the start of training" if prev_step == 0 else f"the previous prune at step {prev_step}"
        raise ValueError(
            f"prune_at={step} with warmup_steps={warmup_steps}: the warm-up window would start before "
            f"{where}. Use warmup_steps <= {step - prev_step} or prune later."
        )
