"""Where lower() spends its time: the pass list, the ONNX translation, the PyTorch reference run, ONNX Runtime,
the verdict, the latency audit (with --measure, lower()'s default) and the rest, on a torchvision model at a seeded
random policy (or uniform W8A8).

    python tools/bench_lower.py [--model resnet18] [--size 224] [--samples 64] [--policy w8a8|random] [--runs 3]
                                [--measure]

Each stage is timed by wrapping the function lower() calls (fxmpq.export.lower's names), `--runs` times in one
process; the median of each is printed with its share of lower()'s median wall time. Threads: torch's default.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torchvision

import fxmpq
import fxmpq.export.lower as L

STAGES = ("propagate_shapes", "run_passes", "to_onnx", "run_torch", "open_session", "run_ort", "judge",
          "qlinear_counts", "latency_audit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--policy", choices=("w8a8", "random"), default="w8a8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--measure", action="store_true", help="time the export in ONNX Runtime too (lower()'s default)")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    bits = (8,) if args.policy == "w8a8" else (2, 4, 8)
    q = fxmpq.prepare(torchvision.models.get_model(args.model, weights=None).eval(), x, bits=bits)
    rng = random.Random(0)
    policy = {n: (8, 8) if args.policy == "w8a8" else (rng.choice(bits), rng.choice(bits)) for n in q.searchable_names}
    fxmpq.apply_policy(q, policy, torch.randn(4, 3, args.size, args.size))
    q.eval()
    spent: dict[str, list[float]] = defaultdict(list)

    def timed(name: str):
        real = getattr(L, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                spent[name][-1] += time.perf_counter() - t
        return wrapper

    for name in STAGES:
        if hasattr(L, name):  # (an older fxmpq may lack one)
            setattr(L, name, timed(name))
    walls = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.runs):
            for name in STAGES:
                spent[name].append(0.0)
            t = time.perf_counter()
            rep = fxmpq.lower(
                q, Path(d) / "m.onnx", x, fxmpq.LowerOptions(samples=args.samples, measure=args.measure)
            )
            walls.append(time.perf_counter() - t)
    wall = statistics.median(walls)
    print(f"{args.model} {args.size}x{args.size}, {args.policy}, {args.samples} parity samples, measure "
          f"{args.measure}, torch threads {torch.get_num_threads()}, {args.runs} runs; parity "
          f"{'PASS' if rep.passed else 'FAIL'}")
    print("| stage | median s | share |\n|---|---|---|")
    for name in STAGES:
        s = statistics.median(spent[name])
        print(f"| {name} | {s:.2f} | {s / wall:.0%} |")
    rest = wall - sum(statistics.median(spent[n]) for n in STAGES)
    print(f"| rest | {rest:.2f} | {rest / wall:.0%} |\n| **lower() wall** | **{wall:.2f}** | 100% |")


if __name__ == "__main__":
    main()
