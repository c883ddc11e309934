"""tools/flip_sources.py: the QuantModel teacher-forced against ONNX Runtime, quantizer by quantizer."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from models import ResidualNet

import fxmpq
from fxmpq.models import small_vit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import flip_sources as tool


def test_a_bit_exact_net_has_no_flips_at_any_quantizer() -> None:
    """A CNN whose only float work is the layers' accumulations (which BiasRounding turns back into ONNX Runtime's
    integers) and a global mean: every quantizer agrees with ONNX Runtime, and so does the output."""
    torch.manual_seed(0)
    q = fxmpq.prepare(ResidualNet().eval(), torch.randn(1, 3, 16, 16))
    fxmpq.apply_policy(q, {n: (4, 4) for n in q.searchable_names}, torch.randn(8, 3, 16, 16))
    flips, before, e2e = tool.flips_by_quantizer(q.eval(), torch.randn(1, 3, 16, 16), samples=32)
    assert {"stem.input_quantizer", "conv2.output_quantizer", "fc.output_quantizer"} <= set(flips)
    assert all(v > 0 for _, v in flips.values())
    assert sum(f for f, _ in flips.values()) == 0 and e2e == {"max_steps": 0.0, "top1_agree": 1.0}
    assert before["conv2.input_quantizer"] == ("conv1 (QuantConv2d, its float accumulation)",)


@pytest.mark.parametrize("seed", [0, 1])
def test_flips_happen_only_after_float_ops_and_are_counted_per_quantizer(seed) -> None:
    torch.manual_seed(seed)
    x = torch.randn(1, 1, 28, 28)
    q = fxmpq.prepare(small_vit().eval(), x, bits=(2, 3, 4, 5, 6, 7, 8))
    rng = random.Random(seed)
    fxmpq.apply_policy(q, {n: (rng.randint(2, 8), rng.randint(2, 8)) for n in q.searchable_names},
                       torch.randn(16, 1, 28, 28))
    flips, before, e2e = tool.flips_by_quantizer(q.eval(), x, samples=64)
    assert len(flips) >= len(q.searchable_names)  # every activation quantizer was forced and compared
    assert all(0 <= f <= v for f, v in flips.values())
    assert all(before.get(k) for k, (f, _) in flips.items() if f)  # a flip needs a float op before its quantizer
    assert e2e["max_steps"] >= 0 and 0 <= e2e["top1_agree"] <= 1
