"""Uniform W8A8: fxmpq's QDQ export against ONNX Runtime's own quantize_static, timed side by side in ONNX Runtime.

    python tools/bench_int8.py [--models resnet18 mobilenet_v2] [--size 224] [--batch 1] [--threads 1]
                               [--repeats 100] [--warmup 5] [--calib 8] [--profile] [--out DIR]
                               [--also LABEL=PATH_WITH_{model} ...]

For each torchvision model (random weights, seeded): the FP32 ONNX model (fxmpq.export.lower.export_fp32); ONNX Runtime's
quantize_static on it (after quant_pre_process, the pre-processing ONNX Runtime recommends: QDQ format, per-channel
QInt8 weights, QUInt8 activations, MinMax calibration on `--calib` random inputs through a CalibrationDataReader);
and fxmpq at W8A8 everywhere (prepare with bits (8,), apply_policy on the same random inputs, fxmpq.lower, whose
parity check must pass). The sessions (CPU EP, `--threads` intra-op threads, all graph optimizations) are timed
interleaved: after `--warmup` runs each, every repeat runs each variant once, in an order shuffled per repeat, so
load on a shared machine hits all of them alike. Printed as a Markdown table: medians and 10th percentiles (steadier
on a loaded machine, where a run that shares its core with another process takes about twice as long), their
ratios to ORT's quantize_static, file sizes, and the integer kernels and float ops of each optimized graph.
`--profile` adds ONNX Runtime's profile (the variants profiled interleaved the same way): the median per-run
time of each op type of each variant. `--also before=old/{model}_fxmpq.onnx` times more ONNX files of the same
model in the same rounds (e.g. an export made by an earlier version, kept with `--out`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from onnxruntime import quantization as ortq
from onnxruntime.quantization.shape_inference import quant_pre_process

from fxmpq.core.options import LowerOptions
from fxmpq.export.lower import export_fp32, lower, qlinear_counts
from fxmpq.stages import apply_policy, prepare

VARIANTS = ("fp32", "ort", "fxmpq")
INTEGER_OPS = ("QLinearConv", "QLinearAdd", "QGemm", "QLinearMatMul", "NhwcMaxPool", "QLinearGlobalAveragePool")


class _Inputs(ortq.CalibrationDataReader):
    """The calibration inputs, one at a time, for quantize_static."""

    def __init__(self, name: str, batches: np.ndarray) -> None:
        self._it = iter([{name: b[None]} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def build(name: str, out: Path, size: int, calib: int, seed: int) -> tuple[dict[str, Path], str]:
    """The three ONNX files of model `name` and fxmpq's parity line."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    ex = torch.randn(1, 3, size, size)
    data = torch.randn(calib, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    paths = {v: out / f"{name}_{v}.onnx" for v in VARIANTS}
    export_fp32(model, paths["fp32"], ex)
    pre = out / f"{name}_fp32_pre.onnx"
    quant_pre_process(str(paths["fp32"]), str(pre))
    input_name = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    ortq.quantize_static(str(pre), str(paths["ort"]), _Inputs(input_name, data.numpy()),
                         quant_format=ortq.QuantFormat.QDQ, per_channel=True, weight_type=ortq.QuantType.QInt8,
                         activation_type=ortq.QuantType.QUInt8, calibrate_method=ortq.CalibrationMethod.MinMax)
    q = prepare(model, ex, bits=(8,))
    apply_policy(q, {n: (8, 8) for n in q.searchable_names}, data)
    rep = lower(q, paths["fxmpq"], ex, LowerOptions(samples=16, batch=16))
    line = (f"{name}: fxmpq W8A8 parity {'PASS' if rep.passed else 'FAIL'} (max |diff| {rep.max_diff_steps:.2f} "
            f"output steps, top-1 agreement {100 * rep.top1_agreement:.1f} % on {rep.samples} inputs), "
            f"{rep.fused_layers}/{rep.quantized_layers} layers as integer kernels")
    return paths, line


def session(path: Path, threads: int, profile: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: dict[str, ort.InferenceSession], x: np.ndarray, warmup: int, repeats: int,
                     seed: int = 0) -> dict[str, list[float]]:
    """Seconds per run of every session: warm-up, then `repeats` rounds that run each session once, in an order
    shuffled every round (a fixed order can fall into step with another process's time slices)."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    return times


def op_profiles(paths: dict[str, Path], x: np.ndarray, threads: int, runs: int, prefix: str
                ) -> dict[str, dict[str, float]]:
    """Per variant, the median per-run milliseconds of each op type in ONNX Runtime's profile: the profiling
    sessions run interleaved like the timing (3 warm-up runs each, then `runs` shuffled rounds)."""
    sessions = {v: session(p, threads, profile=f"{prefix}_{v}") for v, p in paths.items()}
    time_interleaved(sessions, x, 3, runs)
    result = {}
    for v, s in sessions.items():
        events = json.loads(Path(s.end_profiling()).read_text())
        windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[3:]
        per_run: list[Counter[str]] = [Counter() for _ in windows]
        starts = [w[0] for w in windows]
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
            if 0 <= i < len(windows) and e["ts"] <= windows[i][1]:
                per_run[i][e["args"]["op_name"]] += e["dur"]
        ops = sorted({k for c in per_run for k in c})
        result[v] = {op: statistics.median(c[op] for c in per_run) / 1e3 for op in ops}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calib", type=int, default=8, help="random calibration inputs (both quantizers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also print ORT's per-op-type profile of each variant")
    ap.add_argument("--out", type=Path, default=None, help="keep the ONNX files here (default: a temp directory)")
    ap.add_argument("--also", nargs="*", default=[], metavar="LABEL=PATH",
                    help="more ONNX files to time alongside; {model} in PATH is replaced by the model name")
    args = ap.parse_args(argv)
    also = dict(a.split("=", 1) for a in args.also)
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        x = np.random.default_rng(args.seed).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
        for name in args.models:
            paths, line = build(name, out, args.size, args.calib, args.seed)
            print(line, flush=True)
            paths.update({label: Path(p.format(model=name)) for label, p in also.items()})
            times = time_interleaved({v: session(p, args.threads) for v, p in paths.items()}, x, args.warmup,
                                     args.repeats)
            med = {v: statistics.median(t) for v, t in times.items()}
            p10 = {v: float(np.percentile(t, 10)) for v, t in times.items()}
            for v in paths:
                counts = qlinear_counts(paths[v])
                kernels = ", ".join(f"{op} {counts[op]}" for op in INTEGER_OPS if counts.get(op))
                floats = ", ".join(f"{op} {n}" for op, n in sorted(counts.items())
                                   if op in ("Conv", "FusedConv", "Add", "MaxPool", "Gemm") and n)
                rows.append((name, v, med[v], med[v] / med["ort"], p10[v], p10[v] / p10["ort"],
                             paths[v].stat().st_size, kernels or "-", floats or "-"))
            print(f"  {name}: fxmpq / ORT {med['fxmpq'] / med['ort']:.3f} (medians; fp32 {1e3 * med['fp32']:.2f} ms, ORT "
                  f"{1e3 * med['ort']:.2f} ms, fxmpq {1e3 * med['fxmpq']:.2f} ms)", flush=True)
            if args.profile:
                profiles[name] = op_profiles({v: p for v, p in paths.items() if v != "fp32"}, x, args.threads,
                                             args.repeats, str(out / f"prof_{name}"))
    print(f"\nONNX Runtime {ort.__version__}, CPU EP, {args.threads} thread(s), batch {args.batch}, "
          f"{args.size}x{args.size}, median of {args.repeats} interleaved runs after {args.warmup} warm-up runs\n")
    print("| model | variant | median ms | / ORT | p10 ms | / ORT | file MB | integer kernels | float ops |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for name, v, t, ratio, t10, ratio10, size, kernels, floats in rows:
        print(f"| {name} | {v} | {1e3 * t:.2f} | {ratio:.3f} | {1e3 * t10:.2f} | {ratio10:.3f} | {size / 1e6:.1f} | "
              f"{kernels} | {floats} |")
    for name, prof in profiles.items():
        ops = sorted({op for p in prof.values() for op in p}, key=lambda o: -sum(p.get(o, 0.0) for p in prof.values()))
        print(f"\n{name}: ONNX Runtime profile, median ms per run of each op type ({args.repeats} runs each)\n")
        print("| op type | " + " | ".join(prof) + " |")
        print("|---|" + "---:|" * len(prof))
        for op in ops:
            print(f"| {op} | " + " | ".join(f"{p.get(op, 0.0):.3f}" for p in prof.values()) + " |")
        print("| sum | " + " | ".join(f"{sum(p.values()):.3f}" for p in prof.values()) + " |")

if __name__ == "__main__":
    main()
