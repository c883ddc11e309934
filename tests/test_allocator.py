"""fxmpq.train.allocator: glibc's malloc thresholds raised once per process for CPU training, and left alone on request."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CODE = ("from fxmpq.train.allocator import keep_freed_memory as k, release_freed_memory as r; "
        "print(k(), k()); r()")


def _run(env_value: str | None) -> str:
    import os

    env = dict(os.environ)
    env.pop("FXMPQ_MALLOC_TUNING", None)
    if env_value is not None:
        env["FXMPQ_MALLOC_TUNING"] = env_value
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_is_tuned_once_and_not_when_switched_off() -> None:
    assert _run(None).split() == ["True", "True"]
    assert _run("0").split() == ["False", "False"]
