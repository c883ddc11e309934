"""The exact solver of one instance: reductions, LP and Lagrangian bounds, incumbent heuristics, DP, HiGHS MIP."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..core.dominance import nondominated, nondominated_within
from ..errors import SolverError
from . import ilp
from .results import SearchStatus

if TYPE_CHECKING:
    from .problem import Problem

__all__ = ["Outcome", "Solver"]

_DP_STATES = 20_000  # partial choices the exact dynamic program may hold at once before HiGHS takes over
_DP_WORK = 200_000  # partial choices it may examine in all before HiGHS takes over
_DP_BEAM = 48  # states per unit in the heuristic pass that looks for a better incumbent
# Our own incumbent is handed to HiGHS, so its primal heuristics mostly cost time (measured on resnet50).
_MIP_OPTIONS = {"mip_heuristic_run_feasibility_jump": False, "mip_heuristic_effort": 0.0,
                "mip_detect_symmetry": False}


@dataclass
class Outcome:
    """A solve's selection (a column of the problem per unit, in unit order), what it proved, and its sizes."""

    sel: np.ndarray
    status: SearchStatus
    bound: float
    lp_bound: float
    n_reduced: int  # columns after the reductions
    n_mip: int  # columns handed to HiGHS's branch and bound (0: proven without it)


class Solver:
    """Solves one multiple-choice knapsack instance exactly: reductions, LP bound, incumbent, DP or HiGHS MIP.

    The instance is `prob`'s columns `cols` under the limits `limits` on the metric rows `kidx` (pinned layers'
    costs are subtracted here); each selection in `exclude` (problem columns, one per unit) is ruled out by a
    no-good cut (the next-best policies). Within each unit, columns weakly dominated in the objective and every limited
    metric are dropped first (exact: an optimum survives).
    """

    def __init__(self, prob: Problem, cols: np.ndarray, kidx: list[int], limits: np.ndarray,
                 time_limit: float | None, exclude: Sequence[np.ndarray] = ()):
        self.p, self.time_limit = prob, time_limit
        self.U = len(prob.units)
        self.b = limits - prob.pinned_cost[kidx]
        raw = prob.cost[np.ix_(kidx, cols)] if kidx else np.zeros((0, len(cols)))
        self.n_limits = len(kidx)  # the budget's rows; the no-good cuts follow them
        if len(exclude):
            # a no-good cut per excluded selection (one problem column per unit): at most U - 1 of its columns.
            # The cuts are rows like the budget's, so every step below (dominance, bounds, DP, MIP) keeps them
            cuts = np.array([np.isin(cols, sel) for sel in exclude], dtype=np.float64)
            raw = np.vstack([raw, cuts])
            self.b = np.concatenate([self.b, np.full(len(exclude), self.U - 1.0)])
        obj = prob.obj[cols]
        unit = prob.col_unit[cols]
        keep = nondominated_within(unit, np.vstack([obj[None], raw]))
        self.cols = cols[keep]
        self.unit = unit[keep]
        # the objective in units of its largest term: indicators of any magnitude (random-weight nets give step
        # sizes up to 1e14) keep HiGHS's tolerances and the relative optimality test meaningful
        top = float(np.abs(obj).max()) if obj.size else 0.0
        self.obj_scale = top if np.isfinite(top) and top > 0 else 1.0
        self.obj = obj[keep] / self.obj_scale
        self.raw = raw[:, keep]
        self.deadline = None if time_limit is None else time.perf_counter() + float(time_limit)
        self.scale = np.where(self.b > 0, self.b, 1.0)
        self.sc = self.raw / self.scale[:, None]

    def _outcome(self, sel_local: np.ndarray, status: SearchStatus, bound: float | None, lp_bound: float,
                 n_reduced: int, n_mip: int) -> Outcome:
        """An Outcome with the bounds back in the problem's objective units; bound None: the selection's own value
        (proven optimal), computed in those units so that its gap is exactly 0."""
        cols = self.cols[sel_local]
        bound = float(self.p.obj[cols].sum()) if bound is None else bound * self.obj_scale
        return Outcome(cols, status, bound, lp_bound * self.obj_scale, n_reduced, n_mip)

    def _remaining(self) -> float | None:
        """Seconds left before the deadline (at least a millisecond), or None without a time limit."""
        return None if self.deadline is None else max(1e-3, self.deadline - time.perf_counter())

    def feasible(self, sel_local: np.ndarray) -> bool:
        """Whether the local columns `sel_local` (one per unit) meet every limit."""
        tot = self.raw[:, sel_local].sum(axis=1)
        return bool(np.all(tot <= self.b + 1e-12 * np.abs(self.b)))

    def run(self, start_cols: np.ndarray | None = None) -> Outcome | None:
        """The optimum (None: no choice meets the limits), from `start_cols` as a candidate incumbent if given."""
        n = len(self.obj)
        K = self.raw.shape[0]
        if K == 0:
            sel = np.full(self.U, -1)
            best = np.full(self.U, np.inf)
            for j in range(n):
                if self.obj[j] < best[self.unit[j]]:
                    best[self.unit[j]], sel[self.unit[j]] = self.obj[j], j
            return self._outcome(sel, SearchStatus.OPTIMAL, None, float(self.obj[sel].sum()), n, 0)
        eq = ilp.Rows(np.searchsorted(np.sort(self.unit), np.arange(self.U + 1)).astype(np.int64),
                      np.argsort(self.unit, kind="stable").astype(np.int64), np.ones(n))
        kn = ilp.Rows(np.arange(K + 1, dtype=np.int64) * n, np.tile(np.arange(n), K), self.sc.ravel())
        rows = ilp.Rows.stack([eq, kn])
        lo = np.concatenate([np.ones(self.U), np.full(K, -np.inf)])
        hi = np.concatenate([np.ones(self.U), self.b / self.scale])
        lp = ilp.solve(self.obj, rows, lo, hi, col_upper=np.inf, integral=False, time_limit=self._remaining())
        if lp.status is ilp.Status.INFEASIBLE:
            return None
        if lp.status in (ilp.Status.FEASIBLE, ilp.Status.NO_SOLUTION) and self.deadline is not None:
            # out of time before even the LP bound: the greedy incumbent, nothing proven
            sel = self._repair(self._round(np.ones(n)))
            if sel is None:
                raise SolverError("the time limit ran out before any policy within the budget was found; "
                                 "raise time_limit")
            return self._outcome(sel, SearchStatus.FEASIBLE, -np.inf, -np.inf, n, 0)
        if lp.status is not ilp.Status.OPTIMAL:
            raise SolverError(f"the LP relaxation failed: {lp.message}")
        dual = lp.row_dual[self.U:]
        L, r, lam = -np.inf, None, None
        for cand in (np.clip(-dual, 0, None), np.clip(dual, 0, None)):
            Ld, rd = self._lagrange(cand)
            if Ld > L:
                L, r, lam = Ld, rd, cand
        # incumbent: LP rounding + repair + local moves (+ a caller's start)
        sel = self._round(lp.x)
        sel = self._repair(sel)
        cands = []
        if sel is not None:
            cands.append(self._improve(sel, r, L))
        if start_cols is not None:
            loc = self._localise(start_cols)
            if loc is not None and self.feasible(loc):
                cands.append(self._improve(loc, r, L))
        if not cands:
            return self._mip(np.ones(n, dtype=bool), None, L, n)
        sel = min(cands, key=lambda s: float(self.obj[s].sum()))
        ub = float(self.obj[sel].sum())
        tol = 1e-9 * max(1.0, abs(ub))
        if ub - L <= tol:  # the incumbent meets the Lagrangian bound: optimal, nothing left to search
            return self._outcome(sel, SearchStatus.OPTIMAL, None, L, n, 0)
        keep = r <= (ub - L) + tol
        keep[sel] = True
        per_unit = np.bincount(self.unit[keep], minlength=self.U)
        if np.all(per_unit == 1):
            return self._outcome(sel, SearchStatus.OPTIMAL, None, L, n, 0)
        # the DP first, however many units are undecided: on real networks it proves what HiGHS's branch and bound
        # needs seconds for (resnext101_64x4d with random indicators: 35 ms vs 41 s; efficientnet_v2_l 0.11 vs
        # 10.7 s); where it gives up (_DP_WORK) it has cost a fifth of the HiGHS solve that follows (tiled resnet50)
        found = self._enumerate(keep, sel, r, L, lam)
        if found is not None:
            return self._outcome(found, SearchStatus.OPTIMAL, None, L, n, 0)
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return self._outcome(sel, SearchStatus.FEASIBLE, L, L, n, 0)
        return self._mip(keep, sel, L, n)

    def find_feasible(self) -> np.ndarray | None:
        """Problem columns of one choice per unit within the limits, or None when provably none exists.

        A feasibility test, meant for a zero-objective problem (`Problem.costs_only`): the cheapest choices
        repaired greedily, else HiGHS's branch and bound (with its primal heuristics) on all columns.
        """
        n = len(self.obj)
        if self.raw.shape[0] == 0:
            return self.run().sel
        sel = self._repair(self._round(np.ones(n)))
        if sel is not None:
            return self.cols[sel]
        out = self._mip(np.ones(n, dtype=bool), None, -np.inf, n, options=None)
        return None if out is None else out.sel

    def _multipliers(self, lam: np.ndarray) -> np.ndarray:
        """[M, K] non-negative multipliers: the LP's, each budget row's scaled by a few factors (all combinations);
        the no-good cuts keep the LP's (a grid over them too would grow as 6^cuts)."""
        factors = np.array([0.0, 0.5, 0.8, 1.0, 1.25, 2.0])
        k = self.n_limits
        grids = [lam[i] * factors if lam[i] > 0 else np.zeros(1) for i in range(k)]
        mesh = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1).reshape(-1, k) if k else np.zeros((1, 0))
        mesh = np.hstack([mesh, np.broadcast_to(lam[k:], (len(mesh), len(lam) - k))])
        return np.unique(mesh, axis=0)

    def _enumerate(self, keep: np.ndarray, sel: np.ndarray, r: np.ndarray, L: float,
                   lam: np.ndarray) -> np.ndarray | None:
        """The exact dynamic program below, after a narrow (beam) pass of it that sharpens the incumbent."""
        better = self._dp(keep, sel, r, L, lam, beam=_DP_BEAM)
        if better is not None and float(self.obj[better].sum()) < float(self.obj[sel].sum()):
            sel = better
        return self._dp(keep, sel, r, L, lam)

    def _dp(self, keep: np.ndarray, sel: np.ndarray, r: np.ndarray, L: float, lam: np.ndarray,
            beam: int | None = None) -> np.ndarray | None:
        """Exact dynamic program over units on the columns left after fixing; None when its states grow too many.

        Partial choices (over the first d units) are kept only when (a) L + their reduced costs stays below the
        best value known (the Lagrangian bound with the LP's multipliers, valid for every completion), (b) some
        completion fits the budget, and (c) no other partial choice over the same units is at least as good in
        the objective and in every constrained metric (replacing the prefix of an optimum by a dominating one
        keeps it feasible and no worse, so an optimum survives). The best complete choice is then optimal.
        With `beam`, only the `beam` states of smallest bound go on at each unit: a heuristic, not a proof.
        """
        best = float(self.obj[sel].sum())
        tol = 1e-9 * max(1.0, abs(best))
        lim = best - L + tol
        idx = np.flatnonzero(keep)
        units = [idx[self.unit[idx] == u] for u in range(self.U)]
        order = sorted(range(self.U), key=lambda u: len(units[u]))
        K = self.raw.shape[0]
        mins = np.array([self.raw[:, units[u]].min(axis=1) for u in order])  # [U, K] in processing order
        rest = np.vstack([np.cumsum(mins[::-1], axis=0)[::-1], np.zeros((1, K))])  # rest[d]: units d.. minimum
        tol_b = self.b + 1e-12 * np.abs(self.b)
        # Lagrangian bounds of the remaining units for a small set of multipliers around the LP's: a state that
        # spent more of a budget gets a tighter bound from a larger multiplier (each lambda >= 0 is valid)
        lams = self._multipliers(lam)
        b_sc = self.b / self.scale
        g = np.zeros((self.U + 1, len(lams)))
        for d in range(self.U - 1, -1, -1):
            cols = units[order[d]]
            g[d] = g[d + 1] + (self.obj[cols][None, :] + lams @ self.sc[:, cols]).min(axis=1)
        s_obj, s_r, s_cost = np.zeros(1), np.zeros(1), np.zeros((1, K))
        work = 0
        parents: list[tuple[np.ndarray, np.ndarray]] = []
        for d, u in enumerate(order):
            cols = units[u]
            o = (s_obj[:, None] + self.obj[cols][None]).ravel()
            rr = (s_r[:, None] + r[cols][None]).ravel()
            c = (s_cost[:, None, :] + self.raw[:, cols].T[None]).reshape(-1, K)
            ok = (rr <= lim) & np.all(c + rest[d + 1] <= tol_b, axis=1)
            pos = np.flatnonzero(ok)
            work += len(pos)
            if work > _DP_WORK:
                return None
            if len(pos):
                slack = b_sc[None, :] - c[pos] / self.scale[None, :]  # [S, K]
                bound = o[pos] + (g[d + 1][None, :] - slack @ lams.T).max(axis=1)
                live = bound <= best + tol
                pos, bound = pos[live], bound[live]
                if beam is not None and len(pos) > beam:
                    pos = pos[np.argpartition(bound, beam)[:beam]]
            if len(pos) > _DP_STATES:
                return None
            if beam is None:
                pos = pos[nondominated(np.column_stack([o[pos], c[pos]]))]
            parents.append((pos // len(cols), cols[pos % len(cols)]))
            s_obj, s_r, s_cost = o[pos], rr[pos], c[pos]
        if not len(s_obj):  # the incumbent is optimal (nothing better survives the bound)
            return sel
        k = int(np.argmin(s_obj))
        if s_obj[k] >= best:
            return sel
        out = np.empty(self.U, dtype=np.int64)
        for d in range(self.U - 1, -1, -1):
            parent, col = parents[d]
            out[order[d]] = col[k]
            k = int(parent[k])
        return out

    def _mip(self, keep: np.ndarray, sel: np.ndarray | None, L: float, n_reduced: int,
             options: dict[str, bool | int | float | str] | None = _MIP_OPTIONS) -> Outcome | None:
        """HiGHS's branch and bound on the columns `keep` (None: infeasible), `sel` as its first incumbent."""
        idx = np.flatnonzero(keep)
        m = len(idx)
        unit = self.unit[idx]
        K = self.raw.shape[0]
        order = np.argsort(unit, kind="stable")
        eq = ilp.Rows(np.searchsorted(unit[order], np.arange(self.U + 1)).astype(np.int64),
                      order.astype(np.int64), np.ones(m))
        kn = ilp.Rows(np.arange(K + 1, dtype=np.int64) * m, np.tile(np.arange(m), K), self.sc[:, idx].ravel())
        rows = ilp.Rows.stack([eq, kn])
        lo = np.concatenate([np.ones(self.U), np.full(K, -np.inf)])
        hi = np.concatenate([np.ones(self.U), self.b / self.scale])
        start = None
        if sel is not None:
            pos = {j: i for i, j in enumerate(idx)}
            start = np.zeros(m)
            start[[pos[j] for j in sel]] = 1.0
        for _ in range(4):
            sol = ilp.solve(self.obj[idx], rows, lo, hi, start=start, time_limit=self._remaining(), options=options,
                            abs_gap=1e-9 * max(1.0, abs(float(self.obj[sel].sum())) if sel is not None else 1.0))
            if sol.status is ilp.Status.INFEASIBLE:
                return None
            if sol.x is None:
                raise SolverError(f"HiGHS found no solution: {sol.message}")
            chosen = idx[sol.x > 0.5]
            if len(chosen) == self.U and self.feasible(chosen):
                break
            # HiGHS's tolerance accepted a hair over the limit: tighten the violated rows and solve again
            tot = self.raw[:, chosen].sum(axis=1)
            hi[self.U:] = np.minimum(hi[self.U:], (self.b - np.maximum(tot - self.b, 0) * 2) / self.scale)
        else:
            raise SolverError("HiGHS returned budget-violating solutions four times; cannot certify a policy")
        if sel is not None and float(self.obj[sel].sum()) < float(self.obj[chosen].sum()):
            chosen = sel
        status = SearchStatus.OPTIMAL if sol.status is ilp.Status.OPTIMAL else SearchStatus.FEASIBLE
        bound = max(sol.bound, L) if status is SearchStatus.OPTIMAL else L
        chosen = chosen[np.argsort(self.unit[chosen])]
        return self._outcome(chosen, status, bound, L, n_reduced, m)

    def _lagrange(self, lam: np.ndarray) -> tuple[float, np.ndarray]:
        v = self.obj + lam @ self.sc
        umin = np.full(self.U, np.inf)
        np.minimum.at(umin, self.unit, v)
        L = float(umin.sum() - lam @ (self.b / self.scale))
        return L, v - umin[self.unit]

    def _localise(self, cols: np.ndarray) -> np.ndarray | None:
        pos = {c: i for i, c in enumerate(self.cols)}
        loc = [pos.get(c) for c in cols]
        if any(x is None for x in loc):
            return None
        loc = np.array(loc)
        return loc if len(set(self.unit[loc].tolist())) == self.U else None

    def _round(self, x: np.ndarray) -> np.ndarray:
        score = np.where(x > 1e-9, self.sc.sum(axis=0), np.inf)
        sel = np.full(self.U, -1)
        best = np.full(self.U, np.inf)
        order = np.lexsort((score,))
        for j in order:
            u = self.unit[j]
            if sel[u] < 0 and np.isfinite(score[j]):
                sel[u], best[u] = j, score[j]
        for u in np.flatnonzero(sel < 0):  # no LP support: cheapest column
            js = np.flatnonzero(self.unit == u)
            sel[u] = js[np.argmin(self.sc[:, js].sum(axis=0))]
        return sel

    def _viol(self, tot: np.ndarray) -> float:
        return float((np.maximum(tot - self.b, 0) / self.scale).sum())

    def _repair(self, sel: np.ndarray) -> np.ndarray | None:
        sel = sel.copy()
        tot = self.raw[:, sel].sum(axis=1)
        cur = sel[self.unit]
        for _ in range(10 * self.U + 10):
            v0 = self._viol(tot)
            if v0 <= 0:
                return sel
            new = tot[:, None] + self.raw - self.raw[:, cur]
            v1 = (np.maximum(new - self.b[:, None], 0) / self.scale[:, None]).sum(axis=0)
            dv = v0 - v1
            dobj = self.obj - self.obj[cur]
            ok = dv > 1e-15
            if not ok.any():
                return None
            ratio = np.where(ok, dobj / np.where(ok, dv, 1), np.inf)
            j = int(np.argmin(ratio))
            u = self.unit[j]
            tot = tot + self.raw[:, j] - self.raw[:, sel[u]]
            sel[u] = j
            cur = sel[self.unit]
        return sel if self.feasible(sel) else None

    def _improve(self, sel: np.ndarray, r: np.ndarray, L: float) -> np.ndarray:
        sel = sel.copy()
        tol_b = self.b + 1e-12 * np.abs(self.b)
        for _ in range(200):
            tot = self.raw[:, sel].sum(axis=1)
            cur = sel[self.unit]
            dobj = self.obj - self.obj[cur]
            dcost = self.raw - self.raw[:, cur]
            ok = np.all(tot[:, None] + dcost <= tol_b[:, None], axis=0) & (dobj < -1e-15)
            if ok.any():
                j = int(np.argmin(np.where(ok, dobj, np.inf)))
                sel[self.unit[j]] = j
                continue
            # pair moves among columns the bound does not exclude
            ub = float(self.obj[sel].sum())
            cand = np.flatnonzero((r <= ub - L + 1e-12) & (dobj != 0))
            if len(cand) > 700:
                cand = cand[np.argsort(r[cand])[:700]]
            if len(cand) < 2:
                break
            d_o = dobj[cand][:, None] + dobj[cand][None, :]
            d_c = dcost[:, cand][:, :, None] + dcost[:, cand][:, None, :]
            diff = self.unit[cand][:, None] != self.unit[cand][None, :]
            ok2 = diff & (d_o < -1e-15) & np.all(tot[:, None, None] + d_c <= tol_b[:, None, None], axis=0)
            if not ok2.any():
                break
            flat = int(np.argmin(np.where(ok2, d_o, np.inf)))
            i, j = np.unravel_index(flat, ok2.shape)
            sel[self.unit[cand[i]]] = cand[i]
            sel[self.unit[cand[j]]] = cand[j]
        return sel
