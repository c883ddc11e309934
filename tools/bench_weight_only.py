"""Weight-only linear layers: ONNX Runtime latency of one Linear as FP32 MatMul and as fxmpq's MatMulNBits exports.

    python tools/bench_weight_only.py [--k 768] [--n 3072] [--batch 1] [--threads 1] [--repeats 200]
                                      [--warmup 20] [--levels 4] [--seed 0] [--smoke]

One nn.Linear(K, N) (random weights, seeded), exported in float (fxmpq.export.lower.export_fp32) and, through fxmpq
(prepare on a target offering weight-only 2/4/8 bits, apply_policy at (b, None), lower with its parity check), as
MatMulNBits at 2, 4 and 8 bits for each `--levels` accuracy_level. Timed interleaved with
fxmpq.export.measure.time_sessions at `--threads` threads and `--batch` rows (medians of `--repeats` rounds, each running
every variant once; thread CPU clock at one thread). Prints a Markdown table: median ms and the ratio to FP32.
`--smoke`: K=64, N=32, 3 repeats (a quick check that the script runs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fxmpq
from fxmpq.export.lower import export_fp32
from fxmpq.export.measure import TimingOptions, session, time_sessions
from fxmpq.hardware.spec import loads_hardware

TARGET = """
[target]
name = "weight_only_bench"
weight_bits = [2, 4, 8]
act_bits = [2, 4, 8]
pairs = [[2, 8], [4, 8], [8, 8]]
weight_only_bits = [2, 4, 8]
matmul_nbits_accuracy_level = {level}
[pins]
first_layer = false
last_layer = false
[metrics.size]
terms = [{{ type = "weight_bits" }}]
"""


def weight_only_file(model: nn.Module, x: torch.Tensor, bits: int, level: int, path: Path) -> Path:
    """`model`'s one Linear exported weight-only at `bits` and MatMulNBits accuracy_level `level` (parity checked)."""
    hw = loads_hardware(TARGET.format(level=level), "weight_only_bench.toml")
    q = fxmpq.prepare(model, x, hardware=hw, bits=(2, 4, 8))
    fxmpq.apply_policy(q, {q.searchable_names[0]: (bits, None)}, x)
    q.eval()
    rep = fxmpq.lower(q, path, x[:1], fxmpq.LowerOptions(samples=8, measure=False))
    assert rep.passed, rep.table()
    return path


def main() -> None:
    """Parse the options, build the files, time them, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--levels", type=int, nargs="+", default=[4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.k, args.n, args.repeats, args.warmup = 64, 32, 3, 1
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(args.k, args.n)).eval()
    x = torch.randn(16, args.k)
    feed = {"input": np.random.default_rng(args.seed).standard_normal((args.batch, args.k)).astype(np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = {"FP32 MatMul": export_fp32(model, out / "fp32.onnx", x[:1])}
        for level in args.levels:
            for bits in (2, 4, 8):
                files[f"MatMulNBits {bits}-bit, accuracy_level {level}"] = weight_only_file(
                    model, x, bits, level, out / f"w{bits}_l{level}.onnx")
        runs = {k: (session(p, args.threads), feed) for k, p in files.items()}
        times = time_sessions(runs, TimingOptions(threads=args.threads, repeats=args.repeats, warmup=args.warmup))
    base = times["FP32 MatMul"].median_ms
    print(f"Linear({args.k}, {args.n}), batch {args.batch}, {args.threads} thread(s), median of {args.repeats} "
          f"interleaved rounds ({times['FP32 MatMul'].clock.value} clock)\n")
    print("| variant | median ms | vs FP32 |\n|---|---|---|")
    for k, t in times.items():
        print(f"| {k} | {t.median_ms:.4f} | {t.median_ms / base:.2f}x |")


if __name__ == "__main__":
    main()
