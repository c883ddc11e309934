"""quantize() with validation data on digits (a few steps): candidates verified and written, the most accurate
fine-tuned, reused on resume; a drop<= target walks the front and reports its estimated and final drop."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import fxmpq
import fxmpq.policy_search.selection as selection
from fxmpq import CandidateSet, Policy
from fxmpq.cli.main import main
from fxmpq.core.datasets import load_digits

X = torch.randn(1, 1, 16, 16)
KW = {"max_steps": 1, "finetune_epochs": 0, "progress": False, "export": False, "checkpoint_every": None}


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    train = [(d.train_x[i:i + 16], d.train_y[i:i + 16]) for i in range(0, 32, 16)]
    val = [(d.test_x[i:i + 16], d.test_y[i:i + 16]) for i in range(0, 32, 16)]
    return train, val


def _model() -> nn.Module:
    """Four convolutions and a head on 1x16x16 digits (first and last pinned: three searchable layers)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_quantize_verifies_candidates_and_fine_tunes_the_most_accurate(digits, tmp_path, monkeypatch) -> None:
    train, val = digits
    r = fxmpq.quantize(_model(), "w4a4", train, X, val_data=val, work_dir=tmp_path, verify=6, **KW)
    cs = CandidateSet.from_json(tmp_path / "candidates.json")
    assert cs == r.candidates and len(cs) == 6 and cs.samples == 32
    accs = [c.accuracy for c in cs]
    assert all(a is not None for a in accs)
    assert cs.best.accuracy == max(accs)
    assert r.policy == cs.best.policy == Policy.from_json(tmp_path / "policy.json")
    # search.json keeps what the ILP proved; the policy in use is among the verified candidates
    searched = json.loads((tmp_path / "search.json").read_text())
    assert Policy.from_json(json.dumps(searched["policy"])) == r.search.policy == cs[0].policy
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verified"]["chosen"] == cs.chosen and summary["totals"] == r.analysis.cost(r.policy)
    assert "verified 6 of 6 candidate policies on 32 held-out samples" in r.report()

    def no_verify(*a, **k):
        raise AssertionError("verified again although the work dir holds the candidates of these settings")
    monkeypatch.setattr(selection, "verify", no_verify)
    again = fxmpq.quantize(_model(), "w4a4", train, X, val_data=val, work_dir=tmp_path, verify=6, **KW)
    assert again.policy == r.policy and again.candidates == cs


def test_verify_off_fine_tunes_the_search_optimum(digits) -> None:
    train, val = digits
    r = fxmpq.quantize(_model(), "w4a4", train, X, val_data=val, verify=False, **KW)
    assert r.candidates is None and r.policy == r.search.policy and "verified" not in r.report()


def test_a_drop_target_takes_the_cheapest_within_it(digits, tmp_path) -> None:
    train, val = digits
    r = fxmpq.quantize(_model(), "drop<=100%", train, X, val_data=val, work_dir=tmp_path, verify=4,
                       minimize="size", **KW)
    cs = r.candidates
    assert cs.metric == "size" and cs.max_drop == 1.0 and cs.target_met
    sizes = [c.totals["size"] for c in cs]
    assert sizes == sorted(sizes) and cs.chosen == 0  # every candidate meets 100 %: the cheapest, alone measured
    assert [c.accuracy is None for c in cs][:2] == [False, True]
    assert r.policy == cs.best.policy and r.analysis.cost(r.policy)["size"] == min(sizes)
    report = r.report()
    assert "target: drop <= 100.00 pp; estimated drop" in report and "final drop" in report
    assert "within the target" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target"]["max_drop"] == 1.0 and summary["target"]["final_within"] is True
    worse = dataclasses.replace(r, candidates=dataclasses.replace(cs, max_drop=0.0), fp32_accuracy=1.0,
                                accuracy=0.5)
    assert "final drop 50.00 pp: MISSES the target" in worse.report()


def test_cli_drop_target_with_a_held_out_fraction(tmp_path, capsys) -> None:
    code = main(["quantize", "small_mobilenet", "--dataset", "digits", "--budget", "drop<=100%", "--val-fraction",
                 "0.25", "--samples", "64", "--verify", "3", "--verify-batches", "1", "--work-dir", str(tmp_path / "w"),
                 "--no-export", "--quiet", "--max-steps", "1", "--batch-size", "16", "--finetune-epochs", "0",
                 "--model-kwargs", '{"width": 8}'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "found as" in out and "target: drop <= 100.00 pp; estimated drop" in out
    cs = CandidateSet.from_json(tmp_path / "w" / "candidates.json")
    assert cs.samples == 16 and cs.metric == "bitops"  # a quarter of 64 held out; the hardware's first metric
    assert main(["report", str(tmp_path / "w")]) == 0
    report = capsys.readouterr().out
    assert "candidates (verified" in report and "target    drop <= 100.00 pp: final drop" in report
    assert "; ".join(cs.best.sources) in report


@pytest.mark.parametrize("source", ["measured", "kl", "blend", None])
def test_the_search_minimises_the_chosen_indicator_source(digits, tmp_path, source) -> None:
    """indicators="measured" searches the loss increases measured on the jointly trained model (written to
    measured.json), "kl" its outputs' KL divergence (the default with validation data), "blend" the loss increases
    and the learned step sizes; indicators.json keeps the learned ones (resume)."""
    train, val = digits
    r = fxmpq.quantize(_model(), "w4a4", train, X, val_data=val, work_dir=tmp_path,
                       search=fxmpq.SearchOptions(indicators=source, verify=False), **KW)
    measured = fxmpq.Indicators.from_json(tmp_path / "measured.json")
    learned = fxmpq.Indicators.from_json(tmp_path / "indicators.json")
    assert measured.meta["source"] == "fxmpq.measured_indicators" != learned.meta.get("source")
    assert measured.meta["metric"] == ("kl" if source in ("kl", None) else "loss")
    want = measured if source in ("measured", "kl", None) else fxmpq.blend_indicators([(learned, 2.0), (measured, 1.0)])
    assert r.indicators == want
    assert r.policy == fxmpq.search(r.analysis, want, fxmpq.Budget.uniform(4, 4), alpha=1.0).policy
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["indicators"] == (source or "kl") and summary["alpha"] == 1.0


def test_without_validation_data_the_learned_indicators_are_searched(digits, tmp_path) -> None:
    train, _ = digits
    r = fxmpq.quantize(_model(), "w4a4", train, X, work_dir=tmp_path, **KW)
    assert r.indicators == fxmpq.Indicators.from_json(tmp_path / "indicators.json")
    assert not (tmp_path / "measured.json").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["indicators"] == "learned" and summary["alpha"] == 2.0


def test_a_measured_source_without_validation_data_is_refused_before_training(digits) -> None:
    train, _ = digits
    with pytest.raises(fxmpq.ArgumentError, match=r"indicators='blend' measures .* needs val_data"):
        fxmpq.quantize(_model(), "w4a4", train, X, search=fxmpq.SearchOptions(indicators="blend"), **KW)
    with pytest.raises(fxmpq.ArgumentError, match="indicators='hessian': expected one of learned, measured, kl, blend"):
        fxmpq.SearchOptions(indicators="hessian")


def test_a_resumed_run_reads_the_measured_sensitivities_back(digits, tmp_path, monkeypatch) -> None:
    """The measurement depends on the joint training only: a re-run that reads indicators.json reads measured.json
    too (of the same metric) instead of measuring again, and searches the same policy."""
    import fxmpq.pipeline as pipeline

    train, val = digits
    opts = fxmpq.SearchOptions(indicators="kl", verify=False)
    first = fxmpq.quantize(_model(), "w4a4", train, X, val_data=val, work_dir=tmp_path, search=opts, **KW)

    def no_measure(*a, **k):
        raise AssertionError("measured again although the work dir holds this joint training's measurement")
    monkeypatch.setattr(pipeline, "measured_indicators", no_measure)
    again = fxmpq.quantize(_model(), "w4a4", train, X, val_data=val, work_dir=tmp_path, search=opts, **KW)
    assert again.indicators == first.indicators and again.policy == first.policy
    with pytest.raises(AssertionError, match="measured again"):  # another metric is measured anew
        fxmpq.quantize(_model(), "w4a4", train, X, val_data=val, work_dir=tmp_path,
                       search=fxmpq.SearchOptions(indicators="measured", verify=False), **KW)
