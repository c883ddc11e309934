"""lower() with torch.onnx's own cleanup of the exported graph (onnxscript's optimize_ir, every default rewrite
rule) against fxmpq's (fxmpq.export.onnx_optimize: the same passes without SlicesSplit), alternating in one
process: whether the ONNX files are the same graph and initializers, and the median lower() time of each.

    python tools/bench_onnx_optimize.py --rounds 3 resnet18@224 efficientnet_b0@32 swin_t@32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import torch

import fxmpq
import fxmpq.export.lower as lower_module
from fxmpq.models import build_model


def _prepared(spec: str) -> tuple[fxmpq.QuantModel, torch.Tensor]:
    """MODEL@SIZE prepared and fixed at W4A4 on its searchable layers (random weights, seed 0)."""
    name, _, size = spec.partition("@")
    side = int(size or 224)
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(1, 3, side, side)
    q = fxmpq.prepare(model, x)
    fxmpq.apply_policy(q, {m.name: (4, 4) for m in q.analysis.searchable}, torch.randn(4, 3, side, side))
    return q, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="MODEL@INPUT_SIDE, e.g. swin_t@32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ours = lower_module.optimize
    variants = {"torch.onnx": lambda program: program.optimize(), "fxmpq": ours}
    print("| model | graph and initializers | torch.onnx's optimize s | fxmpq's s | ratio |\n|---|---|---:|---:|---:|")
    for spec in args.models:
        q, x = _prepared(spec)
        times: dict[str, list[float]] = {k: [] for k in variants}
        graphs = {}
        for _ in range(args.rounds):
            for label, fn in variants.items():
                lower_module.optimize = fn
                with tempfile.TemporaryDirectory() as d:
                    t = time.perf_counter()
                    fxmpq.lower(q, Path(d) / "m.onnx", x, fxmpq.LowerOptions(samples=16, batch=8, check=False))
                    times[label].append(time.perf_counter() - t)
                    m = onnx.load(Path(d) / "m.onnx")
                    graphs[label] = ([(n.op_type, tuple(n.input), tuple(n.output)) for n in m.graph.node],
                                     sorted((i.name, i.SerializeToString()) for i in m.graph.initializer))
        lower_module.optimize = ours
        a, b = (statistics.median(times[k]) for k in variants)
        same = "identical" if graphs["torch.onnx"] == graphs["fxmpq"] else "DIFFERENT"
        print(f"| {spec} | {same} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
