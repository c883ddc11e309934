"""`fxmpq lower`: a quantized checkpoint written by fxmpq to a QDQ ONNX model, with its parity report.

    fxmpq lower CHECKPOINT_OR_WORKDIR --out model.onnx [--model pkg.mod:factory] [--model-kwargs JSON]
        [--input 1x3x224x224] [--repeats 20] [--threads N] [--no-measure] [--storage int8|packed]

The checkpoint is self-describing (model factory, input shape, candidate bits, hardware, policy, weights) and is
loaded with torch.load(weights_only=True); fxmpq.train.restore.load_quantized rebuilds the model. Exit status 0 when the
ONNX model was written and matches PyTorch; otherwise 1 with the reason on one line (2 for a bad option, a missing,
corrupt or foreign checkpoint, or an indicator-training one: lower the fine-tuning checkpoint). A model that fails the
check does not replace --out; it is kept beside it as <name>.failed.onnx. The report includes the latency audit:
the exported model's median latency in ONNX Runtime (threads and batch stated) next to the hardware file's
prediction, and per layer the kernel ORT ran, its time, and whether it ran as priced. `--storage packed` stores
weights of at most 4 bits as INT4 initializers (the file follows the policy's size; open it with fxmpq.ort_session
to run integer kernels).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .. import models
from ..core.options import LowerOptions
from ..errors import ArgumentError, CheckpointError, FxmpqError
from ..export.lower import export_fp32, lower
from ..quant.storage import as_storage
from ..train.restore import load_quantized
from . import Parser, check_count, check_output, fail, held_warnings, parse_shape

__all__ = ["build_parser", "main"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = Parser(prog=prog, description=__doc__.splitlines()[0].split(": ", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:4]))
    ap.add_argument("checkpoint", type=Path, help="checkpoint file or work directory written by fxmpq")
    ap.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    ap.add_argument("--model", help="model factory 'package.module:function' (overrides the checkpoint's)")
    ap.add_argument("--model-kwargs", help="JSON keyword arguments for the factory (overrides the checkpoint's)")
    ap.add_argument("--input", help="input shape such as 1x3x224x224 (overrides the checkpoint's)")
    ap.add_argument("--samples", type=int, default=64, help="random inputs for the parity check (default 64)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs of the exported model (default 20)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads for the timing (default: the hardware "
                    "file's, else 1)")
    ap.add_argument("--no-measure", action="store_true", help="skip the latency audit")
    ap.add_argument("--storage", default="int8", help="weight containers: int8 (default, fused by ONNX Runtime "
                    "as stored) or packed (<= 4-bit weights as INT4; open with fxmpq.ort_session)")
    ap.add_argument("--strict", action="store_true", help="pass only when ONNX Runtime is within one output step "
                    "of PyTorch end to end (default: also pass as faithful when every stage is within one step and "
                    "ONNX Runtime's spread is within the model's own noise floor; docs/export.md)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


@held_warnings
def main(argv: Sequence[str] | None = None, *, prog: str = "fxmpq lower", label: str | None = "fxmpq lower") -> int:
    """Run the subcommand; exit status 0 (written and checked), 1 (failed), 2 (bad input); one line on stderr."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        check_count(args.samples, "--samples")
        check_count(args.repeats, "--repeats")
        check_count(args.threads, "--threads")
        check_output(args.out, "--out")
        storage = as_storage(args.storage, "--storage")
        shape = parse_shape(args.input, batch=True) if args.input else None
        kwargs = models.parse_model_kwargs(args.model_kwargs) if args.model_kwargs else None
        q, example, factory = load_quantized(args.checkpoint, args.model, shape, kwargs)
        rep = lower(
            q,
            args.out,
            example,
            LowerOptions(
                samples=args.samples,
                measure=not args.no_measure,
                repeats=args.repeats,
                threads=args.threads,
                storage=storage,
                strict=args.strict,
            ),
        )
        print(rep.table())
        if rep.layer_timings:
            print(rep.layer_table())
        with tempfile.TemporaryDirectory() as d:
            fp = export_fp32(factory(), Path(d) / "fp32.onnx", example)
            fp_bytes = fp.stat().st_size
        print(f"size           {rep.onnx_bytes / 1e6:.3f} MB vs FP32 ONNX {fp_bytes / 1e6:.3f} MB "
              f"({fp_bytes / rep.onnx_bytes:.2f}x smaller; packed {rep.packed_weight_bytes / 1e6:.3f} MB "
              f"at the policy's bit-widths)")
    except (CheckpointError, ArgumentError) as e:
        return fail(e, 2, prog=label)
    except FxmpqError as e:
        return fail(e, 1, prog=label)
    return 0
