"""Small real datasets that need no network: Fashion-MNIST from Debian's package, scikit-learn's digits."""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import DataError

log = logging.getLogger(__name__)

__all__ = ["FASHION_MNIST_DIR", "ImageData", "find_fashion_mnist", "load_digits", "load_fashion_mnist", "load_small"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class ImageData:
    """A train/test split of normalised images [N, C, H, W] (float32) and labels [N] (int64)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, (C, H, W)."""
        return tuple(self.train_x.shape[1:])

    def loader(self, split: str = "train", batch_size: int = 128, *, shuffle: bool | None = None,
               limit: int | None = None, seed: int = 0) -> DataLoader:
        """A DataLoader over `split` ("train" or "test"), optionally the first `limit` samples only."""
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', found {split!r}")
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        g = torch.Generator().manual_seed(seed)
        shuffle = (split == "train") if shuffle is None else shuffle
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def find_fashion_mnist(root: str | Path | None = None) -> Path | None:
    """The folder holding Fashion-MNIST's four IDX files (given, or Debian's), or None when absent."""
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    return folder if all((folder / f).is_file() for f in _FILES.values()) else None


def load_fashion_mnist(root: str | Path | None = None) -> ImageData:
    """Fashion-MNIST (60k/10k 1x28x28 images, 10 classes), normalised to mean 0 / std 1."""
    folder = find_fashion_mnist(root)
    if folder is None:
        where = root or FASHION_MNIST_DIR
        raise DataError(f"Fashion-MNIST not found in {where} (expected {', '.join(_FILES.values())}); "
                        "install it with `apt-get install -y dataset-fashion-mnist` or pass its folder")
    arrays = {k: _read_idx(folder / f) for k, f in _FILES.items()}
    mean, std = 0.2860, 0.3530

    def images(a: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(a.astype(np.float32) / 255.0) - mean) / std).unsqueeze(1)

    return ImageData("fashion-mnist", images(arrays["train_x"]), torch.from_numpy(arrays["train_y"].astype(np.int64)),
                     images(arrays["test_x"]), torch.from_numpy(arrays["test_y"].astype(np.int64)), 10)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upsampled to 1x16x16, split train/test."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return ImageData("digits", x[tr], y[tr], x[te], y[te], 10)


def load_small(root: str | Path | None = None) -> ImageData:
    """Fashion-MNIST when it is installed (or under `root`), otherwise scikit-learn's digits."""
    if find_fashion_mnist(root) is not None:
        return load_fashion_mnist(root)
    if root is not None:
        raise DataError(f"Fashion-MNIST not found under {root}")
    log.info("Fashion-MNIST not found in %s; using scikit-learn's digits", FASHION_MNIST_DIR)
    return load_digits()
