"""The graph that ships is the pass list's output: the file lower() writes is byte for byte what running
`stages.lower_passes(...)` on the model and translating the result (`to_onnx`) produces, with the hardware's
MatMulNBits accuracy level and the reshape rewrite done inside the passes."""

from __future__ import annotations

import copy

import onnx
import torch
from test_weight_only import WO_TOML
from torch import nn

import fxmpq
from fxmpq.core.options import LowerOptions
from fxmpq.export.lower import to_onnx
from fxmpq.hardware.spec import loads_hardware
from fxmpq.passes import run_passes
from fxmpq.quant.storage import Storage
from fxmpq.stages import lower_passes


class Mixer(nn.Module):
    """Linear layers over [B, T, K] with a transpose read by a reshape (token mixing), the pattern the reshape
    rewrite exists for."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 8, 32]
        h = torch.relu(self.a(x)).transpose(1, 2)  # [B, 32, 8]
        h = self.b(h).transpose(1, 2).reshape(x.shape[0], 8, 32)
        return self.c(torch.relu(h)).mean(dim=1)


def test_lower_writes_exactly_the_pass_lists_graph(tmp_path) -> None:
    hw = loads_hardware(WO_TOML.replace("weight_only_bits = [2, 4, 8]",
                                        "weight_only_bits = [2, 4, 8]\nmatmul_nbits_accuracy_level = 0"), "wo.toml")
    torch.manual_seed(0)
    x = torch.randn(8, 8, 32)
    q = fxmpq.prepare(Mixer().eval(), x, hardware=hw, bits=(2, 4, 8))
    names = q.searchable_names
    fxmpq.apply_policy(q, dict(zip(names, [(4, None), (8, 8), (2, None)])), x)
    q.eval()
    path = tmp_path / "m.onnx"
    fxmpq.lower(q, path, x[:1], LowerOptions(check=False, measure=False, samples=8))

    lowered = run_passes(copy.deepcopy(q.graph_module).eval(),
                         lower_passes((x[:1],), accuracy_level=hw.matmul_nbits_accuracy_level)).graph_module
    proto, _, _ = to_onnx(lowered, (x[:1],), q.policy, Storage.INT8)
    assert proto.SerializeToString() == path.read_bytes()

    # and the two rewrites are there: the accuracy level from the hardware, a contiguous before the reshape
    m = onnx.load(str(path))
    levels = [a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [0, 0]
    assert any(n.op == "call_method" and n.target == "contiguous" for n in lowered.graph.nodes)


def test_lower_passes_default_keeps_the_hardware_default_level() -> None:
    """Without an accuracy level, the pass list uses ONNX Runtime's int8-compute level 4 (the schema's default)."""
    assert lower_passes()[0].accuracy_level == 4
    assert [type(p).__name__ for p in lower_passes()] == ["LowerToQDQPass", "FoldFloatConstantsPass",
                                                         "ContiguousBeforeReshapePass"]
