"""fxmpq's graph passes, one per file (installed as the package fxmpq.passes)."""

from .annotate_cost import AnnotateCostPass
from .base import PassBase, PassResult, run_passes
from .insert_fake_quant import InsertFakeQuantPass

__all__ = ["AnnotateCostPass", "InsertFakeQuantPass", "PassBase", "PassResult", "run_passes"]
