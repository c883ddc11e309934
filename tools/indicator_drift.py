"""How far joint training moved the step sizes of a side-by-side benchmark run: its indicators (and the sandwich
rule's, where present) against the same training stopped after its first step, median relative change per kind.

    python tools/indicator_drift.py --out runs/bench_peers [--nets small_vit,resnet20,mobilenet_v2_small] [--smoke]

Reads <out>/<net>/fp32.pt, indicators.json and indicators_sandwich.json (tools/bench_peers.py writes them); runs
one joint step per net with the benchmark's settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from bench_peers import BITS, NETS, hardware_file, kwargs_for, load_data

import fxmpq
from fxmpq.core.options import TrainOptions
from fxmpq.models import build_model


def _values(ind: fxmpq.Indicators, kind: str, layers: tuple[str, ...], bits: tuple[int, ...]) -> np.ndarray:
    return np.array([getattr(ind, kind)[n][b] for n in layers for b in bits])


def _median_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.median(np.abs(b - a) / np.abs(a)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_peers"))
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--data", help="Fashion-MNIST folder (default: Debian's)")
    ap.add_argument("--smoke", action="store_true", help="a `bench_peers.py --smoke` run's folder (digits)")
    args = ap.parse_args()
    data, _ = load_data(args.smoke, args.data)
    hw = hardware_file(args.out)
    recipe = args.out / "recipe.json"
    steps = json.loads(recipe.read_text())["recipe"]["indicator_steps"] if recipe.is_file() else "?"
    print(f"| net | weight steps: {steps} vs 1 joint step | activation steps: {steps} vs 1 | weight steps: sandwich vs "
          "full | activation steps: sandwich vs full |")
    print("|---|---:|---:|---:|---:|")
    for net in [n.strip() for n in args.nets.split(",") if n.strip()]:
        folder = args.out / net
        model = build_model(net, kwargs_for(net, data))
        model.load_state_dict(torch.load(folder / "fp32.pt", weights_only=True))
        q = fxmpq.prepare(model.eval(), data.train_x[:2], hardware=hw, bits=BITS)
        first = fxmpq.train_indicators(q, data.loader("train", 64, seed=1),
                                       TrainOptions(indicator_epochs=1, lr=0.01, seed=0, max_steps=1, progress=False))
        full = fxmpq.Indicators.from_json(folder / "indicators.json")
        sw_path = folder / "indicators_sandwich.json"
        sw = fxmpq.Indicators.from_json(sw_path) if sw_path.is_file() else None
        cells = []
        for kind in ("weight", "act"):
            cells.append(_median_change(_values(first, kind, full.layers, full.bits),
                                        _values(full, kind, full.layers, full.bits)))
        for kind in ("weight", "act"):
            cells.append(float("nan") if sw is None else _median_change(
                _values(full, kind, full.layers, full.bits), _values(sw, kind, full.layers, full.bits)))
        print(f"| {net} | " + " | ".join(f"{100 * c:.2f} %" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
