"""This machine's CPU as a profile records it: vendor, family/model, model name and the instruction-set features
that decide int8 speed in ONNX Runtime (AVX2, AVX-512, VNNI, AMX). A profile belongs to a CPU: int8 is 0.29x FP32
on a VNNI Xeon and about 1x on a Zen 1 EPYC with AVX2 only (docs/RESULTS.md section 3)."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INT8_FEATURES", "CpuInfo", "cpu_info"]

# /proc/cpuinfo flags that change ONNX Runtime's int8 kernels (MLAS picks its kernels by them)
INT8_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    """vendor ("AuthenticAMD", "GenuineIntel"), family and model numbers, model name, and which INT8_FEATURES it has."""

    vendor: str
    family: int | None
    model: int | None
    name: str
    features: tuple[str, ...]

    def describe(self) -> str:
        """'AMD EPYC 7571 (AuthenticAMD family 23 model 1; avx2)'."""
        fm = f" family {self.family} model {self.model}" if self.family is not None else ""
        return f"{self.name} ({self.vendor}{fm}; {', '.join(self.features) or 'none of ' + '/'.join(INT8_FEATURES)})"


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CpuInfo, from /proc/cpuinfo (first processor); the platform's strings elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())

    def number(key: str) -> int | None:
        v = fields.get(key, "")
        return int(v) if v.isdigit() else None

    return CpuInfo(vendor=fields.get("vendor_id", platform.machine() or "unknown"), family=number("cpu family"),
                   model=number("model"), name=fields.get("model name") or platform.processor() or "unknown CPU",
                   features=tuple(f for f in INT8_FEATURES if f in flags))
