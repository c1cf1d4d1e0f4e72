"""LayerNorm and RMSNorm over the last dim, optionally fused with the residual add of a pre-norm block.

Math (row-wise over the last dim N, in fp32 whatever the input dtype):
    h = x + residual (rounded to x.dtype, as eager PyTorch does)   or   h = x
    LayerNorm: y = (h - mean(h)) * rstd * weight + bias,   rstd = 1 / sqrt(var(h) + eps)  (biased variance)
    RMSNorm:   y = h * rstd * weight,                      rstd = 1 / sqrt(mean(h^2) + eps)

Shapes: x, residual, y, h: (..., N); weight, bias: (N,). Output dtype = x.dtype; weight may be fp32 with 16-bit x.
Backward saves h (or x), weight, and the per-row fp32 mean and rstd (M = numel / N floats each): never y.
dweight/dbias are reduced in fp32 (per-block partial sums, then a final reduce) and cast to the weight's dtype.
With a residual, d(residual) = d(x) = d(h through the norm) + d(h output).
NaN or inf in x, residual, weight or bias propagate as in eager F.layer_norm / F.rms_norm (a row's statistics carry
them to the whole row); nothing clamps them. N == 0 gives empty results and gradients, as eager does.

Backends: cuda (CUDA C++), triton, cpu (C++/OpenMP), torch (the eager reference below). See gptkernels._dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptkernels import _dispatch
from gptkernels.ops import _common

_Err, _TypeErr = _dispatch.ArgumentError, _dispatch.ArgumentTypeError
_rows = _common.rows


# ----------------------------------------------------------------------------------------------- reference
def layer_norm_ref(x, weight, bias=None, eps=1e-5, residual=None, rms=False):
    """Eager PyTorch; 16-bit inputs are computed in fp32, fp32/fp64 in their own dtype. Returns y or (y, h)."""
    h = x + residual if residual is not None else x
    hf = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    w = weight.to(hf.dtype) if weight is not None else None
    if rms:
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        y = y * w if w is not None else y
    else:
        y = F.layer_norm(hf, (hf.shape[-1],), w, bias.to(hf.dtype) if bias is not None else None, eps)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    return layer_norm_ref(x, weight, None, eps, residual, rms=True)


# ------------------------------------------------------------------------------------------- registration
def _fwd_fake(x, weight, bias, residual, eps, rms):
    stats = x.shape[:-1]
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0, dtype=torch.float32) if rms else x.new_empty(stats, dtype=torch.float32)
    return torch.empty_like(x), h, mean, x.new_empty(stats, dtype=torch.float32)


def _bwd_fake(dy, dh, hin, weight, mean, rstd, has_bias, rms):
    n = hin.shape[-1]
    db = hin.new_empty(n if has_bias else 0, dtype=torch.float32)
    return torch.empty_like(hin), hin.new_empty(n, dtype=torch.float32), db


@_common.python_op("layernorm_fwd_triton", _fwd_fake)
def _layernorm_fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import layernorm as tl_ln

    y, h, mean, rstd = tl_ln.layernorm_fwd(
        _rows(x).contiguous(), weight.float().contiguous(), bias.float().contiguous() if bias is not None else None,
        _rows(residual).contiguous() if residual is not None else None, eps, rms)
    stats = x.shape[:-1]
    return (y.view(x.shape), h.view(x.shape) if residual is not None else h,
            mean if rms else mean.view(stats), rstd.view(stats))


@_common.python_op("layernorm_bwd_triton", _bwd_fake)
def _layernorm_bwd_triton(
    dy: torch.Tensor, dh: torch.Tensor | None, hin: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, has_bias: bool, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import layernorm as tl_ln

    # A gradient can arrive expanded (stride 0) or transposed: make rows contiguous on purpose.
    dx, dw, db = tl_ln.layernorm_bwd(
        _rows(dy).contiguous(), _rows(dh).contiguous() if dh is not None else None, _rows(hin).contiguous(),
        weight.float().contiguous(), mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous(), has_bias, rms)
    return dx.view(hin.shape), dw, db


_common.register_cpp_fakes({"layernorm_fwd": _fwd_fake, "layernorm_bwd": _bwd_fake})


# ----------------------------------------------------------------------------------------------- autograd
class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, rms, backend):
        y, h, mean, rstd = _common.kernel_op("layernorm_fwd", backend)(x, weight, bias, residual, eps, rms)
        ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
        ctx.has_bias, ctx.has_residual, ctx.rms, ctx.backend = bias is not None, residual is not None, rms, backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        if residual is None:
            ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        hin, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(hin)
        bwd = _common.kernel_op("layernorm_bwd", ctx.backend)
        dx, dw, db = bwd(dy, dh if ctx.has_residual else None, hin, weight, mean, rstd, ctx.has_bias, ctx.rms)
        dbias = db.to(ctx.bias_dtype) if ctx.has_bias else None
        return dx, dw.to(weight.dtype), dbias, dx if ctx.has_residual else None, None, None, None


# ------------------------------------------------------------------------------------------------- public
def _check(fn, x, weight, bias, residual, eps):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise _TypeErr(f"{fn}: x must be a floating-point tensor, got {type(x).__name__}"
                        f"{' of dtype ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    if x.dim() < 1:
        raise _Err(f"{fn}: x must have at least 1 dim (the normalized one), got a 0-d tensor")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise _TypeErr(f"{fn}: {name} must be a floating-point tensor")
        if tuple(t.shape) != (n,):
            raise _Err(f"{fn}: {name} must have shape ({n},) to match x's last dim, got {tuple(t.shape)}")
        if t.device != x.device:
            raise _Err(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise _TypeErr(f"{fn}: residual must be a tensor")
        if residual.shape != x.shape:
            raise _Err(f"{fn}: residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise _TypeErr(f"{fn}: residual dtype {residual.dtype} must equal x dtype {x.dtype}")
        if residual.device != x.device:
            raise _Err(f"{fn}: residual is on {residual.device} but x is on {x.device}")
    if not eps >= 0:
        raise _Err(f"{fn}: eps must be >= 0, got {eps}")


_ONES: dict = {}  # (N, device) -> fp32 ones: the weight of a norm without affine scale, made once


def _ones(n, device):
    if _common.is_compiling():
        return torch.ones(n, device=device, dtype=torch.float32)
    key = (n, device)
    if key not in _ONES:
        _ONES[key] = torch.ones(n, device=device, dtype=torch.float32)
    return _ONES[key]


def _norm(fn, x, weight, bias, eps, residual, rms, backend):
    if not _common.is_compiling():
        # Eager fast path: the cached backend decision, then the C++ entry (checks, autograd, kernel) in one call.
        rec = _dispatch.choice(fn, x.device, backend, x.dtype) if isinstance(x, torch.Tensor) else None
        if rec is not None and rec[0] in _common.EAGER_BACKENDS:
            out = _common.eager_call(_common.C.layernorm, x, weight, bias, residual, eps, rms)
            if out is not None:
                return out
    _check(fn, x, weight, bias, residual, eps)
    be = _dispatch.select(fn, x.device, backend, lambda b: _dispatch.dtype_support(x.dtype, b), key=x.dtype)
    if be == "torch":
        return layer_norm_ref(x, weight, bias, eps, residual, rms)
    w = weight if weight is not None else _ones(x.shape[-1], x.device)
    y, h = _common.apply(LayerNormFunction, x, w, bias, residual, float(eps), rms, be)
    return (y, h) if residual is not None else y


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None, backend=None):
    """LayerNorm over the last dim, optionally fused with a residual add.

    Args:
        x: (..., N) float32, float16 or bfloat16 (any float dtype on the torch backend).
        weight: (N,) scale, same dtype as x or float32; None for no affine scale.
        bias: (N,) shift or None.
        eps: added to the variance.
        residual: (..., N) like x, or None. If given, h = x + residual is normalized and ``(y, h)`` is returned:
            the pre-norm residual stream of a GPT block in one pass.
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        y (..., N) in x.dtype, or (y, h) when residual is given.
    """
    return _norm("layer_norm", x, weight, bias, eps, residual, False, backend)


def rms_norm(x, weight, eps=1e-6, residual=None, backend=None):
    """RMSNorm over the last dim, optionally fused with a residual add.

    Args:
        x: (..., N) float32, float16 or bfloat16 (any float dtype on the torch backend).
        weight: (N,) scale, same dtype as x or float32; None for no scale.
        eps: added to mean(h^2).
        residual: (..., N) like x, or None; if given, returns ``(y, h)`` with h = x + residual.
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        y (..., N) in x.dtype, or (y, h) when residual is given.
    """
    return _norm("rms_norm", x, weight, None, eps, residual, True, backend)
