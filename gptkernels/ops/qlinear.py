"""Weight-only quantized linear layer: int8 or int4 weights, float activations, for fast decode.

Math (fp32 accumulation whatever the activation dtype; shapes x: (..., K), M = numel / K rows):
    y = x @ dequant(qweight, scales)^T + bias                                  (..., N) in x.dtype
    dequant: w[n, k] = q[n, k] * scales[n, k // group_size]                   (N, K) fp32

Formats (symmetric: no zero point; a scale may be negative, see :func:`quantize_weight`; scales are always float32,
whatever the model's dtype: an fp16 scale would round every weight a second time, and they are N*K/group_size*4
bytes, 1/32 of the int4 weight at group 128 and less for int8):
    int8, per output channel (group_size=None):  qweight (N, K) int8,  scales (N,)
    int8, per group of K (group_size=g, g | K):   qweight (N, K) int8,  scales (N, K // g)
    int4, per group of 32, 64 or 128:             qweight (N, K // 2) uint8, scales (N, K // g)
        Nibble order: K is cut into blocks of 32 values stored in 16 bytes; byte j (0..15) of block b holds
        k = 32b + j in its low nibble and k = 32b + 16 + j in its high nibble, each as u = q + 8 (q in -8..7).
        (Not even/odd pairs: this way one 16-byte load yields two runs of 16 consecutive k, each a full SIMD vector
        against 16 consecutive x, with no shuffle, on every backend.) :func:`pack_int4` / :func:`unpack_int4`.

Where it runs (the "path", appended to gptkernels.explain()'s reason):
    gemv (M <= 16 rows): the fused kernel. Each weight vector is loaded once, converted to fp32 in registers, scaled,
        and multiplied into all M rows of x, so the weight (the bytes that dominate at decode) crosses memory once
        per call: N*K bytes int8, N*K/2 int4, against 4*N*K for fp32 F.linear.
        cpu: C++ (OpenMP over output rows; AVX-512 / AVX2 / generic copies, csrc/kernels/cpu/qlinear_impl.inc).
        cuda: CUDA C++, one warp per output row, 16-byte weight loads. triton: a GEMV / skinny GEMM.
    dequant (M > 16): compute-bound, so the weight is dequantized and a GEMM runs: cpu: fp32 tiles of ~2 MB, each
        multiplied by ATen's BLAS into its columns of y; cuda: the whole weight in x's dtype, then cuBLAS (fp32
        accumulation); triton: a Triton dequantize kernel, then the ATen GEMM.
    torch: dequantize then F.linear in fp32 (:func:`quantized_linear_ref`), any M.

No backward: a call with grad enabled and x (or scales or bias) requiring grad raises ArgumentError.

Backends: cuda (CUDA C++), triton, cpu (C++/OpenMP), torch (the eager reference). See gptkernels._dispatch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptkernels import _dispatch
from gptkernels.ops import _common

_Err, _TypeErr = _dispatch.ArgumentError, _dispatch.ArgumentTypeError

BITS = (4, 8)
INT4_GROUP_SIZES = (32, 64, 128)
CALIBRATIONS = ("absmax", "mse")
# Rows of x up to which the fused GEMV kernel runs; above, dequantize + GEMM. The same number as kQlinearGemvMaxRows
# (csrc/kernels/cpu/qlinear.h); each backend's GEMV serves up to this many rows per weight read.
GEMV_MAX_ROWS = 16

_FN = "quantized_linear"


# ----------------------------------------------------------------------------------------------- formats
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in -8..7 (K a multiple of 32) -> (N, K // 2) uint8 in the block-of-32 nibble order."""
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(n, k // 32, 2, 16)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(n, k // 2)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) int8 values in -8..7 (the inverse of :func:`pack_int4`)."""
    n, kh = qweight.shape
    b = qweight.view(n, kh // 16, 1, 16)
    u = torch.cat([b & 15, b >> 4], dim=2)  # (N, K/32, 2, 16): low nibbles first, then high
    return (u.to(torch.int8) - 8).reshape(n, kh * 2)


def _k_of(qweight, bits):
    return qweight.shape[1] * (2 if bits == 4 else 1)


def dequantize_weight(qweight, scales, *, group_size=None, bits=8, dtype=torch.float32):
    """The float weight (N, K) in ``dtype`` that ``qweight`` and ``scales`` encode (math in fp32, fp64 for fp64)."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    g = k if group_size is None else group_size
    return (q.to(cd).reshape(n, k // g, g) * scales.to(cd).reshape(n, k // g, 1)).reshape(n, k).to(dtype)


# ----------------------------------------------------------------------------------------------- reference
def quantized_linear_ref(x, qweight, scales, bias=None, *, group_size=None, bits=8):
    """Eager reference: dequantize, then F.linear in fp32 (fp64 when x is fp64). Returns (..., N) in x.dtype."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_weight(qweight, scales, group_size=group_size, bits=bits, dtype=cd)
    b = bias.to(cd) if bias is not None else None
    return F.linear(x.to(cd), w, b).to(x.dtype)


# ----------------------------------------------------------------------------------------------- quantize
def _mse_grid(qmax):
    """The scale ratios calibrate="mse" tries, as multiples of the absmax scale m / -(qmax + 1): (qmax + 1) / qmax
    (the [-qmax, qmax] grid, nothing clipped on either side), 1.0 (absmax), then 0.98 down to 0.70 (clipping the
    group's tails for a finer step)."""
    return ((qmax + 1) / qmax, *(round(1.0 - 0.02 * i, 2) for i in range(16)))


def quantize_weight(w, bits=8, group_size=None, calibrate=None):
    """Quantize a float weight (N, K) (nn.Linear layout) to (qweight, scales) for :func:`quantized_linear`.

    Args:
        w: (N, K) float tensor (any float dtype; the math runs in fp32). Must be finite.
        bits: 8 or 4.
        group_size: None (int8 only: one scale per output row) or the number of consecutive K values sharing a scale
            (must divide K; int4: 32, 64 or 128).
        calibrate: how each group's scale is chosen; the values then round to nearest and clamp to
            [-qmax - 1, qmax] (qmax 127 or 7).
            None or "absmax": scale = m / -(qmax + 1), m the group's value of largest magnitude (with its sign), so m
                lands on -(qmax + 1) and all 2^bits levels are in use (llama.cpp's Q4_0 rule; a scale may be
                negative). A value of the other sign within one step of |m| clamps to qmax. Against max|w| / qmax
                (which leaves -(qmax + 1) unused: 15 of int4's 16 levels) it cuts the int4 g32 error on Gaussian
                weights from 9.7% to 8.6% (768x768, ||dequant - w|| / ||w||).
            "mse": per group, the scale among ratio * (the absmax scale), ratio in :func:`_mse_grid` (qmax+1)/qmax,
                1.0, 0.98, ..., 0.70, with the least squared reconstruction error: clipping a group's tails buys a
                finer step for the rest. 17 passes over w, vectorised over groups; int4 g32 Gaussian: 8.2%. Costs
                0.41 s for a 3072x768 weight vs absmax's 0.036 s (1 thread, load 3.8).

    Returns:
        (qweight, scales): int8 (N, K) or uint8 (N, K // 2) (int4, nibble order in the module docstring); scales
        float32 (N,) per channel or (N, K // group_size). An all-zero group gets scale 0.
    """
    _check_format("quantize_weight", bits, group_size)
    _check_calibrate("quantize_weight", calibrate)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise _TypeErr(f"quantize_weight: w must be a floating-point tensor, got "
                       f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dim() != 2:
        raise _Err(f"quantize_weight: w must be 2-D (N, K) in nn.Linear layout, got shape {tuple(w.shape)}")
    n, k = w.shape
    g = k if group_size is None else group_size
    _check_group("quantize_weight", k, g, bits)
    qmax = 127 if bits == 8 else 7
    if w.is_meta:  # structure only (a model built on the meta device, to be filled by load_state_dict)
        qw = torch.empty(n, k if bits == 8 else k // 2, dtype=torch.int8 if bits == 8 else torch.uint8, device="meta")
        return qw, torch.empty((n,) if group_size is None else (n, k // g), dtype=torch.float32, device="meta")
    with torch.no_grad():
        wf = w.detach().float()
        if not torch.isfinite(wf).all():
            raise _Err("quantize_weight: w has NaN or inf values; they have no int representation")
        wg = wf.reshape(n, k // g, g)  # (N, G, g)
        m = wg.gather(-1, wg.abs().argmax(dim=-1, keepdim=True))  # (N, G, 1) largest magnitude, signed
        base = m / -(qmax + 1)

        def fit(ratio):
            scale = base * ratio
            q = torch.round(wg / torch.where(scale != 0, scale, torch.ones_like(scale))).clamp_(-qmax - 1, qmax)
            return q, scale

        if calibrate in (None, "absmax"):
            q, scale = fit(1.0)
        else:
            best = None
            for ratio in _mse_grid(qmax):
                q_r, s_r = fit(ratio)
                err = ((q_r * s_r - wg) ** 2).sum(dim=-1, keepdim=True)  # (N, G, 1)
                if best is None:
                    best = (err, q_r, s_r)
                    continue
                better = err < best[0]
                best = (torch.where(better, err, best[0]), torch.where(better, q_r, best[1]),
                        torch.where(better, s_r, best[2]))
            _, q, scale = best
        q = q.reshape(n, k).to(torch.int8)
        scales = scale.reshape(n) if group_size is None else scale.reshape(n, k // g)
        qweight = pack_int4(q) if bits == 4 else q
        return qweight.contiguous(), scales.contiguous()


# ------------------------------------------------------------------------------------------- registration
def _qlinear_fake(x, qweight, scales, bias, group_size, bits, dequant):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@_common.python_op("qlinear_fwd_triton", _qlinear_fake)
def _qlinear_fwd_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                        group_size: int, bits: int, dequant: bool) -> torch.Tensor:
    from gptkernels.triton import qlinear as tl_qlinear

    k, n = x.shape[-1], qweight.shape[0]
    x2 = _common.rows(x)  # (M, K)
    b = bias.float().contiguous() if bias is not None else None
    if dequant:
        w = tl_qlinear.dequant(qweight, scales, group_size, bits, k, x.dtype)  # (N, K) in x.dtype
        y = torch.addmm(b.to(x.dtype), x2, w.t()) if b is not None else torch.mm(x2, w.t())
    else:
        y = tl_qlinear.gemv(x2, qweight, scales, b, group_size, bits)
    return y.view(*x.shape[:-1], n)


_HAS_CPP = _common.register_cpp_fakes({"qlinear_fwd": _qlinear_fake})
# An extension built before this op existed has neither the op nor its eager entry: cpu/cuda then say so.
_EAGER = _HAS_CPP and "cpu" in _common.EAGER_BACKENDS and hasattr(_common.C, "qlinear")


# ------------------------------------------------------------------------------------------------ checks
def _check_format(fn, bits, group_size):
    if isinstance(bits, bool) or bits not in BITS:
        raise _Err(f"{fn}: bits must be 4 or 8, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise _Err(f"{fn}: group_size must be None or a positive int, got {group_size!r}")
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise _Err(f"{fn}: int4 needs group_size 32, 64 or 128 (one scale per group), got {group_size!r}")


def _check_calibrate(fn, calibrate):
    if calibrate is not None and calibrate not in CALIBRATIONS:
        raise _Err(f"{fn}: calibrate must be None or one of {', '.join(map(repr, CALIBRATIONS))}, got {calibrate!r}")


def _check_group(fn, k, g, bits):
    if k % g:
        raise _Err(f"{fn}: K = {k} (in_features) is not divisible by group_size {g}")
    if bits == 4 and k % 32:  # implied by g | K for g in 32, 64, 128; kept for the message
        raise _Err(f"{fn}: int4 needs K = {k} to be a multiple of 32")


def _check(x, qweight, scales, bias, group_size, bits):
    fn = _FN
    _check_format(fn, bits, group_size)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise _TypeErr(f"{fn}: x must be a floating-point tensor, got "
                       f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1:
        raise _Err(f"{fn}: x must have at least 1 dim (..., K), got a 0-d tensor")
    k = x.shape[-1]
    if k == 0:
        raise _Err(f"{fn}: x's last dim (K, in_features) is 0")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise _Err(f"{fn}: qweight must be a 2-D tensor ((N, K) int8 or (N, K // 2) uint8), got "
                   f"{tuple(qweight.shape) if isinstance(qweight, torch.Tensor) else type(qweight).__name__}")
    want = torch.int8 if bits == 8 else torch.uint8
    if qweight.dtype != want:
        raise _TypeErr(f"{fn}: bits={bits} needs qweight of dtype {want}, got {qweight.dtype}")
    n = qweight.shape[0]
    kq = _k_of(qweight, bits)
    if kq != k:
        raise _Err(f"{fn}: qweight {tuple(qweight.shape)} holds K = {kq} ({'2 values a byte' if bits == 4 else 'int8'}"
                   f"), but x's last dim is {k}")
    g = k if group_size is None else group_size
    _check_group(fn, k, g, bits)
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
        raise _TypeErr(f"{fn}: scales must be a float32 tensor, got "
                       f"{scales.dtype if isinstance(scales, torch.Tensor) else type(scales).__name__}")
    shapes = [(n,)] if group_size is None else [(n, k // g)] + ([(n,)] if k // g == 1 else [])
    if tuple(scales.shape) not in shapes:
        raise _Err(f"{fn}: scales must have shape {' or '.join(str(s) for s in shapes)} for N = {n}, K = {k}, "
                   f"group_size={group_size}, got {tuple(scales.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise _Err(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise _TypeErr(f"{fn}: bias must be a floating-point tensor or None")
        if tuple(bias.shape) != (n,):
            raise _Err(f"{fn}: bias must have shape ({n},), got {tuple(bias.shape)}")


def no_grad_error(what: str, x, scales, bias) -> _dispatch.ArgumentError | None:
    """The error for a call that would need a gradient (None if none would): quantized layers have no backward."""
    if not torch.is_grad_enabled():
        return None
    which = [name for name, t in (("x", x), ("scales", scales), ("bias", bias))
             if isinstance(t, torch.Tensor) and t.requires_grad]
    if not which:
        return None
    return _Err(f"{what}: no backward (weight-only quantization is for inference), but {' and '.join(which)} "
                f"require{'s' if len(which) == 1 else ''} grad. Run under torch.no_grad() or torch.inference_mode(), "
                f"or freeze the float parameters feeding it (model.requires_grad_(False)).")


# ------------------------------------------------------------------------------------------------- public
_PATH_NOTES = {
    ("cpu", True): "path: fused GEMV (M <= 16: each weight byte read once, converted in registers)",
    ("cpu", False): "path: dequantize + GEMM (M > 16: fp32 weight tiles of ~2 MB into ATen's BLAS)",
    ("cuda", True): "path: fused GEMV (M <= 16: one warp per output row, 16-byte weight loads)",
    ("cuda", False): "path: dequantize + GEMM (M > 16: the weight in x's dtype, then cuBLAS)",
    ("triton", True): "path: Triton GEMV (M <= 16: in-register dequantization)",
    ("triton", False): "path: dequantize + GEMM (M > 16: Triton dequantize kernel, then the ATen GEMM)",
    ("torch", True): "path: dequantize + F.linear (the eager reference)",
    ("torch", False): "path: dequantize + F.linear (the eager reference)",
}


def _supports(dtype, scales_dtype):
    def supports(b):
        if b in ("cpu", "cuda") and not _HAS_CPP:
            return "the built extension lacks gptkernels::qlinear_fwd (rebuild with `pip install -e .`)"
        if b != "torch" and scales_dtype != torch.float32:
            return f"scales dtype {scales_dtype}: the kernels read float32 scales (the torch reference takes any)"
        return _dispatch.dtype_support(dtype, b)

    return supports


def _select(x, scales, backend, bits, gemv):
    """The backend for this call, with the path recorded in explain()."""
    key = (x.dtype, bits, gemv, scales.dtype)
    if not _common.is_compiling():
        rec = _dispatch.choice(_FN, x.device, backend, key)
        if rec is not None:
            return rec[0]
    be = _dispatch.select(_FN, x.device, backend, _supports(x.dtype, scales.dtype))
    _dispatch.note(_FN, _PATH_NOTES[(be, gemv)])
    if not _common.is_compiling():
        _dispatch.remember(_FN, x.device, backend, key)
    return be


def quantized_linear(x, qweight, scales, bias=None, *, group_size=None, bits=8, backend=None):
    """y = x @ dequant(qweight, scales)^T + bias with int8 or int4 weights (formats in the module docstring).

    Args:
        x: (..., K) float32, float16 or bfloat16 (any float dtype on the torch backend). Any strides.
        qweight: (N, K) int8 (bits=8) or (N, K // 2) uint8 (bits=4, two values a byte), from :func:`quantize_weight`.
        scales: float32 (N,) (int8 per channel, group_size=None) or (N, K // group_size). (The torch reference
            takes any float dtype, e.g. float64 in tests; the kernels read float32.)
        bias: (N,) any float dtype, or None.
        group_size: None (int8 per output channel) or the K-group size of the scales (int4: 32, 64 or 128).
        bits: 8 or 4.
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        y (..., N) in x.dtype, fp32 accumulation. No backward: with grad enabled, an x (or scales, bias) that
        requires grad raises ArgumentError.
    """
    if _EAGER and not _common.is_compiling() and type(x) is torch.Tensor and x.dim() and x.shape[-1]:
        # Eager fast path: the cached backend decision, then the C++ entry (checks and kernel) in one call.
        gemv = x.numel() // x.shape[-1] <= GEMV_MAX_ROWS
        rec = _dispatch.choice(_FN, x.device, backend, (x.dtype, bits, gemv, scales.dtype))
        if rec is not None and rec[0] in _common.EAGER_BACKENDS:
            gs = x.shape[-1] if group_size is None else group_size
            out = _common.eager_call(_common.C.qlinear, x, qweight, scales, bias, gs, bits, not gemv)
            if out is not None:
                return out
    _check(x, qweight, scales, bias, group_size, bits)
    err = no_grad_error(_FN, x, scales, bias)
    if err is not None:
        raise err
    k = x.shape[-1]
    # A branch, not bool(): under torch.compile's dynamic shapes this installs a guard on M and leaves a Python bool
    # (a symbolic bool in the path's dict key broke tracing).
    gemv = True if math.prod(x.shape[:-1]) <= GEMV_MAX_ROWS else False  # noqa: SIM210
    be = _select(x, scales, backend, bits, gemv)
    if be == "torch":
        return quantized_linear_ref(x, qweight, scales, bias, group_size=group_size, bits=bits)
    gs = k if group_size is None else group_size
    return _common.kernel_op("qlinear_fwd", be)(x, qweight, scales, bias, gs, bits, not gemv)
