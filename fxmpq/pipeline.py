"""quantize(): the whole LIMPQ method as one explicit list of stages, resumable from a work directory."""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture.graph import as_input_tuple, refuse_quantized
from .core.atomic import check_writable, remove_stale_temps
from .core.batches import check_data, split_batch
from .core.devices import as_device
from .core.jsonio import dump_json
from .core.options import (
    MEASURE_BATCHES,
    LowerOptions,
    QuantOptions,
    SearchOptions,
    TrainOptions,
    check_joint_passes,
    fold_keywords,
)
from .core.workdir import (
    ARTEFACTS,
    AUDIT_JSON,
    CANDIDATES_JSON,
    FINETUNE_CKPT,
    INDICATORS_CKPT,
    INDICATORS_JSON,
    MEASURED_JSON,
    MODEL_ONNX,
    POLICY_JSON,
    SEARCH_JSON,
    SUMMARY_JSON,
)
from .cost.analysis import Analysis
from .cost.budget import Budget
from .cost.policy import Policy
from .errors import ArgumentError, CheckpointError, DataError, FxmpqError, IndicatorError
from .export.lower import LowerReport, lower
from .hardware.spec import HardwareSpec, load_hardware
from .policy_search.api import SearchResult, check_feasible, pareto
from .policy_search.blend import blend_indicators
from .policy_search.candidates import DEFAULT_COUNT, CandidateSet, as_result
from .policy_search.indicators import Indicators
from .policy_search.report import plot_bits, plot_indicators, plot_pareto
from .policy_search.selection import VerifyOptions, select_policy
from .policy_search.sensitivity import measured_indicators
from .policy_search.targets import check_goal, parse_goal
from .quant.quant_model import QuantModel
from .stages import apply_policy, prepare
from .train.train_state import Stage, restore_model_state
from .train.trainings import finetune, train_indicators

log = logging.getLogger(__name__)

__all__ = ["QuantizedModel", "accuracy", "quantize"]

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
    candidates: CandidateSet | None = None  # the verified candidates (None: verification did not run)

    @property
    def final_drop(self) -> float | None:
        """FP32 top-1 minus the fine-tuned model's, on the validation data (None without it)."""
        if self.fp32_accuracy is None or self.accuracy is None:
            return None
        return self.fp32_accuracy - self.accuracy

    def export(self, path: str | Path | None = None, options: LowerOptions | None = None, **kwargs: Any
               ) -> LowerReport:
        """Lower to QDQ ONNX (default: <work_dir>/model.onnx) and check it against PyTorch in ONNX Runtime; with a
        work dir, the report (the audit) is written to <work_dir>/audit.json. `options` and `kwargs` go to
        fxmpq.lower (e.g. LowerOptions(storage="packed"): <= 4-bit weights as INT4 initializers, opened with
        fxmpq.ort_session; `inputs=` the parity check's inputs)."""
        if path is None:
            if self.work_dir is None:
                raise ArgumentError("export() needs a path when quantize() ran without a work_dir")
            path = self.work_dir / MODEL_ONNX
        report = lower(self.model, path, self.example_inputs, options, **kwargs)
        self.files["onnx"] = Path(path)
        self.audit = report
        if self.work_dir is not None:
            dump_json(report.to_dict(), self.work_dir / AUDIT_JSON)
            self.files["audit"] = self.work_dir / AUDIT_JSON
        return report

    def report(self) -> str:
        """The per-layer table (bits, indicators, share of each budget metric) and the headline numbers."""
        shown = self.search
        if self.candidates is not None and self.candidates.best is not None:
            shown = as_result(self.candidates.best, self.search)
        lines = [shown.table(self.analysis, self.indicators), ""]
        w, a = self.policy.average_bits(self.analysis)
        lines.append(f"average bits of searchable layers: W{w:.2f} A{a:.2f}  (weights by params, activations by MACs)")
        for metric, total in shown.totals.items():
            limit = shown.limits.get(metric)
            lim = f" / limit {limit:.4g} ({100 * total / limit:.1f} %)" if limit else ""
            lines.append(f"{metric:>10}: {total:.4g}{lim}")
        lines.append(f"search: {self.search.status}, gap {self.search.gap:.3g}, "
                     f"{1000 * (self.search.solve_time + self.search.build_time):.1f} ms")
        lines += self._verified_lines()
        if self.fp32_accuracy is not None and self.accuracy is not None:
            lines.append(f"top-1: FP32 {100 * self.fp32_accuracy:.2f} %  ->  quantized {100 * self.accuracy:.2f} %")
        lines += self._target_lines()
        if self.files:
            lines.append("files: " + ", ".join(f"{k}={v}" for k, v in self.files.items()))
        return "\n".join(lines)

    def _verified_lines(self) -> list[str]:
        """What verification chose, next to the search's optimum when that was another candidate."""
        c = self.candidates
        if c is None or c.best is None:
            return []
        best = c.best
        acc = "-" if best.accuracy is None else f"{100 * best.accuracy:.2f} %"
        line = (f"verified {sum(x.accuracy is not None for x in c)} of {len(c)} candidate policies on {c.samples} "
                f"held-out samples (jointly trained model): chose {c.chosen} ({'; '.join(best.sources)}), estimated "
                f"top-1 {acc}")
        opt = next((x for x in c if x.policy == self.search.policy), None)
        if opt is not None and opt is not best and opt.accuracy is not None:
            line += f"; the search's optimum {100 * opt.accuracy:.2f} %"
        return [line]

    def _target_lines(self) -> list[str]:
        """An accuracy target's estimated drop (before fine-tuning) and final drop, side by side."""
        c = self.candidates
        if c is None or c.max_drop is None:
            return []
        est, final = c.estimated_drop, self.final_drop
        line = (f"target: drop <= {100 * c.max_drop:.2f} pp; estimated drop {100 * est:.2f} pp (jointly trained "
                f"model, before fine-tuning)" if est is not None else f"target: drop <= {100 * c.max_drop:.2f} pp")
        if final is not None:
            met = final <= c.max_drop + 1e-12
            line += f"; final drop {100 * final:.2f} pp: " + ("within the target" if met else "MISSES the target")
        if c.target_met is False:
            line += " (no candidate was estimated within it: the most expensive was taken)"
        return [line]


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
    val_data: Any = None,
    work_dir: str | Path | None = None,
    quant: QuantOptions | None = None,
    search: SearchOptions | None = None,
    train: TrainOptions | None = None,
    export: bool = True,
    **legacy: Any,
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
    metric of the hardware file, in its unit), joined with "&"; or an accuracy target, "drop<=1%" (top-1 at most
    one percentage point below the FP32 model's on `val_data`), alone or with cost limits ("drop<=1%&c8"): the
    Pareto front of `minimize` (a metric of the hardware, default its first) and the uniform policies are measured
    on the jointly trained model from the cheapest up, the first within the target is fine-tuned, and the report
    gives its estimated and its final drop side by side.
    What the search minimises (`SearchOptions.indicators`): with `val_data`, by default, each layer's measured
    sensitivity on the jointly trained model (the KL divergence of the outputs with that layer alone at each
    bit-width, fxmpq.measured_indicators, written to <work_dir>/measured.json), which measured best on the
    side-by-side benchmark (docs/search.md); without it, the learned step sizes (the paper's indicators).
    Verification (with `val_data`; by default only for an accuracy target, since under a cost budget the search's
    optimum measured better, docs/RESULTS.md section 6): after the search, up to `verify` (True: 16; 0 or False: off)
    distinct candidate policies within the budget (fxmpq.candidates: optima at several alphas, the ILP's
    next-best, the largest uniform and near-uniform policies) are measured on the jointly trained model, each on
    `verify_batches` batches of `val_data` (None: all), and the most accurate is fine-tuned (fxmpq.verify); they
    are written to <work_dir>/candidates.json, which a re-run with the same settings reuses. `bits` are the candidate bit-widths (default: the
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

    The options come as objects: `quant=QuantOptions(bits, act_bits, per_channel)`,
    `search=SearchOptions(alpha, verify, verify_batches, minimize)`, `train=TrainOptions(indicator_epochs,
    finetune_epochs, lr, finetune_lr, step_lr, weight_decay, distill, cosine, max_steps, clip_grad_norm, seed,
    device, progress, checkpoint_every, batch_size, indicator_data, model_factory, model_kwargs)`; each field as a
    keyword of its own (`bits=...`) still works for one release, with a DeprecationWarning.
    """
    quant, search, train = _options(quant, search, train, legacy)
    bits, act_bits, per_channel = quant.bits, quant.act_bits, quant.per_channel
    source = search.source(val_data is not None)
    alpha, verify, verify_batches, minimize = (search.alpha_for(source), search.verify, search.verify_batches,
                                               search.minimize)
    finetune_epochs, distill, device, indicator_data = (train.finetune_epochs, train.distill, train.device,
                                                        train.indicator_data)
    if isinstance(model, nn.Module):
        refuse_quantized(model, "quantize")
    hw = load_hardware(hardware)
    if bits is None:
        bits, own_act_bits = default_bits(hw)
        act_bits = own_act_bits if act_bits is None else act_bits
    bits = tuple(bits)
    goal = parse_goal(budget)
    count = _verify_count(verify, goal.max_drop is not None)
    if verify_batches is not None and (isinstance(verify_batches, bool) or not isinstance(verify_batches, int)
                                       or verify_batches < 1):
        raise ArgumentError(f"quantize: verify_batches must be None or an integer >= 1, found {verify_batches!r}")
    check_joint_passes(train.joint_passes, "quantize")
    metric = check_goal(goal, hw, minimize=minimize, has_val=val_data is not None, verify=count)
    if source != "learned" and val_data is None:
        raise ArgumentError(f"quantize: indicators={source!r} measures each layer's sensitivity on the "
                            f"jointly trained model and needs val_data; give val_data or use indicators='learned'")
    device = as_device(device, "quantize: device")
    train = dataclasses.replace(train, device=device)
    example = as_input_tuple(example_inputs)
    wd = _work_dir(work_dir)
    files: dict[str, Path] = {}

    # 1. prepare: trace + cost analysis + fake-quant insertion (TraceError here, before any long work)
    qmodel = prepare(model, example, hardware=hw, bits=bits, per_channel=per_channel, act_bits=act_bits)
    if device is not None:
        qmodel.to(device)
    budget_limits = ({} if goal.budget is None  # InfeasibleBudget before training
                     else check_feasible(qmodel.analysis, goal.budget, qmodel.all_bits))
    check_data(model, data, example, "data")
    if indicator_data is not None:
        check_data(model, indicator_data, example, "indicator_data")
    if val_data is not None:
        check_data(model, val_data, example, "val_data")
    fp32_acc = accuracy(model, val_data, device=device) if val_data is not None else None
    log.info("budget %s resolved to %s", budget, budget_limits)

    # 2. joint indicator training (skipped when the work dir holds indicators)
    ind_path = wd / INDICATORS_JSON if wd is not None else None
    resumed_joint = ind_path is not None and ind_path.is_file()
    if resumed_joint:
        indicators = _work_dir_indicators(ind_path, qmodel)
        _resume_joint_state(qmodel, wd / INDICATORS_CKPT)
        log.info("indicators read from %s; indicator training skipped", ind_path)
    else:
        ckpt = wd / INDICATORS_CKPT if wd is not None else None
        indicators = train_indicators(qmodel, data if indicator_data is None else indicator_data, train,
                                      checkpoint=ckpt, resume=bool(ckpt and ckpt.is_file()))
        if ind_path is not None:
            indicators.to_json(ind_path)
    if ind_path is not None:
        files["indicators"] = ind_path

    # 2b. measured sensitivities on the jointly trained model, searched alone or blended with the learned ones
    learned = indicators
    if source != "learned":
        metric_kind = "kl" if source == "kl" else "loss"
        measured = (_work_dir_measured(wd / MEASURED_JSON, qmodel, metric_kind)
                    if wd is not None and resumed_joint else None)
        if measured is None:
            measured = measured_indicators(qmodel, val_data, batches=MEASURE_BATCHES, device=device,
                                           metric=metric_kind, progress=train.progress)
            if wd is not None:
                measured.to_json(wd / MEASURED_JSON)
        else:
            log.info("measured sensitivities read from %s; measurement skipped", wd / MEASURED_JSON)
        if wd is not None:
            files["measured"] = wd / MEASURED_JSON
        indicators = measured if source != "blend" else blend_indicators([(learned, 2.0), (measured, 1.0)])

    # 3. ILP search; with validation data, candidate policies verified on the jointly trained model
    chosen = select_policy(qmodel, indicators, goal, VerifyOptions(count, verify_batches, metric, train.progress),
                           alpha=alpha, val_data=val_data, fp32_model=model, device=device,
                           saved=wd / CANDIDATES_JSON if wd is not None else None)
    result, policy = chosen.search, chosen.policy
    if wd is not None:
        result.to_json(wd / SEARCH_JSON)
        if chosen.candidates is not None:
            chosen.candidates.to_json(wd / CANDIDATES_JSON)
            files["candidates"] = wd / CANDIDATES_JSON
        else:  # an earlier run's candidates would describe another choice than this policy
            (wd / CANDIDATES_JSON).unlink(missing_ok=True)
        policy.to_json(wd / POLICY_JSON)
        files["policy"] = wd / POLICY_JSON
        files.update(_plots(qmodel.analysis, indicators, chosen.chosen, alpha, wd))

    # 4. apply the policy (fixes quantizers, adds output quantizers) and fine-tune with LSQ
    apply_policy(qmodel, policy, example)
    ft_ckpt = wd / FINETUNE_CKPT if wd is not None else None
    teacher = copy.deepcopy(model).eval() if distill else None
    if teacher is not None and device is not None:
        teacher.to(device)
    if finetune_epochs > 0:
        finetune(qmodel, data, train, distill_from=teacher, checkpoint=ft_ckpt,
                 resume=bool(ft_ckpt and ft_ckpt.is_file()))
    if ft_ckpt is not None and ft_ckpt.is_file():
        files["checkpoint"] = ft_ckpt
    qmodel.eval()
    q_acc = accuracy(qmodel, val_data, device=device) if val_data is not None else None

    out = QuantizedModel(model=qmodel, policy=policy, indicators=indicators, analysis=qmodel.analysis,
                         search=result, example_inputs=example, fp32_accuracy=fp32_acc, accuracy=q_acc,
                         work_dir=wd, files=files, candidates=chosen.candidates)
    if goal.max_drop is not None and out.final_drop is not None and out.final_drop > goal.max_drop + 1e-12:
        log.warning("the fine-tuned model misses the target %s: final drop %.2f pp (estimated %.2f pp before "
                    "fine-tuning)", goal, 100 * out.final_drop, 100 * (chosen.candidates.estimated_drop or 0.0))
    if wd is not None:
        summary = {"budget": str(budget), "limits": budget_limits, "totals": chosen.chosen.totals,
                   "objective": chosen.chosen.objective, "status": chosen.chosen.status, "fp32_accuracy": fp32_acc,
                   "accuracy": q_acc, "average_bits": policy.average_bits(qmodel.analysis),
                   "indicators": source, "alpha": alpha}
        if chosen.candidates is not None:
            c = chosen.candidates
            summary["verified"] = {"candidates": len(c), "chosen": c.chosen, "sources": list(c.best.sources),
                                   "estimated_accuracy": c.best.accuracy, "samples": c.samples}
            if c.max_drop is not None:
                summary["target"] = {"max_drop": c.max_drop, "metric": c.metric, "estimated_drop": c.estimated_drop,
                                     "final_drop": out.final_drop, "estimated_within": c.target_met,
                                     "final_within": None if out.final_drop is None
                                     else out.final_drop <= c.max_drop + 1e-12}
        dump_json(summary, wd / SUMMARY_JSON)
        if export:  # 5. lower and audit (parity, kernels, measured latency)
            rep = out.export(options=LowerOptions(check=False))
            if not rep.passed:
                log.warning("the exported model does not match PyTorch within tolerance (see %s)", wd / AUDIT_JSON)
    return out


def _options(quant: Any, search: Any, train: Any, legacy: dict[str, Any]
             ) -> tuple[QuantOptions, SearchOptions, TrainOptions]:
    """The three option objects, with quantize()'s old keywords (one per field) folded in under a
    DeprecationWarning (fxmpq.core.options.fold_keywords)."""
    o = fold_keywords("quantize", {"quant": (QuantOptions, quant), "search": (SearchOptions, search),
                                   "train": (TrainOptions, train)}, legacy, stacklevel=4)
    return o["quant"], o["search"], o["train"]


def _verify_count(verify: Any, target: bool) -> int:
    """quantize()'s `verify` as a number of candidates (None: the default 16 for an accuracy target, else off;
    True: 16; False or 0: off); ArgumentError otherwise."""
    if verify is None:
        return DEFAULT_COUNT if target else 0
    if verify is True:
        return DEFAULT_COUNT
    if verify is False:
        return 0
    if not isinstance(verify, int) or verify < 0:
        raise ArgumentError(f"quantize: verify must be a number of candidate policies >= 0 (0 or False: off) or "
                            f"True, found {verify!r}")
    return verify


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


def _work_dir_measured(path: Path, qmodel: QuantModel, metric: str) -> Indicators | None:
    """The measured sensitivities a previous run of the same joint training left in the work dir, when they are
    of `metric` and cover this model; None (measure again) otherwise."""
    if not path.is_file():
        return None
    try:
        measured = Indicators.from_json(path)
        measured.check_covers([m.name for m in qmodel.analysis.searchable], qmodel.bits, qmodel.act_bits)
    except IndicatorError as e:
        log.warning("%s cannot be reused (%s): measuring again", path, e)
        return None
    return measured if measured.meta.get("metric", "loss") == metric else None


def _resume_joint_state(qmodel: QuantModel, ckpt: Path) -> None:
    """Put `qmodel` where indicator training left it (weights, BatchNorm statistics, step sizes), as an
    uninterrupted run fine-tunes from it; quantizers off, as train_indicators leaves them."""
    if not ckpt.is_file():
        log.warning("%s is missing: verification measures and fine-tuning starts from the FP32 weights, not from "
                    "the joint-training state (an uninterrupted run uses the latter)", ckpt)
        return
    try:
        restore_model_state(qmodel, ckpt, Stage.INDICATORS)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; it should hold the joint-training state that fine-tuning starts from: delete "
                              f"it together with {ckpt.parent / INDICATORS_JSON} to train the indicators again") from None
    qmodel.disable_quant()
    log.info("joint-training state read from %s", ckpt)


def _plots(analysis: Analysis, indicators: Indicators, result: SearchResult, alpha: float,
           wd: Path) -> dict[str, Path]:
    """Bits per layer, indicators per layer and bit, and the BitOps Pareto curve with the chosen point."""
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
