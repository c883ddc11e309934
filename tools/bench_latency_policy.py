"""Accuracy under a measured-latency or file-size budget on real data: fxmpq's policy against uniform int8.

    python tools/bench_latency_policy.py [--net small_resnet] [--fractions 0.25,0.5,0.75] [--seeds 2]
        [--metric latency|packed_bytes] [--batch 1] [--threads 1] [--repeats 50] [--out runs/bench_latency_policy]
        [--smoke]

`--metric packed_bytes` (the size run): candidates W2/W4/W8 with 8-bit activations, weight-only 2/4/8 for the
linear head, and float; budgets at --fractions of the way from the smallest achievable file (every layer at its
fewest bytes) to the all-int8 one, in the profiled file's `packed_bytes`; every policy is lowered with
storage="packed" and the weight bytes in its ONNX file (weights, biases, scales as stored, less what belongs to no
layer, measured on the uniform-int8 file: that row is the calibration point) are reported next to the budget and
the prediction.

On Fashion-MNIST: train the FP32 network once (cached in --out), profile it in ONNX Runtime with
tools/profile_hw.py's code (fxmpq.profiling.profile: every layer alone and in back-to-back pairs, W8A8 and float), learn
the indicators once with that file as the hardware (joint training; candidates W8A8 and float), then put latency
budgets at --fractions of the way from the all-int8 to the all-float prediction and find for each:

  uniform-int8  every layer W8A8 (the file's cheapest policy, below every budget)
  fxmpq         learned indicators under the budget (float layers where they are worth their time)
  random        seeded random indicators under the same budget (a random policy that fills it)

Each policy is fine-tuned from the FP32 weights with one recipe (LSQ, SGD + cosine, distilled from the FP32 model)
for --seeds seeds and its test top-1 reported; the seed-0 model of each policy is lowered to ONNX (parity checked)
and all of them are then timed together in interleaved rounds (`measured`, thread CPU clock at one thread).
Writes results.json and results.md in --out. `--smoke` runs in seconds (one budget, one seed, a few repeats,
tiny training; digits when Fashion-MNIST is missing): its numbers mean nothing. Exit 0 when everything ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import train_fp32

import fxmpq
from fxmpq.core.atomic import atomic_write_text
from fxmpq.core.datasets import ImageData, load_fashion_mnist, load_small
from fxmpq.core.options import TrainOptions
from fxmpq.core.tables import render
from fxmpq.errors import FxmpqError
from fxmpq.export.deploy import deployable
from fxmpq.export.measure import TimingOptions, session, time_sessions
from fxmpq.hardware.spec import FLOAT, load_hardware
from fxmpq.models import build_model
from fxmpq.policy_search.baselines import random_indicators
from fxmpq.profiling.profile import INT8, profile_model
from fxmpq.quant.storage import initializer_bytes


def _recipe(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"fp32_epochs": 1, "fp32_limit": 512, "indicator_samples": 256, "finetune_samples": 256,
                "test_samples": 256, "max_steps": 2, "lr": 0.01, "batch_size": 64}
    return {"fp32_epochs": 4, "fp32_limit": None, "indicator_samples": 20000, "finetune_samples": 30000,
            "test_samples": None, "max_steps": None, "lr": 0.01, "batch_size": 64}


def finetune_policy(model: torch.nn.Module, hw: fxmpq.HardwareSpec, data: ImageData, policy: fxmpq.Policy,
                    seed: int, r: dict[str, Any], bits: tuple[int, ...] = (8,)) -> tuple[fxmpq.QuantModel, float]:
    """`policy` applied to a fresh QuantModel of `model` and fine-tuned with `seed`; (model, test top-1)."""
    torch.manual_seed(seed)
    q = fxmpq.prepare(model, data.train_x[:1], hardware=hw, bits=bits, act_bits=(8,))
    g = torch.Generator().manual_seed(seed)
    fxmpq.apply_policy(q, policy, data.train_x[torch.randperm(len(data.train_x), generator=g)[:256]])
    sub = torch.randperm(len(data.train_y), generator=g)[:min(r["finetune_samples"], len(data.train_y))]
    fxmpq.finetune(
        q,
        torch.utils.data.TensorDataset(data.train_x[sub], data.train_y[sub]),
        TrainOptions(
            finetune_epochs=1,
            lr=r["lr"],
            batch_size=r["batch_size"],
            seed=seed,
            cosine=True,
            max_steps=r["max_steps"],
            progress=False,
        ),
        distill_from=model,
    )
    q.eval()
    return q, fxmpq.accuracy(q, data.loader("test", 1000, limit=r["test_samples"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--net", default="small_resnet", help="fxmpq.models network (default small_resnet)")
    ap.add_argument("--fractions", default="0.25,0.5,0.75",
                    help="budgets as fractions of the way from all-int8 to all-float latency (default 0.25,0.5,0.75)")
    ap.add_argument("--seeds", type=int, default=2, help="fine-tuning seeds per policy (default 2)")
    ap.add_argument("--metric", choices=("latency", "packed_bytes"), default="latency",
                    help="the budgeted metric of the profiled file (default latency)")
    ap.add_argument("--batch", type=int, default=1, help="batch the latency is profiled and measured at (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=50, help="timed runs per model (default 50)")
    ap.add_argument("--data", help="Fashion-MNIST folder (default: Debian's /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_latency_policy"))
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on digits (numbers meaningless)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run(args)
    except FxmpqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    r = _recipe(args.smoke)
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.smoke:
        fractions, args.seeds, args.repeats = fractions[len(fractions) // 2:][:1], 1, 3
    data = load_small(args.data) if args.smoke else load_fashion_mnist(args.data)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.net, {"in_channels": data.input_shape[0], "num_classes": data.num_classes})
    fp32_path = out / f"{args.net}_fp32.pt"
    if fp32_path.is_file():
        model.load_state_dict(torch.load(fp32_path, weights_only=True))
    else:
        print(f"FP32 training of {args.net}, {r['fp32_epochs']} epoch(s)", flush=True)
        train_fp32(model, data, r["fp32_epochs"], limit=r["fp32_limit"], seed=0, log=False)
        torch.save(model.state_dict(), fp32_path)
    model.eval()
    fp32_acc = fxmpq.accuracy(model, data.loader("test", 1000, limit=r["test_samples"]))
    x = data.train_x[:args.batch].contiguous()

    hw_path = out / f"{args.net}_hw.toml"
    t = time.time()
    prof = profile_model(model, x, model_name=args.net, threads=args.threads, repeats=3 if args.smoke else 20,
                         progress=False,
                         command=f"tools/bench_latency_policy.py --net {args.net} --batch {args.batch}")
    prof.name = hw_path.stem
    atomic_write_text(hw_path, prof.to_toml())
    hw = load_hardware(hw_path)
    print(f"profiled in {time.time() - t:.0f} s -> {hw_path}: all float {prof.float_model_ms:.4f} ms, all W8A8 "
          f"{prof.int8_model_ms:.4f} ms", flush=True)

    size_run = args.metric == "packed_bytes"
    bits = (2, 4, 8) if size_run else (8,)  # weight candidates; activations at 8 bits (or float, weight-only)
    q = fxmpq.prepare(model, x, hardware=hw, bits=bits, act_bits=(8,))
    a = q.analysis
    names = a.names
    t = time.time()
    ind = fxmpq.train_indicators(
        q,
        data.loader("train", r["batch_size"], limit=r["indicator_samples"], seed=1),
        TrainOptions(indicator_epochs=1, lr=r["lr"], seed=0, max_steps=r["max_steps"], progress=False),
    )
    print(f"indicators in {time.time() - t:.0f} s", flush=True)
    metric = args.metric
    lat_int8 = a.cost({n: INT8 for n in names})["latency"]
    lat_float = a.cost({n: FLOAT for n in names})["latency"]
    searchable = tuple(m.name for m in a.searchable)
    policies: dict[str, tuple[fxmpq.Policy, float | None]] = {"uniform-int8": (fxmpq.Policy.uniform(a, 8, 8), None)}
    if size_run:  # budgets from the smallest achievable file to the all-int8 one
        policies["uniform-W4A8"] = (fxmpq.Policy.uniform(a, 4, 8), None)
        allowed = {m.name: [f for f in hw.formats(m.kind) if f[0] in (None, *bits) and f[1] in (None, 8)]
                   for m in a.layers}
        smallest = {m.name: min(allowed[m.name], key=lambda f, m=m: m.costs[f][metric]) for m in a.layers}
        lo, hi = a.cost(smallest)[metric], a.cost({n: INT8 for n in names})[metric]
    else:
        lo, hi = lat_int8, lat_float
    for f in fractions:
        budget = lo + f * (hi - lo)
        policies[f"fxmpq@{f:g}"] = (fxmpq.search(a, ind, f"{metric}<={budget!r}").policy, budget)
        rnd = random_indicators(searchable, bits, seed=1)
        policies[f"random@{f:g}"] = (fxmpq.search(a, rnd, f"{metric}<={budget!r}").policy, budget)

    rows, sessions = [], {}
    for key, (policy, budget) in policies.items():
        accs = []
        for seed in range(args.seeds):
            t = time.time()
            qm, acc = finetune_policy(model, hw, data, policy, seed, r, bits)
            accs.append(acc)
            if seed == 0:
                path = out / f"{args.net}_{key.replace('@', '_')}.onnx"
                rep = fxmpq.lower(qm, path, x, fxmpq.LowerOptions(
                    samples=64, check=False, measure=False, storage="packed" if size_run else "int8"))
                s = session(deployable(path), args.threads)  # widened as fxmpq.ort_session does
                sessions[key] = (s, {s.get_inputs()[0].name: x.numpy()})
                parity = rep.passed
                weight_bytes, file_bytes = initializer_bytes(path, weights_only=True), path.stat().st_size
            print(f"{key} seed {seed}: top-1 {100 * acc:.2f} % ({time.time() - t:.0f} s)", flush=True)
        rows.append({"policy": key, "budget": budget, "predicted": a.cost(policy)[metric],
                     "predicted_latency": a.cost(policy)["latency"], "formats": _formats(policy),
                     "float_layers": sum(1 for n in names if policy[n] == FLOAT), "layers": len(names),
                     "acc": accs, "parity": parity, "weight_bytes": weight_bytes, "file_bytes": file_bytes})
    times = time_sessions(sessions, TimingOptions(threads=args.threads, repeats=args.repeats))
    # the file's weight bytes less what belongs to no layer (embeddings, LayerNorm: alike in every policy), taken
    # from the uniform-int8 file, whose layers the profile prices exactly (its row is the calibration point)
    rest = rows[0]["weight_bytes"] - rows[0]["predicted"]
    for row in rows:
        row["measured_latency"] = times[row["policy"]].median_ms
        row["layer_bytes"] = int(row["weight_bytes"] - rest)
        row["measured"] = row["layer_bytes"] if size_run else row["measured_latency"]
    result = {"net": args.net, "data": data.name, "metric": metric, "fp32_acc": fp32_acc, "batch": args.batch, "threads": args.threads,
              "repeats": args.repeats, "seeds": args.seeds, "hardware": str(hw_path), "predicted_int8": lat_int8,
              "predicted_float": lat_float, "measured_float_model": prof.float_model_ms,
              "measured_int8_model": prof.int8_model_ms, "clock": prof.clock, "recipe": r, "rows": rows,
              "wall_s": time.time() - t_start}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    text = render_results(result)
    atomic_write_text(out / "results.md", text)
    print(text)
    return 0


def _formats(policy: fxmpq.Policy) -> str:
    """How many layers run in each format, e.g. "W2A8 x3, W4A8 x5, W4Afloat x1"."""
    return ", ".join(f"{k} x{v}" for k, v in policy.format_counts().items())


def render_results(res: dict[str, Any]) -> str:
    """The markdown table: per policy, budget, predicted and measured latency, float layers, top-1."""
    def acc(xs: list[float]) -> str:
        m = 100 * statistics.mean(xs)
        return f"{m:.2f}" + (f" ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else "")

    if res.get("metric") == "packed_bytes":
        return _render_size(res, acc)
    table = [[r["policy"], "-" if r["budget"] is None else f"{r['budget']:.4f}", f"{r['predicted']:.4f}",
              f"{r['measured']:.4f}", "-" if r["budget"] is None else f"{r['measured'] / r['budget']:.3f}",
              f"{r['measured'] / r['predicted']:.3f}", f"{r['float_layers']}/{r['layers']}", acc(r["acc"]),
              "pass" if r["parity"] else "FAIL"] for r in res["rows"]]
    head = ["policy", "budget ms", "predicted ms", "measured ms", "measured/budget", "measured/predicted",
            "float layers", "top-1 % (mean ± sd)", "parity"]
    return (f"{res['net']} on {res['data']}: FP32 top-1 {100 * res['fp32_acc']:.2f} %; batch {res['batch']}, "
            f"{res['threads']} thread(s), {res['clock']} clock, median of {res['repeats']} interleaved runs; "
            f"predicted all-int8 {res['predicted_int8']:.4f} ms, all-float {res['predicted_float']:.4f} ms "
            f"(measured when profiled {res['measured_int8_model']:.4f} / {res['measured_float_model']:.4f} ms); "
            f"{res['seeds']} fine-tuning seed(s); {res['wall_s'] / 60:.1f} min\n\n" + render(head, table) + "\n")


def _render_size(res: dict[str, Any], acc: Any) -> str:
    table = [[r["policy"], "-" if r["budget"] is None else f"{r['budget']:,.0f}", f"{r['predicted']:,.0f}",
              f"{r['measured']:,}", "-" if r["budget"] is None else f"{r['measured'] / r['budget']:.3f}",
              f"{r['measured'] / r['predicted']:.3f}", f"{r['file_bytes']:,}", r["formats"],
              f"{r['measured_latency']:.4f}", acc(r["acc"]), "pass" if r["parity"] else "FAIL"] for r in res["rows"]]
    head = ["policy", "budget B", "predicted B", "in the file B", "file/budget", "file/predicted", "ONNX file B",
            "formats", "measured ms", "top-1 % (mean ± sd)", "parity"]
    return (f"{res['net']} on {res['data']}: FP32 top-1 {100 * res['fp32_acc']:.2f} %; budget on packed_bytes (the "
            f"layers' weight, bias and scale bytes with storage=\"packed\"); latency batch {res['batch']}, "
            f"{res['threads']} thread(s), median of {res['repeats']} interleaved runs (packed files widened by "
            f"fxmpq.ort_session's loader); {res['seeds']} fine-tuning seed(s); {res['wall_s'] / 60:.1f} min\n\n"
            + render(head, table) + "\n")


if __name__ == "__main__":
    sys.exit(main())
