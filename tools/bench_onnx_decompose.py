"""lower() with torch.onnx's decomposition re-trace against fxmpq's (fxmpq.export.onnx_decompose: the few ops a
lowered graph has that ONNX translation lacks rewritten, the re-trace skipped when nothing else needs it),
alternating in one process: whether each export passes its parity check, whether the re-trace was skipped (or
which ops needed it), whether the ONNX files have the same ops, and the median lower() time of each.

    python tools/bench_onnx_decompose.py --rounds 3 resnet18@224 mobilenet_v3_small@32 efficientnet_b0@32

Each model at a seeded random policy of float, W8A8 and W4A8 layers on `ort_cpu` (so float layers keep their
in-place activations), random weights; lower() with its parity check, 16 samples, no latency audit.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import torch

import fxmpq
import fxmpq.export.lower as lower_module
from fxmpq.export.onnx_decompose import last_left
from fxmpq.models import build_model


def _prepared(spec: str) -> tuple[fxmpq.QuantModel, torch.Tensor]:
    """MODEL@SIZE prepared on ort_cpu and fixed at a random float/W8A8/W4A8 policy (random weights, seed 0)."""
    name, _, size = spec.partition("@")
    side = int(size or 224)
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(1, 3, side, side)
    q = fxmpq.prepare(model, x, bits=(4, 8), act_bits=(8,), hardware="ort_cpu")
    rng = random.Random(0)
    policy = {m.name: rng.choice([(4, 8), (8, 8), (None, None)]) for m in q.analysis.searchable}
    fxmpq.apply_policy(q, policy, torch.randn(4, 3, side, side))
    return q, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="MODEL@INPUT_SIDE, e.g. mobilenet_v3_small@32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ours = lower_module.skip_needless_decomposition
    variants = {"torch.onnx": contextlib.nullcontext, "fxmpq": ours}
    print("| model | parity (torch.onnx / fxmpq) | re-trace | same ops | torch.onnx's s | fxmpq's s | ratio |\n"
          "|---|---|---|---|---:|---:|---:|")
    try:
        for spec in args.models:
            q, x = _prepared(spec)
            times: dict[str, list[float]] = {k: [] for k in variants}
            ops, passed, left = {}, {}, None
            for r in range(args.rounds + 1):  # the first round warms up both (not timed)
                for label, ctx in variants.items():
                    lower_module.skip_needless_decomposition = ctx
                    with tempfile.TemporaryDirectory() as d:
                        t = time.perf_counter()
                        r = fxmpq.lower(q, Path(d) / "m.onnx", x,
                                        fxmpq.LowerOptions(samples=16, batch=8, check=False, measure=False))
                        if r:
                            times[label].append(time.perf_counter() - t)
                        ops[label] = Counter(n.op_type for n in onnx.load(Path(d) / "m.onnx").graph.node)
                        passed[label] = r.passed
                    if label == "fxmpq":
                        left = last_left()
            a, b = (statistics.median(times[k]) for k in variants)
            same = "yes" if ops["torch.onnx"] == ops["fxmpq"] else \
                f"no: {dict(ops['torch.onnx'] - ops['fxmpq'])} / {dict(ops['fxmpq'] - ops['torch.onnx'])}"
            trace = "skipped" if left == [] else f"run for {', '.join(left or ['?'])}"
            print(f"| {spec} | {'pass' if passed['torch.onnx'] else 'FAIL'} / {'pass' if passed['fxmpq'] else 'FAIL'} "
                  f"| {trace} | {same} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)
    finally:
        lower_module.skip_needless_decomposition = ours


if __name__ == "__main__":
    main()
