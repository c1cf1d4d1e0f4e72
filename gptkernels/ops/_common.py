"""What every op file shares: custom-op registration with fakes, kernel-op lookup, the eager fast path's pieces,
the additive mask, and calling an autograd.Function only when a gradient can flow.

An op file (``gptkernels/ops/<stem>.py``) registers its Triton custom ops with :func:`python_op`, the fakes of its
C++ ops with :func:`register_cpp_fakes`, and looks kernels up with :func:`kernel_op`. In eager mode a Triton op is
its Python launcher called directly (the custom-op wrapper costs host time and adds nothing there); torch.compile
and opcheck see the registered op.

The eager fast path: outside torch.compile, a public op asks :func:`gptkernels._dispatch.choice` for its cached
backend decision; for the C++ backends it then calls the op's entry in ``gptkernels._C`` (``csrc/ops/eager.h``):
checks, autograd and the kernel in one C++ call. The entry returns None for a call it does not cover, and raises on
bad input; either way the op falls back to its checked Python path, which handles every case and raises the
documented errors.
"""

from __future__ import annotations

import torch

from gptkernels import _dispatch

is_compiling = torch.compiler.is_compiling
NEG_INF = float("-inf")

C = _dispatch.extension()  # gptkernels._C or None
# The backends whose eager calls go through gptkernels._C's entry points (an extension built before they existed
# has none: every call then takes the Python path).
EAGER_BACKENDS = ("cpu", "cuda") if C is not None and hasattr(C, "layernorm") else ()

_PY_IMPLS: dict[str, object] = {}  # custom ops written in Python (Triton launchers, chunk loops): name -> function


def has_cpp_op(name: str) -> bool:
    """Whether the loaded extension registered ``gptkernels::<name>`` (an older build may lack newer ops)."""
    if C is None:
        return False
    try:
        getattr(torch.ops.gptkernels, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def python_op(name: str, fake):
    """Decorator: register ``fn`` (written in Python: a Triton launcher, or a loop over other ops) as the custom op
    ``gptkernels::<name>`` with ``fake`` as its fake implementation, and keep ``fn`` for direct eager calls
    (:func:`kernel_op`): a Python custom op's dispatch costs tens of microseconds a call, which only tracing needs."""

    def register(fn):
        torch.library.custom_op(f"gptkernels::{name}", mutates_args=())(fn)
        torch.library.register_fake(f"gptkernels::{name}")(fake)
        _PY_IMPLS[name] = fn
        return fn

    return register


def register_cpp_fakes(fakes: dict) -> bool:
    """Register the fake of each C++ op ``gptkernels::<name>`` that the extension has; True if all of them exist."""
    have = all(has_cpp_op(name) for name in fakes)
    for name, fake in fakes.items():
        if has_cpp_op(name):
            torch.library.register_fake(f"gptkernels::{name}")(fake)
    return have


def registered_op(name: str, backend: str):
    """The registered custom op of kernel op ``name`` on ``backend`` (what torch.compile and opcheck see):
    ``gptkernels::<name>`` for cpu and cuda (one op, dispatched by device), ``gptkernels::<name>_triton``."""
    return getattr(torch.ops.gptkernels, name + "_triton" if backend == "triton" else name)


def kernel_op(name: str, backend: str):
    """The callable that runs kernel op ``name`` on ``backend``: the registered op, except an op written in Python
    (:func:`python_op`: every Triton op, the chunk loops) in eager mode, which is that Python function itself."""
    if not is_compiling():
        impl = _PY_IMPLS.get(name + "_triton" if backend == "triton" else name)
        if impl is not None:
            return impl
    return registered_op(name, backend)


def rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., N) as (M, N): reshape(-1, N) cannot infer M when N == 0."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool keep-mask (True = keep/attend) as 0 / -inf in ``dtype``, or a float mask cast to ``dtype``."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)
    return mask.to(dtype)


def eager_call(entry, *args):
    """``entry(*args)`` of gptkernels._C, or None when the call must take the checked Python path (the entry said
    so, or it raised on bad input: that path raises the documented error)."""
    try:
        return entry(*args)
    except Exception:  # noqa: BLE001
        return None


class _NoGradCtx:
    """The parts of autograd's ctx that the forwards use, as no-ops (attributes set on it are simply dropped)."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` when grad mode is on and a tensor argument requires grad, else its forward alone.

    ``Function.apply`` builds a graph node even under ``torch.no_grad()``; at decode sizes that bookkeeping was a
    large share of a call (LayerNorm on (1, 768): 3 us of 13, measured on the 2-core EPYC).
    """
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    return function.forward(_NoGradCtx(), *args)
