"""Candidate policies to verify: optima at several alphas, the ILP's next-best, uniform and near-uniform policies.

The search's objective (summed learned step sizes, weighted by a hand-set alpha) is a proxy for accuracy; the joint
training leaves one model that runs any policy, so a few held-out batches can check the proxy before fine-tuning
(fxmpq.verify). This module builds the set of distinct policies within the budget that such a check measures, and
`CandidateSet`, what it reports (a table, JSON).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.jsonio import dump_json, read_json
from ..core.options import DEFAULT_COUNT
from ..core.tables import render
from ..cost.budget import Budget
from ..cost.policy import Policy
from ..errors import ArgumentError, InfeasibleBudget, PolicyError, brief
from .api import DEFAULT_TIME_LIMIT, pareto, solve_problem
from .indicators import Cleaning, Indicators
from .problem import Problem
from .results import SearchResult, SearchStatus

if TYPE_CHECKING:
    from ..cost.analysis import Analysis

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ALPHAS", "DEFAULT_COUNT", "Candidate", "CandidateSet", "as_result", "candidates",
           "front_candidates", "objective_of"]

FORMAT = "fxmpq.candidates/1"
DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)  # the objective's weight of the weight indicators, swept
_NEAR_FIRST = 2  # uniform policies (by objective) whose near-uniform neighbours come before the alpha sweep


@dataclass(frozen=True)
class Candidate:
    """One policy within the budget: how it was found (`sources`), its objective at the set's alpha, its cost on
    every metric of the hardware and, once verified, its estimated top-1 `accuracy` and mean `loss` on held-out
    batches of the jointly trained model (None: not evaluated)."""

    policy: Policy
    sources: tuple[str, ...]
    objective: float
    totals: Mapping[str, float]
    accuracy: float | None = None
    loss: float | None = None
    priced_points: int = 0  # prohibitively priced points the policy uses (the paper's cleaning rule)
    layer_values: Mapping[str, float] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the per-layer objective values are not stored)."""
        return {"policy": self.policy.to_dict(), "sources": list(self.sources), "objective": self.objective,
                "totals": dict(self.totals), "accuracy": self.accuracy, "loss": self.loss,
                "priced_points": self.priced_points}


@dataclass(frozen=True)
class CandidateSet:
    """Distinct policies within the budget and, once verified, the one chosen (`chosen`, an index; `best` is it).

    A set for a cost budget is ordered by objective (at `alpha`); one for an accuracy target (`max_drop`) by the
    cost `metric` it makes cheapest, the order in which verification walks it. `limits` are the resolved cost limits
    every candidate meets; `samples` the held-out samples each evaluated candidate saw; `reference_accuracy` the FP32
    model's top-1 on those samples (accuracy targets); `meta` what made the set (budget, alpha, ...: JSON values).
    """

    candidates: tuple[Candidate, ...]
    alpha: float
    limits: Mapping[str, float]
    chosen: int | None = None
    samples: int | None = None
    metric: str | None = None
    max_drop: float | None = None
    reference_accuracy: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.candidates)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self.candidates)

    def __getitem__(self, i: int) -> Candidate:
        return self.candidates[i]

    @property
    def best(self) -> Candidate | None:
        """The chosen candidate (None before verification)."""
        return None if self.chosen is None else self.candidates[self.chosen]

    @property
    def estimated_drop(self) -> float | None:
        """FP32 top-1 minus the chosen candidate's estimate on the same samples (accuracy targets), else None."""
        best = self.best
        if best is None or best.accuracy is None or self.reference_accuracy is None:
            return None
        return self.reference_accuracy - best.accuracy

    @property
    def target_met(self) -> bool | None:
        """Whether the chosen candidate's estimated drop is within `max_drop` (None without a target)."""
        drop = self.estimated_drop
        return None if drop is None or self.max_drop is None else drop <= self.max_drop + 1e-12

    def table(self) -> str:
        """One row per candidate: objective, share of each limit (or the target's metric), estimated top-1, loss,
        how it was found; `>` marks the chosen one."""
        metrics = [self.metric] if self.metric is not None else list(self.limits)
        header = ["", "#", "objective", *[f"{m} %" if m in self.limits else m for m in metrics], "top-1 %", "loss",
                  "policy", "found as"]
        rows = []
        for i, c in enumerate(self.candidates):
            cost = [f"{100 * c.totals[m] / self.limits[m]:.1f}" if self.limits.get(m) else f"{c.totals[m]:.4g}"
                    for m in metrics]
            rows.append([">" if i == self.chosen else "", str(i), f"{c.objective:.5g}", *cost,
                         "-" if c.accuracy is None else f"{100 * c.accuracy:.2f}",
                         "-" if c.loss is None else f"{c.loss:.4f}", _summary(c.policy), "; ".join(c.sources)])
        lines = [render(header, rows, left=2)]
        if self.samples is not None:
            lines.append(f"top-1 and loss: the jointly trained model at each policy, {self.samples} held-out samples")
        if self.max_drop is not None:
            drop = self.estimated_drop
            lines.append(f"target: top-1 at most {100 * self.max_drop:.2f} pp below FP32"
                         + ("" if self.reference_accuracy is None else
                            f" ({100 * self.reference_accuracy:.2f} % on the same samples)")
                         + ("" if drop is None else f"; chosen: estimated drop {100 * drop:.2f} pp, "
                            + ("within the target" if self.target_met else "MISSES the target (the most expensive "
                                                                           "candidate was taken)")))
        return "\n".join(lines)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form."""
        return {"format": FORMAT, "alpha": self.alpha, "limits": dict(self.limits), "chosen": self.chosen,
                "samples": self.samples, "metric": self.metric, "max_drop": self.max_drop,
                "reference_accuracy": self.reference_accuracy, "meta": dict(self.meta),
                "candidates": [c.to_dict() for c in self.candidates]}

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; also write it to `path` when given."""
        return dump_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, source: str | Path) -> CandidateSet:
        """Read a candidate set from a JSON file path or JSON text; PolicyError naming the source and the defect."""
        data, where = read_json(source, PolicyError, "candidates")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PolicyError(f"{where}: not an fxmpq candidates file (expected \"format\": \"{FORMAT}\")")
        try:
            cands = tuple(Candidate(policy=Policy.from_json(dump_json(c["policy"])), sources=tuple(c["sources"]),
                                    objective=float(c["objective"]), totals=dict(c["totals"]),
                                    accuracy=c["accuracy"], loss=c["loss"], priced_points=int(c["priced_points"]))
                          for c in data["candidates"])
            out = cls(candidates=cands, alpha=float(data["alpha"]), limits=dict(data["limits"]),
                      chosen=data["chosen"], samples=data["samples"], metric=data["metric"],
                      max_drop=data["max_drop"], reference_accuracy=data["reference_accuracy"],
                      meta=dict(data["meta"]))
        except PolicyError as e:
            raise PolicyError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise PolicyError(f"{where}: malformed candidates file ({type(e).__name__}: {brief(e)})") from None
        if out.chosen is not None and not (isinstance(out.chosen, int) and 0 <= out.chosen < len(cands)):
            raise PolicyError(f"{where}: chosen {brief(out.chosen)} is not the index of a candidate")
        return out


def _summary(policy: Policy) -> str:
    """A policy in a few characters: its formats and how many layers run each ("W4A4 x3, W6A5 x1")."""
    return ", ".join(f"{k} x{v}" for k, v in policy.format_counts().items())


def as_result(candidate: Candidate, reference: SearchResult) -> SearchResult:
    """`candidate` as a SearchResult next to `reference` (the ILP's optimum under the same limits): the reference
    itself when it is that policy, else status FEASIBLE and the gap to the reference's proven bound."""
    if candidate.policy == reference.policy:
        return reference
    gap = max(0.0, candidate.objective - reference.bound) if math.isfinite(reference.bound) else math.inf
    return replace(reference, policy=candidate.policy, objective=candidate.objective, totals=dict(candidate.totals),
                   status=SearchStatus.FEASIBLE, gap=gap, rel_gap=gap / max(abs(candidate.objective), 1e-300),
                   layer_values=dict(candidate.layer_values), priced_points=candidate.priced_points)


# ------------------------------------------------------------------------------------------- building
class _Pool:
    """Policies in the order found (a policy found twice keeps one entry and both sources)."""

    def __init__(self, prob: Problem):
        self.prob = prob
        self.sources: dict[Policy, list[str]] = {}
        self.cuts: list[np.ndarray] = []  # problem columns of every policy the solver could return again

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, policy: Policy, source: str) -> None:
        if policy in self.sources:
            self.sources[policy].append(source)
            return
        self.sources[policy] = [source]
        sel = self.prob.selection(policy)
        if sel is not None:
            self.cuts.append(sel)

    def build(self, count: int, analysis: Analysis) -> list[Candidate]:
        out = []
        for policy, sources in list(self.sources.items())[:count]:
            objective, values = objective_of(self.prob, policy)
            priced = sum(int(self.prob.layer_priced[n][self.prob.layer_pairs[n].index(policy[n])])
                         for n in self.prob.layer_pairs)
            out.append(Candidate(policy=policy, sources=tuple(sources), objective=objective,
                                 totals=analysis.cost(policy), priced_points=priced, layer_values=values))
        return out


def objective_of(prob: Problem, policy: Policy) -> tuple[float, dict[str, float]]:
    """The search objective of `policy` on `prob` (prohibitive prices included) and each layer's share of it."""
    values = {n: float(prob.layer_obj[n][prob.layer_pairs[n].index(policy[n])]) for n in prob.layer_pairs}
    return float(sum(values.values())), values


def _fits(totals: Mapping[str, float], limits: Mapping[str, float]) -> bool:
    return all(totals[k] <= v + 1e-12 * abs(v) for k, v in limits.items())


def _uniform_fits(analysis: Analysis, prob: Problem, limits: Mapping[str, float]) -> list[tuple[int, int]]:
    """The candidate pairs whose uniform policy meets `limits`."""
    return [(w, a) for w, a in prob.pairs if _fits(analysis.cost(Policy.uniform(analysis, w, a)), limits)]


def _largest(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs no other pair exceeds in both weight and activation bits (the largest uniform policies)."""
    return [p for p in pairs if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in pairs)]


def _near(prob: Problem, w: int, a: int, *, lower: bool) -> np.ndarray:
    """Columns whose every layer runs a pair within one candidate step of (w, a): up only, or `lower` too."""
    ws, as_ = sorted({p[0] for p in prob.pairs}), sorted({p[1] for p in prob.pairs})

    def steps(bits: list[int], b: int) -> list[int]:
        i = bits.index(b)
        return bits[max(0, i - 1) if lower else i: i + 2]

    ok_w, ok_a = np.array(steps(ws, w)), np.array(steps(as_, a))
    masks = [np.all(np.isin(u.choices[:, :, 0], ok_w) & np.isin(u.choices[:, :, 1], ok_a), axis=1)
             for u in prob.units]
    return np.concatenate(masks)


def _check_count(count: Any, what: str) -> int:
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ArgumentError(f"{what} must be an integer >= 1, found {brief(count)}")
    return int(count)


def _check_alphas(alphas: Iterable[float]) -> tuple[float, ...]:
    try:
        out = tuple(alphas)
    except TypeError:
        raise ArgumentError(f"alphas must be a sequence of non-negative numbers, found {brief(alphas)}") from None
    bad = [a for a in out if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a < 0]
    if bad:
        raise ArgumentError(f"alphas must be finite non-negative numbers, found {brief(bad[0])}")
    return tuple(float(a) for a in out)


def candidates(
    analysis: Analysis,
    indicators: Indicators,
    budget: Budget | str | Mapping[str, float],
    *,
    alpha: float = 2.0,
    count: int = DEFAULT_COUNT,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    weight_only: bool = False,
    clean: Cleaning | str = Cleaning.PAPER,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> CandidateSet:
    """Up to `count` distinct policies within `budget`, ordered by the search objective at `alpha`.

    In order of priority (the first `count` distinct ones are kept): the optimum at `alpha`; the largest uniform
    policies that fit (every candidate (w, a) pair, pins kept: those no fitting pair exceeds in both bit-widths),
    by objective; for the first two of them, two near-uniform optima each, every layer within one candidate step
    of it (raised only, and raised or lowered), which spend what the uniform policy leaves of the budget where
    the objective gains most; the optimum at each of `alphas`; the near-uniform optima of the other largest
    uniform policies; then the ILP's next-best at `alpha`, each the optimum once every policy already in the set
    is excluded (no-good cuts, solved exactly like the search). So no policy outside the set
    has a smaller objective than the last next-best one in it. Every candidate's objective is the search's at
    `alpha` (prohibitive prices included) and its totals are recomputed with `analysis.cost`.

    Errors as in `fxmpq.search` (InfeasibleBudget, BudgetError, IndicatorError), and ArgumentError for a bad
    `count` or `alphas`.
    """
    count = _check_count(count, "count")
    alphas = _check_alphas(alphas)
    limits = Budget.coerce(budget).resolve(analysis)
    prob = Problem.from_indicators(analysis, indicators, alpha, weight_only, clean)
    pool = _Pool(prob)
    best, _ = solve_problem(prob, limits, time_limit)
    pool.add(best.policy, f"optimum (alpha {alpha:g})")
    uniform = {p: Policy.uniform(analysis, *p) for p in _largest(_uniform_fits(analysis, prob, limits))}
    largest = sorted(uniform, key=lambda p: objective_of(prob, uniform[p])[0])  # the most promising first
    for w, a in largest:
        pool.add(uniform[(w, a)], f"uniform W{w}A{a}")

    def near(pairs: list[tuple[int, int]]) -> None:
        for w, a in pairs:
            for lower, label in ((False, "raised"), (True, "+-1 step")):
                try:
                    res, _ = solve_problem(prob, limits, time_limit, allowed=_near(prob, w, a, lower=lower))
                except InfeasibleBudget:  # only where a tied group's Pareto pruning dropped the uniform combination
                    continue
                pool.add(res.policy, f"near-uniform W{w}A{a} ({label})")

    near(largest[:_NEAR_FIRST])
    for other in alphas:
        if other != float(alpha):
            res, _ = solve_problem(Problem.from_indicators(analysis, indicators, other, weight_only, clean), limits,
                                   time_limit)
            pool.add(res.policy, f"optimum (alpha {other:g})")
    near(largest[_NEAR_FIRST:])
    k = 0
    while len(pool) < count:
        try:
            res, _ = solve_problem(prob, limits, time_limit, exclude=pool.cuts)
        except InfeasibleBudget:
            break  # every policy within the budget is in the set
        k += 1
        pool.add(res.policy, f"next-best {k} (alpha {alpha:g})")
    cands = sorted(pool.build(count, analysis), key=lambda c: c.objective)
    log.info("candidates: %d distinct policies within %s", len(cands), limits)
    return CandidateSet(candidates=tuple(cands), alpha=float(alpha), limits=dict(limits))


def front_candidates(
    analysis: Analysis,
    indicators: Indicators,
    metric: str,
    *,
    budget: Budget | str | Mapping[str, float] | None = None,
    alpha: float = 2.0,
    points: int = DEFAULT_COUNT,
    weight_only: bool = False,
    clean: Cleaning | str = Cleaning.PAPER,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> CandidateSet:
    """The distinct policies of the Pareto front of `metric` (`points` limits, fxmpq.pareto) and every uniform
    policy over the candidate pairs, all within `budget`'s other limits, ordered by `metric` (then objective).

    What an accuracy target walks: verification evaluates them from the cheapest up and takes the first within
    the target. Errors as in `fxmpq.pareto`.
    """
    points = _check_count(points, "points")
    limits = Budget.coerce(budget).resolve(analysis) if budget is not None else {}
    front = pareto(analysis, indicators, metric=metric, points=points, alpha=alpha, budget=budget,
                   weight_only=weight_only, clean=clean, time_limit=time_limit)
    prob = Problem.from_indicators(analysis, indicators, alpha, weight_only, clean)
    pool = _Pool(prob)
    for limit, res in zip(front.budgets, front.results):
        pool.add(res.policy, f"pareto {metric}<={limit:.4g}")
    for w, a in _uniform_fits(analysis, prob, limits):
        pool.add(Policy.uniform(analysis, w, a), f"uniform W{w}A{a}")
    cands = sorted(pool.build(len(pool), analysis), key=lambda c: (c.totals[metric], c.objective))
    return CandidateSet(candidates=tuple(cands), alpha=float(alpha), limits=dict(limits),
                        metric=metric)

