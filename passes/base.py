"""Running fxmpq's passes on torch.fx's pass infrastructure, with errors that name the failing pass."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxmpq.errors import FxmpqError, PassError

log = logging.getLogger(__name__)

__all__ = ["PassBase", "PassResult", "run_passes"]


def run_passes(gm: fx.GraphModule, passes: Sequence[PassBase]) -> PassResult:
    """Run `passes` in order; lint and recompile after each that modified the graph (passes never do it themselves);
    a failure names the pass and those before it.

    FxmpqErrors raised by a pass (bad user input it detected) propagate unchanged, since they already say
    what is wrong; anything else is wrapped in a PassError.
    """
    modified = False
    done: list[str] = []
    for p in passes:
        name = type(p).__name__
        try:
            result = p(gm)
            if result is None:
                raise PassError(f"pass {name} returned None instead of a PassResult")
            gm = result.graph_module
            if result.modified:
                gm.graph.lint()
                gm.recompile()
        except FxmpqError:
            raise
        except Exception as e:
            before = ", ".join(done) or "none"
            raise PassError(f"pass {name} failed (passes run before it: {before}): {type(e).__name__}: {e}") from e
        modified |= result.modified
        done.append(name)
        log.debug("pass %s done (modified=%s)", name, result.modified)
    return PassResult(gm, modified)
