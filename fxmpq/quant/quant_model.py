"""QuantModel: a prepared graph module switchable as a whole; its layers, sites and policy are views of the graph."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.record import LayerRecord, QuantSites, records
from ..cost.analysis import Analysis
from ..cost.policy import Policy
from ..errors import PolicyError
from ..hardware.formats import format_name
from ..hardware.spec import FLOAT, HardwareSpec
from .lsq import LSQQuantizer, _SwitchableBatchNorm

log = logging.getLogger(__name__)

__all__ = ["QuantModel"]


class QuantModel(nn.Module):
    """A traced model with LSQ quantizers on every quantizable layer, switchable as a whole.

    `.graph_module` is the transformed fx.GraphModule (original module qualnames kept: each Conv/Linear
    module becomes a Quant* subclass owning `weight_quantizer`, and an `input_quantizer` submodule of the
    layer is called as its own node right before it; functional layers get both under `fxmpq_quant.*`).
    Everything else is read from the graph's layer records: `.analysis` (the layers priced on `.hardware`),
    `.sites` (where each layer's quantizers live), `.layer_names`, and `.policy` (the quantizers' active bits).
    """

    def __init__(self, graph_module: fx.GraphModule, hardware: HardwareSpec, bits: Sequence[int], *,
                 example_shapes: Sequence[tuple[int, ...]] = (), act_bits: Sequence[int] | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.hardware = hardware
        self.bits = tuple(sorted(bits))  # weight candidates (and activation ones unless act_bits differ)
        self.act_bits = self.bits if act_bits is None else tuple(sorted(act_bits))
        self.example_shapes = [tuple(s) for s in example_shapes]

    # ------------------------------------------------------------------ views of the graph
    @property
    def records(self) -> list[LayerRecord]:
        """The layer records in graph order."""
        return [r for _, r in records(self.graph_module)]

    @property
    def analysis(self) -> Analysis:
        """The layers (their records) priced on the model's hardware."""
        return Analysis(layers=tuple(self.records), hardware=self.hardware, graph_module=self.graph_module)

    @property
    def sites(self) -> dict[str, QuantSites]:
        """Layer name -> where its quantizers and switchable BatchNorm live."""
        return {r.name: r.sites for r in self.records if r.sites is not None}

    @property
    def all_bits(self) -> tuple[int, ...]:
        """Every candidate bit-width, weights' and activations' (the bits indicators are keyed by)."""
        return tuple(sorted(set(self.bits) | set(self.act_bits)))

    @property
    def uniform_pairs(self) -> list[tuple[int, int]]:
        """The uniform (w, a) passes of joint training, highest first: the k-th highest weight bits with the k-th
        highest activation bits (the shorter list's lowest repeated), so (4, 8) x (8, 16) gives W8A16, W4A8."""
        w, a = sorted(self.bits, reverse=True), sorted(self.act_bits, reverse=True)
        n = max(len(w), len(a))
        return [(w[min(i, len(w) - 1)], a[min(i, len(a) - 1)]) for i in range(n)]

    @property
    def layer_names(self) -> list[str]:
        """Searchable and pinned layer names in graph order."""
        return [r.name for r in self.records]

    @property
    def searchable_names(self) -> list[str]:
        """Layers whose bits a policy chooses."""
        return [r.name for r in self.records if r.searchable]

    @property
    def classes(self) -> int | None:
        """The number of outputs when the model was captured producing logits [N, classes], else None (what
        class-index targets must stay below)."""
        out = next((n for n in self.graph_module.graph.nodes if n.op == "output"), None)
        arg = out.args[0] if out is not None else None
        shape = getattr(arg.meta.get("tensor_meta"), "shape", None) if isinstance(arg, fx.Node) else None
        return int(shape[1]) if shape is not None and len(shape) == 2 else None

    def _site(self, name: str) -> QuantSites:
        try:
            return self.sites[name]
        except KeyError:
            raise PolicyError(f"no quantized layer {name!r}; layers: {', '.join(self.layer_names)}") from None

    @property
    def per_channel(self) -> bool:
        """Whether the weight quantizers hold a step per output channel (prepare(per_channel=True)); a matmul's
        operand quantizer is per tensor either way."""
        return any(self.graph_module.get_submodule(s.weight_quantizer).channels for s in self.sites.values())

    def weight_quantizer(self, name: str) -> LSQQuantizer:
        """The weight LSQQuantizer of layer `name`."""
        return self.graph_module.get_submodule(self._site(name).weight_quantizer)

    def act_quantizer(self, name: str) -> LSQQuantizer:
        """The input-activation LSQQuantizer of layer `name` (PolicyError for a weight-only layer: it has none)."""
        path = self._site(name).act_quantizer
        if path is None:
            raise PolicyError(f"layer {name!r} is weight-only (apply_policy removed its input quantizer)")
        return self.graph_module.get_submodule(path)

    def batchnorm(self, name: str) -> _SwitchableBatchNorm | None:
        """The switchable BatchNorm following layer `name`, or None."""
        bn = self._site(name).batchnorm
        return self.graph_module.get_submodule(bn) if bn else None

    def quantizers(self) -> Iterator[tuple[str, LSQQuantizer]]:
        """(qualname, quantizer) for every LSQQuantizer in the graph module."""
        for n, m in self.graph_module.named_modules():
            if isinstance(m, LSQQuantizer):
                yield n, m

    def step_parameters(self) -> list[nn.Parameter]:
        """Every step-size Parameter (for a separate optimizer group)."""
        return [q.step for _, q in self.quantizers()]

    @torch.no_grad()
    def clamp_step_sizes(self, min_value: float = 1e-8) -> None:
        """Project every step size back to >= min_value (an optimizer step may push a small step negative)."""
        for p in self.step_parameters():
            p.clamp_(min=min_value)

    @property
    def policy(self) -> Policy | None:
        """The policy in force (pins included): an applied layer's format, else its quantizers' active bits (a
        layer whose quantizers are off counts as float); None while every quantizer is off."""
        gm = self.graph_module
        bits: dict[str, tuple[int | None, int | None]] = {}
        on = False
        for rec in self.records:
            if rec.applied is not None:
                bits[rec.name] = (rec.applied.w_bits, rec.applied.a_bits)
                on = True
                continue
            w = gm.get_submodule(rec.sites.weight_quantizer).active_bits
            a = gm.get_submodule(rec.sites.act_quantizer).active_bits
            on |= w is not None or a is not None
            bits[rec.name] = FLOAT if w is None else (w, a)  # (w, None): weight-only
        return Policy(bits) if on else None

    # ------------------------------------------------------------------ switching
    def set_policy(self, policy: Policy | Mapping[str, tuple[int, int]]) -> None:
        """Switch every layer to the policy's (w, a) (pins stay at their pins); every step size is kept."""
        policy = policy if isinstance(policy, Policy) else Policy(policy)
        full = policy.complete(self.analysis)
        sites = self.sites
        gm = self.graph_module
        fixed = [n for n, pair in full.items() if n not in sites and pair != FLOAT]
        if fixed:
            raise PolicyError(f"layer(s) {', '.join(fixed[:5])} were left in float by apply_policy; a fixed model "
                              f"keeps its policy")
        bad = [f"{n} {format_name((w, a))}" for n, (w, a) in full.items() if n in sites and (w, a) != FLOAT
               and (w not in gm.get_submodule(sites[n].weight_quantizer).bits
                    or (a is not None and a not in gm.get_submodule(sites[n].act_quantizer).bits))]
        if bad:
            raise PolicyError(f"policy bits outside this model's candidate bits {self.bits}: {', '.join(bad)}")
        self._switch(full, sites)

    def _switch(self, full: Mapping[str, tuple[int | None, int | None]], sites: Mapping[str, QuantSites]) -> None:
        gm = self.graph_module
        for n, (w, a) in full.items():
            site = sites.get(n)
            if site is None:  # left in float by apply_policy
                continue
            gm.get_submodule(site.weight_quantizer).set_bits(w)
            if site.act_quantizer is not None:  # None: made weight-only by apply_policy
                gm.get_submodule(site.act_quantizer).set_bits(a)
            if site.batchnorm:
                gm.get_submodule(site.batchnorm).set_bits(w)

    def set_uniform(self, w_bits: int, a_bits: int | None = None) -> None:
        """Every searchable layer at (w_bits, a_bits) (a_bits defaults to w_bits); pinned layers at their pins."""
        a_bits = w_bits if a_bits is None else a_bits
        if w_bits not in self.bits or a_bits not in self.act_bits:
            raise PolicyError(f"uniform W{w_bits}A{a_bits} is outside this model's candidate bits {self.bits}"
                              + (f" (activations {self.act_bits})" if self.act_bits != self.bits else ""))
        recs = self.records
        full = {r.name: (r.pin_bits if r.pinned else (w_bits, a_bits)) for r in recs}
        self._switch(full, {r.name: r.sites for r in recs if r.sites is not None})

    def disable_quant(self) -> None:
        """Switch every quantizer off (full precision); switchable BNs use their highest-bit BN."""
        for _, q in self.quantizers():
            q.set_bits(None)
        for m in self.graph_module.modules():
            if isinstance(m, _SwitchableBatchNorm):
                m.set_bits(None)

    def fix(self) -> None:
        """Freeze the current policy: every quantizer and switchable BN keeps only its active bit."""
        policy = self.policy
        if policy is None:
            raise PolicyError("no policy in force: call set_policy(...) before fix()")
        gm = self.graph_module
        for n, site in self.sites.items():
            w, a = policy[n]
            if (w, a) == FLOAT:
                raise PolicyError(f"fix(): layer {n} is switched off (float); apply_policy leaves float layers")
            gm.get_submodule(site.weight_quantizer).fix(w)
            if a is not None:  # weight-only: the input quantizer stays off
                gm.get_submodule(site.act_quantizer).fix(a)
            if site.batchnorm:
                gm.get_submodule(site.batchnorm).fix(w)

    def quant_state(self) -> dict[str, dict[str, Any]]:
        """Per layer: candidate bits and active bits of its quantizers (JSON-ready, for checkpoints)."""
        out = {}
        for n in self.sites:
            wq = self.weight_quantizer(n)
            aq = self.act_quantizer(n) if self.sites[n].act_quantizer is not None else None
            out[n] = {"w_bits": list(wq.bits), "a_bits": list(aq.bits) if aq else [], "w": wq.active_bits,
                      "a": aq.active_bits if aq else None}
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the generated forward directly: GraphModule.__call__ prints the generated code's traceback to stderr
        # before re-raising a failure, which fxmpq's one-line errors must not be preceded by
        return self.graph_module.forward(*args, **kwargs)
