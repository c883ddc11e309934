"""The side-by-side benchmark's report: accuracy tables per net and budget, win/tie/loss against fxmpq, rank
correlations of each importance source with a bootstrap interval, and an accuracy-vs-cost plot per net."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

ORDER = ("fxmpq", "fxmpq-sandwich", "fxmpq-verify", "measured", "blend", "kl", "uniform", "aimet", "modelopt", "hessian", "random-1", "random-2",
         "inverted")


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x`, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x: list[float], y: list[float], *, boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho of x and y and a percentile bootstrap 95 % interval (resampling the pairs)."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        ra, rb = ranks(a), ranks(b)
        if ra.std() == 0 or rb.std() == 0:
            return float("nan")
        return float(np.corrcoef(ra, rb)[0, 1])

    r = rho(xa, ya)
    rng = np.random.default_rng(seed)
    samples = [rho(xa[i], ya[i]) for i in (rng.integers(0, len(xa), len(xa)) for _ in range(boot))]
    samples = [s for s in samples if s == s]
    lo, hi = (np.percentile(samples, [2.5, 97.5]) if samples else (float("nan"), float("nan")))
    return r, float(lo), float(hi)


def _stats(accs: list[float]) -> tuple[float, float]:
    return statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def verdict(f: list[float], o: list[float]) -> str:
    """fxmpq against another method: win when its mean is ahead by more than the other's sd, loss when behind
    by more than fxmpq's sd, tie otherwise (spreads over fine-tuning seeds)."""
    (fm, fs), (om, os_) = _stats(f), _stats(o)
    if fm - om > max(os_, 1e-12):
        return "win"
    if om - fm > max(fs, 1e-12):
        return "loss"
    return "tie"


def render_report(plan: list[dict[str, Any]], done: dict[tuple[str, str, int], dict[str, Any]], prepared: dict[str, Any],
                  seeds: int, data: str, wall: float, out: Path, rank_budget: str) -> str:
    """The markdown report (and <out>/accuracy_vs_cost_<net>.png)."""
    lines = [f"Dataset {data}; every policy fine-tuned from the same FP32 weights by one recipe, {seeds} seeds; top-1 on "
             "the test set (mean ± sd, %). Cost measured by fxmpq on one unpinned target (every layer searchable "
             "for every method). Methods that found the same policy share a row (`a = b`). 'vs fxmpq': fxmpq's "
             "win/tie/loss (win: ahead by more than the other's sd; loss: behind by more than its own sd)."]
    summary: list[str] = []
    for net, p in prepared.items():
        rows = [e for e in plan if e["net"] == net and not _rank_only(e)]
        lines += ["", f"### {net} (FP32 top-1 {100 * p.fp32_acc:.2f} %, {len(p.analysis.searchable)} searchable layers)",
                  "", "| budget | method | cost / budget | avg W / A bits | top-1 mean | sd | seeds | vs fxmpq | "
                  "search (s) | export |", "|---|---|---:|---:|---:|---:|---|---|---:|---|"]
        for budget in dict.fromkeys(e["budget"] for e in rows):
            brows = sorted((e for e in rows if e["budget"] == budget),
                           key=lambda e: ORDER.index(e["method"]) if e["method"] in ORDER else 99)
            fx = next((e for e in brows if e["method"] == "fxmpq"), None)
            fx_accs = _accs(done, net, fx["key"], seeds) if fx else []
            shown: set[str] = set()
            for e in brows:
                if e["key"] in shown:
                    continue
                shown.add(e["key"])
                same = [o["method"] for o in brows if o["key"] == e["key"]]
                accs = _accs(done, net, e["key"], seeds)
                mean, sd = _stats(accs) if accs else (float("nan"), float("nan"))
                vs = "—" if "fxmpq" in same or not accs or not fx_accs else verdict(fx_accs, accs)
                fit = "" if e.get("fits", True) else " (does not fit: nearest it reached)"
                w, a = e["avg_bits"]
                exp = _export(done, net, e["key"])
                lines.append(f"| {budget} | {' = '.join(same)} | {100 * e['cost'] / e['limit']:.1f} %{fit} | "
                             f"{w:.2f} / {a:.2f} | {100 * mean:.2f} | {100 * sd:.2f} | "
                             f"{len(accs)}/{seeds} | {vs} | {e['search_s']:.1f} | {exp} |")
            for ours in ("fxmpq", "kl", "fxmpq-verify"):
                mine = next((e for e in brows if e["method"] == ours), None)
                mine_accs = _accs(done, net, mine["key"], seeds) if mine else []
                for e in brows:
                    accs = _accs(done, net, e["key"], seeds)
                    if e["method"] in ("uniform", "aimet", "modelopt") and accs and mine_accs and e["key"] != mine["key"]:
                        summary.append(f"{net} {budget}: {ours} {100 * _stats(mine_accs)[0]:.2f} vs {e['method']} "
                                       f"{100 * _stats(accs)[0]:.2f} ({verdict(mine_accs, accs)}; "
                                       f"{len(mine_accs)} and {len(accs)} seeds)")
                    elif e["method"] in ("uniform", "aimet", "modelopt") and mine and e["key"] == mine["key"]:
                        summary.append(f"{net} {budget}: {ours} found the same policy as {e['method']}")
        lines += ["", *rank_section(plan, done, net, rank_budget)]
        try:
            plot_net(plan, done, net, seeds, out / f"accuracy_vs_cost_{net}.png")
            lines += ["", f"![{net}](accuracy_vs_cost_{net}.png)"]
        except ImportError:
            pass
        t = p.times
        parts = [f"{what} {t[key]:.0f} s{why}" for key, what, why in (
            ("fp32_training", "FP32 training", ""),
            ("indicator_training", "joint indicator training", " (counted in fxmpq's search time)"),
            ("indicator_training_sandwich", "joint indicator training with the sandwich rule",
             " (in fxmpq-sandwich's)"),
            ("hessian", "Hessian indicators", " (in hessian's)"),
            ("measured", "measured sensitivities", " (in measured's and blend's)"),
            ("measured_kl", "measured KL sensitivities", " (in kl's)")) if key in t]  # (not timed: left out)
        if parts:
            lines += ["", f"Wall time ({net}): {', '.join(parts)}."]
    lines += ["", "### Where fxmpq wins, ties and loses against uniform and the peers (seeds as in the table)", ""]
    lines += [f"- {s}" for s in summary] or ["- (not enough finished runs yet)"]
    lines += ["", f"Wall time of this invocation: {wall / 60:.1f} min."]
    return "\n".join(lines)


def _rank_only(e: dict[str, Any]) -> bool:
    return e["method"].startswith("random-") and int(e["method"][7:]) > 2


def _accs(done: dict, net: str, key: str, seeds: int) -> list[float]:
    return [done[(net, key, s)]["acc"] for s in range(seeds) if (net, key, s) in done]


def _export(done: dict, net: str, key: str) -> str:
    rec = done.get((net, key, 0), {}).get("export")
    if rec is None:
        return ""
    return "parity passed" if rec["passed"] else f"FAILED: {rec['error'][:80]}"


def rank_section(plan: list[dict[str, Any]], done: dict, net: str, budget: str) -> list[str]:
    """Spearman's rho between each source's prediction and final top-1 over the random policies at `budget`."""
    pts = [e for e in plan if e["net"] == net and e["budget"] == budget and e["method"].startswith("random-")
           and (net, e["key"], 0) in done and e.get("pred")]
    seen: dict[str, dict[str, Any]] = {}
    for e in pts:
        seen.setdefault(e["key"], e)
    pts = list(seen.values())
    out = [f"Rank correlation at {budget}: {len(pts)} random feasible policies, one fine-tuning seed each "
           "(seed 0); Spearman's rho of each source's prediction with final top-1 (bootstrap 95 % interval).", "",
           "| source | rho | 95 % interval | policies |", "|---|---:|---|---:|"]
    if len(pts) < 4:
        return [*out, "| (fewer than 4 finished policies) | | | |"]
    acc = [done[(net, e["key"], 0)]["acc"] for e in pts]
    for source in dict.fromkeys(s for e in pts for s in e["pred"]):
        have = [(e["pred"][source], a) for e, a in zip(pts, acc) if source in e["pred"]]
        if len(have) < 4:
            continue
        r, lo, hi = spearman([h[0] for h in have], [h[1] for h in have])
        out.append(f"| {source} | {r:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {len(have)} |")
    return out


def plot_net(plan: list[dict[str, Any]], done: dict, net: str, seeds: int, path: Path) -> None:
    """Top-1 vs measured cost, one panel per metric (BitOps budgets, size budget), every method with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(e["metric"] for e in plan if e["net"] == net))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = [e for e in plan if e["net"] == net and e["metric"] == metric]
        rnd = [(e["cost"], done[(net, e["key"], 0)]["acc"]) for e in rows if _rank_only(e) and (net, e["key"], 0) in done]
        if rnd:
            ax.scatter([c / 1e6 for c, _ in rnd], [100 * a for _, a in rnd], s=10, c="0.7", label="random (rank study)")
        for method in ORDER:
            pts = []
            for e in rows:
                accs = _accs(done, net, e["key"], seeds)
                if e["method"] == method and accs:
                    pts.append((e["cost"], *_stats(accs)))
            if pts:
                pts.sort()
                ax.errorbar([c / 1e6 for c, _, _ in pts], [100 * m for _, m, _ in pts], yerr=[100 * s for _, _, s in pts],
                            marker="o", capsize=3, label=method,
                            linestyle="-" if method in ("fxmpq", "fxmpq-verify", "uniform", "aimet", "modelopt") else ":")
        ax.set_xlabel(f"{metric} (M{'bit' if metric == 'size' else ''}), measured by fxmpq")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{net}: {metric} budgets")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
