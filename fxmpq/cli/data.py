"""Options several subcommands take: a dataset spec, candidate bits, FP32 weights to start from, the input shape."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..core.checkpoint import load_tensors
from ..core.datasets import load_digits, load_fashion_mnist, load_small
from ..errors import ArgumentError, CheckpointError, DataError, ModelSpecError
from ..models import resolve_factory

__all__ = ["SHIPPED_DATASETS", "DataSpec", "example_batch", "hold_out", "load_dataset", "load_weights", "loader",
           "parse_bits", "sample_shape"]

SHIPPED_DATASETS = ("digits", "fashion-mnist", "auto")
DATASET_HELP = ("digits (scikit-learn's, 1x16x16), fashion-mnist (Debian's dataset-fashion-mnist, 1x28x28), auto "
                "(Fashion-MNIST when installed, else digits) or package.module:function returning a torch Dataset "
                "of (input, label)")


@dataclass(frozen=True)
class DataSpec:
    """What a --dataset names: the training set, the held-out set (shipped datasets only), the per-sample shape."""

    name: str
    train: Dataset
    val: Dataset | None
    shape: tuple[int, ...] | None  # per sample; None for a user's dataset (give --input)


def load_dataset(spec: str, limit: int | None = None, *, val_limit: int | None = None) -> DataSpec:
    """The dataset `spec` names (a shipped one or "pkg.mod:fn" returning a Dataset), the first `limit` training
    samples and `val_limit` held-out ones; DataError naming --dataset otherwise."""
    if spec in SHIPPED_DATASETS:
        data = {"auto": load_small, "fashion-mnist": load_fashion_mnist, "digits": load_digits}[spec]()
        n = len(data.train_y) if limit is None else min(limit, len(data.train_y))
        m = len(data.test_y) if val_limit is None else min(val_limit, len(data.test_y))
        return DataSpec(data.name, TensorDataset(data.train_x[:n], data.train_y[:n]),
                        TensorDataset(data.test_x[:m], data.test_y[:m]), data.input_shape)
    try:
        dataset = resolve_factory(spec)()
    except ModelSpecError as e:
        raise DataError(f"--dataset: {str(e).replace('model ', 'dataset ', 1)}") from None
    except Exception as e:  # the user's function failed: name it, not a traceback
        raise DataError(f"--dataset {spec!r}: the function raised {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    if not isinstance(dataset, Dataset):
        raise DataError(f"--dataset {spec!r} returned {type(dataset).__name__}, not a torch Dataset")
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    return DataSpec(spec, dataset, None, None)


def hold_out(spec: DataSpec, fraction: float, *, seed: int = 0) -> DataSpec:
    """`spec` with a seeded random `fraction` of its training samples as the held-out set (--val-fraction), in
    place of its test split; DataError when either part would be empty."""
    n = len(spec.train)
    k = round(n * fraction)
    if k < 1 or n - k < 1:
        raise DataError(f"--val-fraction {fraction}: {n} training samples of --dataset {spec.name} leave "
                        f"{k} held out and {n - k} to train on; both need at least one")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return replace(spec, train=Subset(spec.train, sorted(order[k:])), val=Subset(spec.train, sorted(order[:k])))


def sample_shape(spec: DataSpec, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """The per-sample input shape: --input when given (checked against a shipped dataset's), else the dataset's."""
    if given is not None:
        if spec.shape is not None and tuple(given) != tuple(spec.shape):
            raise DataError(f"--input {'x'.join(map(str, given))}: dataset {spec.name} has samples of shape "
                            f"{'x'.join(map(str, spec.shape))}")
        return tuple(given)
    if spec.shape is None:
        raise DataError(f"--dataset {spec.name!r} is the user's: give the per-sample shape with --input")
    return tuple(spec.shape)


def example_batch(spec: DataSpec, shape: tuple[int, ...], n: int = 1) -> torch.Tensor:
    """The first `n` training inputs as one batch (a user's dataset yields (input, label) pairs); DataError when
    they are not tensors of `shape`."""
    xs = []
    for i in range(min(n, len(spec.train))):
        item = spec.train[i]
        x = item[0] if isinstance(item, tuple | list) and item else item
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape):
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"--dataset {spec.name}: sample {i} is {found}, expected a tensor of shape "
                            f"{'x'.join(map(str, shape))} (--input)")
        xs.append(x.float())
    if not xs:
        raise DataError(f"--dataset {spec.name}: no samples")
    return torch.stack(xs)


def loader(dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """A DataLoader with its own seeded generator (a resumed run sees the batches the interrupted one would)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def parse_bits(text: str, option: str = "--bits") -> tuple[int, ...]:
    """"2,3,4,5,6" -> (2, 3, 4, 5, 6)."""
    parts = [b.strip() for b in text.split(",")]
    if not all(re.fullmatch(r"[0-9]{1,2}", b) for b in parts):
        raise ArgumentError(f"{option} {text[:60]!r}: expected comma-separated integers such as 2,3,4,5,6")
    return tuple(sorted({int(b) for b in parts}))


def load_weights(model: torch.nn.Module, path: str | Path, spec: str) -> None:
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
