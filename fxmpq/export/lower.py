"""lower(): a fixed QuantModel to a QDQ ONNX model (opset 21), checked and compared against PyTorch in ORT.

The export, the file check at a temp path and the atomic move into place; the parity diagnoses are in
fxmpq/export/parity.py, the latency audit in fxmpq/export/audit.py, the report in fxmpq/export/lower_report.py, weight storage in
fxmpq/quant/storage.py.
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
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..capture.graph import NodeFailure, as_input_tuple, propagate_shapes
from ..capture.record import quantizer_nodes, records
from ..core.atomic import atomic_paths, check_writable
from ..core.batches import check_inputs
from ..core.options import LowerOptions, fold_keywords
from ..errors import ArgumentError, DataError, ExportError, first_line
from ..passes import run_passes
from ..passes.lower_qdq import DQ_OP, NBITS_OP, QDQ_CHANNELS_OP, QDQ_OP
from ..quant.storage import Storage, as_storage, pack_weights, stored_weight_bytes
from ..stages import lower_passes
from .audit import INTEGER_KERNELS, LayerTiming, latency_audit, latency_ms
from .deploy import deployable
from .lower_report import LowerReport
from .measure import TimingOptions
from .onnx_decompose import skip_needless_decomposition
from .onnx_optimize import optimize
from .parity import open_session, run_ort, run_torch
from .verdict import judge, mismatch

if TYPE_CHECKING:
    from ..quant.quant_model import QuantModel

log = logging.getLogger(__name__)

__all__ = ["OPSET", "LayerTiming", "LowerReport", "export_fp32", "latency_ms", "lower", "qlinear_counts"]

OPSET = 21
_TWO_GB = 2**31 - 2**20


# ----------------------------------------------------------------------------------------------- translation
def _matmul_nbits_schema() -> Any:
    """ONNX Runtime's contrib MatMulNBits (com.microsoft, version 1), which onnx does not register: the inputs and
    attributes fxmpq emits (A, B, scales, zero_points, g_idx, bias; K, N, bits, block_size, accuracy_level)."""
    from onnx.defs import OpSchema

    opt = OpSchema.FormalParameterOption.Optional

    def param(name: str, t: str, optional: bool = False) -> Any:
        return OpSchema.FormalParameter(name, t, param_option=opt) if optional else OpSchema.FormalParameter(name, t)

    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T3", True),
                param("g_idx", "T4", True), param("bias", "T1", True)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)"], ""), ("T4", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in
                    ("K", "N", "bits", "block_size", "accuracy_level")])


def _translation_table() -> dict[Any, Any]:
    """ONNX for fxmpq's custom ops: QuantizeLinear(uint8/uint16) -> [Clip] -> DequantizeLinear, DequantizeLinear, and
    com.microsoft MatMulNBits (weight-only linear layers)."""
    import onnx
    from onnxscript import opset21 as op
    from onnxscript.values import Op, Opset

    def container(zero_point: int, qmax: int) -> tuple[int, int]:
        """(ONNX type, largest value) of the activation container: uint8, or uint16 for 9-16-bit grids."""
        return ((onnx.TensorProto.UINT8, 255) if max(zero_point, qmax) <= 255 else
                (onnx.TensorProto.UINT16, 65535))

    def const(name: str, dtype: int, v: int) -> Any:
        return op.Constant(value=onnx.helper.make_tensor(name, dtype, [], [int(v)]))

    def quantize(x: Any, scale: Any, zero_point: int, qmin: int, qmax: int) -> tuple[Any, Any, int]:
        """QuantizeLinear and the clip to [qmin, qmax]: on the integers in uint8; on the float input for uint16,
        which ONNX Runtime's Clip does not take (exact: (lo - zp) * s rounds back to lo, and rounding is monotone)."""
        dtype, top = container(zero_point, qmax)
        zp = const("zp", dtype, zero_point)
        clip = qmin > 0 or qmax < top
        if clip and dtype != onnx.TensorProto.UINT8:
            lo = op.Mul(op.Constant(value_float=float(qmin - zero_point)), scale)
            hi = op.Mul(op.Constant(value_float=float(qmax - zero_point)), scale)
            x = op.Clip(x, lo, hi)
        q = op.QuantizeLinear(x, scale, zp)
        if clip and dtype == onnx.TensorProto.UINT8:
            q = op.Clip(q, const("lo", dtype, qmin), const("hi", dtype, qmax))
        return q, zp, dtype

    def qdq(x: Any, scale: Any, zero_point: int, qmin: int, qmax: int) -> Any:
        q, zp, _ = quantize(x, scale, zero_point, qmin, qmax)
        return op.DequantizeLinear(q, scale, zp)

    def qdq_channels(x: Any, scale: Any, zero_point: int, qmin: int, qmax: int, axis: int, channels: int) -> Any:
        q, _, dtype = quantize(x, scale, zero_point, qmin, qmax)
        zps = op.Constant(value=onnx.helper.make_tensor("zps", dtype, [channels], [int(zero_point)] * channels))
        scales = op.Expand(scale, op.Constant(value_ints=[channels]))
        return op.DequantizeLinear(q, scales, zps, axis=axis)

    def dq(q: Any, scale: Any, axis: int) -> Any:
        return op.DequantizeLinear(q, scale, axis=axis)

    matmul_nbits = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())

    def nbits(x: Any, packed: Any, scales: Any, bias: Any, k: int, n: int, bits: int, block_size: int,
              accuracy_level: int) -> Any:
        return matmul_nbits(x, packed, scales, None, None, bias, K=k, N=n, bits=bits, block_size=block_size,
                                accuracy_level=accuracy_level)

    return {QDQ_OP: qdq, QDQ_CHANNELS_OP: qdq_channels, DQ_OP: dq, NBITS_OP: nbits}


def _export(module: nn.Module, inputs: tuple[Any, ...], table: dict[Any, Any] | None) -> Any:
    """torch.onnx (dynamo) export with a dynamic batch dimension; returns the ModelProto."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    # torch.export specialises dimensions of size 1: trace with a batch of 2 so the batch stays symbolic
    inputs = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
                   for x in inputs)
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    try:
        with warnings.catch_warnings():  # several inputs share the one batch Dim on purpose: not the user's concern
            warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape")
            with skip_needless_decomposition():  # one trace, not two, where nothing needs decomposing
                prog = torch.onnx.export(module, inputs, dynamo=True, opset_version=OPSET, optimize=False,
                                         custom_translation_table=table or None, dynamic_shapes=dyn,
                                         input_names=names, output_names=["output"], verbose=False, report=False)
            optimize(prog)  # torch.onnx's cleanup but for its slowest rewrite rule (fxmpq.export.onnx_optimize)
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
    """Write `model` to `path` atomically (fxmpq.core.atomic); external data beside it, `<name>.data`, over 2 GB."""
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


def to_onnx(lowered: fx.GraphModule, example_inputs: tuple[Any, ...], policy: Any, storage: Storage
            ) -> tuple[Any, list[Any], dict[str, Any]]:
    """The ONNX model of a lowered graph (the output of `stages.lower_passes`), unchanged: torch.export, the QDQ
    translation, weights packed into their containers and fxmpq's metadata. Returns (model proto, [(record,
    lowering)] per layer, weight containers)."""
    layers = [(r, r.lowered) for _, r in records(lowered)]
    proto = _export(lowered, example_inputs, _translation_table())
    containers = pack_weights(proto, [(r.name, low) for r, low in layers], storage)
    bns = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if bns:
        log.warning("exported model keeps %d BatchNormalization nodes (after unquantized layers)", len(bns))
    meta = {
        "fxmpq.policy": json.dumps({k: list(v) for k, v in (policy or {}).items()}),
        "fxmpq.bits": json.dumps({r.name: [low.w_bits, low.a_bits] for r, low in layers}),
        "fxmpq.steps": json.dumps({q.quantizer: float(lowered.get_buffer(n.args[1].target))
                                   for n, q in quantizer_nodes(lowered)}),
        "fxmpq.weight_qrange": json.dumps({low.weight_buffer: list(low.qrange) for _, low in layers
                                           if low.qrange}),
        "fxmpq.storage": storage.value,
        "fxmpq.weight_containers": json.dumps({k: c.value for k, c in containers.items()}),
    }
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    proto.producer_name = "fxmpq"
    return proto, layers, containers


# ----------------------------------------------------------------------------------------------- lower
def lower(
    qmodel: QuantModel,
    path: str | Path,
    example_inputs: Any,
    options: LowerOptions | None = None,
    *,
    inputs: Any = None,
    **legacy: Any,
) -> LowerReport:
    """Lower `qmodel` (policy applied and fixed) to a QDQ ONNX model at `path` and check it; `options`
    (fxmpq.LowerOptions) hold the check's tolerances, the latency audit's settings and the weight storage (each
    field as a keyword of its own, `check=False`, still works for one release with a DeprecationWarning).

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
    than rtol, so the direct comparison cannot tell a faithful export there. A quantized output beyond `max_steps`
    (or below `min_top1`) passes as **faithful** (`criterion`) when every quantizer fed ONNX Runtime's inputs is
    within one step of PyTorch, the lowered graph within one step of the QuantModel, and ONNX Runtime's end-to-end
    spread (output steps, decisive inputs flipped) at most 1.5x PyTorch's own noise floor: the QuantModel run
    against itself with the outputs of its float ops (LayerNorm, softmax, GELU, float accumulations) moved by up
    to 2 float32 epsilons, the worst of 4 seeds (`noise_floor`; fxmpq.export.verdict, fxmpq.export.noise_floor). `strict=True`
    keeps the first rule alone (the floor is still measured and reported when every stage is faithful).

    With `measure` (the default), the exported model is also timed in ONNX Runtime: the median of `repeats` runs at
    the example inputs' batch and `threads` intra-op threads (default: the thread count the hardware file was
    profiled at, else 1), and profiled once (SessionOptions.enable_profiling) to map ORT's nodes back to the
    layers: which ran as integer kernels, each one's kernel time next to the hardware file's prediction; a layer
    ORT runs otherwise than priced (an integer layer in float, a float layer as an integer kernel) is listed in
    `format_mismatches`. `predicted_latency_ms` is the hardware's `latency` metric for the policy when it has one.

    `storage` (fxmpq.quant.storage.Storage) says how quantized weights are stored: "int8" (the default: 8-bit
    containers whatever the bit-width, which ONNX Runtime's CPU provider fuses into QLinearConv) or "packed":
    weights of at most 4 bits in INT4 initializers (UINT4 for a non-negative range; 2- and 3-bit values in the
    4-bit container), so the file size follows the policy. The parity check runs on the packed file as written
    (ORT runs its 4-bit layers as float convolutions, judged by the same tolerance); the kernel count and the
    latency audit are of the session `fxmpq.ort_session` opens, which widens the 4-bit weights in memory and fuses
    them.
    """
    o = fold_keywords("lower", {"options": (LowerOptions, options)}, legacy)["options"]
    samples, batch, max_steps, min_top1, rtol, seed = o.samples, o.batch, o.max_steps, o.min_top1, o.rtol, o.seed
    path = check_writable(path, "lower: path")
    storage = as_storage(o.storage, "lower: storage")
    ex = as_input_tuple(example_inputs)
    if not all(isinstance(x, torch.Tensor) for x in ex):
        raise ExportError("lower() needs tensor example inputs")
    timing = None
    if o.measure:
        prov = qmodel.hardware.provenance
        threads = o.threads if o.threads is not None else (prov.threads if prov and prov.threads else 1)
        try:
            timing = TimingOptions(threads=threads, repeats=o.repeats)
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
        try:  # one run: initialises any quantizer that has not seen data yet and records the shapes the
            propagate_shapes(qmodel.graph_module, ex)  # lowering reads (so the pass need not run the model again)
        except NodeFailure as f:
            raise DataError(f"lower: the model fails on example_inputs at {f.describe()}") from f.__cause__
        gm = copy.deepcopy(qmodel.graph_module).eval()
        lowered = run_passes(gm, lower_passes(None, accuracy_level=qmodel.hardware.matmul_nbits_accuracy_level)).graph_module
        proto, layers, containers = to_onnx(lowered, ex, qmodel.policy, storage)
        if inputs is None:
            g = torch.Generator().manual_seed(seed)
            inputs = tuple(torch.randn((samples, *x.shape[1:]), generator=g, dtype=x.dtype) for x in ex)
        inputs = tuple(x.detach().cpu().float() for x in inputs)
        # written to a temp path and checked there: only a model that passed replaces the file at `path`
        with atomic_paths(path, _sidecar(path)) as (tmp, tmp_data):
            _save_model(proto, tmp)
            try:
                report = _check_file(tmp, path, qmodel, lowered, layers, inputs, batch=batch, max_steps=max_steps,
                                     min_top1=min_top1, rtol=rtol, strict=o.strict)
                report = dataclasses.replace(
                    report, storage=storage.value, weight_containers={k: c.value for k, c in containers.items()},
                    stored_weight_bytes=stored_weight_bytes(proto, [(r.name, low) for r, low in layers], containers))
                if o.check and not report.passed:
                    raise ExportError(mismatch(report))
            except ExportError as e:
                kept = _keep_failed(tmp, tmp_data, path)
                reason = str(e).removeprefix(f"{path}: ")
                raise ExportError(f"{path}: the export failed its check, so {path.name} was not replaced (the "
                                  f"failed model is kept for inspection as {kept}): {reason}") from e.__cause__
        if timing is not None:  # the latency audit, on the file now in place
            n = ex[0].shape[0]
            feed = tuple(x[:n] if x.shape[0] >= n else x[:1].expand(n, *x.shape[1:]).contiguous() for x in inputs)
            report = dataclasses.replace(report, **latency_audit(qmodel, path, [r for r, _ in layers], feed, timing))
    finally:
        qmodel.train(was)
    log.info("lowered to %s\n%s", path, report.table())
    return report


def _check_file(tmp: Path, path: Path, qmodel: QuantModel, lowered: fx.GraphModule, layers: list[Any],
                inputs: tuple[torch.Tensor, ...], *, batch: int, max_steps: float, min_top1: float, rtol: float,
                strict: bool) -> LowerReport:
    """onnx.checker, ONNX Runtime against PyTorch (judged by fxmpq.export.verdict), and the integer kernels, on the file
    at `tmp` (the export before it replaces `path`, the name the report and the messages give)."""
    import onnx

    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as e:
        raise ExportError(f"{path}: onnx.checker rejected the exported model: {first_line(e)}") from e
    y_pt = run_torch(qmodel, inputs, batch)
    try:
        y_ort = run_ort(open_session(tmp), inputs, batch)[0]
    except Exception as e:
        raise ExportError(f"{path}: ONNX Runtime could not run the exported model: {first_line(e)}") from e
    y_ort = y_ort.reshape(y_pt.shape)
    verdict = judge(qmodel, lowered, tmp, inputs, y_pt, y_ort, batch=batch, max_steps=max_steps, min_top1=min_top1,
                    rtol=rtol, strict=strict)
    deployed = deployable(tmp, "lower")  # a packed file's 4-bit weights widened, as fxmpq.ort_session does
    counts = qlinear_counts(deployed)
    fused = sum(counts.get(k, 0) for k in INTEGER_KERNELS)
    plain = None
    if isinstance(deployed, bytes):
        plain_counts = qlinear_counts(tmp)
        plain = sum(plain_counts.get(k, 0) for k in INTEGER_KERNELS)
    quantized = [(r, low) for r, low in layers if low.w_bits is not None]
    return LowerReport(
        path=path, onnx_bytes=tmp.stat().st_size,
        packed_weight_bytes=int(sum(math.prod(r.weight_shape) * low.w_bits for r, low in quantized) // 8),
        fp32_weight_bytes=int(sum(math.prod(r.weight_shape) for r, _ in layers) * 4),
        quantized_layers=len(quantized), fused_layers=fused, op_counts=dict(counts), fused_layers_plain=plain,
        **verdict)
