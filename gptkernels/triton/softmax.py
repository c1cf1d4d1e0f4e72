"""Triton softmax over the last dim with a scale, an additive fp32 mask and causal masking.

Forward:  z = scale * x + mask, z = -inf where j > t when causal (t = the row's index in dim -2)
          y = exp(z - max_j z) / sum_j exp(z - max_j z); a row whose z is all -inf gives zeros, a row with a NaN
          or +inf z in a live column is NaN
Backward: dz = y * (dy - sum_j dy * y), dx = scale * dz (dz itself written only when the mask needs a gradient)

Two shapes of kernel, chosen by a constexpr (ONE_CHUNK) so each launch compiles only one of them:
  - the row fits in registers (BLOCK_N = next_power_of_2(N) <= _FWD_MAX_BLOCK_N / _BWD_MAX_BLOCK_N): x is read
    from HBM exactly once;
  - otherwise the row is walked in _CHUNK-wide pieces: an online pass keeps a running max m and a sum s
    rescaled by exp(m_old - m_new) whenever the max grows, then a second pass writes exp(z - m) / s. x is read
    twice (the second time from L2 when the row is still there), whatever N is: no row length is too long.

All math is fp32; x, y, dy, dx keep their dtype. Rows are programs; row offsets are int64 so M * N >= 2^31
elements is safe. x and dy may have any row stride (0 included: an expanded dy); the column stride must be 1 and
the launchers copy a tensor on purpose when it is not. The mask is read through its broadcast strides
(see _mask_view), never expanded to x's size.
"""

import torch
import triton
import triton.language as tl

from gptkernels.triton._common import on_tensor_device

# Register budgets, in row elements (fp32 after the upcast, whatever the input dtype). The forward keeps ~2 row
# tensors live (z, then e), 16 warps give 32 elements per thread at 16384. The backward keeps ~3 (y, dy, g),
# so it stops at 8192. Not yet measured on an H200.
_FWD_MAX_BLOCK_N = 16384
_BWD_MAX_BLOCK_N = 8192
# Chunk width of the long-row loops and its warp count (16 elements per thread).
_CHUNK = 4096
_CHUNK_WARPS = 8
# Under TRITON_INTERPRET=1 (CPU tensors, for testing) smaller register paths make the 4097- and 65537-column
# tests exercise the chunked loops.
_CPU_MAX_BLOCK_N = 1024


def _config(n, fwd, device):
    """(BLOCK_N, num_warps, ONE_CHUNK) for a row of n elements. Reads the module limits at call time, so a test
    can shrink them to drive small shapes through the chunked loops."""
    max_block_n = _FWD_MAX_BLOCK_N if fwd else _BWD_MAX_BLOCK_N
    if device.type == "cpu":
        max_block_n = min(max_block_n, _CPU_MAX_BLOCK_N)
    # Floor of 32: one element per lane of a warp; smaller tensors would only be replicated across lanes.
    block_n = max(triton.next_power_of_2(n), 32)
    if block_n <= max_block_n:
        return block_n, min(max(block_n // 512, 1), 16), True  # 512 elements per warp, 1..16 warps
    return _CHUNK, min(max(_CHUNK // 512, 1), _CHUNK_WARPS), False


def _rows(t, m, n):
    # (M, N) with unit column stride: a view when one exists (any row stride, 0 included), else a copy, on purpose.
    r = t.reshape(m, n)
    if n > 1 and r.stride(1) != 1:
        r = r.contiguous()
    return r


def _dims(shape):
    """x's (B, H, T, N): N = size(-1), T = size(-2), H = size(-3), B = the product of the rest (1 if absent)."""
    n = shape[-1]
    t = shape[-2] if len(shape) >= 2 else 1
    h = shape[-3] if len(shape) >= 3 else 1
    b = 1
    for s in shape[:-3]:
        b *= s
    return b, h, t, n


def _mask_view(mask, shape, b, h, t, n):
    """The fp32 mask as a (B, H, T, N) view of its own storage (stride 0 on broadcast dims), and its 4 strides.

    Only when x has more than 4 dims and the broadcast pattern does not fold into B is the mask copied to x's size.
    """
    m = mask.to(torch.float32).contiguous()
    e = m.expand(shape)
    try:
        v = e.view(b, h, t, n)
    except RuntimeError:
        v = e.reshape(b, h, t, n).contiguous()
    strides = [s if d > 1 else 0 for s, d in zip(v.stride(), (b, h, t, n))]
    return v, strides


@triton.jit
def _softmax_fwd_kernel(
    X,  # (M, N) rows at X + row * stride_xm
    Y,  # (M, N)
    Mask,  # fp32, element (b, h, t, j) at b*smb + h*smh + t*smt + j*smn; read only when HAS_MASK
    stride_xm,
    stride_ym,
    H,
    T,
    N,
    smb,
    smh,
    smt,
    smn,
    scale,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    # One program per row. Bytes (elsize e): fast path reads x, writes y: 2*M*N*e (+ the mask, 4 B per element
    # it has; a broadcast mask stays in L2). Chunked: reads x twice, writes y once: 3*M*N*e.
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    X += row * stride_xm
    Y += row * stride_ym
    if HAS_MASK:
        bh = row // T
        Mask += (bh // H) * smb + (bh % H) * smh + t * smt
    if CAUSAL:
        n_live = tl.minimum(t + 1, N)  # row t sees columns j <= t; the rest of y is exactly 0
    else:
        n_live = N
    cols = tl.arange(0, BLOCK_N)
    if ONE_CHUNK:
        live = cols < n_live
        z = tl.load(X + cols, mask=live, other=0.0).to(tl.float32) * scale
        if HAS_MASK:
            z += tl.load(Mask + cols * smn, mask=live, other=0.0)
        z = tl.where(live, z, float("-inf"))
        m = tl.max(z, axis=0)
        # A fully masked row (max -inf) would give z - max = NaN; shifting by 0 gives exp(-inf) = 0 and sum 0.
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(z - m)
        s = tl.sum(e, axis=0)
        # s >= 1 unless the row is fully masked; then e is all 0 and any finite inv gives zeros (dividing by 1, not
        # 0, keeps the interpreter's numpy quiet). A NaN or +inf logit makes s NaN (tl.max skips a NaN, its exp does
        # not; +inf gives inf - inf) and the whole row NaN, as torch.softmax: `where(s > 0.0, ...)` divided by 1.
        inv = 1.0 / tl.where(s == 0.0, 1.0, s)
        tl.store(Y + cols, (e * inv).to(Y.dtype.element_ty), mask=cols < N)
    else:
        m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)  # fp32 scalars, loop-carried
        s = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        for off in range(0, n_live, BLOCK_N):
            c = off + cols
            live = c < n_live
            z = tl.load(X + c, mask=live, other=0.0).to(tl.float32) * scale
            if HAS_MASK:
                z += tl.load(Mask + c * smn, mask=live, other=0.0)
            z = tl.where(live, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        inv = 1.0 / tl.where(s == 0.0, 1.0, s)  # as in the one-chunk path
        for off in range(0, N, BLOCK_N):
            c = off + cols
            live = c < n_live
            z = tl.load(X + c, mask=live, other=0.0).to(tl.float32) * scale
            if HAS_MASK:
                z += tl.load(Mask + c * smn, mask=live, other=0.0)
            z = tl.where(live, z, float("-inf"))
            tl.store(Y + c, (tl.exp(z - m_safe) * inv).to(Y.dtype.element_ty), mask=c < N)


@triton.jit
def _softmax_bwd_kernel(
    Y,  # (M, N)
    DY,  # (M, N) rows at DY + row * stride_dym
    DX,  # (M, N)
    DZ,  # (M, N) fp32; written only when HAS_DZ
    stride_ym,
    stride_dym,
    stride_dxm,
    stride_dzm,
    N,
    scale,
    HAS_DZ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    # One program per row. Bytes: fast path reads y, dy, writes dx: 3*M*N*e (+4*M*N with dz); chunked re-reads y
    # and dy once more.
    row = tl.program_id(0).to(tl.int64)
    Y += row * stride_ym
    DY += row * stride_dym
    DX += row * stride_dxm
    if HAS_DZ:
        DZ += row * stride_dzm
    cols = tl.arange(0, BLOCK_N)
    if ONE_CHUNK:
        mask = cols < N
        y = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        c = tl.sum(y * dy, axis=0)
        g = y * (dy - c)
        tl.store(DX + cols, (g * scale).to(DX.dtype.element_ty), mask=mask)
        if HAS_DZ:
            tl.store(DZ + cols, g, mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cc = off + cols
            mask = cc < N
            y = tl.load(Y + cc, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cc, mask=mask, other=0.0).to(tl.float32)
            acc += y * dy
        c = tl.sum(acc, axis=0)
        for off in range(0, N, BLOCK_N):
            cc = off + cols
            mask = cc < N
            y = tl.load(Y + cc, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cc, mask=mask, other=0.0).to(tl.float32)
            g = y * (dy - c)
            tl.store(DX + cc, (g * scale).to(DX.dtype.element_ty), mask=mask)
            if HAS_DZ:
                tl.store(DZ + cc, g, mask=mask)


@on_tensor_device
def softmax_fwd(x, mask, scale: float, causal: bool):
    """y = softmax(scale * x + mask) over the last dim, masked to j <= t when causal.

    x: (..., N) fp32/fp16/bf16, any strides; causal needs x.dim() >= 2 (t = index in dim -2).
    mask: additive, broadcastable to x (any float dtype, read as fp32), or None.
    Returns y: contiguous, x's shape and dtype. Fully masked rows are zeros.
    """
    if x.dim() < 1:
        raise ValueError("softmax: x must have at least 1 dim")
    if causal and x.dim() < 2:
        raise ValueError(f"softmax: causal=True needs x with at least 2 dims, got shape {tuple(x.shape)}")
    shape = x.shape
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    b, h, t, n = _dims(shape)
    m = b * h * t
    x2 = _rows(x, m, n)
    y2 = y.view(m, n)
    if mask is not None:
        mask_v, (smb, smh, smt, smn) = _mask_view(mask, shape, b, h, t, n)
    else:
        mask_v, (smb, smh, smt, smn) = x2, (0, 0, 0, 0)  # never read (HAS_MASK=False)
    block_n, num_warps, one_chunk = _config(n, True, x.device)
    _softmax_fwd_kernel[(m,)](
        x2, y2, mask_v,
        x2.stride(0), y2.stride(0),
        h, t, n, smb, smh, smt, smn, float(scale),
        HAS_MASK=mask is not None, CAUSAL=bool(causal),
        BLOCK_N=block_n, ONE_CHUNK=one_chunk, num_warps=num_warps,
    )  # fmt: skip
    return y


@on_tensor_device
def softmax_bwd(y, dy, scale: float, mask_grad: bool):
    """dx = scale * y * (dy - sum_j dy * y); also dz = dx / scale in fp32 when mask_grad.

    y: (..., N) the forward's output; dy: like y, any strides (an expanded or transposed gradient is fine).
    Returns (dx, dz): dx contiguous in y's shape and dtype; dz fp32 in y's shape, or torch.empty(0) (fp32)
    when not mask_grad.
    """
    if dy.shape != y.shape:
        raise ValueError(f"softmax: dy shape {tuple(dy.shape)} must match y shape {tuple(y.shape)}")
    if dy.dtype != y.dtype:
        raise ValueError(f"softmax: dy dtype {dy.dtype} must match y dtype {y.dtype}")
    shape = y.shape
    dx = torch.empty(shape, dtype=y.dtype, device=y.device)
    dz = torch.empty(shape if mask_grad else (0,), dtype=torch.float32, device=y.device)
    if dx.numel() == 0:
        return dx, dz
    n = shape[-1]
    m = y.numel() // n
    y2 = _rows(y, m, n)
    dy2 = _rows(dy, m, n)
    dx2 = dx.view(m, n)
    dz2 = dz.view(m, n) if mask_grad else dx2
    block_n, num_warps, one_chunk = _config(n, False, y.device)
    _softmax_bwd_kernel[(m,)](
        y2, dy2, dx2, dz2,
        y2.stride(0), dy2.stride(0), dx2.stride(0), dz2.stride(0),
        n, float(scale),
        HAS_DZ=bool(mask_grad), BLOCK_N=block_n, ONE_CHUNK=one_chunk, num_warps=num_warps,
    )  # fmt: skip
    return dx, dz
