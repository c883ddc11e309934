"""fxmpq's graph passes, one per file (installed as the package fxmpq.passes)."""

from .annotate_cost import AnnotateCostPass
from .apply_policy import ApplyPolicyPass, apply_policy
from .base import PassBase, PassResult, run_passes
from .insert_fake_quant import InsertFakeQuantPass
from .lower_qdq import LowerToQDQPass

__all__ = ["AnnotateCostPass", "ApplyPolicyPass", "InsertFakeQuantPass", "LowerToQDQPass", "PassBase", "PassResult",
           "apply_policy", "run_passes"]
