"""Lower a quantized checkpoint written by fxmpq to a QDQ ONNX model and print its parity report.

    python tools/lower.py CHECKPOINT_OR_WORKDIR --out model.onnx [--model pkg.mod:factory]
        [--model-kwargs JSON] [--input 1x3x224x224]

The checkpoint is self-describing (model factory, input shape, candidate bits, hardware, policy, weights) and is
loaded with torch.load(weights_only=True). Exit status 0 when the ONNX model was written and matches PyTorch;
otherwise 1 with the reason on one line (2 for a missing, corrupt or foreign checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxmpq import models
from fxmpq.checkpoint import join_state, load_checkpoint
from fxmpq.cli import parse_shape
from fxmpq.errors import CheckpointError, FxmpqError, ModelSpecError
from fxmpq.export import export_fp32, lower
from fxmpq.passes.apply_policy import apply_policy
from fxmpq.policy import Policy
from fxmpq.prepare import prepare

log = logging.getLogger("fxmpq.tools.lower")

_FACTORY_KEYS = ("model_factory", "factory", "model")
_SHAPE_KEYS = ("example_shape", "input_shape", "example_input_shape", "example_shapes")
_CKPT_NAMES = ("finetune.pt", "finetuned.pt", "checkpoint.pt", "quantized.pt", "model.pt")


def find_checkpoint(path: Path) -> Path:
    """`path` itself, or the checkpoint inside a work directory (a known name, else the newest *.pt)."""
    if path.is_dir():
        for name in _CKPT_NAMES:
            if (path / name).is_file():
                return path / name
        pts = sorted(path.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        if not pts:
            raise CheckpointError(f"work directory {path} holds no checkpoint (*.pt)")
        return pts[-1]
    return path


def resolve_factory(spec: str, where: str, kwargs: Mapping[str, Any] | None = None) -> Callable[[], nn.Module]:
    """A no-argument builder for the model `spec` names; CheckpointError naming `where` when it does not resolve."""
    try:
        models.resolve_factory(spec)  # fail here, naming the checkpoint, before anything is built
    except ModelSpecError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return lambda: models.build_model(spec, kwargs)


def _first(meta: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if meta.get(k) is not None:
            return meta[k]
    return None


def _state_dict(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model state: a split_state skeleton in the metadata joined with its tensors, or the flat tensors."""
    for key in ("state", "model_state", "state_dict", "model"):
        skel = meta.get(key)
        if isinstance(skel, dict) and "__dict__" in skel:
            state = join_state(skel, tensors, where)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                return state["model"]
            return state
    if any(k.startswith("model.") for k in tensors):
        return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return dict(tensors)


def load_quantized(path: Path, model_spec: str | None = None, input_shape: tuple[int, ...] | None = None,
                   model_kwargs: Mapping[str, Any] | None = None) -> tuple[Any, torch.Tensor, Callable[[], nn.Module]]:
    """Rebuild the QuantModel a checkpoint describes: (qmodel in eval mode, example input, model factory)."""
    ckpt = find_checkpoint(path)
    tensors, meta = load_checkpoint(ckpt)
    where = str(ckpt)
    spec = model_spec or _first(meta, _FACTORY_KEYS)
    if not isinstance(spec, str):
        raise CheckpointError(f"{where}: no model factory recorded; pass --model package.module:function")
    kwargs = model_kwargs if model_kwargs is not None else meta.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: model_kwargs must be an object, found {type(kwargs).__name__}")
    factory = resolve_factory(spec, where, kwargs)
    shape = input_shape or _first(meta, _SHAPE_KEYS)
    if isinstance(shape, list) and shape and isinstance(shape[0], list):
        shape = shape[0]
    if not shape:
        raise CheckpointError(f"{where}: no example input shape recorded; pass --input 1x3x224x224")
    example = torch.randn(*[int(d) for d in shape])
    policy = meta.get("policy")
    if not isinstance(policy, dict) or not policy:
        raise CheckpointError(f"{where}: no policy recorded (expected 'policy': {{layer: [w, a]}}); lower a "
                              f"checkpoint written by fxmpq.finetune")
    bits = meta.get("bits") or meta.get("candidate_bits")
    hardware = meta.get("hardware") or "bitops"
    if isinstance(hardware, dict):  # {"name", "path"}: a user's file when it exists, else the shipped name
        hw_path = hardware.get("path")
        hardware = hw_path if hw_path and Path(hw_path).is_file() else (hardware.get("name") or "bitops")
    state = _state_dict(tensors, meta, where)
    per_channel = meta.get("per_channel")
    if per_channel is None:  # infer from the weight quantizers' step sizes ([1, channels] per channel)
        per_channel = any(k.endswith("weight_quantizer.step") and v.dim() == 2 and v.shape[-1] > 1
                          for k, v in state.items() if isinstance(v, torch.Tensor))
    pol = Policy({k: tuple(v) for k, v in policy.items()})
    has_output_q = any(".output_quantizer." in k for k in state)

    def build() -> Any:
        try:
            return prepare(factory(), example, hardware=hardware, bits=tuple(bits) if bits else (2, 3, 4, 5, 6),
                           per_channel=bool(per_channel))
        except FxmpqError as e:
            raise CheckpointError(f"{where}: cannot rebuild model {spec}: {' '.join(str(e).split())}") from None

    q = build()
    if has_output_q:
        apply_policy(q, pol)
    else:  # fine-tuned after set_policy only: load, then fix and add output quantizers (initialised on data)
        q.set_policy(pol)
    target = q.state_dict()
    if set(state) != set(target):
        # a state saved from the QuantModel itself or from its graph module
        gm_state = {f"graph_module.{k}": v for k, v in state.items()}
        if set(gm_state) == set(target):
            state = gm_state
    missing = sorted(set(target) - set(state))
    extra = sorted(set(state) - set(target))
    if missing or extra:
        raise CheckpointError(f"{where}: weights do not fit model {spec} under its policy "
                              f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    try:
        q.load_state_dict(state, strict=True)
    except (RuntimeError, FxmpqError) as e:
        raise CheckpointError(f"{where}: weights do not fit model {spec}: {str(e).splitlines()[0]}") from None
    if not has_output_q:
        log.warning("%s: checkpoint has no output quantizers (fine-tuned without apply_policy); adding them, "
                    "initialised on random inputs", where)
        apply_policy(q, pol, torch.randn(16, *example.shape[1:]))
    q.eval()
    return q, example, factory


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="checkpoint file or work directory written by fxmpq")
    ap.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    ap.add_argument("--model", help="model factory 'package.module:function' (overrides the checkpoint's)")
    ap.add_argument("--model-kwargs", help="JSON keyword arguments for the factory (overrides the checkpoint's)")
    ap.add_argument("--input", help="input shape such as 1x3x224x224 (overrides the checkpoint's)")
    ap.add_argument("--samples", type=int, default=64, help="random inputs for the parity check (default 64)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        shape = parse_shape(args.input, batch=True) if args.input else None
        kwargs = models.parse_model_kwargs(args.model_kwargs) if args.model_kwargs else None
        q, example, factory = load_quantized(args.checkpoint, args.model, shape, kwargs)
        rep = lower(q, args.out, example, samples=args.samples)
        print(rep.table())
        with tempfile.TemporaryDirectory() as d:
            fp = export_fp32(factory(), Path(d) / "fp32.onnx", example)
            fp_bytes = fp.stat().st_size
        print(f"size           {rep.onnx_bytes / 1e6:.3f} MB vs FP32 ONNX {fp_bytes / 1e6:.3f} MB "
              f"({fp_bytes / rep.onnx_bytes:.2f}x smaller; packed {rep.packed_weight_bytes / 1e6:.3f} MB "
              f"at the policy's bit-widths)")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FxmpqError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
