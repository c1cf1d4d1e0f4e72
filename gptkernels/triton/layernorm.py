"""Triton LayerNorm / RMSNorm over the last dim, with an optional fused residual add.

Forward:  h = x + residual (rounded to x.dtype, as eager PyTorch would store it), else h = x
          LayerNorm: y = (h - mean) * rstd * w + b,   rstd = 1 / sqrt(var + eps), var biased (/ N), two-pass
          RMSNorm:   y = h * rstd * w,                rstd = 1 / sqrt(mean(h^2) + eps)
Backward: xhat = (h - mean) * rstd (RMSNorm: h * rstd), wdy = w * dy
          dx = rstd * (wdy - mean_j(wdy) - xhat * mean_j(wdy * xhat)) (+ dh)   (RMSNorm drops the mean_j(wdy) term)
          dw = sum_rows(dy * xhat), db = sum_rows(dy)

Two shapes of kernel, chosen by a constexpr (ONE_CHUNK) so each launch compiles only one of them:
  - the row fits in registers (BLOCK_N = next_power_of_2(N) <= _MAX_BLOCK_N): every byte of the row is read
    from HBM exactly once;
  - otherwise the row is walked in _CHUNK-wide pieces, re-reading it once per pass (from L2 when it fits).

All math is fp32; inputs and outputs keep their dtype; weight/bias are upcast on load. A bias, when given, is
added in RMSNorm mode too (y = h * rstd * w + b). Row offsets are 64-bit (int64 row index times stride, or
pointers advanced row by row) so M * N >= 2^31 elements is safe. Rows may have any stride (stride 0 included:
an expanded dy); the column stride must be 1, and the launchers copy a tensor on purpose when it is not.
"""


import torch
import triton
import triton.language as tl

from gptkernels.triton._common import on_tensor_device, sm_count, unit_last_stride

# Register budget for the whole-row path, in row elements. After the upcast every live row-sized tensor costs one
# fp32 register per element per thread whatever the input dtype, so the limit counts elements, not bytes, and is
# the same for fp32 and 16-bit inputs. The num_warps rule below gives 16 elements per thread from 512 up; the
# register count was read from ptxas (triton 3.8, sm_90 target, cuobjdump --dump-resource-usage, every flag
# combination and dtype): forward <= 104 registers at 8192/16 warps; backward up to 187 at 4096/8 warps and at the
# 128-register cap of 16 warps at 8192, with no local memory (no spills) anywhere. 16384 would need 32 warps at
# <= 64 registers, which the backward cannot fit. Speed on an H200 not yet measured.
_MAX_BLOCK_N = 8192
# Chunk width of the large-N loops and its warp count (16 elements per thread: two or four 16-byte vectors).
_CHUNK = 4096
_CHUNK_WARPS = 8
# Backward programs per SM on the GPU: aim for ~16 warps per SM (a quarter of an H200 SM's 64), enough loads in
# flight for a streaming kernel while keeping the (programs, N) fp32 partial buffers small. Registers can cap
# residency below that (187 registers x 256 threads leaves room for one 8-warp program per SM); the extra
# programs then run as a second wave of equal-sized work. Not yet measured on an H200.
_BWD_WARPS_PER_SM = 16
# On the CPU (TRITON_INTERPRET=1) programs run one after another; a few programs still exercise the
# multi-row loop and the partial-sum reduction.
_CPU_BWD_PROGRAMS = 4


def _num_warps(block_n):
    # 512 elements per warp (16 per thread), 1..16 warps.
    return min(max(block_n // 512, 1), 16)


def _config(n):
    """(BLOCK_N, num_warps, ONE_CHUNK) for a row of n elements."""
    # Floor of 32: one element per lane of a warp; smaller tensors would only be replicated across lanes.
    block_n = max(triton.next_power_of_2(n), 32)
    if block_n <= _MAX_BLOCK_N:
        return block_n, _num_warps(block_n), True
    return _CHUNK, _CHUNK_WARPS, False



def _bwd_num_programs(m, num_warps, device):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = sm_count(index) * max(_BWD_WARPS_PER_SM // num_warps, 1)
    else:
        cap = _CPU_BWD_PROGRAMS
    return min(m, cap)



def _check_shape(name, t, shape):
    if t.shape != shape:
        raise ValueError(f"layernorm: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


@triton.jit
def _layernorm_fwd_kernel(
    X,  # (M, N)
    R,  # (M, N) residual; read only when HAS_RESIDUAL
    H,  # (M, N) x + residual; written only when HAS_RESIDUAL
    Y,  # (M, N)
    W,  # (N,)
    B,  # (N,) read only when HAS_BIAS
    Mean,  # (M,) fp32; written only when not RMS
    Rstd,  # (M,) fp32
    stride_xm,
    stride_rm,
    stride_hm,
    stride_ym,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    # One program per row. Bytes (elsize e, weight/bias fp32 and shared by all rows, so L2-resident):
    #   fast path: reads x (+ residual), writes y (+ h): 2*M*N*e, 4*M*N*e with a residual.
    #   chunked:   pass 1 reads x (+ residual, writes h), pass 2 and 3 re-read h, pass 3 writes y;
    #              RMSNorm skips pass 2. The re-reads come from L2 when the row's passes overlap in time.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    X += row * stride_xm
    Y += row * stride_ym
    if HAS_RESIDUAL:
        R += row * stride_rm
        H += row * stride_hm
        Hin = H  # later passes read the rounded h back
    else:
        Hin = X

    if ONE_CHUNK:
        mask = cols < N
        h = tl.load(X + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + cols, mask=mask, other=0.0)
            # Round to the storage dtype first: the statistics must describe the h that is returned (and that
            # the backward will read), exactly as eager x + residual would produce it.
            h = (h.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + cols, h, mask=mask)
        h = h.to(tl.float32)
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
            xhat = h * rstd
        else:
            mean = tl.sum(h, axis=0) / N
            # Masked lanes hold 0, so h - mean there is -mean: zero them before squaring.
            d = tl.where(mask, h - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
            tl.store(Mean + row, mean)
            xhat = d * rstd
        tl.store(Rstd + row, rstd)
        y = xhat * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: sum (LayerNorm) or sum of squares (RMSNorm); form and store h. Per-lane accumulators, reduced
        # once at the end, add fewer rounding steps than a running scalar.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            h = tl.load(X + c, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(R + c, mask=mask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
                tl.store(H + c, h, mask=mask)
            h = h.to(tl.float32)
            if RMS:
                acc += h * h
            else:
                acc += h
        if HAS_RESIDUAL:
            # Passes 2 and 3 read h back; make this program's stores visible to all of its threads.
            tl.debug_barrier()
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
            mean = 0.0
        else:
            mean = tl.sum(acc, axis=0) / N
            # Pass 2: squared deviations from the exact mean (no E[h^2] - E[h]^2 cancellation).
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                h = tl.load(Hin + c, mask=mask, other=0.0).to(tl.float32)
                d = tl.where(mask, h - mean, 0.0)
                acc += d * d
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
            tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)
        # Pass 3: normalize and write y.
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            h = tl.load(Hin + c, mask=mask, other=0.0).to(tl.float32)
            y = (h - mean) * rstd * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_bwd_kernel(
    DY,  # (M, N)
    DH,  # (M, N) read only when HAS_DH
    Hin,  # (M, N) the normalized input
    W,  # (N,)
    Mean,  # (M,) fp32; read only when not RMS
    Rstd,  # (M,) fp32
    DX,  # (M, N)
    DW,  # (num_programs, N) fp32 partial sums of dy * xhat, one row per program
    DB,  # (num_programs, N) fp32 partial sums of dy; written only when HAS_BIAS
    stride_dym,
    stride_dhm,
    stride_hm,
    stride_dxm,
    stride_dwp,
    stride_dbp,
    M,
    N,
    rows_per_program,
    HAS_DH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    # Each program owns rows [row_start, row_end) and one row of the partial buffers, so dw/db need no atomics
    # and the final partial.sum(0) is deterministic. Bytes (elsize e):
    #   fast path: reads h, dy (+ dh), writes dx: 3*M*N*e (4 with dh); plus programs*N*4 per partial buffer.
    #   chunked:   pass 1 reads h, dy; pass 2 re-reads them (+ dh), writes dx, and read-modify-writes the partial
    #              rows (16 B per element with a bias) -- that traffic stays in L2 while
    #              programs * N * 8 B fits there (e.g. 264 programs * 16384 columns = 35 MB).
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    DW += pid.to(tl.int64) * stride_dwp
    DB += pid.to(tl.int64) * stride_dbp
    # Row pointers start at row_start and advance by one row stride per row: 64-bit pointer arithmetic, so
    # M * N >= 2^31 is safe without widening the loop counter.
    start64 = row_start.to(tl.int64)
    Hin += start64 * stride_hm
    DY += start64 * stride_dym
    DX += start64 * stride_dxm
    if HAS_DH:
        DH += start64 * stride_dhm

    if ONE_CHUNK:
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            h = tl.load(Hin + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row)
            if RMS:
                xhat = h * rstd
            else:
                xhat = tl.where(mask, (h - tl.load(Mean + row)) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if RMS:
                dx = (wdy - xhat * c1) * rstd
            else:
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
            Hin += stride_hm
            DY += stride_dym
            DX += stride_dxm
            if HAS_DH:
                DH += stride_dhm
        # Every launched program owns at least one row, so its partial row is always fully written.
        tl.store(DW + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DB + cols, db_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            if RMS:
                mean = 0.0
            else:
                mean = tl.load(Mean + row)
            # Pass 1: the two row means of the dx formula.
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                h = tl.load(Hin + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + c, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                wdy = tl.load(W + c, mask=mask, other=0.0).to(tl.float32) * dy
                acc1 += xhat * wdy
                if not RMS:
                    acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N  # 0 for RMSNorm
            # Pass 2: dx, and this row's dy * xhat, dy added into the program's partial rows. The first row of
            # the program masks the load off instead of reading the uninitialized (torch.empty) buffer.
            not_first = row > row_start
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                h = tl.load(Hin + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + c, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                wdy = tl.load(W + c, mask=mask, other=0.0).to(tl.float32) * dy
                dx = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DH:
                    dx += tl.load(DH + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + c, dx.to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(DW + c, mask=mask & not_first, other=0.0)
                tl.store(DW + c, dw + dy * xhat, mask=mask)
                if HAS_BIAS:
                    db = tl.load(DB + c, mask=mask & not_first, other=0.0)
                    tl.store(DB + c, db + dy, mask=mask)
            # The next row reads the partial rows back: make the stores visible to every thread of the program.
            tl.debug_barrier()
            Hin += stride_hm
            DY += stride_dym
            DX += stride_dxm
            if HAS_DH:
                DH += stride_dhm


@on_tensor_device
def layernorm_fwd(x, weight, bias, residual, eps: float, rms: bool):
    """LayerNorm (rms=False) or RMSNorm (rms=True) over the last dim.

    x: (M, N) fp32/fp16/bf16; residual: (M, N) same dtype, or None; weight: (N,) fp32; bias: (N,) fp32 or None.
    h = x + residual rounded to x.dtype (as PyTorch computes it), else x; the statistics come from the rounded h.
    LayerNorm: y = (h - mean) * rstd * weight + bias, rstd = 1/sqrt(var + eps), var biased, two-pass.
    RMSNorm:   y = h * rstd * weight (+ bias if one is given), rstd = 1/sqrt(mean(h^2) + eps).
    Returns (y, h, mean, rstd): y (M, N) x.dtype; h (M, N) x.dtype when residual is given, else torch.empty(0)
    (x.dtype, x.device); mean (M,) fp32, or torch.empty(0, fp32) when rms; rstd (M,) fp32. All math in fp32.
    """
    if x.dim() != 2:
        raise ValueError(f"layernorm: x must be 2-D (M, N), got shape {tuple(x.shape)}")
    M, N = x.shape
    _check_shape("weight", weight, (N,))
    if bias is not None:
        _check_shape("bias", bias, (N,))
    if residual is not None:
        _check_shape("residual", residual, (M, N))
        if residual.dtype != x.dtype:
            raise ValueError(f"layernorm: residual dtype {residual.dtype} != x dtype {x.dtype}")
    dev = x.device
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    h = (
        torch.empty((M, N), dtype=x.dtype, device=dev)
        if residual is not None
        else torch.empty(0, dtype=x.dtype, device=dev)
    )
    mean = torch.empty(0 if rms else M, dtype=torch.float32, device=dev)
    rstd = torch.empty(M, dtype=torch.float32, device=dev)
    if M == 0 or N == 0:
        # Rows of nothing: y and h are empty; the statistics are torch.native_layer_norm's (mean 0, rstd NaN).
        mean.zero_()
        rstd.fill_(float("nan"))
        return y, h, mean, rstd

    x = unit_last_stride(x)
    weight = weight.contiguous()
    # Unused pointer arguments get a real tensor of the right dtype; constexpr flags keep them untouched.
    r = unit_last_stride(residual) if residual is not None else x
    h_arg = h if residual is not None else x
    b = bias.contiguous() if bias is not None else weight
    mean_arg = mean if not rms else rstd
    block_n, num_warps, one_chunk = _config(N)
    _layernorm_fwd_kernel[(M,)](
        x, r, h_arg, y, weight, b, mean_arg, rstd,
        x.stride(0), r.stride(0), h_arg.stride(0), y.stride(0),
        N, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, RMS=rms,
        BLOCK_N=block_n, ONE_CHUNK=one_chunk, num_warps=num_warps,
    )  # fmt: skip
    return y, h, mean, rstd


@on_tensor_device
def layernorm_bwd(dy, dh, hin, weight, mean, rstd, has_bias: bool, rms: bool):
    """Backward of layernorm_fwd.

    dy: (M, N), dtype of hin; dh: (M, N) or None, the gradient flowing into the h output, added to dx.
    hin: (M, N) the normalized input (h from forward, or x without a residual); weight: (N,) fp32;
    mean: (M,) fp32 (ignored, may be empty, when rms); rstd: (M,) fp32.
    Returns (dx, dw, db): dx (M, N) hin.dtype; dw (N,) fp32; db (N,) fp32 when has_bias else torch.empty(0, fp32).
    dw/db: each program writes fp32 partial sums over its rows to a (num_programs, N) buffer, summed here with
    torch -- deterministic, no atomics.
    """
    if hin.dim() != 2:
        raise ValueError(f"layernorm: hin must be 2-D (M, N), got shape {tuple(hin.shape)}")
    M, N = hin.shape
    _check_shape("dy", dy, (M, N))
    _check_shape("weight", weight, (N,))
    _check_shape("rstd", rstd, (M,))
    if not rms:
        _check_shape("mean", mean, (M,))
    if dh is not None:
        _check_shape("dh", dh, (M, N))
    dev = hin.device
    f32 = torch.float32
    dx = torch.empty((M, N), dtype=hin.dtype, device=dev)
    if M == 0 or N == 0:
        # A sum over no rows is zero: here zeros are the result, not a placeholder (N == 0: dx, dw, db are empty).
        dw = torch.zeros(N, dtype=f32, device=dev)
        db = torch.zeros(N, dtype=f32, device=dev) if has_bias else torch.empty(0, dtype=f32, device=dev)
        return dx, dw, db

    dy = unit_last_stride(dy)
    hin = unit_last_stride(hin)
    dh_arg = unit_last_stride(dh) if dh is not None else dy
    weight = weight.contiguous()
    mean_arg = mean if not rms else rstd
    block_n, num_warps, one_chunk = _config(N)
    programs = _bwd_num_programs(M, num_warps, dev)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)  # no program without rows: each partial row gets written
    dw_partial = torch.empty((programs, N), dtype=f32, device=dev)
    db_partial = torch.empty((programs, N), dtype=f32, device=dev) if has_bias else dw_partial
    _layernorm_bwd_kernel[(programs,)](
        dy, dh_arg, hin, weight, mean_arg, rstd, dx, dw_partial, db_partial,
        dy.stride(0), dh_arg.stride(0), hin.stride(0), dx.stride(0), dw_partial.stride(0), db_partial.stride(0),
        M, N, rows_per_program,
        HAS_DH=dh is not None, HAS_BIAS=has_bias, RMS=rms,
        BLOCK_N=block_n, ONE_CHUNK=one_chunk, num_warps=num_warps,
    )  # fmt: skip
    dw = dw_partial.sum(0)
    db = db_partial.sum(0) if has_bias else torch.empty(0, dtype=f32, device=dev)
    return dx, dw, db
