"""Indicators that are not learned on the model: random and inverted baselines, and transplanted real ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import IndicatorError
from .indicators import Indicators

__all__ = ["inverted_indicators", "random_indicators", "transplanted_indicators"]


def random_indicators(layers: tuple[str, ...], bits: tuple[int, ...], seed: int) -> Indicators:
    """Random indicators: each layer a random log-normal scale (weights and activations apart) times 2^-b. The
    ILP then returns a random policy that uses the budget, rather than a random policy far below it."""
    rng = np.random.default_rng(seed)

    def table() -> dict[str, dict[int, float]]:
        scales = np.exp(rng.normal(0.0, 1.0, size=len(layers)))
        return {n: {b: float(c) * 2.0 ** -b for b in bits} for n, c in zip(layers, scales)}

    return Indicators(layers=layers, bits=bits, weight=table(), act=table(), meta={"source": f"random seed {seed}"})


def inverted_indicators(ind: Indicators) -> Indicators:
    """The layers' order of sensitivity reversed: rank layers by their indicator at the lowest bit and give the
    layer of rank r the whole row (every bit) of the layer of rank n-1-r; weights and activations separately."""
    low = min(ind.bits)

    def flip(table: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
        order = sorted(table, key=lambda n: table[n][low], reverse=True)
        return {n: dict(table[m]) for n, m in zip(order, reversed(order))}

    return Indicators(layers=ind.layers, bits=ind.bits, weight=flip(ind.weight), act=flip(ind.act),
                      meta={"source": "inverted"})


def transplanted_indicators(names: Sequence[str], base: Indicators) -> Indicators:
    """`base`'s first len(names) rows given to `names` in order: a real indicator set sized for another model
    (the paper's resnet50 indicators on resnet18's 19 searchable layers, for solver benchmarks and tests)."""
    if len(names) > len(base.layers):
        raise IndicatorError(f"{len(base.layers)} indicator rows cannot cover {len(names)} layers")
    src = base.layers
    return Indicators(layers=tuple(names), bits=base.bits,
                      weight={n: dict(base.weight[src[i]]) for i, n in enumerate(names)},
                      act={n: dict(base.act[src[i]]) for i, n in enumerate(names) if src[i] in base.act})
