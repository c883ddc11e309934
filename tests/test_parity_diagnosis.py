"""The stage-by-stage diagnosis a failed parity check runs must itself be right: it compares values, not tensors
that later in-place ops changed."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxmpq
from fxmpq.export.parity import lowering_parity
from fxmpq.passes import run_passes
from fxmpq.stages import lower_passes


class _InplaceAct(nn.Module):
    """conv -> BN -> SiLU(inplace=True): the SiLU overwrites the conv's output quantizer's result (timm does this)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU(inplace=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv2(self.conv1(x)))).mean((2, 3)))


def test_lowering_parity_is_not_fooled_by_an_in_place_activation_after_a_quantizer() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    q = fxmpq.prepare(_InplaceAct(), x[:1])
    fxmpq.apply_policy(q, {"conv2": (4, 4)}, torch.randn(8, 3, 8, 8))
    q.eval()
    assert any(n.target == "conv2.output_quantizer" for n in q.graph_module.graph.nodes)
    lowered = run_passes(copy.deepcopy(q.graph_module).eval(), lower_passes((x[:1],))).graph_module
    first, worst = lowering_parity(q, lowered, (x,), 4)
    assert first is None and worst <= 1.0, (first, worst)
