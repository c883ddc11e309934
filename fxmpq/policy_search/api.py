"""search(), pareto() and check_feasible(): the provably optimal bit-width policy within a budget, and sweeps."""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..cost.budget import Budget
from ..errors import ArgumentError, BudgetError, InfeasibleBudget, SolverError
from .indicators import Cleaning, Indicators
from .problem import Problem, infeasible_budget
from .results import ParetoResult, SearchResult, SearchStatus
from .solve import Solver

if TYPE_CHECKING:
    from ..cost.analysis import Analysis

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIME_LIMIT", "ParetoResult", "SearchResult", "SearchStatus", "check_feasible", "pareto", "ranked",
           "search", "solve_problem"]

DEFAULT_TIME_LIMIT = 60.0  # seconds per solve; real networks prove their optimum in milliseconds (docs/RESULTS.md)


def search(
    analysis: Analysis,
    indicators: Indicators,
    budget: Budget | str | Mapping[str, float],
    alpha: float = 2.0,
    *,
    weight_only: bool = False,
    clean: Cleaning | str = Cleaning.PAPER,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> SearchResult:
    """The policy minimising `sum_l I_act[l][a] + alpha * I_w[l][w]` within `budget`, proven optimal.

    Candidate (w, a) pairs are the hardware's pairs restricted to the indicators' bits; pinned layers stay at
    their pins. `clean=Cleaning.PAPER` ("paper") prices a bit-width whose step size is smaller than the next
    higher one's prohibitively (a large finite price); `Cleaning.ISOTONIC` ("isotonic") repairs the indicators to
    be monotone instead. `weight_only` ignores activation indicators (each weight bit-width runs with the widest
    activation bits the hardware pairs it with). With `hardware.share_input_quantizer`, layers reading one tensor
    share their activation bits. `time_limit` (seconds, default 60, None: none) bounds the whole solve; a policy
    found when it is hit has status FEASIBLE and its proven gap stated. The solve stops as soon as the incumbent
    meets the bound. Raises InfeasibleBudget (with the smallest achievable value of each limited
    metric), BudgetError (a malformed budget), IndicatorError (listing what the indicators lack) and
    ArgumentError (a bad alpha, clean or time_limit).
    """
    t0 = time.perf_counter()
    limits = Budget.coerce(budget).resolve(analysis)
    _check_time_limit(time_limit)
    prob = Problem.from_indicators(analysis, indicators, alpha, weight_only, clean)
    res, _ = solve_problem(prob, limits, time_limit)
    return replace(res, solve_time=time.perf_counter() - t0 - prob.build_time, build_time=prob.build_time)


def ranked(
    analysis: Analysis,
    indicators: Indicators,
    budget: Budget | str | Mapping[str, float],
    count: int,
    alpha: float = 2.0,
    *,
    weight_only: bool = False,
    clean: Cleaning | str = Cleaning.PAPER,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> tuple[SearchResult, ...]:
    """The `count` best distinct policies within `budget`, in order of objective: the optimum, then the next-best.

    The k-th is the optimum once the k-1 before it are excluded by no-good cuts (rows of the same solver, so each
    is proven: no policy but the earlier ones is better). Fewer come back when fewer policies fit. Exact over the
    problem's choices: layers that choose together (a shared input quantizer, chain terms) choose among their
    Pareto-minimal combinations, so a combination worse in the objective and every cost than another is never
    ranked. Arguments and errors as in `search`, and ArgumentError for a `count` below 1.
    """
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ArgumentError(f"count must be an integer >= 1, found {count!r}")
    limits = Budget.coerce(budget).resolve(analysis)
    _check_time_limit(time_limit)
    prob = Problem.from_indicators(analysis, indicators, alpha, weight_only, clean)
    found: list[SearchResult] = []
    sels: list[np.ndarray] = []
    for _ in range(int(count)):
        try:
            res, sel = solve_problem(prob, limits, time_limit, exclude=sels)
        except InfeasibleBudget:
            if not sels:
                raise
            break  # every policy within the budget is ranked
        found.append(res)
        sels.append(sel)
    return tuple(found)


def pareto(
    analysis: Analysis,
    indicators: Indicators,
    metric: str = "bitops",
    points: int = 50,
    *,
    alpha: float = 2.0,
    low: float | None = None,
    high: float | None = None,
    budget: Budget | str | Mapping[str, float] | None = None,
    weight_only: bool = False,
    clean: Cleaning | str = Cleaning.PAPER,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> ParetoResult:
    """Optimal policies for `points` limits on `metric` from `low` to `high` (ascending), other limits from `budget`.

    By default the range runs from the smallest achievable `metric` to its value at the unconstrained optimum.
    The prepared arrays are built once; each solve starts from the previous (tighter) optimum.
    """
    if metric not in analysis.hardware.metrics:
        raise BudgetError(f"pareto metric {metric!r} is not a metric of hardware {analysis.hardware.name!r}; "
                          f"its metrics: {', '.join(analysis.hardware.metrics)}")
    if isinstance(points, bool) or not isinstance(points, numbers.Integral) or points < 1:
        raise ArgumentError(f"points must be an integer >= 1, found {points!r}")
    _check_time_limit(time_limit)
    base = Budget.coerce(budget).resolve(analysis) if budget is not None else {}
    prob = Problem.from_indicators(analysis, indicators, alpha, weight_only, clean)
    k = prob.metrics.index(metric)
    if low is None:
        low = float(prob.min_totals(prob.unpriced_cols)[k])
    if high is None:
        free, _ = solve_problem(prob, {m: v for m, v in base.items() if m != metric}, time_limit)
        high = float(free.totals[metric])
    budgets = tuple(float(x) for x in np.linspace(low, max(high, low), int(points)))
    results, start = [], None
    for b in budgets:
        limits = dict(base)
        limits[metric] = min(b, base.get(metric, math.inf))
        res, start = solve_problem(prob, limits, time_limit, start)
        results.append(res)
    return ParetoResult(metric, budgets, tuple(results))


def check_feasible(
    analysis: Analysis,
    budget: Budget | str | Mapping[str, float],
    bits: Sequence[int] | None = None,
    *,
    weight_only: bool = False,
    time_limit: float | None = None,
) -> dict[str, float]:
    """The budget's limits resolved on `analysis` when some policy over `bits` meets them all (no indicators needed).

    Per limited metric, the smallest achievable total (each layer's or tied group's cheapest allowed pair plus the
    pinned layers' costs) is compared with its limit; when every limit is reachable alone and there are several, a
    zero-objective solve decides exactly whether all hold at once. Candidate pairs, pins and shared activation
    quantizers are those `search` uses with indicators over `bits` (None: every hardware pair). Raises
    InfeasibleBudget with the same message as `search`, BudgetError for a malformed budget.
    """
    limits = Budget.coerce(budget).resolve(analysis)
    _check_time_limit(time_limit)
    prob = Problem.costs_only(analysis, bits, weight_only=weight_only)
    kidx, lim = prob.limit_arrays(limits)
    cols = np.arange(len(prob.obj))
    if not _reachable(prob, cols, kidx, lim):
        raise infeasible_budget(limits, _smallest(prob, limits), jointly=False)
    if len(limits) > 1 and Solver(prob, cols, kidx, lim, time_limit).find_feasible() is None:
        raise infeasible_budget(limits, _smallest(prob, limits), jointly=True)
    return limits


# ---------------------------------------------------------------------------- internals
def _check_time_limit(time_limit: float | None) -> None:
    if time_limit is None:
        return
    if isinstance(time_limit, bool) or not isinstance(time_limit, int | float) or not time_limit > 0:
        raise ArgumentError(f"time_limit must be None or a positive number of seconds, found {time_limit!r}")


def _reachable(prob: Problem, cols: np.ndarray, kidx: list[int], lim: np.ndarray) -> bool:
    """Whether every limit alone is met by some choice among `cols` (the per-unit minima)."""
    return bool(np.all(prob.min_totals(cols)[kidx] <= lim + 1e-12 * np.abs(lim)))


def _smallest(prob: Problem, limits: Mapping[str, float]) -> dict[str, float]:
    mins = prob.min_totals()
    return {k: float(mins[prob.metrics.index(k)]) for k in limits}


def solve_problem(prob: Problem, limits: dict[str, float], time_limit: float | None = DEFAULT_TIME_LIMIT,
                  start: np.ndarray | None = None, *, exclude: Sequence[np.ndarray] = (),
                  allowed: np.ndarray | None = None) -> tuple[SearchResult, np.ndarray]:
    """The optimum of a built Problem within `limits` and its selection (one problem column per unit).

    Solved without prohibitively priced points when some policy fits so, else with them (they stay prices).
    `exclude` rules out selections (no-good cuts: the next-best policy once these are found); `allowed` (a boolean
    mask over the problem's columns) restricts the choices, e.g. to a neighbourhood of a uniform policy. Raises
    InfeasibleBudget when no allowed, unexcluded policy fits.
    """
    t0 = time.perf_counter()
    kidx, lim = prob.limit_arrays(limits)
    out = None
    every = np.arange(len(prob.obj)) if allowed is None else np.flatnonzero(allowed)
    unpriced = every[prob.priced[every] == 0]
    if len(np.unique(prob.col_unit[unpriced])) == len(prob.units) and _reachable(prob, unpriced, kidx, lim):
        out = Solver(prob, unpriced, kidx, lim, time_limit, exclude).run(start)
    if out is None:  # the budget forces prohibitively priced points
        if not _reachable(prob, every, kidx, lim):
            raise infeasible_budget(limits, _smallest(prob, limits), jointly=False)
        out = Solver(prob, every, kidx, lim, time_limit, exclude).run(start)
        if out is None:
            raise infeasible_budget(limits, _smallest(prob, limits), jointly=True)
    sel = out.sel
    policy, values = prob.policy(sel)
    objective = float(prob.obj[sel].sum())
    totals = prob.analysis.cost(policy)
    for k, v in limits.items():  # checked without trusting the solver
        if totals[k] > v * (1 + 1e-9) + 1e-9:
            raise SolverError(f"internal error: the solved policy exceeds {k} ({totals[k]:.6g} > {v:.6g})")
    gap = max(0.0, objective - out.bound) if np.isfinite(out.bound) else math.inf
    if out.status is SearchStatus.OPTIMAL and gap > 1e-9 * max(1.0, abs(objective)):
        out.status = SearchStatus.FEASIBLE
    rel = gap / max(abs(objective), 1e-300)
    elapsed = time.perf_counter() - t0
    res = SearchResult(policy=policy, objective=objective, totals=totals, limits=dict(limits), status=out.status,
                       gap=gap, rel_gap=rel, bound=out.bound, lp_bound=out.lp_bound, solve_time=elapsed,
                       build_time=prob.build_time, n_vars=len(prob.obj), n_vars_reduced=out.n_reduced,
                       n_vars_mip=out.n_mip, priced_points=int(prob.priced[sel].sum()), alpha=prob.alpha,
                       weight_only=prob.weight_only, layer_values=values)
    log.info("search: objective %.9g, status %s, gap %.3g, %.1f ms (%d -> %d -> %d vars)", objective, out.status,
             gap, elapsed * 1e3, res.n_vars, res.n_vars_reduced, res.n_vars_mip)
    return res, sel
