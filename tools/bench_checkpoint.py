"""What checkpointing costs a training run: seconds per checkpoint against seconds per optimizer step.

    python tools/bench_checkpoint.py [--model small_resnet] [--input 1x28x28] [--steps 40] [--batch-size 64]

Times --steps steps of joint indicator training without checkpoints (the median step), then the median of 20
training checkpoints written the way the loop writes them (model, optimizer and random state; write, fsync,
rename), and reports the overhead of checkpointing every N steps (fxmpq.train.loop.CHECKPOINT_EVERY by default) as a
share of the training time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fxmpq
from fxmpq.cli import parse_shape
from fxmpq.core.options import TrainOptions
from fxmpq.models import build_model
from fxmpq.train.loop import CHECKPOINT_EVERY
from fxmpq.train.train_state import Stage, save_state


def _step_times(q: fxmpq.QuantModel, data: list, steps: int) -> list[float]:
    """Wall time of each optimizer step of joint training (measured at the optimizer's step call)."""
    marks: list[float] = []

    def sgd(groups: list) -> torch.optim.Optimizer:
        opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        real = opt.step

        def step(*a: object, **k: object) -> object:
            out = real(*a, **k)
            marks.append(time.perf_counter())
            return out

        opt.step = step  # type: ignore[method-assign]
        return opt

    t0 = time.perf_counter()
    fxmpq.train_indicators(
        q, data, TrainOptions(indicator_epochs=1, max_steps=steps, progress=False), optimizer=sgd
    )
    return [b - a for a, b in zip([t0, *marks], marks)][1:]  # the first step initialises the quantizers


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
    step = statistics.median(_step_times(q, data, args.steps))
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    for p in q.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # momentum buffers exist, as in a checkpoint written mid-run
    times = []
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "bench.ckpt"
        for _ in range(20):
            t = time.perf_counter()
            save_state(ck, q, opt, stage=Stage.INDICATORS, epoch=0, step=1, epochs=1, seed=0, dev=torch.device("cpu"),
                       extra_meta={})
            times.append(time.perf_counter() - t)
        size = ck.stat().st_size
    save = statistics.median(times)
    share = save / (args.every * step + save)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({params / 1e6:.2f} M parameters), input {args.input}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"joint training step   {1000 * step:.1f} ms (median of {args.steps - 1})")
    print(f"one checkpoint        {1000 * save:.1f} ms (median of 20) ({size / 1e6:.2f} MB: weights, step sizes, optimizer, RNG)")
    print(f"checkpoint every {args.every:<4} {100 * share:.2f} % of the training time "
          f"(a kill loses at most {args.every} steps = {args.every * step:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
