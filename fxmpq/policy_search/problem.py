"""The search problem as arrays: analysis x indicators -> one multiple-choice knapsack (units, choices, costs)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

from ..core.dominance import nondominated
from ..cost.policy import Policy
from ..errors import (
    ArgumentError,
    HardwareSpecError,
    IndicatorError,
    InfeasibleBudget,
    PolicyError,
    SolverError,
)
from ..hardware.spec import FLOAT
from .indicators import Cleaning, Indicators

if TYPE_CHECKING:
    from ..cost.analysis import Analysis
    from ..hardware.spec import HardwareSpec

__all__ = ["Problem", "Unit", "candidate_pairs", "float_layers", "infeasible_budget", "layer_formats",
           "weight_only_layers"]

Pair = tuple[int, int]

_MAX_GROUP_CHOICES = 200_000


def candidate_pairs(hw: HardwareSpec, bits: Sequence[int] | None, weight_only: bool) -> list[Pair]:
    """The (w, a) pairs a layer may take: the hardware's, restricted to `bits` (None: all of them).

    Weight-only: one pair per weight bit-width in `bits`, with the widest activation bits the hardware pairs it
    with (activations are not searched). May be empty; callers say why that is an error.
    """
    allowed = set(hw.weight_bits) | set(hw.act_bits) if bits is None else set(bits)
    if weight_only:
        best_a: dict[int, int] = {}
        for w, a in hw.pairs:
            if w in allowed:
                best_a[w] = max(a, best_a.get(w, a))
        return sorted(best_a.items())
    return [(w, a) for w, a in hw.pairs if w in allowed and a in allowed]


def infeasible_budget(limits: Mapping[str, float], smallest: Mapping[str, float], *,
                      jointly: bool) -> InfeasibleBudget:
    """The error for a budget no policy meets, stating each limited metric's smallest achievable total."""
    parts = [f"{k} <= {limits[k]:.6g} (smallest achievable {smallest[k]:.6g})" for k in limits]
    why = " (each limit alone is reachable, but not all of them at once)" if jointly else ""
    return InfeasibleBudget("no policy meets the budget" + why + ": " + "; ".join(parts)
                            + ". Loosen the budget or allow more bit-widths.")


@dataclass
class Unit:
    """Searchable layers that choose together (one layer, or a group sharing its activation quantizer)."""

    layers: tuple[str, ...]
    choices: np.ndarray  # [C, len(layers), 2] (w, a)
    obj: np.ndarray  # [C]
    cost: np.ndarray  # [C, M] all hardware metrics
    priced: np.ndarray  # [C] number of prohibitively priced points used
    values: np.ndarray  # [C, len(layers)] per-layer objective share


class Problem:
    """Numpy arrays of one instance: a column per (unit, choice) with its objective, priced count and costs.

    Build it with `from_indicators` (the search's objective) or `costs_only` (a zero objective: feasibility).
    Columns are `units` flattened in order: `col_unit`, `col_choice`, `obj` [n], `priced` [n], `cost` [M, n].
    """

    def __init__(self, analysis: Analysis, pairs: Sequence[Pair], layer_obj: Mapping[str, np.ndarray],
                 layer_priced: Mapping[str, np.ndarray], *, alpha: float = 0.0, weight_only: bool = False):
        self.analysis, self.alpha, self.weight_only = analysis, float(alpha), weight_only
        self.pairs = list(pairs)
        hw = analysis.hardware
        self.metrics = list(hw.metrics)
        searchable = [m.name for m in analysis.searchable]
        self.layer_obj = dict(layer_obj)
        self.layer_priced = dict(layer_priced)
        floats = float_layers(analysis)
        wo = weight_only_layers(analysis, self.pairs)
        self.layer_pairs = {n: layer_formats(self.pairs, n in floats, wo.get(n, ())) for n in searchable}
        self.layer_cost: dict[str, np.ndarray] = {}
        for n in searchable:
            costs = analysis.layer(n).costs
            self.layer_cost[n] = np.array([[costs[p][k] for k in self.metrics] for p in self.layer_pairs[n]])
        # the fixed part of every total: the model-level constants and the pinned layers' costs
        constant = hw.model_cost()
        self.pinned_cost = np.array([constant[k] for k in self.metrics], dtype=np.float64)
        for m in analysis.pinned:
            c = analysis.layer_cost(m.name, *m.pin_bits)
            self.pinned_cost += np.array([c[k] for k in self.metrics])
        # chain terms (a layer's cost changes when the layer it reads back to back runs in the same format): a
        # pinned end folds into the other end's costs; searchable layers joined by them choose together
        chains = self._fold_pinned_chains() if hw.chained else []
        # units: single layers, or groups tied by a shared activation quantizer or by chain terms
        groups = analysis.shared_input_groups() if hw.share_input_quantizer else []
        if groups and chains:
            raise HardwareSpecError(f"hardware {hw.name!r} ({hw.path}) has both share_input_quantizer and per-layer chain "
                             f"terms; the search handles one or the other")
        grouped = {n for g in groups + chains for n in g}
        self.units: list[Unit] = []
        for n in searchable:
            if n not in grouped:
                choices = np.array([_code(p) for p in self.layer_pairs[n]])[:, None, :]
                self.units.append(Unit((n,), choices, self.layer_obj[n], self.layer_cost[n],
                                       self.layer_priced[n], self.layer_obj[n][:, None]))
        for g in groups:
            unit = self._group_unit(g)
            if unit is not None:
                self.units.append(unit)
        for c in chains:
            self.units.append(self._chain_unit(c))
        self.groups = groups
        self.chains = chains
        self.col_unit = np.concatenate([np.full(len(u.obj), i) for i, u in enumerate(self.units)])
        self.col_choice = np.concatenate([np.arange(len(u.obj)) for u in self.units])
        self.obj = np.concatenate([u.obj for u in self.units])
        self.cost = np.concatenate([u.cost for u in self.units]).T.copy()  # [M, n]
        self.priced = np.concatenate([u.priced for u in self.units])
        self.price = 0.0  # the prohibitive price (from_indicators sets it)
        self.build_time = 0.0

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_indicators(cls, analysis: Analysis, indicators: Indicators, alpha: float = 2.0,
                        weight_only: bool = False, clean: Cleaning | str = Cleaning.PAPER) -> Problem:
        """The search's instance: objective `alpha * I_w + I_a` of the cleaned indicators per layer and pair.

        The paper's rule gives a prohibitively priced point the price `10 * (sum of the largest indicator terms)
        + 1`, more than any objective difference among unpriced policies.
        """
        t0 = time.perf_counter()
        clean = Cleaning.coerce(clean)
        if isinstance(alpha, bool) or not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
            raise ArgumentError(f"alpha must be a finite non-negative number, found {alpha!r}")
        hw = analysis.hardware
        searchable = _searchable(analysis)
        pairs = candidate_pairs(hw, indicators.bits, weight_only)
        bits = sorted(set(indicators.bits))
        if weight_only:
            if not pairs:
                raise IndicatorError(f"indicator bits {bits} share no weight bit-width with hardware "
                                     f"{hw.name!r} (weight bits {list(hw.weight_bits)})")
            indicators.check_covers(searchable, sorted({w for w, _ in pairs}))
        else:
            if not pairs:
                raise IndicatorError(f"indicator bits {bits} cover none of hardware {hw.name!r}'s pairs "
                                     f"({', '.join(f'W{w}A{a}' for w, a in hw.pairs)})")
            if not indicators.has_act:
                raise IndicatorError("indicators have no activation step sizes; pass weight_only=True for a "
                                     "weight-only search")
            indicators.check_covers(searchable, sorted({w for w, _ in pairs}), sorted({a for _, a in pairs}))
        ind, pw, pa = indicators.cleaned(clean)
        iw, ia = ind.weight, ind.act
        alpha = float(alpha)
        scale = sum(alpha * max(iw[n].values()) + (max(ia[n].values()) if not weight_only else 0.0)
                    for n in searchable)
        price = 10.0 * scale + 1.0  # > any objective difference among unpriced policies
        pw_arr = [p[0] for p in pairs]
        pa_arr = [p[1] for p in pairs]
        layer_obj, layer_priced = {}, {}
        floats = float_layers(analysis)
        wo = weight_only_layers(analysis, pairs)
        for n in searchable:
            wv = np.array([price if w in pw[n] else iw[n][w] for w in pw_arr])
            pr = np.array([w in pw[n] for w in pw_arr], dtype=np.int64)
            if weight_only:
                av = np.zeros(len(pairs))
            else:
                av = np.array([price if a in pa[n] else ia[n][a] for a in pa_arr])
                pr = pr + np.array([a in pa[n] for a in pa_arr], dtype=np.int64)
            obj = alpha * wv + av
            for w in wo.get(n, ()):  # weight-only: the weight indicator at w bits, activation indicator 0
                obj = np.append(obj, alpha * (price if w in pw[n] else iw[n][w]))
                pr = np.append(pr, int(w in pw[n]))
            if n in floats:  # float: no quantization error, indicator 0
                obj, pr = np.append(obj, 0.0), np.append(pr, 0)
            layer_obj[n] = obj
            layer_priced[n] = pr
        prob = cls(analysis, pairs, layer_obj, layer_priced, alpha=alpha, weight_only=weight_only)
        prob.price = price
        prob.build_time = time.perf_counter() - t0
        return prob

    @classmethod
    def costs_only(cls, analysis: Analysis, bits: Sequence[int] | None = None, *,
                   weight_only: bool = False) -> Problem:
        """The same units and costs with a zero objective (no indicators): what is feasible, not what is best."""
        t0 = time.perf_counter()
        hw = analysis.hardware
        searchable = _searchable(analysis)
        pairs = candidate_pairs(hw, bits, weight_only)
        if not pairs:
            raise ArgumentError(f"bits {sorted(set(bits or ()))} cover none of hardware {hw.name!r}'s pairs "
                                f"({', '.join(f'W{w}A{a}' for w, a in hw.pairs)})")
        floats = float_layers(analysis)
        wo = weight_only_layers(analysis, pairs)
        sizes = {n: len(layer_formats(pairs, n in floats, wo.get(n, ()))) for n in searchable}
        prob = cls(analysis, pairs, {n: np.zeros(k) for n, k in sizes.items()},
                   {n: np.zeros(k, dtype=np.int64) for n, k in sizes.items()}, weight_only=weight_only)
        prob.build_time = time.perf_counter() - t0
        return prob

    def _chain_delta(self, name: str, fmt: Pair | tuple[None, None], after: Pair | tuple[None, None]) -> np.ndarray:
        c = self.analysis.layer(name).chain_costs.get((fmt, after))
        return np.zeros(len(self.metrics)) if c is None else np.array([c[k] for k in self.metrics])

    def _fold_pinned_chains(self) -> list[list[str]]:
        """Fold every chain term with a pinned end into fixed costs; the groups (size >= 2, graph order) of
        searchable layers joined by the others."""
        an = self.analysis
        searchable = set(self.layer_pairs)
        g = nx.Graph()
        for m in an.layers:
            u = m.input_layer
            if u is None or not m.chain_costs:
                continue
            prod = an.layer(u)
            if m.pinned and prod.pinned:
                self.pinned_cost += self._chain_delta(m.name, m.pin_bits, prod.pin_bits)
            elif prod.pinned:  # each choice of this layer gets its chain change after the producer's pin
                for i, pair in enumerate(self.layer_pairs[m.name]):
                    self.layer_cost[m.name][i] += self._chain_delta(m.name, pair, prod.pin_bits)
            elif m.pinned:  # each choice of the producer gets this (pinned) layer's change after it
                for i, pair in enumerate(self.layer_pairs[u]):
                    self.layer_cost[u][i] += self._chain_delta(m.name, m.pin_bits, pair)
            elif u in searchable and m.name in searchable:
                g.add_edge(u, m.name)
        order = {n: i for i, n in enumerate(an.names)}
        return sorted((sorted(c, key=order.__getitem__) for c in nx.connected_components(g)),
                      key=lambda c: order[c[0]])

    def _chain_unit(self, members: list[str]) -> Unit:
        """One unit for layers joined by chain terms: every combination of their formats, pruned to the Pareto
        front of (priced, objective, costs), each with its exact cost (each layer's chain change for its format and
        that of the layer it reads). Layers are taken in graph order; a partial combination is kept by the formats
        of the layers still to be read."""
        an = self.analysis
        inside = set(members)
        prod = {n: an.layer(n).input_layer for n in members if an.layer(n).input_layer in inside}
        last_read = {}
        for i, n in enumerate(members):
            if n in prod:
                last_read[prod[n]] = i
        width = 2 + len(self.metrics)
        # a state: (open layers' choice indices as a sorted tuple of (name, j), vector, choice index per member)
        states: list[tuple[tuple[tuple[str, int], ...], np.ndarray, tuple[int, ...]]] = [((), np.zeros(width), ())]
        for i, n in enumerate(members):
            nxt: dict[tuple[tuple[str, int], ...], list[tuple[np.ndarray, tuple[int, ...]]]] = {}
            for key, vec, sel in states:
                open_ = dict(key)
                for j, pair in enumerate(self.layer_pairs[n]):
                    add = np.concatenate([[self.layer_priced[n][j], self.layer_obj[n][j]], self.layer_cost[n][j]])
                    p = prod.get(n)
                    if p is not None:
                        add[2:] += self._chain_delta(n, pair, self.layer_pairs[p][open_[p]])
                    new_open = {**open_, n: j}
                    new_open = {k: v for k, v in new_open.items() if last_read.get(k, -1) > i}
                    nxt.setdefault(tuple(sorted(new_open.items())), []).append((vec + add, (*sel, j)))
            states = []
            for key, items in nxt.items():
                vecs = np.array([v for v, _ in items])
                for idx in nondominated(vecs):
                    states.append((key, items[idx][0], items[idx][1]))
            if len(states) > _MAX_GROUP_CHOICES:
                raise SolverError(f"chained layers {members} have too many format combinations to search")
        vecs = np.array([v for _, v, _ in states])
        keep = nondominated(vecs)
        sels = [states[i][2] for i in keep]
        choices = np.array([[_code(self.layer_pairs[n][j]) for n, j in zip(members, sel)] for sel in sels])
        values = np.array([[self.layer_obj[n][j] for n, j in zip(members, sel)] for sel in sels])
        v = vecs[keep]
        return Unit(tuple(members), choices, v[:, 1], v[:, 2:], v[:, 0].astype(np.int64), values)

    def _group_unit(self, group: list[str]) -> Unit | None:
        an = self.analysis
        pinned = [n for n in group if an.layer(n).pinned]
        members = [n for n in group if not an.layer(n).pinned]
        if not members:
            return None
        allowed = {a for _, a in self.pairs}
        pin_as = {an.layer(n).pin_bits[1] for n in pinned}
        if len(pin_as) > 1:
            raise PolicyError(f"layers {', '.join(pinned)} read one tensor (shared activation quantizer) but are "
                              f"pinned at different activation bits {sorted(pin_as)}")
        if pin_as:
            allowed &= pin_as
        if not allowed:
            raise PolicyError(f"layers {', '.join(group)} share an activation quantizer but no activation bit-width "
                              f"is available to all of them (pins {sorted(pin_as)}, pairs {self.pairs})")
        choices, objs, costs, priced, values = [], [], [], [], []
        for a in sorted(allowed):
            ids = np.array([i for i, p in enumerate(self.pairs) if p[1] == a])
            # incremental Pareto merge over (priced, obj, costs) keeps the combinations few
            cur_idx = np.zeros((1, 0), dtype=np.int64)
            cur = np.zeros((1, 2 + len(self.metrics)))
            for n in members:
                add = np.column_stack([self.layer_priced[n][ids], self.layer_obj[n][ids], self.layer_cost[n][ids]])
                nxt = (cur[:, None, :] + add[None, :, :]).reshape(-1, cur.shape[1])
                nxt_idx = np.concatenate([np.repeat(cur_idx, len(ids), axis=0),
                                          np.tile(ids, len(cur_idx))[:, None]], axis=1)
                keep = nondominated(nxt)
                cur, cur_idx = nxt[keep], nxt_idx[keep]
                if len(cur) > _MAX_GROUP_CHOICES:
                    raise SolverError(f"shared-activation group {group} has too many combinations to search")
            for row, sel in zip(cur, cur_idx):
                choices.append([self.pairs[i] for i in sel])
                priced.append(row[0])
                objs.append(row[1])
                costs.append(row[2:])
                values.append([self.layer_obj[n][i] for n, i in zip(members, sel)])
        return Unit(tuple(members), np.array(choices), np.array(objs), np.array(costs),
                    np.array(priced, dtype=np.int64), np.array(values))

    # ------------------------------------------------------------------ helpers
    @property
    def unpriced_cols(self) -> np.ndarray | None:
        """Columns without a prohibitively priced point, or None when some unit has no such column."""
        cols = np.flatnonzero(self.priced == 0)
        return cols if len(np.unique(self.col_unit[cols])) == len(self.units) else None

    def min_totals(self, cols: np.ndarray | None = None) -> np.ndarray:
        """Per metric: the smallest achievable whole-model total using `cols` (default all; per-unit minima)."""
        cols = np.arange(len(self.obj)) if cols is None else cols
        out = self.pinned_cost.copy()
        for k in range(len(self.metrics)):
            per = np.full(len(self.units), np.inf)
            np.minimum.at(per, self.col_unit[cols], self.cost[k, cols])
            out[k] += per.sum()
        return out

    def limit_arrays(self, limits: Mapping[str, float]) -> tuple[list[int], np.ndarray]:
        """(metric row of each limit, the limits as an array) in the order of `limits`."""
        return [self.metrics.index(k) for k in limits], np.array(list(limits.values()), dtype=np.float64)

    def selection(self, policy: Policy) -> np.ndarray | None:
        """The columns (one per unit, in unit order) that make `policy`; None when some unit does not keep its
        layers' combination (a choice the solver can never return, so no cut is needed to exclude it)."""
        sel = np.empty(len(self.units), dtype=np.int64)
        offset = 0
        for u, unit in enumerate(self.units):
            want = np.array([_code(policy[n]) for n in unit.layers])
            hit = np.flatnonzero(np.all(unit.choices == want[None], axis=(1, 2)))
            if not len(hit):
                return None
            sel[u] = offset + int(hit[0])
            offset += len(unit.obj)
        return sel

    def policy(self, sel: np.ndarray) -> tuple[Policy, dict[str, float]]:
        """The complete policy (pinned included) and per-layer objective values of one column per unit."""
        bits, values = {}, {}
        for u, j in enumerate(sel):
            unit, c = self.units[u], self.col_choice[j]
            for li, n in enumerate(unit.layers):
                bits[n] = _decode(unit.choices[c, li])
                values[n] = float(unit.values[c, li])
        for m in self.analysis.pinned:
            bits[m.name] = m.pin_bits
        return Policy({m.name: bits[m.name] for m in self.analysis.layers}), values


def float_layers(analysis: Analysis) -> frozenset[str]:
    """Searchable layers the hardware may leave in float (their kind is in `float_kinds`).

    Layers tied by a shared activation quantizer choose among integer pairs only (a float member would not read
    the shared quantizer).
    """
    hw = analysis.hardware
    grouped = {n for g in analysis.shared_input_groups() for n in g} if hw.share_input_quantizer else set()
    return frozenset(m.name for m in analysis.searchable if FLOAT in hw.formats(m.kind) and m.name not in grouped)


def weight_only_layers(analysis: Analysis, pairs: Sequence[Pair]) -> dict[str, tuple[int, ...]]:
    """Searchable linear layers the hardware may run weight-only, and at which of the candidates' weight bits.

    Like float, a weight-only layer reads no activation quantizer, so layers tied by a shared one are left out.
    """
    hw = analysis.hardware
    candidates = {p[0] for p in pairs}
    grouped = {n for g in analysis.shared_input_groups() for n in g} if hw.share_input_quantizer else set()
    out = {}
    for m in analysis.searchable:  # the formats the hardware offers the layer (the one rule), at candidate bits
        bits = tuple(w for w, a in hw.formats(m.kind) if a is None and w is not None and w in candidates)
        if bits and m.name not in grouped:
            out[m.name] = bits
    return out


def layer_formats(pairs: Sequence[Pair], may_float: bool, weight_only: Sequence[int] = ()
                  ) -> list[Pair | tuple[None, None]]:
    """The candidates of one layer: `pairs`, the weight-only (w, None) at `weight_only` bits, float last when it
    may stay in float."""
    return [*pairs, *((w, None) for w in weight_only), *((FLOAT,) if may_float else ())]


def _code(pair: Pair | tuple[None, None]) -> tuple[int, int]:
    """A format as two integers for the choice arrays: float is (0, 0), weight-only (w, 0) (no layer runs at 0
    bits)."""
    return (0, 0) if pair == FLOAT else (pair[0], 0) if pair[1] is None else pair


def _decode(row: np.ndarray) -> Pair | tuple[None, None]:
    w, a = (int(b) for b in row)
    return FLOAT if (w, a) == (0, 0) else (w, None) if a == 0 else (w, a)


def _searchable(analysis: Analysis) -> list[str]:
    names = [m.name for m in analysis.searchable]
    if not analysis.layers:
        raise ArgumentError("the model has no quantizable layers (no Conv1d, Conv2d or Linear call in the traced graph); "
                          "nothing to quantize or search. Check that the model computes with such layers, and that "
                          "none sits inside a module kept opaque (leaf_modules)")
    if not names:
        pinned = [m.name for m in analysis.layers]
        raise PolicyError(f"all {len(pinned)} quantizable layer(s) are pinned ({', '.join(pinned[:5])}"
                          f"{', ...' if len(pinned) > 5 else ''}), so there is nothing to search; the pins come from "
                          f"hardware {analysis.hardware.name!r}'s [pins] table or prepare(pins=...), e.g. "
                          f"pins=fxmpq.Pins(first_layer=False, last_layer=False) searches every layer")
    return names
