"""`fxmpq train-indicators`: joint indicator training, on one process or many (torchrun, DDP).

    fxmpq train-indicators small_resnet --dataset fashion-mnist --epochs 1 --out runs/ind
    torchrun --nproc_per_node=4 -m fxmpq train-indicators resnet18 --model-kwargs '{"num_classes": 10}' \\
        --dataset mypkg.data:train_set --input 3x32x32 --weights fp32.pt --epochs 2 --out runs/ind

Under torchrun every process runs this command: it joins the process group (NCCL when CUDA is there, gloo
otherwise), each rank trains on its shard (DistributedSampler) and rank 0 writes `<out>/indicators.json`,
which `fxmpq search --indicators` reads. `<out>/indicators.ckpt` is written every --checkpoint-every steps and
after every epoch; a re-run resumes from it (and `fxmpq finetune --joint <out>` starts fine-tuning from it).
`--weights` is a state_dict of the FP32 model (torch.load(weights_only=True)); start from a trained model, as the
paper does.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..core.devices import as_device
from ..core.options import CHECKPOINT_EVERY, TrainOptions
from ..errors import FxmpqError
from ..hardware.spec import load_hardware
from ..models import build_model, parse_model_kwargs
from ..stages import prepare
from ..train.trainings import train_indicators
from . import Parser, check_count, check_output, fail, held_warnings, parse_shape
from .data import DATASET_HELP, load_dataset, load_weights, parse_bits, sample_shape

__all__ = ["build_parser", "main", "parse_bits", "run"]

DEFAULT_BITS = "2,3,4,5,6"


def _init_distributed() -> torch.device | None:
    """Join torchrun's process group when launched by it; the device this rank trains on (None: single process)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def run(args: argparse.Namespace) -> int:
    """Check every option, then train; FxmpqError on bad input (before any training) or a failed run."""
    for option, value, least in (("--samples", args.samples, 1), ("--batch-size", args.batch_size, 1),
                                 ("--epochs", args.epochs, 0), ("--max-steps", args.max_steps, 0),
                                 ("--checkpoint-every", args.checkpoint_every, 1)):
        check_count(value, option, least=least)
    out = check_output(args.out, "--out", directory=True)
    kwargs = parse_model_kwargs(args.model_kwargs)
    bits = parse_bits(args.bits)
    given = parse_shape(args.input) if args.input else None
    hw = load_hardware(args.hardware)
    device = as_device(args.device, "--device") if args.device else None
    model = build_model(args.model, kwargs)
    if args.weights:
        load_weights(model, args.weights, args.model)
    data = load_dataset(args.dataset, args.samples, val_limit=0)
    shape = sample_shape(data, given)
    device = _init_distributed() or device
    q = prepare(model, torch.randn(2, *shape), hardware=hw, bits=bits, per_channel=args.per_channel)
    ckpt = out / "indicators.ckpt"
    train = TrainOptions(
        indicator_epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        max_steps=args.max_steps,
        model_factory=args.model,
        model_kwargs=kwargs,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )
    ind = train_indicators(q, data.train, train, checkpoint=ckpt, resume=ckpt.is_file())
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        ind.to_json(out / "indicators.json")
        print(ind.table())
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"indicators of {len(ind.layers)} layers at bits {list(ind.bits)} written to "
              f"{out / 'indicators.json'} ({world} process{'es' if world > 1 else ''})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    doc = __doc__.splitlines()
    ap = Parser(prog=prog, description=doc[0].split(": ", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n" + "\n".join(doc[2:5]))
    ap.add_argument("model", help="torchvision model name, a fxmpq.models name or package.module:function")
    ap.add_argument("--model-kwargs", default="", help='JSON keyword arguments for the model, e.g. \'{"num_classes": 10}\'')
    ap.add_argument("--weights", help="FP32 state_dict to start from (.pt, loaded with weights_only=True)")
    ap.add_argument("--dataset", default="auto", help=DATASET_HELP)
    ap.add_argument("--input", help="per-sample input shape such as 3x32x32 (needed for a user's dataset)")
    ap.add_argument("--samples", type=int, help="train on the first N samples only")
    ap.add_argument("--hardware", default="bitops", help="shipped hardware name or path to a .toml")
    ap.add_argument("--bits", default=DEFAULT_BITS, help=f"candidate bit-widths (default {DEFAULT_BITS})")
    ap.add_argument("--per-channel", action="store_true", help="per-output-channel weight step sizes")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cuda, cuda:1, cpu (single process; torchrun picks LOCAL_RANK's GPU)")
    ap.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                    help="also checkpoint every N optimizer steps (default %(default)s; a kill loses at most N)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--out", required=True, help="folder for indicators.json and indicators.ckpt")
    return ap


@held_warnings
def main(argv: Sequence[str] | None = None, *, prog: str = "fxmpq train-indicators",
         label: str | None = "fxmpq train-indicators") -> int:
    """Run the subcommand; exit status 0, or 2 with one line on stderr ("<label>: error: ...")."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except FxmpqError as e:
        return fail(e, 2, prog=label)
