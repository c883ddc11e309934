"""fxmpq: mixed-precision quantization on torch.fx with learned layer-wise importance (LIMPQ)."""

from __future__ import annotations

import logging

from . import models
from .capture.graph import trace
from .capture.record import LayerRecord
from .core.options import LowerOptions, QuantOptions, SearchOptions, TrainOptions
from .cost.analysis import Analysis
from .cost.budget import Budget
from .cost.policy import Policy
from .errors import (
    ArgumentError,
    BudgetError,
    CheckpointError,
    DataError,
    ExportError,
    FxmpqError,
    HardwareSpecError,
    IndicatorError,
    InfeasibleBudget,
    ModelSpecError,
    PassError,
    PolicyError,
    SolverError,
    TraceError,
)
from .export.deploy import ort_session
from .export.lower import LowerReport, lower
from .hardware.spec import HardwareSpec, LayerKind, Pins, builtin_hardware, load_hardware
from .pipeline import QuantizedModel, accuracy, quantize
from .policy_search.api import ParetoResult, SearchResult, SearchStatus, pareto, search
from .policy_search.blend import blend_indicators
from .policy_search.candidates import Candidate, CandidateSet, candidates
from .policy_search.hessian import hessian_indicators
from .policy_search.indicators import Cleaning, Indicators
from .policy_search.sensitivity import measured_indicators
from .policy_search.verify import verify
from .quant.quant_model import QuantModel
from .quant.storage import Storage
from .stages import analyze, apply_policy, prepare
from .train.loop import TrainStats, indicators_from_model
from .train.trainings import finetune, train_indicators

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "ArgumentError",
    "Budget",
    "BudgetError",
    "Candidate",
    "CandidateSet",
    "CheckpointError",
    "Cleaning",
    "DataError",
    "ExportError",
    "FxmpqError",
    "HardwareSpec",
    "HardwareSpecError",
    "IndicatorError",
    "Indicators",
    "InfeasibleBudget",
    "LayerKind",
    "LayerRecord",
    "LowerOptions",
    "LowerReport",
    "ModelSpecError",
    "ParetoResult",
    "PassError",
    "Pins",
    "Policy",
    "PolicyError",
    "QuantModel",
    "QuantOptions",
    "QuantizedModel",
    "SearchOptions",
    "SearchResult",
    "SearchStatus",
    "SolverError",
    "Storage",
    "TraceError",
    "TrainOptions",
    "TrainStats",
    "__version__",
    "accuracy",
    "analyze",
    "apply_policy",
    "blend_indicators",
    "builtin_hardware",
    "candidates",
    "finetune",
    "hessian_indicators",
    "indicators_from_model",
    "load_hardware",
    "lower",
    "measured_indicators",
    "models",
    "ort_session",
    "pareto",
    "prepare",
    "quantize",
    "search",
    "trace",
    "train_indicators",
    "verify",
]
