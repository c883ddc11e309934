"""Search the optimal bit-width policy: indicators JSON + model + hardware + budget -> policy JSON and a table.

    .venv/bin/python tools/search.py --indicators tests/data/limpq_resnet50_indicators.json \
        --model resnet50 --input 3x224x224 --hardware bitops --budget "w3a4&c12.2" --out policy.json --plot bits.png

`--model` is a torchvision model name, a fxmpq.models name or `package.module:factory` (called with --model-kwargs).
Budget strings: terms joined by `&`: `w3a4` (BitOps of uniform W3A4), `c12.2` (size <= FP32/12.2),
`metric<=NUMBER[k|M|G|T]` or `size<=4MB`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fxmpq
from fxmpq.cli import check_output, fail, parse_shape
from fxmpq.models import build_model, parse_model_kwargs
from fxmpq.report import plot_bits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fxmpq bit-width search (ILP, HiGHS)")
    ap.add_argument("--indicators", required=True, help="indicators JSON file")
    ap.add_argument("--model", required=True, help="torchvision name or package.module:factory")
    ap.add_argument("--model-kwargs", default="{}", help='JSON keyword arguments for the model factory, e.g. \'{"num_classes": 10}\'')
    ap.add_argument("--input", default="3x224x224", help="input shape without batch, e.g. 3x224x224")
    ap.add_argument("--hardware", default="bitops", help="shipped hardware name or path to a .toml")
    ap.add_argument("--budget", required=True, help='e.g. "w3a4&c12.2", "bitops<=9.7G", "size<=4MB"')
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--weight-only", action="store_true")
    ap.add_argument("--clean", choices=[c.value for c in fxmpq.Cleaning], default=fxmpq.Cleaning.PAPER.value)
    ap.add_argument("--out", help="write the policy JSON here")
    ap.add_argument("--plot", help="write a bar chart of bits per layer here (PNG)")
    args = ap.parse_args(argv)
    try:
        import torch

        out = check_output(args.out, "--out")  # before the search, not after it
        plot = check_output(args.plot, "--plot")
        kwargs = parse_model_kwargs(args.model_kwargs)
        ind = fxmpq.Indicators.from_json(Path(args.indicators))
        budget = fxmpq.Budget.parse(args.budget)
        hw = fxmpq.load_hardware(args.hardware)
        analysis = fxmpq.analyze(build_model(args.model, kwargs), torch.randn(1, *parse_shape(args.input)), hardware=hw)
        res = fxmpq.search(analysis, ind, budget, args.alpha, weight_only=args.weight_only, clean=args.clean)
        print(res.table(analysis, ind))
        w, a = res.policy.average_bits(analysis)
        print(f"objective {res.objective:.10g}; average bits W{w:.2f} A{a:.2f} (searchable layers)")
        if out is not None:
            res.policy.to_json(out)
            print(f"policy written to {out}")
        if plot is not None:
            plot_bits(res.policy, analysis, plot)
            print(f"bar chart written to {plot}")
    except fxmpq.FxmpqError as e:
        return fail(e, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
