"""What checkpointing costs a training run: seconds per checkpoint against seconds per optimizer step.

    python tools/bench_checkpoint.py [--model small_resnet] [--input 1x28x28] [--steps 40] [--batch-size 64]

Runs joint indicator training for --steps steps three times (no checkpoint; one at the end; one after every step)
and reports the time one checkpoint takes (write, fsync, rename), its size, one step's time, and the overhead of
checkpointing every N steps (fxmpq.train.CHECKPOINT_EVERY by default) as a share of the training time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import fxmpq
from fxmpq.cli import parse_shape
from fxmpq.models import build_model
from fxmpq.train import CHECKPOINT_EVERY


def _timed(q: fxmpq.QuantModel, data: list, steps: int, checkpoint: Path | None, every: int | None) -> float:
    t = time.perf_counter()
    fxmpq.train_indicators(q, data, epochs=1, max_steps=steps, checkpoint=checkpoint, checkpoint_every=every,
                           progress=False)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small_resnet")
    ap.add_argument("--input", default="1x28x28")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--every", type=int, default=CHECKPOINT_EVERY)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shape = parse_shape(args.input)
    kwargs = {"num_classes": args.classes}
    if args.model in ("small_resnet", "small_mobilenet"):
        kwargs["in_channels"] = shape[0]
    model = build_model(args.model, kwargs)
    data = [(torch.randn(args.batch_size, *shape), torch.randint(0, args.classes, (args.batch_size,)))
            for _ in range(args.steps + 1)]
    q = fxmpq.prepare(model, torch.randn(2, *shape))
    _timed(q, data, 3, None, None)  # warm-up
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "bench.ckpt"
        plain = _timed(fxmpq.prepare(model, torch.randn(2, *shape)), data, args.steps, None, None)
        ck.unlink(missing_ok=True)
        _timed(fxmpq.prepare(model, torch.randn(2, *shape)), data, args.steps, ck, None)
        size = ck.stat().st_size
        ck.unlink()
        every = _timed(fxmpq.prepare(model, torch.randn(2, *shape)), data, args.steps, ck, 1)
    step = plain / args.steps
    save = max(every - plain, 0.0) / args.steps
    share = save / (args.every * step + save)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({params / 1e6:.2f} M parameters), input {args.input}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"joint training step   {1000 * step:.1f} ms")
    print(f"one checkpoint        {1000 * save:.1f} ms ({size / 1e6:.2f} MB: weights, step sizes, optimizer, RNG)")
    print(f"checkpoint every {args.every:<4} {100 * share:.2f} % of the training time "
          f"(a kill loses at most {args.every} steps = {args.every * step:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
