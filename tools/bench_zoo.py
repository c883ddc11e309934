"""Model-zoo coverage: every torchvision classification model through the whole pipeline, stage by stage.

    python tools/bench_zoo.py [--out runs/bench_zoo] [--models resnet18,vit_b_16] [--timeout 1800] [--redo]
    python tools/bench_zoo.py --source timm [--models timm:mobilevit_xxs,...]     # pip install -e '.[bench]'
    python tools/bench_zoo.py --source hf                                          # the six HF vision models

`--source timm` runs TIMM_MODELS (timm.create_model, random weights, 10 classes) and `--source hf` the six
Hugging Face image classifiers of the capture issue, from small configs (HF_MODELS); names are `timm:<name>` and
`hf:<name>`, and the table says which capture each used (plain torch.fx or shape-specialized).

For each model of torchvision.models.list_models(module=torchvision.models), with random weights, at the smallest
square input it accepts (tried from 32 up): trace -> prepare (fake-quant insertion + cost analysis) -> indicators
(2 joint-training steps on random data, batch 4, gradient norm clipped to 1) -> search (ILP, BitOps of uniform W4A4) -> apply policy ->
lower to QDQ ONNX -> validate in ONNX Runtime (16 random inputs: max |diff| <= 1 output step and top-1 agreement
>= 99.5 % on the inputs whose logits are not tied within that step; failing that, lower()'s faithful criterion:
every quantizer within 1 step of PyTorch when fed ONNX Runtime's values at the quantizers before it, and ONNX
Runtime's spread within 1.5x PyTorch's own noise floor, marked "ok, faithful" with both figures; relative L2 and
integer kernels reported). Each model runs in its own process (a crash or a timeout costs one row, not the run) and writes <out>/<model>.json; a re-run skips models already there (resumable; --redo runs them again).
The table goes to <out>/results.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

SIZES = (32, 64, 96, 128, 160, 192, 224, 256, 299)
STAGES = ("input", "trace", "prepare", "indicators", "search", "apply", "lower", "validate")


def classification_models() -> list[str]:
    """Every classification model torchvision registers (detection, segmentation, video, optical flow left out)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


# timm architectures of the hub sweep: one or two small variants per family (random weights)
TIMM_MODELS = (
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "regnetx_002", "regnety_002", "efficientnet_b0",
    "efficientnet_lite0", "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv4_conv_small", "mnasnet_small",
    "fbnetc_100", "ghostnet_050", "hardcorenas_a", "lcnet_050", "rexnet_100", "tinynet_e", "mixnet_s",
    "dla34", "dpn68", "densenet121", "vgg11_bn", "inception_v3", "xception41", "cspresnet50", "cspdarknet53",
    "darknet17", "dm_nfnet_f0", "nf_resnet26", "repvgg_a0", "res2net50_14w_8s", "resnest14d", "skresnet18",
    "selecsls42b", "hrnet_w18_small", "convnext_atto", "convnextv2_atto", "efficientformer_l1", "levit_128s",
    "mobilevit_xxs", "mobilevitv2_050", "tiny_vit_5m_224", "edgenext_xx_small", "xcit_nano_12_p16_224",
    "coat_lite_tiny", "eva02_tiny_patch14_224", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "pit_ti_224", "convit_tiny", "crossvit_tiny_240", "poolformer_s12",
    "mixer_b16_224", "resmlp_12_224", "gmlp_ti16_224", "beit_base_patch16_224", "cait_xxs24_224", "twins_svt_small",
    "pvt_v2_b0", "mobileone_s0", "fastvit_t8", "ese_vovnet19b_dw", "tresnet_m",
)
HF_MODELS = ("vit", "deit", "convnext", "resnet", "swin", "mobilevit")


def hf_model(name: str) -> torch.nn.Module:
    """A Hugging Face image classifier from a small config (random weights, 10 labels)."""
    import transformers as tf

    vit = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, num_labels=10)
    configs = {
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(**vit)),
        "deit": lambda: tf.DeiTForImageClassification(tf.DeiTConfig(**vit)),
        "convnext": lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),
        "resnet": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),
        "swin": lambda: tf.SwinForImageClassification(tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=10)),
        "mobilevit": lambda: tf.MobileViTForImageClassification(tf.MobileViTConfig(
            image_size=32, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10)),
    }
    return configs[name]()


def build(name: str) -> torch.nn.Module:
    """`timm:<name>`, `hf:<name>` or a torchvision name, with random weights, in eval mode."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=10).eval()
    if name.startswith("hf:"):
        return hf_model(name[3:]).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out[0]


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def smallest_input(model: torch.nn.Module) -> tuple[int, dict[int, str]]:
    """The smallest square size in SIZES the model runs on in eval mode (batch 2), and why smaller ones failed."""
    tried: dict[int, str] = {}
    for s in SIZES:
        try:
            with torch.no_grad():
                _logits(model(torch.randn(2, 3, s, s)))
            return s, tried
        except Exception as e:  # any failure means "not this size"; the reasons are kept
            tried[s] = _first_line(e)
    raise RuntimeError(f"no input size in {SIZES} works; at {SIZES[-1]}: {tried[SIZES[-1]]}")


def run_one(name: str, samples: int, progress: Path | None = None, batch: int = 4) -> dict[str, Any]:
    """All stages for one model; a failing stage ends the row with its reason.

    With `progress`, the row is written there after every stage, so that a process killed mid-way (out of
    memory) still tells which stage it reached."""
    import fxmpq

    row: dict[str, Any] = {"model": name, "stages": {}, "ok": False}
    torch.manual_seed(0)

    def stage(key: str, fn: Any) -> Any:
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as e:
            row["stages"][key] = {"ok": False, "seconds": time.perf_counter() - t}
            row["failed_stage"], row["reason"] = key, _first_line(e)
            row["traceback"] = traceback.format_exc(limit=-4)
            raise
        row["stages"][key] = {"ok": True, "seconds": time.perf_counter() - t}
        if progress is not None:
            progress.write_text(json.dumps(row, default=str))
        return out

    try:
        model = build(name)
        row["params"] = sum(p.numel() for p in model.parameters())
        size, _ = stage("input", lambda: smallest_input(model))
        row["input"] = size
        x = torch.randn(1, 3, size, size)
        gm = stage("trace", lambda: fxmpq.trace(model, x))
        row["capture"] = gm.meta.get("capture")
        del gm
        with torch.no_grad():
            classes = int(_logits(model(x)).shape[-1])
        q = stage("prepare", lambda: fxmpq.prepare(model, x))
        model = None  # the QuantModel holds its own copy; the largest nets (ViT-H) need the memory
        gc.collect()
        a = q.analysis
        row.update(layers=len(a.layers), searchable=len(a.searchable), macs=sum(m.macs for m in a.layers),
                   switchable_bn=sum(s.batchnorm is not None for s in q.sites.values()))
        g = torch.Generator().manual_seed(0)
        # batches of 4 by default (--batch): at the smallest inputs the last stages are 1x1, and with 2 samples a 2-bit pass gives
        # BatchNorm channels of zero variance whose 1/sqrt(eps) compounds to inf over the blocks (RegNet);
        # random weights still give gradients up to 1e20 (EfficientNet, DenseNet), so the norm is clipped
        row["batch"] = batch
        data = [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
                for _ in range(2)]
        ind = stage(
            "indicators",
            lambda: fxmpq.train_indicators(
                q,
                data,
                fxmpq.TrainOptions(indicator_epochs=1, max_steps=2, progress=False, clip_grad_norm=1.0),
            ),
        )
        res = stage("search", lambda: fxmpq.search(a, ind, fxmpq.Budget.uniform(4, 4)))
        row.update(search_status=res.status.value, search_ms=1e3 * (res.solve_time + res.build_time),
                   avg_bits=list(res.policy.average_bits(a)))
        stage("apply", lambda: fxmpq.apply_policy(q, res.policy, torch.randn(4, 3, size, size, generator=g)))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{name}.onnx"
            rep = stage(
                "lower",
                lambda: fxmpq.lower(q, path, x, fxmpq.LowerOptions(samples=samples, batch=8, check=False)),
            )
            row.update(onnx_mb=rep.onnx_bytes / 1e6, max_diff_steps=rep.max_diff_steps, max_abs_diff=rep.max_abs_diff,
                       rel_l2=rep.rel_l2, top1_agreement=rep.top1_agreement, fused=rep.fused_layers,
                       quantized=rep.quantized_layers, diverging=rep.diverging, top1_ties=rep.top1_ties,
                       top1_decisive=rep.top1_decisive, forced_max_steps=rep.forced_max_steps,
                       bn_nodes=rep.op_counts.get("BatchNormalization", 0), lowered_max_steps=rep.lowered_max_steps,
                       lowered_diverging=rep.lowered_diverging, criterion=str(rep.criterion), passed=rep.passed,
                       floor_steps=rep.noise_floor.max_steps if rep.noise_floor else None,
                       floor_top1_decisive=rep.noise_floor.top1_decisive if rep.noise_floor else None,
                       top1_disagreements=rep.top1_disagreements,
                       floor_disagreements=rep.noise_floor.disagreements if rep.noise_floor else None)

            def validate() -> None:
                # lower()'s verdict: within 1 output step and top-1 agreement >= 99.5 % on the inputs that are not
                # tied within that tolerance (random-weight nets often have near-tied logits: torchvision
                # zero-initialises the ViT head; those ties are reported, not judged), or faithful: every quantizer
                # within 1 step of PyTorch fed ONNX Runtime's own inputs, the lowering faithful, and ONNX Runtime's
                # end-to-end spread within 1.5x PyTorch's own noise floor (its float ops moved in the last bits)
                row["strict_parity"] = bool(rep.within_tolerance and (rep.top1_decisive is None
                                                                      or rep.top1_decisive >= 0.995))
                if not rep.passed:
                    floor = rep.noise_floor
                    raise fxmpq.ExportError(f"parity: {rep.max_diff_steps} output steps, top-1 agreement "
                                            f"{rep.top1_agreement} ({rep.top1_decisive} on the inputs not "
                                            f"tied), first divergence {rep.diverging}; stage by stage "
                                            f"{rep.forced_max_steps} steps; lowered graph vs QuantModel "
                                            f"{rep.lowered_max_steps} steps (first: {rep.lowered_diverging}); "
                                            f"noise floor {floor.max_steps if floor else None} steps")
            stage("validate", validate)
        row["ok"] = True
    except Exception:  # recorded in the row by stage(); anything before the first stage is recorded here
        if "reason" not in row:
            e = sys.exc_info()[1]
            row["failed_stage"], row["reason"] = "build", _first_line(e)
    return row


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(rows: list[dict[str, Any]]) -> str:
    """The markdown table, one row per model, then the failures with their reasons."""
    ok = sum(bool(r.get("ok")) for r in rows)
    amplified = [r["model"] for r in rows if r.get("ok") and r.get("strict_parity") is False]
    hub = any(r["model"].startswith(("timm:", "hf:")) for r in rows)
    floor = all(str(r.get("criterion", "")).startswith("faithful") for r in rows if r["model"] in amplified)
    lines = [f"{ok} of {len(rows)} {'models' if hub else 'torchvision classification models'} pass every stage"
             + (f"; {ok - len(amplified)} with end-to-end parity within 1 output step, {len(amplified)} "
                f"({', '.join(amplified)}) faithful at every quantizer (each within 1 step of PyTorch when fed "
                f"ONNX Runtime's inputs) while float rounding, amplified by the random-weight network, moves "
                f"their output further" + (" but no further than PyTorch's own noise floor allows (marked 'ok, "
                                           "faithful' with both figures in output steps)" if floor else
                                           " (marked 'ok, amplified')")
                if amplified else "") + ".", "",
             "| model | input | capture | layers (searchable) | GMACs | trace s | prepare s | indicators s | search ms | apply s "
             "| lower+ORT s | max diff (steps) | rel L2 | top-1 agree | int kernels | switchable BN | BN in ONNX | status |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        secs = {k: v["seconds"] for k, v in r.get("stages", {}).items()}
        top1 = r.get("top1_agreement")
        cells = [
            r["model"], _cell(r.get("input"), "d"), r.get("capture") or "-",
            f"{r['layers']} ({r['searchable']})" if "layers" in r else "-",
            _cell(r["macs"] / 1e9 if "macs" in r else None, ".3f"),
            *(_cell(secs.get(k), ".1f") for k in ("trace", "prepare", "indicators")),
            _cell(r.get("search_ms"), ".1f"), _cell(secs.get("apply"), ".1f"), _cell(secs.get("lower"), ".1f"),
            _cell(r.get("max_diff_steps"), ".2f"), _cell(r.get("rel_l2"), ".2g"),
            _cell(None if top1 is None else 100 * top1, ".1f") + (f" ({r['top1_ties']} tied)" if r.get("top1_ties") else ""),
            f"{r['fused']}/{r['quantized']}" if "fused" in r else "-",
            _cell(r.get("switchable_bn"), "d"), _cell(r.get("bn_nodes"), "d"),
            _status(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- **{r['model']}** at {r.get('failed_stage')}: {r.get('reason')}" for r in failed]
    return "\n".join(lines)


def _status(r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return f"FAIL at {r.get('failed_stage')}"
    crit = str(r.get("criterion", ""))
    if r.get("strict_parity") is False and crit.startswith("faithful"):  # lower()'s noise-floor criterion
        return (f"ok, faithful (ONNX Runtime {r['max_diff_steps']:.2f} steps, PyTorch's own noise floor "
                f"{r['floor_steps'] or 0.0:.2f})")
    if r.get("strict_parity") is False and crit.startswith("stage by stage"):  # a float output
        return f"ok, stage by stage (float output, {r['forced_max_steps']:.2f} steps)"
    if r.get("strict_parity") is False:  # a row kept from before the noise floor
        return f"ok, amplified (stage by stage {r['forced_max_steps']:.2f} steps)"
    return "ok"


def _record_death(out: Path, name: str, reason: str) -> None:
    """The row of a child that never finished: the stages it completed, and the one it died in."""
    partial = out / f"{name}.partial.json"
    row = json.loads(partial.read_text()) if partial.is_file() else {"model": name, "stages": {}}
    done = set(row.get("stages", {}))
    row.update(ok=False, failed_stage=next((s for s in STAGES if s not in done), "process"), reason=reason)
    (out / f"{name}.json").write_text(json.dumps(row, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_zoo"))
    ap.add_argument("--models", help="comma-separated subset (default: every classification model)")
    ap.add_argument("--source", choices=("torchvision", "timm", "hf"), default="torchvision",
                    help="which zoo (default torchvision; timm and hf need the bench extra)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per model (default 1800)")
    ap.add_argument("--samples", type=int, default=16, help="random inputs for the ONNX Runtime check")
    ap.add_argument("--batch", type=int, default=4,
                    help="batch of the two indicator-training steps (default 4; 2 halves their activations' memory)")
    ap.add_argument("--redo", action="store_true", help="run models again even when a result exists")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the per-model child process
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.one:
        args.out.mkdir(parents=True, exist_ok=True)
        row = run_one(args.one, args.samples, args.out / f"{args.one}.partial.json", args.batch)
        (args.out / f"{args.one}.json").write_text(json.dumps(row, indent=1, default=str))
        return 0
    default = {"torchvision": classification_models, "timm": lambda: [f"timm:{n}" for n in TIMM_MODELS],
               "hf": lambda: [f"hf:{n}" for n in HF_MODELS]}[args.source]
    names = [m.strip() for m in args.models.split(",")] if args.models else default()
    unknown = sorted(n for n in set(names) - set(classification_models()) if not n.startswith(("timm:", "hf:")))
    if unknown:
        print(f"bench_zoo.py: error: not torchvision classification models: {', '.join(unknown)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for i, name in enumerate(names, 1):
        result = args.out / f"{name}.json"
        if result.is_file() and not args.redo:
            continue
        t = time.time()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(args.out),
               "--samples", str(args.samples), "--batch", str(args.batch)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            if not result.is_file():  # the child died (a crash, out of memory): record why and where
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
                _record_death(args.out, name, f"exit status {proc.returncode}{killed}: {tail[:300]}")
        except subprocess.TimeoutExpired:
            _record_death(args.out, name, f"did not finish in {args.timeout} s")
        (args.out / f"{name}.partial.json").unlink(missing_ok=True)
        row = json.loads(result.read_text())
        print(f"[{i}/{len(names)}] {name}: {'ok' if row.get('ok') else 'FAIL ' + str(row.get('reason'))} "
              f"({time.time() - t:.0f} s)", flush=True)
    rows = [json.loads((args.out / f"{n}.json").read_text()) for n in names if (args.out / f"{n}.json").is_file()]
    report = render(rows)
    (args.out / "results.md").write_text(report + "\n")
    print(report)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
