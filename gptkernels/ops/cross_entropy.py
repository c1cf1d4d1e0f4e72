"""Cross-entropy over the last dim, and linear_cross_entropy (the loss of cross_entropy(h @ W^T + b, target) without
ever holding the (N, V) logits).

Math (per row i of logits x (N, V) with class index t_i, fp32 inside every kernel whatever the input dtype):
    z = softcap * tanh(x / softcap) with a softcap (Gemma 2), else z = x
    lse_i  = log sum_j exp(z_ij)
    loss_i = (1 - ls) * (lse_i - z_it) + ls * (lse_i - mean_j z_ij) + z_loss * lse_i^2
             (ls = label_smoothing; ls == 0 exactly: lse_i - z_it + z_loss * lse_i^2; the z_loss term is PaLM's)
    reduction "mean": sum_i loss_i / #{i: t_i != ignore_index} (0 / 0 = NaN when every target is ignored, as
    PyTorch), "sum": sum_i loss_i, "none": loss_i in target's shape. With z_loss = 0 and no softcap this is exactly
    F.cross_entropy(x, t, ignore_index=, reduction=, label_smoothing=), label smoothing semantics included.
    dloss_i/dx_ij = (p_ij * (1 + 2 z_loss lse_i) - ls / V - (1 - ls) [j == t_i]) * (1 - (z_ij / softcap)^2),
    p = exp(z - lse). A row whose target is ignore_index contributes loss 0 and gradient 0 whatever its logits (NaN
    included; eager PyTorch gives such a row a NaN gradient through log_softmax's backward). A NaN in a counted row
    gives that row NaN loss and gradient, never hidden.
    Out-of-range targets (outside [0, V), not ignore_index): on CPU tensors every backend raises ArgumentError naming
    target and the range; on CUDA the kernels never read out of bounds and that row's loss and gradient are NaN (a
    check would synchronize), the torch backend hits PyTorch's own device assert.

Shapes: logits (..., V), target (...) int64 (the class dim is the LAST dim: a (B, T, V) input takes (B, T) targets,
unlike F.cross_entropy, whose class dim is 1). Output: a 0-d loss, or target's shape for "none", in the logits'
dtype (as F.cross_entropy; computed in fp32). linear_cross_entropy: h (..., C), weight (V, C), bias (V,) or None.

What backward saves:
    cross_entropy: the logits (by reference: they exist anyway) and lse (N,) fp32; the backward recomputes the softmax
        from lse in one pass over the logits (read once, dlogits written once), never keeping probabilities.
    linear_cross_entropy, reduction mean/sum: no logits and no activations at all. The forward walks the tokens in
        chunks: logits_c = h_c @ W^T (+ b) by ATen's GEMM into one reused (rows, V) buffer, then the fused kernel
        computes the chunk's loss rows AND overwrites the buffer with dlogits_c, then dh_c = dlogits_c @ W and
        dW += dlogits_c^T @ h_c, db += sum_rows dlogits_c (fp32 accumulators, a fixed chunk order: deterministic, no
        atomics; a 16-bit chunk's dW leaves its GEMM in 16 bits and is summed in fp32). It saves dh (h's dtype), dW
        and db (the parameters' dtypes) for a gradient of 1; the backward scales them in place by the incoming
        gradient (divided by the count of counted rows for "mean"), so a second backward through the same graph
        (retain_graph=True) fails autograd's saved-tensor version check rather than scaling twice.
        Peak extra memory: one chunk (rows * V elements, _CHUNK_BYTES) plus dh and the fp32 dW, never O(N * V).
        reduction "none": the per-token gradient is unknown at forward time; the forward computes the loss rows
        chunk by chunk and saves h, W, b and target, and the backward recomputes each chunk's logits (4 GEMMs in
        all instead of 3).
    Under no_grad (or when nothing requires grad) only the loss is computed.

Backends: cuda (CUDA C++), triton, cpu (C++/OpenMP), torch (the eager references below, autograd by PyTorch). The
GEMMs of linear_cross_entropy are ATen's on every backend (MKL/oneDNN on CPU, cuBLAS on CUDA), with autocast off
(they run in h's dtype); the backends differ in the fused cross-entropy kernel. In eager mode cross_entropy on the
cpu and cuda backends goes through one C++ entry (gptkernels._C.cross_entropy: checks, autograd, kernel and
reduction). See gptkernels._dispatch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptkernels import _dispatch
from gptkernels.ops import _common

_Err, _TypeErr = _dispatch.ArgumentError, _dispatch.ArgumentTypeError
_REDUCTIONS = ("mean", "sum", "none")
_EAGER = _common.EAGER_BACKENDS
_is_tensor = torch.is_tensor
_LOW = (torch.float16, torch.bfloat16)

# linear_cross_entropy's chunk: rows = _CHUNK_BYTES // (V * element size) tokens per GEMM + kernel step (at least 1).
# Read at call time (tests shrink it to drive several chunks through small shapes).
_CHUNK_BYTES = 64 << 20


# ----------------------------------------------------------------------------------------------- reference
def cross_entropy_ref(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                      softcap=None):
    """Eager PyTorch with the module's semantics: 16-bit logits are computed in fp32, fp32/fp64 in their own dtype.
    Returns the loss in logits.dtype. Ignored rows' logits are masked to 0 before log_softmax, so they get a zero
    gradient even when they hold NaN."""
    x = logits.float() if logits.dtype in _LOW else logits
    v = x.shape[-1]
    x = x.reshape(-1, v)
    t = target.reshape(-1)
    keep = t != ignore_index
    x = x.masked_fill(~keep[:, None], 0.0)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    rows = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        rows = rows + torch.where(keep, z_loss * torch.logsumexp(x, -1).square(), 0.0)
    return _reduce(rows, keep, reduction, logits.dtype, target.shape)


def linear_cross_entropy_ref(h, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                             z_loss=0.0, softcap=None):
    """cross_entropy_ref(F.linear(h, weight, bias), ...) with 16-bit operands upcast to fp32 first (the logits are
    materialized: a reference, not a way to save memory). Returns the loss in h.dtype."""

    def up(t):
        return t.float() if t is not None and t.dtype in _LOW else t

    logits = F.linear(up(h), up(weight), up(bias))
    return cross_entropy_ref(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap).to(h.dtype)


def _reduce(rows, keep, reduction, dtype, shape):
    """rows: (N,) per-row losses (0 on ignored rows); keep: (N,) bool of the counted rows."""
    if reduction == "none":
        return rows.to(dtype).reshape(shape)
    total = rows.sum()
    if reduction == "mean":
        total = total / keep.sum()  # 0 / 0 = NaN when every target is ignored, as PyTorch
    return total.to(dtype)


# ------------------------------------------------------------------------------------------- registration
def _fwd_fake(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


def _bwd_fake(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss, softcap):
    return logits.new_empty(logits.shape)


def _fwd_bwd_fake(logits, target, dloss, ignore_index, label_smoothing, z_loss, softcap):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


@_common.python_op("cross_entropy_fwd_triton", _fwd_fake)
def _ce_fwd_triton(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
                   z_loss: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    from gptkernels.triton import cross_entropy as tl_ce

    return tl_ce.cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss, softcap)


@_common.python_op("cross_entropy_bwd_triton", _bwd_fake)
def _ce_bwd_triton(dloss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                   ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> torch.Tensor:
    from gptkernels.triton import cross_entropy as tl_ce

    return tl_ce.cross_entropy_bwd(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss, softcap)


_common.register_cpp_fakes({
    "cross_entropy_fwd": _fwd_fake, "cross_entropy_bwd": _bwd_fake, "cross_entropy_fwd_bwd": _fwd_bwd_fake,
})  # fmt: skip


def _chunk_rows(n, v, elsize):
    return max(1, min(n, _CHUNK_BYTES // max(v * elsize, 1)))


def _fused_kernels(backend):
    """(fwd, fwd_bwd) of the backend's cross-entropy kernel, as plain callables (inside a custom op)."""
    if backend == "triton":
        from gptkernels.triton import cross_entropy as tl_ce

        return tl_ce.cross_entropy_fwd, tl_ce.cross_entropy_fwd_bwd
    return torch.ops.gptkernels.cross_entropy_fwd, torch.ops.gptkernels.cross_entropy_fwd_bwd


def _lce_chunks(h, weight, bias, target, dloss, ignore_index, label_smoothing, z_loss, softcap, need_dh, need_dw,
                need_db, backend):
    """The chunk loop of linear_cross_entropy (see the module docstring). h: (N, C) any strides; weight (V, C);
    bias (V,) or None; target (N,); dloss: (N,) fp32 per-row gradient or None (1 per row).
    Returns (loss (N,) fp32, dh (N, C) h.dtype, dw (V, C) weight.dtype, db (V,) bias.dtype); a gradient that is not
    needed is an empty (0,) tensor."""
    fwd, fwd_bwd = _fused_kernels(backend)
    n, c = h.shape
    v = weight.shape[0]
    dev, dt = h.device, h.dtype
    want_grad = need_dh or need_dw or need_db
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    dh = torch.empty((n, c) if need_dh else (0,), dtype=dt, device=dev)
    # dW: the first chunk's GEMM writes it, later ones add (zero-filling it first cost as much as a small GEMM: a
    # 512 x 768 fill was 150 us of a 825 us fwd+bwd at 8 tokens, 1 thread, on the 2-core EPYC).
    dw = torch.empty((v, c) if need_dw else (0,), dtype=torch.float32, device=dev)
    if need_dw and n == 0:
        dw.zero_()
    db = torch.zeros((v,) if need_db else (0,), dtype=torch.float32, device=dev)
    rows = _chunk_rows(n, v, h.element_size())
    buf = torch.empty((min(rows, n), v), dtype=dt, device=dev)
    # A 16-bit chunk's dW = dlogits_c^T @ h_c comes out of the GEMM in 16 bits (ATen on CPU has no fp32-output GEMM
    # for 16-bit inputs); it is added into the fp32 accumulator from this reused buffer.
    dw_c = torch.empty((v, c), dtype=dt, device=dev) if need_dw and dt != torch.float32 else None
    wt = weight.t()
    # The GEMMs run in h's dtype: under an enclosing autocast torch.mm would switch to 16 bits and no longer match the
    # buffers' dtype (pass 16-bit h and weight for 16-bit GEMMs).
    with torch.autocast(dev.type, enabled=False):
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            hc, tc = h[r0:r1], target[r0:r1]
            lc = buf[: r1 - r0]
            if bias is None:
                torch.mm(hc, wt, out=lc)
            else:
                torch.addmm(bias, hc, wt, out=lc)
            if not want_grad:
                loss[r0:r1] = fwd(lc, tc, ignore_index, label_smoothing, z_loss, softcap)[0]
                continue
            dl = dloss[r0:r1] if dloss is not None else None
            loss[r0:r1] = fwd_bwd(lc, tc, dl, ignore_index, label_smoothing, z_loss, softcap)  # lc is dlogits now
            if need_dh:
                torch.mm(lc, weight, out=dh[r0:r1])
            if need_dw:
                if dw_c is None:
                    torch.mm(lc.t(), hc, out=dw) if r0 == 0 else dw.addmm_(lc.t(), hc)
                elif r0 == 0:
                    dw.copy_(torch.mm(lc.t(), hc, out=dw_c))
                else:
                    dw.add_(torch.mm(lc.t(), hc, out=dw_c))
            if need_db:
                db.add_(lc.sum(0, dtype=torch.float32))
    dw = dw.to(weight.dtype) if need_dw else dw
    db = db.to(bias.dtype) if need_db else db
    return loss, dh, dw, db


def _lce_fwd_fake(h, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, need_dh, need_dw,
                  need_db):
    n, c = h.shape
    v = weight.shape[0]
    return (
        h.new_empty((n,), dtype=torch.float32),
        h.new_empty((n, c) if need_dh else (0,)),
        weight.new_empty((v, c) if need_dw else (0,)),
        weight.new_empty((v,) if need_db else (0,), dtype=bias.dtype if bias is not None else weight.dtype),
    )


def _lce_bwd_fake(dloss, h, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, need_dh, need_dw,
                  need_db):
    return _lce_fwd_fake(h, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, need_dh, need_dw,
                         need_db)[1:]


def _register_lce(backend):
    """gptkernels::linear_cross_entropy_{fwd,bwd} (cpu and cuda) or ..._triton: the chunk loop around `backend`'s
    fused kernel, one opaque op each for torch.compile (the fake gives the shapes) and opcheck."""

    def fwd(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
            label_smoothing: float, z_loss: float, softcap: float, need_dh: bool, need_dw: bool,
            need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _lce_chunks(h, weight, bias, target, None, ignore_index, label_smoothing, z_loss, softcap, need_dh,
                           need_dw, need_db, backend)

    def bwd(dloss: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
            need_dh: bool, need_dw: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _lce_chunks(h, weight, bias, target, dloss, ignore_index, label_smoothing, z_loss, softcap, need_dh,
                           need_dw, need_db, backend)[1:]

    if backend == "triton":
        _common.python_op("linear_cross_entropy_fwd_triton", _lce_fwd_fake)(fwd)
        _common.python_op("linear_cross_entropy_bwd_triton", _lce_bwd_fake)(bwd)
        return
    _common.python_op("linear_cross_entropy_fwd", _lce_fwd_fake)(fwd)
    _common.python_op("linear_cross_entropy_bwd", _lce_bwd_fake)(bwd)


_register_lce("cpu")  # cpu and cuda: the C++ kernel ops, dispatched by device
_register_lce("triton")


# ----------------------------------------------------------------------------------------------- autograd
def _reduce_fn(ctx, loss, target, ignore_index, reduction):
    """The reduction inside the autograd Functions (one graph node for the whole loss): (N,) fp32 rows -> the fp32 sum,
    divided by the count of counted rows for "mean" (kept on ctx for backward), or the rows themselves for "none"."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "mean":
        ctx.count = (target != ignore_index).sum()
        total = total / ctx.count  # 0 / 0 = NaN when every target is ignored, as PyTorch
    return total


def _out(out, reduction, dtype, shape):
    return out.to(dtype).reshape(shape) if reduction == "none" else out.to(dtype)


class CrossEntropyFunction(torch.autograd.Function):
    """(N, V) logits, (N,) target -> fp32: the reduced loss, or (N,) for "none"."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, softcap, reduction, backend):
        loss, lse = _common.kernel_op("cross_entropy_fwd", backend)(
            logits, target, ignore_index, label_smoothing, z_loss, softcap
        )
        ctx.save_for_backward(logits, target, lse)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.backend, ctx.reduction = backend, reduction
        return _reduce_fn(ctx, loss, target, ignore_index, reduction)

    @staticmethod
    def backward(ctx, g):
        logits, target, lse = ctx.saved_tensors
        dloss = g.float()
        if ctx.reduction != "none":  # the same gradient for every row, read through stride 0
            dloss = (dloss / ctx.count if ctx.reduction == "mean" else dloss).expand(logits.shape[0])
        dx = _common.kernel_op("cross_entropy_bwd", ctx.backend)(dloss, logits, target, lse, *ctx.args)
        return dx, None, None, None, None, None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(N, C) h, (V, C) weight, (V,) bias or None, (N,) target -> fp32: the reduced loss, or (N,) for "none"."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, reduction, backend):
        needs = getattr(ctx, "needs_input_grad", (False,) * 3)  # _common.apply's no-grad ctx has none
        need = (bool(needs[0]), bool(needs[1]), bias is not None and bool(needs[2]))
        args = (ignore_index, label_smoothing, z_loss, softcap)
        fwd = _common.kernel_op("linear_cross_entropy_fwd", backend)
        ctx.reduction, ctx.backend, ctx.args, ctx.need = reduction, backend, args, need
        if reduction == "none" or not any(need):
            loss = fwd(h, weight, bias, target, *args, False, False, False)[0]
            ctx.save_for_backward(h, weight, bias, target)
        else:
            loss, dh, dw, db = fwd(h, weight, bias, target, *args, *need)
            ctx.save_for_backward(dh, dw, db)
        return _reduce_fn(ctx, loss, target, ignore_index, reduction)

    @staticmethod
    def backward(ctx, g):
        need = ctx.need
        if ctx.reduction == "none":
            h, weight, bias, target = ctx.saved_tensors
            bwd = _common.kernel_op("linear_cross_entropy_bwd", ctx.backend)
            dh, dw, db = bwd(g.float(), h, weight, bias, target, *ctx.args, *need)
        else:
            dh, dw, db = ctx.saved_tensors
            scale = g.float()
            if ctx.reduction == "mean":
                # every row ignored: the saved gradients are exact zeros, and stay zeros rather than 0 * inf
                scale = scale / ctx.count.clamp_min(1)
            # Scaled in place: a copy would hold a second (V, C) dW at the peak (+154 MB at GPT-2's head in fp32).
            # A second backward through the same graph (retain_graph=True) then fails autograd's version check on
            # unpacking them, instead of scaling twice.
            for t in (dh, dw, db):
                t.mul_(scale)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None,
                None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------- public
def _check_common(fn, target, ignore_index, reduction, label_smoothing, z_loss, softcap):
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        got = f"a tensor of dtype {target.dtype}" if isinstance(target, torch.Tensor) else type(target).__name__
        raise _TypeErr(f"{fn}: target must be an int64 tensor of class indices, got {got}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise _TypeErr(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in _REDUCTIONS:
        raise _Err(f"{fn}: reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    for name, val in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise _TypeErr(f"{fn}: {name} must be a Python float, got {type(val).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise _Err(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise _Err(f"{fn}: z_loss must be finite and >= 0, got {z_loss}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise _TypeErr(f"{fn}: softcap must be a Python float or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise _Err(f"{fn}: softcap must be finite and > 0 (None: no softcap), got {softcap}")


def _check_float(fn, name, t):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = f"a tensor of dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise _TypeErr(f"{fn}: {name} must be a floating-point tensor, got {got}")


def _check_target_range(fn, t1, v, ignore_index):
    """CPU tensors: a class index outside [0, V) that is not ignore_index raises (the cpu backend's kernel reports it
    itself; this covers the torch and triton backends)."""
    bad = (t1 != ignore_index) & ((t1 < 0) | (t1 >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise _Err(f"{fn}: target: class index {int(t1[i])} at position {i} is outside [0, {v}) "
                   f"(V = logits.size(-1)) and is not ignore_index ({ignore_index})")


def _run(fn, be, t1, v, ignore_index, function, *args):
    """function.apply(*args) (through _common.apply), with the target range check on CPU tensors."""
    if t1.device.type != "cpu" or _common.is_compiling():
        return _common.apply(function, *args)
    if be != "cpu":
        _check_target_range(fn, t1, v, ignore_index)
        return _common.apply(function, *args)
    try:
        return _common.apply(function, *args)
    except ValueError as e:  # the C++ kernel's report: the same message, as ArgumentError
        if isinstance(e, _Err) or not str(e).startswith("target:"):
            raise
        raise _Err(f"{fn}: {e}") from None


def _check_target(fn, target, x, name, what):
    """target must have x's shape without its last dim, on x's device (x: logits or h)."""
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise _Err(f"{fn}: target of shape {tuple(target.shape)} must {what}, {tuple(x.shape[:-1])}")
    if target.device != x.device:
        raise _Err(f"{fn}: target is on {target.device} but {name} is on {x.device}")


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
                  softcap=None, backend=None):
    """F.cross_entropy over the LAST dim of logits with class-index targets, plus PaLM's z-loss and Gemma 2's softcap.

    Args:
        logits: (..., V) float32, float16 or bfloat16 (any float dtype on the torch backend); any strides.
            The class dim is the last one: (B, T, V) logits take (B, T) targets.
        target: (...) int64 class indices, logits.shape[:-1]; entries equal to ignore_index are not counted.
        ignore_index: the target value whose rows contribute no loss and no gradient (default -100, as PyTorch).
        reduction: "mean" (over the counted rows; NaN when there are none, as PyTorch), "sum" or "none".
        label_smoothing: in [0, 1], PyTorch's semantics: (1 - ls) * nll + ls * (mean over classes of -log p).
        z_loss: adds z_loss * lse^2 per counted row (lse = logsumexp of the row's logits after the softcap).
        softcap: None, or c > 0: the logits become c * tanh(logits / c) first (the gradient flows through it).
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        The loss in logits.dtype (computed in fp32): 0-d for "mean"/"sum", target's shape for "none". Backward saves
        the logits (by reference) and lse (N,) fp32, and recomputes the softmax in one pass.
    """
    plain_args = type(ignore_index) is int and type(label_smoothing) is float and type(z_loss) is float
    if plain_args and (softcap is None or type(softcap) is float) and not _common.is_compiling():
        # Eager fast path: the cached backend decision, then the C++ entry (checks, autograd, kernel, reduction) in
        # one call. None (or an error) sends the call down the checked path below.
        rec = _dispatch.choice("cross_entropy", logits.device, backend, logits.dtype) if _is_tensor(logits) else None
        if rec is not None and rec[0] in _EAGER and hasattr(_common.C, "cross_entropy"):
            out = _common.eager_call(_common.C.cross_entropy, logits, target, ignore_index, reduction,
                                     label_smoothing, z_loss, softcap)
            if out is not None:
                return out
    fn = "cross_entropy"
    _check_float(fn, "logits", logits)
    _check_common(fn, target, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise _Err(f"{fn}: logits must have a class dim (the last) of size >= 1, got shape {tuple(logits.shape)}")
    _check_target(fn, target, logits, "logits", "have logits' shape without its last (class) dim")
    be = _dispatch.select(fn, logits.device, backend, lambda b: _dispatch.dtype_support(logits.dtype, b),
                          key=logits.dtype)
    v = logits.shape[-1]
    t1 = target.reshape(-1)
    if be == "torch":
        if t1.device.type == "cpu" and not _common.is_compiling():
            _check_target_range(fn, t1, v, ignore_index)
        return cross_entropy_ref(logits, target, ignore_index, reduction, float(label_smoothing), float(z_loss),
                                 softcap)
    out = _run(fn, be, t1, v, ignore_index, CrossEntropyFunction, _common.rows(logits), t1, int(ignore_index),
               float(label_smoothing), float(z_loss), float(softcap or 0.0), reduction, be)
    return _out(out, reduction, logits.dtype, target.shape)


def linear_cross_entropy(h, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                         z_loss=0.0, softcap=None, backend=None):
    """cross_entropy(h @ weight.T + bias, target, ...) without materializing the (N, V) logits (the LM head and its
    loss in one op; see the module docstring for the chunked algorithm and its memory).

    Args:
        h: (..., C) hidden states, float32, float16 or bfloat16; any strides.
        weight: (V, C) in h's dtype (nn.Linear's layout; a tied embedding matrix works as is).
        target: (...) int64 class indices, h.shape[:-1].
        bias: (V,) in h's dtype, or None.
        ignore_index, reduction, label_smoothing, z_loss, softcap, backend: as cross_entropy.

    Returns:
        The loss in h.dtype (computed in fp32): 0-d for "mean"/"sum", target's shape for "none". Gradients flow to
        h, weight and bias; dweight and dbias are accumulated in fp32 and returned in their parameters' dtypes.
    """
    fn = "linear_cross_entropy"
    _check_float(fn, "h", h)
    _check_float(fn, "weight", weight)
    _check_common(fn, target, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if h.dim() < 1:
        raise _Err(f"{fn}: h must be (..., C), got a 0-d tensor")
    c = h.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != c or weight.shape[0] < 1:
        raise _Err(f"{fn}: weight must be (V, C) with C = h.size(-1) = {c} and V >= 1, got {tuple(weight.shape)}")
    v = weight.shape[0]
    if bias is not None:
        _check_float(fn, "bias", bias)
        if tuple(bias.shape) != (v,):
            raise _Err(f"{fn}: bias must be (V,) = ({v},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != h.dtype:
            raise _TypeErr(f"{fn}: {name} dtype {t.dtype} must match h's {h.dtype}")
        if t is not None and t.device != h.device:
            raise _Err(f"{fn}: {name} is on {t.device} but h is on {h.device}")
    _check_target(fn, target, h, "h", "be h's shape without its last dim")
    be = _dispatch.select(fn, h.device, backend, lambda b: _dispatch.dtype_support(h.dtype, b), key=h.dtype)
    t1 = target.reshape(-1)
    if be == "torch":
        if t1.device.type == "cpu" and not _common.is_compiling():
            _check_target_range(fn, t1, v, ignore_index)
        return linear_cross_entropy_ref(h, weight, target, bias, ignore_index, reduction, float(label_smoothing),
                                        float(z_loss), softcap)
    out = _run(fn, be, t1, v, ignore_index, LinearCrossEntropyFunction, _common.rows(h), weight, bias, t1,
               int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0), reduction, be)
    return _out(out, reduction, h.dtype, target.shape)
