"""For the multi-process scripts: record whether each rank's own plan already equalled rank 0's."""

from __future__ import annotations

OWN_PLAN_MATCHED: list[bool] = []  # per prune event, on this rank


def record_plan_agreement() -> None:
    """Wrap the callback's ``agree_on_plan`` so that every call appends its ``agreed`` flag."""
    import nirvana_pl.callback as callback_module

    original = callback_module.agree_on_plan

    def agree_on_plan(plan, src=0):
        chosen, agreed = original(plan, src)
        OWN_PLAN_MATCHED.append(agreed)
        return chosen, agreed

    callback_module.agree_on_plan = agree_on_plan  # the name the callback calls


COMPENSATIONS: list = []  # per prune event that compensated, on this rank: the callback's Compensation


def record_compensations() -> None:
    """Wrap the callback's ``plan_compensation`` so that every call keeps the column updates it returned."""
    import nirvana_pl.callback as callback_module

    original = callback_module.plan_compensation

    def plan_compensation(*args, **kwargs):
        COMPENSATIONS.append(original(*args, **kwargs))
        return COMPENSATIONS[-1]

    callback_module.plan_compensation = plan_compensation
