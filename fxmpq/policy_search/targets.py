"""Accuracy targets: `drop<=1%` (top-1 at most one percentage point below FP32), alone or with cost limits.

`parse_goal` reads what quantize()'s `budget` may be: a cost budget (fxmpq.Budget's forms) or a drop target joined
with cost limits by `&` ("drop<=1%", "drop<=0.5%&c8"). `check_goal` refuses, before any training, what such a
target cannot work with (no validation data, verification off, an unknown metric to minimise).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..cost.budget import Budget
from ..errors import ArgumentError, BudgetError, brief

if TYPE_CHECKING:
    from ..hardware.spec import HardwareSpec

__all__ = ["Goal", "check_goal", "parse_goal"]

_DROP = re.compile(r"^drop\b(?P<rest>.*)$", re.IGNORECASE | re.DOTALL)
_TARGET = re.compile(r"^<=\s*(?P<num>[^%\s]*)\s*(?P<pct>%?)$", re.DOTALL)
_HOW = "write it as drop<=X% (top-1 at most X percentage points below the FP32 model's), e.g. drop<=1%"


@dataclass(frozen=True)
class Goal:
    """What quantize() aims at: cost limits (`budget`, None for none) and, optionally, an accuracy target
    (`max_drop`, a fraction: 0.01 is one percentage point of top-1 below the FP32 model's)."""

    budget: Budget | None
    max_drop: float | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or str(self.budget)


def parse_goal(value: Budget | str | Mapping[str, float]) -> Goal:
    """`value` as a Goal: a Budget or a {metric: limit} dict as cost limits; a string's `&`-joined terms are cost
    terms (Budget.parse) and at most one `drop<=X%` term. BudgetError naming the term for a bad spelling (no %
    sign, another comparison, a number outside 0..100, two drop terms)."""
    if not isinstance(value, str):
        return Goal(Budget.coerce(value), None, "")
    drops, others = [], []
    for raw in value.split("&"):
        term = raw.strip()
        m = _DROP.match(term)
        (drops if m else others).append((term, m))
    if not drops:
        return Goal(Budget.parse(value), None, value)
    if len(drops) > 1:
        raise BudgetError(f"budget {brief(value)}: more than one drop target ({', '.join(t for t, _ in drops)}); "
                          f"give one")
    term, m = drops[0]
    rest = m["rest"].strip()
    t = _TARGET.match(rest)
    if t is None:
        raise BudgetError(f"budget {brief(value)}: cannot read {brief(term)}; {_HOW}")
    if not t["pct"]:
        raise BudgetError(f"budget {brief(value)}: {brief(term)} needs a % sign (the drop is in percentage points "
                          f"of top-1); {_HOW}")
    try:
        pct = float(t["num"])
    except ValueError:
        raise BudgetError(f"budget {brief(value)}: {brief(t['num'] or 'nothing')} in {brief(term)} is not a number "
                          f"of percentage points; {_HOW}") from None
    if not (math.isfinite(pct) and 0 <= pct <= 100):
        raise BudgetError(f"budget {brief(value)}: a top-1 drop of {t['num']} percentage points is impossible; give "
                          f"0 <= X <= 100 in drop<=X%")
    if any(not t for t, _ in others):
        raise BudgetError(f"budget {brief(value)}: an empty term next to an '&'")
    budget = Budget.parse(" & ".join(t for t, _ in others)) if others else None
    return Goal(budget, pct / 100.0, value)


def check_goal(goal: Goal, hardware: HardwareSpec, *, minimize: str | None, has_val: bool, verify: int) -> str | None:
    """Refuse, before any training, what `goal` cannot work with; the metric a drop target minimises (None
    without a target).

    ArgumentError: `minimize` without a drop target, a drop target without validation data or with verification
    off (`verify` 0); BudgetError: `minimize` not a metric of `hardware`.
    """
    if goal.max_drop is None:
        if minimize is not None:
            raise ArgumentError(f"minimize={minimize!r} goes with an accuracy target such as budget='drop<=1%' "
                                f"(the cheapest policy within it); budget {str(goal)!r} is a cost limit, under which "
                                f"the search minimises the indicators' objective")
        return None
    if minimize is not None and (not isinstance(minimize, str) or minimize not in hardware.metrics):
        raise BudgetError(f"minimize={brief(minimize)} is not a metric of hardware {hardware.name!r}; its metrics: "
                          f"{', '.join(hardware.metrics)}")
    if not has_val:
        raise ArgumentError(f"budget {str(goal)!r}: the drop is measured against the FP32 model's top-1 on "
                            f"validation data, and there is none; give val_data (held-out batches)")
    if not verify:
        raise ArgumentError(f"budget {str(goal)!r}: an accuracy target is met by measuring candidate policies on "
                            f"the validation data, which verify=0 turns off; give verify >= 1 (the Pareto points "
                            f"to measure)")
    return minimize if minimize is not None else next(iter(hardware.metrics))
