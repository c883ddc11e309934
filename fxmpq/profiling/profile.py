"""Measured hardware files: every quantizable layer of a model timed in ONNX Runtime in each format it runs, and
the rest of the model, written as a hardware TOML (per-layer `layer_table` terms and a `constant` term).

Each layer is profiled alone, exactly as fxmpq deploys it: a one-layer model (a copy of the layer, its real input
shape) goes through `prepare`, `apply_policy` (W8A8, W8A16, float, and for linear layers weight-only 2/4/8) and
`lower`, so the ONNX graph carries the Q/DQ nodes the exporter emits and ONNX Runtime fuses it as in the full
model (QLinearConv for W8A8, MatMulNBits for weight-only). A matmul of two activations (attention's q @ k^T and
attn @ v) is timed the same way as a two-input model (W8A8: MatMulIntegerToFloat), alone only (no chain).
W2A8 and W4A8 run the W8A8 kernel (8-bit containers, or 4-bit ones widened by fxmpq.ort_session: each layer's
W4A8 is timed that way too, as a check) and are priced at its values; their `packed_bytes` are measured from the
packed export.
A layer alone also pays the conversions at its edges (quantize, dequantize, NCHW <-> NHWC or blocked layouts);
two layers run back to back convert once between them when their formats differ, or not at all: each such pair (a
layer and the layer it reads through BN, ReLU or reshapes only, `LayerRecord.input_layer`) is exported and timed
as a two-layer model in every combination of formats, and the difference (pair - the two alone) is the second
layer's `chain` value for that combination. Every session and the two whole models (all float, all W8A8) run in
interleaved rounds, each input written right before its run (in cache, as the tensor the op before just produced
would be). The file's constant, the rest of the model, is the all-float model minus its layers (with their
chains); one factor on the W8A8 values then makes the all-W8A8 prediction equal its measurement (both calibration
points and the factor are in the file's comments).

About 500 lines: the measurement and the hardware file it writes (HardwareProfile.to_toml, with its comments and
provenance) are kept together because the file's every value and comment is one measured quantity; the models
it times are built by fxmpq/profiling/profile_models.py, the timing itself is fxmpq/export/measure.py, the file's schema
fxmpq/hardware/spec.py.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture.record import LayerRecord, records
from ..core.cpuinfo import CpuInfo, cpu_info
from ..errors import ArgumentError
from ..export.deploy import deployable
from ..export.measure import TimingOptions, cpu_name, runtime_name, session, time_sessions
from ..hardware.formats import integer_kernel
from ..hardware.spec import (
    FLOAT,
    FLOAT_KEY,
    HardwareSpec,
    LayerKind,
    LayerSignature,
    Pair,
    loads_hardware,
    pair_name,
)
from ..quant.storage import initializer_bytes
from ..stages import analyze
from .bundle import Part, export_one, export_parts
from .profile_models import one_layer_module, pair_module, reads_elsewhere

__all__ = ["A16", "INT8", "ORT_FORMATS", "SAME_KERNEL", "WEIGHT_ONLY", "HardwareProfile", "LayerProfile",
           "ort_target", "profile_model"]

INT8: Pair = (8, 8)
A16: Pair = (8, 16)  # 16-bit activations: DequantizeLinear -> float op -> QuantizeLinear(uint16) on ORT's CPU provider
ORT_FORMATS: tuple[Pair, ...] = (INT8, FLOAT)  # the two whole-model calibration points
# W2A8 and W4A8 run the W8A8 graph (8-bit containers holding other integers; a packed file is widened to it by
# fxmpq.ort_session), so they are priced at the W8A8 values; each layer's W4A8 is also timed packed and widened,
# and the median ratio to W8A8 is in the file's comments
SAME_KERNEL: tuple[Pair, ...] = ((2, 8), (4, 8))
WEIGHT_ONLY: tuple[Pair, ...] = ((2, None), (4, None), (8, None))  # linear layers: MatMulNBits, accuracy level 4

_TARGET = """
[target]
name = "ort_cpu"
weight_bits = [2, 4, 8]
act_bits = [8, 16]
pairs = [[2, 8], [4, 8], [8, 8], [8, 16]]
float_kinds = ["conv", "depthwise_conv", "linear", "matmul"]
weight_only_bits = [2, 4, 8]

[pins]
first_layer = false
last_layer = false

[metrics.macs]
terms = [{ type = "macs" }]
"""


def ort_target() -> HardwareSpec:
    """The formats fxmpq profiles on ONNX Runtime's CPU provider: W8A8 (QLinearConv; W2A8 and W4A8 run the same
    kernel), A16W8 (float conv between uint16 Q/DQ), float, and weight-only 2/4/8-bit linear layers (MatMulNBits);
    no pins (a pin would only take float away from the first and last layer)."""
    return loads_hardware(_TARGET, "ort_cpu (profiling target)")


def _weight_bytes(path: Path) -> int:
    """Bytes of the layer's weight, bias and their scales in its one-layer file (int8/int4 + int32 + float32 scales,
    packed MatMulNBits blocks, or float32 weight and bias, the last maybe transposed under another name)."""
    return initializer_bytes(path, weights_only=True)


def _measured_formats(rec: LayerRecord, hw: HardwareSpec) -> list[Pair]:
    """The formats timed for `rec` (its other formats share their kernel, SAME_KERNEL)."""
    fmts = [INT8, A16]
    if rec.kind in hw.float_kinds:
        fmts.append(FLOAT)
    if rec.kind == LayerKind.LINEAR:
        fmts += [f for f in WEIGHT_ONLY if f[0] in hw.weight_only_bits]
    return fmts


def _input_shapes(rec: LayerRecord) -> tuple[tuple[int, ...], ...]:
    """The shapes of the one-layer model's inputs: the layer's input, and a matmul's second operand."""
    return (rec.in_shape, rec.weight_shape) if rec.kind is LayerKind.MATMUL else (rec.in_shape,)


def _random(shapes: Sequence[tuple[int, ...]], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(s, generator=gen) for s in shapes)


def _feeds(s: Any, values: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The ONNX Runtime feed of session `s`: its inputs in order."""
    return {i.name: v.numpy() for i, v in zip(s.get_inputs(), values, strict=True)}


def _kernel_of(fmt: Pair) -> Pair:
    """The measured format whose kernel `fmt` runs."""
    return INT8 if fmt in SAME_KERNEL else fmt


@dataclass
class LayerProfile:
    """One layer: its signature, the median latency of its one-layer model per format (ms) and its weight bytes;
    with `after` (the layer it reads back to back), the chain change per format (ms, the pair measured)."""

    name: str
    signature: LayerSignature
    measured_ms: dict[Pair, float]
    spread: dict[Pair, float]  # (p90 - p10) / median of the samples
    weight_bytes: dict[Pair, int]
    after: str | None = None
    chain_ms: dict[Pair, dict[Pair, float]] = field(default_factory=dict)  # [own format][format of `after`]
    packed_bytes: dict[Pair, int] = field(default_factory=dict)  # with storage="packed" (<= 4-bit weights as INT4)
    packed_ms: float | None = None  # W4A8 alone, packed and widened as fxmpq.ort_session opens it


@dataclass
class HardwareProfile:
    """What `profile_model` measured; `to_toml()` is the hardware file."""

    model: str
    input: tuple[int, ...]  # per-sample shape
    batch: int
    threads: int
    repeats: int
    clock: str
    layers: list[LayerProfile]
    float_model_ms: float  # the whole model, every layer in float
    int8_model_ms: float  # the whole model, every layer at W8A8
    command: str = ""
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ"))
    runtime: str = field(default_factory=runtime_name)
    cpu: str = field(default_factory=cpu_name)
    cpu_info: CpuInfo = field(default_factory=cpu_info)
    name: str = "ort_cpu"
    wall_s: dict[str, float] = field(default_factory=dict)  # where profiling spent its time: export, sessions, timing

    def chains(self, fmt: Pair) -> float:
        """The sum of the chains when every layer runs in `fmt` (ms)."""
        return sum(lp.chain_ms.get(fmt, {}).get(fmt, 0.0) for lp in self.layers)

    @property
    def remainder_ms(self) -> float:
        """The rest of the model: the all-float model minus its float layers (alone, plus their chains)."""
        return self.float_model_ms - sum(lp.measured_ms[FLOAT] for lp in self.layers) - self.chains(FLOAT)

    @property
    def int8_predicted_ms(self) -> float:
        """The all-W8A8 model as the layers alone and their chains predict it (before `int8_scale`)."""
        return self.remainder_ms + sum(lp.measured_ms[INT8] for lp in self.layers) + self.chains(INT8)

    @property
    def int8_scale(self) -> float:
        """The factor on every W8A8 value (alone) that makes the all-W8A8 prediction equal its measurement."""
        s = sum(lp.measured_ms[INT8] for lp in self.layers)
        return 1.0 + (self.int8_model_ms - self.int8_predicted_ms) / s if s > 0 else 1.0

    def latency(self, name: str, fmt: Pair) -> float:
        """The file's latency of layer `name` in `fmt` (ms): alone, integer-kernel values times `int8_scale`."""
        lp = next(x for x in self.layers if x.name == name)
        return lp.measured_ms[fmt] * (self.int8_scale if integer_kernel(*fmt) else 1.0)

    def target_lines(self) -> list[str]:
        """The [target] bit-widths and pairs: the formats the layers were priced in."""
        fmts = {f for lp in self.layers for f in lp.measured_ms}
        pairs = sorted(f for f in fmts if f[0] is not None and f[1] is not None)
        wo = sorted({f[0] for f in fmts if f[0] is not None and f[1] is None})
        wbits = sorted({w for w, _ in pairs} | set(wo))
        kinds = ["conv", "depthwise_conv", "linear"]
        if any(lp.signature.kind is LayerKind.MATMUL for lp in self.layers):
            kinds.append("matmul")
        lines = [f"weight_bits = {wbits}", f"act_bits = {sorted({a for _, a in pairs})}",
                 f"pairs = {json.dumps([list(p) for p in pairs])}", f"float_kinds = {json.dumps(kinds)}"]
        return lines + ([f"weight_only_bits = {wo}"] if wo else [])

    def packed_ratio(self) -> float | None:
        """Median over layers of W4A8 packed-and-widened alone / W8A8 alone (the same kernel: about 1)."""
        r = sorted(lp.packed_ms / lp.measured_ms[INT8] for lp in self.layers if lp.packed_ms and INT8 in lp.measured_ms)
        return r[len(r) // 2] if r else None

    def to_toml(self) -> str:
        """The hardware description: [target], [pins], [metrics.latency], [metrics.bytes], [provenance]."""
        shape = "x".join(map(str, self.input))
        q = json.dumps
        desc = (f"ONNX Runtime CPU, {self.model} {shape} batch {self.batch}, {self.threads} thread(s), measured on "
                f"{self.cpu}")
        source = f"fxmpq profile on {self.date}: {self.runtime}, {self.cpu}"
        latency_desc = f"measured ONNX Runtime latency, {self.threads} thread(s), batch {self.batch}"
        notes = (f"whole model all float {self.float_model_ms:.4f} ms, all W8A8 {self.int8_model_ms:.4f} ms "
                 f"(layers alone and chains {self.int8_predicted_ms:.4f} ms; W8A8 scale {self.int8_scale:.4f})")
        sum_int8 = sum(lp.measured_ms[INT8] for lp in self.layers)
        sum_float = sum(lp.measured_ms[FLOAT] for lp in self.layers)
        n_chains = sum(1 for lp in self.layers if lp.chain_ms)
        lines = [
            f"# ONNX Runtime CPU latency of {self.model} at {shape}, batch {self.batch}, {self.threads} thread(s),",
            "# measured by fxmpq profile (fxmpq.profiling.profile): every quantizable layer exported alone by fxmpq",
            "# (prepare, apply_policy in each format, lower) and timed in ONNX Runtime; the two whole models",
            "# (all layers float, all W8A8) timed in the same interleaved rounds.",
            f"#   command: {self.command}",
            f"#   {self.runtime}; CPU {self.cpu}; {self.date}",
            f"#   clock {self.clock} (median of {self.repeats} runs after warm-up; thread_cpu = the calling thread's",
            "#   CPU time, which at one thread is the latency on a core of its own, whatever else the machine runs)",
            f"# whole model: all float {self.float_model_ms:.4f} ms, all W8A8 {self.int8_model_ms:.4f} ms",
            f"# layers alone: sum float {sum_float:.4f} ms, sum W8A8 {sum_int8:.4f} ms; chains of {n_chains} pairs of",
            f"# layers back to back, all float {self.chains(FLOAT):.4f} ms, all W8A8 {self.chains(INT8):.4f} ms",
            f"# rest of the model (constant term) = all float - sum float - float chains = {self.remainder_ms:.4f} ms",
            f"# all W8A8 from the layers alone and their chains: {self.int8_predicted_ms:.4f} ms, measured "
            f"{self.int8_model_ms:.4f} ms; so W8A8 values = layer alone x {self.int8_scale:.4f}",
            *_comment_formats(self),
            "# Pins: none. The search decides the first and last layers like the others.",
            "",
            "[target]",
            f"name = {q(self.name)}",
            f"description = {q(desc)}",
            f"sources = [{q(source)}]",
            *self.target_lines(),
            "",
            "[pins]",
            "first_layer = false",
            "last_layer = false",
            "",
            "[metrics.latency]",
            'unit = "ms"',
            f"description = {q(latency_desc)}",
            "",
            "[[metrics.latency.terms]]",
            'type = "constant"',
            f"value = {self.remainder_ms!r}",
            "",
            "[[metrics.latency.terms]]",
            'type = "layer_table"',
            "",
            "[metrics.latency.terms.layers]",
        ]
        for lp in self.layers:
            vals = {fmt: self.latency(lp.name, fmt) for fmt in lp.measured_ms}
            lines.append(f"{q(lp.name)} = {{ {_entry(lp.signature, vals, lp.after, lp.chain_ms)} }}")
        lines += [
            "",
            "[metrics.bytes]",
            'unit = "bytes"',
            'description = "weight, bias and scale bytes of the layers in the ONNX file (int8 weights, int32 bias and '
            'float32 scales; or float32 weights and bias)"',
            "",
            "[[metrics.bytes.terms]]",
            'type = "layer_table"',
            "",
            "[metrics.bytes.terms.layers]",
        ]
        for lp in self.layers:
            lines.append(f"{q(lp.name)} = {{ {_entry(lp.signature, {k: float(v) for k, v in lp.weight_bytes.items()})} }}")
        if any(lp.packed_bytes for lp in self.layers):
            lines += [
                "",
                "[metrics.packed_bytes]",
                'unit = "bytes"',
                'description = "the same with lower(storage=\\"packed\\"): weights of <= 4 bits as INT4 initializers, '
                'two to a byte"',
                "",
                "[[metrics.packed_bytes.terms]]",
                'type = "layer_table"',
                "",
                "[metrics.packed_bytes.terms.layers]",
            ]
            for lp in self.layers:
                vals = {k: float(lp.packed_bytes.get(k, v)) for k, v in lp.weight_bytes.items()}
                lines.append(f"{q(lp.name)} = {{ {_entry(lp.signature, vals)} }}")
        lines += [
            "",
            "[provenance]",
            'tool = "fxmpq profile"',
            f"command = {q(self.command)}",
            f"date = {q(self.date)}",
            f"model = {q(self.model)}",
            f"input = {q(shape)}",
            f"batch = {self.batch}",
            f"threads = {self.threads}",
            f"runtime = {q(self.runtime)}",
            f"cpu = {q(self.cpu)}",
            f"cpu_vendor = {q(self.cpu_info.vendor)}",
            *([f"cpu_family = {self.cpu_info.family}"] if self.cpu_info.family is not None else []),
            *([f"cpu_model = {self.cpu_info.model}"] if self.cpu_info.model is not None else []),
            f"isa = [{', '.join(q(f) for f in self.cpu_info.features)}]",
            f"clock = {q(self.clock)}",
            f"repeats = {self.repeats}",
            f"notes = {q(notes)}",
            "",
        ]
        return "\n".join(lines)


def _comment_formats(prof: HardwareProfile) -> list[str]:
    fmts = {f for lp in prof.layers for f in lp.measured_ms}
    out = []
    if A16 in fmts:
        out.append("# W8A16: uint16 Q/DQ around a float conv (ORT's CPU QDQ selectors fuse 8-bit tensors only), timed.")
    if any(f in fmts for f in SAME_KERNEL):
        ratio = prof.packed_ratio()
        out.append("# W2A8, W4A8: the W8A8 kernel (8-bit containers; a packed file is widened by fxmpq.ort_session),")
        out.append("# priced at the W8A8 values" + (f"; W4A8 timed packed and widened: median {ratio:.3f}x W8A8 alone"
                                                    if ratio is not None else ""))
    if any(f[1] is None and f[0] is not None for f in fmts):
        out.append("# WbAfloat (linear layers): com.microsoft MatMulNBits, block 32, accuracy level 4, timed per bits.")
    return out


def _key_of(fmt: Pair) -> str:
    return FLOAT_KEY if fmt == FLOAT else json.dumps(pair_name(fmt))


def _entry(sig: LayerSignature, values: dict[Pair, float], after: str | None = None,
           chain: dict[Pair, dict[Pair, float]] | None = None) -> str:
    def fmt_values(vals: dict[Pair, float]) -> list[str]:
        return [f"{_key_of(f)} = {v!r}" for f, v in vals.items()]

    parts = [f"kind = {json.dumps(sig.kind.value)}", f"shape = {json.dumps(sig.shape)}",
             f"weight = {json.dumps(sig.weight)}", *fmt_values(values)]
    if after is not None and chain:
        inner = ", ".join(f"{_key_of(f)} = {{ {', '.join(fmt_values(v))} }}" for f, v in chain.items())
        parts += [f"after = {json.dumps(after)}", f"chain = {{ {inner} }}"]
    return ", ".join(parts)


def _tag(fmt: Pair) -> str:
    return "float" if fmt == FLOAT else pair_name(fmt)


def _spread(samples: Sequence[float]) -> float:
    s = sorted(samples)
    med = s[len(s) // 2]
    lo, hi = s[int(0.1 * (len(s) - 1))], s[math.ceil(0.9 * (len(s) - 1))]
    return (hi - lo) / med if med > 0 else 0.0


def profile_model(model: nn.Module, example: torch.Tensor, *, model_name: str, threads: int = 1, repeats: int = 20,
                  warmup: int = 3, progress: bool = True, command: str | None = None,
                  work_dir: str | Path | None = None, warm_inputs: bool = True) -> HardwareProfile:
    """Profile every quantizable layer of `model` (on `example`, batch first) in W8A8 and float, and the whole model
    in each; see the module docstring. `work_dir` keeps the exported ONNX files (default: a temporary directory)."""
    from tqdm import tqdm

    timing = TimingOptions(threads=threads, repeats=repeats, warmup=warmup)
    hw = ort_target()
    model = copy.deepcopy(model).eval()
    analysis = analyze(model, example, hardware=hw)
    recs = list(analysis.layers)
    if not recs:
        raise ArgumentError(f"{model_name} has no quantizable layers to profile")
    gm = analysis.graph_module
    node_of = {r.name: n for n, r in records(gm)}
    by_name = {r.name: r for r in recs}
    # layers back to back; a matmul reads a second computed operand, so it is timed alone only (no chain)
    pairs = [(r.input_layer, r.name) for r in recs if r.input_layer in by_name
             and LayerKind.MATMUL not in (r.kind, by_name[r.input_layer].kind)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(work_dir) if work_dir is not None else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        paths: dict[tuple[str, Pair], Path] = {}
        measured = {r.name: _measured_formats(r, hw) for r in recs}
        whole = {}
        t0 = time.perf_counter()
        for fmt in ORT_FORMATS:  # first: a model that cannot be lowered fails before the layers' exports
            whole[fmt] = export_one(model, example, fmt, d / f"model_{_tag(fmt)}.onnx", hw)
        jobs = [(r, fmt, "int8") for r in recs for fmt in measured[r.name]]
        # W4A8 packed: its bytes, and widened its time (a matmul has no weight to pack)
        jobs += [(r, SAME_KERNEL[-1], "packed") for r in recs if r.kind is not LayerKind.MATMUL]
        pair_jobs = [(u, v, fu, fv) for u, v in pairs for fu in measured[u] for fv in measured[v]]
        timed_pairs = set(pairs)
        bar = tqdm(total=len(jobs) + len(pair_jobs), desc="export", unit="model", disable=not progress,
                   file=sys.stderr)
        packed_paths: dict[str, Path] = {}
        pair_paths: dict[tuple[str, Pair, Pair], Path] = {}
        parts: dict[str, list[Part]] = {"int8": [], "packed": []}
        for i, (r, fmt, storage) in enumerate(jobs):
            x = _random(_input_shapes(r), torch.Generator().manual_seed(i))
            tag = _tag(fmt) + ("_packed" if storage == "packed" else "")
            p = d / f"layer{i:03d}_{tag}.onnx"
            parts[storage].append(Part(one_layer_module(gm, node_of[r.name]), x, [fmt], p))
            if storage == "packed":
                packed_paths[r.name] = p
            else:
                paths[(r.name, fmt)] = p
        for i, (u, v, fu, fv) in enumerate(pair_jobs):
            x = torch.randn(by_name[u].in_shape, generator=torch.Generator().manual_seed(i))
            p = d / f"pair{i:03d}_{'_'.join(_tag(f) for f in (fu, fv))}.onnx"
            parts["int8"].append(Part(pair_module(gm, node_of[u], node_of[v]), x, [fu, fv], p))
            pair_paths[(v, fu, fv)] = p
        for storage, ps in parts.items():  # a few torch.onnx exports, each cut into its models
            export_parts(ps, hw, storage, progress=bar)
        bar.close()
        t1 = time.perf_counter()
        runs: dict[Any, tuple[Any, dict]] = {}
        shapes = {r.name: _input_shapes(r) for r in recs}
        gen = torch.Generator().manual_seed(0)
        for (name, fmt), p in paths.items():
            s = session(p, threads)
            runs[(name, fmt)] = (s, _feeds(s, _random(shapes[name], gen)))
        for name, p in packed_paths.items():
            s = session(deployable(p, "profile"), threads)  # widened as fxmpq.ort_session opens it
            runs[("<packed>", name)] = (s, _feeds(s, _random(shapes[name], gen)))
        for (v, fu, fv), p in pair_paths.items():
            s = session(p, threads)
            runs[("<pair>", v, fu, fv)] = (s, _feeds(s, _random(shapes[by_name[v].input_layer], gen)))
        for fmt, p in whole.items():
            s = session(p, threads)
            runs[("<model>", fmt)] = (s, {s.get_inputs()[0].name: example.numpy()})
        t2 = time.perf_counter()
        with tqdm(total=repeats, desc="time", unit="round", disable=not progress, file=sys.stderr) as tb:
            times = time_sessions(runs, timing, progress=tb, warm_inputs=warm_inputs)
        wall_s = {"export": t1 - t0, "sessions": t2 - t1, "timing": time.perf_counter() - t2}
        layers = []
        for r in recs:
            fmts = measured[r.name]
            offered = [*fmts, *SAME_KERNEL]  # the W8A8 kernel's other weight widths
            chain: dict[Pair, dict[Pair, float]] = {}
            u = r.input_layer if (r.input_layer, r.name) in timed_pairs else None
            if u is not None:
                shared = reads_elsewhere(node_of[u], node_of[r.name])
                for (v, fu, fv) in pair_paths:
                    if v != r.name:
                        continue
                    delta = (times[("<pair>", v, fu, fv)].median_ms - times[(u, fu)].median_ms
                             - times[(v, fv)].median_ms)
                    # both integer: the producer's other reader (a residual add) keeps the dequantize the pair
                    # saves; of the quantize and dequantize between the two, about half is saved
                    chain.setdefault(fv, {})[fu] = delta / 2 if shared and fu == fv == INT8 else delta
                chain = {own: {after: chain[_kernel_of(own)][_kernel_of(after)] for after in [*measured[u], *SAME_KERNEL]}
                         for own in offered}
            matmul = r.kind is LayerKind.MATMUL  # no parameters: no weight bytes, nothing packed
            wbytes = {f: 0 if matmul else _weight_bytes(paths[(r.name, _kernel_of(f))]) for f in offered}
            packed = 0 if matmul else _weight_bytes(packed_paths[r.name])
            layers.append(LayerProfile(
                name=r.name, signature=LayerSignature.of(r),
                measured_ms={f: times[(r.name, _kernel_of(f))].median_ms for f in offered},
                spread={f: _spread(times[(r.name, _kernel_of(f))].samples) for f in offered},
                weight_bytes=wbytes, packed_bytes={**wbytes, **dict.fromkeys(SAME_KERNEL, packed)},
                packed_ms=None if matmul else times[("<packed>", r.name)].median_ms,
                after=u if chain else None, chain_ms=chain))
    cmd = command if command is not None else " ".join(shlex.quote(a) for a in sys.argv)
    return HardwareProfile(model=model_name, input=tuple(example.shape[1:]), batch=int(example.shape[0]),
                           threads=threads, repeats=repeats, clock=timing.resolved_clock.value, layers=layers,
                           float_model_ms=times[("<model>", FLOAT)].median_ms,
                           int8_model_ms=times[("<model>", INT8)].median_ms, command=cmd, wall_s=wall_s)
