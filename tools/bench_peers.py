"""Side by side: fxmpq's searched policy vs the policies a user could get elsewhere, at equal measured cost.

    python tools/bench_peers.py [--out runs/bench_peers] [--nets mobilenet_v2_small,resnet20,small_vit]
                                [--seeds 3] [--workers 2] [--aimet-python P] [--modelopt-python P] [--smoke]

Per net (fxmpq.models: mobilenet_v2_small, resnet20, small_vit; trained from scratch on Fashion-MNIST and cached),
three budgets on one unpinned target (bitops.toml's costs, every layer searchable, for every method alike: AIMET
and ModelOpt search the first and last layer too):

  bitops-w3a3   BitOps <= every layer at W3A3 (the tight one)     bitops-w4a4   BitOps <= every layer at W4A4
  size-w3       size <= every layer's weights at 3 bits (ModelOpt's effective-bits budget; activations free)

and these policies, each priced by fxmpq's own cost analysis (never the peer's number):

  uniform       the largest uniform (w, a) that fits          fxmpq      learned step sizes (LIMPQ), alpha 2
  hessian       Hutchinson trace x quantization error, alpha 1  random-1/2 the ILP with seeded random indicators
  inverted      the learned indicators' order reversed          aimet      AIMET AMP's greedy order walked to the budget
  fxmpq-verify  fxmpq.candidates (16: alphas, uniform and near-uniform, next-best) verified on the jointly trained
                model with the validation split (fxmpq.verify), the most accurate kept
  measured      fxmpq.measured_indicators (one layer's loss increase per bit on the jointly trained model), alpha 1
  fxmpq-sandwich  as fxmpq, its joint training with the sandwich rule (the highest, one middle and the lowest
                uniform pass per step: TrainOptions(joint_passes="sandwich"))
  modelopt      ModelOpt auto_quantize: effective bits (its size budget) bisected until fxmpq's measured size, or
                at a BitOps budget (which it cannot express) BitOps, fits; W=A formats there, WbA8 at size

Every policy is fine-tuned from the same FP32 weights with one recipe (LSQ, distilled, cosine) for --seeds seeds
and tested (the fake-quantized model; exported runs also with the integer kernels simulated, as the ONNX file
computes) on the 10,000 test images no search saw (searches and the peers' callbacks get the last 5,000 training
images as their validation split; training uses the other 55,000). At the middle budget 16 random feasible policies
(one seed) measure whether each importance source ranks policies right: Spearman's rho between final top-1 and
each source's prediction (LIMPQ objective, Hessian objective, AIMET's phase-1 SQNR summed, the policy's accuracy
on the jointly trained model), with a bootstrap 95 % interval. Peers run in their own venvs
(tools/peers/make_env.sh aimet|modelopt); a missing one is named and skipped. Every finished run is appended to
<out>/runs.jsonl, every search's result cached under <out>/<net>/: an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_policy import policy_key
from common import train_fp32
from peer_report import render_report

import fxmpq
from fxmpq.core.datasets import ImageData, load_digits, load_fashion_mnist
from fxmpq.core.options import TrainOptions
from fxmpq.models import build_model
from fxmpq.policy_search.baselines import inverted_indicators, random_indicators
from fxmpq.policy_search.hessian import hessian_indicators
from fxmpq.quant.kernels import AddRounding, BiasRounding

ROOT = Path(__file__).resolve().parent.parent
NETS = ("mobilenet_v2_small", "resnet20", "small_vit")
BITS = (2, 3, 4, 5, 6, 8)
BUDGETS = {"bitops-w3a3": ("bitops", 3, 3), "bitops-w4a4": ("bitops", 4, 4), "size-w3": ("size", 3, 8)}
RANK_BUDGET = "bitops-w4a4"
METHODS = ("uniform", "fxmpq", "fxmpq-verify", "measured", "hessian", "random-1", "random-2", "inverted", "aimet",
           "modelopt")
PEERS = {"aimet": "aimet_amp.py", "modelopt": "modelopt_autoq.py"}
VAL = 5000  # last training images: the searches' and peers' validation split


@dataclass(frozen=True)
class Recipe:
    """Every size and hyper-parameter of one benchmark run (the smoke test shrinks them)."""

    fp32_epochs: int = 3
    indicator_steps: int = 300
    hessian_batches: int = 4
    hessian_probes: int = 2
    finetune_steps: int = 200
    finetune_lr: float = 0.01
    batch_size: int = 64
    val_images: int = 1000  # of the validation split, for the jointly trained model's accuracy per policy
    measure_batches: int = 4  # validation batches for the measured sensitivities (each layer x bit x w/a: many evals)
    val_batch: int = 250
    verify_count: int = 16
    test_samples: int | None = None
    rank_policies: int = 16
    fp32_limit: int | None = None
    calib: int = 256


SMOKE = Recipe(fp32_epochs=1, indicator_steps=2, hessian_batches=1, hessian_probes=1, finetune_steps=2,
               val_images=64, test_samples=128, rank_policies=4, fp32_limit=512, calib=32, measure_batches=1,
               verify_count=4, val_batch=32)


def hardware_file(out: Path) -> Path:
    """bitops.toml's costs with the pins off: every method searches every layer."""
    src = (ROOT / "hardware" / "bitops.toml").read_text()
    text = (src.replace('name = "bitops"', 'name = "bitops_unpinned"').replace("first_layer = true", "first_layer = false")
            .replace("last_layer = true", "last_layer = false"))
    path = out / "bitops_unpinned.toml"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def load_data(smoke: bool, data_dir: str | None) -> tuple[ImageData, ImageData]:
    """(train minus validation + test, validation as its "train" split): no search or peer sees the test set."""
    d = load_digits() if smoke else load_fashion_mnist(data_dir)
    val = 256 if smoke else VAL
    train = ImageData(d.name, d.train_x[:-val], d.train_y[:-val], d.test_x, d.test_y, d.num_classes)
    valid = ImageData(d.name + "-val", d.train_x[-val:], d.train_y[-val:], d.test_x[:0], d.test_y[:0], d.num_classes)
    return train, valid


def net_kwargs(data: ImageData) -> dict[str, Any]:
    kw: dict[str, Any] = {"in_channels": data.input_shape[0], "num_classes": data.num_classes}
    return kw


def kwargs_for(net: str, data: ImageData) -> dict[str, Any]:
    """The factory's keyword arguments for `net` on `data` (a ViT's image size and patch follow the images)."""
    kw = net_kwargs(data)
    if "vit" in net:
        size = data.input_shape[-1]
        kw |= {"image_size": size, "patch": 7 if size % 7 == 0 else 4}
    return kw


# ---------------------------------------------------------------------------------------------- fine-tuning jobs
_WORKER: dict[str, Any] = {}


def _init_worker(threads: int, smoke: bool, data_dir: str | None) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _WORKER["data"] = load_data(smoke, data_dir)


def finetune_job(net: str, kwargs: dict[str, Any], fp32_path: str, hw: str, policy_path: str, seed: int,
                 recipe: dict[str, Any], export_to: str | None) -> dict[str, Any]:
    """Fine-tune `net` from its FP32 weights at a policy with `seed`: test top-1, optional export's parity."""
    r = Recipe(**recipe)
    data, _ = _WORKER["data"]
    t0 = time.time()
    model = build_model(net, kwargs)
    model.load_state_dict(torch.load(fp32_path, weights_only=True))
    model.eval()
    torch.manual_seed(seed)
    q = fxmpq.prepare(model, data.train_x[:2], hardware=hw, bits=BITS)
    g = torch.Generator().manual_seed(seed)
    calib = data.train_x[torch.randperm(len(data.train_x), generator=g)[: r.calib]]
    fxmpq.apply_policy(q, fxmpq.Policy.from_json(policy_path), calib)
    n = min(r.finetune_steps * r.batch_size, len(data.train_y))
    sub = torch.randperm(len(data.train_y), generator=g)[:n]
    train = torch.utils.data.TensorDataset(data.train_x[sub], data.train_y[sub])
    fxmpq.finetune(
        q,
        train,
        TrainOptions(
            finetune_epochs=1,
            lr=r.finetune_lr,
            batch_size=r.batch_size,
            seed=seed,
            cosine=True,
            progress=False,
        ),
        distill_from=model,
    )
    t_ft = time.time() - t0
    test = data.loader("test", 500, limit=r.test_samples)
    acc = fake_quant_accuracy(q, test)
    out: dict[str, Any] = {"acc": acc, "seconds": time.time() - t0, "finetune_s": t_ft}
    if export_to:
        out["acc_integer"] = fxmpq.accuracy(q, test)  # with the integer kernels' rounding simulated: the ONNX file's
        try:
            rep = fxmpq.lower(q, export_to, data.train_x[:1], fxmpq.LowerOptions(measure=False),
                              inputs=data.test_x[:64])
            out["export"] = {"passed": True, "summary": str(rep).splitlines()[0][:200]}
        except fxmpq.FxmpqError as e:
            out["export"] = {"passed": False, "error": str(e).splitlines()[0][:300]}
    return out


def fake_quant_accuracy(q: fxmpq.QuantModel, loader: Any) -> float:
    """Top-1 of the fine-tuned model in eval mode with the integer kernels' rounding not simulated (BiasRounding and
    AddRounding in training mode are identities): cheaper than fxmpq.accuracy, which simulates them
    so that PyTorch matches the exported file bit for bit; runs that export record both (acc_integer)."""
    q.eval()
    for m in q.modules():
        if isinstance(m, BiasRounding | AddRounding):
            m.train()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((q(x).argmax(-1) == y).sum())
            total += len(y)
    q.eval()
    return correct / total


# ---------------------------------------------------------------------------------------------- one network
@dataclass
class Prepared:
    """What the runs of one network share: FP32 weights and accuracy, analysis, indicator sources, timings."""

    net: str
    kwargs: dict[str, Any]
    folder: Path
    fp32_path: Path
    fp32_acc: float
    analysis: fxmpq.Analysis
    indicators: fxmpq.Indicators
    hessian: fxmpq.Indicators
    measured: fxmpq.Indicators | None
    times: dict[str, float]
    kl: fxmpq.Indicators | None = None
    sandwich: fxmpq.Indicators | None = None  # joint training with the sandwich rule (TrainOptions.joint_passes)


def prepare_net(net: str, data: ImageData, valid: ImageData, out: Path, hw: Path, r: Recipe) -> Prepared:
    """FP32 training, joint indicator training (its model kept for per-policy accuracy) and Hessian
    indicators for `net`, each cached in `out/net/`."""
    folder = out / net
    folder.mkdir(parents=True, exist_ok=True)
    times_path = folder / "times.json"
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    kwargs = kwargs_for(net, data)
    model = build_model(net, kwargs)
    fp32_path = folder / "fp32.pt"
    if fp32_path.is_file():
        model.load_state_dict(torch.load(fp32_path, weights_only=True))
    else:
        print(f"[{net}] FP32 training, {r.fp32_epochs} epochs", flush=True)
        t = time.time()
        train_fp32(model, data, r.fp32_epochs, limit=r.fp32_limit, seed=0)
        times["fp32_training"] = time.time() - t
        torch.save(model.state_dict(), fp32_path)
    model.eval()
    acc_path = folder / "fp32_acc.json"
    if acc_path.is_file():
        fp32_acc = json.loads(acc_path.read_text())["acc"]
    else:
        fp32_acc = fxmpq.accuracy(model, data.loader("test", 1000, limit=r.test_samples))
        acc_path.write_text(json.dumps({"acc": fp32_acc}))

    def joint(mode: str, path: Path, key: str, what: str) -> fxmpq.Indicators:
        """Joint indicator training with `mode` (TrainOptions.joint_passes), cached in `path`; the full one also
        keeps its jointly trained model (joint.pt) for the sources measured on it."""
        if path.is_file():
            return fxmpq.Indicators.from_json(path)
        print(f"[{net}] {what}, {r.indicator_steps} steps of {r.batch_size}", flush=True)
        q = fxmpq.prepare(model, data.train_x[:2], hardware=hw, bits=BITS)
        t = time.time()
        ind = fxmpq.train_indicators(q, data.loader("train", r.batch_size, seed=1),
                                     TrainOptions(indicator_epochs=1, lr=0.01, seed=0, max_steps=r.indicator_steps,
                                                  progress=False, joint_passes=mode))
        times[key] = time.time() - t
        if mode == "all":
            torch.save(q.state_dict(), folder / "joint.pt")
        ind.to_json(path)
        times_path.write_text(json.dumps(times, indent=1))
        return ind

    indicators = joint("all", folder / "indicators.json", "indicator_training", "joint indicator training")
    sandwich = joint("sandwich", folder / "indicators_sandwich.json", "indicator_training_sandwich",
                     "joint indicator training with the sandwich rule")
    hes_path = folder / "hessian.json"
    if hes_path.is_file():
        hessian = fxmpq.Indicators.from_json(hes_path)
    else:
        print(f"[{net}] Hessian indicators", flush=True)
        q = fxmpq.prepare(model, data.train_x[:2], hardware=hw, bits=BITS)
        t = time.time()
        hessian = hessian_indicators(q, data.loader("train", 128, seed=2), batches=r.hessian_batches,
                                     probes=r.hessian_probes, seed=0)
        times["hessian"] = time.time() - t
        hessian.to_json(hes_path)
    def measured_source(name: str, metric: str, what: str) -> fxmpq.Indicators | None:
        """measured_indicators on the jointly trained model with `metric`, cached in <net>/<name>.json."""
        path = folder / f"{name}.json"
        if path.is_file():
            return fxmpq.Indicators.from_json(path)
        if not (folder / "joint.pt").is_file():
            return None
        print(f"[{net}] {what} on the jointly trained model", flush=True)
        t = time.time()
        ind = fxmpq.measured_indicators(joint_model(net, kwargs, fp32_path, folder, valid, hw),
                                        valid.loader("train", r.val_batch, shuffle=False), batches=r.measure_batches,
                                        metric=metric)
        times[name] = time.time() - t
        ind.to_json(path)
        return ind

    measured = measured_source("measured", "loss", "measured sensitivities")
    kl = measured_source("measured_kl", "kl", "measured sensitivities (KL of the outputs)")
    times_path.write_text(json.dumps(times, indent=1))
    analysis = fxmpq.analyze(model, data.train_x[:1], hardware=hw)
    return Prepared(net, kwargs, folder, fp32_path, fp32_acc, analysis, indicators, hessian, measured, times, kl,
                    sandwich)


def joint_model(net: str, kwargs: dict[str, Any], fp32_path: Path, folder: Path, valid: ImageData,
                hw: Path) -> fxmpq.QuantModel:
    """The jointly trained QuantModel (every bit-width's step sizes and BatchNorms), rebuilt from joint.pt."""
    model = build_model(net, kwargs)
    model.load_state_dict(torch.load(fp32_path, weights_only=True))
    q = fxmpq.prepare(model.eval(), valid.train_x[:2], hardware=hw, bits=BITS)
    q.load_state_dict(torch.load(folder / "joint.pt", weights_only=True))
    return q


def largest_uniform(a: fxmpq.Analysis, metric: str, limit: float) -> fxmpq.Policy | None:
    """The uniform (w, a) policy of largest cost within `limit` (ties: more activation bits, then weight bits)."""
    best = None
    for w in BITS:
        for b in BITS:
            p = fxmpq.Policy.uniform(a, w, b).complete(a)
            c = a.cost(p)[metric]
            if c <= limit * (1 + 1e-9) and (best is None or (c, b, w) > best[0]):
                best = ((c, b, w), p)
    return None if best is None else best[1]


def run_peer(peer: str, python: Path, p: Prepared, data_name: str, budget: str, limit: dict[str, Any],
             hw: Path, r: Recipe, smoke: bool, data_dir: str | None, pairs: list[tuple[int, int]] | None) -> dict | None:
    """The peer's policy at `budget` (cached in <net>/peers/<peer>-<budget>/), or None with the reason printed."""
    folder = p.folder / "peers" / f"{peer}-{budget}"
    if (folder / "peer.json").is_file() and (folder / "policy.json").is_file():
        return json.loads((folder / "peer.json").read_text())
    if not python.is_file():
        print(f"  [{p.net}] {peer}: no environment at {python} (make it: tools/peers/make_env.sh {peer}); skipped")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    n_train = len(load_digits().train_y) if smoke else 60000
    job = {"net": p.net, "net_kwargs": p.kwargs, "fp32": str(p.fp32_path), "data": "digits" if smoke else data_name,
           "data_dir": data_dir, "val": [n_train - (256 if smoke else VAL), n_train], "calib_samples": r.calib,
           "hardware": str(hw), "bits": list(BITS), "budget": limit, "seed": 0, "out": str(folder),
           "sensitivity_pairs": [list(x) for x in pairs] if pairs else None, "smoke": smoke, "threads": 1,
           "phase1_samples": r.calib, "phase2_samples": 64 if smoke else 500}
    (folder / "job.json").write_text(json.dumps(job, indent=1))
    print(f"  [{p.net}] {peer} search at {budget} ...", flush=True)
    t = time.time()
    proc = subprocess.run([str(python), str(ROOT / "tools" / "peers" / PEERS[peer]), str(folder / "job.json")],
                          capture_output=True, text=True)
    (folder / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (folder / "policy.json").is_file():
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        print(f"  [{p.net}] {peer} at {budget}: no policy (exit {proc.returncode}: {last[:200]})")
        (folder / "failed.txt").write_text(f"exit {proc.returncode}: {last}\n")
        return None
    meta = json.loads((folder / "peer.json").read_text())
    print(f"  [{p.net}] {peer} at {budget}: {time.time() - t:.0f} s, fits {meta.get('fits')}")
    return meta


def verify_at(p: Prepared, budget: str, bud: fxmpq.Budget, valid: ImageData, hw: Path,
              r: Recipe) -> tuple[fxmpq.Policy, float] | None:
    """fxmpq's verified choice at `budget`: its candidates evaluated on the jointly trained model (cached, with
    every candidate's estimate, in <net>/verify-<budget>.json); (policy, seconds of candidates + verification)."""
    path = p.folder / f"verify-{budget}.json"
    if path.is_file():
        rec = json.loads(path.read_text())
        return fxmpq.Policy(rec["policy"]), rec["seconds"]
    if not (p.folder / "joint.pt").is_file():
        return None
    t = time.time()
    cands = fxmpq.candidates(p.analysis, p.indicators, bud, alpha=2.0, count=r.verify_count)
    q = joint_model(p.net, p.kwargs, p.fp32_path, p.folder, valid, hw)
    cands = fxmpq.verify(q, cands, valid.loader("train", r.val_batch, shuffle=False, limit=r.val_images))
    secs = time.time() - t
    best = cands.best
    path.write_text(json.dumps({"policy": {n: list(v) for n, v in best.policy.items()}, "seconds": secs,
                                "candidates": [{"sources": list(c.sources), "objective": c.objective,
                                                "totals": dict(c.totals), "accuracy": c.accuracy}
                                               for c in cands.candidates]}, indent=1))
    print(f"  [{p.net}] verified {len(cands.candidates)} candidates at {budget} in {secs:.0f} s: best "
          f"{'/'.join(best.sources)} at {100 * (best.accuracy or 0):.2f} % on the joint model", flush=True)
    return best.policy, secs


def objective(ind: fxmpq.Indicators, policy: fxmpq.Policy, alpha: float, layers: list[str]) -> float:
    """sum_l I_act[l][a] + alpha * I_w[l][w] over the searchable layers (indicators repaired to be monotone)."""
    c = ind.cleaned("isotonic").indicators
    return sum(alpha * c.weight[n][policy[n][0]] + c.act[n][policy[n][1]] for n in layers)


def joint_accuracy(p: Prepared, valid: ImageData, policies: dict[str, fxmpq.Policy], hw: Path, r: Recipe) -> dict:
    """Top-1 on validation images of the jointly trained model switched to each policy (cached)."""
    path = p.folder / "joint_acc.json"
    have: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    todo = {k: v for k, v in policies.items() if k not in have}
    if todo and (p.folder / "joint.pt").is_file():
        q = joint_model(p.net, p.kwargs, p.fp32_path, p.folder, valid, hw)
        loader = valid.loader("train", r.val_batch, shuffle=False, limit=r.val_images)
        for key, pol in todo.items():
            q.set_policy(pol)
            have[key] = fxmpq.accuracy(q, loader)
        path.write_text(json.dumps(have, indent=1))
    return have


def plan_net(p: Prepared, args: argparse.Namespace, r: Recipe, hw: Path, data_name: str,
             valid: ImageData) -> list[dict[str, Any]]:
    """Every (budget, method) policy of one net, with its key, cost and search time; policies saved by key."""
    a = p.analysis
    layers = [m.name for m in a.searchable]
    (p.folder / "policies").mkdir(exist_ok=True)
    plan: list[dict[str, Any]] = []

    def add(budget: str, method: str, policy: fxmpq.Policy, search_s: float, limit: float, metric: str,
            extra: dict[str, Any] | None = None) -> None:
        policy = policy.complete(a)
        key = policy_key(policy)
        path = p.folder / "policies" / f"{key}.json"
        if not path.is_file():
            policy.to_json(path)
        plan.append({"net": p.net, "budget": budget, "method": method, "key": key, "search_s": search_s,
                     "metric": metric, "limit": limit, "cost": a.cost(policy)[metric],
                     "bitops": a.cost(policy)["bitops"], "size": a.cost(policy)["size"],
                     "avg_bits": policy.average_bits(a), **(extra or {})})

    rank_random: list[fxmpq.Policy] = []
    for budget, (metric, w, b) in BUDGETS.items():
        if budget not in args.budgets:
            continue
        bud = fxmpq.Budget.uniform(w, b, metric=metric)
        limit = bud.resolve(a)[metric]
        uni = largest_uniform(a, metric, limit)
        if uni is not None:
            add(budget, "uniform", uni, 0.0, limit, metric)
        sources = {"fxmpq": (p.indicators, 2.0, p.times.get("indicator_training", 0.0)),
                   "hessian": (p.hessian, 1.0, p.times.get("hessian", 0.0)),
                   "inverted": (inverted_indicators(p.indicators), 2.0, 0.0)}
        if p.measured is not None:
            sources["measured"] = (p.measured, 1.0, p.times.get("indicator_training", 0.0) + p.times.get("measured", 0.0))
            sources["blend"] = (fxmpq.blend_indicators([(p.indicators, 2.0), (p.measured, 1.0)]), 1.0,
                                p.times.get("indicator_training", 0.0) + p.times.get("measured", 0.0))
        if p.sandwich is not None:
            sources["fxmpq-sandwich"] = (p.sandwich, 2.0, p.times.get("indicator_training_sandwich", 0.0))
        if p.kl is not None:
            sources["kl"] = (p.kl, 1.0, p.times.get("indicator_training", 0.0) + p.times.get("measured_kl", 0.0))
        verified = verify_at(p, budget, bud, valid, hw, r)
        if verified is not None:
            pol, secs = verified
            add(budget, "fxmpq-verify", pol, p.times.get("indicator_training", 0.0) + secs, limit, metric)
        n_random = r.rank_policies if budget == RANK_BUDGET else 2
        for k in range(1, n_random + 1):
            sources[f"random-{k}"] = (random_indicators(p.indicators.layers, BITS, 1000 * w + k), 2.0, 0.0)
        for method, (ind, alpha, prep_s) in sources.items():
            t = time.perf_counter()
            res = fxmpq.search(a, ind, bud, alpha=alpha)
            if not res.optimal:
                raise fxmpq.FxmpqError(f"{p.net} {budget} {method}: search not optimal ({res.status})")
            add(budget, method, res.policy, prep_s + time.perf_counter() - t, limit, metric)
            if budget == RANK_BUDGET and method.startswith("random-"):
                rank_random.append(res.policy.complete(a))
        # the (w, a) pairs the rank study's policies use, for AIMET's phase-1 scores (not in the smoke run: minutes)
        pairs = (sorted({pol[n] for pol in rank_random for n in layers}) if budget == RANK_BUDGET and not args.smoke
                 else None)
        for peer in PEERS:
            if peer not in args.peers:
                continue
            python = Path(getattr(args, f"{peer}_python"))
            meta = run_peer(peer, python, p, data_name, budget, {"metric": metric, "limit": limit}, hw, r,
                            args.smoke, args.data, pairs)
            if meta is None:
                continue
            pol = fxmpq.Policy.from_json(p.folder / "peers" / f"{peer}-{budget}" / "policy.json")
            add(budget, peer, pol, float(meta.get("search_s", float("nan"))), limit, metric,
                {"fits": bool(meta.get("fits", True)), "peer_cost": meta.get("peer_cost")})
    return plan


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_peers"))
    ap.add_argument("--data", help="Fashion-MNIST folder (default: Debian's /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--budgets", default=",".join(BUDGETS), help=f"a subset of {', '.join(BUDGETS)} (default all)")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per policy (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="fine-tuning processes, one thread each (default 2)")
    ap.add_argument("--peers", default="aimet,modelopt", help="peers to run (default aimet,modelopt; '' for none)")
    ap.add_argument("--aimet-python", default=str(ROOT / ".venv-aimet" / "bin" / "python"))
    ap.add_argument("--modelopt-python", default=str(ROOT / ".venv-modelopt" / "bin" / "python"))
    ap.add_argument("--prepare-only", action="store_true", help="FP32, indicators, Hessian and peer searches only")
    ap.add_argument("--no-export", action="store_true", help="skip exporting the peers' and fxmpq's policies")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on scikit-learn's digits (the test suite's run)")
    ap.add_argument("--report-only", action="store_true", help="no fine-tuning: the report from the runs done so far "
                    "(a table with fewer seeds says so in its seeds column)")
    args = ap.parse_args(argv)
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in args.peers if s not in PEERS]
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    bad = [b for b in args.budgets if b not in BUDGETS]
    problem = (f"unknown peer(s) {unknown} (known: {', '.join(PEERS)})" if unknown else "--nets is empty" if not nets
               else f"unknown budget(s) {bad} (known: {', '.join(BUDGETS)})" if bad or not args.budgets else None)
    if problem:
        print(f"bench_peers.py: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    recipe = SMOKE if args.smoke else Recipe()
    t_start = time.time()
    try:
        data, valid = load_data(args.smoke, args.data)
        for net in nets:
            build_model(net, kwargs_for(net, data))
    except fxmpq.FxmpqError as e:
        print(f"bench_peers.py: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    hw = hardware_file(args.out)
    (args.out / "recipe.json").write_text(json.dumps({"recipe": asdict(recipe), "data": data.name, "seeds": args.seeds,
                                                      "bits": BITS, "budgets": BUDGETS, "peers": args.peers}, indent=1))
    print(f"bench_peers: {data.name} ({len(data.train_y)} train / {len(valid.train_y)} validation / "
          f"{len(data.test_y)} test), nets {nets}, budgets {list(BUDGETS)}, {args.seeds} seeds, peers {args.peers}",
          flush=True)
    prepared = {net: prepare_net(net, data, valid, args.out, hw, recipe) for net in nets}
    plan = [e for net in nets for e in plan_net(prepared[net], args, recipe, hw, data.name, valid)]
    (args.out / "plan.json").write_text(json.dumps(plan, indent=1, default=str))
    if args.prepare_only:
        print(f"prepared {len(plan)} (net, budget, method) policies; plan in {args.out / 'plan.json'}")
        return 0

    runs_path = args.out / "runs.jsonl"
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    if runs_path.is_file():
        for line in runs_path.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["net"], rec["key"], rec["seed"])] = rec
    wanted: dict[tuple[str, str, int], str | None] = {}
    for e in plan:
        rank_only = e["budget"] == RANK_BUDGET and e["method"].startswith("random-") and int(e["method"][7:]) > 2
        for s in range(1 if rank_only else args.seeds):
            k = (e["net"], e["key"], s)
            exp = None
            if s == 0 and not args.no_export and e["method"] in ("fxmpq", "fxmpq-verify", "aimet", "modelopt"):
                exp = str(args.out / e["net"] / "onnx" / f"{e['key']}.onnx")
            wanted[k] = wanted.get(k) or exp
    rank_only_keys = {(e["net"], e["key"]) for e in plan if e["budget"] == RANK_BUDGET and e["method"].startswith("random-")
                      and int(e["method"][7:]) > 2} - {(e["net"], e["key"]) for e in plan
                                                      if not (e["method"].startswith("random-") and int(e["method"][7:]) > 2)}
    # one net at a time; within it every policy's first seed (the main table's, then the rank study's extra
    # policies: a run cut short still has the whole table once and the rank study), then the further seeds
    jobs = [] if args.report_only else sorted((k for k in wanted if k not in done),
                  key=lambda k: (nets.index(k[0]), k[2] > 0, (k[0], k[1]) in rank_only_keys, k[2], k[1]))
    print(f"{len({(e['net'], e['key']) for e in plan})} distinct policies; {len(wanted)} runs, {len(jobs)} to do "
          f"({len(done)} already in {runs_path})", flush=True)
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=ctx, initializer=_init_worker,
                                initargs=(1 if args.workers > 1 else 2, args.smoke, args.data)) as pool:
        futures = {}
        for net, key, seed in jobs:
            p = prepared[net]
            exp = wanted[(net, key, seed)]
            if exp:
                Path(exp).parent.mkdir(parents=True, exist_ok=True)
            futures[pool.submit(finetune_job, net, p.kwargs, str(p.fp32_path), str(hw),
                                str(p.folder / "policies" / f"{key}.json"), seed, asdict(recipe), exp)] = (net, key, seed)
        for i, fut in enumerate(cf.as_completed(futures), 1):
            net, key, seed = futures[fut]
            rec = {"net": net, "key": key, "seed": seed, **fut.result()}
            done[(net, key, seed)] = rec
            with runs_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            methods = sorted({f"{e['method']}@{e['budget']}" for e in plan if e["net"] == net and e["key"] == key})
            print(f"  [{i}/{len(jobs)}] {net} {' '.join(methods)} seed {seed}: top-1 {100 * rec['acc']:.2f} % "
                  f"({rec['seconds']:.0f} s)", flush=True)

    # predictions of each source for the rank study, then the report
    for net, p in prepared.items():
        layers = [m.name for m in p.analysis.searchable]
        rank = {e["key"]: e for e in plan if e["net"] == net and e["budget"] == RANK_BUDGET}
        pols = {k: fxmpq.Policy.from_json(p.folder / "policies" / f"{k}.json") for k in rank}
        jacc = joint_accuracy(p, valid, pols, hw, recipe)
        sens = _peer_sensitivity(p, "aimet", RANK_BUDGET)
        for e in plan:
            if e["net"] != net or e["budget"] != RANK_BUDGET:
                continue
            pol = pols[e["key"]]
            e["pred"] = {"LIMPQ objective": -objective(p.indicators, pol, 2.0, layers),
                         "Hessian objective": -objective(p.hessian, pol, 1.0, layers)}
            if p.measured is not None:
                e["pred"]["measured-sensitivity objective"] = -objective(p.measured, pol, 1.0, layers)
                e["pred"]["blend (learned + measured)"] = -objective(
                    fxmpq.blend_indicators([(p.indicators, 2.0), (p.measured, 1.0)]), pol, 1.0, layers)
            if p.sandwich is not None:
                e["pred"]["LIMPQ objective, sandwich joint step"] = -objective(p.sandwich, pol, 2.0, layers)
            if p.kl is not None:
                e["pred"]["measured KL objective"] = -objective(p.kl, pol, 1.0, layers)
            if e["key"] in jacc:
                e["pred"]["joint-model top-1"] = jacc[e["key"]]
            if sens is not None:
                vals = [sens.get(n, {}).get(f"{pol[n][0]},{pol[n][1]}") for n in layers]
                if all(v is not None for v in vals):
                    e["pred"]["AIMET SQNR summed"] = float(sum(vals))
    report = render_report(plan, done, prepared, args.seeds, data.name, time.time() - t_start, args.out, RANK_BUDGET)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps({"plan": plan, "runs": list(done.values())}, indent=1, default=str))
    print(report)
    print(f"\nwritten: {args.out / 'results.md'} and the plots beside it")
    return 0


def _peer_sensitivity(p: Prepared, peer: str, budget: str) -> dict[str, dict[str, float]] | None:
    path = p.folder / "peers" / f"{peer}-{budget}" / "peer.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("sensitivity")


if __name__ == "__main__":
    sys.exit(main())
