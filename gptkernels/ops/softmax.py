"""Softmax over the last dim with a scale, an additive or boolean mask, and causal masking.

Math (row-wise over the last dim N, in fp32 whatever the input dtype):
    z = scale * x + mask,   z[..., i, j] = -inf for j > i when causal
    y = exp(z - max_j z) / sum_j exp(z - max_j z);   a row whose z is all -inf (fully masked) gives y = 0, not NaN
    A NaN or +inf z in a visible column makes its whole row of y NaN, the columns hidden by causal masking included,
    as torch.softmax on masked_fill'ed logits does; its row of dx is NaN too (backward sees only y, so hidden columns
    included, where eager's masked_fill would give 0). A NaN in x at a column that causal masking hides is never
    read. The mask is additive: NaN + -inf is NaN.
Backward:
    dz = y * (dy - sum_j dy * y)   (the gradient of the logits z; 0 wherever y is 0, so masked positions get 0,
                                   except in a NaN row)
    dx = scale * dz,   dmask = dz summed over the dims the mask was broadcast along

Shapes: x, y: (..., N), any float dtype on the torch backend, fp32/fp16/bf16 on the kernels; y has x's dtype.
causal: x: (..., T, N), row i (index in dim -2) sees columns j <= i, top-left aligned as in PyTorch SDPA, so
T != N is fine. mask: broadcastable to x, e.g. (T, N), (1, 1, T, N), (N,), (B, 1, 1, N).

Mask handling: a bool mask (True = keep, as SDPA's attn_mask) becomes an fp32 additive mask (0 / -inf) and a
float mask is cast to fp32, both in the mask's own shape. The kernels read it through broadcast strides (stride 0
on broadcast dims) of x's (B, H, T, N) view, so a (T, N) mask on a (B, H, T, N) input costs T*N floats, never
B*H*T*N. (Only a > 4-D x whose mask broadcast cannot be folded into one leading dim gets a copy at x's size.)
A float mask that requires grad gets dmask (in its own shape and dtype): the bwd kernel then also writes dz in
fp32 (4 B per element), summed with torch. Bool masks and causal masking have no gradient.

Backward saves y only (x.dtype, the forward's output): not x and not the mask.

Backends: cuda (CUDA C++), triton, cpu (C++/OpenMP), torch (the eager reference below, autograd by PyTorch).
See gptkernels._dispatch.
"""

from __future__ import annotations

import math

import torch

from gptkernels import _dispatch
from gptkernels.ops import _common

_Err, _TypeErr = _dispatch.ArgumentError, _dispatch.ArgumentTypeError

_NEG_INF = _common.NEG_INF


# ----------------------------------------------------------------------------------------------- reference

def softmax_ref(x, scale=1.0, causal=False, mask=None):
    """Eager PyTorch; 16-bit inputs are computed in fp32, fp32/fp64 in their own dtype. Returns y in x.dtype.

    Fully masked rows give zeros (torch.softmax would give NaN). Differentiable in x and a float mask.
    """
    z = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    z = z * scale
    if mask is not None:
        z = z + _common.additive_mask(mask, z.dtype)
    if causal:
        t, n = z.shape[-2:]
        keep = torch.ones(t, n, dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~keep, _NEG_INF)
    if z.shape[-1] == 0:
        return torch.softmax(z, -1).to(x.dtype)  # rows of nothing (amax has no identity to return)
    # softmax is shift invariant: the max carries no gradient.
    m = z.amax(-1, keepdim=True).detach()
    m = torch.where(m == _NEG_INF, torch.zeros_like(m), m)  # all -inf: exp(-inf - 0) = 0, not exp(NaN)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    # s == 0 only when every z is -inf (then e is all 0). A NaN or +inf z makes s NaN and the row NaN, as
    # torch.softmax does: `where(s > 0, s, 1)` would have divided by 1 and kept the rest of the row finite.
    y = e / torch.where(s == 0, torch.ones_like(s), s)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------- registration
def _fwd_fake(x, mask, scale, causal):
    return x.new_empty(x.shape)  # contiguous, whatever x's strides


def _bwd_fake(y, dy, scale, mask_grad):
    dz = y.new_empty(y.shape if mask_grad else (0,), dtype=torch.float32)
    return y.new_empty(y.shape), dz


@_common.python_op("softmax_fwd_triton", _fwd_fake)
def _softmax_fwd_triton(x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    from gptkernels.triton import softmax as tl_sm

    return tl_sm.softmax_fwd(x, mask, scale, causal)


@_common.python_op("softmax_bwd_triton", _bwd_fake)
def _softmax_bwd_triton(
    y: torch.Tensor, dy: torch.Tensor, scale: float, mask_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from gptkernels.triton import softmax as tl_sm

    return tl_sm.softmax_bwd(y, dy, scale, mask_grad)


_common.register_cpp_fakes({"softmax_fwd": _fwd_fake, "softmax_bwd": _bwd_fake})


# ----------------------------------------------------------------------------------------------- autograd
class SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale, causal, backend):
        m32 = _common.additive_mask(mask, torch.float32) if mask is not None else None
        y = _common.kernel_op("softmax_fwd", backend)(x, m32, scale, causal)
        ctx.save_for_backward(y)
        ctx.scale, ctx.backend = scale, backend
        ctx.mask_shape = mask.shape if mask is not None else None
        ctx.mask_dtype = mask.dtype if mask is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[1]
        dx, dz = _common.kernel_op("softmax_bwd", ctx.backend)(y, dy, ctx.scale, mask_grad)
        dmask = dz.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype) if mask_grad else None
        return dx if ctx.needs_input_grad[0] else None, dmask, None, None, None


# ------------------------------------------------------------------------------------------------- public
def _check(x, scale, causal, mask):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise _TypeErr(
            f"softmax: x must be a floating-point tensor, got {type(x).__name__}"
            f"{' of dtype ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}"
        )
    if x.dim() < 1:
        raise _Err("softmax: x must have at least 1 dim (softmax runs over the last), got a 0-d tensor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise _TypeErr(f"softmax: scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise _Err(f"softmax: scale must be finite, got {scale}")
    if causal and x.dim() < 2:
        raise _Err(f"softmax: causal=True needs x with at least 2 dims (..., T, N), got shape {tuple(x.shape)}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise _TypeErr(f"softmax: mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise _TypeErr(f"softmax: mask must be bool (True = keep) or floating point (additive), got {mask.dtype}")
    if mask.device != x.device:
        raise _Err(f"softmax: mask is on {mask.device} but x is on {x.device}")
    ok = mask.dim() <= x.dim() and all(m in (1, s) for m, s in zip(reversed(mask.shape), reversed(x.shape)))
    if not ok:
        raise _Err(
            f"softmax: mask of shape {tuple(mask.shape)} is not broadcastable to x of shape {tuple(x.shape)}"
        )


def softmax(x, scale=1.0, causal=False, mask=None, backend=None):
    """softmax(scale * x + mask) over the last dim, optionally causal; fully masked rows give zeros.

    Args:
        x: (..., N) float32, float16 or bfloat16 (any float dtype on the torch backend). Any strides.
        scale: Python float multiplying x before the mask is added (e.g. 1/sqrt(head_dim)).
        causal: if True, x is (..., T, N) and row i sees only columns j <= i (top-left aligned, as PyTorch SDPA;
            T != N allowed).
        mask: None, a bool tensor (True = keep) or a float tensor added to scale * x, broadcastable to x's shape
            (e.g. (T, N), (1, 1, T, N), (N,)). A float mask that requires grad receives its gradient.
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        y (..., N) in x.dtype, contiguous. Backward saves y only.
    """
    if not _common.is_compiling() and isinstance(x, torch.Tensor) and type(scale) is float:
        # Eager fast path: the cached backend decision, then the C++ entry (checks, autograd, kernel) in one call.
        rec = _dispatch.choice("softmax", x.device, backend, x.dtype)
        if rec is not None and rec[0] in _common.EAGER_BACKENDS:
            out = _common.eager_call(_common.C.softmax, x, mask, scale, causal)
            if out is not None:
                return out
    _check(x, scale, causal, mask)
    be = _dispatch.select("softmax", x.device, backend, lambda b: _dispatch.dtype_support(x.dtype, b), key=x.dtype)
    if be == "torch":
        return softmax_ref(x, scale, causal, mask)
    return _common.apply(SoftmaxFunction, x, mask, float(scale), bool(causal), be)
