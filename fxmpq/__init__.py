"""fxmpq: mixed-precision quantization on torch.fx with learned layer-wise importance (LIMPQ)."""

from __future__ import annotations

import logging

from . import models
from .analysis import Analysis
from .budget import Budget
from .candidates import Candidate, CandidateSet, candidates
from .deploy import ort_session
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
    TraceError,
)
from .export import LowerReport, lower
from .graph import trace
from .hardware import HardwareSpec, LayerKind, Pins, builtin_hardware, load_hardware
from .hessian import hessian_indicators
from .indicators import Cleaning, Indicators
from .pipeline import QuantizedModel, accuracy, quantize
from .policy import Policy
from .quant_model import QuantModel
from .record import LayerRecord
from .search import ParetoResult, SearchResult, SearchStatus, pareto, search
from .sensitivity import measured_indicators
from .stages import analyze, apply_policy, prepare
from .storage import Storage
from .train import TrainStats, finetune, indicators_from_model, train_indicators
from .verify import verify

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
    "LowerReport",
    "ModelSpecError",
    "ParetoResult",
    "PassError",
    "Pins",
    "Policy",
    "PolicyError",
    "QuantModel",
    "QuantizedModel",
    "SearchResult",
    "SearchStatus",
    "Storage",
    "TraceError",
    "TrainStats",
    "__version__",
    "accuracy",
    "analyze",
    "apply_policy",
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
