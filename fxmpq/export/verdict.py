"""The parity verdict of an export: ONNX Runtime's output against PyTorch's, judged strictly, then (when that fails)
stage by stage and against PyTorch's own noise floor; and the ExportError text of a failed verdict.

The criteria, in order (`Criterion`):
1. strict: the end-to-end difference within `max_steps` output steps (or `rtol` of max |y| for a float output) and
   top-1 agreement at least `min_top1` on the decisive inputs;
2. for a quantized output, **faithful**: every quantizer fed ONNX Runtime's inputs within one step of PyTorch, the
   lowered graph within one step of the QuantModel, and ONNX Runtime's end-to-end spread no larger than
   `FLOOR_MARGIN` times PyTorch's own noise floor (fxmpq.export.noise_floor: the QuantModel against itself with its float
   ops' outputs moved by up to `FLOOR_EPS` float32 epsilons, the worst of `FLOOR_SEEDS` seeds), rounded up to whole
   output steps and whole inputs, in output steps and in decisive
   inputs flipped; for a float output after quantized layers, stage by stage (every quantizer within `max_steps`
   fed ONNX Runtime's inputs, the lowering faithful, the float tail within `rtol`);
3. otherwise the export fails, its message naming the stage, or, when every stage is faithful but the spread
   exceeds the floor, both figures and the float ops before the first value ONNX Runtime rounds differently.
`strict=True` keeps rule 1 alone. The floor's constants are fixed, not options: the floor is measured, never tuned.
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx

from .noise_floor import NoiseFloor, float_ops_before, measure_noise_floor
from .parity import lowering_parity, output_step, qdq_nodes, quantizer_parity

if TYPE_CHECKING:
    from ..quant.quant_model import QuantModel
    from .lower_report import LowerReport

__all__ = ["FLOOR_EPS", "FLOOR_MARGIN", "FLOOR_SEEDS", "Criterion", "floor_flip_limit", "floor_line",
           "floor_step_limit", "judge", "mismatch", "within_floor"]

# the noise floor: float ops' outputs moved by up to 2 float32 epsilons (docs/export.md: on torchvision swin_v2_t ONNX
# Runtime and this perturbation round about as many quantizer values differently stage by stage), the worst of 4 seeds;
# ONNX Runtime is allowed 1.5x the floor, rounded up to whole output steps and whole inputs (one more draw of the
# same noise exceeds the worst of 4 with probability 1/5, and one flip moves the output by whole steps; docs/export.md
# gives the measurements)
FLOOR_EPS = 2
FLOOR_SEEDS = 4
FLOOR_MARGIN = 1.5
_EPS = 1e-3  # "within one step": a float quotient of steps may land a hair over


class Criterion(StrEnum):
    """Which rule passed (or, for a failed export, which rule was applied last)."""

    OUTPUT_STEPS = "output steps"
    RELATIVE = "relative to max |y|"
    STAGE_BY_STAGE = "stage by stage (float output after quantized layers)"
    NOISE_FLOOR = "faithful: within PyTorch's own noise floor"


def judge(qmodel: QuantModel, lowered: fx.GraphModule, onnx_path: Path, inputs: tuple[torch.Tensor, ...],
          y_pt: np.ndarray, y_ort: np.ndarray, *, batch: int, max_steps: float, min_top1: float, rtol: float,
          strict: bool) -> dict[str, Any]:
    """The LowerReport fields of the parity verdict: `y_pt` (the QuantModel) against `y_ort` (ONNX Runtime running
    the file at `onnx_path`) on `inputs`, and the diagnoses and noise floor a failed strict check runs."""
    diff = np.abs(y_pt.astype(np.float64) - y_ort.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    step = output_step(lowered)
    steps = max_abs / step if step else None
    rel_l2 = float(np.linalg.norm(diff) / max(np.linalg.norm(y_pt.astype(np.float64)), 1e-30))
    top1 = decisive = None
    clear: np.ndarray | None = None
    ties = disagreements = 0
    band = 2 * (max_steps * step if step else rtol * max(float(np.abs(y_pt).max()), 1e-12))
    if y_pt.ndim == 2 and y_pt.shape[1] > 1:
        agree = y_pt.argmax(1) == y_ort.argmax(1)
        top1 = float(agree.mean())
        top2 = np.sort(y_pt, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > band
        ties = int((~clear).sum())
        decisive = float(agree[clear].mean()) if clear.any() else None
        disagreements = int((~agree[clear]).sum())
    if step:
        ok = steps <= max_steps * (1 + 1e-4)
    else:
        ok = max_abs <= rtol * max(float(np.abs(y_pt).max()), 1e-12)
    within = ok
    if top1 is not None:  # judged on the inputs whose top-1 a difference within tolerance cannot flip
        ok = ok and (decisive if decisive is not None else 1.0) >= min_top1
    fields: dict[str, Any] = dict(
        samples=int(inputs[0].shape[0]), max_abs_diff=max_abs, output_step=step, max_diff_steps=steps, rel_l2=rel_l2,
        top1_agreement=top1, top1_decisive=decisive, top1_ties=ties, within_tolerance=within, strict=strict,
        tolerance={"max_steps": max_steps, "min_top1": min_top1, "rtol": rtol},
        criterion=Criterion.OUTPUT_STEPS if step else Criterion.RELATIVE)
    if ok:
        return {**fields, "passed": True}
    stages = quantizer_parity(lowered, onnx_path, inputs, batch)
    low_div, low_steps = lowering_parity(qmodel, lowered, inputs, batch)
    forced = stages.forced_max_steps
    fields.update(diverging=stages.diverging or "every quantizer agrees within 1 step", forced_max_steps=forced,
                  lowered_max_steps=low_steps, lowered_diverging=low_div, stage_flips=stages.flips,
                  stage_values=stages.values, first_flip=stages.first_flip, unaligned_quantizers=stages.unaligned,
                  first_flip_ops=float_ops_before(qmodel.graph_module).get(stages.first_flip, ())
                  if stages.first_flip else ())
    faithful = forced is not None and forced <= 1.0 + _EPS and low_steps <= 1.0 + _EPS
    y_forced, y_head = stages.forced_output, y_ort[:batch]  # the diagnosis runs on the first `batch` inputs
    if not step:
        if qdq_nodes(lowered) and y_forced is not None and y_forced.size == y_head.size:
            # a float output after integer layers: a one-step tie at any quantizer upstream moves the output by far
            # more than rtol, so the export is judged stage by stage: every quantizer within max_steps of PyTorch fed
            # ONNX Runtime's values before it, the lowered graph faithful to the QuantModel, and the float ops after
            # the last quantizers, fed ONNX Runtime's values there, within rtol of ONNX Runtime's output. Top-1
            # agreement is reported, not judged: a one-step tie upstream amplified by float layers can flip any
            # input whose two top logits are closer than that
            y_ort64 = y_head.astype(np.float64)
            tail = float(np.abs(y_forced.reshape(y_head.shape).astype(np.float64) - y_ort64).max(initial=0.0)
                         / max(float(np.abs(y_ort64).max(initial=0.0)), 1e-12))
            passed = (forced is not None and forced <= max_steps * (1 + _EPS) and low_steps <= 1.0 + _EPS
                      and tail <= rtol)
            fields.update(criterion=Criterion.STAGE_BY_STAGE, tail_rel_diff=tail)  # today's rule, strict too
            return {**fields, "passed": passed, "within_tolerance": passed}
        return {**fields, "passed": False}
    if not faithful:  # a stage computes something else: no floor can excuse it
        return {**fields, "passed": False}
    floor = measure_noise_floor(qmodel, inputs, batch, step=step, decisive=clear, eps=FLOOR_EPS, seeds=FLOOR_SEEDS)
    fields.update(noise_floor=floor, top1_disagreements=disagreements)
    n_decisive = int(clear.sum()) if clear is not None else 0
    if strict or not within_floor(floor, steps, disagreements, n_decisive, max_steps, min_top1):
        return {**fields, "passed": False}
    return {**fields, "passed": True, "criterion": Criterion.NOISE_FLOOR}


def floor_step_limit(floor: NoiseFloor, max_steps: float) -> float:
    """The most output steps ONNX Runtime may differ by under the noise-floor criterion: FLOOR_MARGIN times the
    floor, rounded up to whole steps (a quantized output moves by whole steps: a floor of 1 allows 2), at least
    `max_steps`."""
    return max(max_steps, float(math.ceil(FLOOR_MARGIN * (floor.max_steps or 0.0) - 1e-3)))


def floor_flip_limit(floor: NoiseFloor, decisive_inputs: int, min_top1: float) -> int:
    """The most decisive inputs whose top-1 ONNX Runtime may flip under the noise-floor criterion: FLOOR_MARGIN times
    the most any seed of the floor flipped, rounded up, at least what `min_top1` allows."""
    return max(math.floor(decisive_inputs * (1 - min_top1) + 1e-9), math.ceil(FLOOR_MARGIN * floor.disagreements))


def within_floor(floor: NoiseFloor, steps: float, disagreements: int, decisive_inputs: int, max_steps: float,
                 min_top1: float) -> bool:
    """ONNX Runtime's spread (`steps` output steps, `disagreements` decisive inputs flipped) within the limits."""
    return (steps <= floor_step_limit(floor, max_steps) * (1 + 1e-4)
            and disagreements <= floor_flip_limit(floor, decisive_inputs, min_top1))


def floor_line(report: LowerReport) -> str:
    """ONNX Runtime's spread and PyTorch's own noise floor side by side, in one line."""
    f = report.noise_floor
    if f is None:
        return ""
    n = report.samples - report.top1_ties
    ort_top1 = "" if report.top1_decisive is None else (
        f", decisive top-1 {100 * report.top1_decisive:.2f} % ({report.top1_disagreements} of {n} flipped)")
    own_top1 = "" if f.top1_decisive is None else (
        f", {100 * f.top1_decisive:.2f} % ({f.disagreements} of {n} flipped)")
    max_steps, min_top1 = report.tolerance.get("max_steps", 1.0), report.tolerance.get("min_top1", 0.995)
    steps = report.max_diff_steps or 0.0
    within = within_floor(f, steps, report.top1_disagreements or 0, n, max_steps, min_top1)
    return (f"ONNX Runtime {steps:.2f} output steps{ort_top1} | PyTorch against itself with its {f.float_ops} float "
            f"ops moved by up to {f.eps} float32 epsilons {f.max_steps or 0.0:.2f} steps{own_top1} (worst of "
            f"{f.seeds} seeds, {f.seconds:.0f} s) | allowed {FLOOR_MARGIN}x the floor: "
            f"{floor_step_limit(f, max_steps):.2f} steps, {floor_flip_limit(f, n, min_top1)} flipped: "
            f"{'within' if within else 'EXCEEDED'}")


def mismatch(report: LowerReport) -> str:
    """The ExportError text of a failed parity verdict: the figures, the first divergence, the stage-by-stage
    verdict and, for a faithful export beyond the noise floor, both figures and the float ops responsible."""
    steps, top1, forced = report.max_diff_steps, report.top1_agreement, report.forced_max_steps
    low = report.lowered_max_steps
    limit = report.tolerance["max_steps"]
    text = (f"{report.path}: ONNX Runtime does not match PyTorch: max |diff| {report.max_abs_diff:.3g}"
            f"{f' ({steps:.2f} output steps, limit {limit})' if steps is not None else ''}"
            f", top-1 agreement {top1 if top1 is None else f'{100 * top1:.2f} %'}, relative L2 {report.rel_l2:.3g}; "
            f"first divergence: {report.diverging}; QuantModel vs lowered graph max |diff| "
            f"{low if low is None else f'{low:.2f}'} steps"
            f"{f' (first: {report.lowered_diverging})' if report.lowered_diverging else ''}; stage by stage (each "
            f"quantizer fed ONNX Runtime's inputs) max |diff| {forced if forced is None else f'{forced:.2f}'} steps")
    if not report.stagewise_faithful:
        return text
    if report.noise_floor is None:
        return text + (" (each stage is faithful: the network amplifies float rounding differences; check on trained "
                       "weights and real inputs, or relax max_steps)")
    where = (f"; the first value ONNX Runtime rounds differently is at {report.first_flip}"
             + (f", after the float ops {', '.join(report.first_flip_ops[:3])}" if report.first_flip_ops else "")
             if report.first_flip else "")
    verdict = ("strict=True: the noise floor is reported, not applied" if report.strict else
               "ONNX Runtime's spread exceeds it")
    return (text + f" (each stage is faithful); against PyTorch's own noise floor: {floor_line(report)} ({verdict})"
            f"{where} ({report.stage_flips} of {report.stage_values} quantizer values one step apart stage by stage; "
            f"the perturbation {report.noise_floor.stage_flips} of {report.noise_floor.stage_values})")
