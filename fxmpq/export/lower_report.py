"""LowerReport: what lower() found about an export (parity, the diagnoses, integer kernels, storage, the latency
audit), with its text tables and JSON form."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.tables import render
from .audit import LayerTiming
from .noise_floor import NoiseFloor
from .verdict import floor_line

__all__ = ["LowerReport"]


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
    within_tolerance: bool = True  # the strict max-difference criterion alone (strict: passed = this and top-1)
    # measured only when parity fails: the largest difference at any quantizer, in its own steps, when PyTorch
    # computes each quantizer from ONNX Runtime's values of the ones before it; <= 1 means every stage of the
    # export is faithful and the end-to-end difference is float rounding amplified by the network
    forced_max_steps: float | None = None
    # the latency audit (lower(..., measure=True)): the median of `latency_repeats` runs of the exported model in
    # ONNX Runtime (CPU) at `latency_threads` threads and batch `latency_batch`, on `latency_clock`
    # (fxmpq.export.measure.Clock); the hardware file's prediction for the policy (None without a `latency` metric in a
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
    # how `passed` was judged (fxmpq.export.verdict.Criterion, a str): "output steps" (a quantized output), "relative to
    # max |y|" (a float model), or, for a float output after quantized layers whose direct difference exceeds rtol,
    # "stage by stage (...)": every quantizer within max_steps fed ONNX Runtime's values before it, the lowering
    # faithful, and the float ops after the last quantizers within rtol (`tail_rel_diff`, relative to max |y|) when
    # fed ONNX Runtime's values there; or, for a quantized output beyond max_steps, "faithful: within PyTorch's own
    # noise floor": every stage faithful and ONNX Runtime's spread at most 1.5x `noise_floor`'s. `strict`: only the
    # first rules were applied (lower(strict=True))
    criterion: str = "output steps"
    tail_rel_diff: float | None = None
    strict: bool = False
    # measured when the strict check fails but every stage is faithful (fxmpq.export.noise_floor): the QuantModel against
    # itself with its float ops' outputs moved by up to a few float32 epsilons; `top1_disagreements` counts the decisive
    # inputs whose top-1 ONNX Runtime flips, to set beside the floor's
    noise_floor: NoiseFloor | None = None
    top1_disagreements: int | None = None
    # measured when the strict check fails: quantizer values ONNX Runtime puts one step from PyTorch's when each
    # quantizer is fed ONNX Runtime's inputs (`stage_flips` of `stage_values`, on the first `batch` inputs), the first
    # quantizer where that happens, and the float ops before it (the likely origin of the end-to-end difference)
    stage_flips: int | None = None
    stage_values: int | None = None
    first_flip: str | None = None
    first_flip_ops: tuple[str, ...] = ()
    unaligned_quantizers: int = 0  # quantizers whose quantize-dequantize pair ONNX's optimizer removed (not compared)
    # how the weights are stored (fxmpq.quant.storage.Storage): "int8", or "packed" (<= 4-bit weights in INT4/UINT4
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
        if self.noise_floor is not None:
            lines.append(f"noise floor    {floor_line(self)}")
        if self.diverging:
            lines.append(f"first divergence {self.diverging}")
        if self.lowered_max_steps is not None:
            lines.append(f"lowering       QuantModel vs lowered graph at every quantizer: max |diff| "
                         f"{self.lowered_max_steps:.2f} steps"
                         + (f" (first: {self.lowered_diverging})" if self.lowered_diverging else ""))
        if self.forced_max_steps is not None:
            lines.append(f"stage by stage  every quantizer fed ONNX Runtime's inputs: max |diff| "
                         f"{self.forced_max_steps:.2f} steps ("
                         + ("faithful: the end-to-end difference is float rounding the network amplifies"
                            if self.stagewise_faithful else "an export stage computes something else")
                         + ("" if self.stage_flips is None else
                            f"; {self.stage_flips} of {self.stage_values} values one step apart")
                         + ("" if self.noise_floor is None else
                            f" (the noise floor's perturbation: {self.noise_floor.stage_flips} of "
                            f"{self.noise_floor.stage_values})")
                         + (f", the first at {self.first_flip}" if self.first_flip else "")
                         + (f" after {', '.join(self.first_flip_ops[:3])}" if self.first_flip_ops else "")
                         + (f"; {self.unaligned_quantizers} quantizer(s) without a pair in the ONNX graph, not "
                            f"compared" if self.unaligned_quantizers else "") + ")")
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
        out["criterion"] = str(self.criterion)
        return out
