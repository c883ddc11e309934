"""fxmpq's graph passes, one per file (installed as the package fxmpq.passes)."""

from .annotate_cost import AnnotateCostPass
from .base import PassBase, PassResult, run_passes

__all__ = ["AnnotateCostPass", "PassBase", "PassResult", "run_passes"]
