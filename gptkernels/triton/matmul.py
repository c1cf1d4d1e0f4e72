"""Triton matmul with fused FFN epilogues: y = epilogue(a @ b), one kernel, fp32 accumulate.

a: (M, K), b: (K, N), any strides (a transposed weight, an expanded dy with row stride 0). Every (M, N) output is
allocated here, contiguous; the epilogue works on the fp32 accumulator tile while it is still in registers:

    EPI_ACT     y = act(acc + bias) + residual; with save_pre also pre = acc + bias (the fc of the GPT-2 MLP: pre is
                what backward saves, act(pre) what proj reads: two outputs, one pass). act "none": proj's
                y = acc + b_proj + residual.
    EPI_DACT    acc = dy @ W_proj (the grad of act's output); reads pre and writes dpre = acc * act'(pre), optionally
                act(pre) (dW_proj needs it; recomputed instead of saved) and per-row-block fp32 column sums of dpre
                (db_fc = their torch sum: deterministic, no atomics).
    EPI_SWIGLU  two accumulators over the same a tile: g = a @ b_gate, u = a @ b_up; writes g, u (saved for
                backward) and p = silu(g) * u.
    EPI_DSWIGLU acc = dy @ W_down = dp; reads g, u, writes dg, du and optionally p (dW_down needs it).

Rounding: pre, g and u are rounded to the output dtype before the activation sees them, so forward and backward
(which reads the rounded, saved values) differentiate the same function, as eager does.

fp32 inputs use input_precision="ieee" (full fp32 FMA dots), never tf32: the tests hold fp32 to the 1e-5 bound
(HOUSE_STYLE), which tf32's 10-bit mantissa does not meet. 16-bit inputs run on the tensor cores.

On a GPU the tile is autotuned over a few configs (key: N, K, the epilogue and M rounded up to a power of two, so
a training loop with varying token counts does not retune every step); under TRITON_INTERPRET=1 one small config
runs. Offsets are 64-bit.
"""


import torch
import triton
import triton.language as tl

from gptkernels.triton._common import interpreting, on_tensor_device
from gptkernels.triton.mlp import ACTIVATIONS, _act_and_grad, _act_bwd, _sigmoid

EPI_ACT, EPI_DACT, EPI_SWIGLU, EPI_DSWIGLU = 0, 1, 2, 3
ACT_NONE = -1
_ACT_CODES = {"none": ACT_NONE, **ACTIVATIONS}
_MIN_BLOCK_M = 16  # the smallest BLOCK_M of any config: sizes the dbias partial buffer


def _configs():
    if interpreting():
        # The interpreter runs each program as numpy ops: few, large-ish tiles are fastest there.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4,
                              num_stages=1)]
    # sm_80 / sm_90 candidates (the Triton tutorial's families plus small-M tiles for decode-sized M). Not yet
    # timed on a GPU: the autotuner picks among them; configs that exceed shared memory (fp32, dual-B SwiGLU)
    # fail to compile and are skipped by the autotuner. fp32 operands try only the small tiles (_prune).
    cfg = [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 64, 64, 5, 2),
        (16, 64, 128, 4, 4),
        (32, 32, 32, 3, 4),  # fits ~100 KB of shared memory (sm_86/89) even for fp32 SwiGLU's two B tiles
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in cfg]


# fp32 ("ieee") dots run as FMAs on the CUDA cores: a 128x256x64 tile of them is never the fastest config, and
# compiling one such variant can take minutes, which the autotuner would pay for every (M_BUCKET, N, K, EPI).
_FP32_MAX_TILE = 64 * 64
_FP32_MAX_BLOCK_K = 64


def _prune(configs, named_args, **kwargs):
    """early_config_prune: fp32 operands keep only the small tiles (<= 64x64, BLOCK_K <= 64); 16-bit keep all."""
    ieee = kwargs.get("IEEE", named_args.get("IEEE"))
    if ieee is None:
        a = named_args.get("A", kwargs.get("A"))
        ieee = getattr(a, "dtype", None) == torch.float32
    if not ieee:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _FP32_MAX_TILE
             and c.kwargs["BLOCK_K"] <= _FP32_MAX_BLOCK_K]
    return small or configs[-1:]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "EPI"], reset_to_zero=["DBias"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _matmul_kernel(
    A,  # (M, K)
    B,  # (K, N)
    B2,  # (K, N) b_up, strides of B; read only when EPI == EPI_SWIGLU
    Y,  # (M, N) contiguous: the main output
    Out1,  # (M, N) contiguous: pre (EPI_ACT), act(pre) (EPI_DACT), g (EPI_SWIGLU), du (EPI_DSWIGLU)
    Out2,  # (M, N) contiguous: u (EPI_SWIGLU), p (EPI_DSWIGLU)
    Aux1,  # (M, N) contiguous: pre (EPI_DACT), g (EPI_DSWIGLU)
    Aux2,  # (M, N) contiguous: u (EPI_DSWIGLU)
    Bias,  # (N,)
    R,  # (M, N) residual, any strides
    DBias,  # (cdiv(M, 16), N) fp32, zero-filled: row i = column sums of dpre over row-block i
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_rm,
    stride_rn,
    M_BUCKET,  # autotune key only
    EPI: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_OUT1: tl.constexpr,
    HAS_OUT2: tl.constexpr,
    WANT_DB: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 operands: full-precision dots, never tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-blocks sweep the columns together, so their b tiles are reused from L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    a_ptrs = A + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_off = ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (ks + k0) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(B + b_off, mask=b_mask, other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc=acc)
        if EPI == 2:
            b2 = tl.load(B2 + b_off, mask=b_mask, other=0.0)
            if IEEE:
                acc2 = tl.dot(a, b2, acc=acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(a, b2, acc=acc2)
        a_ptrs += BLOCK_K * stride_ak
        b_off += BLOCK_K * stride_bk

    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]  # every (M, N) tensor but R is contiguous
    T = Y.dtype.element_ty
    if EPI == 0:
        v = acc
        if HAS_BIAS:
            v += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACT >= 0:
            if HAS_OUT1:
                tl.store(Out1 + offs, v.to(T), mask=mask)
            v, _ = _act_and_grad(v.to(T).to(tl.float32), ACT)
        if HAS_RES:
            r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
            v += r.to(tl.float32)
        tl.store(Y + offs, v.to(T), mask=mask)
    elif EPI == 1:
        pre = tl.load(Aux1 + offs, mask=mask, other=0.0).to(tl.float32)
        act, dpre = _act_bwd(pre, acc, ACT)
        dpre = tl.where(mask, dpre, 0.0)
        tl.store(Y + offs, dpre.to(T), mask=mask)
        if HAS_OUT1:
            tl.store(Out1 + offs, act.to(T), mask=mask)
        if WANT_DB:
            # BLOCK_M is a multiple of 16, so row-block pid_m owns partial row pid_m of a (cdiv(M, 16), N) buffer;
            # rows past cdiv(M, BLOCK_M) stay zero (the autotuner re-zeroes the buffer between configs).
            tl.store(DBias + pid_m.to(tl.int64) * N + cols, tl.sum(dpre, axis=0), mask=col_ok)
    elif EPI == 2:
        g = acc.to(T).to(tl.float32)
        u = acc2.to(T).to(tl.float32)
        tl.store(Out1 + offs, g.to(T), mask=mask)
        tl.store(Out2 + offs, u.to(T), mask=mask)
        tl.store(Y + offs, (g * _sigmoid(g) * u).to(T), mask=mask)
    else:
        g = tl.load(Aux1 + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(Aux2 + offs, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid(g)
        silu = g * s
        tl.store(Y + offs, (acc * u * s * (1.0 + g * (1.0 - s))).to(T), mask=mask)
        tl.store(Out1 + offs, (acc * silu).to(T), mask=mask)
        if HAS_OUT2:
            tl.store(Out2 + offs, (silu * u).to(T), mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers
def _check_ab(fn, a, b):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{fn}: a must be (M, K) and b (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: a and b must share a dtype among float32, float16, bfloat16; got {a.dtype}, {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{fn}: a is on {a.device}, b on {b.device}")


def _check_mn(fn, name, t, m, n, dtype):
    if t.shape != (m, n) or t.dtype != dtype:
        raise ValueError(f"{fn}: {name} must be ({m}, {n}) {dtype}, got {tuple(t.shape)} {t.dtype}")


def _act(fn, activation):
    if activation is None:
        return ACT_NONE
    if activation not in _ACT_CODES:
        raise ValueError(f"{fn}: activation must be None or one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return _ACT_CODES[activation]


def _launch(a, b, y, *, epi, act=ACT_NONE, b2=None, out1=None, out2=None, aux1=None, aux2=None, bias=None,
            residual=None, dbias=None):
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    scratch = torch.empty(1, dtype=torch.float32, device=a.device)  # unused pointer slots; never an input
    r = residual if residual is not None else scratch
    rs = (residual.stride(0), residual.stride(1)) if residual is not None else (0, 0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _matmul_kernel[grid](
        a, b, b2 if b2 is not None else b, y,
        out1 if out1 is not None else y, out2 if out2 is not None else y,
        aux1 if aux1 is not None else y, aux2 if aux2 is not None else y,
        bias if bias is not None else scratch, r, dbias if dbias is not None else scratch,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), rs[0], rs[1], triton.next_power_of_2(M),
        EPI=epi, ACT=act, HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_OUT1=out1 is not None,
        HAS_OUT2=out2 is not None, WANT_DB=dbias is not None, IEEE=a.dtype == torch.float32,
    )  # fmt: skip


@on_tensor_device
def matmul(a, b, bias=None, activation=None, residual=None, save_pre=False):
    """y = act(a @ b + bias) + residual in one kernel.

    Args:
        a: (M, K), b: (K, N): float32, float16 or bfloat16 (same dtype), any strides.
        bias: (N,) or None, any float dtype (read as fp32).
        activation: None, "gelu_tanh", "gelu" or "relu".
        residual: (M, N) in a.dtype or None, any strides; added after the activation.
        save_pre: also return pre = a @ b + bias (needs an activation).

    Returns:
        y (M, N) in a.dtype, or (y, pre) when save_pre.
    """
    fn = "matmul"
    _check_ab(fn, a, b)
    act = _act(fn, activation)
    if save_pre and act == ACT_NONE:
        raise ValueError(f"{fn}: save_pre needs an activation")
    M, N = a.shape[0], b.shape[1]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{fn}: bias must be ({N},), got {tuple(bias.shape)}")
    if bias is not None and bias.device != a.device:
        raise ValueError(f"{fn}: bias is on {bias.device}, a on {a.device}")
    if residual is not None:
        _check_mn(fn, "residual", residual, M, N, a.dtype)
    y = torch.empty((M, N), dtype=a.dtype, device=a.device)
    pre = torch.empty((M, N), dtype=a.dtype, device=a.device) if save_pre else None
    _launch(a, b, y, epi=EPI_ACT, act=act, out1=pre, bias=bias.contiguous() if bias is not None else None,
            residual=residual)
    return (y, pre) if save_pre else y


@on_tensor_device
def matmul_dact(a, b, pre, activation, want_act=True, want_dbias=False):
    """dpre = (a @ b) * act'(pre): the backward of act through the GEMM that produces act's output gradient.

    Args:
        a: (M, K) (dy), b: (K, N) (W_proj), any strides; pre: (M, N) the saved pre-activation, a.dtype.
        activation: "gelu_tanh", "gelu" or "relu".
        want_act: also return act(pre) (M, N).  want_dbias: also return sum_rows(dpre) (N,) fp32.

    Returns:
        (dpre, act or torch.empty(0), dbias or torch.empty(0)).
    """
    fn = "matmul_dact"
    _check_ab(fn, a, b)
    act = _act(fn, activation)
    if act == ACT_NONE:
        raise ValueError(f"{fn}: needs an activation")
    M, N = a.shape[0], b.shape[1]
    _check_mn(fn, "pre", pre, M, N, a.dtype)
    dev = a.device
    dpre = torch.empty((M, N), dtype=a.dtype, device=dev)
    act_out = torch.empty((M, N), dtype=a.dtype, device=dev) if want_act else None
    partial = torch.zeros((triton.cdiv(M, _MIN_BLOCK_M), N), dtype=torch.float32, device=dev) if want_dbias else None
    _launch(a, b, dpre, epi=EPI_DACT, act=act, out1=act_out, aux1=pre.contiguous(), dbias=partial)
    db = partial.sum(0) if want_dbias else a.new_empty(0, dtype=torch.float32)
    return dpre, act_out if want_act else a.new_empty(0), db


@on_tensor_device
def matmul_swiglu(a, b_gate, b_up):
    """(p, g, u): g = a @ b_gate, u = a @ b_up, p = silu(g) * u, from one kernel that reads a once.

    a: (M, K); b_gate, b_up: (K, N) (the transposed nn.Linear weights), same dtype; made to share strides.
    """
    fn = "matmul_swiglu"
    _check_ab(fn, a, b_gate)
    _check_ab(fn, a, b_up)
    if b_gate.shape != b_up.shape:
        raise ValueError(f"{fn}: b_gate {tuple(b_gate.shape)} and b_up {tuple(b_up.shape)} must match")
    if b_gate.stride() != b_up.stride():  # the kernel addresses both with one set of strides
        b_gate, b_up = b_gate.contiguous(), b_up.contiguous()
    M, N = a.shape[0], b_gate.shape[1]
    p, g, u = (torch.empty((M, N), dtype=a.dtype, device=a.device) for _ in range(3))
    _launch(a, b_gate, p, epi=EPI_SWIGLU, b2=b_up, out1=g, out2=u)
    return p, g, u


@on_tensor_device
def matmul_dswiglu(a, b, g, u, want_p=True):
    """(dg, du, p): dp = a @ b (dy @ W_down); dg = dp * d silu(g) * u, du = dp * silu(g); p = silu(g) * u if want_p.

    a: (M, K), b: (K, N) any strides; g, u: (M, N) saved by matmul_swiglu.
    """
    fn = "matmul_dswiglu"
    _check_ab(fn, a, b)
    M, N = a.shape[0], b.shape[1]
    _check_mn(fn, "g", g, M, N, a.dtype)
    _check_mn(fn, "u", u, M, N, a.dtype)
    dg, du = (torch.empty((M, N), dtype=a.dtype, device=a.device) for _ in range(2))
    p = torch.empty((M, N), dtype=a.dtype, device=a.device) if want_p else None
    _launch(a, b, dg, epi=EPI_DSWIGLU, out1=du, out2=p, aux1=g.contiguous(), aux2=u.contiguous())
    return dg, du, p if want_p else a.new_empty(0)
