"""`fxmpq analyze`: the per-layer cost table of a model on a hardware description, under a uniform W/A or a
policy JSON."""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from .. import models
from ..cost.analysis import Analysis
from ..cost.policy import Policy
from ..errors import ArgumentError, FxmpqError, PolicyError
from ..hardware.spec import Pins, builtin_hardware, load_hardware
from ..stages import analyze
from . import Parser, check_count, fail, held_warnings, parse_shape

__all__ = ["build_parser", "main", "parse_input_size", "parse_uniform"]

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def parse_input_size(text: str) -> tuple[int, ...]:
    """"3x224x224" -> (1, 3, 224, 224): the per-sample shape, with a batch of one prepended."""
    return (1, *parse_shape(text))


def parse_uniform(text: str) -> tuple[int, int]:
    """"w4a8" or "W4A8" -> (4, 8)."""
    m = re.fullmatch(r"w([0-9]{1,2})a([0-9]{1,2})", text.strip().lower())
    if m is None:
        raise ArgumentError(f"--uniform {text[:60]!r}: expected wNaM, e.g. w4a4 or w8a8")
    return int(m[1]), int(m[2])


def build_model(spec: str, num_classes: int | None) -> nn.Module:
    """The model `spec` names (fxmpq.models.build_model), with num_classes when given."""
    return models.build_model(spec, {} if num_classes is None else {"num_classes": num_classes})


def uncovered_parameters(model: nn.Module, analysis: Analysis) -> list[tuple[str, int]]:
    """(module qualname, parameter count) of parameters no quantizable layer holds, normalisation layers left out
    (their parameters are folded into convs or stay in float anyway). Large counts mean the tracer saw the module
    as one opaque call (e.g. nn.MultiheadAttention) or a weight went through a wrapped function."""
    covered = {p for r in analysis.layers for p in (r.weight, r.bias) if p is not None}
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    norm_names = {n for n, m in model.named_modules() if isinstance(m, norms)}
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if name not in covered and owner not in norm_names:
            counts[owner or "<root>"] = counts.get(owner or "<root>", 0) + param.numel()
    return sorted(counts.items(), key=lambda kv: -kv[1])


def _fmt(x: float) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:.6g}" if abs(x) < 1e6 else f"{x:.4e}"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Trace a model, find its quantizable layers and price them on a hardware description.",
        epilog="examples: fxmpq analyze resnet18 --input 3x224x224 --hardware bitops --uniform w4a4\n"
               "          fxmpq analyze mobilenet_v1 --hardware bitfusion --policy policy.json\n"
               "          fxmpq analyze --model-factory mypkg.nets:build --input 1x28x28 --uniform w8a8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="torchvision model name, a fxmpq.models name (mobilenet_v1, "
                   "small_resnet, small_mobilenet) or package.module:function")
    p.add_argument("--model-factory", metavar="PKG.MOD:FN", help="a function returning the nn.Module "
                   "(instead of the positional model)")
    p.add_argument("--input", default="3x224x224", help="per-sample input shape, e.g. 3x224x224 (batch 1 is added)")
    p.add_argument("--hardware", default="bitops", help=f"shipped target ({', '.join(builtin_hardware())}) "
                   "or the path of a .toml file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--uniform", metavar="wNaM", help="every searchable layer at N-bit weights, M-bit activations")
    g.add_argument("--policy", metavar="JSON", help="a policy file written by Policy.to_json / fxmpq search")
    p.add_argument("--num-classes", type=int, default=None, help="passed to the model factory")
    p.add_argument("--no-pins", action="store_true", help="do not pin the first and last layer")
    p.add_argument("--leaf", action="append", default=[], metavar="QUALNAME",
                   help="keep this submodule opaque when tracing (repeatable)")
    return p


@held_warnings
def main(argv: Sequence[str] | None = None, *, prog: str = "fxmpq analyze", label: str | None = "fxmpq analyze") -> int:
    """Run the subcommand; exit status 0, 2 for bad input, 1 when the model cannot be analysed; one line on stderr
    ("<label>: error: ...") on failure."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        spec = args.model_factory or args.model
        if spec is None:
            raise ArgumentError("give a model name (positional) or --model-factory package.module:function")
        if args.model_factory and args.model:
            raise ArgumentError("give either a positional model or --model-factory, not both")
        check_count(args.num_classes, "--num-classes")
        shape = parse_input_size(args.input)
        hw = load_hardware(args.hardware)
        uniform = parse_uniform(args.uniform) if args.uniform else None
        policy = Policy.from_json(args.policy) if args.policy else None
        model = build_model(spec, args.num_classes).eval()
    except FxmpqError as e:
        return fail(e, EXIT_BAD_INPUT, prog=label)

    pins = Pins(first_layer=False, last_layer=False, w_bits=hw.pins.w_bits, a_bits=hw.pins.a_bits,
                layers=hw.pins.layers) if args.no_pins else None
    try:
        with torch.no_grad():
            analysis = analyze(model, torch.randn(*shape), hardware=hw, pins=pins, leaf_modules=args.leaf)
        if uniform is not None:
            policy = Policy.uniform(analysis, *uniform)
        if policy is not None:
            policy = policy.complete(analysis)
    except PolicyError as e:
        return fail(e, EXIT_BAD_INPUT, prog=label)
    except FxmpqError as e:
        return fail(e, EXIT_FAILED, prog=label)

    total_params = sum(q.numel() for q in model.parameters())
    layer_params = sum(m.params for m in analysis.layers)
    print(f"model     {spec}  input {'x'.join(map(str, shape))}  ({len(analysis.layers)} quantizable layers, "
          f"{len(analysis.searchable)} searchable)")
    full_grid = len(hw.pairs) == len(hw.weight_bits) * len(hw.act_bits)
    pairs = (f"W{{{','.join(map(str, hw.weight_bits))}}} x A{{{','.join(map(str, hw.act_bits))}}}" if full_grid
             else ", ".join(f"W{w}A{a}" for w, a in hw.pairs))
    print(f"hardware  {hw.name}  ({hw.path}); pairs {pairs}")
    print(f"policy    {('uniform ' + args.uniform.upper()) if uniform else (args.policy or 'none (bits shown for pinned layers only)')}")
    print()
    print(analysis.table(policy))
    print()
    print(f"MACs      {sum(m.macs for m in analysis.layers):,} in quantizable layers")
    print(f"params    {layer_params:,} of {total_params:,} in quantizable layers "
          f"({100 * layer_params / max(total_params, 1):.1f}%)")
    missing = uncovered_parameters(model, analysis)
    if sum(c for _, c in missing) > 0.01 * total_params:
        shown = ", ".join(f"{n} ({c:,})" for n, c in missing[:5])
        print(f"          not quantized (not Conv1d/Conv2d/Linear calls in the traced graph): {shown}"
              + (f", ... {len(missing) - 5} more" if len(missing) > 5 else ""))
    if policy is not None:
        w_avg, a_avg = policy.average_bits(analysis)
        print(f"average   W{w_avg:.2f} A{a_avg:.2f} over searchable layers (params-/MAC-weighted)")
        cost, fp32 = analysis.cost(policy), analysis.fp32_cost()
        print()
        print("metric      total          unit      fp32 / this")
        for name, metric in hw.metrics.items():
            ratio = fp32[name] / cost[name] if cost[name] and not math.isnan(fp32[name]) else float("nan")
            print(f"{name:<11} {_fmt(cost[name]):<14} {metric.unit:<9} "
                  f"{'x' + format(ratio, '.2f') if not math.isnan(ratio) else 'n/a (table metric)'}")
    return 0

