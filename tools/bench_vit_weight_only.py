"""A ViT-B/32-shaped transformer with weight-only 2/4/8-bit linear layers: ORT latency and file size vs FP32 and W8A8.

    python tools/bench_vit_weight_only.py [--threads 1] [--repeats 30] [--warmup 3] [--smoke]

fxmpq.models.vit_like (ViT-B/32's shape: 224x224, patch 32, width 768, depth 12, MLP 3072; every projection an
nn.Linear, 49 linear layers; random weights, seeded) exported three ways, each through fxmpq with its parity check:
  FP32       fxmpq.export.lower.export_fp32
  W8A8       every layer W8A8 QDQ (linear layers as 1x1 QLinearConv, the patch conv as QLinearConv)
  weight-only the linear layers weight-only in a 2/4/8 mix by role (attention qkv 4, proj 8, fc1 4, fc2 2, head 8),
             the patch conv in float: com.microsoft MatMulNBits, block 32, accuracy level 4
Checks that every weight-only layer is a MatMulNBits node in ONNX Runtime's optimized graph, then times the three
in interleaved rounds (fxmpq.export.measure.time_sessions, batch 1, `--threads` threads, thread CPU clock at one thread;
medians) and prints a Markdown table: ms, ratio to FP32, file bytes, ratio to FP32, parity. `--smoke`: a tiny ViT.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

import fxmpq
from fxmpq.export.lower import export_fp32
from fxmpq.export.measure import TimingOptions, session, time_sessions
from fxmpq.models import vit_like
from fxmpq.profiling.profile import ort_target

ROLE_BITS = {"attn.qkv": 4, "attn.proj": 8, "fc1": 4, "fc2": 2, "head": 8}


def weight_only_policy(names: list[str]) -> dict[str, tuple[int | None, int | None]]:
    """Linear layers weight-only at their role's bits; the patch conv in float."""
    policy: dict[str, tuple[int | None, int | None]] = {}
    for n in names:
        bits = next((b for role, b in ROLE_BITS.items() if n.endswith(role)), None)
        policy[n] = (bits, None) if bits is not None else (None, None)
    return policy


def optimized_ops(path: Path, out: Path) -> Counter:
    """Op types of ONNX Runtime's optimized graph of `path` (all optimizations, CPU)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny ViT, 3 repeats")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.smoke:
        args.repeats, args.warmup = 3, 1
        model, size = vit_like(num_classes=10, image_size=32, patch=8, dim=64, depth=2, heads=4, mlp_dim=128), 32
    else:
        model, size = vit_like(), 224
    model.eval()
    x = torch.randn(1, 3, size, size)
    calib = torch.randn(8, 3, size, size)
    hw = ort_target()
    files, reports = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files["FP32"] = export_fp32(model, d / "fp32.onnx", x)
        for label in ("W8A8", "weight-only 2/4/8"):
            q = fxmpq.prepare(model, calib, hardware=hw, bits=(2, 4, 8), act_bits=(8,))
            policy = (dict.fromkeys(q.layer_names, (8, 8)) if label == "W8A8" else weight_only_policy(q.layer_names))
            fxmpq.apply_policy(q, policy, calib)
            q.eval()
            path = d / f"{label.split()[0]}.onnx"
            reports[label] = fxmpq.lower(
                q, path, x, fxmpq.LowerOptions(samples=4, measure=False), inputs=calib[:4]
            )
            files[label] = path
            if label != "W8A8":
                wo = sum(1 for p in policy.values() if p[0] is not None)
                ops = optimized_ops(path, d / "opt.onnx")
                print(f"weight-only: {wo} linear layers, ORT's optimized graph has {ops['MatMulNBits']} MatMulNBits "
                      f"nodes ({'every one' if ops['MatMulNBits'] == wo else 'MISSING SOME'}); policy bits "
                      f"{dict(Counter(p[0] for p in policy.values() if p[0] is not None))}, patch conv in float")
            del q
        runs = {}
        for k, p in files.items():
            s = session(p, args.threads)
            runs[k] = (s, {s.get_inputs()[0].name: x.numpy()})
        times = time_sessions(runs, TimingOptions(threads=args.threads, repeats=args.repeats, warmup=args.warmup))
        sizes = {k: sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) for k, p in files.items()}
    base_t, base_s = times["FP32"].median_ms, sizes["FP32"]
    print(f"\nvit_like ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) at {size}x{size}, batch 1, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved rounds ({times['FP32'].clock.value} clock)\n")
    print("| export | median ms | vs FP32 | file MB | FP32 / file | parity |\n|---|---|---|---|---|---|")
    for k in files:
        par = "-" if k == "FP32" else ("pass" if reports[k].passed else "FAIL")
        print(f"| {k} | {times[k].median_ms:.2f} | {times[k].median_ms / base_t:.2f}x | {sizes[k] / 1e6:.1f} | "
              f"{base_s / sizes[k]:.2f}x | {par} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
