"""fxmpq: mixed-precision quantization on torch.fx with learned layer-wise importance (LIMPQ)."""

from __future__ import annotations

import logging

from . import models
from .analysis import Analysis, analyze
from .errors import (
    CheckpointError,
    DataError,
    ExportError,
    FxmpqError,
    HardwareSpecError,
    IndicatorError,
    InfeasibleBudget,
    PassError,
    PolicyError,
    TraceError,
)
from .graph import trace
from .hardware import HardwareSpec, LayerKind, Pins, builtin_hardware, load_hardware
from .indicators import Indicators
from .policy import Policy
from .prepare import prepare
from .quant import QuantModel
from .train import TrainStats, finetune, indicators_from_model, train_indicators

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "CheckpointError",
    "DataError",
    "ExportError",
    "FxmpqError",
    "HardwareSpec",
    "HardwareSpecError",
    "IndicatorError",
    "Indicators",
    "InfeasibleBudget",
    "LayerKind",
    "PassError",
    "Pins",
    "Policy",
    "PolicyError",
    "QuantModel",
    "TraceError",
    "TrainStats",
    "__version__",
    "analyze",
    "builtin_hardware",
    "finetune",
    "indicators_from_model",
    "load_hardware",
    "models",
    "prepare",
    "trace",
    "train_indicators",
]
