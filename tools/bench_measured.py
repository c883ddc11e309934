"""Measured costs end to end: profile models in ONNX Runtime twice, search under latency budgets, measure the result.

    python tools/bench_measured.py [--models resnet18,mobilenet_v2] [--input 3x224x224] [--budgets 5]
        [--repeats 20] [--threads 1] [--seed 0] [--out runs/bench_measured] [--smoke]

Per model: tools/profile_hw.py's measurement (fxmpq.profiling.profile.profile_model) runs twice, and the per-layer relative
spread between the two files is reported (|a - b| / mean, per layer and format). With the first file as the
hardware, `--budgets` latency budgets are spread evenly between the all-W8A8 and the all-float predictions
(exclusive); for each, a policy is searched (fxmpq.policy_search.baselines.random_indicators, seed `--seed`: random
per-layer sensitivities, so the policy is a random one that uses the budget), applied, lowered to ONNX (parity
checked) and timed; every exported model is then timed again in interleaved rounds (the table's `measured`).
Writes results.json and results.md in --out and prints the tables. `--smoke` is a seconds-long run on a tiny
model for the tests (its numbers mean nothing). Exit 0 when everything ran (whatever the numbers), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import fxmpq
from fxmpq import models
from fxmpq.cli import parse_shape
from fxmpq.core.atomic import atomic_write_text
from fxmpq.core.tables import render
from fxmpq.errors import FxmpqError
from fxmpq.export.measure import TimingOptions, session, time_sessions
from fxmpq.hardware.spec import FLOAT, load_hardware
from fxmpq.policy_search.baselines import random_indicators
from fxmpq.profiling.profile import INT8, HardwareProfile, profile_model


def spread(a: HardwareProfile, b: HardwareProfile) -> dict[str, float]:
    """Relative differences between two profiles of one model: per-layer values (median and max), endpoints."""
    rel = []
    for la, lb in zip(a.layers, b.layers):
        for f in la.measured_ms:
            x, y = la.measured_ms[f], lb.measured_ms[f]
            rel.append(abs(x - y) / ((x + y) / 2) if x + y > 0 else 0.0)
    rel.sort()
    return {"layers_median": statistics.median(rel), "layers_p90": rel[int(0.9 * (len(rel) - 1))],
            "layers_max": rel[-1],
            "float_model": abs(a.float_model_ms - b.float_model_ms) / ((a.float_model_ms + b.float_model_ms) / 2),
            "int8_model": abs(a.int8_model_ms - b.int8_model_ms) / ((a.int8_model_ms + b.int8_model_ms) / 2)}


def bench_model(name: str, shape: tuple[int, ...], args: argparse.Namespace, out: Path) -> dict:
    model = models.build_model(name).eval()
    stem = re.sub(r"[^\w.-]", "_", name)  # a file name ("models:PlainCNN" -> "models_PlainCNN")
    torch.manual_seed(0)
    x = torch.randn(1, *shape)
    profiles, files = [], []
    for run in (1, 2):
        t0 = time.time()
        prof = profile_model(model, x, model_name=name, threads=args.threads, repeats=args.repeats,
                             progress=not args.quiet, command=f"tools/bench_measured.py (profile {run} of {name})")
        path = out / f"{stem}_profile{run}.toml"
        atomic_write_text(path, prof.to_toml())
        profiles.append(prof)
        files.append(path)
        print(f"{name}: profile {run} in {time.time() - t0:.0f} s -> {path}", flush=True)
    sp = spread(*profiles)
    hw = load_hardware(files[0])
    analysis = fxmpq.analyze(model, x, hardware=hw)
    names = analysis.names
    lat_int8 = analysis.cost({n: INT8 for n in names})["latency"]
    lat_float = analysis.cost({n: FLOAT for n in names})["latency"]
    # every format the file prices (W2/W4/W8 x A8, W8A16, float, weight-only): random sensitivities per bit
    bits = tuple(sorted(set(hw.weight_bits) | set(hw.act_bits)))
    ind = random_indicators(tuple(m.name for m in analysis.searchable), bits, seed=args.seed)
    budgets = [lat_int8 + (lat_float - lat_int8) * k / (args.budgets + 1) for k in range(1, args.budgets + 1)]
    rows, sessions = [], {}
    for k, budget in enumerate(budgets):
        res = fxmpq.search(analysis, ind, f"latency<={budget!r}")
        q = fxmpq.prepare(model, x, hardware=hw, bits=hw.weight_bits, act_bits=hw.act_bits)
        fxmpq.apply_policy(q, res.policy, x)
        q.eval()
        path = out / f"{stem}_budget{k}.onnx"
        rep = fxmpq.lower(q, path, x, fxmpq.LowerOptions(samples=args.samples, check=False,
                                                            repeats=args.repeats, threads=args.threads))
        floats = sum(1 for n in names if res.policy[n] == FLOAT)
        formats = res.policy.format_counts()
        rows.append({"formats": formats, "budget": budget, "predicted": rep.predicted_latency_ms, "lower_measured": rep.measured_latency_ms,
                     "lower_wall": rep.measured_wall_ms, "parity": rep.passed,
                     "stagewise_faithful": rep.stagewise_faithful, "max_diff_steps": rep.max_diff_steps,
                     "top1_agreement": rep.top1_agreement, "float_layers": floats, "layers": len(names),
                     "mismatches": list(rep.format_mismatches), "onnx": str(path)})
        s = session(path, args.threads)
        sessions[k] = (s, {s.get_inputs()[0].name: x.numpy()})
        print(f"{name}: budget {budget:.3f} ms -> predicted {rep.predicted_latency_ms:.3f} ms, formats {formats}, "
              f"lower() measured {rep.measured_latency_ms:.3f} ms", flush=True)
    times = time_sessions(sessions, TimingOptions(threads=args.threads, repeats=args.repeats))
    for k, r in enumerate(rows):
        r["measured"] = times[k].median_ms
        r["measured_wall"] = times[k].wall_median_ms
    return {"model": name, "input": list(shape), "threads": args.threads, "repeats": args.repeats,
            "clock": profiles[0].clock, "profiles": [str(f) for f in files], "spread": sp,
            "endpoints": [{"float_measured": p.float_model_ms, "int8_measured": p.int8_model_ms,
                           "remainder": p.remainder_ms, "int8_alone": p.int8_predicted_ms, "int8_scale": p.int8_scale}
                          for p in profiles],
            "predicted_int8": lat_int8, "predicted_float": lat_float, "indicators": f"random_indicators seed {args.seed}",
            "rows": rows}


def render_results(results: list[dict]) -> str:
    lines = []
    for res in results:
        sp = res["spread"]
        e1, e2 = res["endpoints"]
        lines += [f"### {res['model']} ({'x'.join(map(str, res['input']))}, batch 1, {res['threads']} thread(s), "
                  f"{res['clock']} clock, medians of {res['repeats']})", "",
                  f"Profiled twice: per-layer values differ by {100 * sp['layers_median']:.1f} % (median over layers "
                  f"and formats), {100 * sp['layers_p90']:.1f} % (p90), {100 * sp['layers_max']:.1f} % (max); whole "
                  f"model all float {e1['float_measured']:.3f} / {e2['float_measured']:.3f} ms, all W8A8 "
                  f"{e1['int8_measured']:.3f} / {e2['int8_measured']:.3f} ms "
                  f"({100 * sp['float_model']:.1f} % and {100 * sp['int8_model']:.1f} % apart). Rest of the model "
                  f"{e1['remainder']:.3f} ms; all W8A8 from the layers alone and their chains {e1['int8_alone']:.3f} "
                  f"ms, so W8A8 scale {e1['int8_scale']:.3f} (profile 1). Indicators: {res['indicators']}.",
                  ""]
        header = ["budget ms", "predicted ms", "measured ms", "measured/predicted", "measured/budget", "float layers",
                  "parity"]
        rows = []
        for r in res["rows"]:
            parity = "pass" if r["parity"] else ("fail (stage by stage faithful)" if r["stagewise_faithful"]
                                                 else "FAIL")
            if r["mismatches"]:
                parity += f"; {len(r['mismatches'])} layer(s) not run as priced"
            rows.append([f"{r['budget']:.3f}", f"{r['predicted']:.3f}", f"{r['measured']:.3f}",
                         f"{r['measured'] / r['predicted']:.3f}", f"{r['measured'] / r['budget']:.3f}",
                         f"{r['float_layers']}/{r['layers']}", parity])
        table = render(header, rows, left=0).splitlines()
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", "```", *table, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated model names (default resnet18,mobilenet_v2)")
    ap.add_argument("--input", help="per-sample input shape (default 3x224x224)")
    ap.add_argument("--budgets", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=32, help="random inputs for each export's parity check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_measured"))
    ap.add_argument("--smoke", action="store_true", help="3 repeats, 4 parity inputs, and by default a tiny model "
                    "(small_resnet at 1x16x16): for the tests")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    if args.smoke:
        args.repeats, args.samples = 3, 4
        if args.models is None:
            args.models, args.input = "small_resnet", args.input or "1x16x16"
    args.models = args.models or "resnet18,mobilenet_v2"
    args.input = args.input or "3x224x224"
    shape = parse_shape(args.input)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in args.models.split(","):
            results.append(bench_model(name.strip(), shape, args, args.out))
    except FxmpqError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    text = render_results(results)
    atomic_write_text(args.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
