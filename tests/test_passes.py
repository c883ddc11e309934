"""Every pass on one tiny model: a golden before/after graph, what it writes into the records, `modified` honest."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from _quant_models import TinyNet
from torch import nn

from fxmpq.capture.graph import trace
from fxmpq.capture.record import META_KEY, quantizer_nodes, quantizer_record_of, records
from fxmpq.errors import ExportError, PassError
from fxmpq.hardware.spec import load_hardware
from fxmpq.passes import (
    AnnotateCostPass,
    ApplyPolicyPass,
    ContiguousBeforeReshapePass,
    InsertFakeQuantPass,
    LowerToQDQPass,
    run_passes,
)
from fxmpq.passes.qdq_ops import QDQ_OP
from fxmpq.stages import apply_policy, prepare

GOLDEN = Path(__file__).parent / "golden"
POLICY = {"conv2": (2, 3), "conv3": (4, 2)}


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FXMPQ_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"graph differs from {path} (FXMPQ_UPDATE_GOLDEN=1 rewrites it)"


def _code(gm: torch.fx.GraphModule) -> str:
    return gm.code.strip() + "\n"


def _records(gm: torch.fx.GraphModule) -> str:
    return "\n".join(f"{node.name}: {rec!r}" for node, rec in records(gm)) + "\n"


@pytest.fixture
def tiny() -> tuple[TinyNet, torch.Tensor]:
    torch.manual_seed(0)
    return TinyNet().eval(), torch.randn(2, 3, 8, 8)


def test_capture_records_every_layer(tiny) -> None:
    model, x = tiny
    gm = trace(model, x)
    _golden("capture_tiny_records.txt", _records(gm))
    assert [r.name for _, r in records(gm)] == ["conv1", "conv2", "conv3", "fc"]


def test_annotate_cost_writes_records_only(tiny) -> None:
    model, x = tiny
    gm = trace(model, x)
    before = _code(gm)
    result = run_passes(gm, [AnnotateCostPass(hardware=load_hardware("bitops"))])
    assert result.modified is False
    assert _code(result.graph_module) == before
    recs = {r.name: r for _, r in records(gm)}
    assert [n for n, r in recs.items() if r.pinned] == ["conv1", "fc"]
    assert recs["conv2"].costs[(2, 3)]["bitops"] == recs["conv2"].macs * 6
    assert set(recs["conv2"].costs) == set(load_hardware("bitops").pairs)
    _golden("annotate_cost_tiny_costs.txt", "".join(  # pins and every format's cost, layer by layer
        f"{r.name}: pinned={r.pinned} pin_bits={r.pin_bits} "
        + " ".join(f"{w}x{a}={dict(c)}" for (w, a), c in sorted(r.costs.items(), key=str)) + "\n"
        for r in recs.values()))


def test_insert_fake_quant_golden_and_sites(tiny) -> None:
    model, x = tiny
    gm = run_passes(trace(model, x), [AnnotateCostPass(hardware=load_hardware("bitops"))]).graph_module
    before = _code(gm)
    result = run_passes(gm, [InsertFakeQuantPass(bits=(2, 4))])
    assert result.modified is True and _code(result.graph_module) != before
    sites = {r.name: r.sites for _, r in records(gm)}
    assert sites["conv2"].weight_quantizer == "conv2.weight_quantizer"
    assert sites["conv2"].act_quantizer == "conv2.input_quantizer" and sites["conv2"].batchnorm == "bn2"
    assert sites["conv1"].batchnorm is None  # pinned: a plain BatchNorm
    with pytest.raises(PassError, match="quantized already"):
        run_passes(gm, [InsertFakeQuantPass(bits=(2, 4))])


def test_insert_fake_quant_without_layers_is_not_modified() -> None:
    gm = trace(nn.Sequential(nn.ReLU(), nn.Flatten()), torch.randn(2, 3))
    result = run_passes(gm, [AnnotateCostPass(hardware=load_hardware("bitops")), InsertFakeQuantPass(bits=(2,))])
    assert result.modified is False


def test_apply_policy_golden_and_idempotent(tiny) -> None:
    model, x = tiny
    q = prepare(model, x, bits=(2, 3, 4))
    before = _code(q.graph_module)
    result = run_passes(q.graph_module, [ApplyPolicyPass(policy=POLICY)])
    assert result.modified is True
    _golden("apply_policy_tiny_before.txt", before)
    _golden("apply_policy_tiny_after.txt", _code(q.graph_module))
    applied = {r.name: r.applied for _, r in records(q.graph_module)}
    assert {n: (a.w_bits, a.a_bits) for n, a in applied.items()} == {"conv1": (8, 8), **POLICY, "fc": (8, 8)}
    # conv1's ReLU feeds conv2's quantizer and the residual add, conv2's BN the add, conv3's ReLU the pooling,
    # fc the output: none reads a single quantizer, so each gets an output quantizer
    assert {n: a.output_quantizer for n, a in applied.items()} == {n: f"{n}.output_quantizer" for n in applied}
    assert applied["conv2"].bias_rounding == "conv2.bias_rounding"
    again = run_passes(q.graph_module, [ApplyPolicyPass(policy=POLICY)])
    assert again.modified is False and _code(q.graph_module) == _code(result.graph_module)


def test_apply_policy_needs_quantizers(tiny) -> None:
    model, x = tiny
    gm = run_passes(trace(model, x), [AnnotateCostPass(hardware=load_hardware("bitops"))]).graph_module
    with pytest.raises(PassError, match="run InsertFakeQuantPass first"):
        run_passes(gm, [ApplyPolicyPass(policy=POLICY)])


def test_lower_golden_and_records(tiny) -> None:
    model, x = tiny
    q = prepare(model, x, bits=(2, 3, 4))
    apply_policy(q, POLICY, x)
    gm = copy.deepcopy(q.graph_module).eval()
    before = _code(gm)
    result = run_passes(gm, [LowerToQDQPass(example_inputs=x)])
    assert result.modified is True
    _golden("lower_qdq_tiny_before.txt", before)
    _golden("lower_qdq_tiny_after.txt", _code(result.graph_module))
    lowered = {r.name: r.lowered for _, r in records(result.graph_module)}
    assert {n: (low.w_bits, low.a_bits) for n, low in lowered.items()} == {"conv1": (8, 8), **POLICY, "fc": (8, 8)}
    assert lowered["conv2"].bn_folded and lowered["conv2"].int_bias and lowered["fc"].as_conv
    assert lowered["conv2"].qrange == (-2, 1)
    # every quantize-dequantize node names its quantizer through the record, the one key fxmpq writes
    qdq = [n for n in result.graph_module.graph.nodes if n.op == "call_function" and n.target is QDQ_OP]
    assert qdq and [n for n, _ in quantizer_nodes(result.graph_module)] == qdq
    assert {quantizer_record_of(n).quantizer for n in qdq} <= {name for name, _ in gm.named_modules()} | {
        name for name, _ in q.graph_module.named_modules()}
    assert not [k for n in result.graph_module.graph.nodes for k in n.meta if k.startswith("fxmpq") and k != META_KEY]


def test_lower_without_layers_is_not_modified() -> None:
    gm = trace(nn.Sequential(nn.ReLU(), nn.Flatten()), torch.randn(2, 3)).eval()
    assert run_passes(gm, [LowerToQDQPass()]).modified is False


def test_lower_needs_a_policy_and_eval_mode(tiny) -> None:
    model, x = tiny
    q = prepare(model, x, bits=(2, 4))
    with pytest.raises(ExportError, match="needs a policy applied"):
        run_passes(copy.deepcopy(q.graph_module).eval(), [LowerToQDQPass()])
    apply_policy(q, {"conv2": (2, 2), "conv3": (4, 4)}, x)
    with pytest.raises(ExportError, match="eval mode"):
        run_passes(copy.deepcopy(q.graph_module).train(), [LowerToQDQPass()])


def test_lower_reads_the_format_from_the_record(tiny) -> None:
    """A quantizer switched after apply_policy contradicts the record: the lowering refuses, naming the layer."""
    model, x = tiny
    q = prepare(model, x, bits=(2, 3, 4))
    apply_policy(q, POLICY, x)
    q.weight_quantizer("conv2").active_bits = None  # switched off; the record says W2
    gm = copy.deepcopy(q.graph_module).eval()
    with pytest.raises(ExportError, match=r"layer conv2: its applied policy is integer W2 but its weight quantizer "
                                          r"is off"):
        run_passes(gm, [LowerToQDQPass(example_inputs=x)])


class _Heads(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], -1) + x.permute(0, 2, 1).flatten(1)


def test_contiguous_before_reshape_golden() -> None:
    gm = trace(_Heads(), torch.randn(2, 3, 4))
    before = _code(gm)
    result = run_passes(gm, [ContiguousBeforeReshapePass()])
    assert result.modified is True
    _golden("contiguous_reshape_before.txt", before)
    _golden("contiguous_reshape_after.txt", _code(result.graph_module))
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(result.graph_module(x), _Heads()(x), rtol=0, atol=0)
    assert run_passes(result.graph_module, [ContiguousBeforeReshapePass()]).modified is False  # idempotent
    plain = trace(nn.Flatten(), torch.randn(2, 3, 4))
    assert run_passes(plain, [ContiguousBeforeReshapePass()]).modified is False
