"""The cleanup torch.onnx runs on an exported graph (onnxscript's optimize_ir: inline, fold constants, rewrite,
lift constants, deduplicate, CSE), without the one rewrite rule that costs most and never fires on fxmpq's
graphs: SlicesSplit (several Slices of one tensor into a Split) took 2.6 of the 3.8 s every default rule takes on
swin_t's lowered graph, and onnxscript's rewriter was a quarter of maxvit_t's lower() (docs/RESULTS.md 3.7)."""

from __future__ import annotations

from typing import Any

__all__ = ["optimize"]


def _passes() -> Any | None:
    """optimize_ir's pass list with SlicesSplit left out; None where onnxscript has moved the pieces (the caller
    then runs its own optimize)."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common
        from onnxscript.optimizer import _constant_folding as folding
        from onnxscript.rewriter import _DEFAULT_REWRITE_RULES, RewritePass
        from onnxscript.rewriter.rules.common import slice_split_rule
    except ImportError:
        return None
    rules = [r for r in _DEFAULT_REWRITE_RULES if r is not slice_split_rule]
    return ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [folding.FoldConstantsPass(shape_inference=True,
                                       input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                       output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                       should_fold=lambda node: None),
             RewritePass(rules), common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
             common.RemoveUnusedOpsetsPass()],
            steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )


def optimize(program: Any) -> None:
    """Clean `program` (a torch.onnx ONNXProgram exported with optimize=False) in place, as torch.onnx's
    optimize=True would, but for SlicesSplit."""
    passes = _passes()
    if passes is None:
        program.optimize()
        return
    passes(program.model)
    from onnxscript.rewriter import onnx_fusions

    onnx_fusions.fuse(program.model)  # what optimize adds for opset 23 (RMSNorm, rotary, GQA); nothing below
