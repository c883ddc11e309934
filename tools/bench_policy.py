"""Policy quality on real data: fxmpq's learned indicators vs uniform, Hessian (HAWQ-style), random and inverted.

    python tools/bench_policy.py [--out runs/bench_policy] [--workers 2] [--smoke]

For each network (a residual CNN and a MobileNet-style CNN, fxmpq.models.small_resnet / small_mobilenet) on
Fashion-MNIST: train FP32 once, learn the indicators once (joint training) and the Hessian indicators once, then at
BitOps budgets equal to uniform W2A2, W3A3 and W4A4 (first conv and last linear pinned at W8A8; candidate bits
2..6) find these policies with the same ILP and budget:

  uniform      every searchable layer at the budget's bits
  fxmpq        learned step sizes (LIMPQ), alpha 2
  hessian      Hutchinson trace x quantization error (HAWQ-V2/V3 style, fxmpq.policy_search.hessian), alpha 1
  random-k     3 random policies on the budget: the ILP with seeded random indicators (k = 1, 2, 3)
  inverted     the learned indicators with the layers' order of sensitivity reversed (a sanity check)

and fine-tune each from the FP32 weights with one recipe (LSQ, SGD + cosine, distilled from the FP32 model) for
--seeds seeds; report test top-1 (mean, spread). Identical policies share their runs (at W2A2 with candidates
2..6 the budget admits only the uniform policy). Every finished run is appended to <out>/runs.jsonl, so an
interrupted benchmark resumes where it stopped; tables go to <out>/results.md, plots to <out>/*.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import train_fp32

import fxmpq
from fxmpq.core.datasets import ImageData, load_fashion_mnist, load_small
from fxmpq.core.options import TrainOptions
from fxmpq.models import build_model
from fxmpq.policy_search.baselines import inverted_indicators, random_indicators
from fxmpq.policy_search.hessian import hessian_indicators

NETS = ("small_resnet", "small_mobilenet")
METHODS = ("uniform", "fxmpq", "hessian", "random-1", "random-2", "random-3", "inverted")
BITS = (2, 3, 4, 5, 6)


@dataclass(frozen=True)
class Recipe:
    """Every size and hyper-parameter of one benchmark run (the smoke test shrinks them)."""

    fp32_epochs: int = 4
    indicator_samples: int = 20000
    indicator_epochs: int = 1
    hessian_batches: int = 8
    hessian_probes: int = 4
    finetune_samples: int = 30000
    finetune_epochs: int = 1
    finetune_lr: float = 0.01
    batch_size: int = 64
    test_samples: int | None = None
    max_steps: int | None = None
    fp32_limit: int | None = None


SMOKE = Recipe(fp32_epochs=1, indicator_samples=256, hessian_batches=1, hessian_probes=1, finetune_samples=256,
               test_samples=256, max_steps=2, fp32_limit=512)


# ---------------------------------------------------------------------------------------------- fine-tuning jobs
def policy_key(policy: fxmpq.Policy) -> str:
    """A short stable hash of a complete policy (runs of identical policies are shared)."""
    text = json.dumps(sorted((n, list(p)) for n, p in policy.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


_WORKER: dict[str, Any] = {}


def _init_worker(threads: int, data_dir: str | None, smoke: bool) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _WORKER["data"] = load_small(data_dir) if smoke else load_fashion_mnist(data_dir)


def finetune_job(net: str, fp32_path: str, policy_json: str, seed: int, recipe: dict[str, Any]) -> dict[str, float]:
    """Fine-tune `net` (from its FP32 weights) at `policy` with `seed`; test top-1 and wall time."""
    r = Recipe(**recipe)
    data: ImageData = _WORKER["data"]
    t0 = time.time()
    model = build_model(net, {"in_channels": data.input_shape[0], "num_classes": data.num_classes})
    model.load_state_dict(torch.load(fp32_path, weights_only=True))
    model.eval()
    torch.manual_seed(seed)
    q = fxmpq.prepare(model, data.train_x[:2], bits=BITS)
    policy = fxmpq.Policy.from_json(policy_json)
    g = torch.Generator().manual_seed(seed)
    calib = data.train_x[torch.randperm(len(data.train_x), generator=g)[:256]]
    fxmpq.apply_policy(q, policy, calib)
    before = fxmpq.accuracy(q, data.loader("test", 1000, limit=r.test_samples))
    n = min(r.finetune_samples, len(data.train_y))
    sub = torch.randperm(len(data.train_y), generator=g)[:n]
    train = torch.utils.data.TensorDataset(data.train_x[sub], data.train_y[sub])
    fxmpq.finetune(
        q,
        train,
        TrainOptions(
            finetune_epochs=r.finetune_epochs,
            lr=r.finetune_lr,
            batch_size=r.batch_size,
            seed=seed,
            cosine=True,
            max_steps=r.max_steps,
            progress=False,
        ),
        distill_from=model,
    )
    acc = fxmpq.accuracy(q, data.loader("test", 1000, limit=r.test_samples))
    return {"acc": acc, "acc_before": before, "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------- one network
@dataclass
class Prepared:
    """What the runs of one network share: FP32 weights and accuracy, analysis, indicator sources, timings."""

    net: str
    fp32_path: Path
    fp32_acc: float
    analysis: fxmpq.Analysis
    indicators: fxmpq.Indicators
    hessian: fxmpq.Indicators
    times: dict[str, float]


def prepare_net(net: str, data: ImageData, out: Path, r: Recipe, seed: int) -> Prepared:
    """FP32 training, joint indicator training and Hessian indicators for `net`, each cached in `out/net/`."""
    folder = out / net
    folder.mkdir(parents=True, exist_ok=True)
    times_path = folder / "times.json"
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    model = build_model(net, {"in_channels": data.input_shape[0], "num_classes": data.num_classes})
    fp32_path = folder / "fp32.pt"
    if fp32_path.is_file():
        model.load_state_dict(torch.load(fp32_path, weights_only=True))
    else:
        print(f"[{net}] FP32 training, {r.fp32_epochs} epochs")
        t = time.time()
        train_fp32(model, data, r.fp32_epochs, limit=r.fp32_limit, seed=seed)
        times["fp32_training"] = time.time() - t
        torch.save(model.state_dict(), fp32_path)
    model.eval()
    test = data.loader("test", 1000, limit=r.test_samples)
    fp32_acc = fxmpq.accuracy(model, test)

    def cached(name: str, what: str, compute: Any) -> fxmpq.Indicators:
        """Indicators from <folder>/<name>.json, else computed on a fresh QuantModel, timed and saved there."""
        path = folder / f"{name}.json"
        if path.is_file():
            return fxmpq.Indicators.from_json(path)
        print(f"[{net}] {what}")
        q = fxmpq.prepare(model, data.train_x[:2], bits=BITS)
        t = time.time()
        out = compute(q)
        times[name if name != "indicators" else "indicator_training"] = time.time() - t
        out.to_json(path)
        return out

    indicators = cached(
        "indicators",
        f"joint indicator training on {r.indicator_samples} images",
        lambda q: fxmpq.train_indicators(
            q,
            data.loader("train", r.batch_size, limit=r.indicator_samples, seed=seed + 1),
            TrainOptions(
                indicator_epochs=r.indicator_epochs, lr=0.01, seed=seed, max_steps=r.max_steps, progress=False
            ),
        ),
    )
    hessian = cached("hessian", f"Hessian indicators ({r.hessian_batches} batches x {r.hessian_probes} probes)",
                     lambda q: hessian_indicators(q, data.loader("train", 128, seed=seed + 2),
                                                  batches=r.hessian_batches, probes=r.hessian_probes, seed=seed))
    times_path.write_text(json.dumps(times, indent=1))
    analysis = fxmpq.analyze(model, data.train_x[:1], hardware="bitops")
    return Prepared(net, fp32_path, fp32_acc, analysis, indicators, hessian, times)


def policies_for(p: Prepared, w_bits: int) -> dict[str, tuple[fxmpq.Policy, float]]:
    """Each method's policy (and its search wall time) at the budget of uniform W{w_bits}A{w_bits}."""
    budget = fxmpq.Budget.uniform(w_bits, w_bits)
    sources: dict[str, tuple[fxmpq.Indicators, float]] = {
        "fxmpq": (p.indicators, 2.0), "hessian": (p.hessian, 1.0),
        **{f"random-{k}": (random_indicators(p.indicators.layers, p.indicators.bits, 1000 * w_bits + k), 2.0)
           for k in (1, 2, 3)},
        "inverted": (inverted_indicators(p.indicators), 2.0),
    }
    out = {"uniform": (fxmpq.Policy.uniform(p.analysis, w_bits, w_bits).complete(p.analysis), 0.0)}
    for method, (ind, alpha) in sources.items():
        t = time.perf_counter()
        res = fxmpq.search(p.analysis, ind, budget, alpha=alpha)
        elapsed = time.perf_counter() - t
        if not res.optimal:
            raise fxmpq.FxmpqError(f"{p.net} W{w_bits}A{w_bits} {method}: search not optimal ({res.status})")
        out[method] = (res.policy.complete(p.analysis), elapsed)
    return out


# ---------------------------------------------------------------------------------------------- reporting
def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def depthwise_table(p: Prepared) -> str:
    """Learned weight and activation step sizes at 2/3/4 bits of depthwise vs pointwise (1x1) convolutions."""
    kinds = {m.name: m.kind for m in p.analysis.layers}
    dw = [n for n in p.indicators.layers if kinds[n] is fxmpq.LayerKind.DEPTHWISE_CONV]
    pw = [n for n in p.indicators.layers if kinds[n] is fxmpq.LayerKind.CONV]
    lines = ["| layer | kind | w@2 | w@3 | w@4 | a@2 | a@3 | a@4 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for n in p.indicators.layers:
        if n in dw or n in pw:
            w, a = p.indicators.weight[n], p.indicators.act[n]
            lines.append(f"| {n} | {'depthwise' if n in dw else 'pointwise'} | "
                         + " | ".join(f"{w[b]:.4f}" for b in (2, 3, 4)) + " | "
                         + " | ".join(f"{a[b]:.4f}" for b in (2, 3, 4)) + " |")
    for label, group in (("mean depthwise", dw), ("mean pointwise", pw)):
        if group:
            lines.append(f"| **{label}** ({len(group)}) | | "
                         + " | ".join(f"{statistics.fmean(p.indicators.weight[n][b] for n in group):.4f}"
                                      for b in (2, 3, 4)) + " | "
                         + " | ".join(f"{statistics.fmean(p.indicators.act[n][b] for n in group):.4f}"
                                      for b in (2, 3, 4)) + " |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Test top-1 vs BitOps per method (mean and spread over seeds), one panel per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({r["net"] for r in rows})
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for method in METHODS:
            pts = [r for r in rows if r["net"] == net and r["method"] == method]
            if pts:
                ax.errorbar([r["bitops"] / 1e6 for r in pts], [100 * r["mean"] for r in pts],
                            yerr=[100 * r["sd"] for r in pts], marker="o", capsize=3, label=method,
                            linestyle="-" if method in ("fxmpq", "uniform", "hessian") else ":")
        ax.set_xlabel("BitOps (M)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(net)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_policy"))
    ap.add_argument("--data", help="Fashion-MNIST folder (default: Debian's /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--budgets", default="2,3,4", help="uniform WbAb BitOps budgets (default 2,3,4)")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per policy (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="fine-tuning processes, one thread each (default 2)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (digits when Fashion-MNIST is missing)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="only FP32 training, indicator training and Hessian indicators (cached), and their times")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    recipe = SMOKE if args.smoke else Recipe()
    t_start = time.time()
    try:
        data = load_small(args.data) if args.smoke else load_fashion_mnist(args.data)
    except fxmpq.FxmpqError as e:
        print(f"bench_policy.py: error: {e}", file=sys.stderr)
        return 2
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    budgets = [int(b) for b in args.budgets.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.json").write_text(json.dumps({"recipe": asdict(recipe), "data": data.name,
                                                      "seeds": args.seeds, "bits": BITS}, indent=1))
    print(f"bench_policy: {data.name} ({len(data.train_y)} train / {len(data.test_y)} test), nets {nets}, "
          f"budgets {[f'W{b}A{b}' for b in budgets]}, {args.seeds} seeds, {args.workers} workers")

    prepared = {net: prepare_net(net, data, args.out, recipe, seed=0) for net in nets}
    if args.prepare_only:
        for net, p in prepared.items():
            t0 = time.perf_counter()
            for b in budgets:
                policies_for(p, b)
            searches = 6 * len(budgets)
            t = p.times
            print(f"{net}: FP32 top-1 {100 * p.fp32_acc:.2f} %; FP32 training {t.get('fp32_training', 0):.1f} s, "
                  f"joint indicator training {t.get('indicator_training', 0):.1f} s, Hessian indicators "
                  f"{t.get('hessian', 0):.1f} s, {searches} ILP searches {time.perf_counter() - t0:.3f} s in all")
        return 0
    plan: list[dict[str, Any]] = []  # (net, budget, method, policy key, policy, search time)
    for net, p in prepared.items():
        for b in budgets:
            for method, (policy, secs) in policies_for(p, b).items():
                key = policy_key(policy)
                (args.out / net / "policies").mkdir(exist_ok=True)
                policy.to_json(args.out / net / "policies" / f"{key}.json")
                cost = p.analysis.cost(policy)
                plan.append({"net": net, "budget": b, "method": method, "key": key, "search_s": secs,
                             "bitops": cost["bitops"], "limit": fxmpq.Budget.uniform(b, b).resolve(p.analysis)["bitops"],
                             "avg_bits": policy.average_bits(p.analysis)})

    runs_path = args.out / "runs.jsonl"
    done: dict[tuple[str, str, int], dict[str, float]] = {}
    if runs_path.is_file():
        for line in runs_path.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["net"], rec["key"], rec["seed"])] = rec
    jobs = sorted({(e["net"], e["key"], s) for e in plan for s in range(args.seeds)} - set(done))
    print(f"{len({(e['net'], e['key']) for e in plan})} distinct policies x {args.seeds} seeds; "
          f"{len(jobs)} fine-tuning runs to do ({len(done)} already in {runs_path})")
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=ctx, initializer=_init_worker,
                                initargs=(1 if args.workers > 1 else 2, args.data, args.smoke)) as pool:
        futures = {pool.submit(finetune_job, net, str(prepared[net].fp32_path),
                               str(args.out / net / "policies" / f"{key}.json"), seed, asdict(recipe)): (net, key, seed)
                   for net, key, seed in jobs}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            net, key, seed = futures[fut]
            rec = {"net": net, "key": key, "seed": seed, **fut.result()}
            done[(net, key, seed)] = rec
            with runs_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            methods = sorted({e["method"] for e in plan if e["net"] == net and e["key"] == key})
            print(f"  [{i}/{len(jobs)}] {net} {'/'.join(methods)} seed {seed}: top-1 {100 * rec['acc']:.2f} % "
                  f"({rec['seconds']:.0f} s)", flush=True)

    rows = []
    for e in plan:
        accs = [done[(e["net"], e["key"], s)]["acc"] for s in range(args.seeds)]
        mean, sd = _mean_sd(accs)
        rows.append({**e, "mean": mean, "sd": sd, "accs": accs})
    report = render(rows, prepared, args.seeds, data.name, time.time() - t_start)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    plot_accuracy(rows, args.out / "accuracy_vs_bitops.png")
    from fxmpq.policy_search.report import plot_bits

    for net, p in prepared.items():
        for b in budgets:
            e = next(e for e in rows if e["net"] == net and e["budget"] == b and e["method"] == "fxmpq")
            policy = fxmpq.Policy.from_json(args.out / net / "policies" / f"{e['key']}.json")
            plot_bits(policy, p.analysis, args.out / f"bits_{net}_w{b}a{b}.png")
    print(report)
    print(f"\nwritten: {args.out / 'results.md'}, {args.out / 'accuracy_vs_bitops.png'}, bits_*.png")
    return 0


def render(rows: list[dict[str, Any]], prepared: dict[str, Prepared], seeds: int, data: str, wall: float) -> str:
    """The markdown report: one accuracy table per network, depthwise vs pointwise steps, timings."""
    out = [f"Dataset {data}; {seeds} fine-tuning seeds per policy; top-1 on the test set (mean ± sd, %). Methods "
           "that found the same policy share one row (`a = b`)."]
    for net, p in prepared.items():
        out += ["", f"### {net} (FP32 top-1 {100 * p.fp32_acc:.2f} %)", "",
                "| budget | method | BitOps (M) | % of budget | avg W / A bits | top-1 mean | sd | runs |",
                "|---|---|---:|---:|---:|---:|---:|---|"]
        shown: set[tuple[int, str]] = set()
        for r in (r for r in rows if r["net"] == net):
            if (r["budget"], r["key"]) in shown:
                continue
            shown.add((r["budget"], r["key"]))
            same = [o["method"] for o in rows if o["net"] == net and o["budget"] == r["budget"] and o["key"] == r["key"]]
            w, a = r["avg_bits"]
            out.append(f"| W{r['budget']}A{r['budget']} | {' = '.join(same)} | {r['bitops'] / 1e6:.2f} | "
                       f"{100 * r['bitops'] / r['limit']:.1f} | {w:.2f} / {a:.2f} | {100 * r['mean']:.2f} | "
                       f"{100 * r['sd']:.2f} | {', '.join(f'{100 * x:.2f}' for x in r['accs'])} |")
        kinds = {m.kind for m in p.analysis.layers}
        if fxmpq.LayerKind.DEPTHWISE_CONV in kinds:
            out += ["", f"Learned step sizes of {net}'s depthwise vs pointwise convolutions (fxmpq indicators):", "",
                    depthwise_table(p)]
        search = [r["search_s"] for r in rows if r["net"] == net and r["method"] != "uniform"]
        t = p.times
        out += ["", f"Wall time ({net}): FP32 training {t.get('fp32_training', float('nan')):.0f} s, joint indicator "
                f"training {t.get('indicator_training', float('nan')):.0f} s, Hessian indicators "
                f"{t.get('hessian', float('nan')):.1f} s, one ILP search {1e3 * statistics.median(search):.1f} ms "
                f"(median of {len(search)}, max {1e3 * max(search):.1f} ms)."]
    out += ["", f"Total wall time of this invocation: {wall / 60:.1f} min."]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
