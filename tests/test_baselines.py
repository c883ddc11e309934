"""fxmpq.policy_search.baselines: the random and inverted indicators bench_policy compares the learned ones with."""

from __future__ import annotations

import fxmpq
from fxmpq.policy_search.baselines import inverted_indicators, random_indicators


def _indicators() -> fxmpq.Indicators:
    layers = ("a", "b", "c")
    weight = {"a": {2: 9.0, 4: 3.0}, "b": {2: 5.0, 4: 2.0}, "c": {2: 1.0, 4: 0.5}}
    act = {"a": {2: 1.0, 4: 0.1}, "b": {2: 4.0, 4: 0.4}, "c": {2: 2.0, 4: 0.2}}
    return fxmpq.Indicators(layers=layers, bits=(2, 4), weight=weight, act=act)


def test_inverted_indicators_reverse_the_sensitivity_order():
    inv = inverted_indicators(_indicators())
    assert inv.weight["a"] == {2: 1.0, 4: 0.5} and inv.weight["c"] == {2: 9.0, 4: 3.0}
    assert inv.weight["b"] == {2: 5.0, 4: 2.0}
    assert inv.act["b"] == {2: 1.0, 4: 0.1} and inv.act["a"] == {2: 4.0, 4: 0.4}


def test_random_indicators_are_seeded_and_decrease_with_bits():
    one = random_indicators(("a", "b"), (2, 3, 4), seed=7)
    assert one == random_indicators(("a", "b"), (2, 3, 4), seed=7)
    assert one != random_indicators(("a", "b"), (2, 3, 4), seed=8)
    for table in (one.weight, one.act):
        for row in table.values():
            assert row[2] > row[3] > row[4] > 0
