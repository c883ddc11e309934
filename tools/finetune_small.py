"""Fine-tune a small CNN on Fashion-MNIST (or scikit-learn's digits) under a mixed ~3-bit policy, then lower it.

    python tools/finetune_small.py [--model small_resnet] [--train 20000] [--fp32-epochs 3] [--epochs 2]
                                   [--out /tmp/fxmpq_small] [--seed 0]

Prints FP32 accuracy, accuracy right after applying the policy (LSQ step sizes initialised from data), after
fine-tuning, and the ONNX Runtime parity report of the lowered model; the fine-tuning checkpoint and the ONNX
model land in --out (`fxmpq lower OUT` lowers the checkpoint again).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxmpq
from fxmpq.core.datasets import load_small
from fxmpq.core.options import TrainOptions
from fxmpq.models import small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small_resnet", choices=["small_resnet", "small_mobilenet"])
    ap.add_argument("--train", type=int, default=20000, help="training images used (subset, for speed)")
    ap.add_argument("--fp32-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=Path("/tmp/fxmpq_small"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    data = load_small()
    test = data.loader("test", 1000)
    xtr, ytr = data.train_x[: args.train], data.train_y[: args.train]
    print(f"data {data.name}: {len(xtr)} train / {len(data.test_x)} test images {tuple(xtr.shape[1:])}")
    factory = getattr(small, args.model)
    model = factory(num_classes=data.num_classes, in_channels=xtr.shape[1])
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t = time.time()
    for _ in range(args.fp32_epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    acc_fp32 = fxmpq.accuracy(model, test)
    print(f"FP32 accuracy {100 * acc_fp32:.2f} % ({args.fp32_epochs} epochs, {time.time() - t:.0f} s)")

    ex = xtr[:2]
    q = fxmpq.prepare(model.eval(), ex, bits=(2, 3, 4, 5, 6, 7, 8))
    rng = random.Random(args.seed)
    names = q.searchable_names
    # a mixed policy averaging 3 bits over searchable layers: 2 and 4 alternate, shuffled
    ws = [2, 4] * (len(names) // 2) + [3] * (len(names) % 2)
    as_ = [2, 4] * (len(names) // 2) + [3] * (len(names) % 2)
    rng.shuffle(ws)
    rng.shuffle(as_)
    policy = fxmpq.Policy({n: (w, a) for n, w, a in zip(names, ws, as_)})
    fxmpq.apply_policy(q, policy, xtr[:256])
    full = q.policy
    print(f"policy: {len(names)} searchable layers, mean W{sum(ws) / len(ws):.2f} A{sum(as_) / len(as_):.2f} "
          f"(pinned layers at their pins): " + ", ".join(f"{n} W{w}A{a}" for n, (w, a) in full.items()))
    acc_before = fxmpq.accuracy(q, test)
    print(f"quantized before fine-tuning {100 * acc_before:.2f} %")
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    fxmpq.finetune(
        q,
        TensorDataset(xtr, ytr),
        TrainOptions(
            finetune_epochs=args.epochs,
            lr=args.lr,
            batch_size=64,
            model_factory=f"fxmpq.models.small:{args.model}",
            progress=False,
            cosine=False,
        ),
        checkpoint=args.out / "finetune.pt",
    )
    acc_after = fxmpq.accuracy(q, test)
    print(f"quantized after {args.epochs} fine-tuning epochs {100 * acc_after:.2f} % ({time.time() - t:.0f} s)")
    rep = fxmpq.lower(q, args.out / "model.onnx", ex, inputs=data.test_x[:512])
    print(rep.table())
    print(f"\n| model | data | FP32 | policy applied | fine-tuned ({args.epochs} ep) | ORT top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| {args.model} | {data.name} | {100 * acc_fp32:.2f} % | {100 * acc_before:.2f} % | "
          f"{100 * acc_after:.2f} % | {100 * rep.top1_agreement:.2f} % |")


if __name__ == "__main__":
    main()
