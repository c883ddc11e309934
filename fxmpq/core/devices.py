"""Device arguments: the one check that a device named by the user exists on this machine."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ArgumentError

__all__ = ["as_device"]


def as_device(device: Any, where: str = "device") -> torch.device | None:
    """`device` ("cpu", "cuda", "cuda:1", "mps", a torch.device or None) as a torch.device that can be used here.

    ArgumentError naming `where` when the text is not a device, when CUDA (or MPS) is not available, or when the
    index is past the devices this machine has; None stays None (the caller keeps the model's device).
    """
    if device is None:
        return None
    if not isinstance(device, str | torch.device):
        raise ArgumentError(f"{where}={device!r}: expected a device such as 'cpu' or 'cuda:0' (a str or "
                            f"torch.device), found {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ArgumentError(f"{where}={str(device)[:60]!r}: not a device; expected 'cpu', 'cuda', 'cuda:<index>' "
                            f"or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"{where}={str(device)!r}: CUDA is not available on this machine "
                                f"(torch.cuda.is_available() is False); use device='cpu' or leave device unset")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ArgumentError(f"{where}={str(device)!r}: this machine has {count} CUDA device(s) "
                                f"(cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ArgumentError(f"{where}={str(device)!r}: MPS is not available on this machine; use device='cpu'")
    elif dev.type == "meta":
        raise ArgumentError(f"{where}='meta': a meta device holds no data, nothing can be trained or run on it")
    return dev
