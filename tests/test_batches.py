"""fxmpq.core.batches: one DataError per malformed batch, naming the batch, what was expected and what was found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxmpq.core.batches import check_data, split_batch
from fxmpq.errors import DataError

SHAPES = [(2, 3, 8, 8)]


def test_split_normalises_inputs_to_a_tuple():
    x, y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    inputs, targets = split_batch((x, y), 0, SHAPES)
    assert inputs == (x,) and targets is y
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    assert split_batch([[a, b], "any targets"], 3, [(1, 3, 8, 8), (1, 5)]) == ((a, b), "any targets")


@pytest.mark.parametrize(("batch", "message"), [
    (torch.randn(4, 3, 8, 8), r"^batch 2: expected an \(inputs, targets\) pair with inputs \[N, 3, 8, 8\], found Tensor$"),
    ((torch.randn(4, 3, 8, 8),), r"found tuple of length 1$"),
    (("x", torch.zeros(4)), r"^batch 2: inputs must be tensors \[N, 3, 8, 8\], found str$"),
    (((torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)), torch.zeros(4)), r"expected 1 input tensor\(s\) \[N, 3, 8, 8\]"),
    ((torch.randn(4, 1, 8, 8), torch.zeros(4)),
     r"^batch 2 has inputs of shape \(4, 1, 8, 8\), expected \[N, 3, 8, 8\]: .* example inputs \(2, 3, 8, 8\) "
     r".*found Tensor\(4, 1, 8, 8\) torch.float32$"),
    ((torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4)), r"inputs must be floating point, found .*torch.uint8"),
    ((torch.randn(4, 3, 8, 8), torch.zeros(3)), r"targets have batch size 3 but inputs 4"),
])
def test_malformed_batches(batch, message):
    with pytest.raises(DataError, match=message):
        split_batch(batch, 2, SHAPES)


def test_class_targets_and_prefix():
    x = torch.randn(4, 3, 8, 8)
    for y in (torch.zeros(4), torch.zeros(4, dtype=torch.bool), torch.zeros(4, 1, dtype=torch.long),
              [0, 1, 2, 3]):
        with pytest.raises(DataError, match=r"^val_data: batch 0: targets must be class indices of shape \[4\]"):
            split_batch((x, y), 0, SHAPES, what="val_data", class_targets=True)
    with pytest.raises(DataError, match=r"^val_data: batch 0: targets have batch size 3 but inputs 4"):
        split_batch((x, torch.zeros(3, dtype=torch.long)), 0, SHAPES, what="val_data", class_targets=True)
    with pytest.raises(DataError, match=r"^batch 1: targets range over \[0, 10\] but the model has 10 outputs"):
        split_batch((x, torch.tensor([0, 1, 10, 2])), 1, SHAPES, classes=10)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        split_batch((x, torch.zeros(4, dtype=dtype)), 0, SHAPES, class_targets=True)


def test_check_data_runs_the_model_on_the_first_batch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    example = (torch.randn(1, 3, 8, 8),)
    check_data(model, [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 4, 2]))], example, "data")
    with pytest.raises(DataError, match=r"^data: targets range over \[0, 5\] but the model outputs \(2, 5\)"):
        check_data(model, [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 5, 2]))], example, "data")
    with pytest.raises(DataError, match=r"^data yielded no batches$"):
        check_data(model, [], example, "data")
    with pytest.raises(DataError, match=r"^data must be an iterable of \(inputs, targets\) batches, found int$"):
        check_data(model, 3, example, "data")
    with pytest.raises(DataError, match=r"^data: the model fails on batch 0 \(inputs Tensor\(4, 3, 8, 8\) "
                                         r"torch.float32\): RuntimeError: mat1"):
        check_data(nn.Linear(2, 2), [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))], example, "data")
