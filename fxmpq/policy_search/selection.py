"""The policy quantize() fine-tunes: the search's optimum, the best verified candidate, or the cheapest policy
within an accuracy target, each read off the jointly trained model."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cost.budget import Budget
from ..cost.policy import Policy
from ..errors import PolicyError
from ..quant.quant_model import QuantModel
from .api import search
from .candidates import CandidateSet, as_result, candidates, front_candidates
from .indicators import Indicators
from .results import SearchResult
from .targets import Goal
from .verify import evaluate, held_out, verify

log = logging.getLogger(__name__)

__all__ = ["Selection", "VerifyOptions", "select_policy"]


@dataclass(frozen=True)
class VerifyOptions:
    """How quantize() verifies: at most `count` candidates (0: off), each on `batches` held-out batches (None: all
    of the validation data), and for an accuracy target the cost `metric` it minimises; `progress`: a bar."""

    count: int
    batches: int | None = None
    metric: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Selection:
    """The policy to fine-tune; `search`, what the ILP proved (its optimum under the budget, or for an accuracy
    target under the chosen policy's cost); `chosen`, the policy in use as a SearchResult (`search` itself when its
    optimum is used); `candidates`, what verification measured (None when it did not run)."""

    policy: Policy
    search: SearchResult
    chosen: SearchResult
    candidates: CandidateSet | None


def select_policy(qmodel: QuantModel, indicators: Indicators, goal: Goal, options: VerifyOptions, *, alpha: float,
                  val_data: Any, fp32_model: nn.Module, device: torch.device | None,
                  saved: Path | None = None) -> Selection:
    """Search, then (with validation data and `options.count`) verify candidates on the jointly trained `qmodel`.

    A cost budget: the candidates of fxmpq.candidates, the most accurate chosen. An accuracy target: the Pareto front
    of `options.metric` and the uniform policies, walked from the cheapest up until one's estimated drop from
    `fp32_model` (on the same batches) is within the target. A `saved` candidates file made with the same budget,
    alpha, options and indicators (a resumed run) is reused as it is, so a resumed run fine-tunes the same policy.
    """
    analysis = qmodel.analysis
    verifying = bool(options.count) and val_data is not None
    if goal.max_drop is None and not verifying:
        result = search(analysis, indicators, goal.budget, alpha=alpha)
        return Selection(result.policy, result, result, None)
    key = {"budget": str(goal), "alpha": float(alpha), "count": options.count, "batches": options.batches,
           "metric": options.metric, "indicators": hashlib.sha256(indicators.to_json().encode()).hexdigest()[:16]}
    cset = _reusable(saved, key)
    if cset is None:
        if goal.max_drop is None:
            cset = candidates(analysis, indicators, goal.budget, alpha=alpha, count=options.count)
            cset = verify(qmodel, cset, val_data, max_batches=options.batches, device=device,
                          progress=options.progress)
        else:
            cset = front_candidates(analysis, indicators, options.metric, budget=goal.budget, alpha=alpha,
                                    points=options.count)
            reference = evaluate(fp32_model, held_out(val_data, options.batches, "val_data"), device=device)
            cset = verify(qmodel, cset, val_data, max_batches=options.batches, device=device,
                          max_drop=goal.max_drop, reference_accuracy=reference.accuracy, progress=options.progress)
        cset = replace(cset, meta=key)
    best = cset.best
    if goal.max_drop is None:
        result = search(analysis, indicators, goal.budget, alpha=alpha)
    else:  # the ILP's optimum at the chosen policy's cost: what the chosen policy is compared with
        limit = Budget(**{options.metric: best.totals[options.metric]})
        result = search(analysis, indicators, limit if goal.budget is None else limit & goal.budget, alpha=alpha)
    log.info("verified %d candidates: chose %d (%s), estimated top-1 %s", len(cset), cset.chosen,
             "; ".join(best.sources), "-" if best.accuracy is None else f"{best.accuracy:.4f}")
    return Selection(best.policy, result, as_result(best, result), cset)


def _reusable(path: Path | None, key: dict[str, Any]) -> CandidateSet | None:
    """The candidate set at `path` when a run with the same `key` wrote it and chose one, else None."""
    if path is None or not path.is_file():
        return None
    try:
        cset = CandidateSet.from_json(path)
    except PolicyError as e:
        log.warning("%s is unreadable (%s); verifying again", path, e)
        return None
    if dict(cset.meta) != key or cset.best is None:
        log.info("%s was made for another budget, alpha, verification or indicators; verifying again", path)
        return None
    log.info("verified candidates read from %s; verification skipped", path)
    return cset
