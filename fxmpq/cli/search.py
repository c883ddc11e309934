"""`fxmpq search`: the optimal bit-width policy: indicators JSON + model + hardware + budget -> policy JSON and a table.

    fxmpq search --indicators runs/ind/indicators.json --model small_resnet --input 1x28x28 --budget "w3a4&c8" \\
        --out runs/ind/policy.json --plot bits.png

`--model` is a torchvision model name, a fxmpq.models name or `package.module:factory` (called with --model-kwargs).
Budget strings: terms joined by `&`: `w3a4` (BitOps of uniform W3A4), `c12.2` (size <= FP32/12.2),
`metric<=NUMBER[k|M|G|T]` or `size<=4MB`. The policy JSON goes to `fxmpq finetune --policy` (or `fxmpq analyze
--policy`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..cost.budget import Budget
from ..errors import FxmpqError
from ..hardware.spec import load_hardware
from ..models import build_model, parse_model_kwargs
from ..policy_search.api import search
from ..policy_search.indicators import Cleaning, Indicators
from ..policy_search.report import plot_bits
from ..stages import analyze
from . import Parser, check_output, fail, held_warnings, parse_shape

__all__ = ["build_parser", "main"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    doc = __doc__.splitlines()
    ap = Parser(prog=prog, description=doc[0].split(": ", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="example:\n" + "\n".join(doc[2:4]))
    ap.add_argument("--indicators", required=True, help="indicators JSON file (fxmpq train-indicators)")
    ap.add_argument("--model", required=True, help="torchvision name, fxmpq.models name or package.module:factory")
    ap.add_argument("--model-kwargs", default="{}", help='JSON keyword arguments for the model factory, e.g. \'{"num_classes": 10}\'')
    ap.add_argument("--input", default="3x224x224", help="input shape without batch, e.g. 3x224x224")
    ap.add_argument("--hardware", default="bitops", help="shipped hardware name or path to a .toml")
    ap.add_argument("--budget", required=True, help='e.g. "w3a4&c12.2", "bitops<=9.7G", "size<=4MB"')
    ap.add_argument("--alpha", type=float, default=2.0, help="weight of the activation indicators (default 2)")
    ap.add_argument("--weight-only", action="store_true", help="ignore activation indicators (each weight width "
                    "runs with the widest activation width the hardware pairs it with)")
    ap.add_argument("--clean", choices=[c.value for c in Cleaning], default=Cleaning.PAPER.value,
                    help="how indicators are cleaned before the search (default %(default)s)")
    ap.add_argument("--out", help="write the policy JSON here")
    ap.add_argument("--plot", help="write a bar chart of bits per layer here (PNG)")
    return ap


@held_warnings
def main(argv: Sequence[str] | None = None, *, prog: str = "fxmpq search", label: str | None = "fxmpq search") -> int:
    """Run the subcommand; exit status 0, or 2 with one line on stderr ("<label>: error: ...")."""
    args = build_parser(prog).parse_args(argv)
    try:
        out = check_output(args.out, "--out")  # before the search, not after it
        plot = check_output(args.plot, "--plot")
        kwargs = parse_model_kwargs(args.model_kwargs)
        ind = Indicators.from_json(Path(args.indicators))
        budget = Budget.parse(args.budget)
        hw = load_hardware(args.hardware)
        analysis = analyze(build_model(args.model, kwargs), torch.randn(1, *parse_shape(args.input)), hardware=hw)
        res = search(analysis, ind, budget, args.alpha, weight_only=args.weight_only, clean=args.clean)
        print(res.table(analysis, ind))
        w, a = res.policy.average_bits(analysis)
        print(f"objective {res.objective:.10g}; average bits W{w:.2f} A{a:.2f} (searchable layers)")
        if out is not None:
            res.policy.to_json(out)
            print(f"policy written to {out}")
        if plot is not None:
            plot_bits(res.policy, analysis, plot)
            print(f"bar chart written to {plot}")
    except FxmpqError as e:
        return fail(e, 2, prog=label)
    return 0
