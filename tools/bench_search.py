"""Benchmark fxmpq.search (HiGHS + reductions) against the same ILP solved by PuLP/CBC on resnet50 indicators.

Instances: the paper's released resnet50 indicators (torchvision resnet50, candidate bits 6..2, budget "BitOps of
uniform W3A4 and size <= FP32/12.2", alpha 2), and the same instance tiled k times: a model holding k resnet50
copies that read the same input and sum their outputs, every copy's conv1 and fc pinned at 8 bits, each copy's
indicators = the fixture's times a seeded random factor in [0.9, 1.1] per layer.

    .venv/bin/python tools/bench_search.py --sizes 1,4,10,20 --repeats 3
    .venv/bin/python tools/bench_search.py --resnet18      # fxmpq alone: resnet18 solve times over 36 budgets

Needs pulp (in the `dev` extra). CBC's status is read from its own log, not from PuLP's label.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

import fxmpq
from fxmpq.policy_search.baselines import transplanted_indicators
from fxmpq.policy_search.problem import Problem

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "limpq_resnet50_indicators.json"


class Tiled(nn.Module):
    """k resnet50 copies reading the same input; their outputs are summed."""

    def __init__(self, k: int):
        super().__init__()
        self.copies = nn.ModuleList(torchvision.models.resnet50() for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.copies[0](x)
        for c in self.copies[1:]:
            out = out + c(x)
        return out


def instance(k: int, base: fxmpq.Indicators, seed: int = 0) -> tuple[fxmpq.Analysis, fxmpq.Indicators]:
    """(analysis, indicators) of the k-fold tiled resnet50 (k=1: plain torchvision resnet50)."""
    x = torch.randn(1, 3, 224, 224)
    if k == 1:
        return fxmpq.analyze(torchvision.models.resnet50(), x), base
    pins = fxmpq.Pins(first_layer=False, last_layer=False,
                      layers=tuple(n for i in range(k) for n in (f"copies.{i}.conv1", f"copies.{i}.fc")))
    analysis = fxmpq.analyze(Tiled(k), x, pins=pins)
    rng = np.random.default_rng(seed)
    layers, weight, act = [], {}, {}
    for i in range(k):
        for n in base.layers:
            f = float(rng.uniform(0.9, 1.1))
            name = f"copies.{i}.{n}"
            layers.append(name)
            weight[name] = {b: v * f for b, v in base.weight[n].items()}
            act[name] = {b: v * f for b, v in base.act[n].items()}
    return analysis, fxmpq.Indicators(layers=tuple(layers), bits=base.bits, weight=weight, act=act)


def cbc(prob: Any, limits: dict[str, float], time_limit: float) -> dict:
    """The same formulation (binary per layer x pair, one per layer, budget rows) built and solved by PuLP/CBC."""
    import pulp

    t0 = time.perf_counter()
    m = pulp.LpProblem("fxmpq", pulp.LpMinimize)
    n = len(prob.obj)
    x = [pulp.LpVariable(f"x{j}", cat="Binary") for j in range(n)]
    m += pulp.lpSum(float(prob.obj[j]) * x[j] for j in range(n))
    for u in range(len(prob.units)):
        m += pulp.lpSum(x[j] for j in np.flatnonzero(prob.col_unit == u)) == 1
    for name, lim in limits.items():
        k = prob.metrics.index(name)
        m += pulp.lpSum(float(prob.cost[k, j]) * x[j] for j in range(n)) <= lim - float(prob.pinned_cost[k])
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "cbc.log"
        m.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, logPath=str(log)))
        elapsed = time.perf_counter() - t0
        text = log.read_text()
    result = re.search(r"Result - (.*)", text)
    status = result.group(1).strip() if result else "unknown (no result line in CBC log)"
    bound = re.search(r"Lower bound:\s+(\S+)", text)
    sel = np.array([j for j in range(n) if (x[j].value() or 0) > 0.5])
    objective = float(prob.obj[sel].sum()) if len(sel) == len(prob.units) else float("nan")
    lb = float(bound.group(1)) if bound else (objective if status.startswith("Optimal") else float("nan"))
    return {"objective": objective, "status": status, "gap": max(0.0, objective - lb), "time": elapsed,
            "sel": set(sel.tolist()), "pulp_label": pulp.LpStatus[m.status]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--indicators", default=str(FIXTURE))
    ap.add_argument("--sizes", default="1,4,10,20", help="tiling factors, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="solves per solver and size (fxmpq: max(5, this))")
    ap.add_argument("--cbc-repeats", type=int, default=None, help="CBC solves per size (default: --repeats)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="CBC time limit in seconds")
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--resnet18", action="store_true", help="time fxmpq alone on resnet18 over many budgets")
    args = ap.parse_args(argv)
    base = fxmpq.Indicators.from_json(args.indicators)
    if args.resnet18:
        return resnet18_sweep(base, max(5, args.repeats), args.alpha)
    budget = fxmpq.Budget.uniform(3, 4) & fxmpq.Budget.compression(12.2)
    rows = []
    for k in (int(s) for s in args.sizes.split(",")):
        analysis, ind = instance(k, base)
        limits = budget.resolve(analysis)
        prob = Problem.from_indicators(analysis, ind, args.alpha)
        fx_times, res = [], None
        for _ in range(max(5, args.repeats)):
            t0 = time.perf_counter()
            res = fxmpq.search(analysis, ind, budget, args.alpha)
            fx_times.append(time.perf_counter() - t0)
        cb = []
        for _ in range(args.cbc_repeats or args.repeats):
            cb.append(cbc(prob, limits, args.time_limit))
        c = cb[-1]
        fx_cols = set(_columns(prob, res.policy))
        agree = "same" if fx_cols == c["sel"] else f"differ (obj diff {res.objective - c['objective']:+.3g})"
        cb_times = [r["time"] for r in cb]
        row = {"k": k, "layers": len(analysis.searchable), "vars": len(prob.obj),
               "cbc_obj": c["objective"], "cbc_status": c["status"], "cbc_label": c["pulp_label"],
               "cbc_gap": c["gap"], "fx_obj": res.objective, "fx_status": res.status, "fx_gap": res.gap,
               "agree": agree, "rel_diff": (res.objective - c["objective"]) / abs(c["objective"]),
               "cbc_min": min(cb_times), "cbc_med": statistics.median(cb_times),
               "fx_min": min(fx_times), "fx_med": statistics.median(fx_times),
               "vars_mip": res.n_vars_mip}
        rows.append(row)
        print(_line(row), flush=True)
    print()
    print(_table(rows))
    return 0


def resnet18_sweep(base: fxmpq.Indicators, repeats: int, alpha: float) -> int:
    """fxmpq.search on resnet18 (19 searchable layers, 25 pairs) at 36 budgets: min/median wall and CPU ms."""
    analysis = fxmpq.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    ind = transplanted_indicators([m.name for m in analysis.searchable], base)
    budgets = ([f"w{w}a{a}" for w in (2, 3, 4, 5) for a in (2, 3, 4, 5)]
               + [f"w{w}a{a}&c{c}" for w, a in ((3, 4), (4, 4), (3, 3), (2, 4)) for c in (8, 10, 12.2, 14)]
               + ["c8", "c10", "c12.2", "c14"])
    print("| budget | min wall ms | median wall ms | min CPU ms | finisher | status |")
    print("|---|---:|---:|---:|---|---|")
    worst = 0.0
    for b in budgets:
        wall, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            res = fxmpq.search(analysis, ind, b, alpha)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        finisher = "HiGHS MIP" if res.n_vars_mip else "reductions / dynamic program"
        worst = max(worst, statistics.median(wall))
        print(f"| {b} | {1e3 * min(wall):.2f} | {1e3 * statistics.median(wall):.2f} | {1e3 * min(cpu):.2f} | "
              f"{finisher} | {res.status} |", flush=True)
    print(f"\nworst median over {len(budgets)} budgets: {1e3 * worst:.2f} ms ({repeats} solves each, model build "
          "included)")
    return 0


def _columns(prob, policy) -> list[int]:
    cols = []
    for u, unit in enumerate(prob.units):
        want = [tuple(policy[n]) for n in unit.layers]
        for c in range(len(unit.obj)):
            if [tuple(int(b) for b in p) for p in unit.choices[c]] == want:
                cols.append(int(np.flatnonzero(prob.col_unit == u)[c]))
                break
    return cols


def _line(r: dict) -> str:
    return (f"x{r['k']}: {r['layers']} layers, {r['vars']} vars | CBC {r['cbc_obj']:.10g} [{r['cbc_status']}; "
            f"PuLP says {r['cbc_label']}] gap {r['cbc_gap']:.3g} | fxmpq {r['fx_obj']:.10g} [{r['fx_status']}] "
            f"gap {r['fx_gap']:.3g} | {r['agree']} | CBC {r['cbc_min']:.3f}/{r['cbc_med']:.3f} s, "
            f"fxmpq {r['fx_min']:.4f}/{r['fx_med']:.4f} s, ratio {r['cbc_med'] / r['fx_med']:.1f}x")


def _table(rows: list[dict]) -> str:
    head = ("| tiling | searchable layers | binaries | CBC objective | CBC status (from its log) | CBC gap "
            "| fxmpq objective | fxmpq status | fxmpq gap | rel. diff | policies | CBC min / median s "
            "| fxmpq min / median s | median ratio |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| x{r['k']} | {r['layers']} | {r['vars']} | {r['cbc_obj']:.10g} | {r['cbc_status']} "
                     f"| {r['cbc_gap']:.3g} | {r['fx_obj']:.10g} | {r['fx_status']} | {r['fx_gap']:.3g} "
                     f"| {r['rel_diff']:.2e} | {r['agree']} | {r['cbc_min']:.3f} / {r['cbc_med']:.3f} "
                     f"| {r['fx_min']:.4f} / {r['fx_med']:.4f} | {r['cbc_med'] / r['fx_med']:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
