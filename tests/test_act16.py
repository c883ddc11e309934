"""16-bit activations (A16W8, A16W4): hardware files, separate activation candidates, uint16 Q/DQ in the export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

import fxmpq
from fxmpq.core.options import LowerOptions, TrainOptions
from fxmpq.errors import HardwareSpecError, PolicyError
from fxmpq.hardware.formats import act_container_bits, integer_kernel
from fxmpq.hardware.spec import loads_hardware
from fxmpq.quant.kernels import AddRounding

NPU_TOML = """
[target]
name = "npu"
weight_bits = [4, 8]
act_bits = [8, 16]
pairs = [[4, 8], [4, 16], [8, 8], [8, 16]]

[pins]
first_layer = false
last_layer = false

[metrics.size]
unit = "bit"
terms = [{ type = "weight_bits" }]
"""


@pytest.fixture
def hw():
    return loads_hardware(NPU_TOML, "npu.toml")


class _Net(nn.Module):
    """conv -> BN -> ReLU6 -> conv, a residual sum, a 1x1 conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.bn(self.c1(x)))
        y = torch.relu(self.c2(y)) + y
        y = self.c3(y).mean((2, 3))
        return self.fc(y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = _Net()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_activation_bits_up_to_16_in_hardware_files(hw) -> None:
    assert hw.act_bits == (8, 16) and hw.supports(8, 16) and hw.supports(4, 16)
    table = NPU_TOML.replace('terms = [{ type = "weight_bits" }]', 'terms = [{ type = "table", values = '
                             '{ "8x16" = 2.0, "4x16" = 1.5, "8x8" = 1.0, "4x8" = 0.8 } }]')
    assert loads_hardware(table, "npu.toml").metrics["size"].terms[0].values[(8, 16)] == 2.0


@pytest.mark.parametrize(("old", "new", "message"), [
    ("act_bits = [8, 16]", "act_bits = [8, 17]", "npu.toml: target.act_bits[1]: bit-width 17 outside 1..16"),
    ("weight_bits = [4, 8]", "weight_bits = [4, 16]", "npu.toml: target.weight_bits[1]: bit-width 16 outside 1..8"),
    ("pairs = [[4, 8], [4, 16], [8, 8], [8, 16]]", "pairs = [[16, 8]]",
     "npu.toml: target.pairs[0]: bit-width 16 outside 1..8"),
])
def test_bad_widths_are_refused_naming_file_and_key(old, new, message) -> None:
    with pytest.raises(HardwareSpecError) as e:
        loads_hardware(NPU_TOML.replace(old, new), "npu.toml")
    assert str(e.value).startswith(message)


def test_the_format_rule_for_16_bit_activations() -> None:
    assert act_container_bits(8) == 8 and act_container_bits(9) == 16 and act_container_bits(16) == 16
    with pytest.raises(PolicyError, match="uint8 or uint16"):
        act_container_bits(17)
    # ONNX Runtime's CPU QDQ selectors fuse 8-bit tensors only
    assert integer_kernel(8, 8, 8) and integer_kernel(4, 8, None)
    assert not integer_kernel(8, 16) and not integer_kernel(8, 8, 16) and not integer_kernel(8, None)


def test_prepare_takes_activation_candidates_of_their_own(hw) -> None:
    x = torch.randn(2, 3, 8, 8)
    q = fxmpq.prepare(_model(), x, hardware=hw, bits=(4, 8), act_bits=(8, 16))
    assert q.bits == (4, 8) and q.act_bits == (8, 16) and q.all_bits == (4, 8, 16)
    assert q.uniform_pairs == [(8, 16), (4, 8)]
    name = q.searchable_names[0]
    assert q.weight_quantizer(name).bits == (4, 8) and q.act_quantizer(name).bits == (8, 16)
    q.set_uniform(8, 16)
    assert set(q.policy.values()) == {(8, 16)}
    with pytest.raises(PolicyError, match=r"outside this model's candidate bits \(4, 8\) \(activations \(8, 16\)\)"):
        q.set_uniform(8, 4)
    with pytest.raises(PolicyError, match="activation candidate bits \\[4\\] are not supported by hardware 'npu'"):
        fxmpq.prepare(_model(), x, hardware=hw, bits=(4, 8), act_bits=(4, 16))
    with pytest.raises(PolicyError, match="candidate bits \\[16\\] are not supported"):
        fxmpq.prepare(_model(), x, hardware=hw, bits=(8, 16))


def test_joint_training_learns_16_bit_steps_and_the_search_uses_them(hw) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    data = [(x[i:i + 8], torch.randint(0, 10, (8,))) for i in (0, 8)]
    q = fxmpq.prepare(_model().train(), x[:2], hardware=hw, bits=(4, 8), act_bits=(8, 16))
    ind = fxmpq.train_indicators(q, data, TrainOptions(indicator_epochs=1, progress=False))
    name = q.searchable_names[0]
    assert set(ind.weight[name]) == {4, 8} and set(ind.act[name]) == {8, 16}
    assert ind.act[name][16] < ind.act[name][8]  # a finer grid: a smaller step
    full = fxmpq.Budget.coerce({"size": 1e12})
    res = fxmpq.search(q.analysis, ind, full)
    assert all(p in {(8, 16)} for p in res.policy.values())  # no budget pressure: the finest format everywhere


def _lowered(tmp_path, hw, policy_of):
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    q = fxmpq.prepare(_model(), x, hardware=hw, bits=(4, 8), act_bits=(8, 16))
    policy = policy_of(q.searchable_names)
    fxmpq.apply_policy(q, policy, x)
    q.eval()
    path = tmp_path / "m.onnx"
    rep = fxmpq.lower(q, path, x[:1], LowerOptions(samples=16), inputs=x)
    return path, rep


def test_a16w8_layers_export_with_uint16_qdq_and_match_pytorch(tmp_path, hw) -> None:
    path, rep = _lowered(tmp_path, hw, lambda n: dict(zip(n, [(8, 16), (4, 16), (8, 8), (8, 16)])))
    assert rep.passed and rep.max_abs_diff <= 1.0 + 1e-3, rep.table()
    assert rep.format_mismatches == ()
    m = onnx.load(str(path))
    types = set(_zp_types(m).values())
    assert types == {TensorProto.UINT16, TensorProto.UINT8}
    assert json.loads({p.key: p.value for p in m.metadata_props}["fxmpq.bits"])["c2"] == [4, 16]
    timings = {t.layer: t for t in rep.layer_timings}
    assert timings["c1"].kernels[-1] == "Conv" and not timings["c1"].integer  # ORT CPU: DQ -> float Conv
    assert timings["c3"].integer  # W8A8 between 8-bit tensors: QLinearConv


def _zp_types(m: onnx.ModelProto) -> dict[str, int]:
    """QuantizeLinear output name -> its zero point's ONNX type."""
    consts = {o: n for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    inits = {t.name: t.data_type for t in m.graph.initializer}

    def zp_type(name: str) -> int:
        return inits[name] if name in inits else next(a.t.data_type for a in consts[name].attribute if a.name == "value")

    return {n.output[0]: zp_type(n.input[2]) for n in m.graph.node if n.op_type == "QuantizeLinear"}


def test_a_clip_before_a_16_bit_quantizer_is_exact(tmp_path, hw) -> None:
    """A ReLU6 folded into a 16-bit quantizer: ORT has no uint16 Clip, so it clips the floats before Q, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(16, 3, 8, 8)
    q = fxmpq.prepare(model, x, hardware=hw, bits=(4, 8), act_bits=(8, 16))
    fxmpq.apply_policy(q, dict.fromkeys(q.searchable_names, (8, 16)), x)
    q.eval()
    path = tmp_path / "m.onnx"
    rep = fxmpq.lower(q, path, x[:1], LowerOptions(samples=16), inputs=x)
    assert rep.passed and rep.max_abs_diff <= 1.0 + 1e-3, rep.table()
    m = onnx.load(str(path))
    zp = _zp_types(m)
    readers = {i: n for n in m.graph.node for i in n.input}
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    float_clips = [n for n in clips if readers[n.output[0]].op_type == "QuantizeLinear"
                   and zp[readers[n.output[0]].output[0]] == TensorProto.UINT16]
    assert len(float_clips) == 2  # the two ReLU6, clipped in float right before their 16-bit quantizers
    assert not [n for n in clips if zp.get(n.input[0]) == TensorProto.UINT16]  # no Clip on uint16 values


def test_a_sum_read_at_16_bits_stays_a_float_add(tmp_path, hw) -> None:
    x = torch.randn(4, 3, 8, 8)
    q = fxmpq.prepare(_model(), x, hardware=hw, bits=(4, 8), act_bits=(8, 16))
    fxmpq.apply_policy(q, dict(zip(q.searchable_names, [(8, 8), (8, 8), (8, 16), (8, 8)])), x)
    gm = q.graph_module
    assert not any(isinstance(m, AddRounding) for m in gm.modules())  # c3 reads the sum at 16 bits
    q2 = fxmpq.prepare(_model(), x, hardware=hw, bits=(4, 8), act_bits=(8, 16))
    fxmpq.apply_policy(q2, dict.fromkeys(q2.searchable_names, (8, 8)), x)
    assert any(isinstance(m, AddRounding) for m in q2.graph_module.modules())
    q.eval()
    rep = fxmpq.lower(q, tmp_path / "m.onnx", x[:1], LowerOptions(samples=4), inputs=x)
    assert rep.passed, rep.table()
    np.testing.assert_equal(rep.format_mismatches, ())


def test_the_shipped_npu_target_runs_its_four_formats_end_to_end(tmp_path) -> None:
    """npu_htp (A8W8, A16W8, A8W4, A16W4): its defaults search all four, and a mixed policy exports packed INT4 and
    uint16 tensors that ONNX Runtime runs within one step."""
    hw = fxmpq.load_hardware("npu_htp")
    assert hw.pairs == ((4, 8), (4, 16), (8, 8), (8, 16)) and hw.pins.bits == (8, 8)
    x = torch.randn(8, 3, 8, 8)
    q = fxmpq.prepare(_model(), x, hardware=hw, bits=(4, 8), act_bits=(8, 16))
    a = q.analysis
    assert a.layer_cost("c2", 4, 16)["size"] == a.layer("c2").params * 4 / 8
    assert a.layer_cost("c2", 4, 16)["bitops"] == a.layer("c2").macs * 64
    fxmpq.apply_policy(q, {"c2": (4, 16), "c3": (4, 8)}, x)
    q.eval()
    path = tmp_path / "m.onnx"
    rep = fxmpq.lower(q, path, x[:1], LowerOptions(samples=8, storage="packed"), inputs=x)
    assert rep.passed and rep.max_abs_diff <= 1.0 + 1e-3, rep.table()
    assert rep.weight_containers["c2"] == "int4" and rep.weight_containers["c1"] == "int8"
    assert TensorProto.UINT16 in set(_zp_types(onnx.load(str(path))).values())


def test_quantize_on_the_npu_target_searches_weight_and_activation_widths_of_their_own(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    example = torch.randn(1, 3, 8, 8)
    a = fxmpq.analyze(_model(), example, hardware="npu_htp")
    full = a.cost(fxmpq.Policy.uniform(a, 8, 16))  # first and last layer pinned at A8W8
    r = fxmpq.quantize(_model(), {"size": 0.8 * full["size"]}, data, example, hardware="npu_htp",
                       work_dir=tmp_path / "run", finetune_epochs=0, progress=False)
    assert r.model.bits == (4, 8) and r.model.act_bits == (8, 16)
    assert set(r.policy.values()) <= {(4, 8), (4, 16), (8, 8), (8, 16)}
    assert r.analysis.cost(r.policy)["size"] <= 0.8 * full["size"]
    assert r.audit is not None and r.audit.passed, r.audit.table()
