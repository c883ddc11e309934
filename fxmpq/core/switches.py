"""A per-thread on/off switch and the block that turns it on: how tests and benchmarks select a reference path
(PyTorch's operators instead of the fused kernel, the input step's plain gradient) without a global flag."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ThreadSwitch"]


class ThreadSwitch:
    """Off unless a `block()` of this thread is running."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def on(self) -> bool:
        return getattr(self._local, "on", False)

    @contextmanager
    def block(self) -> Iterator[None]:
        """Within the block (this thread), the switch is on."""
        was = self.on
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = was
