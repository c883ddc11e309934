"""fxmpq.cli: the option parsers the tools share."""

from __future__ import annotations

import pytest

from fxmpq.cli import parse_shape
from fxmpq.errors import ArgumentError, FxmpqError


def test_parse_shape():
    assert parse_shape("3x224x224") == (3, 224, 224)
    assert parse_shape(" 1X3x32x32 ", batch=True) == (1, 3, 32, 32)
    assert parse_shape("10") == (10,)


@pytest.mark.parametrize(("text", "batch", "message"), [
    ("3x224xx", False, r"^--input '3x224xx': expected the per-sample shape as CxHxW \(e.g. 3x224x224\)"),
    ("", False, r"^--input '': expected the per-sample shape"),
    ("3,224,224", True, r"^--input '3,224,224': expected the input shape with the batch first .*1x3x224x224"),
    ("-1x3", False, r"^--input '-1x3': expected"),
    ("0x4", False, r"^--input '0x4': every dimension must be positive$"),
])
def test_parse_shape_errors(text, batch, message):
    with pytest.raises(ArgumentError, match=message) as exc:
        parse_shape(text, batch=batch)
    assert isinstance(exc.value, FxmpqError) and isinstance(exc.value, ValueError)


def test_parse_shape_names_the_option():
    with pytest.raises(ArgumentError, match=r"^--shape 'x': "):
        parse_shape("x", option="--shape")
