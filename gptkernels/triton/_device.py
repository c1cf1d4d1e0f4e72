"""Run a Triton launcher on the GPU that holds its tensors.

Triton launches on the *current* CUDA device, not the tensors' (triton/runtime/jit.py), so a model on cuda:1 while
cuda:0 is current would run, and autotune, on the wrong GPU. Every public launcher of gptkernels/triton is wrapped.
"""

from __future__ import annotations

import contextlib
import functools

import torch


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
