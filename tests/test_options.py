"""quantize()'s and lower()'s options as objects: at most 12 parameters, the old keywords folded in under a DeprecationWarning,
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


def test_lower_takes_its_checks_as_one_object_and_the_old_keywords_still_work(tmp_path) -> None:
    """lower(check=False) folds into LowerOptions(check=False) with a DeprecationWarning pointing at the caller;
    the two spellings write the same file; a keyword lower() never had is a TypeError, both spellings at once an
    ArgumentError."""
    from _quant_models import TinyNet

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    q = fxmpq.prepare(TinyNet(), x, bits=(4, 8))
    fxmpq.apply_policy(q, {name: (8, 8) for name in q.layer_names}, x)
    opts = fxmpq.LowerOptions(samples=4, batch=4, measure=False)
    assert len(inspect.signature(fxmpq.lower).parameters) <= 6
    new = fxmpq.lower(q, tmp_path / "new.onnx", x, opts)
    with pytest.warns(DeprecationWarning, match=r"lower\(samples=, batch=, measure=\) is deprecated: pass "
                                                r"LowerOptions\(samples=...\), .* as options=") as rec:
        old = fxmpq.lower(q, tmp_path / "old.onnx", x, samples=4, batch=4, measure=False)
    assert rec[0].filename == __file__
    assert (
        new.passed and old.passed and new.samples == old.samples == 4 and new.max_abs_diff == old.max_abs_diff
    )
    assert (tmp_path / "new.onnx").read_bytes() == (tmp_path / "old.onnx").read_bytes()
    with pytest.raises(TypeError, match="lower\\(\\) got an unexpected keyword argument 'tolerance'"):
        fxmpq.lower(q, tmp_path / "x.onnx", x, tolerance=2)
    with pytest.raises(fxmpq.ArgumentError, match="lower: check= and options= both given"):
        fxmpq.lower(q, tmp_path / "x.onnx", x, opts, check=False)
    with pytest.raises(
        fxmpq.ArgumentError, match=r"lower: options= must be a fxmpq\.LowerOptions, found dict"
    ):
        fxmpq.lower(q, tmp_path / "x.onnx", x, {"check": False})


def test_the_trainings_share_train_options_and_the_old_keywords_still_work() -> None:
    """train_indicators() and finetune() take the TrainOptions quantize() takes; their old keywords fold in under a
    DeprecationWarning (`epochs` is each training's own field), an unknown one is a TypeError, and a field given
    both ways an ArgumentError naming it."""
    from _quant_models import TinyNet

    for fn in (fxmpq.train_indicators, fxmpq.finetune):
        assert "train" in inspect.signature(fn).parameters and len(inspect.signature(fn).parameters) <= 10
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    data = [(x, torch.randint(0, 10, (4,)))]
    q = fxmpq.prepare(TinyNet(), x, bits=(4, 8))
    with pytest.warns(DeprecationWarning, match=r"train_indicators\(epochs=, progress=\) is deprecated: pass "
                                                r"TrainOptions\(indicator_epochs=...\), TrainOptions\(progress=...\)"):
        fxmpq.train_indicators(q, data, epochs=1, progress=False)
    with pytest.raises(fxmpq.ArgumentError, match=r"indicators: indicator_epochs must be an integer >= 0"):
        fxmpq.train_indicators(q, data, fxmpq.TrainOptions(indicator_epochs=-1, progress=False))
    fxmpq.apply_policy(q, {name: (8, 8) for name in q.layer_names}, x)
    stats = fxmpq.finetune(q, data, fxmpq.TrainOptions(finetune_epochs=2, progress=False))
    assert stats.epochs == 2 and stats.steps == 2
    with pytest.warns(DeprecationWarning, match=r"finetune\(epochs=, progress=\) is deprecated: pass "
                                                r"TrainOptions\(finetune_epochs=...\)"):
        fxmpq.finetune(q, data, epochs=1, progress=False)
    with pytest.raises(TypeError, match=r"finetune\(\) got an unexpected keyword argument 'epoch'"):
        fxmpq.finetune(q, data, epoch=1)
    with pytest.raises(fxmpq.ArgumentError, match=r"finetune: finetune_epochs= given twice \(as epochs= and finetune_epochs=\)"):
        fxmpq.finetune(q, data, epochs=1, finetune_epochs=1)
    with pytest.raises(fxmpq.ArgumentError, match=r"finetune: lr= and train= both given"):
        fxmpq.finetune(q, data, fxmpq.TrainOptions(), lr=0.1)
