"""Triton weight-only quantized linear: a GEMV / skinny GEMM with in-register dequantization, and a dequantize kernel.

gemv:    y (M, N) = x (M, K) @ dequant(W)^T + bias. A program owns BLOCK_N output rows and BLOCK_M (<= 16) rows of x;
         per K step it loads a (BLOCK_N, BLOCK_K) tile of int8 (or the bytes of the int4 nibbles), converts and scales
         it in registers, and reduces x[:, None, :] * w[None, :, :] over K into fp32 accumulators. For M <= 16 the grid
         has one program per BLOCK_N rows, so every weight byte is read once per call. No tl.dot: at M <= 16 the
         weight read is the cost, and the interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584).
dequant: w (N, K) in x's dtype, for the large-M path's GEMM.

Formats: gptkernels/ops/qlinear.py. int4 element k of a row sits in byte (k // 32) * 16 + k % 16, in the high nibble
when k % 32 >= 16, stored as q + 8. Scales are gathered per element as scales[n, k // group] (group is a runtime
int: per-channel int8 has group = K, which differs per layer and would recompile as a constexpr); the gather hits the
same few cache lines. Block sizes are not yet tuned on a GPU.
"""

import torch
import triton
import triton.language as tl

from gptkernels.triton._common import on_tensor_device, unit_last_stride

_BLOCK_N = 16
_BLOCK_K = 128
_MAX_BLOCK_M = 16


@triton.jit
def _qlinear_gemv_kernel(
    X,  # (M, K)
    Q,  # (N, K) int8 or (N, K // 2) uint8
    S,  # (N, G) fp32
    B,  # (N,) fp32; read only when HAS_BIAS
    Y,  # (M, N)
    M,
    N,
    K,
    G,
    group,
    stride_xm,
    stride_q,
    stride_ym,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Reads the weight once per BLOCK_M rows of x (N*K or N*K/2 bytes + scales), x once per BLOCK_N rows.
    rows_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_ok = rows_n < N
    m_ok = rows_m < M
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        wmask = n_ok[:, None] & k_ok[None, :]
        if BITS == 8:
            q = tl.load(Q + rows_n[:, None] * stride_q + ks[None, :], mask=wmask, other=0).to(tl.float32)
        else:
            byte = tl.load(Q + rows_n[:, None] * stride_q + (ks[None, :] // 32) * 16 + ks[None, :] % 16, mask=wmask,
                           other=8).to(tl.int32)
            shift = ((ks[None, :] % 32) // 16) * 4
            q = (((byte >> shift) & 15) - 8).to(tl.float32)
        s = tl.load(S + rows_n[:, None] * G + ks[None, :] // group, mask=wmask, other=0.0)
        w = q * s  # (BLOCK_N, BLOCK_K) fp32
        xt = tl.load(X + rows_m[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)
        acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(B + rows_n, mask=n_ok, other=0.0)[None, :]
    tl.store(Y + rows_m[:, None] * stride_ym + rows_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _qlinear_dequant_kernel(
    Q,  # (N, K) int8 or (N, K // 2) uint8
    S,  # (N, G) fp32
    W,  # (N, K) out
    N,
    K,
    G,
    group,
    stride_q,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (ks[None, :] < K)
    if BITS == 8:
        q = tl.load(Q + rows[:, None] * stride_q + ks[None, :], mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(Q + rows[:, None] * stride_q + (ks[None, :] // 32) * 16 + ks[None, :] % 16, mask=mask,
                       other=8).to(tl.int32)
        q = (((byte >> (((ks[None, :] % 32) // 16) * 4)) & 15) - 8).to(tl.float32)
    s = tl.load(S + rows[:, None] * G + ks[None, :] // group, mask=mask, other=0.0)
    tl.store(W + rows[:, None] * K + ks[None, :], (q * s).to(W.dtype.element_ty), mask=mask)


def _groups(scales, n):
    return scales.reshape(n, -1).contiguous()  # (N,) per channel -> (N, 1)


@on_tensor_device
def gemv(x, qweight, scales, bias, group_size, bits):
    """y (M, N) in x.dtype = x (M, K) @ dequant(qweight, scales)^T + bias (fp32 (N,) contiguous or None)."""
    x = unit_last_stride(x)
    m, k = x.shape
    n = qweight.shape[0]
    q = qweight.contiguous()
    s = _groups(scales, n)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    block_m = min(_MAX_BLOCK_M, max(1, triton.next_power_of_2(m)))
    # The (BLOCK_M, BLOCK_N, BLOCK_K) product tile lives in registers: about 4096 elements (32 per thread of 4 warps).
    block_k = max(32, min(_BLOCK_K, 4096 // (block_m * _BLOCK_N)))
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(m, block_m))
    _qlinear_gemv_kernel[grid](
        x, q, s, bias if bias is not None else s, y, m, n, k, s.shape[1], group_size, x.stride(0), q.stride(0),
        y.stride(0), BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=block_k,
    )
    return y


@on_tensor_device
def dequant(qweight, scales, group_size, bits, k, dtype):
    """The weight (N, K) in ``dtype``."""
    n = qweight.shape[0]
    q = qweight.contiguous()
    s = _groups(scales, n)
    w = torch.empty(n, k, device=q.device, dtype=dtype)
    if n == 0:
        return w
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(k, _BLOCK_K))
    _qlinear_dequant_kernel[grid](q, s, w, n, k, s.shape[1], group_size, q.stride(0), BITS=bits, BLOCK_N=_BLOCK_N,
                                  BLOCK_K=_BLOCK_K)
    return w
