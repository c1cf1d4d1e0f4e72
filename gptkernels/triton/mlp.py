"""Triton FFN epilogues: bias + activation (GELU tanh / erf, ReLU) and SwiGLU's silu(g) * u, forward and backward.

bias_gelu:  y = act(x + b);  dx = dy * act'(x + b);  db = sum_rows(dx)  (fp32 partial rows per row-block, then one
            torch sum over the partials: deterministic, no atomics); the backward can also re-emit y.
silu_mul:   p = silu(g) * u;  dg = dp * u * s * (1 + g * (1 - s)),  du = dp * silu(g)  with s = sigmoid(g).

All math in fp32; inputs and outputs keep their dtype. GELU tanh is computed as v * sigmoid(2u), which equals
0.5 v (1 + tanh(u)) and needs one exp. Rows may have any stride (stride 0: an expanded dy); the column stride must
be 1 and the launchers copy a tensor on purpose when it is not. Offsets are 64-bit.
"""

import torch
import triton
import triton.language as tl

from gptkernels.triton._common import on_tensor_device, unit_last_stride

ACTIVATIONS = {"gelu_tanh": 0, "gelu": 1, "relu": 2}
# 2-D tiles for the bias kernels: 4 rows x up to 1024 columns, 4 warps (8 fp32 elements per thread: two 16-byte
# vectors). Not yet tuned on a GPU.
_BLOCK_M = 4
_MAX_BLOCK_N = 1024
_FLAT_BLOCK = 1024
_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _sigmoid(z):
    # From e = e^-|z| in (0, 1]: no overflow on the way (the interpreter's numpy warns on one), sigmoid(-inf) = 0
    # exactly and NaN stays NaN, so silu(-inf) and gelu(-inf) are -inf * 0 = NaN, as in eager PyTorch. (The former
    # 1 / (1 + exp(minimum(-z, 88))) gave sigmoid(-inf) = 6e-39, hence -inf, and minimum(NaN, 88) is 88.)
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z < 0.0, e * r, r)


@triton.jit
def _act_and_grad(v, ACT: tl.constexpr):
    """(act(v), act'(v)) in fp32. For ReLU multiply through _act_bwd, not by act'(v)."""
    if ACT == 0:
        s = _sigmoid(2.0 * _SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))
        y = v * s
        d = s + v * s * (1.0 - s) * (2.0 * _SQRT_2_OVER_PI) * (1.0 + 3.0 * 0.044715 * v * v)
    elif ACT == 1:
        c = 0.5 * (1.0 + tl.math.erf(v * _INV_SQRT2))
        y = v * c
        d = c + v * _INV_SQRT_2PI * tl.exp(-0.5 * v * v)
    else:
        y = tl.where(v < 0.0, 0.0, v)  # relu(NaN) = NaN: tl.maximum(v, 0.0) is maxnum, which returned 0
        d = tl.where(v <= 0.0, 0.0, 1.0)
    return y, d


@triton.jit
def _act_bwd(v, dy, ACT: tl.constexpr):
    """(act(v), dy * act'(v)) in fp32. ReLU's is a select, as eager's threshold_backward: dy where v > 0 or v is
    NaN, and 0 where v <= 0 even for an inf dy (a product gave 0 * inf = NaN)."""
    y, d = _act_and_grad(v, ACT)
    if ACT == 2:
        dx = tl.where(v <= 0.0, 0.0, dy)
    else:
        dx = dy * d
    return y, dx


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (M, N)
    B,  # (N,) fp32; read only when HAS_BIAS
    Y,  # (M, N)
    M,
    N,
    stride_xm,
    stride_ym,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Reads x once, writes y once: 2*M*N*elsize.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    v = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(B + cols, mask=cols < N, other=0.0)[None, :]
    y, _ = _act_and_grad(v, ACT)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N)
    X,  # (M, N)
    B,  # (N,) fp32; read only when HAS_BIAS
    DX,  # (M, N)
    Yout,  # (M, N) act(x + b); written only when WANT_Y
    DB,  # (cdiv(M, BLOCK_M), N) fp32 partial column sums of dx; written only when WANT_DB
    M,
    N,
    stride_dym,
    stride_xm,
    stride_dxm,
    stride_ym,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WANT_DB: tl.constexpr,
    WANT_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Reads dy, x, writes dx (+ y): 3*M*N*elsize (4 with y), plus cdiv(M, BLOCK_M)*N*4 of partials.
    pid_m = tl.program_id(0)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(B + cols, mask=cols < N, other=0.0)[None, :]
    y, dx = _act_bwd(v, dy, ACT)
    dx = tl.where(mask, dx, 0.0)
    tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if WANT_Y:
        tl.store(Yout + rows[:, None] * stride_ym + cols[None, :], y.to(Yout.dtype.element_ty), mask=mask)
    if WANT_DB:
        tl.store(DB + pid_m.to(tl.int64) * N + cols, tl.sum(dx, axis=0), mask=cols < N)


@triton.jit
def _silu_mul_fwd_kernel(
    G,  # (n,)
    U,  # (n,)
    P,  # (n,)
    n,
    BLOCK: tl.constexpr,
):
    # Reads g, u, writes p: 3*n*elsize.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    p = g * _sigmoid(g) * u
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(
    DP,  # (n,)
    G,  # (n,)
    U,  # (n,)
    DG,  # (n,)
    DU,  # (n,)
    P,  # (n,) written only when WANT_P
    n,
    WANT_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Reads dp, g, u, writes dg, du (+ p): 5*n*elsize (6 with p).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dp = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    silu = g * s
    tl.store(DG + offs, (dp * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dp * silu).to(DU.dtype.element_ty), mask=mask)
    if WANT_P:
        tl.store(P + offs, (silu * u).to(P.dtype.element_ty), mask=mask)



def _act_code(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _block_n(n):
    return min(max(triton.next_power_of_2(n), 16), _MAX_BLOCK_N)


@on_tensor_device
def bias_gelu_fwd(x, bias, activation: str):
    """y = act(x + bias). x: (M, N) fp32/fp16/bf16; bias: (N,) fp32 or None. Returns y (M, N) in x.dtype."""
    if x.dim() != 2:
        raise ValueError(f"bias_gelu: x must be 2-D (M, N), got shape {tuple(x.shape)}")
    act = _act_code(activation)
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    x = unit_last_stride(x)
    b = bias.contiguous() if bias is not None else x
    block_n = _block_n(N)
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, block_n))
    _bias_gelu_fwd_kernel[grid](
        x, b, y, M, N, x.stride(0), y.stride(0),
        ACT=act, HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return y


@on_tensor_device
def bias_gelu_bwd(dy, x, bias, activation: str, want_dbias: bool, want_y: bool):
    """Backward of bias_gelu_fwd. dy, x: (M, N); bias: (N,) fp32 or None.

    Returns (dx, dbias, y): dx (M, N) x.dtype; dbias = sum_rows(dx) (N,) fp32 when want_dbias (a bias is not needed
    for it), else torch.empty(0); y = act(x + bias) (M, N) when want_y, else torch.empty(0).
    """
    act = _act_code(activation)
    M, N = x.shape
    dev = x.device
    dx = torch.empty((M, N), dtype=x.dtype, device=dev)
    y = torch.empty((M, N) if want_y else 0, dtype=x.dtype, device=dev)
    if M == 0 or N == 0:
        db = torch.zeros(N if want_dbias else 0, dtype=torch.float32, device=dev)
        return dx, db, y
    dy = unit_last_stride(dy)
    x = unit_last_stride(x)
    grid_m = triton.cdiv(M, _BLOCK_M)
    partial = torch.empty((grid_m, N) if want_dbias else 0, dtype=torch.float32, device=dev)
    b = bias.contiguous() if bias is not None else x
    block_n = _block_n(N)
    y_arg = y if want_y else dx
    _bias_gelu_bwd_kernel[(grid_m, triton.cdiv(N, block_n))](
        dy, x, b, dx, y_arg, partial if want_dbias else dx, M, N,
        dy.stride(0), x.stride(0), dx.stride(0), y_arg.stride(0),
        ACT=act, HAS_BIAS=bias is not None, WANT_DB=want_dbias, WANT_Y=want_y, BLOCK_M=_BLOCK_M, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
    db = partial.sum(0) if want_dbias else torch.empty(0, dtype=torch.float32, device=dev)
    return dx, db, y


@on_tensor_device
def silu_mul_fwd(g, u):
    """p = silu(g) * u elementwise; g, u: same shape and dtype (made contiguous here)."""
    g, u = g.contiguous(), u.contiguous()
    p = torch.empty_like(g)
    n = g.numel()
    if n:
        _silu_mul_fwd_kernel[(triton.cdiv(n, _FLAT_BLOCK),)](g, u, p, n, BLOCK=_FLAT_BLOCK, num_warps=4)
    return p


@on_tensor_device
def silu_mul_bwd(dp, g, u, want_p: bool):
    """(dg, du, p): p = silu(g) * u recomputed when want_p, else torch.empty(0)."""
    dp, g, u = dp.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(g)
    p = torch.empty_like(g) if want_p else g.new_empty(0)
    n = g.numel()
    if n:
        _silu_mul_bwd_kernel[(triton.cdiv(n, _FLAT_BLOCK),)](
            dp, g, u, dg, du, p if want_p else dg, n, WANT_P=want_p, BLOCK=_FLAT_BLOCK, num_warps=4)
    return dg, du, p
