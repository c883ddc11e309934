"""search() and pareto(): the provably optimal bit-width assignment (an ILP solved with HiGHS) and budget sweeps."""

from __future__ import annotations

import bisect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import ilp
from .budget import Budget
from .errors import FxmpqError, IndicatorError, InfeasibleBudget, PolicyError
from .indicators import Indicators
from .jsonio import dump_json
from .policy import Policy

if TYPE_CHECKING:
    from .analysis import Analysis

log = logging.getLogger(__name__)

__all__ = ["ParetoResult", "SearchResult", "pareto", "search"]

CLEAN_MODES = ("paper", "isotonic")
_MAX_GROUP_CHOICES = 200_000
_DP_STATES = 20_000  # partial choices the exact dynamic program may hold at once before HiGHS takes over
_DP_WORK = 200_000  # partial choices it may examine in all before HiGHS takes over
_DP_BEAM = 48  # states per unit in the heuristic pass that looks for a better incumbent
# Our own incumbent is handed to HiGHS, so its primal heuristics mostly cost time (measured on resnet50).
_MIP_OPTIONS = {"mip_heuristic_run_feasibility_jump": False, "mip_heuristic_effort": 0.0,
                "mip_detect_symmetry": False}


# ============================================================================ results
@dataclass(frozen=True)
class SearchResult:
    """An optimal policy with its objective, every metric's total against its limit, and the solver's proof."""

    policy: Policy
    objective: float
    totals: dict[str, float]
    limits: dict[str, float]
    status: str
    gap: float  # absolute: objective - proven lower bound (0 when optimal)
    rel_gap: float
    bound: float
    lp_bound: float
    solve_time: float
    build_time: float
    n_vars: int  # (unit, choice) columns before reductions
    n_vars_reduced: int  # after dominated and (stage 1) prohibitively priced points are dropped
    n_vars_mip: int  # left for branch and bound after reduced-cost fixing (0: proven without it)
    priced_points: int  # prohibitively priced points the optimum uses (0 unless the budget forces them)
    alpha: float = 2.0
    weight_only: bool = False
    layer_values: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def optimal(self) -> bool:
        """Whether optimality is proven (absolute gap 0)."""
        return self.status == "optimal"

    def table(self, analysis: Analysis, indicators: Indicators | None = None) -> str:
        """Per searchable layer: bits, indicator terms, and each constrained metric's share of its limit (%)."""
        from .analysis import _render

        metrics = list(self.limits)
        header = ["layer", "W/A", "I_w", "I_a", "objective", *[f"{m} %" for m in metrics]]
        rows = []
        for m in analysis.layers:
            w, a = self.policy[m.name]
            cost = analysis.layer_cost(m.name, w, a)
            iw = ia = ""
            if indicators is not None and m.name in indicators.weight:
                iw = f"{indicators.weight[m.name].get(w, float('nan')):.4g}"
                if m.name in indicators.act:
                    ia = f"{indicators.act[m.name].get(a, float('nan')):.4g}"
            val = self.layer_values.get(m.name)
            rows.append([m.name, f"W{w}A{a}" + ("*" if m.pinned else ""), iw, ia,
                         "" if val is None else f"{val:.4g}",
                         *[f"{100 * cost[k] / self.limits[k]:.2f}" if self.limits[k] > 0 else "-" for k in metrics]])
        rows.append(["total", "", "", "", f"{self.objective:.6g}",
                     *[f"{100 * self.totals[k] / self.limits[k]:.2f}" if self.limits[k] > 0 else "-"
                       for k in metrics]])
        lines = [_render(header, rows), "(* pinned)"]
        for k in metrics:
            lines.append(f"{k}: {self.totals[k]:.6g} <= {self.limits[k]:.6g}")
        lines.append(f"status {self.status}, gap {self.gap:.3g} (relative {self.rel_gap:.3g}), "
                     f"solve {1e3 * self.solve_time:.1f} ms, variables {self.n_vars} -> {self.n_vars_reduced} "
                     f"-> {self.n_vars_mip}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the policy plus the search's numbers."""
        return {"policy": self.policy.to_dict(), "objective": self.objective, "totals": self.totals,
                "limits": self.limits, "status": self.status, "gap": self.gap, "rel_gap": self.rel_gap,
                "bound": self.bound, "lp_bound": self.lp_bound, "solve_time": self.solve_time,
                "build_time": self.build_time, "n_vars": self.n_vars, "n_vars_reduced": self.n_vars_reduced,
                "n_vars_mip": self.n_vars_mip, "priced_points": self.priced_points, "alpha": self.alpha,
                "weight_only": self.weight_only}

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; also write it to `path` when given."""
        return dump_json(self.to_dict(), path)


@dataclass(frozen=True)
class ParetoResult:
    """Optimal policies across a range of limits on one metric (ascending)."""

    metric: str
    budgets: tuple[float, ...]
    results: tuple[SearchResult, ...]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, i: int) -> SearchResult:
        return self.results[i]

    def plot(self, path: str | Path, analysis: Analysis | None = None) -> Path:
        """Write a figure: objective vs budget, and per-layer weight/activation bits vs budget (heat maps)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [n for n in self.results[0].policy] if analysis is None else [m.name for m in analysis.searchable]
        x = np.array(self.budgets)
        fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=False)
        axes[0].plot(x, [r.objective for r in self.results], marker="o")
        axes[0].set_ylabel("objective")
        axes[0].set_title(f"optimal policies vs {self.metric} budget")
        for ax, idx, label in ((axes[1], 0, "weight bits"), (axes[2], 1, "activation bits")):
            grid = np.array([[r.policy[n][idx] for r in self.results] for n in names])
            im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_ylabel(f"layer ({label})")
            ax.set_xticks(range(len(x))[:: max(1, len(x) // 10)])
            ax.set_xticklabels([f"{v:.3g}" for v in x[:: max(1, len(x) // 10)]])
            fig.colorbar(im, ax=ax, label=label)
        axes[2].set_xlabel(f"{self.metric} budget")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out)
        plt.close(fig)
        return out


# ============================================================================ indicator cleaning
def _pav_decreasing(y: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit (pool adjacent violators) of `y` ordered by ascending bits."""
    vals: list[float] = []
    counts: list[int] = []
    for v in -y:  # fit increasing on -y
        vals.append(float(v))
        counts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            c = counts[-2] + counts[-1]
            vals[-2] = (vals[-2] * counts[-2] + vals[-1] * counts[-1]) / c
            counts[-2] = c
            vals.pop()
            counts.pop()
    return -np.repeat(vals, counts)


def _clean(row: dict[int, float], mode: str) -> tuple[dict[int, float], set[int]]:
    """Cleaned step sizes of one layer and the bits priced prohibitively (paper rule)."""
    bits = sorted(row)
    y = np.array([row[b] for b in bits])
    if mode == "isotonic":
        return dict(zip(bits, _pav_decreasing(y).tolist())), set()
    priced = {b for b, lo, hi in zip(bits, y[:-1], y[1:]) if lo < hi}
    return dict(row), priced


# ============================================================================ the prepared problem
@dataclass
class _Unit:
    """Searchable layers that choose together (one layer, or a group sharing its activation quantizer)."""

    layers: tuple[str, ...]
    choices: np.ndarray  # [C, len(layers), 2] (w, a)
    obj: np.ndarray  # [C]
    cost: np.ndarray  # [C, M] all hardware metrics
    priced: np.ndarray  # [C] number of prohibitively priced points used
    values: np.ndarray  # [C, len(layers)] per-layer objective share


class _Problem:
    """Numpy arrays of one (analysis, indicators, alpha, cleaning) instance, reused across solves."""

    def __init__(self, analysis: Analysis, indicators: Indicators, alpha: float, weight_only: bool, clean: str):
        t0 = time.perf_counter()
        if clean not in CLEAN_MODES:
            raise FxmpqError(f"clean={clean!r}: expected one of {', '.join(CLEAN_MODES)}")
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
            raise FxmpqError(f"alpha must be a finite non-negative number, found {alpha!r}")
        self.analysis, self.alpha, self.weight_only = analysis, float(alpha), weight_only
        hw = analysis.hardware
        self.metrics = list(hw.metrics)
        searchable = [m.name for m in analysis.searchable]
        if not searchable:
            raise PolicyError("the model has no searchable layers (all are pinned); nothing to search")
        bits = set(indicators.bits)
        if weight_only:
            best_a: dict[int, int] = {}
            for w, a in hw.pairs:
                if w in bits:
                    best_a[w] = max(a, best_a.get(w, a))
            pairs = sorted(best_a.items())
            if not pairs:
                raise IndicatorError(f"indicator bits {sorted(bits)} share no weight bit-width with hardware "
                                     f"{hw.name!r} (weight bits {list(hw.weight_bits)})")
            indicators.check_covers(searchable, sorted({w for w, _ in pairs}))
        else:
            pairs = [(w, a) for w, a in hw.pairs if w in bits and a in bits]
            if not pairs:
                raise IndicatorError(f"indicator bits {sorted(bits)} cover none of hardware {hw.name!r}'s pairs "
                                     f"({', '.join(f'W{w}A{a}' for w, a in hw.pairs)})")
            if not indicators.has_act:
                raise IndicatorError("indicators have no activation step sizes; pass weight_only=True for a "
                                     "weight-only search")
            indicators.check_covers(searchable, sorted({w for w, _ in pairs}), sorted({a for _, a in pairs}))
        self.pairs = pairs
        # cleaned indicators, prohibitive price
        iw, ia, pw, pa = {}, {}, {}, {}
        for n in searchable:
            iw[n], pw[n] = _clean(dict(indicators.weight[n]), clean)
            if not weight_only:
                ia[n], pa[n] = _clean(dict(indicators.act[n]), clean)
        scale = sum(self.alpha * max(iw[n].values()) + (max(ia[n].values()) if not weight_only else 0.0)
                    for n in searchable)
        self.price = 10.0 * scale + 1.0  # > any objective difference among unpriced policies
        pw_arr = np.array([p[0] for p in pairs])
        pa_arr = np.array([p[1] for p in pairs])
        self.layer_obj: dict[str, np.ndarray] = {}
        self.layer_priced: dict[str, np.ndarray] = {}
        self.layer_cost: dict[str, np.ndarray] = {}
        for n in searchable:
            wv = np.array([self.price if w in pw[n] else iw[n][w] for w in pw_arr])
            pr = np.array([w in pw[n] for w in pw_arr], dtype=np.int64)
            if weight_only:
                av = np.zeros(len(pairs))
            else:
                av = np.array([self.price if a in pa[n] else ia[n][a] for a in pa_arr])
                pr = pr + np.array([a in pa[n] for a in pa_arr], dtype=np.int64)
            self.layer_obj[n] = self.alpha * wv + av
            self.layer_priced[n] = pr
            meta = analysis.layer(n)
            self.layer_cost[n] = np.array([[meta.costs[p][k] for k in self.metrics] for p in pairs])
        self.pinned_cost = np.zeros(len(self.metrics))
        for m in analysis.pinned:
            c = analysis.layer_cost(m.name, *m.pin_bits)
            self.pinned_cost += np.array([c[k] for k in self.metrics])
        # units: single layers, or groups tied by a shared activation quantizer
        groups = analysis.shared_input_groups() if hw.share_input_quantizer else []
        grouped = {n for g in groups for n in g}
        self.units: list[_Unit] = []
        for n in searchable:
            if n not in grouped:
                self.units.append(_Unit((n,), np.array(pairs)[:, None, :], self.layer_obj[n], self.layer_cost[n],
                                        self.layer_priced[n], self.layer_obj[n][:, None]))
        for g in groups:
            unit = self._group_unit(g)
            if unit is not None:
                self.units.append(unit)
        self.groups = groups
        # flattened columns
        self.col_unit = np.concatenate([np.full(len(u.obj), i) for i, u in enumerate(self.units)])
        self.col_choice = np.concatenate([np.arange(len(u.obj)) for u in self.units])
        self.obj = np.concatenate([u.obj for u in self.units])
        self.cost = np.concatenate([u.cost for u in self.units]).T.copy()  # [M, n]
        self.priced = np.concatenate([u.priced for u in self.units])
        self.build_time = time.perf_counter() - t0

    def _group_unit(self, group: list[str]) -> _Unit | None:
        an = self.analysis
        pinned = [n for n in group if an.layer(n).pinned]
        members = [n for n in group if not an.layer(n).pinned]
        if not members:
            return None
        a_sets = [{a for _, a in self.pairs} for _ in members]
        allowed = set.intersection(*a_sets)
        pin_as = {an.layer(n).pin_bits[1] for n in pinned}
        if len(pin_as) > 1:
            raise PolicyError(f"layers {', '.join(pinned)} read one tensor (shared activation quantizer) but are "
                              f"pinned at different activation bits {sorted(pin_as)}")
        if pin_as:
            allowed &= pin_as
        if not allowed:
            raise PolicyError(f"layers {', '.join(group)} share an activation quantizer but no activation bit-width "
                              f"is available to all of them (pins {sorted(pin_as)}, pairs {self.pairs})")
        idx_by_a = {a: [i for i, p in enumerate(self.pairs) if p[1] == a] for a in allowed}
        choices, objs, costs, priced, values = [], [], [], [], []
        for a in sorted(allowed):
            # incremental Pareto merge over (priced, obj, costs) keeps the combinations few
            cur_idx = np.zeros((1, 0), dtype=np.int64)
            cur = np.zeros((1, 2 + len(self.metrics)))
            for n in members:
                ids = np.array(idx_by_a[a])
                add = np.column_stack([self.layer_priced[n][ids], self.layer_obj[n][ids], self.layer_cost[n][ids]])
                nxt = (cur[:, None, :] + add[None, :, :]).reshape(-1, cur.shape[1])
                nxt_idx = np.concatenate([np.repeat(cur_idx, len(ids), axis=0),
                                          np.tile(ids, len(cur_idx))[:, None]], axis=1)
                keep = _nondominated(nxt)
                cur, cur_idx = nxt[keep], nxt_idx[keep]
                if len(cur) > _MAX_GROUP_CHOICES:
                    raise FxmpqError(f"shared-activation group {group} has too many combinations to search")
            for row, ids in zip(cur, cur_idx):
                choices.append([self.pairs[i] for i in ids])
                priced.append(row[0])
                objs.append(row[1])
                costs.append(row[2:])
                values.append([self.layer_obj[n][i] for n, i in zip(members, ids)])
        return _Unit(tuple(members), np.array(choices), np.array(objs), np.array(costs),
                     np.array(priced, dtype=np.int64), np.array(values))

    # ------------------------------------------------------------------ helpers
    def min_totals(self, cols: np.ndarray) -> np.ndarray:
        """Per metric: the smallest achievable whole-model total using `cols` (per-unit minima)."""
        out = self.pinned_cost.copy()
        for k in range(len(self.metrics)):
            per = np.full(len(self.units), np.inf)
            np.minimum.at(per, self.col_unit[cols], self.cost[k, cols])
            out[k] += per.sum()
        return out

    def policy(self, sel: np.ndarray) -> tuple[Policy, dict[str, float]]:
        """The complete policy (pinned included) and per-layer objective values of one column per unit."""
        bits, values = {}, {}
        for u, j in enumerate(sel):
            unit, c = self.units[u], self.col_choice[j]
            for li, n in enumerate(unit.layers):
                bits[n] = tuple(int(b) for b in unit.choices[c, li])
                values[n] = float(unit.values[c, li])
        for m in self.analysis.pinned:
            bits[m.name] = m.pin_bits
        return Policy({m.name: bits[m.name] for m in self.analysis.layers}), values


def _nondominated(pts: np.ndarray) -> np.ndarray:
    """Indices of rows of `pts` that no other row weakly dominates (exact duplicates: the first is kept)."""
    order = np.lexsort(pts.T[::-1])
    pts_sorted = pts[order]
    keep: list[int] = []
    kept = np.zeros((0, pts.shape[1]))
    for i, p in enumerate(pts_sorted):
        if len(kept) and np.any(np.all(kept <= p, axis=1)):
            continue
        keep.append(i)
        kept = np.vstack([kept, p])
    return np.sort(order[keep])


def _pareto(pts: np.ndarray) -> np.ndarray:
    """Indices of the rows of `pts` that no other row weakly dominates (of equal rows, one is kept).

    Rows are visited in lexicographic order, so only earlier rows can dominate a later one: with two columns
    that is a running minimum, with three a staircase of the earlier rows' last two columns, otherwise blocks
    of pairwise comparisons.
    """
    n, dims = pts.shape
    if n < 2:
        return np.arange(n)
    order = np.lexsort(pts.T[::-1])
    p = pts[order]
    if dims == 2:
        prev_min = np.minimum.accumulate(np.concatenate([[np.inf], p[:-1, 1]]))
        keep = p[:, 1] < prev_min
    elif dims == 3:
        keep = np.zeros(n, dtype=bool)
        xs: list[float] = []  # staircase of kept rows: ascending in column 1, strictly descending in column 2
        ys: list[float] = []
        for i, (x, y) in enumerate(p[:, 1:].tolist()):
            k = bisect.bisect_right(xs, x)
            if k and ys[k - 1] <= y:
                continue  # an earlier row is no worse in every column
            keep[i] = True
            end = k
            while end < len(xs) and ys[end] >= y:
                end += 1
            xs[k:end] = [x]
            ys[k:end] = [y]
    else:
        keep = np.ones(n, dtype=bool)
        for start in range(0, n, 512):
            blk = p[start:start + 512]
            dom = np.all(p[None, :, :] <= blk[:, None, :], axis=2)  # [b, n]: row j <= row i everywhere
            dom &= np.arange(n)[None, :] < (start + np.arange(len(blk)))[:, None]
            keep[start:start + len(blk)] = ~dom.any(axis=1)
    return np.sort(order[keep])


def _dominated_mask(unit_of: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[n] True where a column is weakly dominated by another column of its unit (ties: lower index wins)."""
    n = len(unit_of)
    out = np.zeros(n, dtype=bool)
    order = np.argsort(unit_of, kind="stable")
    bounds = np.flatnonzero(np.diff(unit_of[order])) + 1
    segments = np.split(order, bounds)
    by_size: dict[int, list[np.ndarray]] = {}
    for s in segments:
        by_size.setdefault(len(s), []).append(s)
    for size, segs in by_size.items():
        if size < 2:
            continue
        idx = np.stack(segs)  # [U, P]
        k = keys[:, idx]  # [D, U, P]
        le = np.all(k[:, :, :, None] >= k[:, :, None, :], axis=0)  # [U, i, j]: j <= i in every key
        eq = np.all(k[:, :, :, None] == k[:, :, None, :], axis=0)
        jlt = np.arange(size)[None, :] < np.arange(size)[:, None]  # j < i
        dom = le & (~eq | jlt[None])
        np.einsum("uii->ui", dom)[...] = False
        out[idx] = dom.any(axis=2)
    return out


# ============================================================================ the solver
@dataclass
class _Outcome:
    sel: np.ndarray | None
    status: str
    bound: float
    lp_bound: float
    n_reduced: int
    n_mip: int
    infeasible: bool = False


class _Solver:
    """Solves one multiple-choice knapsack instance exactly: reductions, LP bound, incumbent, HiGHS MIP."""

    def __init__(self, prob: _Problem, cols: np.ndarray, kidx: list[int], limits: np.ndarray,
                 time_limit: float | None):
        self.p, self.time_limit = prob, time_limit
        self.U = len(prob.units)
        self.b = limits - prob.pinned_cost[kidx]
        raw = prob.cost[np.ix_(kidx, cols)] if kidx else np.zeros((0, len(cols)))
        obj = prob.obj[cols]
        unit = prob.col_unit[cols]
        dom = _dominated_mask(unit, np.vstack([obj[None], raw]))
        self.cols = cols[~dom]
        self.unit = unit[~dom]
        self.obj = obj[~dom]
        self.raw = raw[:, ~dom]
        self.scale = np.where(self.b > 0, self.b, 1.0)
        self.sc = self.raw / self.scale[:, None]

    def feasible(self, sel_local: np.ndarray) -> bool:
        tot = self.raw[:, sel_local].sum(axis=1)
        return bool(np.all(tot <= self.b + 1e-12 * np.abs(self.b)))

    def run(self, start_cols: np.ndarray | None) -> _Outcome:
        n = len(self.obj)
        K = self.raw.shape[0]
        if K == 0:
            sel = np.full(self.U, -1)
            best = np.full(self.U, np.inf)
            for j in range(n):
                if self.obj[j] < best[self.unit[j]]:
                    best[self.unit[j]], sel[self.unit[j]] = self.obj[j], j
            v = float(self.obj[sel].sum())
            return _Outcome(self.cols[sel], "optimal", v, v, n, 0)
        eq = ilp.Rows(np.searchsorted(np.sort(self.unit), np.arange(self.U + 1)).astype(np.int64),
                      np.argsort(self.unit, kind="stable").astype(np.int64), np.ones(n))
        kn = ilp.Rows(np.arange(K + 1, dtype=np.int64) * n, np.tile(np.arange(n), K), self.sc.ravel())
        rows = ilp.Rows.stack([eq, kn])
        lo = np.concatenate([np.ones(self.U), np.full(K, -np.inf)])
        hi = np.concatenate([np.ones(self.U), self.b / self.scale])
        lp = ilp.solve(self.obj, rows, lo, hi, col_upper=np.inf, integral=False, time_limit=self.time_limit)
        if lp.status is ilp.Status.INFEASIBLE:
            return _Outcome(None, "infeasible", np.inf, np.inf, n, 0, infeasible=True)
        if lp.status is not ilp.Status.OPTIMAL:
            raise FxmpqError(f"the LP relaxation failed: {lp.message}")
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
        keep = r <= (ub - L) + tol
        keep[sel] = True
        per_unit = np.bincount(self.unit[keep], minlength=self.U)
        if np.all(per_unit == 1):
            return _Outcome(self.cols[sel], "optimal", ub, L, n, 0)
        # the DP first, however many units are undecided: on real networks it proves what HiGHS's branch and bound
        # needs seconds for (resnext101_64x4d with random indicators: 35 ms vs 41 s; efficientnet_v2_l 0.11 vs
        # 10.7 s); where it gives up (_DP_WORK) it has cost a fifth of the HiGHS solve that follows (tiled resnet50)
        found = self._enumerate(keep, sel, r, L, lam)
        if found is not None:
            return _Outcome(self.cols[found], "optimal", float(self.obj[found].sum()), L, n, 0)
        return self._mip(keep, sel, L, n)

    def _multipliers(self, lam: np.ndarray) -> np.ndarray:
        """[M, K] non-negative multipliers: the LP's, each component scaled by a few factors (all combinations)."""
        factors = np.array([0.0, 0.5, 0.8, 1.0, 1.25, 2.0])
        grids = [lam[k] * factors if lam[k] > 0 else np.zeros(1) for k in range(len(lam))]
        mesh = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1).reshape(-1, len(lam))
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
                pos = pos[_pareto(np.column_stack([o[pos], c[pos]]))]
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

    def _mip(self, keep: np.ndarray, sel: np.ndarray | None, L: float, n_reduced: int) -> _Outcome:
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
            sol = ilp.solve(self.obj[idx], rows, lo, hi, start=start, time_limit=self.time_limit,
                            options=_MIP_OPTIONS)
            if sol.status is ilp.Status.INFEASIBLE:
                return _Outcome(None, "infeasible", np.inf, L, n_reduced, m, infeasible=True)
            if sol.x is None:
                raise FxmpqError(f"HiGHS found no solution: {sol.message}")
            chosen = idx[sol.x > 0.5]
            if len(chosen) == self.U and self.feasible(chosen):
                break
            # HiGHS's tolerance accepted a hair over the limit: tighten the violated rows and solve again
            tot = self.raw[:, chosen].sum(axis=1)
            hi[self.U:] = np.minimum(hi[self.U:], (self.b - np.maximum(tot - self.b, 0) * 2) / self.scale)
            start = None if sel is None else start
        else:
            raise FxmpqError("HiGHS returned budget-violating solutions four times; cannot certify a policy")
        if sel is not None and float(self.obj[sel].sum()) < float(self.obj[chosen].sum()):
            chosen = sel
        status = "optimal" if sol.status is ilp.Status.OPTIMAL else "feasible"
        bound = max(sol.bound, L) if status == "optimal" else L
        chosen = chosen[np.argsort(self.unit[chosen])]
        return _Outcome(self.cols[chosen], status, bound, L, n_reduced, m)

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


# ============================================================================ public API
def _resolve(analysis: Analysis, budget: Budget | str | dict[str, float]) -> dict[str, float]:
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    elif isinstance(budget, dict):
        budget = Budget(**budget)
    if not isinstance(budget, Budget):
        raise InfeasibleBudget(f"budget must be a Budget, a budget string or a {{metric: limit}} dict, found "
                               f"{type(budget).__name__}")
    return budget.resolve(analysis)


def _solve(prob: _Problem, limits: dict[str, float], time_limit: float | None,
           start: np.ndarray | None = None) -> tuple[SearchResult, np.ndarray]:
    t0 = time.perf_counter()
    kidx = [prob.metrics.index(k) for k in limits]
    lim = np.array([limits[k] for k in limits], dtype=np.float64)
    all_cols = np.arange(len(prob.obj))
    unpriced = all_cols[prob.priced == 0]
    out = None
    if len(np.unique(prob.col_unit[unpriced])) == len(prob.units):
        mins = prob.min_totals(unpriced)[kidx]
        if np.all(mins <= lim + 1e-12 * np.abs(lim)):
            out = _Solver(prob, unpriced, kidx, lim, time_limit).run(start)
            if out.infeasible:
                out = None
    if out is None:  # the budget forces prohibitively priced points (they stay prices, never removals)
        mins_all = prob.min_totals(all_cols)
        if not np.all(mins_all[kidx] <= lim + 1e-12 * np.abs(lim)):
            out = None
        else:
            out = _Solver(prob, all_cols, kidx, lim, time_limit).run(start)
        if out is None or out.infeasible:
            parts = [f"{k} <= {limits[k]:.6g} (smallest achievable {mins_all[prob.metrics.index(k)]:.6g})"
                     for k in limits]
            jointly = "" if out is None else " (each limit alone is reachable, but not all of them at once)"
            raise InfeasibleBudget("no policy meets the budget" + jointly + ": " + "; ".join(parts)
                                   + ". Loosen the budget or allow more bit-widths.")
    sel = out.sel
    policy, values = prob.policy(sel)
    objective = float(prob.obj[sel].sum())
    totals = prob.analysis.cost(policy)
    for k, v in limits.items():  # checked without trusting the solver
        if totals[k] > v * (1 + 1e-9) + 1e-9:
            raise FxmpqError(f"internal error: the solved policy exceeds {k} ({totals[k]:.6g} > {v:.6g})")
    gap = max(0.0, objective - out.bound) if np.isfinite(out.bound) else math.inf
    if out.status == "optimal" and gap > 1e-9 * max(1.0, abs(objective)):
        out.status = "feasible"
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


def search(
    analysis: Analysis,
    indicators: Indicators,
    budget: Budget | str | dict[str, float],
    alpha: float = 2.0,
    *,
    weight_only: bool = False,
    clean: str = "paper",
    time_limit: float | None = None,
) -> SearchResult:
    """The policy minimising `sum_l I_act[l][a] + alpha * I_w[l][w]` within `budget`, proven optimal.

    Candidate (w, a) pairs are the hardware's pairs restricted to the indicators' bits; pinned layers stay at
    their pins. `clean="paper"` prices a bit-width whose step size is smaller than the next higher one's
    prohibitively (a large finite price); `"isotonic"` repairs the indicators to be monotone instead.
    `weight_only` ignores activation indicators (each weight bit-width runs with the widest activation bits the
    hardware pairs it with). With `hardware.share_input_quantizer`, layers reading one tensor share their
    activation bits. Raises InfeasibleBudget (with the smallest achievable value of each limited metric) and
    IndicatorError (listing what the indicators lack).
    """
    t0 = time.perf_counter()
    limits = _resolve(analysis, budget)
    prob = _Problem(analysis, indicators, alpha, weight_only, clean)
    res, _ = _solve(prob, limits, time_limit)
    return _with_time(res, time.perf_counter() - t0, prob.build_time)


def _with_time(res: SearchResult, total: float, build: float) -> SearchResult:
    from dataclasses import replace

    return replace(res, solve_time=total - build, build_time=build)


def pareto(
    analysis: Analysis,
    indicators: Indicators,
    metric: str = "bitops",
    points: int = 50,
    *,
    alpha: float = 2.0,
    low: float | None = None,
    high: float | None = None,
    budget: Budget | str | None = None,
    weight_only: bool = False,
    clean: str = "paper",
    time_limit: float | None = None,
) -> ParetoResult:
    """Optimal policies for `points` limits on `metric` from `low` to `high` (ascending), other limits from `budget`.

    By default the range runs from the smallest achievable `metric` to its value at the unconstrained optimum.
    The prepared arrays are built once; each solve starts from the previous (tighter) optimum.
    """
    if metric not in analysis.hardware.metrics:
        raise InfeasibleBudget(f"pareto metric {metric!r} is not a metric of hardware {analysis.hardware.name!r}; "
                               f"its metrics: {', '.join(analysis.hardware.metrics)}")
    if points < 1:
        raise FxmpqError(f"points must be >= 1, found {points}")
    base = _resolve(analysis, budget) if budget is not None else {}
    prob = _Problem(analysis, indicators, alpha, weight_only, clean)
    k = prob.metrics.index(metric)
    if low is None:
        low = float(prob.min_totals(np.flatnonzero(prob.priced == 0)
                                    if len(np.unique(prob.col_unit[prob.priced == 0])) == len(prob.units)
                                    else np.arange(len(prob.obj)))[k])
    if high is None:
        free, _ = _solve(prob, {m: v for m, v in base.items() if m != metric}, time_limit)
        high = float(free.totals[metric])
    budgets = tuple(float(x) for x in np.linspace(low, max(high, low), points))
    results, start = [], None
    for b in budgets:
        limits = dict(base)
        limits[metric] = min(b, base.get(metric, math.inf))
        res, start = _solve(prob, limits, time_limit, start)
        results.append(res)
    return ParetoResult(metric, budgets, tuple(results))
