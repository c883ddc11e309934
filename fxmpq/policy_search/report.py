"""Figures a person reads: bits per layer, indicators per layer and bit, the Pareto curve with the chosen point."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..cost.analysis import Analysis
    from ..cost.policy import Policy
    from .api import ParetoResult
    from .indicators import Indicators


__all__ = ["plot_bits", "plot_indicators", "plot_pareto"]

_FLOAT_BAR = 9  # the bar height of a float layer: above every integer bit-width (1..8)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bits(policy: Policy, analysis: Analysis, path: str | Path) -> Path:
    """Bar chart of weight and activation bits per layer (graph order); pinned layers hatched; a float layer is a
    grey bar at 9 ("float", above every integer width), as is a weight-only layer's activation bar."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    full = policy.complete(analysis)
    names = analysis.names
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.25), 4))
    pinned = [m.pinned for m in analysis.layers]
    handles = []
    any_float = False
    for offset, idx, label in ((-0.2, 0, "weight bits"), (0.2, 1, "activation bits")):
        floats = [full[n][idx] is None for n in names]  # float layers; weight-only ones' float activations
        any_float |= any(floats)
        bars = ax.bar([i + offset for i in x], [_FLOAT_BAR if f else full[n][idx] for n, f in zip(names, floats)],
                      width=0.4)
        handles.append(Patch(facecolor=bars[0].get_facecolor(), label=label))  # unhatched, whatever comes first
        for bar, p, f in zip(bars, pinned, floats):
            if p:
                bar.set_hatch("//")
            if f:
                bar.set_color("lightgrey")
    if any_float:
        handles.append(Patch(facecolor="lightgrey", label=f"float (drawn at {_FLOAT_BAR})"))
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_title("bits per layer (hatched: pinned)")
    ax.legend(handles=handles)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_indicators(indicators: Indicators, path: str | Path) -> Path:
    """Learned step size per layer, one line per candidate bit (weights left, activations right)."""
    plt = _pyplot()
    names = list(indicators.layers)
    panels = [("weight", indicators.weight)] + ([("activation", indicators.act)] if indicators.has_act else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, len(names) * 0.3) * len(panels) / 1.5, 4),
                             squeeze=False)
    for ax, (title, table) in zip(axes[0], panels):
        for b in sorted(indicators.bits, reverse=True):
            ax.plot(range(len(names)), [table.get(n, {}).get(b, float("nan")) for n in names], marker="o",
                    markersize=3, label=f"{b} bit")
        ax.set_yscale("log")
        ax.set_title(f"{title} step size (importance indicator)")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_pareto(pareto: ParetoResult, path: str | Path, chosen: tuple[float, float] | None = None,
                reference: Sequence[tuple[str, float]] = ()) -> Path:
    """Objective vs budget on `pareto.metric`, with the chosen (total, objective) point and reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.totals[pareto.metric] for r in pareto.results]
    ys = [r.objective for r in pareto.results]
    ax.plot(xs, ys, marker=".", label="optimal policies")
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], color="red", zorder=3, label="chosen")
    for label, value in reference:
        ax.axvline(value, linestyle="--", color="gray", linewidth=0.8)
        ax.text(value, max(ys) if ys else 0, label, rotation=90, fontsize=7, va="top")
    ax.set_xlabel(pareto.metric)
    ax.set_ylabel("objective (sum of indicators)")
    ax.set_title("Pareto front of the ILP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
