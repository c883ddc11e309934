"""`fxmpq finetune`: apply a policy JSON (from `fxmpq search`) to a model and fine-tune it with LSQ.

    fxmpq finetune small_resnet --policy runs/ind/policy.json --dataset digits --joint runs/ind --out runs/ft
    fxmpq lower runs/ft --out runs/ft/model.onnx

The link between `fxmpq search` and `fxmpq lower`: the model (with --weights, its FP32 state_dict) is prepared with
the candidate bits, started from the joint indicator training's state when --joint names its indicators.ckpt (or
the folder holding it; as `fxmpq quantize` does), fixed at the policy (output quantizers initialised on training
data), and fine-tuned (distilled from the FP32 model unless --no-distill, cosine learning rate). `<out>/finetune.pt`
is written every --checkpoint-every steps and after every epoch; a re-run resumes from it, and `fxmpq lower <out>`
exports it. Exit status 0, 2 for bad input (checked before any training), 1 when training fails.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from ..core.checkpoint import load_checkpoint
from ..core.devices import as_device
from ..core.options import CHECKPOINT_EVERY, TrainOptions
from ..core.workdir import FINETUNE_CKPT, FP32_WEIGHTS, INDICATORS_CKPT, POLICY_JSON
from ..cost.policy import Policy
from ..errors import CheckpointError, FxmpqError
from ..hardware.spec import load_hardware
from ..models import build_model, parse_model_kwargs
from ..pipeline import accuracy
from ..stages import apply_policy, prepare
from ..train.train_state import Stage, restore_model_state
from ..train.trainings import finetune
from . import Parser, check_count, check_output, fail, held_warnings, parse_shape
from .data import DATASET_HELP, example_batch, load_dataset, load_weights, loader, parse_bits, sample_shape
from .train_indicators import DEFAULT_BITS

__all__ = ["build_parser", "main"]


def joint_checkpoint(path: str) -> tuple[Path, dict]:
    """(the indicators.ckpt `path` names, directly or as its folder; its metadata); CheckpointError otherwise."""
    p = Path(path)
    ckpt = p / INDICATORS_CKPT if p.is_dir() else p
    if not ckpt.is_file():
        where = f"folder {p} holds no {INDICATORS_CKPT}" if p.is_dir() else "no such file"
        raise CheckpointError(f"--joint {path}: {where} (give the indicators.ckpt that fxmpq train-indicators --out "
                              f"or fxmpq quantize --work-dir wrote)")
    _, meta = load_checkpoint(ckpt)
    if meta.get("kind") != Stage.INDICATORS:
        raise CheckpointError(f"--joint {ckpt}: written by {meta.get('kind')!r} training, not joint indicator "
                              f"training (its indicators.ckpt)")
    return ckpt, meta


def run(args: argparse.Namespace, label: str | None) -> int:
    for option, value, least in (("--samples", args.samples, 1), ("--val-samples", args.val_samples, 0),
                                 ("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 0),
                                 ("--max-steps", args.max_steps, 0), ("--checkpoint-every", args.checkpoint_every, 1)):
        check_count(value, option, least=least)
    out = check_output(args.out, "--out", directory=True)
    kwargs = parse_model_kwargs(args.model_kwargs)
    policy = Policy.from_json(args.policy)
    given = parse_shape(args.input) if args.input else None
    hw = load_hardware(args.hardware)
    device = as_device(args.device, "--device") if args.device else None
    joint, meta = joint_checkpoint(args.joint) if args.joint else (None, {})
    bits = parse_bits(args.bits) if args.bits else tuple(meta.get("bits") or parse_bits(DEFAULT_BITS))
    act_bits = tuple(meta["act_bits"]) if meta.get("act_bits") and not args.bits else None
    model = build_model(args.model, kwargs)
    weights = args.weights
    if not weights and joint is not None and (joint.parent / FP32_WEIGHTS).is_file():
        weights = str(joint.parent / FP32_WEIGHTS)  # the FP32 weights `fxmpq quantize --fp32-epochs` kept there
        print(f"FP32 weights from {weights} (beside --joint)")
    if weights:
        load_weights(model, weights, args.model)
    distill = not args.no_distill
    if distill and not weights:
        print("note: no FP32 weights (--weights, or fp32.pt beside --joint): fine-tuning on the labels; distilling "
              "from the model's initial weights would teach it nothing")
        distill = False
    data = load_dataset(args.dataset, args.samples, val_limit=args.val_samples)
    shape = sample_shape(data, given)
    example, calibration = example_batch(data, shape, 1), example_batch(data, shape, 64)
    model.eval()
    teacher = copy.deepcopy(model) if distill else None
    q = prepare(model, example, hardware=hw, bits=bits, per_channel=args.per_channel, act_bits=act_bits)
    if joint is not None:
        restore_model_state(q, joint, Stage.INDICATORS)
        q.disable_quant()
        print(f"starting from the joint-training state in {joint}")
    apply_policy(q, policy.complete(q.analysis), calibration)
    val = loader(data.val, 256, shuffle=False) if data.val is not None and len(data.val) else None
    before = accuracy(q, val, device=device) if val is not None else None

    ckpt = out / FINETUNE_CKPT
    try:
        train = TrainOptions(
            finetune_epochs=args.epochs,
            lr=args.lr,
            seed=args.seed,
            device=device,
            max_steps=args.max_steps,
            progress=not args.quiet,
            batch_size=args.batch_size,
            model_factory=args.model,
            model_kwargs=kwargs,
            checkpoint_every=args.checkpoint_every,
        )
        finetune(q, data.train, train, distill_from=teacher, checkpoint=ckpt, resume=ckpt.is_file())
    except FxmpqError as e:  # the options were fine: the run failed
        return fail(e, 1, prog=label)
    q.eval()
    q.policy.to_json(out / POLICY_JSON)
    w, a = q.policy.average_bits(q.analysis)
    print(f"policy from {args.policy}: {len(q.policy)} layers, average W{w:.2f} A{a:.2f} (searchable layers); "
          f"in full (pinned layers too) in {out / POLICY_JSON}")
    if val is not None and before is not None:
        after = accuracy(q, val, device=device)
        print(f"top-1 on {len(data.val)} held-out {data.name} samples: {100 * before:.2f} % with the policy applied, "
              f"{100 * after:.2f} % after fine-tuning")
    print(f"checkpoint {ckpt}; export it with: fxmpq lower {out} --out {out / 'model.onnx'}")
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    doc = __doc__.splitlines()
    ap = Parser(prog=prog, description=doc[0].split(": ", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n" + "\n".join(doc[2:4]) + "\n\n" + "\n".join(doc[5:]))
    ap.add_argument("model", help="torchvision model name, a fxmpq.models name or package.module:function")
    ap.add_argument("--policy", required=True, help="policy JSON (fxmpq search --out)")
    ap.add_argument("--out", required=True, help="folder for finetune.pt and policy.json")
    ap.add_argument("--model-kwargs", default="", help='JSON keyword arguments for the model, e.g. \'{"num_classes": 10}\'')
    ap.add_argument("--weights", help="FP32 state_dict to start from (.pt, loaded with weights_only=True)")
    ap.add_argument("--joint", metavar="CKPT_OR_DIR", help="start from joint indicator training's state: its "
                    "indicators.ckpt or the folder holding it (its candidate bits are used)")
    ap.add_argument("--dataset", default="auto", help=DATASET_HELP)
    ap.add_argument("--input", help="per-sample input shape such as 3x32x32 (needed for a user's dataset)")
    ap.add_argument("--samples", type=int, help="train on the first N samples only")
    ap.add_argument("--val-samples", type=int, help="held-out samples for the accuracy check (shipped datasets; "
                    "default all, 0: none)")
    ap.add_argument("--hardware", default="bitops", help="shipped hardware name or path to a .toml")
    ap.add_argument("--bits", help=f"candidate bit-widths (default: --joint's, else {DEFAULT_BITS})")
    ap.add_argument("--per-channel", action="store_true", help="per-output-channel weight step sizes")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cuda, cuda:1, cpu")
    ap.add_argument("--no-distill", action="store_true", help="cross-entropy on the labels instead of distilling "
                    "from the FP32 model")
    ap.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                    help="also checkpoint every N optimizer steps (default %(default)s)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


@held_warnings
def main(argv: Sequence[str] | None = None, *, prog: str = "fxmpq finetune", label: str | None = "fxmpq finetune") -> int:
    """Run the subcommand; exit status 0, 2 for bad input, 1 when training fails; one line on stderr."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args, label)
    except FxmpqError as e:
        return fail(e, 2, prog=label)
