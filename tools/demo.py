"""The fxmpq demo: train a small CNN, quantize it under a 3-bit BitOps budget, export and validate the ONNX model.

    python tools/demo.py [--data DIR] [--out runs/demo] [--budget w3a3] [--quick]

Uses Fashion-MNIST when found (Debian's dataset-fashion-mnist, or --data DIR), otherwise scikit-learn's digits, so it
never needs the network. About 2-3 minutes on 2 CPU cores with Fashion-MNIST; --quick is a smoke run of seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from common import train_fp32

import fxmpq
from fxmpq.cli import check_count, check_output, fail
from fxmpq.core.datasets import load_small
from fxmpq.models import small_resnet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="folder with Fashion-MNIST's IDX files (default: Debian's, else digits)")
    ap.add_argument("--out", default="runs/demo", help="work directory for every artefact (default runs/demo)")
    ap.add_argument("--budget", default="w3a3", help="budget string (default w3a3: BitOps of uniform W3A3)")
    ap.add_argument("--fp32-epochs", type=int, default=2)
    ap.add_argument("--indicator-epochs", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--indicator-samples", type=int, default=12000, help="training images for indicator training")
    ap.add_argument("--finetune-samples", type=int, default=30000, help="training images for fine-tuning")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny subsets and step counts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.time()
    try:  # every option checked before the minutes of FP32 training
        fxmpq.Budget.parse(args.budget)
        check_output(args.out, "--out", directory=True)
        for option, value, least in (("--fp32-epochs", args.fp32_epochs, 0), ("--indicator-epochs",
                                      args.indicator_epochs, 0), ("--finetune-epochs", args.finetune_epochs, 0),
                                     ("--indicator-samples", args.indicator_samples, 1),
                                     ("--finetune-samples", args.finetune_samples, 1)):
            check_count(value, option, least=least)
        data = load_small(args.data)
    except fxmpq.FxmpqError as e:
        return fail(e, 2)
    quick = args.quick
    fp32_limit = 512 if quick else None
    print(f"fxmpq demo: {data.name}, {len(data.train_y)} train / {len(data.test_y)} test images of "
          f"{'x'.join(map(str, data.input_shape))}; budget {args.budget!r}; work dir {args.out}")

    model = small_resnet(in_channels=data.input_shape[0], num_classes=data.num_classes)
    print("1) training the FP32 model")
    train_fp32(model, data, 1 if quick else args.fp32_epochs, limit=fp32_limit, seed=args.seed)
    val = data.loader("test", 512, limit=512 if quick else None)

    print("2) fxmpq.quantize: indicators -> ILP search -> fine-tune")
    ind_data = data.loader("train", 64, limit=256 if quick else args.indicator_samples, seed=args.seed + 1)
    ft_data = data.loader("train", 64, limit=256 if quick else args.finetune_samples, seed=args.seed + 2)
    try:
        train = fxmpq.TrainOptions(indicator_epochs=args.indicator_epochs, finetune_epochs=args.finetune_epochs,
                                   seed=args.seed, max_steps=4 if quick else None, indicator_data=ind_data,
                                   model_factory="fxmpq.models:small_resnet")
        r = fxmpq.quantize(model, args.budget, ft_data, data.test_x[:1], val_data=val, work_dir=args.out,
                           train=train)
    except fxmpq.FxmpqError as e:
        return fail(e, 1)

    print("\n3) per-layer policy")
    print(r.report())
    print("\n4) export to QDQ ONNX and check in ONNX Runtime")
    x = data.test_x[: 64 if quick else 512]
    try:
        rep = r.export(Path(args.out) / "model.onnx", inputs=x)
    except fxmpq.FxmpqError as e:
        return fail(e, 1)
    print(rep.table())
    print(f"\nFP32 top-1 {100 * r.fp32_accuracy:.2f} %  |  mixed-precision ({args.budget}) top-1 "
          f"{100 * r.accuracy:.2f} %  |  ONNX parity {'PASS' if rep.passed else 'FAIL'}")
    print(f"files in {args.out}: " + ", ".join(sorted(p.name for p in Path(args.out).iterdir())))
    print(f"done in {time.time() - t0:.0f} s")
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())
