"""`fxmpq report`: what a work directory holds: the policy per layer with its indicators and costs, the budget,
the accuracy, and the export's audit.

    fxmpq report runs/q

Reads policy.json (required), indicators.json, search.json, candidates.json (the verified candidate policies),
summary.json and audit.json when they are there, and
rebuilds the model's cost analysis from the checkpoint's record (finetune.pt, else indicators.ckpt: model factory,
input shape, hardware); --model, --model-kwargs, --input and --hardware override it. Nothing is trained or exported.
Exit status 0, or 2 with one line on stderr when the directory holds no policy or a file is unreadable.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import load_checkpoint
from ..core.jsonio import read_json
from ..core.tables import render
from ..cost.analysis import Analysis
from ..cost.policy import Policy
from ..errors import ArgumentError, FxmpqError, PolicyError
from ..hardware.spec import load_hardware
from ..models import build_model, parse_model_kwargs
from ..pipeline import (
    AUDIT_JSON,
    CANDIDATES_JSON,
    FINETUNE_CKPT,
    INDICATORS_CKPT,
    INDICATORS_JSON,
    POLICY_JSON,
    SEARCH_JSON,
    SUMMARY_JSON,
)
from ..policy_search.candidates import CandidateSet, as_result
from ..policy_search.indicators import Indicators
from ..policy_search.results import SearchResult
from ..stages import analyze
from . import Parser, fail, held_warnings, parse_shape

__all__ = ["build_parser", "main"]


def _model_record(wd: Path) -> dict[str, Any]:
    """The model a run in `wd` trained, as its newest checkpoint records it (empty when there is none)."""
    for name in (FINETUNE_CKPT, INDICATORS_CKPT):
        if (wd / name).is_file():
            return load_checkpoint(wd / name)[1]
    return {}


def _analysis(args: argparse.Namespace, wd: Path) -> Analysis | None:
    """The cost analysis of the run's model (None when neither the checkpoint nor the options name the model)."""
    meta = _model_record(wd) if not (args.model and args.input) else {}
    spec = args.model or meta.get("model_factory")
    kwargs = parse_model_kwargs(args.model_kwargs) if args.model_kwargs else meta.get("model_kwargs") or {}
    shapes = meta.get("example_shapes") or []
    shape = (1, *parse_shape(args.input)) if args.input else (tuple(shapes[0]) if shapes else None)
    hardware: Any = args.hardware or meta.get("hardware") or "bitops"
    if isinstance(hardware, Mapping):  # {"name", "path"}: a user's file when it is still there, else the name
        path = hardware.get("path")
        hardware = path if path and Path(path).is_file() else hardware.get("name") or "bitops"
    if not isinstance(spec, str) or not shape:
        return None
    with torch.no_grad():
        return analyze(build_model(spec, kwargs), torch.randn(*shape), hardware=load_hardware(hardware))


def _json(path: Path, what: str) -> Any:
    return read_json(path, ArgumentError, what)[0] if path.is_file() else None


def _search(path: Path) -> SearchResult | None:
    data = _json(path, "search result")
    if data is None:
        return None
    try:
        return SearchResult.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PolicyError(f"{path}: not a search result written by fxmpq ({type(e).__name__}: {e})") from None


def _policy_table(policy: Policy, indicators: Indicators | None) -> str:
    """The policy per layer with its indicators, when the model cannot be rebuilt to price it."""
    rows = []
    for name, (w, a) in policy.items():
        iw = indicators.weight.get(name, {}).get(w) if indicators is not None else None
        ia = indicators.act.get(name, {}).get(a) if indicators is not None else None
        rows.append([name, f"W{w}A{a}", "" if iw is None else f"{iw:.4g}", "" if ia is None else f"{ia:.4g}"])
    return render(["layer", "W/A", "I_w", "I_a"], rows, left=1)


def _audit_lines(audit: Mapping[str, Any]) -> list[str]:
    steps = audit.get("max_diff_steps")
    top1 = audit.get("top1_agreement")
    lines = [f"export    {audit.get('path')}: parity {'PASS' if audit.get('passed') else 'FAIL'} on "
             f"{audit.get('samples')} inputs" + (f", max |diff| {steps:.3f} output steps" if steps is not None else "")
             + (f", top-1 agreement {100 * top1:.2f} %" if top1 is not None else "")]
    if audit.get("onnx_bytes"):
        lines.append(f"          {audit['onnx_bytes'] / 1e6:.3f} MB; integer kernels {audit.get('fused_layers')}/"
                     f"{audit.get('quantized_layers')} quantized layers")
    if audit.get("measured_latency_ms") is not None:
        pred = audit.get("predicted_latency_ms")
        lines.append(f"          latency {audit['measured_latency_ms']:.3f} ms measured"
                     + (f", {pred:.3f} ms predicted" if pred else ""))
    return lines


def report(args: argparse.Namespace) -> str:
    wd = Path(args.work_dir)
    if not wd.is_dir():
        raise ArgumentError(f"{wd}: {'not a directory' if wd.exists() else 'no such work directory'}")
    if not (wd / POLICY_JSON).is_file():
        raise ArgumentError(f"{wd} holds no {POLICY_JSON}: run fxmpq quantize ... --work-dir {wd}, or fxmpq search "
                            f"--out {wd / POLICY_JSON}")
    policy = Policy.from_json(wd / POLICY_JSON)
    indicators = Indicators.from_json(wd / INDICATORS_JSON) if (wd / INDICATORS_JSON).is_file() else None
    result = _search(wd / SEARCH_JSON)
    cands = CandidateSet.from_json(wd / CANDIDATES_JSON) if (wd / CANDIDATES_JSON).is_file() else None
    if result is not None and result.policy != policy:  # verification chose another policy than the ILP's optimum
        best = cands.best if cands is not None else None
        result = as_result(best, result) if best is not None and best.policy == policy else None
    summary = _json(wd / SUMMARY_JSON, "summary") or {}
    audit = _json(wd / AUDIT_JSON, "audit")
    analysis = _analysis(args, wd)
    lines = [f"work dir  {wd}"]
    if analysis is None:
        lines += ["(the model is not recorded in a checkpoint here: give --model and --input to price the policy)",
                  _policy_table(policy, indicators)]
    elif result is not None:
        lines.append(result.table(analysis, indicators))
    else:
        lines.append(analysis.table(policy))
    if analysis is not None:
        w, a = policy.average_bits(analysis)
        lines.append(f"average   W{w:.2f} A{a:.2f} over searchable layers (weights by params, activations by MACs)")
    if summary.get("budget") is not None:
        lines.append(f"budget    {summary['budget']}")
    if cands is not None:
        lines += ["candidates (verified on the jointly trained model before fine-tuning):", cands.table()]
    if summary.get("accuracy") is not None:
        fp32 = summary.get("fp32_accuracy")
        lines.append("top-1     " + (f"FP32 {100 * fp32:.2f} % -> " if fp32 is not None else "")
                     + f"quantized {100 * summary['accuracy']:.2f} %")
    target = summary.get("target")
    if isinstance(target, Mapping) and target.get("final_drop") is not None:
        met = "within the target" if target.get("final_within") else "MISSES the target"
        lines.append(f"target    drop <= {100 * target['max_drop']:.2f} pp: final drop {100 * target['final_drop']:.2f} "
                     f"pp, {met}")
    if isinstance(audit, Mapping):
        lines += _audit_lines(audit)
    lines.append("files     " + ", ".join(sorted(p.name for p in wd.iterdir() if not p.name.startswith("."))))
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    doc = __doc__.splitlines()
    ap = Parser(prog=prog, description=" ".join(doc[:2]).split(": ", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(doc[5:]))
    ap.add_argument("work_dir", help="a work directory (fxmpq quantize --work-dir, or the --out of the stages)")
    ap.add_argument("--model", help="the model (overrides the checkpoint's record)")
    ap.add_argument("--model-kwargs", help="JSON keyword arguments for the model (overrides the checkpoint's)")
    ap.add_argument("--input", help="per-sample input shape such as 1x16x16 (overrides the checkpoint's)")
    ap.add_argument("--hardware", help="hardware to price the policy on (default: the checkpoint's, else bitops)")
    return ap


@held_warnings
def main(argv: Sequence[str] | None = None, *, prog: str = "fxmpq report", label: str | None = "fxmpq report") -> int:
    """Run the subcommand; exit status 0, or 2 with one line on stderr."""
    args = build_parser(prog).parse_args(argv)
    try:
        print(report(args))
    except FxmpqError as e:
        return fail(e, 2, prog=label)
    return 0
