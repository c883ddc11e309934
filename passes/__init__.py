"""fxmpq's graph passes, one per file (installed as the package fxmpq.passes); fxmpq/stages.py lists them in order."""

from .annotate_cost import AnnotateCostPass
from .apply_policy import ApplyPolicyPass
from .base import PassBase, PassResult, run_passes
from .contiguous_reshape import ContiguousBeforeReshapePass
from .fold_constants import FoldFloatConstantsPass
from .insert_fake_quant import InsertFakeQuantPass
from .lower_qdq import LowerToQDQPass

__all__ = ["AnnotateCostPass", "ApplyPolicyPass", "ContiguousBeforeReshapePass", "FoldFloatConstantsPass", "InsertFakeQuantPass", "LowerToQDQPass", "PassBase", "PassResult",
           "run_passes"]
