"""Tests of fxmpq.Policy: construction, validation messages, completion, JSON round-trip, average bits."""

from __future__ import annotations

import json

import pytest
import torch
from models import GroupedNet, PlainCNN

from fxmpq import Analysis, Policy, PolicyError, analyze


@pytest.fixture(scope="module")
def grouped() -> Analysis:
    return analyze(GroupedNet(), torch.randn(1, 3, 8, 8))


@pytest.fixture(scope="module")
def a100() -> Analysis:
    return analyze(PlainCNN(), torch.randn(1, 3, 16, 16), hardware="a100_int")


def test_uniform_keeps_pins(grouped):
    p = Policy.uniform(grouped, 3, 5)
    assert dict(p) == {"conv": (8, 8), "grouped": (3, 5), "depthwise": (3, 5), "pointwise": (3, 5), "fc": (8, 8)}
    p.validate(grouped)


def test_uniform_rejects_unsupported_bits(a100):
    with pytest.raises(PolicyError) as exc:
        Policy.uniform(a100, 4, 8)
    assert str(exc.value) == "uniform W4A8 is not a pair hardware 'a100_int' runs; supported pairs: W4A4, W8A8"


def test_complete_fills_in_pinned_layers(grouped):
    p = Policy({"grouped": (2, 2), "depthwise": (4, 4), "pointwise": (8, 2)})
    full = p.complete(grouped)
    assert list(full) == grouped.names
    assert full["conv"] == (8, 8) and full["fc"] == (8, 8) and full["pointwise"] == (8, 2)


def test_validate_lists_every_problem(grouped):
    p = Policy({"grouped": (2, 2), "depthwise": (9, 4), "conv": (4, 4), "bogus": (4, 4), "nope": (2, 2)})
    with pytest.raises(PolicyError) as exc:
        p.validate(grouped)
    assert str(exc.value) == (
        "policy does not fit the model: unknown layer(s): bogus, nope; "
        "searchable layer(s) without bits: pointwise; "
        "bits hardware 'bitops' does not run: depthwise W9A4 (supported pairs: "
        + ", ".join(f"W{w}A{a}" for w, a in grouped.hardware.pairs) + "); "
        "pinned layer(s) given other bits: conv W4A4 (pinned at W8A8)"
    )


def test_validate_unsupported_pair_on_a100(a100):
    with pytest.raises(PolicyError) as exc:
        Policy({"conv2": (4, 8)}).validate(a100)
    assert str(exc.value) == ("policy does not fit the model: bits hardware 'a100_int' does not run: conv2 W4A8 "
                              "(supported pairs: W4A4, W8A8)")
    Policy({"conv2": (4, 4)}).validate(a100)


@pytest.mark.parametrize(("bits", "message"), [
    ({3: (4, 4)}, "policy keys must be layer names (strings), found 3"),
    ({"a": 4}, "policy entry 'a' must be a (w_bits, a_bits) pair, found 4"),
    ({"a": (4, 4, 4)}, "policy entry 'a' must be a (w_bits, a_bits) pair, found (4, 4, 4)"),
    ({"a": (4.0, 4)}, "policy entry 'a' must hold integer bits 1..32, found (4.0, 4) (or (None, None) for a layer left in float)"),
    ({"a": (True, 4)}, "policy entry 'a' must hold integer bits 1..32, found (True, 4) (or (None, None) for a layer left in float)"),
])
def test_constructor_rejects_malformed_entries(bits, message):
    with pytest.raises(PolicyError) as exc:
        Policy(bits)
    assert str(exc.value) == message


def test_policy_is_a_frozen_hashable_mapping():
    p = Policy({"a": (4, 4), "b": (2, 8)})
    assert len(p) == 2 and p["b"] == (2, 8) and list(p) == ["a", "b"]
    assert p == Policy({"b": (2, 8), "a": (4, 4)}) and hash(p) == hash(Policy({"b": (2, 8), "a": (4, 4)}))
    assert p != {"a": (4, 4), "b": (2, 8)}
    with pytest.raises(TypeError):
        p.bits["c"] = (1, 1)  # type: ignore[index]
    with pytest.raises(AttributeError):
        p.bits = {}  # type: ignore[misc]
    assert repr(p) == "Policy({'a': W4A4, 'b': W2A8})"


def test_json_round_trip_text_and_file(tmp_path, grouped):
    p = Policy.uniform(grouped, 4, 6)
    text = p.to_json()
    data = json.loads(text)
    assert data["format"] == "fxmpq.policy/1"
    assert data["layers"]["grouped"] == {"w": 4, "a": 6}
    assert Policy.from_json(text) == p
    path = tmp_path / "policy.json"
    p.to_json(path)
    assert Policy.from_json(path) == p
    assert Policy.from_json(str(path)) == p
    assert list(Policy.from_json(path)) == list(p)  # order kept
    p.to_json(path)  # overwriting goes through a temp file in the same folder, removed by the rename
    assert [f.name for f in tmp_path.iterdir()] == ["policy.json"]


def test_from_json_errors(tmp_path):
    with pytest.raises(PolicyError) as exc:
        Policy.from_json(tmp_path / "missing.json")
    assert str(exc.value) == f"cannot read policy file {tmp_path / 'missing.json'}: No such file or directory"
    with pytest.raises(PolicyError) as exc:
        Policy.from_json('{"layers": ')
    assert str(exc.value) == "<text>: not valid JSON (Expecting value at line 1)"
    with pytest.raises(PolicyError) as exc:
        Policy.from_json('{"format": "fxmpq.policy/1"}')
    assert str(exc.value) == ('<text>: expected {"format": "fxmpq.policy/1", "layers": '
                              '{name: {"w": .., "a": ..}}}')
    with pytest.raises(PolicyError) as exc:
        Policy.from_json('{"layers": {"conv": {"w": 4}}}')
    assert str(exc.value) == """<text>: layers.conv: expected {"w": bits, "a": bits}, found {'w': 4}"""
    with pytest.raises(PolicyError) as exc:
        Policy.from_json('{"layers": {"conv": {"w": 4, "a": "8"}}}')
    assert str(exc.value) == "<text>: policy entry 'conv' must hold integer bits 1..32, found (4, '8') (or (None, None) for a layer left in float)"


def test_average_bits(grouped):
    p = Policy({"grouped": (2, 8), "depthwise": (4, 4), "pointwise": (8, 2)})
    layers = {m.name: m for m in grouped.searchable}
    params = sum(m.params for m in layers.values())
    macs = sum(m.macs for m in layers.values())
    w, a = p.average_bits(grouped)
    assert w == pytest.approx((2 * layers["grouped"].params + 4 * layers["depthwise"].params
                               + 8 * layers["pointwise"].params) / params)
    assert a == pytest.approx((8 * layers["grouped"].macs + 4 * layers["depthwise"].macs
                               + 2 * layers["pointwise"].macs) / macs)
    full = p.complete(grouped)
    w_all, _ = full.average_bits(grouped, searchable_only=False)
    assert w_all > w  # the pinned 8-bit layers raise the mean
