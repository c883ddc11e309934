"""The one text-table renderer."""

from __future__ import annotations

from fxmpq.core.tables import render


def test_render_pads_and_aligns() -> None:
    text = render(["name", "kind", "n"], [["conv1", "conv", 3], ["fc", "linear", 1200]], left=2)
    assert text.splitlines() == [
        "name   kind       n",
        "-------------------",
        "conv1  conv       3",
        "fc     linear  1200",
    ]


def test_render_defaults_to_one_left_column() -> None:
    assert render(["a", "b"], [["xx", "y"]]).splitlines() == ["a   b", "-----", "xx  y"]
