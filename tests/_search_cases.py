"""Shared cases of the search tests: small analyses, brute-force optima and feasibility, the resnet18 instance."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torchvision
from models import ResidualNet

import fxmpq
from fxmpq import Indicators
from fxmpq.hardware.spec import loads_hardware
from fxmpq.policy_search.baselines import transplanted_indicators

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "limpq_resnet50_indicators.json"

SMALL_HW = """
[target]
name = "small"
weight_bits = [2, 4, 8]
act_bits = [4, 8]
share_input_quantizer = {share}
[metrics.bitops]
terms = [{{ type = "bitops" }}]
[metrics.size]
terms = [{{ type = "weight_bits" }}]
"""


def small_analysis(share: bool) -> fxmpq.Analysis:
    """ResidualNet on a three-weight-bit, two-activation-bit target, with or without shared input quantizers."""
    hw = loads_hardware(SMALL_HW.format(share=str(share).lower()), "small.toml")
    return fxmpq.analyze(ResidualNet(), torch.randn(1, 3, 16, 16), hardware=hw)


def check_feasible_policy(analysis: fxmpq.Analysis, policy: fxmpq.Policy, limits: dict[str, float]) -> None:
    """Assert, recomputing every total with analysis.cost (never the solver's), that `policy` meets `limits`."""
    totals = analysis.cost(policy)
    for k, v in limits.items():
        assert totals[k] <= v * (1 + 1e-12)
    for m in analysis.layers:
        assert analysis.hardware.supports(*policy[m.name]) or m.pinned


def policies(analysis: fxmpq.Analysis, pairs: list[tuple[int, int]], ties: list[list[str]]):
    """Every complete policy over `pairs` (pinned layers at their pins) whose tied layers share activation bits."""
    names = [m.name for m in analysis.searchable]
    for combo in itertools.product(pairs, repeat=len(names)):
        pol = dict(zip(names, combo))
        if any(len({pol[n][1] for n in g if n in pol}) > 1 for g in ties):
            continue
        yield fxmpq.Policy(pol)


def brute(analysis, ind, limits, alpha, ties):
    """The smallest objective over all policies meeting `limits` (None when none does), by enumeration."""
    pairs = [p for p in analysis.hardware.pairs if p[0] in ind.bits and p[1] in ind.bits]
    best = None
    for pol in policies(analysis, pairs, ties):
        tot = analysis.cost(pol)
        if any(tot[k] > v for k, v in limits.items()):
            continue
        obj = sum(alpha * ind.weight[n][w] + ind.act[n][a] for n, (w, a) in pol.items())
        best = obj if best is None else min(best, obj)
    return best


def monotone_indicators(names, bits, draw_row) -> Indicators:
    """Indicators whose rows (drawn by `draw_row`) fall as the bits rise."""
    weight, act = {}, {}
    for n in names:
        w = sorted(draw_row(), reverse=True)
        a = sorted(draw_row(), reverse=True)
        weight[n] = dict(zip(sorted(bits), w))
        act[n] = dict(zip(sorted(bits), a))
    return Indicators(layers=tuple(names), bits=bits, weight=weight, act=act)


def resnet18_case() -> tuple[fxmpq.Analysis, Indicators]:
    """torchvision resnet18 at 64x64 with the fixture's first 19 resnet50 rows as its indicators."""
    a = fxmpq.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    return a, r18_indicators(a)


def r18_indicators(analysis: fxmpq.Analysis) -> Indicators:
    """The resnet18-sized indicators for `analysis` (a resnet18 analysed on any hardware)."""
    return transplanted_indicators([m.name for m in analysis.searchable], Indicators.from_json(FIXTURE))
