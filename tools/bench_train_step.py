"""Wall (and CPU) time of one fake-quant training step vs one FP32 step, of one joint LIMPQ step vs one plain QAT step,
and of one joint step with the sandwich rule (TrainOptions(joint_passes="sandwich")) vs the full joint step.

"fq" uses fxmpq's fused LSQ CPU kernel (fxmpq/quant/fused_cpu.py) where it applies; "fq ops" is the same step with
PyTorch's operators (`fused_cpu.disabled()`), and "no adj" the fused step with the model input's quantizer taking its
step gradient through the first layer's input gradient (`without_input_step_adjoint()`, fxmpq/quant/lsq.py), in the
same run.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import fxmpq
from fxmpq.quant import fused_cpu
from fxmpq.quant.lsq import without_input_step_adjoint
from fxmpq.train.allocator import keep_freed_memory
from fxmpq.train.loop import _StepContext
from fxmpq.train.trainings import _joint_step


class SmallCNN(nn.Module):
    """A CIFAR-sized conv net: 4 conv-bn-relu blocks and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        chans = [3, 32, 64, 128, 128]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _ops_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    with fused_cpu.disabled():
        _sgd_step(model, x, y, opt)


def _noadj_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    with without_input_step_adjoint():
        _sgd_step(model, x, y, opt)


def bench(name: str, model: nn.Module, shape: tuple[int, ...], repeats: int, bits: tuple[int, ...],
          block: int = 3) -> dict:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    fp = copy.deepcopy(model).train()
    q = fxmpq.prepare(model, x, bits=bits).train()
    qj = fxmpq.prepare(model, x, bits=bits).train()
    qs = fxmpq.prepare(model, x, bits=bits).train()
    opt_fp = torch.optim.SGD(fp.parameters(), lr=1e-3, momentum=0.9)
    opt_q = torch.optim.SGD(q.parameters(), lr=1e-3, momentum=0.9)
    opt_j = torch.optim.SGD(qj.parameters(), lr=1e-3, momentum=0.9)
    opt_s = torch.optim.SGD(qs.parameters(), lr=1e-3, momentum=0.9)
    q.set_uniform(4)
    joint = _joint_step(distill=True)
    ctx = _StepContext(net=qj, qmodel=qj, loss_fn=nn.functional.cross_entropy, seed=0)
    sandwich = _joint_step(distill=True, mode="sandwich")
    ctx_s = _StepContext(net=qs, qmodel=qs, loss_fn=nn.functional.cross_entropy, seed=0)

    def joint_step() -> None:
        opt_j.zero_grad(set_to_none=True)
        joint(ctx, (x,), y)
        opt_j.step()
        ctx.step += 1

    def sandwich_step() -> None:
        opt_s.zero_grad(set_to_none=True)
        sandwich(ctx_s, (x,), y)
        opt_s.step()
        ctx_s.step += 1

    variants: dict[str, Callable[[], None]] = {
        "fp32": lambda: _sgd_step(fp, x, y, opt_fp),
        "fakequant_w4a4": lambda: _sgd_step(q, x, y, opt_q),
        "fakequant_w4a4_ops": lambda: _ops_step(q, x, y, opt_q),
        "fakequant_w4a4_noadj": lambda: _noadj_step(q, x, y, opt_q),
        f"joint_{len(bits)}bits+rand": joint_step,
        "sandwich": sandwich_step,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up (also initialises activation step sizes)
        fn()
    order = list(variants)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # interleave variants so load changes hit all of them alike
        for k in order:
            # a block of consecutive steps, the first untimed: a step runs after a step like itself, as in
            # training (after another variant's step, malloc's heap is in another state)
            for i in range(block):
                t0, c0 = time.perf_counter(), time.process_time()
                variants[k]()
                if i:
                    times[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": name, "shape": shape, "wall": med, "cpu": med_cpu}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7, help="rounds; each variant runs `--block` steps a round")
    ap.add_argument("--block", type=int, default=3,
                    help="consecutive steps of one variant per round, all but the first timed (default 3)")
    ap.add_argument("--models", nargs="+", default=["small_cnn", "resnet18", "mobilenet_v2"], choices=["small_cnn", "resnet18", "mobilenet_v2"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    ap.add_argument("--plain-malloc", action="store_true",
                    help="leave glibc's malloc thresholds alone (fxmpq's training loop raises them on CPU)")
    args = ap.parse_args(argv)
    tuned = False if args.plain_malloc else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # keep denormal slowdowns of a long random-data run out of the comparison
    cases = [
        ("small_cnn", SmallCNN(), (32, 3, 32, 32)),
        ("resnet18", torchvision.models.resnet18(num_classes=10), (16, 3, 64, 64)),
        ("mobilenet_v2", torchvision.models.mobilenet_v2(num_classes=10), (16, 3, 64, 64)),  # depthwise
    ]
    cases = [c for c in cases if c[0] in args.models]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats * (max(2, args.block) - 1)} steps "
          f"({args.repeats} rounds of {max(2, args.block)} consecutive, the first untimed), "
          f"malloc {'tuned as in training (fxmpq.train.allocator)' if tuned else 'untouched'}")
    head = (f"{'model':<12} {'input':<14} {'clock':<5} {'fp32 ms':>9} {'fq ms':>9} {'fq/fp32':>8} "
            f"{'fq ops ms':>9} {'ops/fp32':>8} {'no adj ms':>9} {'noadj/fp32':>10} {'joint ms':>9} {'joint/qat':>9} "
            f"{'sandw ms':>9} {'sandw/joint':>11}")
    print(head)
    print("-" * len(head))
    for name, model, shape in cases:
        r = bench(name, model, shape, args.repeats, tuple(args.bits), max(2, args.block))
        for clock in ("wall", "cpu"):
            t = r[clock]
            fp, fq, ops, na = t["fp32"], t["fakequant_w4a4"], t["fakequant_w4a4_ops"], t["fakequant_w4a4_noadj"]
            jt = next(v for k, v in t.items() if k.startswith("joint"))
            print(f"{name:<12} {'x'.join(map(str, shape)):<14} {clock:<5} {fp * 1e3:9.1f} {fq * 1e3:9.1f} "
                  f"{fq / fp:8.2f} {ops * 1e3:9.1f} {ops / fp:8.2f} {na * 1e3:9.1f} {na / fp:10.2f} {jt * 1e3:9.1f} "
                  f"{jt / fq:9.2f} {t['sandwich'] * 1e3:9.1f} {t['sandwich'] / jt:11.2f}", flush=True)
    print(f"(joint = {len(args.bits)} uniform passes + 1 random policy, one optimizer step; sandw = the sandwich rule, "
          f"{min(3, len(args.bits))} uniform passes + 1 random policy; qat = fakequant W4A4 step; fused kernel {'built' if fused_cpu.fused_kernel() is not None else 'NOT built'})")


if __name__ == "__main__":
    main()
