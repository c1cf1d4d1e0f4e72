"""What the Triton launchers share: the device guard, the SM count, the unit-stride rule, the interpreter switch and
an fp32 tanh (softcaps).

Device guard: Triton launches on the *current* CUDA device, not the tensors' (triton/runtime/jit.py), so a model on
cuda:1 while cuda:0 is current would run, and autotune, on the wrong GPU. Every public launcher of gptkernels/triton
is wrapped.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from gptkernels._dispatch import interpret_mode as interpreting  # noqa: F401  (TRITON_INTERPRET=1: the interpreter)

_LIBDEVICE = tl.constexpr(not interpreting())  # the interpreter cannot run libdevice calls


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit-stride last dim. The kernels take any stride on the other dims (0 included: an expanded
    gradient such as that of ``y.sum()`` is read in place) but address the last dim as base + index, so a transposed
    or column-strided tensor is copied here, on purpose."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def on_tensor_device(launcher):
    """Decorator: run ``launcher`` with the device of its first tensor argument current."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return wrapper


@triton.jit
def tanh(x):
    # fp32 tanh: libdevice's (2 ulp) on the GPU; the interpreter has no libdevice (attention's and cross_entropy's
    # softcap).
    if _LIBDEVICE:
        t = libdevice.tanh(x)
    else:
        # Interpreter only: (1 - e) / (1 + e) with e = exp(-2|x|) loses ~eps/|x| relative for small |x|, where the
        # series (to x^9, truncation < 2e-10 relative at |x| = 1/8) takes over. NaN stays NaN.
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        x2 = x * x
        series = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
        t = tl.where(ax < 0.125, series, (1.0 - e) / (1.0 + e))
        t = tl.where(x < 0.0, -t, t)
    return t
