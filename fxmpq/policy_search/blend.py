"""Blended indicators: several importance sources, each scaled to the same objective range, summed.

The learned step sizes rank policies best on the CNNs of the side-by-side benchmark and the measured sensitivities
on the ViT (docs/search.md); neither is right everywhere, and their errors differ. Each source is repaired to be
non-increasing in the bits, weighted by its own alpha, divided by its objective's span (the sum over layers of the
lowest bit's value minus the highest bit's, weights and activations), and the sources are summed: one Indicators
searched with alpha=1.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ArgumentError, IndicatorError
from .indicators import Indicators

__all__ = ["blend_indicators"]


def _span(ind: Indicators, alpha: float) -> float:
    """The objective's range under `alpha`: sum over layers of (lowest bit's value - highest bit's), w and a."""
    def rng(row: dict[int, float]) -> float:
        return max(row.values()) - min(row.values())
    return sum(alpha * rng(dict(r)) for r in ind.weight.values()) + sum(rng(dict(r)) for r in ind.act.values())


def blend_indicators(sources: Sequence[tuple[Indicators, float]]) -> Indicators:
    """One Indicators from `sources`, each an (Indicators, alpha) pair of the same layers and bits: every source
    isotonic-cleaned, its weight rows times its alpha, both divided by its objective's span, summed over sources.
    Search the result with alpha=1. `meta` names the sources and their spans. ArgumentError for fewer than two
    sources or a bad alpha; IndicatorError naming the first layer or bit where two sources differ, or a source whose
    every row is flat (it cannot be scaled)."""
    if len(sources) < 2:
        raise ArgumentError(f"blend_indicators: expected at least two (Indicators, alpha) sources, found {len(sources)}")
    first = sources[0][0]
    parts = []
    for i, src in enumerate(sources):
        if not (isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], Indicators)):
            raise ArgumentError(f"blend_indicators: source {i} must be an (Indicators, alpha) pair, found "
                                f"{type(src).__name__}")
        ind, alpha = src
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise ArgumentError(f"blend_indicators: source {i}'s alpha must be a number > 0, found {alpha!r}")
        if ind.layers != first.layers:
            diff = next((a for a, b in zip(ind.layers, first.layers) if a != b), None) or "(layer count)"
            raise IndicatorError(f"blend_indicators: source {i} has other layers than source 0 (first difference: "
                                 f"{diff})")
        for kind in ("weight", "act"):
            for n in first.layers:
                a, b = getattr(ind, kind).get(n), getattr(first, kind).get(n)
                if (a is None) != (b is None) or (a is not None and b is not None and set(a) != set(b)):
                    raise IndicatorError(f"blend_indicators: source {i}'s {kind} bits of layer {n} differ from "
                                         f"source 0's")
        clean = ind.cleaned("isotonic").indicators
        span = _span(clean, float(alpha))
        if not span > 0:
            raise IndicatorError(f"blend_indicators: source {i} ({ind.meta.get('source', 'indicators')}) has every "
                                 f"row flat: it cannot be scaled")
        parts.append((clean, float(alpha), span))
    weight = {n: {b: sum(a * c.weight[n][b] / s for c, a, s in parts) for b in first.weight[n]}
              for n in first.weight}
    act = {n: {b: sum(c.act[n][b] / s for c, _, s in parts) for b in first.act[n]} for n in first.act}
    names = [str(c.meta.get("source", f"source {i}")) for i, (c, _, _) in enumerate(parts)]
    meta = {"source": "fxmpq.blend_indicators",
            "method": "sum of " + ", ".join(f"{nm} (alpha {a:g}, span {s:.4g})" for nm, (_, a, s) in zip(names, parts))
                      + "; each isotonic-cleaned and divided by its span; search with alpha=1"}
    return Indicators(layers=first.layers, bits=first.bits, weight=weight, act=act, meta=meta)
