"""The solver boundary: the only module that imports highspy; problems in as numpy arrays, plain results out."""

from __future__ import annotations

import enum
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["Rows", "Solution", "Status", "solve"]


class Status(enum.Enum):
    """What a solve established (every HiGHS model status maps to one of these)."""

    OPTIMAL = "optimal"  # proven within the requested gap
    FEASIBLE = "feasible"  # a solution, optimality not proven (time or node limit)
    INFEASIBLE = "infeasible"
    UNBOUNDED = "unbounded"
    NO_SOLUTION = "no_solution"  # a limit was hit before any solution was found
    ERROR = "error"  # the solver failed; `message` says how


@dataclass(frozen=True)
class Rows:
    """A row-wise sparse matrix (CSR): row i holds `value[start[i]:start[i+1]]` at columns `index[...]`."""

    start: np.ndarray
    index: np.ndarray
    value: np.ndarray

    @property
    def num_rows(self) -> int:
        """Number of rows."""
        return len(self.start) - 1

    @classmethod
    def stack(cls, blocks: list[Rows]) -> Rows:
        """The rows of `blocks` one after another."""
        starts, offset = [np.zeros(1, dtype=np.int64)], 0
        for b in blocks:
            starts.append(b.start[1:] + offset)
            offset += int(b.start[-1])
        return cls(np.concatenate(starts), np.concatenate([b.index for b in blocks]),
                   np.concatenate([b.value for b in blocks]))


@dataclass(frozen=True)
class Solution:
    """A solve's result. `x` is None without a solution; `row_dual` only for LPs; `gap` is absolute."""

    status: Status
    x: np.ndarray | None
    objective: float
    bound: float
    gap: float
    time: float
    row_dual: np.ndarray | None = None
    nodes: int = 0
    message: str = ""


_HIGHS = None


def _highspy():  # imported lazily so that importing fxmpq stays fast
    global _HIGHS
    if _HIGHS is None:
        import highspy

        # HiGHS prints a copyright banner from C++ when the first Highs object of a process is built, before any
        # option can silence it; build that first one with the process's stdout pointed at /dev/null
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _HIGHS = highspy
    return _HIGHS


def solve(
    cost: np.ndarray,
    rows: Rows,
    row_lower: np.ndarray,
    row_upper: np.ndarray,
    *,
    col_upper: np.ndarray | float = 1.0,
    integral: bool = True,
    start: np.ndarray | None = None,
    time_limit: float | None = None,
    abs_gap: float = 0.0,
    rel_gap: float = 0.0,
    feasibility_tol: float = 1e-9,
    options: dict[str, bool | int | float | str] | None = None,
) -> Solution:
    """Minimise `cost @ x` subject to `row_lower <= rows @ x <= row_upper`, `0 <= x <= col_upper`.

    With `integral` every column is integer (binary for col_upper 1) and HiGHS's branch and bound must prove
    optimality within `abs_gap`/`rel_gap`; otherwise the LP relaxation is solved and its row duals returned.
    `start` is a known feasible point handed to the MIP as its first incumbent; `options` are HiGHS options.
    """
    hp = _highspy()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    n, m = len(cost), rows.num_rows
    upper = np.broadcast_to(np.asarray(col_upper, dtype=np.float64), (n,)).copy()
    h = hp.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("primal_feasibility_tolerance", feasibility_tol)
    h.setOptionValue("mip_feasibility_tolerance", feasibility_tol)
    if integral:
        h.setOptionValue("mip_rel_gap", rel_gap)
        h.setOptionValue("mip_abs_gap", abs_gap)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    for key, value in (options or {}).items():
        if h.setOptionValue(key, value) != hp.HighsStatus.kOk:
            return Solution(Status.ERROR, None, np.nan, -np.inf, np.inf, 0.0, message=f"bad HiGHS option {key}")
    inf = hp.kHighsInf
    lo = np.where(np.isfinite(row_lower), row_lower, -inf).astype(np.float64)
    hi = np.where(np.isfinite(row_upper), row_upper, inf).astype(np.float64)
    upper = np.where(np.isfinite(upper), upper, inf)
    integrality = np.full(n, 1 if integral else 0, dtype=np.int32)
    status = h.passModel(n, m, int(rows.start[-1]), 2, 1, 0.0, cost, np.zeros(n), upper, lo, hi,
                         rows.start.astype(np.int32), rows.index.astype(np.int32),
                         rows.value.astype(np.float64), integrality)
    if status == hp.HighsStatus.kError:
        return Solution(Status.ERROR, None, np.nan, -np.inf, np.inf, 0.0, message="HiGHS rejected the model")
    if start is not None and integral:
        h.setSolution(n, np.arange(n, dtype=np.int32), np.asarray(start, dtype=np.float64))
    t0 = time.perf_counter()
    run_status = h.run()
    elapsed = time.perf_counter() - t0
    model_status = h.getModelStatus()
    info = h.getInfo()
    ms = hp.HighsModelStatus
    has_x = info.primal_solution_status == hp.SolutionStatus.kSolutionStatusFeasible
    x = np.asarray(h.getSolution().col_value, dtype=np.float64) if has_x else None
    obj = float(info.objective_function_value) if has_x else np.nan
    bound = float(info.mip_dual_bound) if integral else obj
    nodes = int(info.mip_node_count) if integral else 0
    if model_status == ms.kOptimal:
        st = Status.OPTIMAL
    elif model_status == ms.kInfeasible:
        st = Status.INFEASIBLE
    elif model_status in (ms.kUnbounded, ms.kUnboundedOrInfeasible):
        st = Status.UNBOUNDED
    elif model_status in (ms.kTimeLimit, ms.kIterationLimit, ms.kSolutionLimit, ms.kInterrupt,
                          ms.kObjectiveBound, ms.kObjectiveTarget, ms.kMemoryLimit):
        st = Status.FEASIBLE if has_x else Status.NO_SOLUTION
    else:
        st = Status.ERROR
    if run_status == hp.HighsStatus.kError and st is Status.OPTIMAL:
        st = Status.ERROR
    if st is Status.OPTIMAL and x is None:
        st = Status.ERROR
    if integral and x is not None:
        x = np.round(x)
    gap = max(0.0, obj - bound) if (x is not None and np.isfinite(bound)) else np.inf
    dual = None
    if not integral and x is not None:
        dual = np.asarray(h.getSolution().row_dual, dtype=np.float64)
    msg = "" if st is Status.OPTIMAL else f"HiGHS model status: {h.modelStatusToString(model_status)}"
    log.debug("HiGHS %s: %d cols, %d rows, obj %.12g, bound %.12g, %.2f ms, %d nodes",
              "MIP" if integral else "LP", n, m, obj, bound, elapsed * 1e3, nodes)
    return Solution(st, x, obj, bound, gap, elapsed, dual, nodes, msg)
