"""Triton attention: FlashAttention-2 style forward and backward, and split-K flash-decoding.

Layout as torch SDPA: q (B, H, Tq, D); k, v (B, Hkv, Tk, D); query head h reads kv head h // (H // Hkv).
For query row i of head (b, h) and the keys j visible to it (all; causal: j <= i; window w: i - w < j <= i),
with an optional additive fp32 mask (-inf allowed):
    s_ij = scale * <q_i, k_j> + mask_ij,   lse_i = log sum_j exp(s_ij),   p_ij = exp(s_ij - lse_i)
    out_i = sum_j p_ij * keep_ij / (1 - dropout_p) * v_j          (keep_ij = 1 without dropout)
A row with no visible key (or only -inf scores) has out = 0, lse = -inf and zero gradients: every exp of a
difference of two -inf is guarded, so no NaN is ever formed.

Forward: one program per (BLOCK_M query rows, b, h). K/V tiles stream through an online softmax (running max m,
running sum l, accumulator rescaled by exp(m_old - m_new)); the key loop is bounded by the causal/window limits
of the tile, so fully masked tiles are never visited. Nothing of size Tq x Tk is stored: only out and lse.

Backward recomputes p from lse:
    delta_i = sum_d dout_id * out_id                                            (preprocess kernel)
    dp_ij = <dout_i, v_j> * keep_ij / (1 - dropout_p),  ds_ij = p_ij * (dp_ij - delta_i)
    dv_j = sum_i p_ij keep_ij / (1 - dropout_p) dout_i,  dk_j = scale sum_i ds_ij q_i,  dq_i = scale sum_j ds_ij k_j
  dK/dV kernel: one program per (BLOCK_N keys, b, kv head), looping over the query heads of its GQA group and
  their query tiles, so the sum over the group happens in registers. dQ kernel: one program per (BLOCK_M rows,
  b, h), looping over key tiles. Both recompute s = q k^T (7 tile matmuls instead of the 5 of a single kernel
  with atomic dq adds): in exchange the gradients are deterministic, bit for bit, run to run.

Dropout: keep_ij is a function of (seed, b, h, i, j) only: Philox4x32-10 (tl.philox, the generator behind
tl.rand) keyed by the seed with the counter (j, i, b * H + h, 0), so any tile shape or loop order, forward or
backward, regenerates the same decision. keep iff the top 24 bits of the first output word are
>= round(dropout_p * 2^24).

Decode (flash-decoding): q (B, H, Tn, D) are the Tn newest tokens; keys at positions >= cache_seqlens[b] are
never read. One program per (b, kv head, tile of the group's H / Hkv * Tn query rows, key split): the query heads
of a GQA group share their K/V tile loads. Each split writes a partial (out, lse) in fp32; a merge kernel combines
the splits with their log-sum-exp weights.

Tensor cores: every product is a tl.dot of 2-D tiles with an fp32 accumulator. 16-bit inputs feed 16-bit operands
(p and ds are rounded to the input dtype for the second product of each pair, as FlashAttention does); fp32 inputs
use input_precision="ieee" so fp32 results meet the 1e-5 bound (tf32 would need 3e-4).

Head dims: 16, 32, 64, 128, 256 run natively; other multiples of 8 in 16..256 are padded to the next power of two
with masked loads (the padding lanes read 0 and are never stored). Inputs may have any strides over (B, H, T)
(0 included: an expanded dout); the last dim must have stride 1 and the launchers copy a tensor, on purpose,
when it does not. Batch/head offsets are int64, so tensors over 2^31 elements are safe.
"""


import torch
import triton
import triton.language as tl

from gptkernels.triton._common import device_guard, interpreting, sm_count, unit_last_stride

_INTERPRET = interpreting()  # at import: the autotune decorators below depend on it

# Under the interpreter (CPU tensors, for testing) every program runs one after another in numpy: one small tile
# config, no autotuning (each config would rerun every test case). 16 is tl.dot's smallest tile, and T = 17 or 33
# then exercises multi-tile loops and ragged last tiles.
_INTERP_META = {"BLOCK_M": 16, "BLOCK_N": 16}
_DECODE_BLOCK_N = 16 if _INTERPRET else 64
_DECODE_MAX_ROWS = 64  # query rows per decode program (GQA group x Tn), 16..64
_DROP_BITS = 24  # the keep test compares the top 24 bits of a Philox word with round(p * 2^24)


# ------------------------------------------------------------------------------------------- autotuning (GPU)
def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs, in order of preference: the usual FlashAttention-2
# tiles for sm_80/sm_90, plus 8-warp small tiles for head dim 256. None has been timed on an H200 yet, which is why
# the autotuner picks among them per key. Kept short on purpose: every config is a separate compile (AOT for sm_90
# on this repo's 2-core CPU box: 2-8 s per kernel).
_FWD_TILES = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 64, 8, 2), (64, 32, 8, 2)]
_BWD_TILES = [(64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (32, 64, 4, 2), (32, 32, 8, 2)]
# fp32 inputs run the exact-fp32 FMA path (input_precision="ieee", no tensor cores) and are not autotuned: the first
# fitting tile runs. Small tiles because the FMA dots unroll per tile element: AOT for sm_90 on the same box, the
# dK/dV kernel at D = 128 compiled in 5 s with 32 x 32 tiles and 66-109 s with 64 x 64.
_FWD_TILES_FP32 = [(64, 32, 4, 2), (32, 32, 4, 2)]
_BWD_TILES_FP32 = [(32, 32, 4, 2), (32, 32, 8, 1)]  # tuples distinct from the 16-bit lists: prune tells them apart
# Keys: head-dim tile, dtype (added by triton.autotune for every tensor argument), the sequence lengths rounded up
# to powers of two (a new exact length must not re-tune: decoding and packed batches vary it every call) and the
# masking variant, which changes the work per tile.
_KEY = ["BLOCK_D", "TQ_KEY", "TK_KEY", "CAUSAL", "WINDOW", "HAS_MASK", "DROPOUT"]
# Pruning bounds, applied before any config is timed: 32-bit registers per thread for the live tiles (of 255) and
# shared memory for the pipelined tiles (of an H100/H200 SM's 227 KB). Estimates, not ptxas numbers: a config that
# passes but does not fit is still skipped by the autotuner (OutOfResources).
_MAX_TILE_REGS = 192
_MAX_SMEM = 200 * 1024


def _tile_regs(live, bm, bn, bd, elsize, num_warps):
    """Registers per thread of ``live(bm, bn, bd) = (fp32 elements, input-dtype elements)``."""
    f32, inp = live(bm, bn, bd)
    return (f32 + inp * elsize / 4) / (32 * num_warps)


def _fits(live, c, bd, elsize):
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    smem = c.num_stages * 2 * max(bm, bn) * bd * elsize  # the two streamed operand tiles per stage
    return _tile_regs(live, bm, bn, bd, elsize, c.num_warps) <= _MAX_TILE_REGS and smem <= _MAX_SMEM


def _tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _prune(live, fp32_tiles):
    """early_config_prune: the configs of the input's precision class whose live tiles fit (see _fits); for fp32
    only the first of them."""

    def prune(configs, named_args, **kwargs):
        bd, elsize = kwargs["BLOCK_D"], named_args["Q"].element_size()
        pool = [c for c in configs if (_tile(c) in fp32_tiles) == (elsize == 4)]
        kept = [c for c in pool if _fits(live, c, bd, elsize)]
        if elsize == 4:
            kept = kept[:1]
        # Never empty: else the config needing the fewest registers.
        return kept or [min(pool, key=lambda c: _tile_regs(live, *_tile(c)[:2], bd, elsize, c.num_warps))]

    return prune


# Live tiles per kernel: (fp32 accumulators and score tiles, input-dtype operand tiles held across the loop).
def _fwd_live(bm, bn, bd):
    return bm * bd + bm * bn, bm * bd  # acc, s; q


def _dkdv_live(bm, bn, bd):
    return 2 * bn * bd + 2 * bm * bn, 2 * bn * bd  # dk, dv, s^T, dp^T; k, v


def _dq_live(bm, bn, bd):
    return bm * bd + 2 * bm * bn, 2 * bm * bd  # dq, s, dp; q, dout


def _tuned(tiles, fp32_tiles, live):
    def wrap(fn):
        if _INTERPRET:
            return fn
        prune = {"early_config_prune": _prune(live, fp32_tiles)}
        return triton.autotune(configs=_configs(tiles + fp32_tiles), key=_KEY, prune_configs_by=prune)(fn)

    return wrap


def _meta():
    """Launch-time tile sizes: fixed under the interpreter; chosen by the autotuner on the GPU."""
    return dict(_INTERP_META) if _INTERPRET else {}


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _row_mask(row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # The head-dim check is compiled in only when D was padded to BLOCK_D.
    if BLOCK_D == HEAD_DIM:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    return mask


@triton.jit
def _visible(rows, cols, Tk, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # rows, cols: broadcastable index tiles (i as a column and j as a row, or the transpose in the dK/dV kernel).
    ok = cols < Tk
    if CAUSAL:
        ok = ok & (cols <= rows)
    if WINDOW:
        ok = ok & (cols > rows - window)
    return ok


@triton.jit
def _keep(seed, bh, rows, cols, drop_thresh):
    # Philox counter (j, i, b * H + h, 0): a pure function of the element, whatever the tile layout.
    c1 = rows + cols * 0
    c0 = cols + rows * 0
    c2 = c1 * 0 + bh
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c1 * 0)
    return (r >> 8).to(tl.int32) >= drop_thresh


@triton.jit
def _key_range(start_m, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):
    """[lo, hi) of the key tiles that query rows start_m .. start_m + BLOCK_M - 1 can see; lo is tile aligned."""
    lo = 0
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, start_m + BLOCK_M)
    if WINDOW:
        lo = tl.maximum(start_m - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, Tq, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr):
    """[lo, hi) of the query tiles that see any of keys start_n .. start_n + BLOCK_N - 1; lo is tile aligned."""
    lo = 0
    hi = Tq
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    if WINDOW:
        hi = tl.minimum(Tq, start_n + BLOCK_N - 1 + window)
    return lo, hi


@triton.jit
def _tile_index(pid, n_tiles, CAUSAL: tl.constexpr):
    # Consecutive programs share a head (its K/V stay in L2). Under causal masking the last query tiles see the most
    # keys: schedule them first so the short ones fill the tail of the wave.
    t = pid % n_tiles
    if CAUSAL:
        t = n_tiles - 1 - t
    return t, pid // n_tiles


# -------------------------------------------------------------------------------------------------- forward
@_tuned(_FWD_TILES, _FWD_TILES_FP32, _fwd_live)
@triton.jit(do_not_specialize=["seed", "TQ_KEY", "TK_KEY"])  # a new seed or length bucket must not recompile
def _attention_fwd_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    Mask,  # (B, H, Tq, Tk) fp32 through broadcast strides; read only when HAS_MASK
    Out,  # (B, H, Tq, D)
    Lse,  # (B, H, Tq) fp32, contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    H, Tq, Tk, GROUP,
    scale, window, drop_thresh, drop_scale, seed,
    TQ_KEY, TK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Bytes: q, out and lse once; K/V once per query tile (from L2 for the neighbours of a head).
    pid_m, pid_bh = _tile_index(tl.program_id(0), tl.cdiv(Tq, BLOCK_M), CAUSAL)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Out += b * stride_ob + h * stride_oh
    Mask += b * stride_mb + h * stride_mh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=_row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D),
                other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, Tk, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < Tk
        kv_mask = _row_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if HAS_MASK:
            s += tl.load(Mask + offs_m[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mn,
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.where(_visible(offs_m[:, None], cols[None, :], Tk, window, CAUSAL, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible so far has m = -inf: subtract 0 instead (exp(-inf - -inf) would be NaN).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_sub[:, None])
        alpha = tl.exp(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, pid_bh, offs_m[:, None], cols[None, :], drop_thresh), p, 0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc * (drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=_row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D))
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(Lse + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=m_ok)


# ------------------------------------------------------------------------------------------------- backward
@triton.jit
def _attention_bwd_preprocess_kernel(
    Out,  # (B, H, Tq, D)
    DOut,  # (B, H, Tq, D)
    Delta,  # (B, H, Tq) fp32, contiguous
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # Reads out and dout once, writes 4 bytes per row.
    pid_m, pid_bh = _tile_index(tl.program_id(0), tl.cdiv(Tq, BLOCK_M), False)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    mask = _row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Tq + offs_m, delta, mask=m_ok)


@_tuned(_BWD_TILES, _BWD_TILES_FP32, _dkdv_live)
@triton.jit(do_not_specialize=["seed", "TQ_KEY", "TK_KEY"])  # a new seed or length bucket must not recompile
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    Mask,  # (B, H, Tq, Tk) fp32 through broadcast strides; read only when HAS_MASK
    DOut,  # (B, H, Tq, D)
    Lse,  # (B, H, Tq) fp32, contiguous
    Delta,  # (B, H, Tq) fp32, contiguous
    DK,  # (B, Hkv, Tk, D), contiguous
    DV,  # (B, Hkv, Tk, D), contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_db, stride_dh, stride_dm,
    H, Hkv, Tq, Tk, GROUP,
    scale, window, drop_thresh, drop_scale, seed,
    TQ_KEY, TK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Scores are formed transposed, (BLOCK_N keys, BLOCK_M queries), so dv += p^T dout and dk += ds^T q need no
    # transpose of a register tile. Bytes: K/V, dK/dV once; q, dout, lse, delta once per key tile and group head.
    pid_n = tl.program_id(0) % tl.cdiv(Tk, BLOCK_N)
    pid_bhk = tl.program_id(0) // tl.cdiv(Tk, BLOCK_N)
    b = (pid_bhk // Hkv).to(tl.int64)
    hk = (pid_bhk % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Tk
    kv_mask = _row_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, hi = _query_range(start_n, Tq, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h  # int64
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DOut + b * stride_db + h * stride_dh
        Mh = Mask + b * stride_mb + h * stride_mh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < Tq
            q_mask = _row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
            q = tl.load(Qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DOh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=q_mask, other=0.0)
            # Rows past Tq and fully masked rows (lse = -inf) get lse = +inf: p = exp(s - inf) = 0, never NaN.
            lse = tl.load(Lse + bh * Tq + offs_m, mask=m_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(Delta + bh * Tq + offs_m, mask=m_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale  # (BLOCK_N, BLOCK_M)
            if HAS_MASK:
                st += tl.load(Mh + offs_m[None, :].to(tl.int64) * stride_mm + offs_n[:, None] * stride_mn,
                              mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            vis = _visible(offs_m[None, :], offs_n[:, None], Tk, window, CAUSAL, WINDOW)
            pt = tl.where(vis, tl.exp(st - lse[None, :]), 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            if DROPOUT:
                keep = _keep(seed, bh.to(tl.int32), offs_m[None, :], offs_n[:, None], drop_thresh)
                pdt = tl.where(keep, pt * drop_scale, 0.0)
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            else:
                pdt = pt
            dv = tl.dot(pdt.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)

    out_off = (b * Hkv + hk) * Tk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@_tuned(_BWD_TILES, _BWD_TILES_FP32, _dq_live)
@triton.jit(do_not_specialize=["seed", "TQ_KEY", "TK_KEY"])  # a new seed or length bucket must not recompile
def _attention_bwd_dq_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    Mask,  # (B, H, Tq, Tk) fp32 through broadcast strides; read only when HAS_MASK
    DOut,  # (B, H, Tq, D)
    Lse,  # (B, H, Tq) fp32, contiguous
    Delta,  # (B, H, Tq) fp32, contiguous
    DQ,  # (B, H, Tq, D), contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_db, stride_dh, stride_dm,
    H, Tq, Tk, GROUP,
    scale, window, drop_thresh, drop_scale, seed,
    TQ_KEY, TK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Bytes: q, dout, dq, lse, delta once; K/V once per query tile.
    pid_m, pid_bh = _tile_index(tl.program_id(0), tl.cdiv(Tq, BLOCK_M), CAUSAL)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Mask += b * stride_mb + h * stride_mh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    q_mask = _row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=q_mask,
                 other=0.0)
    row = pid_bh.to(tl.int64) * Tq + offs_m
    lse = tl.load(Lse + row, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked row: p = 0, dq = 0
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, Tk, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < Tk
        kv_mask = _row_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if HAS_MASK:
            s += tl.load(Mask + offs_m[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mn,
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        vis = _visible(offs_m[:, None], cols[None, :], Tk, window, CAUSAL, WINDOW)
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if DROPOUT:
            dp = tl.where(_keep(seed, pid_bh, offs_m[:, None], cols[None, :], drop_thresh), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    tl.store(DQ + pid_bh.to(tl.int64) * Tq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------- decode
@triton.jit
def _decode_split_kernel(
    Q,  # (B, H, Tn, D)
    K,  # (B, Hkv, Tmax, D)
    V,  # (B, Hkv, Tmax, D)
    SeqLens,  # (B,) int32 or int64
    OutPart,  # (B, H, Tn, S, D) fp32, contiguous: each split's normalized partial output
    LsePart,  # (B, H, Tn, S) fp32, contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, Hkv, Tn, Tmax, GROUP, S,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Memory bound: each K/V byte of the first L_b positions is read once per (b, kv head), by exactly one split.
    pid_bhk = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bhk // Hkv).to(tl.int64)
    hk = (pid_bhk % Hkv).to(tl.int64)
    # Clamped so a bad length can never read past the cache (the Python side checks lengths on CPU tensors).
    L = tl.minimum(tl.load(SeqLens + b).to(tl.int32), Tmax)
    # Query rows of this program: r = g * Tn + t for group member g (head hk * GROUP + g) and new token t.
    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < GROUP * Tn
    h = hk * GROUP + r // Tn  # (BLOCK_M,) int64
    t = r % Tn
    pos = L - Tn + t  # absolute position of each query: it sees keys j <= pos
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = _row_mask(r_ok, offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qm + offs_d[None, :], mask=q_mask,
                other=0.0)
    # Equal shares of this sequence's keys, in whole key tiles.
    chunk = tl.cdiv(tl.cdiv(L, S), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = _row_mask(cols < hi, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        s = tl.where((cols[None, :] <= pos[:, None]) & (cols[None, :] < hi), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_sub[:, None])
        alpha = tl.exp(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    row = ((b * H + h) * Tn + t) * S + split  # (BLOCK_M,) int64 index into (B, H, Tn, S)
    tl.store(OutPart + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=q_mask)
    tl.store(LsePart + row, lse, mask=r_ok)


@triton.jit
def _decode_merge_kernel(
    OutPart,  # (B * H * Tn, S, D) fp32, contiguous
    LsePart,  # (B * H * Tn, S) fp32, contiguous
    Out,  # (B * H * Tn, D), contiguous
    S,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # out = sum_s exp(lse_s - lse) * out_s, lse = log sum_s exp(lse_s); empty splits (lse_s = -inf) weigh 0.
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    lse = tl.load(LsePart + row * S + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(w, 0)
    mask = _row_mask(s_ok, offs_d, HEAD_DIM, BLOCK_D)
    o = tl.load(OutPart + (row * S + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ------------------------------------------------------------------------------------------------ launchers

def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, Hkv, Tk, D={D})")
    if k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"attention: the kv head count {k.shape[1]} must divide the query head count {H}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not 16 <= D <= 256 or D % 8:
        raise ValueError(f"attention: head dim {D} not supported by triton; supported: 16..256, multiple of 8")


def _common(q, k, mask, scale, causal, window, dropout_p, seed):
    """(mask tensor, its 4 broadcast strides, positional scalars, constexprs) shared by every launch."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if mask is not None:
        if mask.dtype != torch.float32 or mask.dim() != 4:
            raise ValueError(f"attention: mask must be a 4-D fp32 tensor, got {mask.dtype} {tuple(mask.shape)}")
        m = mask.expand(B, H, Tq, Tk)  # never materialized: stride 0 on the broadcast dims
        mask_strides = tuple(m.stride())
    else:
        m, mask_strides = q, (0, 0, 0, 0)  # a real pointer that HAS_MASK=False never reads
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if window == 0 or window < -1:
        raise ValueError(f"attention: window must be -1 (none) or >= 1, got {window}")
    dropout = dropout_p > 0.0
    windowed = window > 0
    scalars = (
        float(scale), int(window) if windowed else 0,
        round(dropout_p * 2**_DROP_BITS) if dropout else 0, 1.0 / (1.0 - dropout_p) if dropout else 1.0,
        int(seed) if dropout else 0,
        triton.next_power_of_2(max(Tq, 1)), triton.next_power_of_2(max(Tk, 1)),  # TQ_KEY, TK_KEY
    )  # fmt: skip
    consts = dict(
        HEAD_DIM=D, BLOCK_D=max(triton.next_power_of_2(D), 16), CAUSAL=bool(causal) or windowed, WINDOW=windowed,
        HAS_MASK=mask is not None, DROPOUT=dropout, DOT_PREC=_dot_precision(q.dtype),
    )
    return m, mask_strides, scalars, consts


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products (3 tf32 passes on the GPU would also miss 1e-5 on long rows); 16-bit operands
    # ignore the setting, "tf32" is simply Triton's default there.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(t):
    return tuple(t.stride()[:3])


def attention_fwd(q, k, v, mask, scale: float, causal: bool, window: int, dropout_p: float, seed: int):
    """Forward: q (B, H, Tq, D); k, v (B, Hkv, Tk, D); mask None or 4-D fp32 broadcastable to (B, H, Tq, Tk).

    causal: key j visible to query i iff j <= i; window > 0: iff i - window < j <= i (implies causal); -1: none.
    Returns (out (B, H, Tq, D) contiguous in q.dtype, lse (B, H, Tq) fp32; -inf on rows that see nothing).
    """
    _check_qkv(q, k, v)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if B * H * Tq == 0:
        return out, lse
    if Tk == 0:  # no keys: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    m, ms, scalars, consts = _common(q, k, mask, scale, causal, window, dropout_p, seed)

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)

    with device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, m, out, lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *ms, *_strides3(out),
            H, Tq, Tk, H // Hkv, *scalars, **consts, **_meta(),
        )  # fmt: skip
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, mask, scale: float, causal: bool, window: int, dropout_p: float,
                  seed: int):
    """Backward of attention_fwd (same mask/causal/window/dropout/seed). dout, out: (B, H, Tq, D); lse (B, H, Tq).

    Returns (dq (B, H, Tq, D) in q.dtype, dk, dv (B, Hkv, Tk, D) in k.dtype), contiguous; dk/dv are summed over the
    query heads of each GQA group.
    """
    _check_qkv(q, k, v)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    for name, t, shape in (("dout", dout, q.shape), ("out", out, q.shape), ("lse", lse, (B, H, Tq))):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"attention: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    dq = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Tk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Tk, D), dtype=v.dtype, device=v.device)
    if B * H == 0:
        return dq, dk, dv
    if Tq == 0 or Tk == 0:  # no (query, key) pair: the gradients are zero, not placeholders
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, q, k, v, out = (unit_last_stride(t) for t in (dout, q, k, v, out))
    lse = lse.float().contiguous()
    m, ms, scalars, consts = _common(q, k, mask, scale, causal, window, dropout_p, seed)
    block_d = consts["BLOCK_D"]

    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    # 8192 elements per tile (two tiles live: 64 fp32 registers per thread at 8 warps); 16 rows interpreted.
    pre_m = 16 if _INTERPRET else min(128, 8192 // block_d)
    with device_guard(q):
        _attention_bwd_preprocess_kernel[(triton.cdiv(Tq, pre_m) * B * H,)](
            out, dout, delta, *_strides3(out), *_strides3(dout), H, Tq,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_m, num_warps=8,
        )  # fmt: skip

        def grid_kv(meta):
            return (triton.cdiv(Tk, meta["BLOCK_N"]) * B * Hkv,)

        _attention_bwd_dkdv_kernel[grid_kv](
            q, k, v, m, dout, lse, delta, dk, dv,
            *_strides3(q), *_strides3(k), *_strides3(v), *ms, *_strides3(dout),
            H, Hkv, Tq, Tk, H // Hkv, *scalars, **consts, **_meta(),
        )  # fmt: skip

        def grid_q(meta):
            return (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)

        _attention_bwd_dq_kernel[grid_q](
            q, k, v, m, dout, lse, delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *ms, *_strides3(dout),
            H, Tq, Tk, H // Hkv, *scalars, **consts, **_meta(),
        )  # fmt: skip
    return dq, dk, dv



# A split should hold at least this many keys: below it the partial writes and the merge cost more than the
# parallelism gains. A guess, not an H200 measurement.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64


def _num_splits(programs, tmax, device):
    if device.type != "cuda":
        return 3  # interpreter: enough splits to exercise the merge and empty splits
    index = device.index if device.index is not None else torch.cuda.current_device()
    # Aim for two programs per SM.
    want = triton.cdiv(2 * sm_count(index), programs)
    return max(1, min(want, triton.cdiv(tmax, _MIN_KEYS_PER_SPLIT), _MAX_SPLITS))


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale: float, num_splits: int):
    """Flash-decoding. q (B, H, Tn, D): the Tn newest tokens; k_cache, v_cache (B, Hkv, Tmax, D); cache_seqlens (B,)
    int32/int64, the valid length L_b of each cache (new tokens included). Query t sits at position L_b - Tn + t and
    sees keys j <= that position. num_splits <= 0: chosen here. Returns out (B, H, Tn, D) contiguous in q.dtype.
    """
    _check_qkv(q, k_cache, v_cache)
    B, H, Tn, D = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    if tuple(cache_seqlens.shape) != (B,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: cache_seqlens must be ({B},) int32 or int64, got "
                         f"{tuple(cache_seqlens.shape)} {cache_seqlens.dtype}")
    out = torch.empty((B, H, Tn, D), dtype=q.dtype, device=q.device)
    if B * H * Tn == 0:
        return out
    if Tmax == 0:
        return out.zero_()
    q, k, v = unit_last_stride(q), unit_last_stride(k_cache), unit_last_stride(v_cache)
    seqlens = cache_seqlens.contiguous()
    group = H // Hkv
    rows = group * Tn
    block_m = min(max(16, triton.next_power_of_2(rows)), _DECODE_MAX_ROWS)
    row_tiles = triton.cdiv(rows, block_m)
    splits = num_splits if num_splits > 0 else _num_splits(B * Hkv * row_tiles, Tmax, q.device)
    splits = max(1, min(splits, triton.cdiv(Tmax, _DECODE_BLOCK_N)))  # more splits than key tiles would be empty
    out_part = torch.empty((B, H, Tn, splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, Tn, splits), dtype=torch.float32, device=q.device)
    block_d = max(triton.next_power_of_2(D), 16)
    with device_guard(q):
        _decode_split_kernel[(B * Hkv, row_tiles, splits)](
            q, k, v, seqlens, out_part, lse_part,
            *_strides3(q), *_strides3(k), *_strides3(v),
            H, Hkv, Tn, Tmax, group, splits, float(scale),
            HEAD_DIM=D, BLOCK_D=block_d, DOT_PREC=_dot_precision(q.dtype),
            BLOCK_M=block_m, BLOCK_N=_DECODE_BLOCK_N, num_warps=4,
        )  # fmt: skip
        _decode_merge_kernel[(B * H * Tn,)](
            out_part, lse_part, out, splits,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(triton.next_power_of_2(splits), 2), num_warps=4,
        )  # fmt: skip
    return out

