"""Analysis: a model's quantizable layers (their records) priced on one hardware description, and whole policies."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from ..capture.record import LayerRecord
from ..core.tables import render
from ..errors import PolicyError
from ..hardware.formats import format_name
from ..hardware.spec import HardwareSpec
from .policy import Policy

log = logging.getLogger(__name__)

__all__ = ["Analysis"]


@dataclass(frozen=True)
class Analysis:
    """The quantizable layers of a traced model (in graph order) priced on one hardware description."""

    layers: tuple[LayerRecord, ...]
    hardware: HardwareSpec
    graph_module: fx.GraphModule | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.layers})

    # -------------------------------------------------------------- lookup
    def layer(self, name: str) -> LayerRecord:
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
    def searchable(self) -> tuple[LayerRecord, ...]:
        """Layers whose bits the search chooses (all but the pinned ones)."""
        return tuple(m for m in self.layers if m.searchable)

    @property
    def pinned(self) -> tuple[LayerRecord, ...]:
        """Layers held at fixed bits."""
        return tuple(m for m in self.layers if m.pinned)

    @property
    def metrics(self) -> list[str]:
        """Names of the hardware's cost metrics."""
        return list(self.hardware.metrics)

    # -------------------------------------------------------------- costs
    def layer_cost(self, name: str, w_bits: int | None, a_bits: int | None) -> dict[str, float]:
        """Every metric's value for one layer at (w_bits, a_bits) ((None, None): in float)."""
        return self.hardware.layer_cost(self.layer(name), w_bits, a_bits)

    def policy_costs(self, policy: Policy | Mapping[str, tuple[int, int]]) -> dict[str, dict[str, float]]:
        """Layer name -> every metric's value for that layer under `policy`: its cost in its format, plus the
        hardware's chain change for its format and that of the layer it reads back to back (`input_layer`)."""
        policy = policy if isinstance(policy, Policy) else Policy(policy)
        full = policy.complete(self)
        out = {}
        for m in self.layers:
            fmt = full[m.name]
            cost = self.layer_cost(m.name, *fmt)
            if m.input_layer in full and self.hardware.chained:
                for k, v in self.hardware.chain_cost(m, fmt, full[m.input_layer]).items():
                    cost[k] += v
            out[m.name] = cost
        return out

    def cost(self, policy: Policy | Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Metric name -> total under `policy` (pinned layers at their pins): the layers' costs (`policy_costs`)
        plus the hardware's model-level constants (counted once)."""
        totals = self.hardware.model_cost()
        for cost in self.policy_costs(policy).values():
            for k, v in cost.items():
                totals[k] += v
        return totals

    def fp32_cost(self) -> dict[str, float]:
        """Every metric at 32-bit weights and activations (the reference for compression ratios), constants
        included.

        A metric built on a lookup table has no value at 32 bits (its table lists the target's pairs only);
        its total is NaN.
        """
        totals = self.hardware.model_cost()
        for name, metric in self.hardware.metrics.items():
            if not metric.defined_at(32, 32):
                totals[name] = float("nan")
                continue
            for m in self.layers:
                totals[name] += metric.evaluate(m, 32, 32)
        return totals

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
        per_layer = self.policy_costs(full) if full is not None else {}
        metrics = self.metrics
        header = ["layer", "kind", "MACs", "params", "W/A", *metrics]
        rows = []
        constant = self.hardware.model_cost()
        totals = dict(constant)
        for m in self.layers:
            bits = full[m.name] if full is not None else m.pin_bits
            cost = per_layer[m.name] if full is not None else (self.layer_cost(m.name, *bits) if bits else {})
            for k, v in cost.items():
                totals[k] += v
            wa = (format_name(bits) if bits else "search") + ("*" if m.pinned else "")
            rows.append([m.name, m.kind.value, f"{m.macs:,}", f"{m.params:,}", wa]
                        + [_fmt(cost[k]) if k in cost else "" for k in metrics])
        if any(constant.values()):
            rows.append(["(rest of the model)", "", "", "", ""] + [_fmt(constant[k]) for k in metrics])
        rows.append(["total", "", f"{sum(m.macs for m in self.layers):,}",
                     f"{sum(m.params for m in self.layers):,}", ""]
                    + ([_fmt(totals[k]) for k in metrics] if full is not None else [""] * len(metrics)))
        return _render(header, rows) + "\n(* pinned)"


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.4e}"


def _render(header: list[str], rows: list[list[str]]) -> str:
    return render(header, rows, left=2)
