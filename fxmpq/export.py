"""lower(): a fixed QuantModel to a QDQ ONNX model (opset 21), checked and compared against PyTorch in ORT.

Over 550 lines because it holds one job end to end: export, the file check at a temp path, and the three parity
diagnoses (end to end, QuantModel vs lowered graph, stage by stage against ONNX Runtime) that a failed check runs;
the diagnoses are the next to move out (into their own module) when the latency audit joins this one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .atomic import atomic_paths, check_writable
from .batches import check_inputs
from .deploy import deployable
from .errors import ArgumentError, DataError, ExportError, first_line
from .formats import format_name
from .graph import NodeFailure, as_input_tuple, run_graph
from .measure import NodeTime, TimingOptions, profile_nodes, session, time_sessions
from .passes import run_passes
from .passes.lower_qdq import DQ_OP, QDQ_CHANNELS_OP, QDQ_META, QDQ_OP
from .quant import LSQQuantizer
from .record import LayerRecord, records
from .stages import lower_passes
from .storage import Storage, as_storage, pack_weights, stored_weight_bytes
from .tables import render

if TYPE_CHECKING:
    from .quant_model import QuantModel

log = logging.getLogger(__name__)

__all__ = ["OPSET", "LayerTiming", "LowerReport", "export_fp32", "latency_ms", "lower", "qlinear_counts"]

OPSET = 21
_TWO_GB = 2**31 - 2**20
_QLINEAR = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger")
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


@dataclass(frozen=True)
class LowerReport:
    """The result of lower(): where the model went and how closely ONNX Runtime matches PyTorch."""

    path: Path
    samples: int
    max_abs_diff: float
    output_step: float | None  # the output quantizer's step; None when the output is not quantized
    max_diff_steps: float | None
    rel_l2: float
    top1_agreement: float | None
    passed: bool
    onnx_bytes: int
    packed_weight_bytes: int  # sum over quantized layers of params * w_bits / 8
    fp32_weight_bytes: int
    quantized_layers: int
    fused_layers: int  # QLinear*/QGemm nodes in ONNX Runtime's optimized graph
    op_counts: dict[str, int] = field(default_factory=dict)
    diverging: str | None = None
    tolerance: dict[str, float] = field(default_factory=dict)
    # top-1 agreement over the inputs whose PyTorch top-1 logit leads the runner-up by more than twice the
    # tolerance (a difference within tolerance cannot flip those); near-tied inputs (random-weight nets with
    # zero-initialised heads, quantized logits that tie) are counted in `top1_ties`
    top1_decisive: float | None = None
    top1_ties: int = 0
    within_tolerance: bool = True  # the max-difference criterion alone (passed = this and top-1 agreement)
    # measured only when parity fails: the largest difference at any quantizer, in its own steps, when PyTorch
    # computes each quantizer from ONNX Runtime's values of the ones before it; <= 1 means every stage of the
    # export is faithful and the end-to-end difference is float rounding amplified by the network
    forced_max_steps: float | None = None
    # the latency audit (lower(..., measure=True)): the median of `latency_repeats` runs of the exported model in
    # ONNX Runtime (CPU) at `latency_threads` threads and batch `latency_batch`, on `latency_clock`
    # (fxmpq.measure.Clock); the hardware file's prediction for the policy (None without a `latency` metric in a
    # time unit); the layers from ORT's profiler, and the layers ORT ran otherwise than priced
    measured_latency_ms: float | None = None
    measured_wall_ms: float | None = None
    predicted_latency_ms: float | None = None
    latency_threads: int | None = None
    latency_batch: int | None = None
    latency_repeats: int | None = None
    latency_clock: str | None = None
    layer_timings: tuple[LayerTiming, ...] = ()
    format_mismatches: tuple[str, ...] = ()
    # measured only when parity fails: the largest difference at any quantizer, in its own steps, between the
    # QuantModel and the lowered graph (both PyTorch) on the same inputs; > 1 means the lowering changed what the
    # model computes (an export bug), whatever ONNX Runtime does with the lowered graph
    lowered_max_steps: float | None = None
    lowered_diverging: str | None = None
    # how `passed` was judged: "output steps" (a quantized output), "relative to max |y|" (a float model), or, for a
    # float output after quantized layers whose direct difference exceeds rtol, "stage by stage (...)": every
    # quantizer within max_steps fed ONNX Runtime's values before it, the lowering faithful, and the float ops after
    # the last quantizers within rtol (`tail_rel_diff`, relative to max |y|) when fed ONNX Runtime's values there
    criterion: str = "output steps"
    tail_rel_diff: float | None = None
    # how the weights are stored (fxmpq.storage.Storage): "int8", or "packed" (<= 4-bit weights in INT4/UINT4
    # initializers); each quantized layer's container ("int8", "int4", "uint4", also in the ONNX metadata
    # `fxmpq.weight_containers`) and the bytes its weight initializers take in the file. With packed storage
    # `fused_layers`, `op_counts` and the latency audit are of the session fxmpq.ort_session opens (the 4-bit
    # weights widened in memory); `fused_layers_plain` counts the integer kernels of the file opened plainly
    storage: str = "int8"
    weight_containers: dict[str, str] = field(default_factory=dict)
    stored_weight_bytes: int = 0
    fused_layers_plain: int | None = None

    @property
    def stagewise_faithful(self) -> bool:
        """Every stage within one step (checked only when parity fails): the lowered graph computes what the
        QuantModel computes, and ONNX Runtime computes each quantizer from its inputs as PyTorch does."""
        if self.passed:
            return True
        return (self.forced_max_steps is not None and self.forced_max_steps <= 1.0 + 1e-3
                and self.lowered_max_steps is not None and self.lowered_max_steps <= 1.0 + 1e-3)

    def table(self) -> str:
        """A short human-readable summary."""
        steps = f"{self.max_diff_steps:.3f} output steps" if self.max_diff_steps is not None else "output float"
        top1 = f"{100 * self.top1_agreement:.2f} %" if self.top1_agreement is not None else "n/a"
        if self.top1_ties:
            dec = f"{100 * self.top1_decisive:.2f} %" if self.top1_decisive is not None else "n/a"
            top1 += f" ({dec} on the {self.samples - self.top1_ties} inputs not tied within tolerance)"
        lines = [
            f"ONNX model     {self.path} ({self.onnx_bytes / 1e6:.3f} MB)",
            f"parity         {'PASS' if self.passed else 'FAIL'} on {self.samples} inputs: max |diff| "
            f"{self.max_abs_diff:.3g} ({steps}), relative L2 {self.rel_l2:.3g}, top-1 agreement {top1}; judged "
            f"{self.criterion}" + (f" (float ops after the last quantizers: {self.tail_rel_diff:.2g} of max |y|)"
                                   if self.tail_rel_diff is not None else ""),
            f"weights        packed {self.packed_weight_bytes / 1e6:.3f} MB vs FP32 {self.fp32_weight_bytes / 1e6:.3f} MB "
            f"({self.fp32_weight_bytes / max(self.packed_weight_bytes, 1):.2f}x smaller)",
            f"storage        {self.storage}: file {self.onnx_bytes / 1e6:.3f} MB, weight initializers "
            f"{self.stored_weight_bytes / 1e6:.3f} MB ({self._containers()}) vs the policy's packed "
            f"{self.packed_weight_bytes / 1e6:.3f} MB",
            f"integer kernels {self.fused_layers}/{self.quantized_layers} quantized layers fused by ONNX Runtime"
            + ("" if self.fused_layers_plain is None else
               f" (opened with fxmpq.ort_session; {self.fused_layers_plain}/{self.quantized_layers} when the packed "
               f"file is opened plainly: ORT runs INT4-weight layers in float)"),
        ]
        if self.diverging:
            lines.append(f"first divergence {self.diverging}")
        if self.lowered_max_steps is not None:
            lines.append(f"lowering       QuantModel vs lowered graph at every quantizer: max |diff| "
                         f"{self.lowered_max_steps:.2f} steps"
                         + (f" (first: {self.lowered_diverging})" if self.lowered_diverging else ""))
        if self.forced_max_steps is not None:
            lines.append(f"stage by stage  every quantizer fed ONNX Runtime's inputs: max |diff| "
                         f"{self.forced_max_steps:.2f} steps ("
                         + ("faithful: the end-to-end difference is float rounding the network amplifies)"
                            if self.stagewise_faithful else "an export stage computes something else)"))
        if self.measured_latency_ms is not None:
            pred = (f"predicted {self.predicted_latency_ms:.3f} ms (measured/predicted "
                    f"{self.measured_latency_ms / self.predicted_latency_ms:.3f})"
                    if self.predicted_latency_ms else "no latency prediction (the hardware has no latency metric)")
            lines.append(f"latency        {self.measured_latency_ms:.3f} ms measured ({self.latency_clock} clock, median "
                         f"of {self.latency_repeats}, {self.latency_threads} thread(s), batch {self.latency_batch}; "
                         f"wall {self.measured_wall_ms:.3f} ms), {pred}")
        for m in self.format_mismatches:
            lines.append(f"NOT AS PRICED  {m}")
        return "\n".join(lines)

    def _containers(self) -> str:
        """How many quantized layers each container holds: "12 int8, 9 int4"."""
        counts = Counter(self.weight_containers.values())
        return ", ".join(f"{n} {c}" for c, n in sorted(counts.items())) or "no quantized layers"

    def layer_table(self) -> str:
        """The per-layer table from ORT's profiler: format, kernels, integer or not, measured vs predicted."""
        rows = [[t.layer, t.format, "+".join(t.kernels) or "-", "yes" if t.integer else "no", f"{t.measured_ms:.4f}",
                 "" if t.predicted_ms is None else f"{t.predicted_ms:.4f}", t.flag or ""] for t in self.layer_timings]
        return render(["layer", "format", "ORT kernels", "integer", "measured ms", "predicted ms", "flag"], rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field (the path as a string, layer timings as objects)."""
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        return out


# ----------------------------------------------------------------------------------------------- translation
def _translation_table() -> dict[Any, Any]:
    """ONNX for fxmpq's two custom ops: QuantizeLinear(uint8) -> [Clip] -> DequantizeLinear, and DequantizeLinear."""
    import onnx
    from onnxscript import opset21 as op

    def u8(name: str, v: int) -> Any:
        return op.Constant(value=onnx.helper.make_tensor(name, onnx.TensorProto.UINT8, [], [int(v)]))

    def qdq(x: Any, scale: Any, zero_point: int, qmin: int, qmax: int) -> Any:
        zp = u8("zp", zero_point)
        q = op.QuantizeLinear(x, scale, zp)
        if qmin > 0 or qmax < 255:
            q = op.Clip(q, u8("lo", qmin), u8("hi", qmax))
        return op.DequantizeLinear(q, scale, zp)

    def qdq_channels(x: Any, scale: Any, zero_point: int, qmin: int, qmax: int, axis: int, channels: int) -> Any:
        zp = u8("zp", zero_point)
        q = op.QuantizeLinear(x, scale, zp)
        if qmin > 0 or qmax < 255:
            q = op.Clip(q, u8("lo", qmin), u8("hi", qmax))
        zps = op.Constant(value=onnx.helper.make_tensor("zps", onnx.TensorProto.UINT8, [channels],
                                                        [int(zero_point)] * channels))
        scales = op.Expand(scale, op.Constant(value_ints=[channels]))
        return op.DequantizeLinear(q, scales, zps, axis=axis)

    def dq(q: Any, scale: Any, axis: int) -> Any:
        return op.DequantizeLinear(q, scale, axis=axis)

    return {QDQ_OP: qdq, QDQ_CHANNELS_OP: qdq_channels, DQ_OP: dq}


def _export(module: nn.Module, inputs: tuple[Any, ...], table: dict[Any, Any] | None) -> Any:
    """torch.onnx (dynamo) export with a dynamic batch dimension; returns the ModelProto."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    # torch.export specialises dimensions of size 1: trace with a batch of 2 so the batch stays symbolic
    inputs = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
                   for x in inputs)
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    try:
        prog = torch.onnx.export(module, inputs, dynamo=True, opset_version=OPSET, optimize=True,
                                 custom_translation_table=table or None, dynamic_shapes=dyn, input_names=names,
                                 output_names=["output"], verbose=False, report=False)
    except Exception as e:
        raise ExportError(f"torch.onnx could not express the lowered graph: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return prog.model_proto


def _save_model(model: Any, path: Path) -> None:
    """Write `model` to `path` (not atomically: callers give a temp path); external data beside it,
    `<name>.data`, over 2 GB. ExportError naming the file when it cannot be written."""
    import onnx

    try:
        if model.ByteSize() > _TWO_GB:
            onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data")
        else:
            onnx.save_model(model, path)
    except OSError as e:
        raise ExportError(f"{path.name}: cannot write the ONNX model: {e.strerror or e}") from None


def _write_atomic(model: Any, path: Path) -> None:
    """Write `model` to `path` atomically (fxmpq.atomic); external data beside it, `<name>.data`, over 2 GB."""
    with atomic_paths(path, _sidecar(path)) as (tmp, _):
        _save_model(model, tmp)


def _sidecar(path: Path) -> Path:
    return path.with_name(f"{path.name}.data")


def failed_path(path: Path) -> Path:
    """Where an export that failed its checks is kept for inspection: model.onnx -> model.failed.onnx."""
    return path.with_name(f"{path.stem}.failed{path.suffix or '.onnx'}")


def _keep_failed(tmp: Path, tmp_data: Path, path: Path) -> Path:
    """Move a failed export out of the temp directory before atomic_paths removes it; returns where it went (with
    external data, the folder holding both files under their final names, as the model refers to them)."""
    if tmp_data.is_file():
        dest = path.with_name(f"{path.name}.failed")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        os.replace(tmp, dest / path.name)
        os.replace(tmp_data, dest / tmp_data.name)
        return dest
    dest = failed_path(path)
    os.replace(tmp, dest)
    return dest


def export_fp32(model: nn.Module, path: str | Path, example_inputs: Any) -> Path:
    """Export a float model to ONNX (opset 21, dynamic batch), atomically; for size and latency comparisons."""
    path = check_writable(path, "export_fp32: path")
    model = copy.deepcopy(model).eval()
    proto = _export(model, as_input_tuple(example_inputs), None)
    _write_atomic(proto, path)
    return path


def qlinear_counts(path: str | Path | bytes) -> Counter[str]:
    """Op counts of ONNX Runtime's optimized graph (CPU EP, all optimizations) of the model at `path` (or of the
    serialized model `path` holds)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


# ----------------------------------------------------------------------------------------------- parity
def _session(path: Path, extra_outputs: Sequence[str] = ()) -> Any:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not extra_outputs:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(path))
    for name in extra_outputs:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run_ort(sess: Any, inputs: tuple[torch.Tensor, ...], batch: int, outputs: Sequence[str] | None = None
             ) -> list[np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    n = inputs[0].shape[0]
    chunks: list[list[np.ndarray]] = []
    for i in range(0, n, batch):
        feed = {k: x[i: i + batch].numpy() for k, x in zip(names, inputs)}
        chunks.append(sess.run(outputs, feed))
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def _run_torch(module: nn.Module, inputs: tuple[torch.Tensor, ...], batch: int) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for i in range(0, inputs[0].shape[0], batch):
            y = module(*(x[i: i + batch] for x in inputs))
            if not isinstance(y, torch.Tensor):
                raise ExportError(f"lower() supports models with one tensor output, found {type(y).__name__}")
            outs.append(y.float().numpy())
    return np.concatenate(outs)


def _output_step(lowered: fx.GraphModule) -> float | None:
    """The step of the quantizer that produces the graph output (through flatten/reshape/view, and Flatten,
    Identity and Dropout modules: a head that ends in one still has a quantized output), if any."""
    out = next(n for n in lowered.graph.nodes if n.op == "output").args[0]
    node = out
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target is QDQ_OP:
            s = node.args[1]
            return float(lowered.get_buffer(s.target)) if isinstance(s, fx.Node) else None
        if (node.op == "call_method" and node.target in ("flatten", "reshape", "view", "contiguous")) or (
                node.op == "call_function" and node.target in (torch.flatten, torch.reshape)) or (
                node.op == "call_module" and isinstance(lowered.get_submodule(node.target), _SHAPE_ONLY)):
            node = node.args[0]
            continue
        return None
    return None


_SHAPE_ONLY = (nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)


def _lowering_parity(qmodel: QuantModel, lowered: fx.GraphModule, inputs: tuple[torch.Tensor, ...], batch: int
                     ) -> tuple[str | None, float]:
    """(first divergence, max steps): every activation quantizer's output in the QuantModel (eval) against the
    quantize_dequantize node the lowering made of it (call by call), on the same inputs, in its own steps, each
    lowered quantizer fed the QuantModel's values of the quantizers before it (teacher forcing: float layers and
    folded BatchNorms round differently in the two graphs, and a one-step tie upstream must not count downstream)."""
    x = tuple(t[:batch] for t in inputs)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, q in qmodel.graph_module.named_modules():
        if isinstance(q, LSQQuantizer) and q.active_bits is not None:
            handles.append(q.register_forward_hook(
                lambda m, a, out, name=name: seen.setdefault(name, []).append(out.detach())))
    try:
        with torch.no_grad():
            qmodel(*x)
    finally:
        for h in handles:
            h.remove()
    worst, first = 0.0, None
    calls: dict[tuple[str, int], int] = {}
    steps = {name: float(qmodel.graph_module.get_submodule(name).step_size().detach().float()) for name in seen}

    class Forced(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            nonlocal worst, first
            r = super().run_node(n)
            name = n.meta.get(QDQ_META)
            if name is None:
                return r
            # calls matched by size: a quantizer the lowering repeats after a max pool has no call of its own
            ref = [t for t in seen.get(name, []) if t.numel() == r.numel()]
            i = calls[(name, r.numel())] = calls.get((name, r.numel()), -1) + 1
            if i >= len(ref):
                return r
            else:
                diff = (ref[i].reshape(-1).float() - r.reshape(-1).float()).abs()
                d = float(diff.max()) / steps[name] if diff.numel() else 0.0
                out = ref[i].reshape(r.shape).to(r.dtype)
            worst = max(worst, d)
            if d > 1.0 + 1e-3 and first is None:
                first = f"quantizer {name}{f' (call {i + 1})' if i else ''}: {d:.2f} steps"
            return out

    with torch.no_grad():
        Forced(lowered).run(*x)
    return first, worst


def _qdq_nodes(lowered: fx.GraphModule) -> list[fx.Node]:
    return [n for n in lowered.graph.nodes if QDQ_META in n.meta]


def _quantizer_parity(lowered: fx.GraphModule, path: Path, inputs: tuple[torch.Tensor, ...], batch: int
                      ) -> tuple[str | None, float | None, np.ndarray | None]:
    """(first divergence, forced max steps, forced output): every activation quantizer, PyTorch vs ONNX Runtime, in
    graph order.

    The first divergence is the first quantizer whose outputs differ by more than one of its steps when both
    run end to end. The forced figure is the largest difference, in each quantizer's own steps, when PyTorch
    computes every quantizer from ONNX Runtime's values of the quantizers before it (teacher forcing): at most
    1 means each stage of the export computes what PyTorch computes, and an end-to-end difference beyond that
    is float rounding (LayerNorm, softmax, GELU run by two libraries) that the network itself amplifies.
    """
    import onnx

    qnodes = _qdq_nodes(lowered)
    m = onnx.load(str(path))
    # activation QDQs in the ONNX graph: DequantizeLinear nodes fed (maybe via Clip) by a QuantizeLinear
    producer = {o: n for n in m.graph.node for o in n.output}
    names = []
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        src = producer.get(n.input[0])
        if src is not None and src.op_type == "Clip":
            src = producer.get(src.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            names.append(n.output[0])
    if len(names) != len(qnodes):
        return (f"cannot align intermediate outputs ({len(qnodes)} quantizers in PyTorch, {len(names)} "
                f"QDQ pairs in ONNX)"), None, None
    x = tuple(t[:batch] for t in inputs)
    ys = _run_ort(_session(path, names), x, batch, names)
    ort_out = dict(zip((n.name for n in qnodes), ys))
    steps = {n.name: float(lowered.get_buffer(n.args[1].target)) for n in qnodes}

    def steps_apart(n: fx.Node, r: torch.Tensor) -> tuple[float, np.ndarray]:
        ref = r.detach().numpy()
        y = ort_out[n.name]
        if ref.shape != y.shape and y.size == ref.size:
            y = y.reshape(ref.shape)
        if ref.shape != y.shape:
            return float("inf"), y
        return float(np.abs(ref - y).max(initial=0.0)) / steps[n.name], y

    first: list[str] = []
    forced: list[float] = []

    class Compare(fx.Interpreter):
        """Runs the lowered graph; with `force`, each quantizer's output is replaced by ONNX Runtime's."""

        def __init__(self, force: bool) -> None:
            super().__init__(lowered)
            self.force = force

        def run_node(self, n: fx.Node) -> Any:
            r = super().run_node(n)
            if QDQ_META not in n.meta:
                return r
            d, y = steps_apart(n, r)
            if self.force:
                forced.append(d)
                return torch.from_numpy(y).reshape(r.shape) if y.size == r.numel() else r
            if d > 1.0 + 1e-3 and not first:
                off = int((np.abs(r.numpy() - y.reshape(r.shape)) > 0.5 * steps[n.name]).sum()) \
                    if y.size == r.numel() else r.numel()
                first.append(f"quantizer {n.meta[QDQ_META]} (node {n.name}): max |diff| {d:.2f} steps "
                             f"({off} of {r.numel()} values differ)")
            return r

    with torch.no_grad():
        Compare(force=False).run(*x)
        out = Compare(force=True).run(*x)
    out = out[0] if isinstance(out, tuple | list) else out
    out_np = out.detach().float().numpy() if isinstance(out, torch.Tensor) else None
    return (first[0] if first else None), max(forced, default=0.0), out_np


# ----------------------------------------------------------------------------------------------- latency audit
def latency_ms(qmodel: QuantModel) -> float | None:
    """The hardware file's predicted latency of `qmodel`'s policy in milliseconds, or None when its hardware has no
    `latency` metric in a time unit (s, ms, us, ns) or no policy is in force."""
    metric = qmodel.hardware.metrics.get("latency")
    if metric is None or metric.unit.strip() not in _MS_PER_UNIT or qmodel.policy is None:
        return None
    return float(qmodel.analysis.cost(qmodel.policy)["latency"]) * _MS_PER_UNIT[metric.unit.strip()]


def _node_layers(nodes: list[NodeTime], path: Path, recs: Sequence[LayerRecord]) -> dict[str, list[NodeTime]]:
    """Layer name -> the ORT nodes (optimized graph) that compute it.

    The exported graph names each layer's weight `fxmpq_lowered.<layer>_weight`: the node reading it (or reading
    it through a DequantizeLinear) is the layer's in the exported graph. ORT's fused or re-laid-out node keeps
    either that weight among its inputs (QLinearConv), or the exported node's name, or its output's name, with a
    suffix (`_token_<n>`, `_nchwc`): each is tried in turn.
    """
    import onnx

    weights = {r.lowered.weight_buffer: r.name for r in recs if r.lowered is not None and r.lowered.weight_buffer}
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


def _latency_audit(qmodel: QuantModel, path: Path, recs: Sequence[LayerRecord], feed_inputs: tuple[torch.Tensor, ...],
                   timing: TimingOptions) -> dict[str, Any]:
    """The LowerReport fields of the latency audit (see lower())."""
    model = deployable(path, "lower")  # packed weights widened as fxmpq.ort_session does
    sess = session(model, timing.threads)
    names = [i.name for i in sess.get_inputs()]
    feed = {k: x.numpy() for k, x in zip(names, feed_inputs)}
    t = time_sessions({"model": (sess, feed)}, timing)["model"]
    nodes = profile_nodes(model, feed, timing.threads, runs=max(3, min(timing.repeats, 10)))
    per_layer = _node_layers(nodes, path, recs)
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
        integer = any(k in _QLINEAR for k in kernels)
        pred = pred_ms.get(r.name)
        flag = None
        if not ran:
            flag = "not found in ONNX Runtime's graph"
        elif fmt[0] is not None and not integer:
            flag = f"priced as an integer kernel ({format_name(fmt)}), ORT ran {'+'.join(kernels)} in float"
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


# ----------------------------------------------------------------------------------------------- lower
def lower(
    qmodel: QuantModel,
    path: str | Path,
    example_inputs: Any,
    *,
    inputs: Any = None,
    samples: int = 64,
    max_steps: float = 1.0,
    min_top1: float = 0.995,
    rtol: float = 1e-4,
    batch: int = 64,
    check: bool = True,
    seed: int = 0,
    measure: bool = True,
    repeats: int = 20,
    threads: int | None = None,
    storage: str | Storage = Storage.INT8,
) -> LowerReport:
    """Lower `qmodel` (policy applied and fixed) to a QDQ ONNX model at `path` and check it.

    The model is written to a temp file beside `path`, checked there with onnx.checker (full check), run in ONNX
    Runtime (CPU) on
    `inputs` (or `samples` random normal inputs shaped like `example_inputs`) and compared with `qmodel` in
    eval mode: max |diff| in units of the output quantizer's step (or relative to max |y| when the output is
    not quantized), relative L2 error, top-1 agreement. It passes when the max |diff| is within tolerance and the
    top-1 agreement is at least `min_top1` on the inputs whose two largest PyTorch logits are more than twice the
    tolerance apart (a difference within tolerance cannot flip those; the others are counted in `top1_ties`: float
    layers and ops run by two libraries round differently, which can flip a near-tied input by one step). Only
    then is it moved onto `path` (atomically): a failing export never replaces a previous good file. When the
    checker or ONNX Runtime rejects the file, or `check` and a tolerance is exceeded, raises ExportError naming the
    first diverging quantizer, and keeps the failed model for inspection as `<name>.failed.onnx` (with external
    data: the folder `<name>.onnx.failed`). With `check=False` a model that misses the tolerance is written and
    its report says so. A float output after quantized layers (the last layer left in float) whose difference
    exceeds rtol is judged stage by stage (`criterion`): every quantizer within `max_steps` of PyTorch fed ONNX
    Runtime's values before it, the lowered graph within one step of the QuantModel (teacher-forced likewise), and
    the float ops after the last quantizers within rtol; a one-step tie upstream moves float logits by far more
    than rtol, so the direct comparison cannot tell a faithful export there.

    With `measure` (the default), the exported model is also timed in ONNX Runtime: the median of `repeats` runs at
    the example inputs' batch and `threads` intra-op threads (default: the thread count the hardware file was
    profiled at, else 1), and profiled once (SessionOptions.enable_profiling) to map ORT's nodes back to the
    layers: which ran as integer kernels, each one's kernel time next to the hardware file's prediction; a layer
    ORT runs otherwise than priced (an integer layer in float, a float layer as an integer kernel) is listed in
    `format_mismatches`. `predicted_latency_ms` is the hardware's `latency` metric for the policy when it has one.

    `storage` (fxmpq.storage.Storage) says how quantized weights are stored: "int8" (the default: 8-bit
    containers whatever the bit-width, which ONNX Runtime's CPU provider fuses into QLinearConv) or "packed":
    weights of at most 4 bits in INT4 initializers (UINT4 for a non-negative range; 2- and 3-bit values in the
    4-bit container), so the file size follows the policy. The parity check runs on the packed file as written
    (ORT runs its 4-bit layers as float convolutions, judged by the same tolerance); the kernel count and the
    latency audit are of the session `fxmpq.ort_session` opens, which widens the 4-bit weights in memory and fuses
    them.
    """
    path = check_writable(path, "lower: path")
    storage = as_storage(storage, "lower: storage")
    ex = as_input_tuple(example_inputs)
    if not all(isinstance(x, torch.Tensor) for x in ex):
        raise ExportError("lower() needs tensor example inputs")
    timing = None
    if measure:
        prov = qmodel.hardware.provenance
        try:
            timing = TimingOptions(threads=threads if threads is not None else (prov.threads if prov and prov.threads
                                                                                else 1), repeats=repeats)
        except ArgumentError as e:
            raise ExportError(f"lower(measure=True): {e}") from None
    if qmodel.policy is None:
        raise ExportError("lower() needs a quantized model: apply a policy first (fxmpq.apply_policy(qmodel, policy))")
    shapes = qmodel.example_shapes
    ex = check_inputs(ex, shapes, "lower: example_inputs")
    if inputs is not None:
        inputs = check_inputs(as_input_tuple(inputs), shapes, "lower: inputs")
    elif isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ArgumentError(f"lower: samples must be a positive integer (random inputs for the parity check), "
                            f"found {samples!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ArgumentError(f"lower: batch must be a positive integer, found {batch!r}")
    was = qmodel.training
    qmodel.eval()
    try:
        try:
            with torch.no_grad():
                run_graph(qmodel.graph_module, ex)  # initialises any quantizer that has not seen data yet
        except NodeFailure as f:
            raise DataError(f"lower: the model fails on example_inputs at {f.describe()}") from f.__cause__
        gm = copy.deepcopy(qmodel.graph_module).eval()
        lowered = run_passes(gm, lower_passes(ex)).graph_module
        layers = [(r, r.lowered) for _, r in records(lowered)]
        proto = _export(lowered, ex, _translation_table())
        containers = pack_weights(proto, [(r.name, low) for r, low in layers], storage)
        bns = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
        if bns:
            log.warning("exported model keeps %d BatchNormalization nodes (after unquantized layers)", len(bns))
        policy = qmodel.policy
        meta = {
            "fxmpq.policy": json.dumps({k: list(v) for k, v in (policy or {}).items()}),
            "fxmpq.bits": json.dumps({r.name: [low.w_bits, low.a_bits] for r, low in layers}),
            "fxmpq.steps": json.dumps({n.meta.get(QDQ_META): float(lowered.get_buffer(n.args[1].target))
                                       for n in _qdq_nodes(lowered)}),
            "fxmpq.weight_qrange": json.dumps({low.weight_buffer: list(low.qrange) for _, low in layers
                                               if low.qrange}),
            "fxmpq.storage": storage.value,
            "fxmpq.weight_containers": json.dumps({k: c.value for k, c in containers.items()}),
        }
        for k, v in meta.items():
            p = proto.metadata_props.add()
            p.key, p.value = k, v
        proto.producer_name = "fxmpq"
        if inputs is None:
            g = torch.Generator().manual_seed(seed)
            inputs = tuple(torch.randn((samples, *x.shape[1:]), generator=g, dtype=x.dtype) for x in ex)
        inputs = tuple(x.detach().cpu().float() for x in inputs)
        # written to a temp path and checked there: only a model that passed replaces the file at `path`
        with atomic_paths(path, _sidecar(path)) as (tmp, tmp_data):
            _save_model(proto, tmp)
            try:
                report = _check_file(tmp, path, qmodel, lowered, layers, inputs, batch=batch, max_steps=max_steps,
                                     min_top1=min_top1, rtol=rtol)
                report = dataclasses.replace(
                    report, storage=storage.value, weight_containers={k: c.value for k, c in containers.items()},
                    stored_weight_bytes=stored_weight_bytes(proto, [(r.name, low) for r, low in layers], containers))
                if check and not report.passed:
                    raise ExportError(_mismatch(report))
            except ExportError as e:
                kept = _keep_failed(tmp, tmp_data, path)
                reason = str(e).removeprefix(f"{path}: ")
                raise ExportError(f"{path}: the export failed its check, so {path.name} was not replaced (the "
                                  f"failed model is kept for inspection as {kept}): {reason}") from e.__cause__
        if timing is not None:  # the latency audit, on the file now in place
            n = ex[0].shape[0]
            feed = tuple(x[:n] if x.shape[0] >= n else x[:1].expand(n, *x.shape[1:]).contiguous() for x in inputs)
            report = dataclasses.replace(report, **_latency_audit(qmodel, path, [r for r, _ in layers], feed, timing))
    finally:
        qmodel.train(was)
    log.info("lowered to %s\n%s", path, report.table())
    return report


def _check_file(tmp: Path, path: Path, qmodel: QuantModel, lowered: fx.GraphModule, layers: list[Any],
                inputs: tuple[torch.Tensor, ...], *, batch: int, max_steps: float, min_top1: float, rtol: float
                ) -> LowerReport:
    """onnx.checker, ONNX Runtime against PyTorch, and the integer kernels, on the file at `tmp` (the export before
    it replaces `path`, the name the report and the messages give)."""
    import onnx

    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as e:
        raise ExportError(f"{path}: onnx.checker rejected the exported model: {first_line(e)}") from e
    y_pt = _run_torch(qmodel, inputs, batch)
    try:
        y_ort = _run_ort(_session(tmp), inputs, batch)[0]
    except Exception as e:
        raise ExportError(f"{path}: ONNX Runtime could not run the exported model: {first_line(e)}") from e
    y_ort = y_ort.reshape(y_pt.shape)
    diff = np.abs(y_pt.astype(np.float64) - y_ort.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    step = _output_step(lowered)
    steps = max_abs / step if step else None
    rel_l2 = float(np.linalg.norm(diff) / max(np.linalg.norm(y_pt.astype(np.float64)), 1e-30))
    top1 = decisive = None
    ties = 0
    band = 2 * (max_steps * step if step else rtol * max(float(np.abs(y_pt).max()), 1e-12))
    if y_pt.ndim == 2 and y_pt.shape[1] > 1:
        agree = y_pt.argmax(1) == y_ort.argmax(1)
        top1 = float(agree.mean())
        top2 = np.sort(y_pt, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > band
        ties = int((~clear).sum())
        decisive = float(agree[clear].mean()) if clear.any() else None
    if step:
        ok = steps <= max_steps * (1 + 1e-4)
    else:
        ok = max_abs <= rtol * max(float(np.abs(y_pt).max()), 1e-12)
    within = ok
    if top1 is not None:  # judged on the inputs whose top-1 a difference within tolerance cannot flip
        ok = ok and (decisive if decisive is not None else 1.0) >= min_top1
    deployed = deployable(tmp, "lower")  # a packed file's 4-bit weights widened, as fxmpq.ort_session does
    counts = qlinear_counts(deployed)
    fused = sum(counts.get(k, 0) for k in _QLINEAR)
    plain = None
    if isinstance(deployed, bytes):
        plain_counts = qlinear_counts(tmp)
        plain = sum(plain_counts.get(k, 0) for k in _QLINEAR)
    quantized = [(r, low) for r, low in layers if low.w_bits is not None]
    diverging = forced = low_steps = low_div = tail = None
    criterion = "output steps" if step else "relative to max |y|"
    if not ok:
        diverging, forced, y_forced = _quantizer_parity(lowered, tmp, inputs, batch)
        diverging = diverging or "every quantizer agrees within 1 step"
        low_div, low_steps = _lowering_parity(qmodel, lowered, inputs, batch)
        y_head = y_ort[:batch]  # the diagnosis runs on the first `batch` inputs
        if not step and _qdq_nodes(lowered) and y_forced is not None and y_forced.size == y_head.size:
            # a float output after integer layers: a one-step tie at any quantizer upstream moves the output by far
            # more than rtol, so the export is judged stage by stage: every quantizer within one step of PyTorch fed
            # ONNX Runtime's values before it, the lowered graph faithful to the QuantModel, and the float ops after
            # the last quantizers, fed ONNX Runtime's values there, within rtol of ONNX Runtime's output
            y_ort64 = y_head.astype(np.float64)
            tail = float(np.abs(y_forced.reshape(y_head.shape).astype(np.float64) - y_ort64).max(initial=0.0)
                         / max(float(np.abs(y_ort64).max(initial=0.0)), 1e-12))
            criterion = "stage by stage (float output after quantized layers)"
            # top-1 agreement is reported but not judged here: every difference is then a one-step tie upstream
            # amplified by float layers, which can flip any input whose two top logits are closer than that
            ok = within = (forced is not None and forced <= max_steps * (1 + 1e-3) and low_steps <= 1.0 + 1e-3
                           and tail <= rtol)
    return LowerReport(
        path=path, samples=int(inputs[0].shape[0]), max_abs_diff=max_abs, output_step=step,
        max_diff_steps=steps, rel_l2=rel_l2, top1_agreement=top1, passed=ok,
        onnx_bytes=tmp.stat().st_size,
        packed_weight_bytes=int(sum(math.prod(r.weight_shape) * low.w_bits for r, low in quantized) // 8),
        fp32_weight_bytes=int(sum(math.prod(r.weight_shape) for r, _ in layers) * 4),
        quantized_layers=len(quantized), fused_layers=fused, op_counts=dict(counts), diverging=diverging,
        tolerance={"max_steps": max_steps, "min_top1": min_top1, "rtol": rtol},
        top1_decisive=decisive, top1_ties=ties, within_tolerance=within, forced_max_steps=forced,
        lowered_max_steps=low_steps, lowered_diverging=low_div, criterion=criterion, tail_rel_diff=tail,
        fused_layers_plain=plain,
    )


def _mismatch(report: LowerReport) -> str:
    """The ExportError text of a parity failure: the figures, the first divergence, the stage-by-stage verdict."""
    steps, top1, forced = report.max_diff_steps, report.top1_agreement, report.forced_max_steps
    low = report.lowered_max_steps
    limit = report.tolerance["max_steps"]
    return (f"{report.path}: ONNX Runtime does not match PyTorch: max |diff| {report.max_abs_diff:.3g}"
            f"{f' ({steps:.2f} output steps, limit {limit})' if steps is not None else ''}"
            f", top-1 agreement {top1 if top1 is None else f'{100 * top1:.2f} %'}, relative L2 {report.rel_l2:.3g}; "
            f"first divergence: {report.diverging}; QuantModel vs lowered graph max |diff| "
            f"{low if low is None else f'{low:.2f}'} steps"
            f"{f' (first: {report.lowered_diverging})' if report.lowered_diverging else ''}; stage by stage (each "
            f"quantizer fed ONNX Runtime's inputs) max |diff| {forced if forced is None else f'{forced:.2f}'} steps"
            + ("" if not report.stagewise_faithful else
               " (each stage is faithful: the network amplifies float rounding differences; check on trained "
               "weights and real inputs, or relax max_steps)"))
