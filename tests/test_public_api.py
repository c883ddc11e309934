"""The public surface: fxmpq.__all__ is pinned, every public name has a docstring."""

from __future__ import annotations

import inspect

import fxmpq

EXPECTED = {
    "Analysis", "ArgumentError", "Budget", "BudgetError", "Candidate", "CandidateSet", "CheckpointError", "Cleaning", "DataError", "ExportError",
    "FxmpqError", "HardwareSpec", "HardwareSpecError", "IndicatorError", "Indicators", "InfeasibleBudget", "LayerKind",
    "LayerRecord", "LowerReport", "ModelSpecError",
    "ParetoResult", "PassError", "LowerOptions", "Pins", "Policy", "PolicyError", "QuantModel", "QuantOptions", "QuantizedModel",
    "SearchOptions", "SearchResult", "TrainOptions",
    "SearchStatus", "SolverError", "Storage",
    "TraceError", "TrainStats", "__version__", "accuracy", "analyze", "apply_policy", "builtin_hardware",
    "blend_indicators", "candidates", "finetune", "hessian_indicators", "indicators_from_model", "load_hardware", "lower", "measured_indicators", "models", "ort_session", "pareto", "prepare", "quantize",
    "search", "trace", "train_indicators", "verify",
}


def test_all_is_pinned():
    assert set(fxmpq.__all__) == EXPECTED
    assert len(fxmpq.__all__) == len(EXPECTED)


def test_every_public_name_exists_and_is_documented():
    undocumented = []
    for name in fxmpq.__all__:
        obj = getattr(fxmpq, name)
        if name == "__version__":
            assert isinstance(obj, str)
            continue
        if not (inspect.getdoc(obj) or "").strip():
            undocumented.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member) and not inspect.getdoc(member):
                    undocumented.append(f"{name}.{attr}")
    assert not undocumented, undocumented


def test_errors_share_one_base():
    for name in fxmpq.__all__:
        obj = getattr(fxmpq, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, fxmpq.FxmpqError), name
