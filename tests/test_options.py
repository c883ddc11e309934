"""quantize()'s options as objects: at most 12 parameters, the old keywords folded in under a DeprecationWarning,
and one clear error for a keyword it never had, a wrong object, or a field given twice."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import fxmpq
from fxmpq.pipeline import _options


def test_quantize_takes_at_most_12_parameters() -> None:
    assert len(inspect.signature(fxmpq.quantize).parameters) <= 12


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        fxmpq.TrainOptions().lr = 1.0  # type: ignore[misc]


def test_old_keywords_fold_into_the_objects_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match=r"quantize\(bits=, lr=, alpha=\) is deprecated: pass "
                                                r"QuantOptions\(bits=...\), TrainOptions\(lr=...\)"):
        q, s, t = _options(None, None, None, {"bits": (2, 4), "lr": 0.5, "alpha": 1.0})
    assert q == fxmpq.QuantOptions(bits=(2, 4)) and s == fxmpq.SearchOptions(alpha=1.0)
    assert t == fxmpq.TrainOptions(lr=0.5)


def test_objects_alone_warn_nothing() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, s, t = _options(fxmpq.QuantOptions(per_channel=True), None, fxmpq.TrainOptions(seed=3), {})
    assert q.per_channel and s == fxmpq.SearchOptions() and t.seed == 3


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"epochs": 3}, TypeError, "quantize() got an unexpected keyword argument 'epochs'"),
    ({"train": {"lr": 0.1}}, fxmpq.ArgumentError, "quantize: train= must be a fxmpq.TrainOptions, found dict"),
    ({"train": fxmpq.TrainOptions(), "lr": 0.1}, fxmpq.ArgumentError,
     "quantize: lr= and train= both given; set it in the TrainOptions only"),
])
def test_bad_options_fail_before_any_work(kwargs, error, message) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(error) as e:
        fxmpq.quantize(model, "w4a4", [(torch.randn(2, 4), torch.tensor([0, 1]))], torch.randn(1, 4), **kwargs)
    assert str(e.value) == message


def test_verification_defaults_to_accuracy_targets_only() -> None:
    """verify=None: 16 candidates for a drop<= target (it needs the measurement), none under a cost budget (the
    search's optimum measured better there, docs/RESULTS.md section 6); explicit values as given."""
    from fxmpq.pipeline import _verify_count

    assert fxmpq.SearchOptions().verify is None
    assert _verify_count(None, True) == 16 and _verify_count(None, False) == 0
    assert _verify_count(True, False) == 16 and _verify_count(False, True) == 0 and _verify_count(5, False) == 5
