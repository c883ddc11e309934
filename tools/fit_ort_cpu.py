"""Fit a generic `ort_cpu` hardware file for one CPU: a latency per MAC, per parameter, per input element and per
layer for each layer kind and format, and per format boundary, fitted on the profiled files of several models, so
that `quantize(..., hardware="ort_cpu")` prices any model without a profiling run; then its error against the
profiled files of models it was not fitted on.

    python tools/profile_hw.py MODEL --input 3x224x224 --threads 1 --out runs/profiles/MODEL.toml   # each model
    python tools/fit_ort_cpu.py --profiles runs/profiles --fit resnet18,mobilenet_v2,... \\
        --test resnet50,mobilenet_v3_large --name ort_cpu_ISA --out hardware/ort_cpu_ISA.toml   # one file per CPU

Samples: each fitted model's profiled file priced (layers, chains and its constant) under uniform policies in
every format and under random per-layer policies; the fit minimises the sum of relative errors (a linear program,
highspy) with non-negative costs, a model's uniform policies weighing as much in all as its random ones. The
file's `latency` metric is then one `table` term per mac, param, activation and layer for every layer kind;
`bytes` is weight bits / 8. A format boundary (a layer reading a layer back to back whose activations are of
another type: float, int8, int16) costs per input element, fitted too, and written as the activation term's
`chain`. Linear and matmul layers' MACs and input elements take a conv's costs (a 1x1 convolution on their
tokens; weight-only as float) when the fitted models have fewer than MIN_LINEAR of them, as CNNs do (one
classifier each). What it cannot know: a model's rest (pooling, adds, unfused activations) is spread over its
layers. The file records the CPU of the profiled files (one CPU per fit): int8 speed depends on it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import highspy
import numpy as np
import torch

import fxmpq
from fxmpq.hardware.spec import FLOAT, LayerKind, Provenance, load_hardware, pair_name
from fxmpq.models import build_model
from fxmpq.profiling.profile import INT8, SAME_KERNEL, ort_target

KINDS = (LayerKind.CONV, LayerKind.DEPTHWISE_CONV, LayerKind.LINEAR, LayerKind.MATMUL)
TARGET = ort_target()  # the formats profiling prices, the one list of what ONNX Runtime's CPU provider runs
FORMATS = TARGET.formats(LayerKind.LINEAR)  # every pair, weight-only, float


def _kernel(f: tuple) -> tuple:
    """The measured format whose kernel `f` runs (W2A8 and W4A8 run W8A8's)."""
    return INT8 if f in SAME_KERNEL else f


def _act_class(f: tuple) -> str:
    """What a layer's input is in format `f`: float (float and weight-only), 8-bit or 16-bit integers."""
    return "float" if f[1] is None else "int8" if f[1] <= 8 else "int16"


def _boundary(f: tuple, g: tuple) -> bool:
    """Whether a layer in `f` reading a layer in `g` back to back converts between them (a quantize, a
    dequantize): their activations differ in kind."""
    return _act_class(f) != _act_class(g)


def _as_conv(f: tuple) -> tuple:
    """The conv format whose per-MAC and per-element costs a linear layer in `f` takes when they are pooled
    (`_linear_as_conv`): its own, or float for weight-only (float activations, a float GEMM after dequantizing)."""
    return FLOAT if f[0] is not None and f[1] is None else f


def _key(f: tuple) -> str:
    return "float" if f == FLOAT else pair_name(f)


def _samples(spec: str, shape: tuple[int, ...], profile: Path, n_random: int, seed: int) -> list[tuple[dict, float]]:
    """(features, latency) of `spec`'s profiled file under uniform and random policies; features: {(kind, format,
    "mac"|"param"|"activation"|"layer"): quantity}."""
    model = build_model(spec).eval()
    a = fxmpq.analyze(model, torch.randn(1, *shape), hardware=profile)
    hw = a.hardware
    rng = random.Random(seed)
    offered = {r.name: [f for f in hw.formats(r.kind)] for r in a.layers}
    policies = []
    for f in FORMATS:  # uniform where a layer can run it, else W8A8
        policies.append({r.name: f if f in offered[r.name] else (8, 8) for r in a.layers})
    for _ in range(n_random):
        policies.append({r.name: rng.choice(offered[r.name]) for r in a.layers})
    out = []
    for pol in policies:
        feats: dict = {}
        for r in a.layers:
            f = pol[r.name]
            f = _kernel(f)
            feats[(r.kind, f, "mac")] = feats.get((r.kind, f, "mac"), 0.0) + r.macs
            feats[(r.kind, f, "param")] = feats.get((r.kind, f, "param"), 0.0) + r.params
            act = float(np.prod(r.in_shape[1:]))
            feats[(r.kind, f, "activation")] = feats.get((r.kind, f, "activation"), 0.0) + act
            feats[(r.kind, f, "layer")] = feats.get((r.kind, f, "layer"), 0.0) + 1.0
            if r.input_layer in pol and _boundary(f, g := _kernel(pol[r.input_layer])):
                feats[(r.kind, f, "chain", g)] = feats.get((r.kind, f, "chain", g), 0.0) + act
        out.append((feats, a.cost(pol)["latency"]))
    return out


MIN_LINEAR = 10  # fewer linear/matmul layers than this in the fitted models: they take a conv's costs


def _linear_as_conv(samples: list[tuple[dict, float]]) -> list[tuple[dict, float]]:
    """The samples with linear and matmul layers' MACs and input elements (what grows with their tokens) counted
    as a convolution's (a linear layer is a 1x1 convolution on its tokens; weight-only as float): a CNN's one
    classifier, where MACs equal parameters, cannot tell a cost per MAC from one per parameter, and a transformer's
    linear layers run on hundreds of tokens. Parameters, layers and boundaries keep their own costs."""
    out = []
    for feats, y in samples:
        new: dict = {}
        for k, v in feats.items():
            if k[0] in (LayerKind.LINEAR, LayerKind.MATMUL) and k[2] in ("mac", "activation"):
                k = (LayerKind.CONV, _as_conv(k[1]), k[2])
            new[k] = new.get(k, 0.0) + v
        out.append((new, y))
    return out


def _fit(samples: list[tuple[dict, float]], weights: list[float]) -> dict:
    """Non-negative costs per feature minimising the weighted sum of |prediction - y| / y (an LP)."""
    cols = sorted({k for feats, _ in samples for k in feats}, key=str)
    idx = {k: j for j, k in enumerate(cols)}
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    inf = highspy.kHighsInf
    # columns: one cost per feature (scaled to ms per unit), then one error per sample
    scale = {k: max(max(f.get(k, 0.0) for f, _ in samples), 1.0) for k in cols}
    for _ in cols:
        h.addVar(0.0, inf)
    for _ in samples:
        h.addVar(0.0, inf)
    n = len(cols)
    h.changeColsCost(len(samples), np.arange(n, n + len(samples), dtype=np.int32), np.array(weights, dtype=float))
    for i, (feats, y) in enumerate(samples):
        ind = [idx[k] for k in feats] + [n + i]
        val = [feats[k] / scale[k] / y for k in feats]
        # pred/y - 1 <= e  and  1 - pred/y <= e
        h.addRow(-inf, 1.0, len(ind), np.array(ind, dtype=np.int32), np.array([*val, -1.0]))
        h.addRow(1.0, inf, len(ind), np.array(ind, dtype=np.int32), np.array([*val, 1.0]))
    h.run()
    x = h.getSolution().col_value
    return {k: x[idx[k]] / scale[k] for k in cols}


def _provenance(paths: list[Path]) -> Provenance:
    """The CPU and runtime the profiled files were measured on (all the same, else SystemExit naming the two)."""
    first = None
    for p in paths:
        pv = load_hardware(p).provenance
        if pv is None or pv.isa is None:
            raise SystemExit(f"{p}: no [provenance] with the CPU's isa: re-profile it with tools/profile_hw.py")
        key = (pv.cpu_vendor, pv.cpu_family, pv.cpu_model, tuple(sorted(pv.isa)), pv.runtime)
        if first is None:
            first = (p, key, pv)
        elif key != first[1]:
            raise SystemExit(f"{p} was profiled on {key}, {first[0]} on {first[1]}: fit one CPU's files at a time "
                             f"(a generic file is per CPU)")
    return first[2]


def _toml(coef: dict, fitted: list[str], shape: str, samples: int, err: float, pv: Provenance, name: str,
          pooled: bool) -> str:
    q = json.dumps
    lines = [
        "# Generic ONNX Runtime CPU target: no profiling run needed. Latency per layer = a cost per MAC, per",
        "# parameter, per input element and per layer, for each layer kind and format, and per input element where a layer",
        "# reads a layer of another activation type back to back (float, int8, int16: the `chain` of the activation term),",
        "# fitted (tools/fit_ort_cpu.py, least relative error, costs >= 0)",
        f"# on the profiled files of {', '.join(fitted)} at {shape}, batch 1, 1 thread ({samples} policies;",
        f"# mean relative error on them {100 * err:.1f} %). A model's rest (pooling, adds) is spread over its layers:",
        "# for budgets you must hold to within 10 %,",
        "# profile the model itself (fxmpq profile). Measured on the CPU in [provenance]; int8 speed depends on it.",
        "# W2A8 and W4A8 run the W8A8 kernel (8-bit containers), so they cost what W8A8 costs.",
        *(["# Linear and matmul layers' MACs and input elements cost a conv's (1x1 convolutions on their tokens;",
           "# weight-only as float): the fitted models had too few of them to tell."] if pooled else []),
        "",
        "[target]",
        f"name = {q(name)}",
        f"description = {q('ONNX Runtime CPU provider, generic costs per MAC and per layer fitted on profiled models, measured on ' + pv.cpu)}",
        f"sources = [{q('tools/fit_ort_cpu.py on ' + ', '.join(fitted) + ' (' + pv.runtime + ')')}]",
        f"weight_bits = {list(TARGET.weight_bits)}",
        f"act_bits = {list(TARGET.act_bits)}",
        f"pairs = {json.dumps([list(p) for p in TARGET.pairs])}",
        f"float_kinds = {json.dumps(sorted(k.value for k in TARGET.float_kinds))}",
        f"weight_only_bits = {list(TARGET.weight_only_bits)}",
        "",
        "[pins]  # none: the search decides the first and last layers like the others",
        "first_layer = false",
        "last_layer = false",
        "",
        "[metrics.latency]",
        'unit = "ms"',
        'description = "ONNX Runtime CPU latency, 1 thread, batch 1: a cost per MAC and per layer per kind and format"',
    ]
    for kind in KINDS:
        fmts = TARGET.formats(kind)
        def value(f: tuple, per: str, kind: LayerKind = kind) -> float:
            """The fitted cost; a kind never seen in a format takes a linear layer's (else a conv's) cost."""
            g = _kernel(f)
            if pooled and kind in (LayerKind.LINEAR, LayerKind.MATMUL) and per in ("mac", "activation"):
                return float(coef.get((LayerKind.CONV, _as_conv(g), per), 0.0))
            for k in (kind, LayerKind.LINEAR, LayerKind.CONV):
                if any(c[0] is k and c[1] == g for c in coef):
                    return float(coef.get((k, g, per), 0.0))
            return 0.0

        def boundary(f: tuple, g: tuple, kind: LayerKind = kind) -> float:
            """The fitted cost per input element of a layer in `f` reading a layer in `g` (0 where no fitted
            model had that boundary)."""
            for k in (kind, LayerKind.LINEAR, LayerKind.CONV):
                if (k, _kernel(f), "chain", _kernel(g)) in coef:
                    return float(coef[(k, _kernel(f), "chain", _kernel(g))])
            return 0.0

        for per, unit in (("mac", 1e-6), ("param", 1e-6), ("activation", 1e-6), ("layer", 1.0)):
            vals = ", ".join(f"{q(_key(f))} = {value(f, per) / unit!r}" for f in fmts)
            lines += ["", "[[metrics.latency.terms]]", 'type = "table"', f'per = "{per}"', f"scale = {unit!r}",
                      f"kinds = [{q(kind.value)}]", f"values = {{ {vals} }}"]
            if per == "activation":  # a format boundary: per element of the input it converts
                chain = []
                for f in fmts:
                    inner = ", ".join(f"{q(_key(g))} = {boundary(f, g) / unit!r}" for g in FORMATS
                                      if _boundary(f, g) and boundary(f, g) > 0)
                    if inner:
                        chain.append(f"{q(_key(f))} = {{ {inner} }}")
                if chain:
                    lines.append(f"chain = {{ {', '.join(chain)} }}")
    lines += [
        "",
        "[metrics.bytes]",
        'unit = "bytes"',
        'description = "weight bytes at the weight bit-widths (packed storage); float weights 4 bytes"',
        "terms = [{ type = \"weight_bits\", scale = 0.125 }]",
        "",
        "[provenance]",
        'tool = "tools/fit_ort_cpu.py"',
        f"command = {q(' '.join(sys.argv))}",
        f"notes = {q('generic (no model): fitted on ' + ', '.join(fitted) + ' at ' + shape + ', batch 1')}",
        "threads = 1",
        f"runtime = {q(pv.runtime)}",
        f"cpu = {q(pv.cpu)}",
        f"cpu_vendor = {q(pv.cpu_vendor)}",
        *([f"cpu_family = {pv.cpu_family}"] if pv.cpu_family is not None else []),
        *([f"cpu_model = {pv.cpu_model}"] if pv.cpu_model is not None else []),
        f"isa = [{', '.join(q(f) for f in pv.isa)}]",
        'clock = "thread_cpu"',
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=Path, required=True, help="folder of MODEL.toml files (tools/profile_hw.py)")
    ap.add_argument("--fit", required=True, help="comma-separated models to fit on (MODEL or MODEL@SHAPE for another "
                                                 "input shape than --input)")
    ap.add_argument("--test", default="", help="comma-separated models to test on (not fitted), as --fit")
    ap.add_argument("--input", default="3x224x224")
    ap.add_argument("--policies", type=int, default=40, help="random policies per model (besides the uniform ones)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="ort_cpu", help="the target's name in the file (default ort_cpu)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.input.split("x"))
    fit = [m for m in args.fit.split(",") if m]
    test = [m for m in args.test.split(",") if m]

    def spec_shape(m: str) -> tuple[str, tuple[int, ...]]:
        name, _, s = m.partition("@")
        return name, tuple(int(v) for v in s.split("x")) if s else shape

    pv = _provenance([args.profiles / f"{spec_shape(m)[0]}.toml" for m in fit])  # one CPU, checked first
    samples, weights = [], []
    # a model's uniform policies (its two measured ends among them) weigh as much in all as its random mixtures
    uniform_weight = max(1.0, args.policies / len(FORMATS))
    n_linear = 0
    for i, m in enumerate(fit):
        name, sh = spec_shape(m)
        mine = _samples(name, sh, args.profiles / f"{name}.toml", args.policies, seed=i)
        n_linear += int(sum(v for k, v in mine[0][0].items()
                            if k[0] in (LayerKind.LINEAR, LayerKind.MATMUL) and k[2] == "layer"))
        samples += mine
        weights += [uniform_weight] * len(FORMATS) + [1.0] * (len(mine) - len(FORMATS))
        print(f"fit: {m} ({len(samples)} samples)", file=sys.stderr)
    pooled = n_linear < MIN_LINEAR
    if pooled:
        print(f"fit: {n_linear} linear/matmul layers in the fitted models (< {MIN_LINEAR}): their MACs and input "
              f"elements take a conv's costs", file=sys.stderr)
        samples = _linear_as_conv(samples)
    coef = _fit(samples, weights)

    def predict(feats: dict) -> float:
        return sum(coef.get(k, 0.0) * v for k, v in feats.items())

    err = float(np.mean([abs(predict(f) / y - 1) for f, y in samples]))
    args.out.write_text(_toml(coef, [m.split("@")[0] for m in fit], args.input, len(samples), err, pv, args.name,
                              pooled))
    generic = load_hardware(args.out)
    print(f"wrote {args.out}: mean relative error {100 * err:.1f} % on the {len(samples)} fitted policies\n")
    print("| model | policy | profiled file ms | ort_cpu ms | error |\n|---|---|---:|---:|---:|")
    worst = 0.0
    for j, spec in enumerate(test):
        m, sh = spec_shape(spec)
        model = build_model(m).eval()
        x = torch.randn(1, *sh)
        prof = fxmpq.analyze(model, x, hardware=args.profiles / f"{m}.toml")
        gen = fxmpq.analyze(model, x, hardware=generic)
        rng = random.Random(100 + j)
        offered = {r.name: list(prof.hardware.formats(r.kind)) for r in prof.layers}
        policies = {"all W8A8": {r.name: (8, 8) for r in prof.layers},
                    "all float": {r.name: FLOAT for r in prof.layers},
                    "all W8A16": {r.name: (8, 16) for r in prof.layers}}
        for k in range(2):
            policies[f"random {k + 1}"] = {r.name: rng.choice(offered[r.name]) for r in prof.layers}
        for label, pol in policies.items():
            p, g = prof.cost(pol)["latency"], gen.cost(pol)["latency"]
            worst = max(worst, abs(g / p - 1))
            print(f"| {m} | {label} | {p:.2f} | {g:.2f} | {100 * (g / p - 1):+.1f} % |")
    if test:
        print(f"\nworst error on the test models: {100 * worst:.1f} %")


if __name__ == "__main__":
    main()
