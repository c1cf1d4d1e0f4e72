"""Triton attention: FlashAttention-2 style forward and backward, and split-K flash-decoding.

Layout as torch SDPA: q (B, H, Tq, D); k, v (B, Hkv, Tk, D); query head h reads kv head h // (H // Hkv).
Which keys a query row sees and how its scores are formed is AttnSpec (csrc/kernels/common.h), shared by every
backend. For query row i of head (b, h):
    pos_i = i + offset                       (offset = Tk - Tq when bottom_right, as FlashAttention; else 0, as SDPA)
    key j visible iff (left < 0 or j >= pos_i - left) and (right < 0 or j <= pos_i + right) and j < Tk
                      and mask_ij != -inf    (causal: (left, right) = (-1, 0); a window of w keys: left = w - 1)
    s_ij = scale * <q_i, k_j>
    s_ij = softcap * tanh(s_ij / softcap)    if softcap > 0
    s_ij -= slope_bh * |pos_i - j|           if alibi (fp32 (B, H) slopes, any strides: one scalar load per head)
    s_ij += mask_ij                          if mask (fp32, broadcast to (B, H, Tq, Tk))
    lse_i = log sum_{j visible} exp(s_ij),   p_ij = exp(s_ij - lse_i) on visible keys, 0 on the others
    out_i = sum_j p_ij * keep_ij / (1 - dropout_p) * v_j          (keep_ij = 1 without dropout)

NaN rule. A row with no visible key has out = 0, lse = -inf and zero gradients. A non-finite scale * <q_i, k_j> on
a visible key (inf or NaN in q or k, or an fp32 overflow) poisons row i: out_i, lse_i and dq_i are NaN, and so are
dk_j and dv_j of every key j visible to row i. The forward turns such a score into NaN before the softcap (whose
tanh would turn an inf into +-softcap) and before the online softmax (where a visible -inf would weigh 0 in
silence); NaN and +inf from the mask or the slopes propagate by themselves. Its normalization tests l == 0 for an
empty row, so a NaN sum stays NaN (a test l > 0 would turn it into -inf). The backward tells the cases apart by lse
alone (in the preprocess kernel): -inf is an empty row, anything else non-finite a poisoned one; "not finite" never
means empty. A key invisible to a row gets exactly nothing from it, also from a poisoned row: p = 0 and ds = 0 come
from tl.where, never from exp(-inf - lse) (NaN when lse is NaN), delta is read as 0 on poisoned rows, and an empty
or poisoned row's q is loaded as 0, so a 0 * inf in ds^T q cannot reach dk. Not covered: a non-finite k_j or v_j on a
key invisible to row i still reaches out_i or dq_i through 0 * inf in a tile product (p v, ds k); guarding it
would cost a pass over every K/V tile.

Forward: one program per (BLOCK_M query rows, b, h). K/V tiles stream through an online softmax (running max m,
running sum l, accumulator rescaled by exp(m_old - m_new)); the key loop runs over [lo, hi) of _key_range, the keys
the tile's rows can see given offset, left and right, so tiles outside the window are never visited. Which bounds
exist is a constexpr (HAS_LEFT, HAS_RIGHT), as are softcap, ALiBi, mask and dropout: the plain non-causal kernel
compiles none of their code. Nothing of size Tq x Tk is stored: only out and lse.

Backward recomputes p from lse:
    delta_i = sum_d dout_id * out_id       (preprocess kernel, which also maps lse for the NaN rule, see above)
    dp_ij = <dout_i, v_j> * keep_ij / (1 - dropout_p),  ds_ij = p_ij * (dp_ij - delta_i) * (1 - tanh_ij^2 with softcap)
    dv_j = sum_i p_ij keep_ij / (1 - dropout_p) dout_i,  dk_j = scale sum_i ds_ij q_i,  dq_i = scale sum_j ds_ij k_j
  dK/dV kernel: one program per (BLOCK_N keys, b, kv head), looping over the query heads of its GQA group and
  the query tiles of _query_range, so the sum over the group happens in registers. dQ kernel: one program per
  (BLOCK_M rows, b, h), looping over key tiles. Both recompute s = q k^T (7 tile matmuls instead of the 5 of a single
  kernel with atomic dq adds): in exchange the gradients are deterministic, bit for bit, run to run.

fp32 precision. The exponent is formed in the natural domain and rounded once: exp(s - m) and exp(s - lse), with
s - m an fp32 subtraction of the finished scores (on the GPU tl.exp is ex2.approx((s - m) * log2e): one more rounding
of the difference only). The exp2 idiom (scores, mask and lse each pre-multiplied by log2e) would round each of them
on its own. With softcap, scale / softcap is folded into one constant, and tanh is libdevice's (2 ulp; tanh.approx,
2^-11, would miss the fp32 bound); the interpreter has no libdevice and uses _common.tanh's exp formula and series.

Dropout: keep_ij is a function of (seed, b, h, i, j) only: Philox4x32-10 (tl.philox, the generator behind
tl.rand) keyed by the seed with the counter (j, i, b * H + h, 0), so any tile shape or loop order, forward or
backward, regenerates the same decision. keep iff the top 24 bits of the first output word are
>= round(dropout_p * 2^24).

Varlen (VARLEN, FlashAttention's varlen kernels): packed q (total_q, H, D), k, v (total_k, Hkv, D) with int32 offsets
cu_q, cu_k (nseq + 1,); sequence b holds rows cu_q[b] .. cu_q[b + 1] - 1 and keys cu_k[b] .. cu_k[b + 1] - 1. The
grids are the dense ones with B = nseq and T = max_seqlen: program (tile, b, h) loads q0 = cu_q[b], Tq = cu_q[b + 1]
- q0 (k0, Tk likewise), exits at once when its tile starts at or past its sequence's end, and otherwise runs the
dense code on the sequence alone: Q, Out, DOut, DQ moved by q0 rows, K, V, DK, DV by k0 rows (a packed tensor is
(1, H, total, D) with row stride H * D and batch stride 0), and Tq, Tk and the bottom-right offset Tk - Tq are the
sequence's own wherever the dense kernel uses them (visibility, key and query ranges, bounds). So the work is that of
the real tokens, sum_b Tq_b * Tk_b per head, not nseq * max_q * max_k; an idle program costs four loads. lse and
delta are (H, total_q), FlashAttention's varlen layout. The backward's preprocess kernel needs no boundaries (delta is
per row): it runs dense, as one batch of total_q rows. Dropout's counter is (j, i, b * H + h) with b the sequence and
i, j positions within it, in the forward and the backward alike. With VARLEN=False (dense calls) none of this is
compiled; their constexprs and launch shapes are unchanged.

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
from gptkernels.triton._common import tanh as _tanh

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
# to powers of two (a new exact length must not re-tune: decoding and packed batches vary it every call; varlen: the
# max_seqlen values) and the masking, score and varlen variant, which changes the work per tile.
_KEY = ["BLOCK_D", "TQ_KEY", "TK_KEY", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_MASK", "DROPOUT",
        "VARLEN"]
# A new seed, length bucket or alignment offset (chunked prefill moves it every call) must not recompile; the window
# bounds only enter index compares, where Triton's divisibility specialization buys nothing.
_NO_SPECIALIZE = ["seed", "TQ_KEY", "TK_KEY", "offset", "left", "right"]
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
def _visible(rows, cols, Tq, Tk, offset, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    # rows, cols: broadcastable index tiles (i as a column and j as a row, or the transpose in the dK/dV kernel).
    # Only the bounds that exist are compiled in: the plain kernel tests i < Tq and j < Tk (the ragged last tiles).
    # Rows past Tq must be invisible too: the dK/dV kernel sums p over them, and a NaN key would give them
    # exp(NaN - lse) = NaN (their q loads as 0, but 0 * NaN is NaN).
    ok = (cols < Tk) & (rows < Tq)
    pos = rows + offset
    if HAS_RIGHT:
        ok = ok & (cols <= pos + right)
    if HAS_LEFT:
        ok = ok & (cols >= pos - left)
    return ok


@triton.jit
def _scores(qk, rows, cols, Tq, Tk, offset, left, right, qk_scale, softcap, slope, Mask, stride_mm, stride_mn,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
            HAS_MASK: tl.constexpr, POISON: tl.constexpr):
    """(s, t, visible) of AttnSpec for the tile qk = <q_i, k_j> (fp32) with index tiles rows (i) and cols (j).

    s is left as computed on invisible entries (the caller masks it). qk_scale is scale, or scale / softcap with
    softcap (one rounding instead of two); t = tanh(qk * qk_scale) then, for the backward's 1 - t^2. POISON (forward
    only): a non-finite qk * qk_scale becomes NaN, so neither tanh nor a weight of exp(-inf) = 0 hides it; the
    backward needs no such test, lse carries the verdict.
    """
    s = qk * qk_scale
    if POISON:
        # s * 0 is NaN for +-inf and NaN and 0 otherwise: one FMA, where a compare and a select would be two. No
        # fast-math flag lets LLVM or ptxas fold x * 0 to 0 (the SASS of the plain fp16 kernel has the FFMA).
        s = s + s * 0.0
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s)
        s = softcap * t
    vis = _visible(rows, cols, Tq, Tk, offset, left, right, HAS_LEFT, HAS_RIGHT)
    if HAS_ALIBI:
        s -= slope * tl.abs(rows + offset - cols).to(tl.float32)
    if HAS_MASK:
        mval = tl.load(Mask + rows.to(tl.int64) * stride_mm + cols * stride_mn, mask=(rows < Tq) & (cols < Tk),
                       other=0.0)
        # -inf is "invisible", whatever s is (s may be NaN on a poisoned row: -inf + NaN must not be its score).
        vis = vis & (mval != float("-inf"))
        s += mval
    return s, t, vis


@triton.jit
def _row_stats(LseBwd, Delta, idx, ok):
    """(lse, delta, live) of the query rows idx, as the preprocess kernel left them (+inf: no visible key, NaN:
    poisoned). live (finite lse): the rows whose q is read; the others load q = 0, which changes no p (lse decides)
    and keeps 0 * inf out of dk = ds^T q. Rows past Tq read as empty."""
    lse = tl.load(LseBwd + idx, mask=ok, other=float("inf"))
    delta = tl.load(Delta + idx, mask=ok, other=0.0)
    return lse, delta, tl.abs(lse) < float("inf")


@triton.jit
def _keep(seed, bh, rows, cols, drop_thresh):
    # Philox counter (j, i, b * H + h, 0): a pure function of the element, whatever the tile layout.
    c1 = rows + cols * 0
    c0 = cols + rows * 0
    c2 = c1 * 0 + bh
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c1 * 0)
    return (r >> 8).to(tl.int32) >= drop_thresh


@triton.jit
def _key_range(start_m, Tq, Tk, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of the keys that query rows start_m .. start_m + BLOCK_M - 1 (< Tq) can see; lo is tile aligned.
    Empty (hi <= lo) when none of them sees a key."""
    lo = 0
    hi = Tk
    if HAS_RIGHT:
        hi = tl.minimum(Tk, tl.minimum(start_m + BLOCK_M, Tq) + offset + right)  # last row's pos + right + 1
    if HAS_LEFT:
        lo = tl.maximum(start_m + offset - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, Tq, Tk, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of the query rows that see any of keys start_n .. start_n + BLOCK_N - 1 (< Tk); lo is tile
    aligned. Row i sees key j only if pos_i >= j - right and pos_i <= j + left."""
    lo = 0
    hi = Tq
    if HAS_RIGHT:
        lo = tl.maximum(start_n - right - offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(Tq, tl.minimum(start_n + BLOCK_N, Tk) + left - offset)  # last key + left - offset + 1
    return lo, hi


@triton.jit
def _tile_index(pid, n_tiles, LATE_HEAVY: tl.constexpr):
    # Consecutive programs share a head (its K/V stay in L2). With a right bound (causal) and no left one, the last
    # query tiles see the most keys: schedule them first so the short ones fill the tail of the wave.
    t = pid % n_tiles
    if LATE_HEAVY:
        t = n_tiles - 1 - t
    return t, pid // n_tiles


@triton.jit
def _seq_span(CuQ, CuK, b, bottom_right):
    """VARLEN: (Tq, Tk, offset, q0, k0) of packed sequence b: its lengths, its alignment offset (bottom_right is 0 or
    1: Tk - Tq of this sequence, or 0) and its first rows, int64 as they multiply row strides."""
    q0 = tl.load(CuQ + b)
    k0 = tl.load(CuK + b)
    Tq = tl.load(CuQ + b + 1) - q0
    Tk = tl.load(CuK + b + 1) - k0
    return Tq, Tk, bottom_right * (Tk - Tq), q0.to(tl.int64), k0.to(tl.int64)


# -------------------------------------------------------------------------------------------------- forward
@_tuned(_FWD_TILES, _FWD_TILES_FP32, _fwd_live)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attention_fwd_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    Mask,  # (B, H, Tq, Tk) fp32 through broadcast strides; read only when HAS_MASK
    Alibi,  # (B, H) fp32 slopes, any strides; read only when HAS_ALIBI
    CuQ,  # (B + 1,) int32 query offsets; read only when VARLEN
    CuK,  # (B + 1,) int32 key offsets; read only when VARLEN
    Out,  # (B, H, Tq, D)
    Lse,  # (B, H, Tq) fp32, contiguous (varlen: (H, total_q))
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_ob, stride_oh, stride_om,
    stride_lh,  # VARLEN: lse's head stride, total_q
    H, Tq, Tk, GROUP,
    offset, left, right, qk_scale, softcap, drop_thresh, drop_scale, seed,
    TQ_KEY, TK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Bytes: q, out and lse once; K/V once per query tile (from L2 for the neighbours of a head).
    pid_m, pid_bh = _tile_index(tl.program_id(0), tl.cdiv(Tq, BLOCK_M), HAS_RIGHT and not HAS_LEFT)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    if VARLEN:
        Tq, Tk, offset, q0, k0 = _seq_span(CuQ, CuK, b, offset)
        if start_m >= Tq:
            return
        Q += q0 * stride_qm
        K += k0 * stride_kn
        V += k0 * stride_vn
        Out += q0 * stride_om
        Lse += h * stride_lh + q0
    else:
        Lse += pid_bh.to(tl.int64) * Tq
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Out += b * stride_ob + h * stride_oh
    Mask += b * stride_mb + h * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h * stride_ah)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=_row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D),
                other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, Tq, Tk, offset, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = _row_mask(cols < Tk, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s, _, vis = _scores(qk, offs_m[:, None], cols[None, :], Tq, Tk, offset, left, right, qk_scale, softcap, slope,
                            Mask, stride_mm, stride_mn, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_MASK, True)
        s = tl.where(vis, s, float("-inf"))
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

    # Empty means l == 0 exactly: a poisoned row's NaN l is not empty, and its out and lse stay NaN.
    empty = l_i == 0.0
    out = acc * (drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=_row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D))
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(Lse + offs_m, lse, mask=m_ok)


# ------------------------------------------------------------------------------------------------- backward
@triton.jit
def _attention_bwd_preprocess_kernel(
    Out,  # (B, H, Tq, D)
    DOut,  # (B, H, Tq, D)
    Lse,  # (B, H, Tq) fp32, contiguous: the forward's
    Delta,  # (B, H, Tq) fp32, contiguous
    LseBwd,  # (B, H, Tq) fp32, contiguous: lse as the dK/dV and dQ kernels read it
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # Reads out and dout once, lse once; writes 8 bytes per row. Each row is judged here, once, by its lse alone:
    # -inf (no visible key) becomes +inf, so exp(s - lse) = 0 on every key; any other non-finite value (NaN: a
    # poisoned row) becomes NaN, so p = NaN on the row's visible keys, and its delta 0, so ds = p * (dp - delta) stays
    # exactly 0 where tl.where made p = 0 ("not finite" never means "empty"). Done in the dK/dV kernel, these
    # selects would run once per key tile for every query row.
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
    row = pid_bh.to(tl.int64) * Tq + offs_m
    lse = tl.load(Lse + row, mask=m_ok, other=0.0)
    live = tl.abs(lse) < float("inf")
    delta = tl.where(live, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), 0.0)
    tl.store(Delta + row, delta, mask=m_ok)
    tl.store(LseBwd + row, tl.where(live, lse, tl.where(lse == float("-inf"), float("inf"), float("nan"))), mask=m_ok)


@_tuned(_BWD_TILES, _BWD_TILES_FP32, _dkdv_live)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    Mask,  # (B, H, Tq, Tk) fp32 through broadcast strides; read only when HAS_MASK
    Alibi,  # (B, H) fp32 slopes, any strides; read only when HAS_ALIBI
    CuQ,  # (B + 1,) int32 query offsets; read only when VARLEN
    CuK,  # (B + 1,) int32 key offsets; read only when VARLEN
    DOut,  # (B, H, Tq, D)
    Lse,  # (B, H, Tq) fp32, contiguous (varlen: (H, total_q)): the preprocess kernel's LseBwd
    Delta,  # (B, H, Tq) fp32, the layout of Lse
    DK,  # (B, Hkv, Tk, D), strides in units of D (see the store)
    DV,  # (B, Hkv, Tk, D), the strides of DK
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_db, stride_dh, stride_dm,
    stride_lh,  # VARLEN: lse's head stride, total_q
    stride_dkb, stride_dkh, stride_dkn,
    H, Hkv, Tq, Tk, GROUP,
    offset, left, right, qk_scale, softcap, scale, drop_thresh, drop_scale, seed,
    TQ_KEY, TK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Scores are formed transposed, (BLOCK_N keys, BLOCK_M queries), so dv += p^T dout and dk += ds^T q need no
    # transpose of a register tile. Bytes: K/V, dK/dV once; q, dout, lse, delta once per key tile and group head.
    pid_n = tl.program_id(0) % tl.cdiv(Tk, BLOCK_N)
    pid_bhk = tl.program_id(0) // tl.cdiv(Tk, BLOCK_N)
    b = (pid_bhk // Hkv).to(tl.int64)
    hk = (pid_bhk % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    if VARLEN:
        Tq, Tk, offset, q0, k0 = _seq_span(CuQ, CuK, b, offset)
        if start_n >= Tk:
            return
        Q += q0 * stride_qm
        DOut += q0 * stride_dm
        Lse += q0
        Delta += q0
        K += k0 * stride_kn
        V += k0 * stride_vn
        DK += k0 * stride_dkn * HEAD_DIM
        DV += k0 * stride_dkn * HEAD_DIM
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
    lo, hi = _query_range(start_n, Tq, Tk, offset, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h  # int64
        if VARLEN:
            lse_row = h * stride_lh
        else:
            lse_row = bh * Tq
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DOut + b * stride_db + h * stride_dh
        Mh = Mask + b * stride_mb + h * stride_mh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + b * stride_ab + h * stride_ah)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < Tq
            lse, delta, live = _row_stats(Lse, Delta, lse_row + offs_m, m_ok)
            q = tl.load(Qh + offs_m[:, None] * stride_qm + offs_d[None, :], other=0.0,
                        mask=_row_mask(live, offs_d, HEAD_DIM, BLOCK_D))
            do = tl.load(DOh + offs_m[:, None] * stride_dm + offs_d[None, :], other=0.0,
                         mask=_row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D))
            qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            st, tt, vis = _scores(qkt, offs_m[None, :], offs_n[:, None], Tq, Tk, offset, left, right, qk_scale,
                                  softcap, slope, Mh, stride_mm, stride_mn, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                  HAS_ALIBI, HAS_MASK, False)
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
            if HAS_SOFTCAP:
                dst = dst * (1.0 - tt * tt)
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)

    # Strides in units of D (the launchers allocate the gradients, so each stride is a multiple of D): the compiler
    # then still sees D-aligned rows. Element strides hid that for D = 40 (40 is not a multiple of 16, Triton's
    # divisibility hint): the fp32 kernel at 32 x 32 tiles went from 155 to 212 registers and 3336 to 4336 SASS
    # instructions (compiled ahead of time for sm_90, ptxas of Triton 3.8); in units of D both stay at 155 / 3336.
    out_off = (b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@_tuned(_BWD_TILES, _BWD_TILES_FP32, _dq_live)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attention_bwd_dq_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    Mask,  # (B, H, Tq, Tk) fp32 through broadcast strides; read only when HAS_MASK
    Alibi,  # (B, H) fp32 slopes, any strides; read only when HAS_ALIBI
    CuQ,  # (B + 1,) int32 query offsets; read only when VARLEN
    CuK,  # (B + 1,) int32 key offsets; read only when VARLEN
    DOut,  # (B, H, Tq, D)
    Lse,  # (B, H, Tq) fp32, contiguous (varlen: (H, total_q)): the preprocess kernel's LseBwd
    Delta,  # (B, H, Tq) fp32, the layout of Lse
    DQ,  # (B, H, Tq, D), strides in units of D (see the dK/dV kernel's store)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_db, stride_dh, stride_dm,
    stride_lh,  # VARLEN: lse's head stride, total_q
    stride_dqb, stride_dqh, stride_dqm,
    H, Tq, Tk, GROUP,
    offset, left, right, qk_scale, softcap, scale, drop_thresh, drop_scale, seed,
    TQ_KEY, TK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Bytes: q, dout, dq, lse, delta once; K/V once per query tile.
    pid_m, pid_bh = _tile_index(tl.program_id(0), tl.cdiv(Tq, BLOCK_M), HAS_RIGHT and not HAS_LEFT)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    if VARLEN:
        Tq, Tk, offset, q0, k0 = _seq_span(CuQ, CuK, b, offset)
        if start_m >= Tq:
            return
        Q += q0 * stride_qm
        DOut += q0 * stride_dm
        Lse += q0
        Delta += q0
        DQ += q0 * stride_dqm * HEAD_DIM
        K += k0 * stride_kn
        V += k0 * stride_vn
        lse_row = h * stride_lh
    else:
        lse_row = pid_bh.to(tl.int64) * Tq
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Mask += b * stride_mb + h * stride_mh
    DQ += (b * stride_dqb + h * stride_dqh) * HEAD_DIM
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h * stride_ah)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    q_mask = _row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
    lse, delta, live = _row_stats(Lse, Delta, lse_row + offs_m, m_ok)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], other=0.0,
                mask=_row_mask(live, offs_d, HEAD_DIM, BLOCK_D))
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=q_mask,
                 other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, Tq, Tk, offset, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = _row_mask(cols < Tk, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s, t, vis = _scores(qk, offs_m[:, None], cols[None, :], Tq, Tk, offset, left, right, qk_scale, softcap, slope,
                            Mask, stride_mm, stride_mn, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_MASK, False)
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if DROPOUT:
            dp = tl.where(_keep(seed, pid_bh, offs_m[:, None], cols[None, :], drop_thresh), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    tl.store(DQ + offs_m[:, None] * stride_dqm * HEAD_DIM + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


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

def _check_qkv(q, k, v, varlen=False):
    """Dense inputs are 4-D (B, H, T, D); varlen ones 3-D packed (total, H, D)."""
    nd, layout = (3, "(total, H, D)") if varlen else (4, "(B, H, T, D)")
    if q.dim() != nd or k.dim() != nd or v.dim() != nd:
        raise ValueError(f"attention: q, k, v must be {nd}-D {layout}, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    H, D = q.shape[1], q.shape[-1]
    if varlen and (k.shape != v.shape or k.shape[2] != D):
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be (total_k, Hkv, D={D})")
    if not varlen and (k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != D):
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={q.shape[0]}, Hkv, Tk, "
                         f"D={D})")
    if (k.shape[1] < 1 or H % k.shape[1]) and not H == k.shape[1] == 0:
        raise ValueError(f"attention: the kv head count {k.shape[1]} must divide the query head count {H}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not 16 <= D <= 256 or D % 8:
        raise ValueError(f"attention: head dim {D} not supported by triton; supported: 16..256, multiple of 8")


def _check_cu(q, cu_q, cu_k, max_q, max_k):
    for name, cu in (("cu_q", cu_q), ("cu_k", cu_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1 or cu.device != q.device:
            raise ValueError(f"attention_varlen: {name} must be 1-D int32 (nseq + 1,) offsets on {q.device}, got "
                             f"{cu.dtype} {tuple(cu.shape)} on {cu.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"attention_varlen: cu_q {tuple(cu_q.shape)} and cu_k {tuple(cu_k.shape)} must describe "
                         f"the same sequences")
    if max_q < 0 or max_k < 0:
        raise ValueError(f"attention_varlen: max_q {max_q} and max_k {max_k} must be >= 0")


def _common(q, k, mask, alibi, window_left, window_right, bottom_right, scale, softcap, dropout_p, seed, varlen=None):
    """What every launch shares: (tensor args Mask, Alibi and their strides, the AttnSpec scalars (offset, left,
    right, qk_scale, softcap), the trailing scalars (dropout, seed, autotune length keys), constexprs).

    varlen: (nseq, max_q, max_k) for packed q (total_q, H, D), k (total_k, Hkv, D). Then B is nseq, the length keys
    are the max lengths', and offset is the bottom-right flag 0 / 1: the kernels form Tk - Tq per sequence."""
    if varlen is None:
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        offset = Tk - Tq if bottom_right else 0
    else:
        (B, Tq, Tk), (H, D) = varlen, q.shape[1:]
        offset = int(bool(bottom_right))
    if mask is not None:
        if mask.dtype != torch.float32 or mask.dim() != 4:
            raise ValueError(f"attention: mask must be a 4-D fp32 tensor, got {mask.dtype} {tuple(mask.shape)}")
        m = mask.expand(B, H, Tq, Tk)  # never materialized: stride 0 on the broadcast dims
        mask_strides = tuple(m.stride())
    else:
        m, mask_strides = q, (0, 0, 0, 0)  # a real pointer that HAS_MASK=False never reads
    if alibi is not None:
        if alibi.dtype != torch.float32 or tuple(alibi.shape) != (B, H) or alibi.device != q.device:
            raise ValueError(f"attention: alibi must be fp32 ({B}, {H}) slopes on {q.device}, got {alibi.dtype} "
                             f"{tuple(alibi.shape)} on {alibi.device}")
        a, alibi_strides = alibi, tuple(alibi.stride())  # one load per head: any strides, 0 (shared slopes) included
    else:
        a, alibi_strides = q, (0, 0)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if not softcap >= 0.0:  # NaN fails too
        raise ValueError(f"attention: softcap must be >= 0 (0: none), got {softcap}")
    left, right = int(window_left), int(window_right)
    dropout = dropout_p > 0.0
    spec = (
        offset, max(left, 0), max(right, 0),  # offset, left, right
        float(scale) / float(softcap) if softcap > 0 else float(scale), float(softcap),  # qk_scale, softcap
    )  # fmt: skip
    tail = (
        round(dropout_p * 2**_DROP_BITS) if dropout else 0, 1.0 / (1.0 - dropout_p) if dropout else 1.0,
        int(seed) if dropout else 0,
        triton.next_power_of_2(max(Tq, 1)), triton.next_power_of_2(max(Tk, 1)),  # TQ_KEY, TK_KEY
    )  # fmt: skip
    consts = dict(
        HEAD_DIM=D, BLOCK_D=max(triton.next_power_of_2(D), 16), HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None, HAS_MASK=mask is not None, DROPOUT=dropout,
        VARLEN=varlen is not None, DOT_PREC=_dot_precision(q.dtype),
    )
    return (m, a), mask_strides + alibi_strides, spec, tail, consts


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products (3 tf32 passes on the GPU would also miss 1e-5 on long rows); 16-bit operands
    # ignore the setting, "tf32" is simply Triton's default there.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(t):
    return tuple(t.stride()[:3])


def _packed(t):
    """(b, h, row) strides of a packed (total, H, D) tensor, seen as (1, H, total, D): the batch stride is 0, the
    kernels reach sequence b through its offset in cu_seqlens."""
    return 0, t.stride(1), t.stride(0)


def attention_fwd(q, k, v, mask, alibi, scale: float, window_left: int, window_right: int, bottom_right: bool,
                  softcap: float, dropout_p: float, seed: int):
    """Forward of AttnSpec (module docstring). q (B, H, Tq, D); k, v (B, Hkv, Tk, D); mask None or 4-D fp32
    broadcastable to (B, H, Tq, Tk) (-inf: invisible); alibi None or fp32 (B, H) slopes (stride 0 allowed).

    window_left, window_right: the (left, right) bounds, < 0 for none (causal: -1, 0); bottom_right: pos_i = i + Tk
    - Tq instead of i. softcap: 0 for none. dropout_p in [0, 1) with its Philox seed.
    Returns (out (B, H, Tq, D) contiguous in q.dtype, lse (B, H, Tq) fp32, natural log; -inf on rows that see
    nothing, NaN on poisoned rows).
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
    ptrs, strides, spec, tail, consts = _common(q, k, mask, alibi, window_left, window_right, bottom_right, scale,
                                                softcap, dropout_p, seed)

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)

    with device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, *ptrs, q, q, out, lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *strides, *_strides3(out), 0,
            H, Tq, Tk, H // Hkv, *spec, *tail, **consts, **_meta(),
        )  # fmt: skip
    return out, lse


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, common, scale, dims, pre_rows, strides_of):
    """The backward's three launches, shared by attention_bwd and attention_varlen_bwd. dims: (B, H, Hkv, Tq, Tk) as
    the grids see them (varlen: nseq and the max lengths). pre_rows: (B, Tq) of the preprocess kernel's dense view
    of out, dout and lse (varlen: 1 batch of total_q rows, delta needs no sequence boundaries). strides_of: the
    (b, h, row) strides of q, k, v, dout and the gradients as the kernels index them."""
    ptrs, strides, spec, tail, consts = common
    B, H, Hkv, Tq, Tk = dims
    D = consts["HEAD_DIM"]
    scalars = (*spec, float(scale), *tail)
    block_d = consts["BLOCK_D"]
    lse = lse.float().contiguous()
    delta = torch.empty_like(lse)
    lse_bwd = torch.empty_like(lse)
    # 8192 elements per tile (two tiles live: 64 fp32 registers per thread at 8 warps); 16 rows interpreted.
    pre_m = 16 if _INTERPRET else min(128, 8192 // block_d)
    with device_guard(q):
        _attention_bwd_preprocess_kernel[(triton.cdiv(pre_rows[1], pre_m) * pre_rows[0] * H,)](
            out, dout, lse, delta, lse_bwd, *strides_of(out), *strides_of(dout), H, pre_rows[1],
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_m, num_warps=8,
        )  # fmt: skip
        inputs = (*strides_of(q), *strides_of(k), *strides_of(v), *strides, *strides_of(dout), pre_rows[1])

        def grid_kv(meta):
            return (triton.cdiv(Tk, meta["BLOCK_N"]) * B * Hkv,)

        _attention_bwd_dkdv_kernel[grid_kv](
            q, k, v, *ptrs, cu_q, cu_k, dout, lse_bwd, delta, dk, dv, *inputs, *(s // D for s in strides_of(dk)),
            H, Hkv, Tq, Tk, H // Hkv, *scalars, **consts, **_meta(),
        )  # fmt: skip

        def grid_q(meta):
            return (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)

        _attention_bwd_dq_kernel[grid_q](
            q, k, v, *ptrs, cu_q, cu_k, dout, lse_bwd, delta, dq, *inputs, *(s // D for s in strides_of(dq)),
            H, Tq, Tk, H // Hkv, *scalars, **consts, **_meta(),
        )  # fmt: skip
    return dq, dk, dv


def attention_bwd(dout, q, k, v, out, lse, mask, alibi, scale: float, window_left: int, window_right: int,
                  bottom_right: bool, softcap: float, dropout_p: float, seed: int):
    """Backward of attention_fwd (the same mask, alibi, scale, window, alignment, softcap, dropout and seed).
    dout, out: (B, H, Tq, D); lse (B, H, Tq), as attention_fwd returned it (it tells empty rows from poisoned ones).

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
    common = _common(q, k, mask, alibi, window_left, window_right, bottom_right, scale, softcap, dropout_p, seed)
    return _bwd(dout, q, k, v, out, lse, dq, dk, dv, q, q, common, scale, (B, H, Hkv, Tq, Tk), (B, Tq), _strides3)


def _varlen_alibi(alibi, nseq, H):
    # (H,) or (1, H) slopes shared by every sequence: stride 0 over the sequences, as the kernels read (B, H).
    if alibi is None or (alibi.dim() == 2 and alibi.shape[0] == nseq):
        return alibi
    return alibi.reshape(-1, H).expand(nseq, H) if alibi.numel() == H else alibi


def attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q: int, max_k: int, alibi, scale: float, window_left: int,
                         window_right: int, bottom_right: bool, softcap: float, dropout_p: float, seed: int):
    """attention_fwd on packed sequences: q (total_q, H, D); k, v (total_k, Hkv, D); cu_q, cu_k (nseq + 1,) int32
    offsets (sequence b holds query rows cu_q[b] .. cu_q[b + 1] - 1 and keys cu_k[b] .. cu_k[b + 1] - 1, and sees
    nothing of the others); max_q, max_k >= every sequence's lengths (they size the grid; not checked here: a
    longer sequence would keep rows unwritten). alibi None or fp32 (H,) or (nseq, H). bottom_right aligns each
    sequence on its own Tk - Tq. Dropout's keep_ij is keyed by (seed, b, h, i, j) with b the sequence and i, j the
    positions in it.

    Returns (out (total_q, H, D) contiguous in q.dtype, lse (H, total_q) fp32, FlashAttention's varlen layout).
    """
    _check_qkv(q, k, v, varlen=True)
    _check_cu(q, cu_q, cu_k, max_q, max_k)
    (total_q, H, D), (total_k, Hkv) = q.shape, k.shape[:2]
    nseq = cu_q.numel() - 1
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()  # the kernels read offset b at cu + b
    out = torch.empty((total_q, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if total_k == 0:  # no keys: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    ptrs, strides, spec, tail, consts = _common(q, k, None, _varlen_alibi(alibi, nseq, H), window_left, window_right,
                                                bottom_right, scale, softcap, dropout_p, seed, (nseq, max_q, max_k))

    def grid(meta):
        return (triton.cdiv(max_q, meta["BLOCK_M"]) * nseq * H,)

    with device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, *ptrs, cu_q, cu_k, out, lse,
            *_packed(q), *_packed(k), *_packed(v), *strides, *_packed(out), total_q,
            H, max_q, max_k, H // Hkv, *spec, *tail, **consts, **_meta(),
        )  # fmt: skip
    return out, lse


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, alibi, scale: float,
                         window_left: int, window_right: int, bottom_right: bool, softcap: float, dropout_p: float,
                         seed: int):
    """Backward of attention_varlen_fwd (the same offsets, lengths, alibi, window, alignment, softcap, dropout and
    seed). dout, out: (total_q, H, D); lse (H, total_q) as the forward returned it.

    Returns (dq (total_q, H, D), dk, dv (total_k, Hkv, D)), contiguous, packed as the inputs; dk/dv are summed over
    the query heads of each GQA group.
    """
    _check_qkv(q, k, v, varlen=True)
    _check_cu(q, cu_q, cu_k, max_q, max_k)
    (total_q, H, D), (total_k, Hkv) = q.shape, k.shape[:2]
    nseq = cu_q.numel() - 1
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    for name, t, shape in (("dout", dout, q.shape), ("out", out, q.shape), ("lse", lse, (H, total_q))):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"attention_varlen: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    dq = torch.empty((total_q, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((total_k, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((total_k, Hkv, D), dtype=v.dtype, device=v.device)
    if H == 0:
        return dq, dk, dv
    if total_q == 0 or total_k == 0:  # no (query, key) pair: the gradients are zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, q, k, v, out = (unit_last_stride(t) for t in (dout, q, k, v, out))
    common = _common(q, k, None, _varlen_alibi(alibi, nseq, H), window_left, window_right, bottom_right, scale,
                     softcap, dropout_p, seed, (nseq, max_q, max_k))
    return _bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, common, scale, (nseq, H, Hkv, max_q, max_k),
                (1, total_q), _packed)

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

