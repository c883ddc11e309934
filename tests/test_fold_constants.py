"""FoldFloatConstantsPass: float subgraphs of the model's own constants are computed once by PyTorch and exported as
initializers, so ONNX Runtime applies PyTorch's values instead of folding them with its own kernels."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

import fxmpq
from fxmpq.core.options import LowerOptions
from fxmpq.passes import FoldFloatConstantsPass, LowerToQDQPass, run_passes
from fxmpq.passes.qdq_ops import DQ_OP, QDQ_OP


class ConstantBias(nn.Module):
    """swin_v2's pattern: logits scaled by exp(clamp(p)) and offset by 16 * sigmoid(mlp(table)), all constants."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 16)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(1)))
        self.register_buffer("table", torch.randn(16, 2))
        self.cpb = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
        self.mix = nn.Parameter(torch.randn(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = 16 * torch.sigmoid(self.cpb(self.table)).reshape(16)
        y = self.fc(x) * torch.clamp(self.logit_scale, max=4.6).exp() + bias
        y = y + y @ self.mix.t()  # a parameter only moved (transposed): not folded, not stored twice
        return self.head(torch.softmax(y, -1))


def _quantized() -> tuple[fxmpq.QuantModel, torch.Tensor]:
    x = torch.randn(1, 16)
    q = fxmpq.prepare(ConstantBias().eval(), x)
    fxmpq.apply_policy(q, {n: (8, 8) for n in q.searchable_names}, torch.randn(32, 16))
    return q.eval(), x


def _lowered(q: fxmpq.QuantModel, x: torch.Tensor, fold: bool) -> torch.fx.GraphModule:
    passes = [LowerToQDQPass(example_inputs=(x,))] + ([FoldFloatConstantsPass()] if fold else [])
    return run_passes(copy.deepcopy(q.graph_module).eval(), passes).graph_module


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) if n.op != "call_function" else getattr(n.target, "__name__", str(n.target))
            for n in gm.graph.nodes]


def test_constant_float_subgraphs_become_buffers_with_pytorchs_values() -> None:
    q, x = _quantized()
    plain, folded = _lowered(q, x, fold=False), _lowered(q, x, fold=True)
    before, after = _targets(plain), _targets(folded)
    assert "sigmoid" in before and "exp" in before and "cpb.0" in before
    assert "sigmoid" not in after and "exp" not in after and not any(t.startswith("cpb") for t in after)
    assert "t" in after and "mix" in after  # the transposed parameter stays a transpose of the parameter
    buffers = {n: b for n, b in folded.named_buffers() if ".folded_" in n}
    assert len(buffers) == 2  # the bias and the logit scale
    m = ConstantBias()  # the same seeded weights the QuantModel copied
    with torch.no_grad():
        want_bias = 16 * torch.sigmoid(m.cpb(m.table)).reshape(16)
        want_scale = torch.clamp(m.logit_scale, max=4.6).exp()
    got = sorted(buffers.values(), key=lambda b: b.numel())
    assert torch.equal(got[0], want_scale) and torch.equal(got[1], want_bias)
    count = {op: sum(n.target is op for n in g.graph.nodes) for g in (plain, folded) for op in (QDQ_OP, DQ_OP)}
    assert count[QDQ_OP] > 0 and count[DQ_OP] > 0  # quantize-dequantize and integer weights are never folded
    assert [n.target for n in plain.graph.nodes if n.target in (QDQ_OP, DQ_OP)] == \
        [n.target for n in folded.graph.nodes if n.target in (QDQ_OP, DQ_OP)]
    with torch.no_grad():
        xs = torch.randn(8, 16)
        assert torch.equal(plain(xs), folded(xs))


def test_the_exported_file_carries_pytorchs_values_bit_for_bit(tmp_path) -> None:
    """Without the pass torch.onnx's exporter folds the same subgraph itself, with other kernels: 5 of the bias's
    16 values differ from PyTorch's in the last bit (measured); with it the file holds PyTorch's values."""
    q, x = _quantized()
    rep = fxmpq.lower(q, tmp_path / "m.onnx", x, LowerOptions(samples=64, measure=False))
    assert rep.passed and rep.max_diff_steps == 0.0
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert not {n.op_type for n in model.graph.node} & {"Sigmoid", "Exp"}
    m = ConstantBias()
    with torch.no_grad():
        want = (16 * torch.sigmoid(m.cpb(m.table)).reshape(16)).numpy()
    near = [a.ravel() for a in (numpy_helper.to_array(t) for t in model.graph.initializer)
            if a.dtype == np.float32 and a.size == 16 and np.allclose(a.ravel(), want, rtol=1e-4)]
    assert near and all(np.array_equal(a, want) for a in near)
