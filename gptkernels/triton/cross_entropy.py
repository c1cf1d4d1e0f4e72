"""Triton cross-entropy over the last dim of (M, V) logits with int64 targets: loss and lse per row, the gradient of
the logits fused into the forward (in place, for linear_cross_entropy's chunks) or from a saved lse.

Math (fp32; CeSpec in csrc/kernels/common.h is the same contract for the C++ kernels):
    z = softcap * tanh(x / softcap) with a softcap, else x;  lse = log sum_j exp(z_j)
    loss = (1 - ls) * (lse - z_t) + ls * (lse - mean_j z_j) + z_loss * lse^2   (ls == 0: lse - z_t + z_loss * lse^2)
    dx_j = dloss * (p_j * (1 + 2 z_loss lse) - ls / V - (1 - ls) [j == t]) * (1 - (z_j / softcap)^2),  p = exp(z - lse)
A row whose target is ignore_index gets loss 0, lse 0 and a zero gradient without reading its logits; a target outside
[0, V) is never used as an index: NaN loss, lse and gradient for that row.

One program per row, walking the row in BLOCK_V-wide pieces: an online max m and sum s (rescaled by exp(m_old - m_new)
when the max grows), so the forward reads the row once; the gradient pass reads it again (from L2 while the row is
there) and writes it once. tl.max may skip a NaN, but its exp joins the sum, so a NaN logit makes lse NaN; a +inf
logit is made NaN explicitly (inf - inf in eager's log_softmax). Row offsets are int64; the column stride must be 1
(the launchers copy a tensor whose last dim is strided, on purpose; the in-place launcher refuses one).
"""

import torch
import triton
import triton.language as tl

from gptkernels.triton._common import on_tensor_device, tanh, unit_last_stride

# Columns per loop step on the GPU, and its warps (16 fp32 per thread). Not yet measured on a GPU.
_BLOCK_V = 4096
_NUM_WARPS = 8
# Under TRITON_INTERPRET=1 (CPU tensors, for testing) a smaller step makes small shapes walk several steps.
_CPU_BLOCK_V = 256


def _config(v, device):
    cap = _CPU_BLOCK_V if device.type == "cpu" else _BLOCK_V
    block = min(max(triton.next_power_of_2(v), 32), cap)
    return block, min(max(block // 512, 1), _NUM_WARPS)


@triton.jit
def _z(x, cap, inv_cap, HAS_CAP: tl.constexpr):
    # (z, th): the softcapped logit and the tanh for its derivative 1 - th^2 (th unused without a softcap).
    if HAS_CAP:
        th = tanh(x * inv_cap)
        z = cap * th
    else:
        th = x
        z = x
    return z, th


@triton.jit
def _grad_row(X, G, V, t, lse, dl, ls, z_loss, cap, inv_cap, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
    # G[j] = d(dl * loss)/dx_j for the row at X (G may be X: each piece is read before it is overwritten).
    cols = tl.arange(0, BLOCK_V)
    ga = dl * (1.0 + 2.0 * z_loss * lse)
    gb = dl * ls / V
    gt = dl * (1.0 - ls)
    for off in range(0, V, BLOCK_V):
        c = off + cols
        msk = c < V
        x = tl.load(X + c, mask=msk, other=0.0).to(tl.float32)
        z, th = _z(x, cap, inv_cap, HAS_CAP)
        g = ga * tl.exp(z - lse) - gb - tl.where(c == t, gt, 0.0)
        if HAS_CAP:
            g = g * (1.0 - th * th)
        tl.store(G + c, g.to(G.dtype.element_ty), mask=msk)


@triton.jit
def _fill_row(G, V, value, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for off in range(0, V, BLOCK_V):
        c = off + cols
        tl.store(G + c, (tl.zeros([BLOCK_V], tl.float32) + value).to(G.dtype.element_ty), mask=c < V)


@triton.jit
def _ce_fwd_kernel(
    X,  # (M, V) rows at X + row * stride_xm
    Target,  # (M,) int64
    Loss,  # (M,) fp32
    Lse,  # (M,) fp32
    G,  # (M, V) rows at G + row * stride_gm, written when WRITE_GRAD (may be X: in place)
    DLoss,  # (M,) fp32 at DLoss + row * stride_dl, read when HAS_DLOSS (else 1 per row)
    stride_xm,
    stride_gm,
    stride_dl,
    V,
    ignore_index,
    ls,
    z_loss,
    cap,
    inv_cap,
    HAS_CAP: tl.constexpr,
    HAS_LS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_DLOSS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Bytes: reads the row once (M*V*e); with WRITE_GRAD reads it again and writes the gradient (3*M*V*e).
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_xm
    G += row * stride_gm
    t = tl.load(Target + row)
    skip = (t == ignore_index) | (t < 0) | (t >= V)
    if skip:
        fill = tl.where(t == ignore_index, 0.0, float("nan"))
        tl.store(Loss + row, fill)
        tl.store(Lse + row, fill)
        if WRITE_GRAD:
            _fill_row(G, V, fill, BLOCK_V)
    else:
        cols = tl.arange(0, BLOCK_V)
        xt = tl.load(X + t).to(tl.float32)  # before any write of the row
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)  # fp32 scalars, loop-carried
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        zs = tl.zeros([BLOCK_V], tl.float32)
        for off in range(0, V, BLOCK_V):
            c = off + cols
            msk = c < V
            x = tl.load(X + c, mask=msk, other=0.0).to(tl.float32)
            z, th = _z(x, cap, inv_cap, HAS_CAP)
            z = tl.where(msk, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp(-inf - 0) = 0, not NaN
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
            if HAS_LS:
                zs += tl.where(msk, z, 0.0)
        shift = tl.where(m == float("-inf"), 0.0, m)
        lse = shift + tl.log(s)  # all -inf: log(0) = -inf
        lse = tl.where(m == float("inf"), float("nan"), lse)
        zt, tht = _z(xt, cap, inv_cap, HAS_CAP)
        loss = lse - zt
        if HAS_LS:
            loss = (1.0 - ls) * loss + ls * (lse - tl.sum(zs, axis=0) / V)
        loss = tl.where(z_loss != 0.0, loss + z_loss * lse * lse, loss)
        tl.store(Loss + row, loss)
        tl.store(Lse + row, lse)
        if WRITE_GRAD:
            if HAS_DLOSS:
                dl = tl.load(DLoss + row * stride_dl)
            else:
                dl = 1.0
            _grad_row(X, G, V, t, lse, dl, ls, z_loss, cap, inv_cap, HAS_CAP, BLOCK_V)


@triton.jit
def _ce_bwd_kernel(
    X,  # (M, V) rows at X + row * stride_xm
    Target,  # (M,) int64
    Lse,  # (M,) fp32, the forward's
    DLoss,  # (M,) fp32 at DLoss + row * stride_dl (stride 0: an expanded gradient)
    DX,  # (M, V) rows at DX + row * stride_dxm
    stride_xm,
    stride_dl,
    stride_dxm,
    V,
    ignore_index,
    ls,
    z_loss,
    cap,
    inv_cap,
    HAS_CAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Bytes: reads the logits once, writes dlogits once: 2*M*V*e.
    row = tl.program_id(0).to(tl.int64)
    DX += row * stride_dxm
    t = tl.load(Target + row)
    skip = (t == ignore_index) | (t < 0) | (t >= V)
    if skip:
        _fill_row(DX, V, tl.where(t == ignore_index, 0.0, float("nan")), BLOCK_V)
    else:
        lse = tl.load(Lse + row)
        dl = tl.load(DLoss + row * stride_dl)
        _grad_row(X + row * stride_xm, DX, V, t, lse, dl, ls, z_loss, cap, inv_cap, HAS_CAP, BLOCK_V)


def _check(logits, target):
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"cross_entropy: logits must be (N, V) with V >= 1, got shape {tuple(logits.shape)}")
    if target.dtype != torch.int64 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: target must be int64 of shape ({logits.shape[0]},), got "
                         f"{target.dtype} {tuple(target.shape)}")


def _launch_fwd(x, target, loss, lse, grad, dloss, ignore_index, label_smoothing, z_loss, softcap):
    m, v = x.shape
    if m == 0:
        return
    block, warps = _config(v, x.device)
    g = grad if grad is not None else x
    dl = dloss if dloss is not None else loss
    _ce_fwd_kernel[(m,)](
        x, target.contiguous(), loss, lse, g, dl,
        x.stride(0), g.stride(0), dl.stride(0), v, int(ignore_index), float(label_smoothing), float(z_loss),
        float(softcap), 1.0 / softcap if softcap > 0 else 0.0,
        HAS_CAP=softcap > 0, HAS_LS=label_smoothing != 0, WRITE_GRAD=grad is not None,
        HAS_DLOSS=dloss is not None, BLOCK_V=block, num_warps=warps,
    )  # fmt: skip


@on_tensor_device
def cross_entropy_fwd(logits, target, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float):
    """(loss, lse): (N,) fp32 each, for logits (N, V) fp32/fp16/bf16 (any row stride) and target (N,) int64.
    softcap <= 0: none."""
    _check(logits, target)
    x = unit_last_stride(logits)
    loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss)
    _launch_fwd(x, target, loss, lse, None, None, ignore_index, label_smoothing, z_loss, softcap)
    return loss, lse


@on_tensor_device
def cross_entropy_fwd_bwd(logits, target, dloss, ignore_index: int, label_smoothing: float, z_loss: float,
                          softcap: float):
    """loss (N,) fp32, and logits overwritten with d(sum_i dloss_i * loss_i)/dlogits (dloss None: 1 per row).
    logits: (N, V) with unit column stride (any row stride)."""
    _check(logits, target)
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"cross_entropy: the in-place gradient needs a unit column stride, got {logits.stride()}")
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    _launch_fwd(logits, target, loss, lse, logits, dloss, ignore_index, label_smoothing, z_loss, softcap)
    return loss


@on_tensor_device
def cross_entropy_bwd(dloss, logits, target, lse, ignore_index: int, label_smoothing: float, z_loss: float,
                      softcap: float):
    """dlogits (N, V) contiguous in logits' dtype = dloss_i * dloss_i/dlogits from the forward's lse.
    dloss: (N,) fp32, any stride (0 included)."""
    _check(logits, target)
    x = unit_last_stride(logits)
    m, v = x.shape
    dx = torch.empty((m, v), dtype=x.dtype, device=x.device)
    if m == 0:
        return dx
    block, warps = _config(v, x.device)
    _ce_bwd_kernel[(m,)](
        x, target.contiguous(), lse.contiguous(), dloss, dx,
        x.stride(0), dloss.stride(0), dx.stride(0), v, int(ignore_index), float(label_smoothing), float(z_loss),
        float(softcap), 1.0 / softcap if softcap > 0 else 0.0,
        HAS_CAP=softcap > 0, BLOCK_V=block, num_warps=warps,
    )  # fmt: skip
    return dx
