"""Joint indicator training from the command line, on one process or many (torchrun, DDP).

    python tools/train_indicators.py small_resnet --dataset fashion-mnist --epochs 1 --out runs/ind
    torchrun --nproc_per_node=4 tools/train_indicators.py resnet18 --model-kwargs '{"num_classes": 10}' \
        --dataset mypkg.data:train_set --input 3x32x32 --weights fp32.pt --epochs 2 --out runs/ind

Under torchrun every process runs this script: it joins the process group (NCCL when CUDA is there, gloo
otherwise), each rank trains on its shard (DistributedSampler) and rank 0 writes `<out>/indicators.json`,
which `tools/search.py --indicators` reads. `<out>/indicators.ckpt` is written after every epoch; a re-run
resumes from it. `--weights` is a state_dict of the FP32 model (torch.load(weights_only=True)); start from a
trained model, as the paper does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import fxmpq
from fxmpq.cli import parse_shape
from fxmpq.datasets import load_digits, load_fashion_mnist, load_small
from fxmpq.errors import DataError, ModelSpecError
from fxmpq.models import build_model, parse_model_kwargs, resolve_factory


def load_dataset(spec: str, limit: int | None) -> tuple[torch.utils.data.Dataset, tuple[int, ...] | None]:
    """(training Dataset, per-sample shape or None): a shipped dataset by name or a "pkg.mod:fn" returning one."""
    if spec in ("auto", "fashion-mnist", "digits"):
        data = {"auto": load_small, "fashion-mnist": load_fashion_mnist, "digits": load_digits}[spec]()
        n = len(data.train_y) if limit is None else min(limit, len(data.train_y))
        return torch.utils.data.TensorDataset(data.train_x[:n], data.train_y[:n]), data.input_shape
    try:
        dataset = resolve_factory(spec)()
    except ModelSpecError as e:
        raise DataError(f"--dataset: {str(e).replace('model ', 'dataset ', 1)}") from None
    if not isinstance(dataset, torch.utils.data.Dataset):
        raise DataError(f"--dataset {spec!r} returned {type(dataset).__name__}, not a torch Dataset")
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return dataset, None


def parse_bits(text: str) -> tuple[int, ...]:
    """"2,3,4,5,6" -> (2, 3, 4, 5, 6)."""
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise fxmpq.FxmpqError(f"--bits {text!r}: expected comma-separated integers such as 2,3,4,5,6") from None
    return bits


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
    kwargs = parse_model_kwargs(args.model_kwargs)
    bits = parse_bits(args.bits)
    model = build_model(args.model, kwargs)
    if args.weights:
        try:
            state: Any = torch.load(args.weights, map_location="cpu", weights_only=True)
        except Exception as e:  # missing, corrupt, or holding more than tensors: one line, naming the file
            raise fxmpq.CheckpointError(f"--weights {args.weights}: not a loadable state_dict "
                                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise fxmpq.CheckpointError(f"--weights {args.weights}: does not fit model {args.model} "
                                        f"({str(e).splitlines()[0]})") from None
    dataset, shape = load_dataset(args.dataset, args.samples)
    if args.input:
        shape = parse_shape(args.input)
    if shape is None:
        raise DataError(f"--dataset {args.dataset!r} is the user's: give the per-sample shape with --input")
    device = _init_distributed()
    if device is None and args.device:
        device = torch.device(args.device)
    q = fxmpq.prepare(model, torch.randn(2, *shape), hardware=args.hardware, bits=bits,
                      per_channel=args.per_channel)
    out = Path(args.out)
    ckpt = out / "indicators.ckpt"
    ind = fxmpq.train_indicators(q, dataset, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 seed=args.seed, device=device, checkpoint=ckpt, resume=ckpt.is_file(),
                                 max_steps=args.max_steps, model_factory=args.model, model_kwargs=kwargs)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:5]))
    ap.add_argument("model", help="torchvision model name, a fxmpq.models name or package.module:function")
    ap.add_argument("--model-kwargs", default="", help='JSON keyword arguments for the model, e.g. \'{"num_classes": 10}\'')
    ap.add_argument("--weights", help="FP32 state_dict to start from (.pt, loaded with weights_only=True)")
    ap.add_argument("--dataset", default="auto", help="fashion-mnist, digits, auto (Fashion-MNIST when installed, "
                    "else digits) or package.module:function returning a torch Dataset of (input, label)")
    ap.add_argument("--input", help="per-sample input shape such as 3x32x32 (needed for a user's dataset)")
    ap.add_argument("--samples", type=int, help="train on the first N samples only")
    ap.add_argument("--hardware", default="bitops", help="shipped hardware name or path to a .toml")
    ap.add_argument("--bits", default="2,3,4,5,6", help="candidate bit-widths (default 2,3,4,5,6)")
    ap.add_argument("--per-channel", action="store_true", help="per-output-channel weight step sizes")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cuda, cuda:1, cpu (single process; torchrun picks LOCAL_RANK's GPU)")
    ap.add_argument("--out", required=True, help="folder for indicators.json and indicators.ckpt")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except fxmpq.FxmpqError as e:
        print(f"train_indicators.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
