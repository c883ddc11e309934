"""(inputs, targets) batches: the one split-and-check that training, evaluation and quantize()'s data check use."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DataError, first_line

__all__ = ["check_data", "check_inputs", "check_reiterable", "split_batch"]


def _describe(x: Any) -> str:
    """"Tensor(4, 3, 32, 32) torch.float32" for a tensor, the type name otherwise (for error messages)."""
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def _expected(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join(f"[N, {', '.join(map(str, s[1:]))}]" for s in shapes) or "tensors"


def check_inputs(inputs: Any, shapes: Sequence[tuple[int, ...]], where: str) -> tuple[torch.Tensor, ...]:
    """`inputs` (a tensor or a tuple/list of tensors) as a tuple; DataError naming `where` unless they are tensors
    matching `shapes` (the example inputs' shapes) in number and in every dimension but the first (the batch size),
    floating point and not on the meta device. With no `shapes`, only that they are tensors is checked.

    The one check of model inputs against the example inputs: batches (split_batch), and the inputs given to
    apply_policy and lower after capture.
    """
    inputs = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    expected = _expected(shapes)
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
        raise DataError(f"{where}: inputs must be floating point, found {found} (convert them, e.g. x.float())")
    if any(x.is_meta for x in inputs):
        raise DataError(f"{where}: inputs are on the meta device (shapes without data), found {found}")
    return inputs


def split_batch(batch: Any, index: int, shapes: Sequence[tuple[int, ...]] = (), *, what: str = "",
                class_targets: bool = False, classes: int | None = None) -> tuple[tuple[torch.Tensor, ...], Any]:
    """Split a batch into (inputs tuple, targets); DataError naming the batch, what was expected and what was found.

    `batch` is an (inputs, targets) pair; inputs are checked by `check_inputs` against `shapes` (the example
    inputs' shapes). Tensor targets must have the inputs' batch size; with `class_targets` they must be class
    indices, an integer tensor of shape [N], and with `classes` (the model's number of outputs) each in
    [0, classes). `what` ("data", "val_data", ...) prefixes the message.
    """
    where = f"{what}: batch {index}" if what else f"batch {index}"
    if not (isinstance(batch, list | tuple) and len(batch) == 2):
        raise DataError(f"{where}: expected an (inputs, targets) pair with inputs {_expected(shapes)}, "
                        f"found {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else ""))
    inputs, targets = batch
    inputs = check_inputs(inputs, shapes, where)
    found = ", ".join(_describe(x) for x in inputs)
    n = inputs[0].shape[0] if inputs[0].dim() else None
    if isinstance(targets, torch.Tensor) and targets.dim() >= 1 and n is not None and targets.shape[0] != n:
        raise DataError(f"{where}: targets have batch size {targets.shape[0]} but inputs {n} "
                        f"(targets {_describe(targets)}, inputs {found})")
    class_targets = class_targets or classes is not None
    if class_targets and not (isinstance(targets, torch.Tensor) and targets.dim() == 1 and targets.shape[0] == n
                              and not targets.is_floating_point() and not targets.is_complex()
                              and targets.dtype != torch.bool):
        raise DataError(f"{where}: targets must be class indices of shape [{n if n is not None else 'N'}] "
                        f"(an integer tensor such as int64), found {_describe(targets)}")
    if classes is not None and targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= classes:
            raise DataError(f"{where}: targets range over [{lo}, {hi}] but the model has {classes} outputs; "
                            f"expected class indices 0 <= target < {classes}")
    return inputs, targets


def check_reiterable(data: Any, what: str) -> None:
    """DataError when `data` is a one-shot iterator (a generator, iter(list), ...): an iterable that is its own
    iterator is used up by its first pass, so the early check, a second epoch or a resume would find it empty."""
    if isinstance(data, Iterator):  # has __next__: its __iter__ returns itself (a DataLoader or Dataset has not)
        raise DataError(f"{what} is a one-shot iterator ({type(data).__name__}): it is used up by its first pass, "
                        f"so the check before training, every epoch after the first and a resume would see no "
                        f"batches. Pass something that can be iterated again: a list of (inputs, targets) "
                        f"batches, a Dataset or a DataLoader.")


def check_data(model: nn.Module, data: Any, example: Sequence[Any], what: str) -> None:
    """Fail fast, before training: `data` can be iterated more than once, its first batch is (inputs, class indices)
    shaped like `example` and of its dtype, the model runs on it, with every target below its number of outputs."""
    check_reiterable(data, what)
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
    dtypes = [x.dtype for x in example if isinstance(x, torch.Tensor)]
    off = [(i, x.dtype, d) for i, (x, d) in enumerate(zip(inputs, dtypes)) if x.dtype != d]
    if off:
        i, got, want = off[0]
        raise DataError(f"{what}: batch 0: input {i} is {got} but the example inputs are {want}; give batches of "
                        f"the example inputs' dtype (x.to({want}))")
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*(x[:2].to(dev) for x in inputs))
    except Exception as e:
        raise DataError(f"{what}: the model fails on batch 0 (inputs {', '.join(map(_describe, inputs))}): "
                        f"{type(e).__name__}: {first_line(e)}") from e
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or int(y.max()) >= out.shape[1] or int(y.min()) < 0:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"{what}: targets range over [{int(y.min())}, {int(y.max())}] but the model outputs {shape}; "
                        "expected logits [N, classes] with 0 <= target < classes")
