"""What a search returns: SearchResult (policy, totals, proof), ParetoResult (a budget sweep), their tables and JSON."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.jsonio import dump_json
from ..core.tables import render
from ..cost.policy import Policy
from ..hardware.formats import format_name

if TYPE_CHECKING:
    from ..cost.analysis import Analysis
    from .indicators import Indicators

__all__ = ["ParetoResult", "SearchResult", "SearchStatus"]


class SearchStatus(enum.StrEnum):
    """What a search proved about its policy (compares equal to its string value)."""

    OPTIMAL = "optimal"  # proven optimal: absolute gap at most 1e-9 x max(1, |objective|)
    FEASIBLE = "feasible"  # within the budget, optimality not proven (a time limit was hit; `gap` says how far)


@dataclass(frozen=True)
class SearchResult:
    """An optimal policy with its objective, every metric's total against its limit, and the solver's proof."""

    policy: Policy
    objective: float
    totals: dict[str, float]
    limits: dict[str, float]
    status: SearchStatus
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", SearchStatus(self.status))

    @property
    def optimal(self) -> bool:
        """Whether optimality is proven (absolute gap 0)."""
        return self.status is SearchStatus.OPTIMAL

    def table(self, analysis: Analysis, indicators: Indicators | None = None) -> str:
        """Per searchable layer: bits, indicator terms, and each constrained metric's share of its limit (%)."""
        metrics = list(self.limits)

        def shares(cost: dict[str, float]) -> list[str]:
            return [f"{100 * cost[k] / self.limits[k]:.2f}" if self.limits[k] > 0 else "-" for k in metrics]

        header = ["layer", "W/A", "I_w", "I_a", "objective", *[f"{m} %" for m in metrics]]
        rows = []
        for m in analysis.layers:
            w, a = self.policy[m.name]
            iw = ia = ""
            if indicators is not None and m.name in indicators.weight:
                iw = f"{indicators.weight[m.name].get(w, float('nan')):.4g}"
                if m.name in indicators.act:
                    ia = f"{indicators.act[m.name].get(a, float('nan')):.4g}"
            val = self.layer_values.get(m.name)
            rows.append([m.name, format_name((w, a)) + ("*" if m.pinned else ""), iw, ia,
                         "" if val is None else f"{val:.4g}", *shares(analysis.layer_cost(m.name, w, a))])
        rows.append(["total", "", "", "", f"{self.objective:.6g}", *shares(self.totals)])
        lines = [render(header, rows, left=2), "(* pinned)"]
        for k in metrics:
            lines.append(f"{k}: {self.totals[k]:.6g} <= {self.limits[k]:.6g}")
        lines.append(f"status {self.status}, gap {self.gap:.3g} (relative {self.rel_gap:.3g}), "
                     f"solve {1e3 * self.solve_time:.1f} ms, variables {self.n_vars} -> {self.n_vars_reduced} "
                     f"-> {self.n_vars_mip}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the policy plus the search's numbers (the status as its string value)."""
        return {"policy": self.policy.to_dict(), "objective": self.objective, "totals": self.totals,
                "limits": self.limits, "status": self.status.value, "gap": self.gap, "rel_gap": self.rel_gap,
                "bound": self.bound, "lp_bound": self.lp_bound, "solve_time": self.solve_time,
                "build_time": self.build_time, "n_vars": self.n_vars, "n_vars_reduced": self.n_vars_reduced,
                "n_vars_mip": self.n_vars_mip, "priced_points": self.priced_points, "alpha": self.alpha,
                "weight_only": self.weight_only}

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; also write it to `path` when given."""
        return dump_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchResult:
        """The inverse of to_dict (the per-layer objective values are not stored: the table leaves them blank);
        KeyError, TypeError or ValueError (PolicyError for the policy) when `data` is not one."""
        names = {f.name for f in dataclasses.fields(cls)} - {"policy", "layer_values"}
        return cls(policy=Policy.from_json(json.dumps(data["policy"])), **{k: data[k] for k in names if k in data})


@dataclass(frozen=True)
class ParetoResult:
    """Optimal policies across a range of limits on one metric (ascending)."""

    metric: str
    budgets: tuple[float, ...]
    results: tuple[SearchResult, ...]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[SearchResult]:
        return iter(self.results)

    def __getitem__(self, i: int) -> SearchResult:
        return self.results[i]

    def plot(self, path: str | Path, analysis: Analysis | None = None) -> Path:
        """Write a figure: objective vs budget, and per-layer weight/activation bits vs budget (heat maps)."""
        import matplotlib  # only here: importing fxmpq stays fast

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.results[0].policy) if analysis is None else [m.name for m in analysis.searchable]
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
