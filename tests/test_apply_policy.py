"""ApplyPolicyPass: fixed quantizers, output quantizers where a layer feeds no quantizer, exact bias rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from models import PlainCNN, ResidualNet

from fxmpq.capture.record import records
from fxmpq.errors import PolicyError
from fxmpq.passes import ApplyPolicyPass, LowerToQDQPass, run_passes
from fxmpq.quant.kernels import AddRounding, BiasRounding
from fxmpq.quant.lsq import LSQQuantizer
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


def test_layers_reading_one_tensor_at_the_same_bits_share_one_quantizer_and_pass_is_idempotent():
    q, _ = _prepared(ResidualNet)
    run_passes(q.graph_module, [ApplyPolicyPass(policy=_policy(q))])
    # the stem's ReLU feeds conv1 and the shortcut, both at 5 bits: one quantizer (conv1's, the first) for both,
    # so the stem needs no output quantizer (ORT fuses it into that one QuantizeLinear)
    gm = q.graph_module
    assert q.sites["shortcut"].act_quantizer == q.sites["conv1"].act_quantizer == "conv1.input_quantizer"
    assert not hasattr(gm.get_submodule("shortcut"), "input_quantizer")
    calls = [n for n in gm.graph.nodes if n.target == "conv1.input_quantizer"]
    assert len(calls) == 1 and {u.target for u in calls[0].users} == {"conv1", "shortcut"}
    added = _added(q)
    assert added == ["conv2.output_quantizer", "fc.output_quantizer", "shortcut.output_quantizer"]
    # the residual sum of two quantized tensors: simulated as the QLinearAdd it runs as, its output quantized
    sums = gm.get_submodule("fxmpq_sums")
    assert [n for n, _ in sums.named_children()] == ["add"]
    assert isinstance(sums.get_submodule("add.rounding"), AddRounding)
    assert not sums.get_submodule("add.output_quantizer").signed  # after the ReLU
    assert dict(q.policy) == {**_policy(q), "stem": (8, 8), "fc": (8, 8)}
    code = gm.code
    assert run_passes(gm, [ApplyPolicyPass(policy=_policy(q))]).modified is False
    assert _added(q) == added
    assert gm.code == code


def test_layers_reading_one_tensor_at_different_bits_keep_their_quantizers():
    q, _ = _prepared(ResidualNet)
    run_passes(q.graph_module, [ApplyPolicyPass(policy={**_policy(q), "shortcut": (3, 4)})])
    # conv1 (5 bits) and the shortcut (4 bits) quantize the stem's ReLU differently: the stem gets an 8-bit
    # output quantizer that both requantize
    assert q.sites["shortcut"].act_quantizer == "shortcut.input_quantizer"
    assert q.sites["conv1"].act_quantizer == "conv1.input_quantizer"
    assert "stem.output_quantizer" in _added(q)
    oq = next(n for n in q.graph_module.graph.nodes if n.target == "stem.output_quantizer")
    assert {u.target for u in oq.users} == {"conv1.input_quantizer", "shortcut.input_quantizer"}


class _PoolStem(torch.nn.Module):
    """resnet's stem and first block: conv BN ReLU, max pool, a basic block whose input is also its identity."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.stem(x))))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_a_max_pool_is_quantized_once_before_and_after_and_the_identity_reads_the_same_quantizer():
    x = torch.randn(8, 3, 16, 16)
    q = prepare(_PoolStem().eval(), x, bits=(8,))
    apply_policy(q, {n: (8, 8) for n in q.searchable_names}, x)
    gm = q.graph_module
    calls = [n for n in gm.graph.nodes if n.target == "conv1.input_quantizer"]
    # one quantizer before the pool (the stem's output: ORT fuses the stem into it) and after (ORT pools uint8)
    assert [c.args[0].target for c in calls] == [torch.relu, "pool"]
    applied = {r.name: r.applied for _, r in records(gm)}
    assert applied["stem"].output_quantizer == "conv1.input_quantizer"
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    assert calls[1] in add.args  # the identity is the quantized pooled tensor
    rounding = next(iter(add.users))
    assert isinstance(gm.get_submodule(rounding.target), AddRounding)
    code = gm.code
    assert run_passes(gm, [ApplyPolicyPass(policy={n: (8, 8) for n in q.searchable_names})]).modified is False
    assert gm.code == code


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


class _SumFirst(torch.nn.Module):
    """A tensor whose first reader in graph order is a sum, the layer reading it after: the shared quantizer
    must move before the sum."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        s = h + h
        return self.fc((s + self.conv(h)).mean((2, 3)))


def test_shared_quantizer_moves_before_readers_that_come_first():
    x = torch.randn(8, 3, 8, 8)
    q = prepare(_SumFirst().eval(), x, bits=(8,))
    apply_policy(q, {n: (8, 8) for n in q.searchable_names}, x)  # run_passes lints the graph
    gm = q.graph_module
    call = next(n for n in gm.graph.nodes if n.target == "conv.input_quantizer")
    first_sum = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    assert first_sum.args == (call, call)
    with torch.no_grad():
        assert q(x).shape == (8, 4)


def test_the_pass_and_policy_validate_share_one_check():
    """ApplyPolicyPass and Policy.validate report a bad policy in the same words (cost/policy.py policy_problems)."""
    from fxmpq.cost.policy import Policy

    q, x = _prepared(PlainCNN)
    bad = {**_policy(q), "ghost": (4, 4), q.searchable_names[0]: (9, 4)}
    with pytest.raises(PolicyError) as by_validate:
        Policy(bad).validate(q.analysis)
    with pytest.raises(PolicyError) as by_pass:
        apply_policy(q, bad, x)
    assert str(by_pass.value) == str(by_validate.value)
    assert "unknown layer(s): ghost" in str(by_pass.value) and "W9A4" in str(by_pass.value)
