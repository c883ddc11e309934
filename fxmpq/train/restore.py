"""Rebuild the fine-tuned QuantModel a checkpoint describes (model factory, input shape, bits, policy, weights)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from ..core.checkpoint import join_state, load_checkpoint
from ..core.workdir import FINETUNE_CKPT, INDICATORS_CKPT
from ..cost.policy import Policy
from ..errors import CheckpointError, FxmpqError, ModelSpecError, PolicyError
from ..quant.quant_model import QuantModel
from ..stages import apply_policy, prepare
from .train_state import ModelMeta, Stage

log = logging.getLogger(__name__)

__all__ = ["find_checkpoint", "load_quantized"]

def find_checkpoint(path: str | Path) -> Path:
    """`path` itself, or the fine-tuning checkpoint of a work directory (its finetune.pt)."""
    path = Path(path)
    if path.is_dir():
        if (path / FINETUNE_CKPT).is_file():
            return path / FINETUNE_CKPT
        if (path / INDICATORS_CKPT).is_file():
            raise CheckpointError(f"work directory {path} holds only the indicator-training checkpoint "
                                  f"{INDICATORS_CKPT}: {_finetune_hint(path / INDICATORS_CKPT)}")
        others = sorted(p.name for p in path.glob("*.pt"))
        raise CheckpointError(f"work directory {path} holds no {FINETUNE_CKPT}"
                              + (f" (other .pt files: {', '.join(others[:5])}; give the checkpoint file itself)"
                                 if others else ""))
    return path


def load_quantized(
    path: str | Path,
    model_spec: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[QuantModel, torch.Tensor, Callable[[], nn.Module]]:
    """(QuantModel in eval mode, random example input, FP32 model factory) from a fine-tuning checkpoint.

    `path` is a checkpoint or a work directory (find_checkpoint). The checkpoint's metadata names the model
    factory, its keyword arguments, the input shape (batch first), the candidate bits, the hardware and the
    policy; `model_spec`, `model_kwargs` and `input_shape` override them. CheckpointError naming the file when
    it is missing, corrupt, foreign, an indicator-training checkpoint (its policy is the last random one of joint
    training, not a searched one) or when its weights do not fit the model it names.
    """
    ckpt = find_checkpoint(path)
    tensors, meta = load_checkpoint(ckpt)
    where = str(ckpt)
    if meta.get("kind") == Stage.INDICATORS:
        raise CheckpointError(f"{where}: an indicator-training checkpoint (its policy is the last random one of "
                              f"joint training, not a searched one); {_finetune_hint(ckpt)}")
    if meta.get("kind") not in (Stage.FINETUNE, Stage.INDICATORS):
        raise CheckpointError(f"{where}: not a training checkpoint of fxmpq (kind {meta.get('kind')!r})")
    recorded = ModelMeta.read(meta, where)
    spec = model_spec or recorded.model_factory
    if not isinstance(spec, str):
        raise CheckpointError(f"{where}: no model factory recorded; give one (package.module:function, "
                              f"fxmpq lower --model)")
    kwargs = model_kwargs if model_kwargs is not None else recorded.model_kwargs
    factory = _factory(spec, where, kwargs)
    shape = input_shape or (recorded.example_shapes[0] if recorded.example_shapes else None)
    if not shape:
        raise CheckpointError(f"{where}: no example input shape recorded; give one (such as 1x3x224x224, "
                              f"fxmpq lower --input)")
    example = torch.randn(*[int(d) for d in shape])
    policy = recorded.policy
    if not policy:
        raise CheckpointError(f"{where}: no policy recorded (expected 'policy': {{layer: [w, a]}}); lower a "
                              f"checkpoint written by fxmpq.finetune")
    hw_path = recorded.hardware.get("path")  # a user's file when it still exists, else the shipped name
    hardware = hw_path if hw_path and Path(hw_path).is_file() else (recorded.hardware.get("name") or "bitops")
    state = _state_dict(tensors, meta, where)
    pol = Policy({k: tuple(v) for k, v in policy.items()})
    has_output_q = any(".output_quantizer." in k for k in state)

    try:
        q = prepare(factory(), example, hardware=hardware, bits=tuple(recorded.bits),
                    per_channel=bool(recorded.per_channel), act_bits=tuple(recorded.act_bits) or None)
    except FxmpqError as e:
        raise CheckpointError(f"{where}: cannot rebuild model {spec}: {' '.join(str(e).split())}") from None
    try:
        if has_output_q:
            apply_policy(q, pol)
        else:  # fine-tuned after set_policy only: load, then fix and add output quantizers (initialised on data)
            q.set_policy(pol)
    except PolicyError as e:
        raise CheckpointError(f"{where}: its policy does not fit model {spec}: {' '.join(str(e).split())}") from None
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
    except (RuntimeError, FxmpqError) as e:  # torch's first line is a heading; the mismatches follow it
        lines = [x.strip().rstrip(".") for x in str(e).splitlines() if x.strip()]
        detail = "; ".join(lines[1:3]) + ("; ..." if len(lines) > 3 else "") if len(lines) > 1 else str(e)
        raise CheckpointError(f"{where}: weights do not fit model {spec}: {detail}") from None
    if not has_output_q:
        log.warning("%s: checkpoint has no output quantizers (fine-tuned without apply_policy); adding them, "
                    "initialised on random inputs", where)
        apply_policy(q, pol, torch.randn(16, *example.shape[1:]))
    q.eval()
    return q, example, factory


def _finetune_hint(ckpt: Path) -> str:
    ft = ckpt.parent / FINETUNE_CKPT
    if ft.is_file():
        return f"lower the fine-tuning checkpoint {ft} instead"
    return (f"lower the fine-tuning checkpoint instead ({ft} once fine-tuning ran: fxmpq finetune ... --joint "
            f"{ckpt.parent} --out {ckpt.parent} after fxmpq search, or fxmpq quantize --work-dir; in Python "
            f"fxmpq.quantize(work_dir=...) or fxmpq.finetune(checkpoint=...))")


def _factory(spec: str, where: str, kwargs: Mapping[str, Any]) -> Callable[[], nn.Module]:
    """A no-argument builder for the model `spec` names; CheckpointError naming `where` when it does not resolve."""
    try:
        models.resolve_factory(spec)  # fail here, naming the checkpoint, before anything is built
    except ModelSpecError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return lambda: models.build_model(spec, kwargs)


def _state_dict(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model state save_state wrote: its skeleton (metadata 'model_state') joined with its tensors."""
    skel = meta.get("model_state")
    if not isinstance(skel, dict):
        raise CheckpointError(f"{where}: no model state recorded (metadata 'model_state')")
    return join_state(skel, tensors, where)
