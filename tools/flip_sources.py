"""Which float ops make ONNX Runtime's quantizer values differ from PyTorch's: flips per quantizer, teacher-forced.

    python tools/flip_sources.py swin_t [--size 32] [--policy w8a8|random] [--samples 64] [--json out.json]

A torchvision model with random weights is prepared, given uniform W8A8 (or a seeded random 2..8-bit policy, as the
noise-floor tests do), lowered to QDQ ONNX, and run in ONNX Runtime. Then the QuantModel runs in PyTorch with
every activation quantizer fed ONNX Runtime's values of the quantizers before it, and each quantizer's values one
step apart from ONNX Runtime's are counted: a flip there comes from what lies between it and the quantizers before
it (LayerNorm, softmax, GELU, a float BatchNorm computed by two libraries, or PyTorch's simulation of an integer
kernel). The table gives each quantizer's flips with those float ops, and the totals by op kind.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fxmpq
from fxmpq.capture.graph import propagate_shapes
from fxmpq.capture.record import quantizer_record_of
from fxmpq.export.lower import to_onnx
from fxmpq.export.noise_floor import float_ops_before
from fxmpq.export.parity import align_quantizers, open_session, output_step, qdq_nodes, run_ort
from fxmpq.passes import run_passes
from fxmpq.quant.lsq import LSQQuantizer
from fxmpq.quant.storage import as_storage
from fxmpq.stages import lower_passes


def build(name: str, size: int, policy: str, seed: int = 0) -> tuple[fxmpq.QuantModel, torch.Tensor]:
    """A torchvision model with random weights at `size`, uniform W8A8 or a seeded random 2..8-bit policy."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    q = fxmpq.prepare(model, x, bits=(8,) if policy == "w8a8" else (2, 3, 4, 5, 6, 7, 8))
    rng = random.Random(seed)
    pol = {n: (8, 8) if policy == "w8a8" else (rng.randint(2, 8), rng.randint(2, 8)) for n in q.searchable_names}
    fxmpq.apply_policy(q, pol, torch.randn(16, 3, size, size))
    return q.eval(), x


def flips_by_quantizer(q: fxmpq.QuantModel, x: torch.Tensor, samples: int, seed: int = 0
                       ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[str, ...]], dict[str, float]]:
    """{quantizer: (values one step apart from ONNX Runtime's, values)}, the QuantModel teacher-forced (each
    activation quantizer fed ONNX Runtime's values of the quantizers before it); the float ops before each
    quantizer (fxmpq.export.noise_floor.float_ops_before); and the end-to-end figures (output steps, top-1)."""
    import onnx

    propagate_shapes(q.graph_module, (x,))
    gm = copy.deepcopy(q.graph_module).eval()
    lowered = run_passes(gm, lower_passes(None, accuracy_level=q.hardware.matmul_nbits_accuracy_level)).graph_module
    proto, _, _ = to_onnx(lowered, (x,), q.policy, as_storage("int8", "flip_sources"))
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn((samples, *x.shape[1:]), generator=g)
    qnodes = qdq_nodes(lowered)
    aligned = align_quantizers(qnodes, proto, lowered)  # quantizers ONNX Runtime has no pair for are not compared
    names = list(dict.fromkeys(aligned.values()))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        onnx.save(proto, str(path))
        ys = run_ort(open_session(path, [*names, proto.graph.output[0].name]), (inputs,), samples,
                     [*names, proto.graph.output[0].name])
    y_ort = ys[-1]
    by_name = dict(zip(names, ys))
    ort_calls: dict[str, list[np.ndarray]] = {}
    for n in qnodes:
        if n.name in aligned:
            ort_calls.setdefault(quantizer_record_of(n).quantizer, []).append(by_name[aligned[n.name]])
    out: dict[str, list[int]] = {}
    used: dict[tuple[str, int], int] = {}
    handles = []

    def hook(m: torch.nn.Module, args: object, r: torch.Tensor, name: str) -> torch.Tensor | None:
        cands = [y for y in ort_calls.get(name, []) if y.size == r.numel()]
        i = used[(name, r.numel())] = used.get((name, r.numel()), -1) + 1
        if i >= len(cands):
            return None
        y = cands[i].reshape(r.shape)
        step = float(m.step_size().detach().float())
        c = out.setdefault(name, [0, 0])
        c[0] += int((np.abs(r.detach().numpy() - y) > 0.5 * step).sum())
        c[1] += r.numel()
        return torch.from_numpy(y).to(r.dtype)

    with torch.no_grad():
        y_pt = q(inputs).detach().numpy()  # end to end, unforced
    for name, m in q.graph_module.named_modules():
        if isinstance(m, LSQQuantizer) and m.active_bits is not None and name in ort_calls:
            handles.append(m.register_forward_hook(lambda m, a, r, name=name: hook(m, a, r, name)))
    try:
        with torch.no_grad():
            q(inputs)
    finally:
        for h in handles:
            h.remove()
    y_ort = y_ort.reshape(y_pt.shape)
    step = output_step(lowered)
    e2e = {"max_steps": float(np.abs(y_pt - y_ort).max()) / step if step else float("nan"),
           "top1_agree": float((y_pt.argmax(-1) == y_ort.argmax(-1)).mean())}
    return {k: (v[0], v[1]) for k, v in out.items()}, float_ops_before(q.graph_module), e2e


def op_kind(description: str) -> str:
    """A float op's kind for the totals, from float_ops_before's description ('linear (node linear_4)',
    'features.7.1.mlp.0 (QuantLinear, its float accumulation)'): the function or the module class and role."""
    head, _, rest = description.partition(" (")
    return rest.rstrip(")") if rest and not rest.startswith("node ") else head


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a torchvision classification model name")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--policy", choices=("w8a8", "random"), default="w8a8")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the per-quantizer flips here")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    q, x = build(args.model, args.size, args.policy)
    flips, before, e2e = flips_by_quantizer(q, x, args.samples)
    total = sum(f for f, _ in flips.values())
    values = sum(v for _, v in flips.values())
    by_kind: collections.Counter[str] = collections.Counter()
    print(f"{args.model} {args.size}x{args.size} {args.policy}: {total} of {values} quantizer values one step apart "
          f"(teacher-forced, {args.samples} inputs, {len(flips)} quantizers, {time.perf_counter() - t:.0f} s); "
          f"end to end {e2e['max_steps']:.2f} output steps, top-1 agreement {100 * e2e['top1_agree']:.1f} %")
    for name, (f, v) in flips.items():
        if f:
            ops = before.get(name, ())
            by_kind[op_kind(ops[0]) if ops else "(none)"] += f
            print(f"  {name}: {f} of {v}   float ops before: {', '.join(ops)}")
    print("by the nearest float op's kind: " + ", ".join(f"{k} {c}" for k, c in by_kind.most_common()))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "size": args.size, "policy": args.policy,
                                         "flips": flips, "by_kind": by_kind, "total": total, "values": values, **e2e},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
