"""Packed weight storage: file size and ONNX Runtime latency of int8 vs packed (INT4) exports, three ways of opening.

    python tools/bench_storage.py [--models resnet18 mobilenet_v2] [--wbits 4] [--size 224] [--threads 1]
                                  [--repeats 50] [--warmup 5] [--seed 0] [--out DIR] [--smoke]

For each torchvision model (random weights, seeded): every searchable layer at W`--wbits`A8 (the pinned first and
last layers stay W8A8), calibrated on 8 random inputs, lowered twice with fxmpq.lower (parity checked on each file):
storage="int8" and storage="packed" (weights of at most 4 bits as INT4 initializers). Timed interleaved with
fxmpq.export.measure.time_sessions at `--threads` threads, batch 1 (medians of `--repeats` rounds, each running every
variant once, thread CPU clock at one thread): (a) the int8 file, (b) the packed file opened plainly
(fxmpq.export.measure.session: ONNX Runtime runs its INT4-weight layers as float convolutions), (c) the packed file opened
with fxmpq.ort_session (4-bit weights widened to INT8 in memory, fused into QLinearConv). Prints a Markdown table:
file size, weight initializer bytes, the policy's packed bytes, median latency, its ratio to (a), QLinearConv count.
`--smoke`: resnet18 at 32x32, 2 repeats, no warm-up (a quick check that the script runs).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import fxmpq
from fxmpq.export.deploy import deployable
from fxmpq.export.lower import qlinear_counts
from fxmpq.export.measure import TimingOptions, session, time_sessions

BITS = (2, 3, 4, 5, 6, 7, 8)
VARIANTS = ("int8 file", "packed, plain session", "packed, fxmpq.ort_session")


def build(name: str, out: Path, size: int, wbits: int, seed: int) -> dict[str, fxmpq.LowerReport]:
    """The int8 and the packed export of torchvision model `name` at W`wbits`A8 and their reports."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    ex = torch.randn(1, 3, size, size)
    data = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    q = fxmpq.prepare(model, ex, bits=BITS)
    fxmpq.apply_policy(q, {n: (wbits, 8) for n in q.searchable_names}, data)
    return {s: fxmpq.lower(q, out / f"{name}_{s}.onnx", ex,
                           fxmpq.LowerOptions(samples=8, batch=8, measure=False, storage=s))
            for s in ("int8", "packed")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--wbits", type=int, default=4, choices=BITS, help="weight bits of every searchable layer")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the ONNX files here (default: a temp directory)")
    ap.add_argument("--smoke", action="store_true", help="resnet18 at 32x32, 2 repeats (checks the script runs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.size, args.repeats, args.warmup = ["resnet18"], 32, 2, 0
    timing = TimingOptions(threads=args.threads, repeats=args.repeats, warmup=args.warmup)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        x = np.random.default_rng(args.seed).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
        for name in args.models:
            reps = build(name, out, args.size, args.wbits, args.seed)
            for s, r in reps.items():
                print(f"{name} {s}: parity {'PASS' if r.passed else 'FAIL'} (max |diff| {r.max_diff_steps:.2f} "
                      f"output steps on {r.samples} inputs), containers {dict(Counter(r.weight_containers.values()))}", flush=True)
            packed = reps["packed"].path
            sessions = {VARIANTS[0]: session(reps["int8"].path, args.threads),
                        VARIANTS[1]: session(packed, args.threads),
                        VARIANTS[2]: fxmpq.ort_session(packed, args.threads)}
            runs = {v: (s, {s.get_inputs()[0].name: x}) for v, s in sessions.items()}
            times = time_sessions(runs, timing)
            kernels = {VARIANTS[0]: qlinear_counts(reps["int8"].path), VARIANTS[1]: qlinear_counts(packed),
                       VARIANTS[2]: qlinear_counts(deployable(packed))}
            base = times[VARIANTS[0]].median_ms
            for v in VARIANTS:
                r = reps["int8" if v == VARIANTS[0] else "packed"]
                rows.append((name, v, r.onnx_bytes, r.stored_weight_bytes, r.packed_weight_bytes,
                             times[v].median_ms, times[v].median_ms / base, kernels[v]["QLinearConv"],
                             r.quantized_layers))
    clock = timing.resolved_clock.value
    print(f"\nONNX Runtime {ort.__version__}, CPU EP, {args.threads} thread(s), batch 1, {args.size}x{args.size}, "
          f"W{args.wbits}A8 searchable layers (first/last W8A8), median of {args.repeats} interleaved runs after "
          f"{args.warmup} warm-up runs ({clock} clock)\n")
    print("| model | variant | file MB | weight initializers MB | policy packed MB | median ms | / int8 file | "
          "QLinearConv |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, v, size, stored, ideal, ms, ratio, qconv, layers in rows:
        print(f"| {name} | {v} | {size / 1e6:.2f} | {stored / 1e6:.2f} | {ideal / 1e6:.2f} | {ms:.2f} | "
              f"{ratio:.2f} | {qconv}/{layers} |")


if __name__ == "__main__":
    main()
