"""LSQ's forward and backward as one pass each over the tensor on CPU: a small C++ kernel, compiled on first use.

PyTorch's operators make the fake-quant step five passes forward (divide, clamp, compare, round, multiply) and three
backward, and keep the output and an in-range mask for the backward. This kernel reads x once and writes the output;
the backward reads the gradient and x once, recomputes the mask and the output (the pass is bound by memory traffic,
not arithmetic), writes dx and reduces the step's gradient in the same pass. The same numbers forward: x / s (a
division, never a multiplication by 1/s), clamped, rounded half to even, times s, in IEEE float32 with no
contraction, so ONNX Runtime's QuantizeLinear still matches it bit for bit; dx is bit-identical too. The step
gradient is summed in float64 over fixed blocks, in order: deterministic whatever the thread count (PyTorch's float32
sum differs from it in the last bits).

Contiguous float32 CPU tensors of 4096 elements or more, with one step (activations) or one per slice along dim 0
(weights per output channel); everything else (GPU tensors included) takes the PyTorch path. Built with
torch.utils.cpp_extension.load_inline (a C++ compiler and ninja; cached per source and flags, -march=native: a
cache shared between different CPUs is not supported); when that fails, or with FXMPQ_FUSED_KERNEL=0, fxmpq stays
on the PyTorch path and says so once.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..core.switches import ThreadSwitch

log = logging.getLogger(__name__)

__all__ = ["disabled", "fused_backward", "fused_forward", "fused_kernel", "usable"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {
constexpr int64_t kGrain = 16384;
constexpr int64_t kBlock = 32768;  // the step gradient's fixed summation blocks

// round half to even for |v| <= 2^22 (the grids are at most 16 bits): adding and subtracting 1.5 * 2^23 leaves
// v rounded in float32's current (nearest-even) mode; copysign keeps -0.0 as torch.round does
inline float round_even(float v) {
  const float magic = 12582912.0f;
  float r = (v + magic) - magic;
  return std::copysign(r, v);
}
}  // namespace

void forward_range(const float* __restrict__ px, float* __restrict__ po, float s, float lo, float hi, int64_t b,
                   int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const float v = px[i] / s;
    const float c = v < lo ? lo : (v > hi ? hi : v);  // NaN stays NaN, as torch.clamp
    po[i] = round_even(c) * s;
  }
}

// x viewed as [C, inner] (C = 1: one step; else a step per slice along dim 0, a weight's output channels)
at::Tensor lsq_forward(const at::Tensor& x, const at::Tensor& steps, double qmin, double qmax) {
  auto out = at::empty_like(x);
  const float* px = x.data_ptr<float>();
  const float* ps = steps.data_ptr<float>();
  const int64_t n = x.numel(), inner = n / steps.numel();
  float* po = out.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e;) {
      const int64_t c = i / inner, stop = std::min(e, (c + 1) * inner);
      forward_range(px, po, ps[c], lo, hi, i, stop);
      i = stop;
    }
  });
  return out;
}

// dx = dy inside the range, 0 outside (dy * inside, as the PyTorch path computes it), and per step the sum of
// dy * (out - x * inside) (the gradient before g / s) in 16 float64 lanes (i mod 16) per fixed block, blocks added
// in order: the same whatever the threads. The mask and out are recomputed from x (as the forward computed them):
// cheaper than storing and reading them back, the pass being bound by memory traffic
template <bool kX, bool kS>
double backward_range(const float* __restrict__ pg, const float* __restrict__ px, float* __restrict__ pgx, float s,
                      float lo, float hi, int64_t b, int64_t e) {
  double lanes[16] = {0.0};
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    for (int k = 0; k < 16; ++k) {
      const float x = px[i + k], v = x / s;
      const float c = v < lo ? lo : (v > hi ? hi : v);
      const float inside = (c == v) ? 1.0f : 0.0f;
      if (kX) pgx[i + k] = pg[i + k] * inside;
      if (kS) {
        const float d = round_even(c) * s - x * inside;  // out - x * inside
        lanes[k] += static_cast<double>(d) * static_cast<double>(pg[i + k]);
      }
    }
  }
  for (int k = 0; i < e; ++i, ++k) {
    const float x = px[i], v = x / s;
    const float c = v < lo ? lo : (v > hi ? hi : v);
    const float inside = (c == v) ? 1.0f : 0.0f;
    if (kX) pgx[i] = pg[i] * inside;
    if (kS) {
      const float d = round_even(c) * s - x * inside;
      lanes[k] += static_cast<double>(d) * static_cast<double>(pg[i]);
    }
  }
  double acc = 0.0;
  for (int k = 0; k < 16; ++k) acc += lanes[k];
  return acc;
}

std::vector<at::Tensor> lsq_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& steps,
                                     double qmin, double qmax, bool need_x, bool need_s) {
  const int64_t channels = steps.numel(), n = x.numel(), inner = n / channels;
  const int64_t per = (inner + kBlock - 1) / kBlock, blocks = channels * per;
  at::Tensor gx = need_x ? at::empty_like(x) : at::Tensor();
  std::vector<double> partial(blocks, 0.0);
  const float* pg = grad.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  const float* ps = steps.data_ptr<float>();
  float* pgx = need_x ? gx.data_ptr<float>() : nullptr;
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / std::min(inner, kBlock)), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c = blk / per, b = c * inner + (blk % per) * kBlock, e = std::min((c + 1) * inner, b + kBlock);
      if (need_x && need_s) partial[blk] = backward_range<true, true>(pg, px, pgx, ps[c], lo, hi, b, e);
      else if (need_x) backward_range<true, false>(pg, px, pgx, ps[c], lo, hi, b, e);
      else partial[blk] = backward_range<false, true>(pg, px, pgx, ps[c], lo, hi, b, e);
    }
  });
  at::Tensor total = at::zeros({channels}, x.options().dtype(at::kDouble));
  double* pt = total.data_ptr<double>();
  for (int64_t c = 0; c < channels; ++c) {
    double acc = 0.0;
    for (int64_t k = 0; k < per; ++k) acc += partial[c * per + k];
    pt[c] = acc;
  }
  return {gx, total};
}
"""

_lock = threading.Lock()
_module: Any = None
_tried = False
_off = ThreadSwitch()  # `disabled()` in this thread


def disabled() -> AbstractContextManager[None]:
    """Within the block (this thread), fake quantization takes PyTorch's operators: for comparisons and tests."""
    return _off.block()


def fused_kernel() -> Any:
    """The compiled module, or None when it cannot be built (logged once) or FXMPQ_FUSED_KERNEL=0."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("FXMPQ_FUSED_KERNEL", "1") == "0":
            _tried = True
            return None
        quiet = logging.getLogger("torch.utils.cpp_extension")  # its import warns "No CUDA runtime": not ours
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load_inline

            flags = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
            ldflags = []
            if platform.machine().lower() in ("x86_64", "amd64"):
                flags.append("-march=native")
            if platform.system() == "Linux" and "OpenMP" in torch.__config__.parallel_info():
                flags.append("-fopenmp")  # at::parallel_for is OpenMP in these builds: libgomp.so.1, torch's own
                ldflags.append("-fopenmp")
            log.info("fxmpq: loading the fused LSQ CPU kernel (compiled on first use, under a minute)")
            _module = load_inline(name="fxmpq_lsq_cpu", cpp_sources=[_SOURCE], functions=["lsq_forward", "lsq_backward"],
                                  extra_cflags=flags, extra_ldflags=ldflags, verbose=False)
        except Exception as e:  # no compiler, no ninja, a read-only cache: the PyTorch path serves
            log.warning("fxmpq: the fused LSQ CPU kernel could not be built (%s); using PyTorch's operators",
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            _module = None
        finally:
            quiet.setLevel(level)
        _tried = True
    return _module


def usable(x: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether the fused kernel applies: a contiguous float32 CPU tensor of at least 4096 elements, one step or one
    per slice along dim 0 (a weight's output channels), and the kernel built."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.numel() >= 4096
            and s.dtype == torch.float32 and not _off.on):
        return False
    if s.numel() != 1 and not (x.dim() > 0 and s.numel() == x.shape[0] and s.dim() == x.dim()
                               and s.shape[0] == x.shape[0]):
        return False
    return fused_kernel() is not None


def fused_forward(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """fake_quantize(x, s, qmin, qmax), bit for bit; the caller checked `usable`."""
    return fused_kernel().lsq_forward(x, _steps(s), float(qmin), float(qmax))


def fused_backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, need_x: bool,
                   need_s: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, per step sum(dy * (out - x * inside)) in float64, shaped [steps]) of LSQ's backward, the mask and the
    output recomputed from x; None where not needed."""
    gx, total = fused_kernel().lsq_backward(grad.contiguous(), x, _steps(s), float(qmin), float(qmax), need_x, need_s)
    return (gx if need_x else None), (total if need_s else None)


def _steps(s: torch.Tensor) -> torch.Tensor:
    return s.detach().reshape(-1).contiguous()
