"""Weight-only linear layers: (w, None) in hardware files, policies and the search, lowered to MatMulNBits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxmpq
from fxmpq.core.options import LowerOptions
from fxmpq.core.primitives import quantize
from fxmpq.errors import HardwareSpecError, PolicyError
from fxmpq.hardware.formats import Format, format_of
from fxmpq.hardware.spec import LayerInfo, LayerKind, loads_hardware
from fxmpq.quant.kernels import int8_activation_bound

WO_TOML = """
[target]
name = "weight_only"
weight_bits = [2, 4, 8]
act_bits = [2, 4, 8]
pairs = [[2, 8], [4, 8], [8, 8]]
float_kinds = ["linear"]
weight_only_bits = [2, 4, 8]

[pins]
first_layer = false
last_layer = false

[metrics.size]
unit = "bit"
terms = [{ type = "weight_bits" }]

[metrics.latency]
unit = "ms"
terms = [{ type = "table", per = "mac", scale = 1e-6, values = { "2x8" = 0.5, "4x8" = 0.5, "8x8" = 0.5, "float" = 4.0, "2xfloat" = 1.0, "4xfloat" = 0.6, "8xfloat" = 0.6 } }]
"""


@pytest.fixture
def hw():
    return loads_hardware(WO_TOML, "wo.toml")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(),
                         nn.Linear(32, 10)).eval()


def test_hardware_offers_weight_only_for_linear_layers(hw) -> None:
    assert hw.weight_only_bits == (2, 4, 8) and hw.matmul_nbits_accuracy_level == 4
    assert hw.formats(LayerKind.LINEAR) == ((2, 8), (4, 8), (8, 8), (2, None), (4, None), (8, None), (None, None))
    assert hw.formats(LayerKind.CONV) == ((2, 8), (4, 8), (8, 8))
    m = hw.metrics
    layer = LayerInfo(LayerKind.LINEAR, 10, 100)
    assert m["latency"].evaluate(layer, 4, None) == pytest.approx(10 * 0.6e-6)
    assert m["size"].evaluate(layer, 4, None) == 400  # weights at 4 bits, float activations priced nowhere here
    level = loads_hardware(WO_TOML.replace("weight_only_bits = [2, 4, 8]", "weight_only_bits = [4]\n"
                                           "matmul_nbits_accuracy_level = 0"), "wo.toml")
    assert level.weight_only_bits == (4,) and level.matmul_nbits_accuracy_level == 0


@pytest.mark.parametrize(("old", "new", "message"), [
    ("weight_only_bits = [2, 4, 8]", "weight_only_bits = [3]",
     "wo.toml: target.weight_only_bits[0]: 3-bit weight-only layers have no lowering; MatMulNBits is emitted at "
     "2, 4, 8 bits"),
    ("weight_bits = [2, 4, 8]\nact_bits = [2, 4, 8]\npairs = [[2, 8], [4, 8], [8, 8]]",
     "weight_bits = [2, 4]\nact_bits = [2, 4, 8]\npairs = [[2, 8], [4, 8]]",
     "wo.toml: target.weight_only_bits[2]: 8 is not one of weight_bits [2, 4]"),
    ("weight_only_bits = [2, 4, 8]", "weight_only_bits = [4, 4]",
     "wo.toml: target.weight_only_bits: duplicate bit-widths in [4, 4]"),
    ("weight_only_bits = [2, 4, 8]", 'weight_only_bits = ["4"]',
     "wo.toml: target.weight_only_bits[0]: expected an integer bit-width"),
    ("weight_only_bits = [2, 4, 8]", "weight_only_bits = [2, 4, 8]\nmatmul_nbits_accuracy_level = 7",
     "wo.toml: target.matmul_nbits_accuracy_level: expected one of [0, 1, 2, 3, 4]"),
    (', "2xfloat" = 1.0', "", "wo.toml: metrics.latency.terms[0].values: no value for supported pair(s) 2xfloat"),
])
def test_bad_weight_only_targets_are_refused_naming_file_and_key(old, new, message) -> None:
    assert old in WO_TOML
    with pytest.raises(HardwareSpecError) as exc:
        loads_hardware(WO_TOML.replace(old, new), "wo.toml")
    assert str(exc.value).startswith(message), str(exc.value)


def test_policy_json_round_trip_of_weight_only(tmp_path) -> None:
    p = fxmpq.Policy({"fc1": (4, None), "fc2": (8, 8), "fc3": (None, None)})
    assert fxmpq.Policy.from_json(p.to_json(tmp_path / "p.json")) == p
    layers = json.loads((tmp_path / "p.json").read_text())["layers"]
    assert layers["fc1"] == {"w": 4, "a": None}
    assert repr(p).startswith("Policy({'fc1': W4Afloat")


def test_format_of_weight_only(hw) -> None:
    assert format_of(LayerKind.LINEAR, 4, None, hw) is Format.WEIGHT_ONLY
    with pytest.raises(PolicyError, match=r"weight-only\) is a format of linear layers only, not of a conv layer"):
        format_of(LayerKind.CONV, 4, None)
    plain = loads_hardware(WO_TOML.replace("weight_only_bits = [2, 4, 8]", "weight_only_bits = [4]"), "wo.toml")
    with pytest.raises(PolicyError, match=r"\(wo.toml\) does not run a linear layer as W2Afloat"):
        format_of(LayerKind.LINEAR, 2, None, plain)


def _decode(blob: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The signed integers of a MatMulNBits B [N, blocks, blob] (low bits first, default zero point 2^(b-1))."""
    per = 8 // bits
    parts = [(blob.astype(np.int32) >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return np.stack(parts, -1).reshape(blob.shape[0], -1)[:, :k] - (1 << (bits - 1))


def test_mixed_mlp_exports_weight_only_layers_as_matmul_nbits(tmp_path, hw) -> None:
    x = torch.randn(16, 5, 64)  # [B, T, K]: MatMulNBits reads any rank
    q = fxmpq.prepare(_mlp(), x, hardware=hw, bits=(2, 4, 8))
    names = q.searchable_names
    policy = dict(zip(names, [(4, None), (2, None), (8, 8), (None, None)]))
    fxmpq.apply_policy(q, policy, x)
    assert q.policy == fxmpq.Policy(policy)
    wo = {n: p[0] for n, p in policy.items() if p[1] is None and p[0] is not None}
    recs = {r.name: r for r in q.records}
    assert all(recs[n].applied.format is Format.WEIGHT_ONLY and recs[n].sites.act_quantizer is None for n in wo)
    # the LSQ integers of the weight-only layers, before lowering
    lsq = {}
    for n, b in wo.items():
        wq = q.weight_quantizer(n)
        qmin, qmax = wq.qrange(b)
        weight = q.graph_module.get_parameter(recs[n].weight).detach()
        lsq[n] = quantize(weight, wq.step_size(b).detach(), qmin, qmax).numpy().astype(np.int64)
    q.eval()
    path = tmp_path / "m.onnx"
    rep = fxmpq.lower(q, path, x[:1], LowerOptions(samples=32))
    assert rep.passed and rep.format_mismatches == ()
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(wo) and all(n.domain == "com.microsoft" for n in nodes)
    by_k = {lsq[n].shape[1]: n for n in wo}
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        name = by_k[attrs["K"]]
        assert attrs["bits"] == wo[name] and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
        assert attrs["N"] == lsq[name].shape[0]
        blob = inits[node.input[1]]
        assert blob.dtype == np.uint8 and blob.shape == (attrs["N"], -(-attrs["K"] // 32), 32 * wo[name] // 8)
        np.testing.assert_array_equal(_decode(blob, attrs["K"], wo[name]), lsq[name])
    assert json.loads({p.key: p.value for p in m.metadata_props}["fxmpq.bits"])[by_k[64]] == [4, None]
    # ONNX Runtime runs the file as written (accuracy_level 4)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        y_pt = q(x).numpy()
    assert y.shape == y_pt.shape and np.isfinite(y).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int8_activations_of_accuracy_level_4_stay_within_the_bound(tmp_path, hw, bits) -> None:
    """One weight-only layer: fp32 parity at level 0, and ONNX Runtime's level 4 within int8_activation_bound."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(72, 24)).eval()  # K = 72: padded to three blocks of 32
    x = torch.randn(32, 72)
    q = fxmpq.prepare(model, x, hardware=hw, bits=(2, 4, 8))
    fxmpq.apply_policy(q, {q.searchable_names[0]: (bits, None)}, x)
    q.eval()
    path = tmp_path / "one.onnx"
    assert fxmpq.lower(q, path, x[:1], inputs=x).passed
    y4 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    wq = q.weight_quantizer(q.searchable_names[0])
    with torch.no_grad():
        y_pt = q(x)
        weight = q.graph_module.get_parameter(q.records[0].weight)
        qmin, qmax = wq.qrange(bits)
        s = wq.step_size(bits)
        w_fq = quantize(weight, s, qmin, qmax) * s
        bound = int8_activation_bound(x, w_fq, 32)
    err = np.abs(y4 - y_pt.numpy())
    assert (err <= bound.numpy() * (1 + 1e-3) + 1e-5).all()
    assert err.max() > 0  # level 4 does quantize the activations


def test_the_search_chooses_weight_only_when_activations_are_sensitive(hw) -> None:
    x = torch.randn(4, 5, 64)
    a = fxmpq.analyze(_mlp(), x, hardware=hw)
    names = [m.name for m in a.searchable]
    ind = fxmpq.Indicators(layers=names, bits=(2, 4, 8),
                           weight={n: {2: 3.0, 4: 2.0, 8: 1.0} for n in names},
                           act={n: {2: 300.0, 4: 200.0, 8: 100.0} for n in names})
    # the latency of every layer at W8Afloat: a float layer (4.0 per MAC) would need the others at W*A8 (0.5),
    # whose activation indicators outweigh what float saves, so the optimum is weight-only at 8 bits everywhere
    budget = a.cost(fxmpq.Policy(dict.fromkeys(names, (8, None))))["latency"]
    res = fxmpq.search(a, ind, {"latency": budget})
    assert res.policy == fxmpq.Policy(dict.fromkeys(names, (8, None))), res.policy
    assert res.totals["latency"] <= budget * (1 + 1e-12)
    # and with room for float everywhere, float (indicator 0) wins
    free = a.cost(fxmpq.Policy(dict.fromkeys(names, (None, None))))["latency"]
    assert set(fxmpq.search(a, ind, {"latency": free}).policy.values()) == {(None, None)}


class _FunctionalTokens(nn.Module):
    """F.linear without a bias on [B, T, 16] tokens, then an nn.Linear head."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 16) * 0.3)
        self.head = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(torch.nn.functional.linear(x, self.w)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_functional_linear_without_bias_per_channel_steps(tmp_path, hw, per_channel) -> None:
    torch.manual_seed(2)
    x = torch.randn(8, 7, 16)
    q = fxmpq.prepare(_FunctionalTokens().eval(), x, hardware=hw, bits=(2, 4, 8), per_channel=per_channel)
    first, head = q.searchable_names
    fxmpq.apply_policy(q, {first: (4, None), head: (8, None)}, x)
    q.eval()
    rep = fxmpq.lower(q, tmp_path / "f.onnx", x[:1], LowerOptions(samples=32))
    assert rep.passed and rep.format_mismatches == ()
    m = onnx.load(str(tmp_path / "f.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == 2 and "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
