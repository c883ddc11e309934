"""Accuracy targets (`drop<=1%`): strict parsing, and every mistake refused with one error before any training."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import PlainCNN

import fxmpq
import fxmpq.pipeline as pipeline
from fxmpq import ArgumentError, Budget, BudgetError
from fxmpq.cli.main import main
from fxmpq.policy_search.targets import parse_goal

X = torch.randn(1, 3, 16, 16)
DATA = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))] * 2


@pytest.mark.parametrize("text,drop,budget", [
    ("drop<=1%", 0.01, None),
    (" drop <= 0.5 % ", 0.005, None),
    ("DROP<=2%&c8", 0.02, Budget.compression(8)),
    ("w4a4 & drop<=0%", 0.0, Budget.uniform(4, 4)),
    ("w3a4&c12.2", None, Budget.uniform(3, 4) & Budget.compression(12.2)),
])
def test_good_goals(text, drop, budget) -> None:
    goal = parse_goal(text)
    assert goal.max_drop == (None if drop is None else pytest.approx(drop))
    assert goal.budget == budget


@pytest.mark.parametrize("text,match", [
    ("drop<=1", r"^budget 'drop<=1': 'drop<=1' needs a % sign"),
    ("drop<1%", r"^budget 'drop<1%': cannot read 'drop<1%'; write it as drop<=X%"),
    ("drop>=1%", r"^budget 'drop>=1%': cannot read 'drop>=1%'"),
    ("drop<=x%", r"^budget 'drop<=x%': 'x' in 'drop<=x%' is not a number of percentage points"),
    ("drop<=%", r"^budget 'drop<=%': 'nothing' in 'drop<=%' is not a number"),
    ("drop<=-1%", r"^budget 'drop<=-1%': a top-1 drop of -1 percentage points is impossible"),
    ("drop<=150%", r"^budget 'drop<=150%': a top-1 drop of 150 percentage points is impossible"),
    ("drop<=1%&drop<=2%", r"^budget 'drop<=1%&drop<=2%': more than one drop target"),
    ("drop<=1%&", r"^budget 'drop<=1%&': an empty term"),
    ("drop<=1%&c0.5", r"compression ratio 0.5 is below 1"),
])
def test_bad_goals_are_one_budget_error(text, match) -> None:
    with pytest.raises(BudgetError, match=match) as e:
        parse_goal(text)
    assert "\n" not in str(e.value)


@pytest.fixture
def no_training(monkeypatch):
    """Any training is an error: the checks must fire first."""
    def boom(*a, **k):
        raise AssertionError("training started before the input was checked")
    monkeypatch.setattr(pipeline, "train_indicators", boom)
    monkeypatch.setattr(pipeline, "finetune", boom)


@pytest.mark.parametrize("kwargs,cls,match", [
    ({"budget": "drop<=1%"}, ArgumentError, "the drop is measured against the FP32 model's top-1 on validation "
                                            "data, and there is none"),
    ({"budget": "drop<=1%", "val_data": DATA, "verify": 0}, ArgumentError, "which verify=0 turns off"),
    ({"budget": "drop<=1%", "val_data": DATA, "minimize": "flops"}, BudgetError,
     "minimize='flops' is not a metric of hardware 'bitops'; its metrics: bitops, size"),
    ({"budget": "w4a4", "minimize": "size"}, ArgumentError, "minimize='size' goes with an accuracy target"),
    ({"budget": "drop<=1", "val_data": DATA}, BudgetError, "needs a % sign"),
    ({"budget": "drop<=1%&bitops<=1", "val_data": DATA}, fxmpq.InfeasibleBudget, "no policy meets the budget"),
    ({"budget": "w4a4", "verify": -1}, ArgumentError, "verify must be a number of candidate policies >= 0"),
    ({"budget": "w4a4", "verify": "yes"}, ArgumentError, "verify must be a number"),
    ({"budget": "w4a4", "verify_batches": 0}, ArgumentError, "verify_batches must be None or an integer >= 1"),
    ({"budget": "w4a4", "train": fxmpq.TrainOptions(joint_passes="half", progress=False)}, ArgumentError,
     "joint_passes must be one of 'all', 'sandwich', found 'half'"),
])
def test_quantize_refuses_before_training(kwargs, cls, match, no_training, capfd) -> None:
    with pytest.raises(cls, match=match):
        fxmpq.quantize(PlainCNN(), data=DATA, example_inputs=X, **({"progress": False} if "train" not in kwargs else {}),
                       **kwargs)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("extra,start", [
    (["--budget", "drop<=1%", "--val-fraction", "1.5"], "fxmpq quantize: error: --val-fraction 1.5: expected a "
                                                        "fraction between 0 and 1"),
    (["--budget", "drop<=1%", "--val-fraction", "0.1", "--val-samples", "8"], "fxmpq quantize: error: "
                                                                              "--val-samples limits"),
    (["--budget", "drop<=1%", "--verify", "0"], "fxmpq quantize: error: --budget drop<=1%: an accuracy target is "
                                                "met by measuring"),
    (["--budget", "drop<=1%", "--minimize", "flops"], "fxmpq quantize: error: --minimize flops: not a metric of "
                                                      "hardware 'bitops'"),
    (["--budget", "w3a3", "--minimize", "size"], "fxmpq quantize: error: --minimize size: goes with an accuracy "
                                                 "target"),
    (["--budget", "drop<=one%"], "fxmpq quantize: error: budget 'drop<=one%': 'one' in 'drop<=one%' is not a number"),
])
def test_cli_refuses_in_one_line(extra, start, tmp_path, capfd, monkeypatch) -> None:
    monkeypatch.setattr("fxmpq.cli.quantize.quantize", lambda *a, **k: pytest.fail("quantize() was called"))
    argv = ["quantize", "small_mobilenet", "--dataset", "digits", "--work-dir", str(tmp_path / "w"), "--quiet",
            *extra]
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code = main(argv)
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert err.startswith(start), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_drop_needs_validation_data(tmp_path, capfd, monkeypatch) -> None:
    """A user's dataset has no test split: a drop target without --val-fraction is refused before any work."""
    monkeypatch.setattr("fxmpq.cli.quantize.quantize", lambda *a, **k: pytest.fail("quantize() was called"))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tinydata.py").write_text("import torch\nfrom torch.utils.data import TensorDataset\n"
                                          "def make():\n    return TensorDataset(torch.randn(20, 1, 16, 16), "
                                          "torch.randint(0, 10, (20,)))\n")
    code = main(["quantize", "small_mobilenet", "--dataset", "tinydata:make", "--input", "1x16x16", "--budget",
                 "drop<=1%", "--work-dir", str(tmp_path / "w"), "--quiet"])
    err = capfd.readouterr().err
    assert code == 2 and "--dataset tinydata:make has none; hold some out with --val-fraction F" in err, err
