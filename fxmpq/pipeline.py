"""quantize(): the whole LIMPQ method as one explicit list of stages, resumable from a work directory."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import Analysis
from .atomic import check_writable, remove_stale_temps
from .batches import check_data, split_batch
from .budget import Budget
from .devices import as_device
from .errors import ArgumentError, CheckpointError, DataError, FxmpqError, IndicatorError
from .export import LowerReport, lower
from .graph import as_input_tuple, refuse_quantized
from .hardware import HardwareSpec, load_hardware
from .indicators import Indicators
from .jsonio import dump_json
from .policy import Policy
from .quant_model import QuantModel
from .search import SearchResult, check_feasible, pareto, search
from .stages import apply_policy, prepare
from .train import CHECKPOINT_EVERY, finetune, train_indicators
from .train_state import Stage, restore_model_state

log = logging.getLogger(__name__)

__all__ = ["QuantizedModel", "accuracy", "quantize"]

# Artefact names inside a work directory (each stage's output; a re-run resumes from what is there).
INDICATORS_JSON = "indicators.json"
INDICATORS_CKPT = "indicators.ckpt"
SEARCH_JSON = "search.json"
POLICY_JSON = "policy.json"
FINETUNE_CKPT = "finetune.pt"
SUMMARY_JSON = "summary.json"
AUDIT_JSON = "audit.json"

PAPER_BITS = (2, 3, 4, 5, 6)  # the paper's candidate bit-widths


def default_bits(hw: HardwareSpec) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(weight candidates, activation candidates or None for the same ones): the paper's 2..6 that the hardware runs
    for both, else the hardware's own (an 8-bit-only target searches 8 bits against float); a target whose
    activation widths differ from its weight widths (A16W8 / A8W4 NPUs, a profiled ONNX Runtime CPU file) searches
    its own widths of each."""
    if set(hw.act_bits) != set(hw.weight_bits):
        return tuple(hw.weight_bits), tuple(hw.act_bits)
    both = sorted(set(hw.weight_bits) & set(hw.act_bits))
    return tuple(b for b in PAPER_BITS if b in both) or tuple(both), None


PLOTS = ("bits_per_layer.png", "indicators.png", "pareto.png")
MODEL_ONNX = "model.onnx"
ARTEFACTS = (INDICATORS_JSON, INDICATORS_CKPT, SEARCH_JSON, POLICY_JSON, FINETUNE_CKPT, SUMMARY_JSON, *PLOTS,
             MODEL_ONNX, AUDIT_JSON)


@dataclass
class QuantizedModel:
    """What quantize() returns: the quantized model and everything learned on the way there."""

    model: QuantModel
    policy: Policy
    indicators: Indicators
    analysis: Analysis
    search: SearchResult
    example_inputs: tuple[Any, ...]
    fp32_accuracy: float | None = None
    accuracy: float | None = None
    work_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    audit: LowerReport | None = None  # the export's report (parity, kernels, measured vs predicted latency)

    def export(self, path: str | Path | None = None, **kwargs: Any) -> LowerReport:
        """Lower to QDQ ONNX (default: <work_dir>/model.onnx) and check it against PyTorch in ONNX Runtime; with a
        work dir, the report (the audit) is written to <work_dir>/audit.json. `kwargs` go to fxmpq.lower (e.g.
        storage="packed": <= 4-bit weights as INT4 initializers, opened with fxmpq.ort_session)."""
        if path is None:
            if self.work_dir is None:
                raise FxmpqError("export() needs a path when quantize() ran without a work_dir")
            path = self.work_dir / MODEL_ONNX
        report = lower(self.model, path, self.example_inputs, **kwargs)
        self.files["onnx"] = Path(path)
        self.audit = report
        if self.work_dir is not None:
            dump_json(report.to_dict(), self.work_dir / AUDIT_JSON)
            self.files["audit"] = self.work_dir / AUDIT_JSON
        return report

    def report(self) -> str:
        """The per-layer table (bits, indicators, share of each budget metric) and the headline numbers."""
        lines = [self.search.table(self.analysis, self.indicators), ""]
        w, a = self.policy.average_bits(self.analysis)
        lines.append(f"average bits of searchable layers: W{w:.2f} A{a:.2f}  (weights by params, activations by MACs)")
        for metric, total in self.search.totals.items():
            limit = self.search.limits.get(metric)
            lim = f" / limit {limit:.4g} ({100 * total / limit:.1f} %)" if limit else ""
            lines.append(f"{metric:>10}: {total:.4g}{lim}")
        lines.append(f"search: {self.search.status}, gap {self.search.gap:.3g}, "
                     f"{1000 * (self.search.solve_time + self.search.build_time):.1f} ms")
        if self.fp32_accuracy is not None and self.accuracy is not None:
            lines.append(f"top-1: FP32 {100 * self.fp32_accuracy:.2f} %  ->  quantized {100 * self.accuracy:.2f} %")
        if self.files:
            lines.append("files: " + ", ".join(f"{k}={v}" for k, v in self.files.items()))
        return "\n".join(lines)


@torch.no_grad()
def accuracy(model: nn.Module, data: Any, *, device: str | torch.device | None = None,
             max_batches: int | None = None) -> float:
    """Top-1 accuracy of `model` (put in eval mode for the call) over (inputs, targets) batches."""
    dev = as_device(device, "accuracy: device") or _model_device(model)
    was = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():  # evaluation only: no autograd graph to build or keep
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                inputs, y = split_batch(batch, i, class_targets=True)
                out = model(*(x.to(dev) for x in inputs))
                correct += int((out.argmax(-1).cpu() == y).sum())
                total += int(y.numel())
    finally:
        model.train(was)
    if total == 0:
        raise DataError("validation data yielded no samples")
    return correct / total


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")




def quantize(
    model: nn.Module,
    budget: Budget | str | dict[str, float],
    data: Any,
    example_inputs: Any,
    *,
    hardware: str | HardwareSpec = "bitops",
    bits: Sequence[int] | None = None,
    indicator_epochs: int = 1,
    finetune_epochs: int = 1,
    alpha: float = 2.0,
    lr: float = 0.01,
    finetune_lr: float | None = None,
    val_data: Any = None,
    work_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    per_channel: bool = False,
    distill: bool = True,
    max_steps: int | None = None,
    model_factory: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    indicator_data: Any = None,
    export: bool = True,
    checkpoint_every: int | None = CHECKPOINT_EVERY,
    act_bits: Sequence[int] | None = None,
) -> QuantizedModel:
    """FP32 model + data + budget -> a fine-tuned mixed-precision QuantModel (LIMPQ), every stage kept.

    Stages: prepare (trace, cost analysis, fake-quant insertion) -> joint indicator training -> ILP search under
    `budget` -> apply the policy -> LSQ fine-tuning (distilled from the FP32 model, cosine learning rate). Bad input (unknown hardware,
    a budget below the smallest achievable, data of the wrong shape, an untraceable model) fails before any
    training. With `work_dir`, each stage's artefact is written there and a re-run reuses what exists
    (indicators.json skips indicator training, and fine-tuning then starts from the joint-training state kept in
    indicators.ckpt, as in an uninterrupted run; finetune.pt resumes fine-tuning). Both trainings checkpoint every
    `checkpoint_every` optimizer steps and at each epoch's end, and resume mid-epoch bit for bit (CPU); temp files
    that a killed run left in the work dir are removed at the start.

    `budget` is a Budget, a dict of absolute limits, or a string: "w3a4" (no more BitOps than uniform W3A4, the
    paper's 3MP/4MP), "c12.2" (size <= FP32 size / 12.2), "bitops<=9.7G", "size<=4MB", "latency<=12.5" (a
    metric of the hardware file, in its unit), joined with "&". `bits` are the candidate bit-widths (default: the
    paper's 2..6 that the hardware runs, else the hardware's own, e.g. 8 for a profiled ONNX Runtime CPU file);
    `act_bits` the activations' own candidates (default: `bits`, or every activation width of a hardware file whose
    activation widths differ from its weight widths, such as an A16W8 / A8W4 NPU target).
    With `work_dir` and `export`, the result is lowered to <work_dir>/model.onnx and the export's report, the audit
    (parity, integer kernels, measured ONNX Runtime latency next to the hardware's prediction, layers not run as
    priced), is written to <work_dir>/audit.json and kept as `.audit`; a parity failure is recorded there, not
    raised.
    `indicator_data` feeds indicator training when given (each joint step costs len(bits) + 1 passes, so a subset
    of `data` is often enough); fine-tuning always uses `data`. `model_factory` ("package.module:function", a
    torchvision or fxmpq.models name) and `model_kwargs` are recorded in the checkpoints, so that
    `fxmpq lower <work_dir>` can rebuild the model later.
    """
    if isinstance(model, nn.Module):
        refuse_quantized(model, "quantize")
    hw = load_hardware(hardware)
    if bits is None:
        bits, own_act_bits = default_bits(hw)
        act_bits = own_act_bits if act_bits is None else act_bits
    bits = tuple(bits)
    budget_obj = Budget.coerce(budget)
    device = as_device(device, "quantize: device")
    example = as_input_tuple(example_inputs)
    wd = _work_dir(work_dir)
    files: dict[str, Path] = {}

    # 1. prepare: trace + cost analysis + fake-quant insertion (TraceError here, before any long work)
    qmodel = prepare(model, example, hardware=hw, bits=bits, per_channel=per_channel, act_bits=act_bits)
    if device is not None:
        qmodel.to(device)
    budget_limits = check_feasible(qmodel.analysis, budget_obj, qmodel.all_bits)  # InfeasibleBudget before training
    check_data(model, data, example, "data")
    if indicator_data is not None:
        check_data(model, indicator_data, example, "indicator_data")
    if val_data is not None:
        check_data(model, val_data, example, "val_data")
    fp32_acc = accuracy(model, val_data, device=device) if val_data is not None else None
    log.info("budget %s resolved to %s", budget, budget_limits)

    # 2. joint indicator training (skipped when the work dir holds indicators)
    ind_path = wd / INDICATORS_JSON if wd is not None else None
    if ind_path is not None and ind_path.is_file():
        indicators = _work_dir_indicators(ind_path, qmodel)
        _resume_joint_state(qmodel, wd / INDICATORS_CKPT)
        log.info("indicators read from %s; indicator training skipped", ind_path)
    else:
        ckpt = wd / INDICATORS_CKPT if wd is not None else None
        indicators = train_indicators(qmodel, data if indicator_data is None else indicator_data, epochs=indicator_epochs, lr=lr, distill=distill, seed=seed,
                                      device=device, checkpoint=ckpt, resume=bool(ckpt and ckpt.is_file()),
                                      max_steps=max_steps, progress=progress, model_factory=model_factory,
                                      model_kwargs=model_kwargs, checkpoint_every=checkpoint_every)
        if ind_path is not None:
            indicators.to_json(ind_path)
    if ind_path is not None:
        files["indicators"] = ind_path

    # 3. ILP search
    result = search(qmodel.analysis, indicators, budget_obj, alpha=alpha)
    policy = result.policy
    if wd is not None:
        result.to_json(wd / SEARCH_JSON)
        policy.to_json(wd / POLICY_JSON)
        files["policy"] = wd / POLICY_JSON
        files.update(_plots(qmodel.analysis, indicators, result, budget_obj, alpha, wd))

    # 4. apply the policy (fixes quantizers, adds output quantizers) and fine-tune with LSQ
    apply_policy(qmodel, policy, example)
    ft_ckpt = wd / FINETUNE_CKPT if wd is not None else None
    teacher = copy.deepcopy(model).eval() if distill else None
    if teacher is not None and device is not None:
        teacher.to(device)
    if finetune_epochs > 0:
        finetune(qmodel, data, epochs=finetune_epochs, lr=finetune_lr if finetune_lr is not None else lr,
                 distill_from=teacher, seed=seed, device=device, checkpoint=ft_ckpt, cosine=True,
                 resume=bool(ft_ckpt and ft_ckpt.is_file()), max_steps=max_steps, progress=progress,
                 model_factory=model_factory, model_kwargs=model_kwargs, checkpoint_every=checkpoint_every)
    if ft_ckpt is not None and ft_ckpt.is_file():
        files["checkpoint"] = ft_ckpt
    qmodel.eval()
    q_acc = accuracy(qmodel, val_data, device=device) if val_data is not None else None

    out = QuantizedModel(model=qmodel, policy=policy, indicators=indicators, analysis=qmodel.analysis,
                         search=result, example_inputs=example, fp32_accuracy=fp32_acc, accuracy=q_acc,
                         work_dir=wd, files=files)
    if wd is not None:
        summary = {"budget": str(budget), "limits": budget_limits, "totals": result.totals,
                   "objective": result.objective, "status": result.status, "fp32_accuracy": fp32_acc,
                   "accuracy": q_acc, "average_bits": policy.average_bits(qmodel.analysis)}
        dump_json(summary, wd / SUMMARY_JSON)
        if export:  # 5. lower and audit (parity, kernels, measured latency)
            rep = out.export(check=False)
            if not rep.passed:
                log.warning("the exported model does not match PyTorch within tolerance (see %s)", wd / AUDIT_JSON)
    return out


def _work_dir(work_dir: str | Path | None) -> Path | None:
    """The work directory, created (ArgumentError when it is a file or cannot be created), without the temp files
    a run killed mid-write left there."""
    if work_dir is None:
        return None
    if not isinstance(work_dir, str | Path):
        raise ArgumentError(f"quantize: work_dir must be a path (str or Path), found {type(work_dir).__name__}")
    wd = check_writable(work_dir, "quantize: work_dir", directory=True)
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArgumentError(f"quantize: work_dir {wd} cannot be created: {e.strerror or e}") from None
    remove_stale_temps(wd, ARTEFACTS)
    return wd


def _work_dir_indicators(path: Path, qmodel: QuantModel) -> Indicators:
    """The indicators a previous run left in the work dir, checked against this model; IndicatorError naming the
    file and what to do when they are unreadable or another model's."""
    remedy = (f"delete {path} to train the indicators again (training resumes from {path.parent / INDICATORS_CKPT} "
              f"when it is there), or replace it with indicators of this model")
    try:
        indicators = Indicators.from_json(path)
        indicators.check_covers([m.name for m in qmodel.analysis.searchable], qmodel.bits, qmodel.act_bits)
    except IndicatorError as e:
        text = str(e)
        text = text if text.startswith(str(path)) else f"{path}: {text}"
        raise IndicatorError(f"{text}. The work dir holds indicators this run cannot use: {remedy}") from None
    return indicators


def _resume_joint_state(qmodel: QuantModel, ckpt: Path) -> None:
    """Put `qmodel` where indicator training left it (weights, BatchNorm statistics, step sizes), as an
    uninterrupted run fine-tunes from it; quantizers off, as train_indicators leaves them."""
    if not ckpt.is_file():
        log.warning("%s is missing: fine-tuning starts from the FP32 weights, not from the joint-training state "
                    "(an uninterrupted run starts from the latter)", ckpt)
        return
    try:
        restore_model_state(qmodel, ckpt, Stage.INDICATORS)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; it should hold the joint-training state that fine-tuning starts from: delete "
                              f"it together with {ckpt.parent / INDICATORS_JSON} to train the indicators again") from None
    qmodel.disable_quant()
    log.info("joint-training state read from %s", ckpt)


def _plots(analysis: Analysis, indicators: Indicators, result: SearchResult, budget: Budget, alpha: float,
           wd: Path) -> dict[str, Path]:
    """Bits per layer, indicators per layer and bit, and the BitOps Pareto curve with the chosen point."""
    from .report import plot_bits, plot_indicators, plot_pareto

    out = {"plot_bits": plot_bits(result.policy, analysis, wd / "bits_per_layer.png"),
           "plot_indicators": plot_indicators(indicators, wd / "indicators.png")}
    metric = next((m for m in result.limits if m in analysis.hardware.metrics), None)
    if metric is not None:
        try:
            front = pareto(analysis, indicators, metric=metric, points=20, alpha=alpha)
            chosen = (result.totals[metric], result.objective)
            out["plot_pareto"] = plot_pareto(front, wd / "pareto.png", chosen=chosen)
        except FxmpqError as e:  # a Pareto sweep is a nicety; the chosen policy stands without it
            log.warning("Pareto plot skipped: %s", e)
    return out
