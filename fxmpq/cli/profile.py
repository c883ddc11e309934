"""`fxmpq profile`: measure a model's layers in ONNX Runtime (CPU) and write a hardware file whose `latency`
predicts the model.

    fxmpq profile MODEL --input CxHxW [--batch B] [--threads N] [--repeats R] --out FILE.toml

MODEL is a torchvision name, a fxmpq.models name or package.module:function (with --model-kwargs JSON). Every
quantizable layer is exported alone by fxmpq (W8A8, which ONNX Runtime fuses to QLinearConv; W8A16, uint16 Q/DQ
around a float conv; float; weight-only 2/4/8-bit MatMulNBits for linear layers; W4A8 packed, widened; an
attention matmul as a two-input model, W8A8 being MatMulIntegerToFloat) and timed
with the model's real shapes, `R` repeats after warm-up (median), `N` intra-op threads, one inter-op thread,
sequential execution; so is every pair of layers run back to back, in each combination of formats (their
`chain`: what the conversions between them cost run together rather than alone); the whole model in float and at
W8A8 too (the rest of the model, and a check). The file has
the metrics `latency` (ms, the whole model at that batch and thread count), `bytes` (the layers' weight bytes
in the ONNX file) and `packed_bytes` (the same with storage="packed"), per-layer `layer_table` terms keyed by layer name and shapes (a file is refused for another
model or input), and a [provenance] table. See docs/hardware.md, "Measured targets". Exit 0 on success, 2 for bad
arguments, 1 when profiling fails.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import models
from ..core.atomic import atomic_write_text
from ..core.tables import render
from ..errors import ArgumentError, FxmpqError, ModelSpecError
from ..hardware.formats import format_name
from ..hardware.spec import FLOAT, load_hardware
from ..profiling.bundle import export_workers
from ..profiling.profile import HardwareProfile, profile_model
from . import Parser, check_output, fail, held_warnings, parse_shape

__all__ = ["build_parser", "main"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    doc = __doc__.splitlines()
    ap = Parser(prog=prog, description=" ".join(doc[:2]).split(": ", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(doc[3:4]))
    ap.add_argument("model", help="torchvision name, fxmpq.models name, or package.module:function")
    ap.add_argument("--model-kwargs", help="JSON keyword arguments for the model factory")
    ap.add_argument("--input", required=True, help="per-sample input shape, e.g. 3x224x224")
    ap.add_argument("--batch", type=int, default=1, help="batch size to time at (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per model after warm-up (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs per model first (default 3)")
    ap.add_argument("--name", help="the target's name in the file (default: the --out file's name without .toml)")
    ap.add_argument("--keep", type=Path, help="keep the exported ONNX files in this directory")
    ap.add_argument("--out", type=Path, required=True, help="hardware TOML file to write")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


@held_warnings
def main(argv: Sequence[str] | None = None, *, prog: str = "fxmpq profile", label: str | None = "fxmpq profile") -> int:
    """Run the subcommand; exit status 0, 2 for bad arguments, 1 when profiling fails; one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        shape = parse_shape(args.input)
        for opt in ("batch", "threads", "repeats"):
            if getattr(args, opt) < 1:
                raise ArgumentError(f"--{opt} {getattr(args, opt)}: expected a positive integer")
        if args.warmup < 0:
            raise ArgumentError(f"--warmup {args.warmup}: expected an integer >= 0")
        check_output(args.out, "--out")
        model = models.build_model(args.model, models.parse_model_kwargs(args.model_kwargs)).eval()
    except (ArgumentError, ModelSpecError) as e:
        return fail(e, 2, prog=label)
    if args.repeats < 20:
        print(f"warning: --repeats {args.repeats} is below 20: medians will be noisy", file=sys.stderr)
    try:
        torch.manual_seed(0)
        example = torch.randn(args.batch, *shape)
        prof = profile_model(model, example, model_name=args.model, threads=args.threads, repeats=args.repeats,
                             warmup=args.warmup, progress=not args.quiet, work_dir=args.keep,
                             command=" ".join([ap.prog, *map(shlex.quote, argv)]))
        prof.name = args.name or args.out.stem
        text = prof.to_toml()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
        load_hardware(args.out)  # the file we wrote parses under the strict schema
    except (ArgumentError, ModelSpecError) as e:
        return fail(e, 2, prog=label)
    except FxmpqError as e:
        return fail(e, 1, prog=label)
    _print_summary(prof, args.out)
    return 0


def _print_summary(prof: HardwareProfile, out: Path) -> None:
    """The per-layer times, the whole model's, the chains' and the rest of the model's."""
    fmts = list(dict.fromkeys(f for lp in prof.layers for f in lp.measured_ms))  # linear layers have more
    rows = [[lp.name, lp.signature.kind.value,
             *(f"{prof.latency(lp.name, f):.4f}" if f in lp.measured_ms else "" for f in fmts),
             *(f"{100 * lp.spread[f]:.0f} %" if f in lp.spread else "" for f in fmts)] for lp in prof.layers]
    print(render(["layer", "kind", *(f"{format_name(f)} ms" for f in fmts), *(f"{format_name(f)} p10-p90" for f in fmts)],
                 rows))
    pred_float = sum(prof.latency(lp.name, f) for lp in prof.layers for f in lp.measured_ms if f == FLOAT)
    print(f"\nwhole model ({prof.clock} clock, median of {prof.repeats}, {prof.threads} thread(s), batch {prof.batch}): "
          f"all float {prof.float_model_ms:.3f} ms, all W8A8 {prof.int8_model_ms:.3f} ms")
    print(f"layers back to back (chains): {sum(1 for lp in prof.layers if lp.chain_ms)} pairs, "
          + ", ".join(f"all {format_name(f)} {prof.chains(f):+.3f} ms" for f in fmts))
    print(f"rest of the model {prof.remainder_ms:.3f} ms (all float - {pred_float:.3f} ms of float layers alone - "
          f"float chains); all W8A8 from the layers alone {prof.int8_predicted_ms:.3f} ms, so W8A8 values x "
          f"{prof.int8_scale:.3f}")
    ratio = prof.packed_ratio()
    if ratio is not None:
        print(f"W4A8 packed and widened (fxmpq.ort_session) alone / W8A8 alone: median {ratio:.3f}x (the same kernel)")
    if prof.wall_s:
        print(f"time: {sum(prof.wall_s.values()):.1f} s = " + ", ".join(f"{k} {v:.1f} s" for k, v in prof.wall_s.items())
              + f" ({len(prof.layers)} layers; bundles exported by up to {export_workers()} processes at once, "
              f"FXMPQ_EXPORT_WORKERS)")
    print(f"wrote {out}")
