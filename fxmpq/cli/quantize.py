"""`fxmpq quantize`: the whole method on a model and a dataset under a budget, resumable from its work directory.

    fxmpq quantize small_mobilenet --dataset digits --input 1x16x16 --budget w3a3 --work-dir runs/q --fp32-epochs 3
    fxmpq lower runs/q --out runs/q/model.onnx

fxmpq.quantize top to bottom: prepare (trace, cost analysis, fake quantizers), joint indicator training, the ILP
search under --budget, up to --verify candidate policies measured on the validation data with the jointly trained
model (the most accurate kept), the policy applied and fine-tuned with LSQ, the export to <work-dir>/model.onnx
and its audit (parity in ONNX Runtime, integer kernels, measured latency). --budget "drop<=1%" instead asks for
the cheapest policy (in --minimize, default the hardware's first metric) whose top-1 is at most 1 percentage point
below FP32: the Pareto front and the uniform policies are measured from the cheapest up. The validation data is
the dataset's test split, or --val-fraction F of the training samples. Every artefact lands in --work-dir
(indicators.json, candidates.json, policy.json, checkpoints, plots, summary.json, audit.json) and a re-run resumes
from what is there (a run killed anywhere ends where the uninterrupted one would). Start from trained FP32 weights: --weights
(a state_dict), or --fp32-epochs N trains the model first (kept as <work-dir>/fp32.pt). Exit status 0, 2 for bad
input (checked before any training), 1 when a stage fails or the export does not match PyTorch.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
from torch.utils.data import Subset

from ..core.devices import as_device
from ..core.options import (
    CHECKPOINT_EVERY,
    INDICATOR_SOURCES,
    JOINT_PASSES,
    QuantOptions,
    SearchOptions,
    TrainOptions,
)
from ..errors import ArgumentError, BudgetError, CheckpointError, DataError, FxmpqError, IndicatorError
from ..hardware.spec import load_hardware
from ..models import build_model, parse_model_kwargs
from ..pipeline import quantize
from ..policy_search.candidates import DEFAULT_COUNT
from ..policy_search.targets import check_goal, parse_goal
from . import Parser, check_count, check_output, fail, held_warnings, parse_shape
from .data import (
    DATASET_HELP,
    example_batch,
    hold_out,
    load_dataset,
    load_weights,
    loader,
    parse_bits,
    sample_shape,
)
from .fp32 import FP32_WEIGHTS, pretrained

__all__ = ["build_parser", "main"]


def run(args: argparse.Namespace, label: str | None) -> int:
    for option, value, least in (("--samples", args.samples, 1), ("--indicator-samples", args.indicator_samples, 1),
                                 ("--val-samples", args.val_samples, 0), ("--batch-size", args.batch_size, 1),
                                 ("--fp32-epochs", args.fp32_epochs, 0), ("--indicator-epochs", args.indicator_epochs, 0),
                                 ("--finetune-epochs", args.finetune_epochs, 0), ("--max-steps", args.max_steps, 0),
                                 ("--checkpoint-every", args.checkpoint_every, 1)):
        check_count(value, option, least=least)
    check_count(args.verify, "--verify", least=0)
    check_count(args.verify_batches, "--verify-batches", least=1)
    if args.val_fraction is not None:
        if not 0 < args.val_fraction < 1:
            raise ArgumentError(f"--val-fraction {args.val_fraction}: expected a fraction between 0 and 1 such as 0.1")
        if args.val_samples is not None:
            raise ArgumentError("--val-samples limits the dataset's test split, which --val-fraction replaces; give "
                                "one of them")
    wd = check_output(args.work_dir, "--work-dir", directory=True)
    goal = parse_goal(args.budget)
    kwargs = parse_model_kwargs(args.model_kwargs)
    bits = parse_bits(args.bits) if args.bits else None
    given = parse_shape(args.input) if args.input else None
    hw = load_hardware(args.hardware)
    if args.minimize is not None and goal.max_drop is None:
        raise ArgumentError(f"--minimize {args.minimize}: goes with an accuracy target such as --budget 'drop<=1%' "
                            f"(the cheapest policy within it); --budget {args.budget} is a cost limit")
    if args.minimize is not None and args.minimize not in hw.metrics:
        raise BudgetError(f"--minimize {args.minimize}: not a metric of hardware {hw.name!r}; its metrics: "
                          f"{', '.join(hw.metrics)}")
    verify = args.verify if args.verify is not None else (DEFAULT_COUNT if goal.max_drop is not None else 0)
    if goal.max_drop is not None and not verify:
        raise ArgumentError(f"--budget {args.budget}: an accuracy target is met by measuring candidate policies on "
                            f"the validation data, which --verify 0 turns off; give --verify N (N >= 1)")
    device = as_device(args.device, "--device") if args.device else None
    torch.manual_seed(args.seed)  # the initial weights depend on --seed alone: two fresh runs train one FP32 model
    model = build_model(args.model, kwargs)
    if args.weights:
        load_weights(model, args.weights, args.model)
    data = load_dataset(args.dataset, args.samples, val_limit=args.val_samples)
    if args.val_fraction is not None:
        data = hold_out(data, args.val_fraction, seed=args.seed)
    shape = sample_shape(data, given)
    example = example_batch(data, shape, 1)
    train = loader(data.train, args.batch_size, seed=args.seed)
    ind_train = None
    if args.indicator_samples is not None and args.val_fraction is not None:  # never the held-out samples
        ind_train = loader(Subset(data.train, range(min(args.indicator_samples, len(data.train)))), args.batch_size,
                           seed=args.seed + 1)
    elif args.indicator_samples is not None:
        ind_data = load_dataset(args.dataset, args.indicator_samples, val_limit=0)
        ind_train = loader(ind_data.train, args.batch_size, seed=args.seed + 1)
    val = loader(data.val, 256, shuffle=False) if data.val is not None and len(data.val) else None
    if goal.max_drop is not None and val is None:
        raise ArgumentError(f"--budget {args.budget}: the drop is measured against the FP32 model's top-1 on "
                            f"validation data, and --dataset {args.dataset} has none; hold some out with "
                            f"--val-fraction F (e.g. 0.1 of the training samples)")
    check_goal(goal, hw, minimize=args.minimize, has_val=val is not None, verify=verify)

    try:
        if args.fp32_epochs or (wd / FP32_WEIGHTS).is_file():
            wd.mkdir(parents=True, exist_ok=True)
            model = pretrained(model, args.model, data.train, wd / FP32_WEIGHTS, epochs=args.fp32_epochs,
                               batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
        elif not args.weights:
            print(f"note: {args.model} starts from its initial weights; give --weights FP32.pt (a trained "
                  f"state_dict) or --fp32-epochs N")
        r = quantize(model.eval(), goal.budget if goal.max_drop is None else args.budget, train, example, hardware=hw,
                     val_data=val, work_dir=wd, export=not args.no_export,
                     quant=QuantOptions(bits=bits, per_channel=args.per_channel),
                     search=SearchOptions(alpha=args.alpha, verify=verify, verify_batches=args.verify_batches,
                                          minimize=args.minimize, indicators=args.indicators),
                     train=TrainOptions(indicator_epochs=args.indicator_epochs, finetune_epochs=args.finetune_epochs,
                                        lr=args.lr, finetune_lr=args.finetune_lr, distill=not args.no_distill,
                                        max_steps=args.max_steps, seed=args.seed, device=device,
                                        progress=not args.quiet, checkpoint_every=args.checkpoint_every,
                                        indicator_data=ind_train, model_factory=args.model, model_kwargs=kwargs,
                                        joint_passes=args.joint_passes))
    except FxmpqError as e:  # a budget no policy meets, data the model refuses, ... are still bad input
        bad_input = (ArgumentError, BudgetError, CheckpointError, DataError, IndicatorError)
        return fail(e, 2 if isinstance(e, bad_input) else 1, prog=label)
    if r.candidates is not None:
        print(r.candidates.table() + "\n")
    print(r.report())
    if r.audit is not None:
        print(r.audit.table())
    print(f"work dir {wd}: fxmpq report {wd} shows this again; fxmpq lower {wd} --out {wd / 'model.onnx'} "
          f"exports the fine-tuned checkpoint")
    return 0 if r.audit is None or r.audit.passed else 1


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    doc = __doc__.splitlines()
    ap = Parser(prog=prog, description=doc[0].split(": ", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n" + "\n".join(doc[2:4]) + "\n\n" + "\n".join(doc[5:]))
    ap.add_argument("model", help="torchvision model name, a fxmpq.models name or package.module:function")
    ap.add_argument("--dataset", default="auto", help=DATASET_HELP)
    ap.add_argument("--budget", required=True, help='"w3a4" (BitOps of uniform W3A4), "c12.2" (size <= FP32/12.2), '
                    '"bitops<=9.7G", "size<=4MB", "latency<=800" (a metric of the hardware), joined with "&"; or '
                    '"drop<=1%%" (top-1 at most 1 percentage point below FP32 on the validation data, the cheapest '
                    'in --minimize), alone or with cost limits ("drop<=1%%&c8")')
    ap.add_argument("--minimize", help="with a drop<= budget: the hardware metric to make cheapest (default its "
                    "first, e.g. bitops)")
    ap.add_argument("--verify", type=int, help="candidate policies to measure on the validation data with the "
                    f"jointly trained model before fine-tuning, the most accurate kept (default: {DEFAULT_COUNT} for "
                    "a drop<= target, else 0: the search's optimum is fine-tuned, which measured better under a cost "
                    "budget; docs/RESULTS.md section 6)")
    ap.add_argument("--verify-batches", type=int, help="validation batches (of 256) each candidate is measured on "
                    "(default all)")
    ap.add_argument("--val-fraction", type=float, help="hold out this fraction of the training samples (seeded) as "
                    "the validation data, instead of the dataset's test split (needed for a drop<= budget on a "
                    "dataset without one)")
    ap.add_argument("--work-dir", required=True, help="folder for every artefact; a re-run resumes from it")
    ap.add_argument("--input", help="per-sample input shape such as 1x16x16 (needed for a user's dataset)")
    ap.add_argument("--model-kwargs", default="", help='JSON keyword arguments for the model, e.g. \'{"num_classes": 10}\'')
    ap.add_argument("--weights", help="FP32 state_dict to start from (.pt, loaded with weights_only=True)")
    ap.add_argument("--fp32-epochs", type=int, default=0, help="train the FP32 model this many epochs first "
                    "(kept as <work-dir>/fp32.pt; default 0)")
    ap.add_argument("--hardware", default="bitops", help="shipped hardware name or path to a .toml")
    ap.add_argument("--bits", help="candidate bit-widths such as 2,3,4,5,6 (default: the paper's 2..6 that the "
                    "hardware runs)")
    ap.add_argument("--indicator-epochs", type=int, default=1)
    ap.add_argument("--joint-passes", choices=JOINT_PASSES, default="all",
                    help="uniform passes per joint training step: every candidate bit-width (the paper's) or the "
                    "sandwich rule (highest, lowest, one between at random); default all")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, help="stop each training after this many optimizer steps")
    ap.add_argument("--samples", type=int, help="train on the first N samples only")
    ap.add_argument("--indicator-samples", type=int, help="indicator training on the first N samples only")
    ap.add_argument("--val-samples", type=int, help="held-out samples for accuracy (shipped datasets; default all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (default --lr)")
    ap.add_argument("--alpha", type=float, help="weight of the weight indicators against the activation ones "
                    "(default 2 for learned indicators, 1 for measured and blend)")
    ap.add_argument("--indicators", choices=INDICATOR_SOURCES,
                    help="what the search minimises: learned step sizes, loss increases or output KL measured on "
                         "the jointly trained model, or a blend of learned and measured (default: kl with "
                         "validation data, learned without)")
    ap.add_argument("--per-channel", action="store_true", help="per-output-channel weight step sizes")
    ap.add_argument("--no-distill", action="store_true", help="train on the labels instead of distilling from FP32")
    ap.add_argument("--no-export", action="store_true", help="stop after fine-tuning (export later: fxmpq lower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cuda, cuda:1, cpu")
    ap.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                    help="also checkpoint every N optimizer steps (default %(default)s)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


@held_warnings
def main(argv: Sequence[str] | None = None, *, prog: str = "fxmpq quantize", label: str | None = "fxmpq quantize") -> int:
    """Run the subcommand; exit status 0, 2 for bad input, 1 when a stage fails; one line on stderr."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args, label)
    except FxmpqError as e:
        return fail(e, 2, prog=label)
