"""The latency audit of an export: the model timed in ONNX Runtime, ORT's profiled nodes mapped back to layers, each
layer's kernel and time next to the hardware file's prediction, and the layers ORT ran otherwise than priced."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..capture.record import LayerRecord
from ..hardware.formats import format_name
from .deploy import deployable
from .measure import NodeTime, TimingOptions, profile_nodes, session, time_sessions

if TYPE_CHECKING:
    from ..quant.quant_model import QuantModel

log = logging.getLogger(__name__)

__all__ = ["INTEGER_KERNELS", "LayerTiming", "latency_audit", "latency_ms", "node_layers"]

# ORT op types that compute a layer in integers (the rest compute it in float)
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")
_MS_PER_UNIT = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "μs": 1e-3, "ns": 1e-6}


@dataclass(frozen=True)
class LayerTiming:
    """One layer in ONNX Runtime's profile of the exported model: what it was lowered as and what ORT ran.

    `measured_ms` is the median kernel time of the ORT nodes that compute the layer (the Q/DQ and layout changes
    around it are not counted: they belong to no single layer), from ORT's profiler (wall-clock node times);
    `predicted_ms` is the hardware file's latency of the layer in its format, its chain included
    (`Analysis.policy_costs`; None without a latency metric). `flag` says when ORT ran it otherwise than priced.
    """

    layer: str
    format: str  # "W8A8", "float"
    kernels: tuple[str, ...]  # ORT op types of the nodes that compute it ("QLinearConv", "Conv", ...)
    integer: bool  # whether ORT ran it as an integer kernel
    measured_ms: float
    predicted_ms: float | None
    flag: str | None = None


def latency_ms(qmodel: QuantModel) -> float | None:
    """The hardware file's predicted latency of `qmodel`'s policy in milliseconds, or None when its hardware has no
    `latency` metric in a time unit (s, ms, us, ns) or no policy is in force."""
    metric = qmodel.hardware.metrics.get("latency")
    if metric is None or metric.unit.strip() not in _MS_PER_UNIT or qmodel.policy is None:
        return None
    return float(qmodel.analysis.cost(qmodel.policy)["latency"]) * _MS_PER_UNIT[metric.unit.strip()]


def node_layers(nodes: list[NodeTime], path: Path, recs: Sequence[LayerRecord]) -> dict[str, list[NodeTime]]:
    """Layer name -> the ORT nodes (optimized graph) that compute it.

    The exported graph names each layer's weight `fxmpq_lowered.<layer>_weight`: the node reading it (or reading
    it through a DequantizeLinear) is the layer's in the exported graph. ORT's fused or re-laid-out node keeps
    either that weight among its inputs (QLinearConv), or the exported node's name, or its output's name, with a
    suffix (`_token_<n>`, `_nchwc`): each is tried in turn.
    """
    import onnx

    weights = {r.lowered.weight_buffer or r.lowered.operand_scale: r.name for r in recs
               if r.lowered is not None and (r.lowered.weight_buffer or r.lowered.operand_scale)}
    exported = onnx.load(str(path), load_external_data=False).graph
    dq_of = {n.output[0]: n.input[0] for n in exported.node if n.op_type == "DequantizeLinear"}
    by_name: dict[str, str] = {}
    for n in exported.node:
        if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(n.input) > 1:
            w = dq_of.get(n.input[1], n.input[1])
            if w in weights:
                by_name[n.name] = by_name[n.output[0]] = weights[w]
    out: dict[str, list[NodeTime]] = {r.name: [] for r in recs}
    for node in nodes:
        layer = next((weights[i] for i in node.inputs if i in weights), None)
        if layer is None:
            base = node.name.removesuffix("_nchwc").split("_token_")[0]
            layer = by_name.get(node.name) or by_name.get(base)
        if layer is not None:
            out[layer].append(node)
    return out


def latency_audit(qmodel: QuantModel, path: Path, recs: Sequence[LayerRecord], feed_inputs: tuple[torch.Tensor, ...],
                   timing: TimingOptions) -> dict[str, Any]:
    """The LowerReport fields of the latency audit (see lower())."""
    model = deployable(path, "lower")  # packed weights widened as fxmpq.ort_session does
    sess = session(model, timing.threads)
    names = [i.name for i in sess.get_inputs()]
    feed = {k: x.numpy() for k, x in zip(names, feed_inputs)}
    t = time_sessions({"model": (sess, feed)}, timing)["model"]
    nodes = profile_nodes(model, feed, timing.threads, runs=max(3, min(timing.repeats, 10)))
    per_layer = node_layers(nodes, path, recs)
    metric = qmodel.hardware.metrics.get("latency")
    scale = _MS_PER_UNIT.get(metric.unit.strip()) if metric is not None else None
    pred_ms: dict[str, float] = {}
    if scale is not None and qmodel.policy is not None:
        pred_ms = {n: c["latency"] * scale for n, c in qmodel.analysis.policy_costs(qmodel.policy).items()}
    rows, mismatches = [], []
    for r in recs:
        low = r.lowered
        fmt = (None, None) if low.w_bits is None else (low.w_bits, low.a_bits)
        ran = per_layer.get(r.name, [])
        kernels = tuple(dict.fromkeys(n.op_type for n in ran))
        integer = any(k in INTEGER_KERNELS for k in kernels)
        pred = pred_ms.get(r.name)
        flag = None
        if not ran:
            flag = "not found in ONNX Runtime's graph"
        elif fmt[0] is None and r.applied is not None and r.applied.w_bits is not None:
            priced = format_name((r.applied.w_bits, r.applied.a_bits))
            flag = f"priced as {priced}, exported in float ({'; '.join(low.notes)}), ORT ran {'+'.join(kernels)}"
        elif low.matmul_nbits and "MatMulNBits" not in kernels:
            flag = f"priced weight-only ({format_name(fmt)}), ORT ran {'+'.join(kernels)}"
        elif low.integer_kernel and not integer:
            flag = f"priced as an integer kernel ({format_name(fmt)}), ORT ran {'+'.join(kernels)} in float"
        elif fmt[0] is not None and not low.integer_kernel and not low.matmul_nbits and integer:
            flag = f"expected in float ({format_name(fmt)}: 16-bit activations), ORT ran {'+'.join(kernels)}"
        elif fmt[0] is None and integer:
            flag = f"priced in float, ORT ran {'+'.join(kernels)} (an integer kernel)"
        if flag is not None and ran:
            mismatches.append(f"{r.name}: {flag}")
        rows.append(LayerTiming(r.name, format_name(fmt), kernels, integer, sum(n.median_ms for n in ran), pred, flag))
    if mismatches:
        log.warning("%s: %d layer(s) run otherwise than priced: %s", path, len(mismatches), "; ".join(mismatches))
    return {"measured_latency_ms": t.median_ms, "measured_wall_ms": t.wall_median_ms,
            "predicted_latency_ms": latency_ms(qmodel), "latency_threads": timing.threads,
            "latency_batch": int(feed_inputs[0].shape[0]), "latency_repeats": timing.repeats,
            "latency_clock": timing.resolved_clock.value, "layer_timings": tuple(rows),
            "format_mismatches": tuple(mismatches)}
