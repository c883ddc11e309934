"""(inputs, targets) batches: the one split-and-check that training, evaluation and quantize()'s data check use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import DataError

__all__ = ["check_data", "split_batch"]


def _describe(x: Any) -> str:
    """"Tensor(4, 3, 32, 32) torch.float32" for a tensor, the type name otherwise (for error messages)."""
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def split_batch(batch: Any, index: int, shapes: Sequence[tuple[int, ...]] = (), *, what: str = "",
                class_targets: bool = False) -> tuple[tuple[torch.Tensor, ...], Any]:
    """Split a batch into (inputs tuple, targets); DataError naming the batch, what was expected and what was found.

    `batch` is an (inputs, targets) pair; inputs a tensor or a tuple/list of tensors. With `shapes` (the example
    inputs' shapes), the inputs must match them in number, in every dimension but the first (the batch size) and
    be floating point. Tensor targets must have the inputs' batch size; with `class_targets` they must be class
    indices, an integer tensor of shape [N]. `what` ("data", "val_data", ...) prefixes the message.
    """
    where = f"{what}: batch {index}" if what else f"batch {index}"
    expected = ", ".join(f"[N, {', '.join(map(str, s[1:]))}]" for s in shapes) or "tensors"
    if not (isinstance(batch, list | tuple) and len(batch) == 2):
        raise DataError(f"{where}: expected an (inputs, targets) pair with inputs {expected}, "
                        f"found {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else ""))
    inputs, targets = batch
    inputs = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    found = ", ".join(_describe(x) for x in inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise DataError(f"{where}: inputs must be tensors {expected}, found {found or 'no inputs'}")
    if shapes and len(inputs) != len(shapes):
        raise DataError(f"{where}: expected {len(shapes)} input tensor(s) {expected}, found {found}")
    if shapes and any(x.dim() != len(s) or tuple(x.shape[1:]) != tuple(s[1:]) for x, s in zip(inputs, shapes)):
        got = ", ".join(str(tuple(x.shape)) for x in inputs)
        example = ", ".join(str(tuple(s)) for s in shapes)
        raise DataError(f"{where} has inputs of shape {got}, expected {expected}: the inputs must have shape "
                        f"{expected} like the example inputs {example} (any batch size N); found {found}")
    if shapes and not all(x.is_floating_point() for x in inputs):
        raise DataError(f"{where}: inputs must be floating point, found {found}")
    n = inputs[0].shape[0] if inputs[0].dim() else None
    if class_targets and not (isinstance(targets, torch.Tensor) and targets.dim() == 1 and targets.shape[0] == n
                              and not targets.is_floating_point() and not targets.is_complex()
                              and targets.dtype != torch.bool):
        raise DataError(f"{where}: targets must be class indices of shape [{n if n is not None else 'N'}] "
                        f"(an integer tensor such as int64), found {_describe(targets)}")
    if isinstance(targets, torch.Tensor) and targets.dim() >= 1 and n is not None and targets.shape[0] != n:
        raise DataError(f"{where}: targets have batch size {targets.shape[0]} but inputs {n} "
                        f"(targets {_describe(targets)}, inputs {found})")
    return inputs, targets


def check_data(model: nn.Module, data: Any, example: Sequence[Any], what: str) -> None:
    """Fail fast, before training: the first batch of `data` is (inputs, class indices) shaped like `example` and
    the model runs on it, with every target below its number of outputs."""
    try:
        batches = iter(data)
    except TypeError:
        raise DataError(f"{what} must be an iterable of (inputs, targets) batches, found {type(data).__name__}") from None
    try:
        batch = next(batches)
    except StopIteration:
        raise DataError(f"{what} yielded no batches") from None
    shapes = [tuple(x.shape) for x in example if isinstance(x, torch.Tensor)]
    inputs, y = split_batch(batch, 0, shapes, what=what, class_targets=True)
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*(x[:2].to(dev) for x in inputs))
    except Exception as e:
        raise DataError(f"{what}: the model fails on batch 0 ({type(e).__name__}: {e})") from e
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or int(y.max()) >= out.shape[1] or int(y.min()) < 0:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"{what}: targets range over [{int(y.min())}, {int(y.max())}] but the model outputs {shape}; "
                        "expected logits [N, classes] with 0 <= target < classes")
