"""analyze(): trace a model, annotate its quantizable layers with costs, and price whole policies."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch.fx as fx
from torch import nn

from .errors import PolicyError
from .graph import LayerMeta, quantizable_layers, trace
from .hardware import HardwareSpec, Pins, load_hardware
from .policy import Policy
from .tables import render

log = logging.getLogger(__name__)

__all__ = ["Analysis", "analyze"]


@dataclass(frozen=True)
class Analysis:
    """The quantizable layers of a traced model (in graph order) priced on one hardware description."""

    layers: tuple[LayerMeta, ...]
    hardware: HardwareSpec
    graph_module: fx.GraphModule | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.layers})

    # -------------------------------------------------------------- lookup
    def layer(self, name: str) -> LayerMeta:
        """The layer called `name`; PolicyError listing the names when there is none."""
        try:
            return self._by_name[name]  # type: ignore[attr-defined]
        except KeyError:
            raise PolicyError(f"no quantizable layer {name!r}; layers: {', '.join(self.names)}") from None

    @property
    def names(self) -> list[str]:
        """Layer names in graph order."""
        return [m.name for m in self.layers]

    @property
    def searchable(self) -> tuple[LayerMeta, ...]:
        """Layers whose bits the search chooses (all but the pinned ones)."""
        return tuple(m for m in self.layers if m.searchable)

    @property
    def pinned(self) -> tuple[LayerMeta, ...]:
        """Layers held at fixed bits."""
        return tuple(m for m in self.layers if m.pinned)

    @property
    def metrics(self) -> list[str]:
        """Names of the hardware's cost metrics."""
        return list(self.hardware.metrics)

    # -------------------------------------------------------------- costs
    def layer_cost(self, name: str, w_bits: int, a_bits: int) -> dict[str, float]:
        """Every metric's value for one layer at (w_bits, a_bits)."""
        m = self.layer(name)
        return self.hardware.layer_cost(m.kind, m.macs, m.params, w_bits, a_bits)

    def cost(self, policy: Policy | Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Metric name -> total over all layers under `policy` (pinned layers at their pins)."""
        policy = policy if isinstance(policy, Policy) else Policy(policy)
        full = policy.complete(self)
        totals = dict.fromkeys(self.hardware.metrics, 0.0)
        for m in self.layers:
            for k, v in self.layer_cost(m.name, *full[m.name]).items():
                totals[k] += v
        return totals

    def fp32_cost(self) -> dict[str, float]:
        """Every metric at 32-bit weights and activations (the reference for compression ratios).

        A metric built on a lookup table has no value at 32 bits (its table lists the target's pairs only);
        its total is NaN.
        """
        totals = dict.fromkeys(self.hardware.metrics, 0.0)
        for name, metric in self.hardware.metrics.items():
            if not metric.defined_at(32, 32):
                totals[name] = float("nan")
                continue
            for m in self.layers:
                totals[name] += metric.evaluate(m.kind, m.macs, m.params, 32, 32)
        return totals

    def cost_matrix(self, metric: str, layers: Sequence[LayerMeta] | None = None) -> np.ndarray:
        """[layer, pair] cost of `metric` for `layers` (default: searchable) over hardware.pairs."""
        if metric not in self.hardware.metrics:
            raise PolicyError(f"hardware {self.hardware.name!r} has no metric {metric!r}; it has "
                              f"{', '.join(self.hardware.metrics)}")
        layers = self.searchable if layers is None else layers
        return np.array([[m.costs[p][metric] for p in self.hardware.pairs] for m in layers], dtype=np.float64)

    # -------------------------------------------------------------- graph ties
    def shared_input_groups(self) -> list[list[str]]:
        """Groups (size >= 2) of layers that read the same activation tensor, found on the traced graph.

        A bipartite graph joins each layer to the fx node it reads; its connected components with more than
        one layer are the groups that must share one activation bit-width when the hardware quantizes a tensor
        once for all its readers.
        """
        g = nx.Graph()
        for m in self.layers:
            if m.input_node:
                g.add_edge(("layer", m.name), ("tensor", m.input_node))
        groups = []
        order = {n: i for i, n in enumerate(self.names)}
        for comp in nx.connected_components(g):
            names = sorted((n for kind, n in comp if kind == "layer"), key=order.__getitem__)
            if len(names) > 1:
                groups.append(names)
        return sorted(groups, key=lambda grp: order[grp[0]])

    # -------------------------------------------------------------- reports
    def table(self, policy: Policy | None = None) -> str:
        """A per-layer text table (name, kind, MACs, params, pin or policy bits, every metric) with totals."""
        full = policy.complete(self) if policy is not None else None
        metrics = self.metrics
        header = ["layer", "kind", "MACs", "params", "W/A", *metrics]
        rows = []
        totals = dict.fromkeys(metrics, 0.0)
        for m in self.layers:
            bits = full[m.name] if full is not None else m.pin_bits
            cost = self.layer_cost(m.name, *bits) if bits is not None else {}
            for k, v in cost.items():
                totals[k] += v
            wa = (f"W{bits[0]}A{bits[1]}" if bits else "search") + ("*" if m.pinned else "")
            rows.append([m.name, m.kind.value, f"{m.macs:,}", f"{m.params:,}", wa]
                        + [_fmt(cost[k]) if k in cost else "" for k in metrics])
        rows.append(["total", "", f"{sum(m.macs for m in self.layers):,}",
                     f"{sum(m.params for m in self.layers):,}", ""]
                    + ([_fmt(totals[k]) for k in metrics] if full is not None else [""] * len(metrics)))
        return _render(header, rows) + "\n(* pinned)"


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.4e}"


def _render(header: list[str], rows: list[list[str]]) -> str:
    return render(header, rows, left=2)


def analyze(
    model: nn.Module | fx.GraphModule,
    example_inputs: Any,
    hardware: str | HardwareSpec = "bitops",
    *,
    pins: Pins | None = None,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
) -> Analysis:
    """Trace `model` and price each quantizable layer at every (w, a) pair of `hardware`.

    `pins` overrides the hardware file's pins (by default the first and last quantizable layers at 8/8).
    """
    from fxmpq.passes import AnnotateCostPass, run_passes

    hw = load_hardware(hardware)
    gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    run_passes(gm, [AnnotateCostPass(hardware=hw, pins=pins)])
    layers = tuple(m for _, m in quantizable_layers(gm))
    if not layers:
        log.warning("model %s has no quantizable layers (Conv1d/Conv2d/Linear)", type(model).__name__)
    log.info("analyzed %d layers on %s", len(layers), hw.name)
    return Analysis(layers=layers, hardware=hw, graph_module=gm)

