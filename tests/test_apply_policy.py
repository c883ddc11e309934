"""ApplyPolicyPass: fixed quantizers, output quantizers where a layer feeds no quantizer, exact bias rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from models import PlainCNN, ResidualNet

from fxmpq.errors import PolicyError
from fxmpq.kernels import BiasRounding
from fxmpq.passes import ApplyPolicyPass, LowerToQDQPass, run_passes
from fxmpq.quant import LSQQuantizer
from fxmpq.record import records
from fxmpq.stages import apply_policy, prepare

BITS = (2, 3, 4, 5, 6, 7, 8)


def _prepared(model_cls, per_channel=False):
    x = torch.randn(8, 3, 16, 16)
    return prepare(model_cls().eval(), x, bits=BITS, per_channel=per_channel), x


def _policy(q, w=3, a=5):
    return {n: (w, a) for n in q.searchable_names}


def _added(q):
    """The output quantizers ApplyPolicyPass recorded."""
    return sorted(r.applied.output_quantizer for _, r in records(q.graph_module) if r.applied.output_quantizer)


def test_fixes_every_quantizer_and_batchnorm():
    q, x = _prepared(PlainCNN)
    apply_policy(q, _policy(q), x)
    for name in q.layer_names:
        assert len(q.weight_quantizer(name).bits) == 1
        assert len(q.act_quantizer(name).bits) == 1
        assert q.weight_quantizer(name).step.shape[0] == 1
    assert q.weight_quantizer("conv2").active_bits == 3
    assert q.act_quantizer("conv2").active_bits == 5
    assert q.batchnorm("conv1") is None  # the pinned first layer keeps a plain BatchNorm


class _ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 4, 3)
        self.conv = torch.nn.Conv2d(4, 6, 3)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(self.conv0(x))).mean((2, 3)))


def test_keeps_only_the_policy_batchnorm():
    x = torch.randn(4, 3, 10, 10)
    q = prepare(_ConvBN().eval(), x, bits=BITS)
    apply_policy(q, _policy(q, 6, 4), x)
    bn = q.batchnorm("conv")
    assert bn is not None and len(bn.bns) == 1 and bn.bits == (6,) and bn.active_bits == 6


def test_output_quantizers_only_where_no_quantizer_follows():
    q, _ = _prepared(PlainCNN)
    assert run_passes(q.graph_module, [ApplyPolicyPass(policy=_policy(q))]).modified
    # conv1 -> bn -> relu -> conv2's input quantizer: nothing added; conv2 -> relu -> pool: unsigned 8-bit after
    # the relu; fc -> graph output: signed 8-bit
    assert _added(q) == ["conv2.output_quantizer", "fc.output_quantizer"]
    oq = q.graph_module.get_submodule("conv2.output_quantizer")
    assert isinstance(oq, LSQQuantizer) and oq.active_bits == 8 and not oq.signed
    assert q.graph_module.get_submodule("fc.output_quantizer").signed
    node = next(n for n in q.graph_module.graph.nodes if n.target == "conv2.output_quantizer")
    assert node.args[0].op == "call_function" and "relu" in str(node.args[0].target)


def test_shared_input_gets_output_quantizer_and_pass_is_idempotent():
    q, _ = _prepared(ResidualNet)
    run_passes(q.graph_module, [ApplyPolicyPass(policy=_policy(q))])
    # the stem's ReLU feeds two input quantizers (conv1, shortcut): ORT fuses only into one QuantizeLinear
    added = _added(q)
    assert "stem.output_quantizer" in added
    assert "conv2.output_quantizer" in added and "shortcut.output_quantizer" in added
    code = q.graph_module.code
    assert run_passes(q.graph_module, [ApplyPolicyPass(policy=_policy(q))]).modified is False
    assert _added(q) == added
    assert q.graph_module.code == code


def test_policy_outside_fixed_bits_is_refused():
    q, x = _prepared(PlainCNN)
    apply_policy(q, _policy(q, 3, 5), x)
    with pytest.raises(PolicyError, match="bits"):
        apply_policy(q, _policy(q, 4, 4), x)


def test_output_bits_validated():
    q, _ = _prepared(PlainCNN)
    from fxmpq.errors import PassError
    with pytest.raises(PassError, match="output_bits"):
        ApplyPolicyPass(policy=_policy(q), output_bits=16)


def test_bias_rounding_makes_simulation_equal_the_integer_graph():
    q, x = _prepared(PlainCNN, per_channel=True)
    apply_policy(q, _policy(q, 4, 3), x)
    q.eval()
    assert any(isinstance(m, BiasRounding) for m in q.modules())
    low = run_passes(copy.deepcopy(q.graph_module).eval(), [LowerToQDQPass(example_inputs=x)]).graph_module
    xs = torch.randn(256, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(xs), low(xs))
    # in training mode the rounding term is off (the float bias and BN train)
    q.train()
    r = next(m for m in q.modules() if isinstance(m, BiasRounding))
    y = torch.randn(2, 8, 4, 4)
    assert r(y, torch.tensor(0.1), torch.ones(8) * 0.05, bias=torch.randn(8)) is y
