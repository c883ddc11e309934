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
import re
import sys
from typing import Any

import torch
import torch.distributed as dist

import fxmpq
from fxmpq.checkpoint import load_tensors
from fxmpq.cli import check_count, check_output, fail, parse_shape
from fxmpq.datasets import load_digits, load_fashion_mnist, load_small
from fxmpq.devices import as_device
from fxmpq.errors import ArgumentError, CheckpointError, DataError, ModelSpecError
from fxmpq.models import build_model, parse_model_kwargs, resolve_factory
from fxmpq.train import CHECKPOINT_EVERY


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
    parts = [b.strip() for b in text.split(",")]
    if not all(re.fullmatch(r"[0-9]{1,2}", b) for b in parts):
        raise ArgumentError(f"--bits {text[:60]!r}: expected comma-separated integers such as 2,3,4,5,6")
    return tuple(sorted({int(b) for b in parts}))


def load_weights(model: torch.nn.Module, path: str, spec: str) -> None:
    """Load the FP32 state_dict at `path` into `model`; CheckpointError naming the file and, when the keys differ,
    a few of the missing and unexpected ones (and how many in all)."""
    state: Any = load_tensors(path, "not a loadable state_dict", where=f"--weights {path}")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"--weights {path}: expected a state_dict (parameter name -> tensor), found "
                              f"{type(state).__name__}")
    if isinstance(state.get("state_dict"), dict):  # {"state_dict": ...}, as many training scripts save it
        state = state["state_dict"]
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")

        parts = ([f"missing {len(missing)} key(s): {few(missing)}"] if missing else []) + (
            [f"unexpected {len(unexpected)} key(s): {few(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"--weights {path}: does not fit model {spec}: {'; '.join(parts)}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        shapes = [f"{k} {tuple(v.shape)} (model {tuple(target[k].shape)})" for k, v in state.items()
                  if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(target[k].shape)]
        detail = f"shape mismatch for {', '.join(shapes[:3])}" if shapes else " ".join(str(e).split())[:300]
        raise CheckpointError(f"--weights {path}: does not fit model {spec}: {detail}") from None


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
    for option, value, least in (("--samples", args.samples, 1), ("--batch-size", args.batch_size, 1),
                                 ("--epochs", args.epochs, 0), ("--max-steps", args.max_steps, 0),
                                 ("--checkpoint-every", args.checkpoint_every, 1)):
        check_count(value, option, least=least)
    out = check_output(args.out, "--out", directory=True)
    kwargs = parse_model_kwargs(args.model_kwargs)
    bits = parse_bits(args.bits)
    shape = parse_shape(args.input) if args.input else None
    hw = fxmpq.load_hardware(args.hardware)
    device = as_device(args.device, "--device") if args.device else None
    model = build_model(args.model, kwargs)
    if args.weights:
        load_weights(model, args.weights, args.model)
    dataset, data_shape = load_dataset(args.dataset, args.samples)
    shape = shape or data_shape
    if shape is None:
        raise DataError(f"--dataset {args.dataset!r} is the user's: give the per-sample shape with --input")
    device = _init_distributed() or device
    q = fxmpq.prepare(model, torch.randn(2, *shape), hardware=hw, bits=bits, per_channel=args.per_channel)
    ckpt = out / "indicators.ckpt"
    ind = fxmpq.train_indicators(q, dataset, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 seed=args.seed, device=device, checkpoint=ckpt, resume=ckpt.is_file(),
                                 max_steps=args.max_steps, model_factory=args.model, model_kwargs=kwargs,
                                 checkpoint_every=args.checkpoint_every)
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
    ap.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                    help="also checkpoint every N optimizer steps (default %(default)s; a kill loses at most N)")
    ap.add_argument("--out", required=True, help="folder for indicators.json and indicators.ckpt")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except fxmpq.FxmpqError as e:
        return fail(e, 2, prog="train_indicators.py")


if __name__ == "__main__":
    sys.exit(main())
