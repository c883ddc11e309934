"""fxmpq.export.onnx_decompose: the rewrites that let an export skip torch.onnx's decomposition re-trace, and
lower() with it on models that do and do not need the re-trace."""

from __future__ import annotations

import torch
from torch import nn

import fxmpq
from fxmpq.export.onnx_decompose import last_left, rewrite

aten = torch.ops.aten


def _targets(ep: torch.export.ExportedProgram) -> list[object]:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(8)  # after a concat, as in densenet: no conv to fold it into
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2, inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(self.drop(torch.flatten(self.pool(self.act(self.bn(torch.cat([y, y], 1)))), 1)))


def test_rewrite_makes_what_the_decomposition_would_and_keeps_the_numbers() -> None:
    m = _Head().eval()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    ep = torch.export.export(m, (x,))
    assert {aten.relu_.default, aten.adaptive_avg_pool2d.default, aten.dropout_.default,
            aten.batch_norm.default} <= set(_targets(ep))
    want = ep.module()(x)
    assert rewrite(ep.graph)
    ep.graph_module.recompile()
    t = _targets(ep)
    assert {aten.relu.default, aten.mean.dim, aten._native_batch_norm_legit_no_training.default} <= set(t)
    assert not {aten.relu_.default, aten.adaptive_avg_pool2d.default, aten.dropout_.default, aten.dropout.default,
                aten.batch_norm.default} & set(t)
    torch.testing.assert_close(ep.module()(x), want, rtol=0, atol=0)


class _Shared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        w = y.view(-1)  # a view taken before the in-place op and read after it: out of place, w would change
        z = torch.relu_(y)
        return z.sum() + w.sum()


def test_rewrite_refuses_an_in_place_op_on_a_tensor_read_elsewhere() -> None:
    ep = torch.export.export(_Shared(), (torch.randn(2, 3),))
    assert aten.relu_.default in _targets(ep)
    assert not rewrite(ep.graph)


class _Float(nn.Module):
    """A float head after a quantized conv: ReLU(inplace) and eval dropout stay in the lowered graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2, inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(self.act(self.conv2(self.act(self.conv1(x))))), 1)))


def test_lower_skips_the_re_trace_and_passes_parity(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    q = fxmpq.prepare(_Float().eval(), x, bits=(8,), act_bits=(8,), hardware="ort_cpu")
    names = q.searchable_names
    fxmpq.apply_policy(q, {n: (8, 8) if n == names[0] else (None, None) for n in names}, torch.randn(4, 3, 8, 8))
    r = fxmpq.lower(q, tmp_path / "m.onnx", x, fxmpq.LowerOptions(samples=8, measure=False))
    assert r.passed
    assert last_left() == []  # nothing needed torch.onnx's decomposition


class _Fills(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        mask = torch.zeros_like(y)
        mask[:, :, :2] = 1.0  # a mutation: functionalised by torch.onnx's decomposition step
        return (y * mask).flatten(1)


def test_lower_falls_back_to_the_decomposition_where_the_graph_mutates(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    q = fxmpq.prepare(_Fills().eval(), x, bits=(8,))
    fxmpq.apply_policy(q, {n: (8, 8) for n in q.searchable_names}, torch.randn(4, 3, 6, 6))
    r = fxmpq.lower(q, tmp_path / "m.onnx", x, fxmpq.LowerOptions(samples=8, measure=False))
    assert r.passed
    assert last_left()  # the mutating op named, and the export still right
