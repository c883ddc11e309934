"""The parity checks of an export: PyTorch and ONNX Runtime on the same inputs, and the two diagnoses a failed check
runs (the QuantModel against the lowered graph, and each quantizer against ONNX Runtime, both teacher-forced)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..capture.record import quantizer_nodes, quantizer_record_of
from ..capture.value_ops import SHAPE_FUNCTIONS, SHAPE_METHODS, SHAPE_MODULES
from ..errors import ExportError
from ..passes.lower_qdq import QDQ_OP
from ..quant.lsq import LSQQuantizer

if TYPE_CHECKING:
    from ..quant.quant_model import QuantModel

__all__ = ["StageParity", "activation_qdq_outputs", "align_quantizers", "lowering_parity", "open_session", "output_step", "qdq_nodes",
           "quantizer_parity", "run_ort", "run_torch"]


def open_session(path: Path, extra_outputs: Sequence[str] = ()) -> Any:
    """An ONNX Runtime session for the parity checks: MatMulNBits nodes at accuracy_level 0 (fp32 compute, what
    PyTorch computes; the file's own level 4 quantizes activations to int8 per block, bounded by
    fxmpq.quant.kernels.int8_activation_bound), extra intermediate outputs exposed."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    m = onnx.load(str(path))
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    if not extra_outputs and not nbits:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for n in nbits:
        for a in n.attribute:
            if a.name == "accuracy_level":
                a.i = 0
    for name in extra_outputs:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_ort(sess: Any, inputs: tuple[torch.Tensor, ...], batch: int, outputs: Sequence[str] | None = None
             ) -> list[np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    n = inputs[0].shape[0]
    chunks: list[list[np.ndarray]] = []
    for i in range(0, n, batch):
        feed = {k: x[i: i + batch].numpy() for k, x in zip(names, inputs)}
        chunks.append(sess.run(outputs, feed))
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def run_torch(module: nn.Module, inputs: tuple[torch.Tensor, ...], batch: int) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for i in range(0, inputs[0].shape[0], batch):
            y = module(*(x[i: i + batch] for x in inputs))
            if not isinstance(y, torch.Tensor):
                raise ExportError(f"lower() supports models with one tensor output, found {type(y).__name__}")
            outs.append(y.float().numpy())
    return np.concatenate(outs)


def output_step(lowered: fx.GraphModule) -> float | None:
    """The step of the quantizer that produces the graph output (through flatten/reshape/view, and Flatten,
    Identity and Dropout modules: a head that ends in one still has a quantized output), if any."""
    out = next(n for n in lowered.graph.nodes if n.op == "output").args[0]
    node = out
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target is QDQ_OP:
            s = node.args[1]
            return float(lowered.get_buffer(s.target)) if isinstance(s, fx.Node) else None
        if (node.op == "call_method" and node.target in SHAPE_METHODS) or (
                node.op == "call_function" and node.target in SHAPE_FUNCTIONS) or (
                node.op == "call_module" and isinstance(lowered.get_submodule(node.target), SHAPE_MODULES)):
            node = node.args[0]
            continue
        return None
    return None




def lowering_parity(qmodel: QuantModel, lowered: fx.GraphModule, inputs: tuple[torch.Tensor, ...], batch: int
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
            # a copy: an in-place op after the quantizer (timm's SiLU(inplace=True)) would change the reference
            handles.append(q.register_forward_hook(
                lambda m, a, out, name=name: seen.setdefault(name, []).append(out.detach().clone())))
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
            qrec = quantizer_record_of(n)
            if qrec is None:
                return r
            name = qrec.quantizer
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


def qdq_nodes(lowered: fx.GraphModule) -> list[fx.Node]:
    """The lowered graph's quantize-dequantize nodes (those with a quantizer record), in graph order."""
    return [n for n, _ in quantizer_nodes(lowered)]


@dataclass(frozen=True)
class StageParity:
    """Every activation quantizer, PyTorch vs ONNX Runtime (see quantizer_parity).

    `diverging`: the first quantizer more than one step apart end to end (None when all agree within one);
    `forced_max_steps`: the largest difference, in each quantizer's own steps, when PyTorch computes every
    quantizer from ONNX Runtime's values of the quantizers before it (None when the graphs cannot be aligned);
    `forced_output`: the lowered graph's output so computed; `flips` of `values`: the quantizer values a step
    apart so computed (float ops rounding differently near a tie), and `first_flip` the first quantizer in graph
    order (its QuantModel name) with one."""

    diverging: str | None
    forced_max_steps: float | None
    forced_output: np.ndarray | None = None
    flips: int = 0
    values: int = 0
    first_flip: str | None = None
    unaligned: int = 0  # quantizers with no quantize-dequantize pair left in the ONNX graph (not compared)


def activation_qdq_outputs(model: Any) -> list[str]:
    """The activation quantize-dequantize pairs of an ONNX model, in graph order: the outputs of the
    DequantizeLinear nodes fed (maybe through a Clip) by a QuantizeLinear; one per quantizer call of the lowered
    graph (`qdq_nodes`)."""
    return [dq.output[0] for dq, _ in _qdq_pairs(model)]


def _qdq_pairs(model: Any) -> list[tuple[Any, Any]]:
    """(DequantizeLinear, the QuantizeLinear feeding it, maybe through a Clip) of an ONNX model, in graph order."""
    producer = {o: n for n in model.graph.node for o in n.output}
    pairs = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        src = producer.get(n.input[0])
        if src is not None and src.op_type == "Clip":
            src = producer.get(src.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            pairs.append((n, src))
    return pairs


def align_quantizers(qnodes: list[fx.Node], model: Any, lowered: fx.GraphModule | None = None) -> dict[str, str]:
    """The ONNX value (a DequantizeLinear output) of each lowered quantize-dequantize node.

    Both lists are in graph order; a node is paired with the next Q/DQ pair of its kind (per channel or not) whose
    QuantizeLinear reads its scale: by name, or by value (the exporter merges equal initializers under one name),
    looking a few pairs ahead. A node whose arguments repeat an earlier node's (ONNX's optimizer merges identical
    pairs) shares that node's pair; a node with no pair (ONNX Runtime removed it) is left out. Value names cannot
    serve: torch.export renames the nodes."""
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t

    @functools.cache
    def scalar(name: str) -> float | None:
        t = consts.get(name)
        if t is None:
            return None
        v = numpy_helper.to_array(t)
        return float(v.reshape(-1)[0]) if v.size == 1 else None

    # (DQ output, Q's scale, per channel: a per-channel DQ has a scale of its own)
    pairs = [(dq.output[0], q.input[1], len(dq.input) > 1 and dq.input[1] != q.input[1])
             for dq, q in _qdq_pairs(model) if len(q.input) > 1]
    out: dict[str, str] = {}
    by_args: dict[tuple, str] = {}
    j = 0
    for n in qnodes:
        key = tuple(map(str, n.args))
        if key in by_args:
            out[n.name] = by_args[key]
            continue
        if len(n.args) < 2 or not isinstance(n.args[1], fx.Node) or n.args[1].op != "get_attr":
            continue
        target = n.args[1].target
        value = None
        if lowered is not None:
            try:
                value = float(lowered.get_buffer(target).reshape(-1)[0])
            except AttributeError:
                value = None
        channels = n.target is not QDQ_OP
        for k in range(j, min(j + 4, len(pairs))):
            dq, scale, ch = pairs[k]
            if ch == channels and (scale == target or (value is not None and scalar(scale) == value)):
                out[n.name] = by_args[key] = dq
                j = k + 1
                break
    return out


def quantizer_parity(lowered: fx.GraphModule, path: Path, inputs: tuple[torch.Tensor, ...], batch: int
                     ) -> StageParity:
    """Every activation quantizer, PyTorch vs ONNX Runtime, in graph order, on the first `batch` inputs.

    The first divergence is the first quantizer whose outputs differ by more than one of its steps when both
    run end to end. The forced figure is the largest difference, in each quantizer's own steps, when PyTorch
    computes every quantizer from ONNX Runtime's values of the quantizers before it (teacher forcing): at most
    1 means each stage of the export computes what PyTorch computes, and an end-to-end difference beyond that
    is float rounding (LayerNorm, softmax, GELU run by two libraries) that the network itself amplifies; the
    values a step apart there are counted (`flips`), to set beside the noise floor's own.
    """
    import onnx

    qnodes = qdq_nodes(lowered)
    aligned = align_quantizers(qnodes, onnx.load(str(path)), lowered)
    if not aligned and qnodes:
        return StageParity(f"cannot align intermediate outputs (none of {len(qnodes)} quantizers in PyTorch found in "
                           f"the ONNX graph)", None)
    names = list(dict.fromkeys(aligned.values()))
    x = tuple(t[:batch] for t in inputs)
    ys = dict(zip(names, run_ort(open_session(path, names), x, batch, names)))
    ort_out = {k: ys[v] for k, v in aligned.items()}
    steps = {n.name: float(lowered.get_buffer(n.args[1].target)) for n in qnodes}

    def steps_apart(n: fx.Node, r: torch.Tensor) -> tuple[float, np.ndarray]:
        ref = r.detach().numpy()
        y = ort_out[n.name]
        if ref.shape != y.shape and y.size == ref.size:
            y = y.reshape(ref.shape)
        if ref.shape != y.shape:
            return float("inf"), y
        return float(np.abs(ref - y).max(initial=0.0)) / steps[n.name], y

    def apart(n: fx.Node, r: torch.Tensor, y: np.ndarray) -> int:
        """How many values of quantizer `n` are a step or more apart (all of them when the shapes differ)."""
        if y.size != r.numel():
            return r.numel()
        return int((np.abs(r.numpy() - y.reshape(r.shape)) > 0.5 * steps[n.name]).sum())

    first: list[str] = []
    forced: list[float] = []
    flips = [0, 0]
    first_flip: list[str] = []

    class Compare(fx.Interpreter):
        """Runs the lowered graph; with `force`, each quantizer's output is replaced by ONNX Runtime's."""

        def __init__(self, force: bool) -> None:
            super().__init__(lowered)
            self.force = force

        def run_node(self, n: fx.Node) -> Any:
            r = super().run_node(n)
            qrec = quantizer_record_of(n)
            if qrec is None or n.name not in ort_out:  # not a quantizer, or one ONNX Runtime has no pair for
                return r
            d, y = steps_apart(n, r)
            if self.force:
                forced.append(d)
                off = apart(n, r, y) if d > 0.5 else 0
                flips[0] += off
                flips[1] += r.numel()
                if off and not first_flip:
                    first_flip.append(qrec.quantizer)
                return torch.from_numpy(y).reshape(r.shape) if y.size == r.numel() else r
            if d > 1.0 + 1e-3 and not first:
                first.append(f"quantizer {qrec.quantizer} (node {n.name}): max |diff| {d:.2f} steps "
                             f"({apart(n, r, y)} of {r.numel()} values differ)")
            return r

    with torch.no_grad():
        Compare(force=False).run(*x)
        out = Compare(force=True).run(*x)
    out = out[0] if isinstance(out, tuple | list) else out
    out_np = out.detach().float().numpy() if isinstance(out, torch.Tensor) else None
    return StageParity(first[0] if first else None, max(forced, default=0.0), out_np, flips[0], flips[1],
                       first_flip[0] if first_flip else None, len(qnodes) - len(aligned))
