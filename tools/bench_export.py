"""ONNX Runtime latency of fxmpq's QDQ exports of resnet18 and mobilenet_v2 against their FP32 ONNX models.

    python tools/bench_export.py [--models resnet18 mobilenet_v2] [--batches 1 16] [--size 224] [--threads 2]

Random weights and a seeded random mixed policy (bits 2..8); each (model, batch, variant) is timed in its own
block in the same run (warm-up, then `--repeats` timed runs; median reported). Prints a Markdown table of
medians and the ratio int8/fp32.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from fxmpq.core.options import LowerOptions
from fxmpq.export.lower import export_fp32, lower, qlinear_counts
from fxmpq.stages import apply_policy, prepare

BITS = (2, 3, 4, 5, 6, 7, 8)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time(sess: ort.InferenceSession, x: np.ndarray, warmup: int, repeats: int) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            model = getattr(torchvision.models, name)(num_classes=1000).eval()
            ex = torch.randn(1, 3, args.size, args.size)
            fp = export_fp32(model, Path(d) / f"{name}_fp32.onnx", ex)
            q = prepare(model, ex, bits=BITS, per_channel=args.per_channel)
            rng = random.Random(args.seed)
            policy = {n: (rng.randint(2, 8), rng.randint(2, 8)) for n in q.searchable_names}
            apply_policy(q, policy, torch.randn(8, 3, args.size, args.size))
            rep = lower(q, Path(d) / f"{name}_qdq.onnx", ex, LowerOptions(samples=8, batch=8))
            counts = qlinear_counts(rep.path)
            print(f"{name}: {rep.fused_layers}/{rep.quantized_layers} layers as integer kernels, parity "
                  f"{'PASS' if rep.passed else 'FAIL'}, QDQ {rep.onnx_bytes / 1e6:.1f} MB vs FP32 "
                  f"{fp.stat().st_size / 1e6:.1f} MB; optimized graph: "
                  f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}", flush=True)
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
                t_fp = _time(_session(fp, args.threads), x, args.warmup, args.repeats)
                t_q = _time(_session(rep.path, args.threads), x, args.warmup, args.repeats)
                rows.append((name, batch, t_fp, t_q))
                print(f"  batch {batch}: fp32 {1e3 * t_fp:.2f} ms, qdq {1e3 * t_q:.2f} ms, ratio {t_q / t_fp:.2f}",
                      flush=True)
    print(f"\nORT {ort.__version__}, CPU EP, {args.threads} threads, input {args.size}x{args.size}, median of "
          f"{args.repeats} runs\n")
    print("| model | batch | FP32 ms | QDQ ms | QDQ / FP32 |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, t_fp, t_q in rows:
        print(f"| {name} | {batch} | {1e3 * t_fp:.2f} | {1e3 * t_q:.2f} | {t_q / t_fp:.2f}x |")


if __name__ == "__main__":
    main()
