"""Every format fxmpq exports, on one conv and one linear layer: the ONNX Runtime kernel, latency and size, side by side.

    python tools/bench_formats.py [--threads 1] [--repeats 100] [--warmup 10] [--smoke]

One Conv2d(128, 128, 3x3) at 28x28 and one Linear(768, 3072) on 16 tokens (random weights, seeded), each exported
by fxmpq (prepare on fxmpq.profiling.profile.ort_target(), apply_policy at the format, lower with its parity check) in
every format it offers the layer: float, W8A8, W4A8 (8-bit containers), W4A8 packed (INT4 initializers) opened
plainly and opened with fxmpq.ort_session (widened to INT8 in memory), W8A16 (uint16 activations) and, for the
linear layer, weight-only W2/W4/W8 (MatMulNBits, accuracy level 4). All sessions are timed in interleaved rounds
(fxmpq.export.measure.time_sessions, batch 1, `--threads` intra-op threads, thread CPU clock at one thread; medians).
Prints a Markdown table: the ORT op that computes the layer (from ORT's profiler), median ms, ratio to float,
the bytes of the file's initializers (weights, bias, scales), the file's bytes, and parity. `--smoke`: small layers, 3 repeats.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import fxmpq
from fxmpq.export.audit import INTEGER_KERNELS
from fxmpq.export.deploy import deployable
from fxmpq.export.measure import TimingOptions, profile_nodes, session, time_sessions
from fxmpq.hardware.formats import format_name
from fxmpq.profiling.profile import ort_target
from fxmpq.quant.storage import initializer_bytes

LAYOUT_OPS = {"QuantizeLinear", "DequantizeLinear", "Transpose", "Reshape", "ReorderInput", "ReorderOutput",
              "Flatten", "Clip"}


def _variants(kind: str) -> list[tuple[str, tuple[int | None, int | None], str, bool]]:
    """(label, format, storage, widened) for a layer kind."""
    rows = [("float", (None, None), "int8", False), ("W8A8", (8, 8), "int8", False),
            ("W4A8 (8-bit containers)", (4, 8), "int8", False), ("W4A8 packed, opened plainly", (4, 8), "packed", False),
            ("W4A8 packed, fxmpq.ort_session", (4, 8), "packed", True), ("W8A16", (8, 16), "int8", False)]
    if kind == "linear":
        rows += [(f"W{b} weight-only", (b, None), "packed", False) for b in (8, 4, 2)]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="small layers, 3 repeats")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup = 3, 1
    torch.manual_seed(0)
    c, hw_, k, n, t = (16, 8, 64, 32, 4) if args.smoke else (128, 28, 768, 3072, 16)
    layers = {"conv": (nn.Sequential(nn.Conv2d(c, c, 3, padding=1)).eval(), torch.randn(1, c, hw_, hw_)),
              "linear": (nn.Sequential(nn.Linear(k, n)).eval(), torch.randn(1, t, k))}
    hw = ort_target()
    runs, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (model, x) in layers.items():
            calib = torch.randn(64, *x.shape[1:])
            for i, (label, fmt, storage, widened) in enumerate(_variants(kind)):
                q = fxmpq.prepare(model, calib, hardware=hw, bits=hw.weight_bits, act_bits=hw.act_bits)
                fxmpq.apply_policy(q, {q.layer_names[0]: fmt}, calib)
                q.eval()
                path = Path(tmp) / f"{kind}{i}.onnx"
                rep = fxmpq.lower(q, path, x, fxmpq.LowerOptions(samples=16, measure=False, storage=storage),
                                  inputs=calib[:16])
                model_bytes = deployable(path) if widened else path
                s = session(model_bytes, args.threads)
                feed = {s.get_inputs()[0].name: x.numpy()}
                runs[(kind, label)] = (s, feed)
                # one layer alone: the ops that are not Q/DQ or layout changes compute it
                ops = [nd.op_type for nd in profile_nodes(model_bytes, feed, args.threads, runs=3)
                       if nd.op_type not in LAYOUT_OPS]
                kernel = "+".join(dict.fromkeys(ops)) or "?"
                integer = any(o in INTEGER_KERNELS for o in ops)
                rows.append([kind, label, format_name(fmt), kernel + (" (integer)" if integer else ""),
                             (kind, label), initializer_bytes(path), path.stat().st_size,
                             "pass" if rep.passed else "FAIL"])
        times = time_sessions(runs, TimingOptions(threads=args.threads, repeats=args.repeats, warmup=args.warmup))
    base = {kind: times[(kind, "float")].median_ms for kind in layers}
    table = [[kind, label, fmt, kernel, f"{times[key].median_ms:.4f}", f"{times[key].median_ms / base[kind]:.2f}x",
              f"{wb:,}", f"{fb:,}", par] for kind, label, fmt, kernel, key, wb, fb, par in rows]
    print(f"conv: Conv2d({c}, {c}, 3x3) at {hw_}x{hw_}; linear: Linear({k}, {n}) on {t} tokens; batch 1, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved rounds\n")
    header = ["layer", "variant", "format", "ORT kernel", "ms", "vs float", "initializer bytes", "file bytes", "parity"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(map(str, row)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
