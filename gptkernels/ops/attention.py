"""Scaled dot-product attention (a drop-in for torch.nn.functional.scaled_dot_product_attention) and KV-cache
decode attention. The binding contract of the kernels is docs/attention_contract.md.

Math (per batch b, query head h, query row i; in fp32 whatever the input dtype):
    s_ij = scale * <q_i, k_j> + mask_ij            scale = 1/sqrt(D) unless given; mask additive (bool: 0 / -inf)
    key j is visible to query i: always; causal: j <= i (top-left aligned, as SDPA's is_causal);
        window w >= 1: i - w < j <= i (implies causal)
    p_ij = softmax_j(s_ij) over visible j,  lse_i = log sum_j exp(s_ij)
    out_i = sum_j p_ij * keep_ij / (1 - dropout_p) * v_j,  keep_ij ~ Bernoulli(1 - dropout_p)
A row with no visible key (or only -inf scores) gives out = 0 and zero gradients, never NaN.

Shapes (SDPA's layout): q (..., H, Tq, D); k, v (..., Hkv, Tk, D) with the same leading dims; out like q.
GQA/MQA (enable_gqa=True): H % Hkv == 0 and query head h reads kv head h // (H // Hkv). attn_mask broadcastable
(right-aligned) to (..., H, Tq, Tk). Kernels see 4-D (B, H, T, D) views: leading dims are flattened into B.

Backward saves q, k, v, out, the fp32 lse (B, H, Tq) and the fp32 mask (in its own broadcast shape): never a
Tq x Tk matrix. It recomputes p = exp(s - lse) tile by tile (FlashAttention-2), with delta_i = sum_d dout_i out_i;
dropout regenerates keep_ij from (seed, b, h, i, j). No gradient flows to attn_mask.

Dropout: the seed is drawn from torch's default CPU generator (torch.manual_seed makes a run reproducible); each
kernel backend has its own keep-mask generator, so cpu, cuda and triton give different (equally valid) masks.

decode_attention: q (B, H, Tn, D) holds the Tn newest tokens; k_cache, v_cache (B, Hkv, Tmax, D); cache_seqlens
(B,) the valid lengths L_b (new tokens included). Query t sits at position L_b - Tn + t and sees keys j <= it.
Split-K flash-decoding; no backward.

Backends: cuda (CUDA C++), triton, cpu (C++), torch (attention_ref below, autograd by PyTorch). See
gptkernels._dispatch; limits in _supports.
"""

from __future__ import annotations

import math
import numbers

import torch

from gptkernels import _dispatch
from gptkernels.ops import _common

_NEG_INF = _common.NEG_INF
_OP = "scaled_dot_product_attention"
_DECODE_OP = "decode_attention"


# ----------------------------------------------------------------------------------------------- reference
def _visible(tq, tk, causal, window, device):
    """(Tq, Tk) bool: key j visible to query i under causal / window masking, or None when all are."""
    if not causal and window is None:
        return None
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    vis = j <= i
    if window is not None:
        vis &= j > i - window
    return vis


def attention_ref(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  window=None, dropout_mask=None, return_lse=False):
    """Eager PyTorch in fp32 (fp64 for fp64 inputs), materializing the (..., Tq, Tk) scores. Returns out in q.dtype,
    or (out, lse) with return_lse (lse fp32/fp64, (..., H, Tq), -inf on fully masked rows).

    q (..., H, Tq, D); k, v (..., Hkv, Tk, D); kv heads are repeated when Hkv != H (whatever enable_gqa says).
    window: None or w >= 1 (implies causal). dropout_mask: bool, broadcastable to (..., H, Tq, Tk), True = keep;
    drawn with torch.rand from the default generator when dropout_p > 0 and it is None. Fully masked rows give
    zeros (not SDPA's NaN of old versions) and zero gradients. Differentiable in q, k, v (and a float mask).
    """
    del enable_gqa  # repetition follows the shapes
    # Under autocast the matmuls below run in the autocast dtype, as in any eager PyTorch model: this function is
    # also the eager baseline that GPT(backend="torch") is timed with (profile, train). Tests call it without.
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        kf, vf = kf.repeat_interleave(rep, dim=-3), vf.repeat_interleave(rep, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (qf @ kf.transpose(-2, -1)) * scale
    if attn_mask is not None:
        s = s + _common.additive_mask(attn_mask, dt)
    vis = _visible(s.shape[-2], s.shape[-1], is_causal, window, s.device)
    if vis is not None:
        s = s.masked_fill(~vis, _NEG_INF)
    # softmax is shift invariant: the max carries no gradient. An all -inf row subtracts 0: exp(-inf) = 0, no NaN.
    m = s.amax(-1, keepdim=True).detach() if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask.to(dt) / (1.0 - dropout_p)
    out = (p @ vf).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(denom > 0, torch.log(denom) + m, torch.full_like(m, _NEG_INF)).squeeze(-1)
    return out, lse.detach()


def _decode_mask(cache_seqlens, tn, tmax, device):
    """(B, 1, Tn, Tmax) bool: query t of sequence b (at position L_b - Tn + t) sees keys j <= it (and j < L_b)."""
    L = cache_seqlens.to(device=device, dtype=torch.int64).view(-1, 1, 1, 1)
    t = torch.arange(tn, device=device).view(1, 1, tn, 1)
    j = torch.arange(tmax, device=device).view(1, 1, 1, tmax)
    return (j < L) & (j <= L - tn + t)


def decode_attention_ref(q, k_cache, v_cache, cache_seqlens, scale=None):
    """Eager reference of decode_attention (fp32 math, fp64 for fp64 inputs). Returns (B, H, Tn, D) in q.dtype."""
    mask = _decode_mask(cache_seqlens, q.shape[2], k_cache.shape[2], q.device)
    return attention_ref(q, k_cache, v_cache, attn_mask=mask, scale=scale)


# ------------------------------------------------------------------------------------------- registration
def _fwd_fake(q, k, v, mask, scale, causal, window, dropout_p, seed):
    B, H, Tq, D = q.shape
    return q.new_empty((B, H, Tq, D)), q.new_empty((B, H, Tq), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, mask, scale, causal, window, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale, num_splits):
    return q.new_empty(q.shape)


@_common.triton_op("attention_fwd_triton", _fwd_fake)
def _attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool,
    window: int, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from gptkernels.triton import attention as tl_attn

    return tl_attn.attention_fwd(q, k, v, mask, scale, causal, window, dropout_p, seed)


@_common.triton_op("attention_bwd_triton", _bwd_fake)
def _attention_bwd_triton(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, scale: float, causal: bool, window: int, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import attention as tl_attn

    return tl_attn.attention_bwd(dout, q, k, v, out, lse, mask, scale, causal, window, dropout_p, seed)


@_common.triton_op("decode_attention_triton", _decode_fake)
def _decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, scale: float,
    num_splits: int,
) -> torch.Tensor:
    from gptkernels.triton import attention as tl_attn

    return tl_attn.decode_attention(q, k_cache, v_cache, cache_seqlens, scale, num_splits)


# The C++ ops exist only when the extension loaded and was built with csrc/ops/attention.cpp.
_HAS_CPP_OPS = _common.register_cpp_fakes({"attention_fwd": _fwd_fake, "attention_bwd": _bwd_fake,
                                           "decode_attention": _decode_fake})


_CAPABILITY: dict = {}  # device index -> (major, minor); a plain dict (torch.compile traces _supports)


def _capability(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


# Automatic order on Hopper and newer: the Triton kernels compile to wgmma there, while our CUDA kernels use WMMA with
# shared-memory round trips and synchronous tile loads. Until a GPU run measures both, Triton goes first.
_HOPPER_ORDER = ("triton", "cuda", "torch")
_HOPPER_WHY = "sm_90+: Triton's wgmma kernels before the WMMA CUDA kernels until measured"


def _auto_order(device):
    """(order, why) of the automatic choice for attention on ``device``, or (None, None) for the default."""
    if device.type == "cuda" and _capability(device)[0] >= 9:
        return _HOPPER_ORDER, _HOPPER_WHY
    return None, None


def _supports(dtype, head_dim, device):
    """supports(backend) -> None or the reason this call cannot run there (the contract's backend limits)."""

    def supports(backend):
        why = _dispatch.dtype_support(dtype, backend)
        if why is not None or backend == "torch":
            return why
        if backend in ("cpu", "cuda") and not _HAS_CPP_OPS:
            return ("this build of gptkernels._C has no attention ops (built before csrc/ops/attention.cpp); "
                    "rebuild with `pip install --no-build-isolation -e .`")
        if backend == "cpu":
            if not 1 <= head_dim <= 256:
                return f"head_dim {head_dim} not supported; supported: 1..256"
            return None
        if not (16 <= head_dim <= 256 and head_dim % 8 == 0):
            return f"head_dim {head_dim} not supported; supported: 16..256, multiple of 8"
        if backend == "cuda" and device.type == "cuda":
            major, minor = _capability(device)
            if major < 8:
                return f"needs sm_80 or newer; {device} is sm_{major}{minor}"
        return None

    return supports


# ----------------------------------------------------------------------------------------------- autograd
class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal, window, dropout_p, seed, backend):
        out, lse = _common.kernel_op("attention_fwd", backend)(q, k, v, mask, scale, causal, window, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.args = (scale, causal, window, dropout_p, seed)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = _common.kernel_op("attention_bwd", ctx.backend)(dout, q, k, v, out, lse, mask, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------- public
def _is_float_tensor(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _describe(t):
    return f"a tensor of dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check(fn, q, k, v, attn_mask, dropout_p, scale, enable_gqa, window):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not _is_float_tensor(t):
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {_describe(t)}")
        if t.dim() < 3:
            raise ValueError(f"{fn}: {name} must have at least 3 dims (..., heads, seq, head_dim), got shape "
                             f"{tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{fn}: query, key and value must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"{fn}: query, key and value must be on the same device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        raise ValueError(f"{fn}: query {tuple(q.shape)}, key {tuple(k.shape)} and value {tuple(v.shape)} must have "
                         f"the same leading (batch) dims")
    if k.shape[-3:-1] != v.shape[-3:-1]:
        raise ValueError(f"{fn}: key {tuple(k.shape)} and value {tuple(v.shape)} must have the same heads and "
                         f"sequence length")
    D = q.shape[-1]
    if D < 1 or not D == k.shape[-1] == v.shape[-1]:
        raise ValueError(f"{fn}: head dim (last) of query {D}, key {k.shape[-1]} and value {v.shape[-1]} must be "
                         f"equal and >= 1")
    H, Hkv = q.shape[-3], k.shape[-3]
    if H != Hkv:
        if not enable_gqa:
            raise ValueError(f"{fn}: query has {H} heads but key/value have {Hkv}; pass enable_gqa=True for "
                             f"grouped-query attention")
        if Hkv < 1 or H % Hkv:
            raise ValueError(f"{fn}: enable_gqa needs the key/value head count {Hkv} to divide the query head "
                             f"count {H}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{fn}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"{fn}: scale must be finite, got {scale}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"{fn}: window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"{fn}: window must be >= 1 (query i sees keys i - window < j <= i), got {window}")
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{fn}: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"{fn}: attn_mask must be bool (True = attend) or floating point (additive), got "
                        f"{attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"{fn}: attn_mask is on {attn_mask.device} but query is on {q.device}")
    target = (*q.shape[:-1], k.shape[-2])
    ok = attn_mask.dim() <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))
    if not ok:
        raise ValueError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                         f"(..., H, Tq, Tk) = {target}")
    if attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: attn_mask gradients are not supported; pass attn_mask.detach() (a float mask that "
                         f"requires grad would silently get none)")


def _mask_4d(mask, lead, batch):
    """attn_mask (any dtype) as a 4-D tensor broadcastable to (B, H, Tq, Tk), B = prod(lead)."""
    if mask is None:
        return None
    if mask.dim() <= 4 and (mask.dim() <= 3 or len(lead) <= 1):
        return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # a view
    tail = tuple(mask.shape[-3:])
    if all(s == 1 for s in mask.shape[:-3]):
        return mask.reshape((1, *tail))
    # Several leading dims with a batch-dependent mask: flattening them into B may copy the mask at B's size.
    return mask.expand(*lead, *tail).reshape(batch, *tail)


@torch.compiler.disable
def _draw_seed():
    # From torch's default CPU generator whatever the device, so torch.manual_seed reproduces a run. Kept out of
    # torch.compile graphs (a graph break): traced, the draw would come from Inductor's RNG instead, and the op
    # schemas take a plain int seed, not a data-dependent SymInt. So dropout > 0 cannot run under fullgraph=True.
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, window=None, backend=None):
    """Attention with the signature and semantics of torch.nn.functional.scaled_dot_product_attention.

    Args:
        query: (..., H, Tq, D) float32, float16 or bfloat16 (any float dtype on the torch backend). At least 3 dims;
            the leading dims (batch) are flattened for the kernels. Any strides: e.g. (B, T, H, D).transpose(1, 2).
        key, value: (..., Hkv, Tk, D), same leading dims, dtype and device as query. Hkv == H, or (enable_gqa)
            Hkv divides H.
        attn_mask: None, bool (True = attend) or float (added to the scores; -inf allowed), broadcastable
            right-aligned to (..., H, Tq, Tk), e.g. (Tq, Tk), (B, 1, 1, Tk), (B, H, Tq, Tk). Never materialized at
            (B, H, Tq, Tk) size. No gradient flows to it (a float mask that requires grad raises). May be combined
            with is_causal (SDPA forbids the combination; here both apply).
        dropout_p: probability in [0, 1) of zeroing each attention weight (survivors scaled by 1/(1 - dropout_p)).
            Applied whenever > 0, as SDPA does: pass 0.0 in eval mode. The seed comes from torch's default CPU
            generator; under torch.compile its draw is a graph break (not allowed with fullgraph=True) so compiled
            and eager runs drop the same weights.
        is_causal: query i sees keys j <= i (top-left aligned, as SDPA).
        scale: multiplies q k^T; default 1/sqrt(D).
        enable_gqa: allow Hkv < H (grouped-query / multi-query attention).
        window: None, or w >= 1 for sliding-window attention: query i sees keys i - w < j <= i (implies causal).
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        out (..., H, Tq, D) in query's dtype. A query row that sees no key gets zeros.
    """
    fn = _OP
    if (not _common.is_compiling() and isinstance(query, torch.Tensor) and query.dim() >= 3 and dropout_p == 0
            and type(dropout_p) in (float, int) and (scale is None or type(scale) is float)
            and (window is None or type(window) is int)):
        # Eager fast path (no dropout: its seed is drawn here): the cached backend decision, then the C++ entry.
        rec = _dispatch.choice(fn, query.device, backend, (query.dtype, query.shape[-1]))
        if rec is not None and rec[0] in _common.EAGER_BACKENDS:
            out = _common.eager_call(_common.C.attention, query, key, value, attn_mask, scale, is_causal, enable_gqa,
                                     window)
            if out is not None:
                return out
    _check(fn, query, key, value, attn_mask, dropout_p, scale, enable_gqa, window)
    lead = tuple(query.shape[:-3])
    H, Tq, D = query.shape[-3:]
    Hkv, Tk = key.shape[-3:-1]
    B = math.prod(lead)
    q = query.reshape(B, H, Tq, D)  # views for 3-D and 4-D inputs
    k = key.reshape(B, Hkv, Tk, D)
    v = value.reshape(B, Hkv, Tk, D)
    mask = _mask_4d(attn_mask, lead, B)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    causal = bool(is_causal) or window is not None
    order, why = _auto_order(query.device)
    be = _dispatch.select(fn, query.device, backend, _supports(query.dtype, D, query.device), key=(query.dtype, D),
                          order=order, order_why=why)
    if be == "torch":
        out = attention_ref(q, k, v, mask, float(dropout_p), causal, scale, window=window)
    else:
        mask32 = _common.additive_mask(mask, torch.float32) if mask is not None else None
        seed = _draw_seed() if dropout_p > 0 else 0
        win = int(window) if window is not None else -1
        out = _common.apply(AttentionFunction, q, k, v, mask32, scale, causal, win, float(dropout_p), seed, be)
    return out.reshape(*lead, H, Tq, D)


attention = scaled_dot_product_attention


def _check_decode(fn, q, k_cache, v_cache, cache_seqlens):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not _is_float_tensor(t):
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {_describe(t)}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {tuple(t.shape)}")
    B, H, Tn, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the "
                         f"same shape (B, Hkv, Tmax, D)")
    Bk, Hkv, Tmax, Dk = k_cache.shape
    if Bk != B or Dk != D or D < 1:
        raise ValueError(f"{fn}: q {tuple(q.shape)} is (B, H, Tn, D) so k_cache/v_cache must be (B={B}, Hkv, Tmax, "
                         f"D={D}), got {tuple(k_cache.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{fn}: the cache head count {Hkv} must divide the query head count {H}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"{fn}: q, k_cache and v_cache must have the same dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if not q.device == k_cache.device == v_cache.device:
        raise ValueError(f"{fn}: q, k_cache and v_cache must be on the same device")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: cache_seqlens must be an int32 or int64 tensor, got {_describe(cache_seqlens)}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"{fn}: cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"{fn}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    # Values are checked only where it is free: reading a CUDA tensor would synchronize every decode step (the
    # kernels clamp lengths to Tmax, so a bad value there gives wrong rows, never an out-of-bounds read).
    if cache_seqlens.device.type == "cpu" and B and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(cache_seqlens))  # one pass: this runs every decode step
        if lo < max(Tn, 1) or hi > Tmax:
            raise ValueError(f"{fn}: cache_seqlens must be in [max(Tn, 1), Tmax] = [{max(Tn, 1)}, {Tmax}] (each "
                             f"length includes the Tn new tokens), got values in [{lo}, {hi}]")


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, backend=None):
    """Attention of the newest tokens against a KV cache (inference: no backward).

    Args:
        q: (B, H, Tn, D) the Tn newest tokens of each sequence (Tn = 1 for plain decoding, more for speculative
            decoding or chunked prefill); float32, float16 or bfloat16.
        k_cache, v_cache: (B, Hkv, Tmax, D), same dtype; Hkv divides H (GQA/MQA).
        cache_seqlens: (B,) int32 or int64: L_b, the number of valid cache positions of sequence b, the Tn new
            tokens included (their keys are at L_b - Tn .. L_b - 1); Tn <= L_b <= Tmax. Positions >= L_b are never
            read.
        scale: multiplies q k^T; default 1/sqrt(D).
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        out (B, H, Tn, D) in q's dtype: query t attends to keys j <= L_b - Tn + t (causal, bottom-right aligned).
    """
    fn = _DECODE_OP
    if (not _common.is_compiling() and isinstance(q, torch.Tensor) and q.dim() == 4
            and (scale is None or type(scale) is float)):
        rec = _dispatch.choice(fn, q.device, backend, (q.dtype, q.shape[-1]))
        if rec is not None and rec[0] in _common.EAGER_BACKENDS:
            out = _common.eager_call(_common.C.decode_attention, q, k_cache, v_cache, cache_seqlens, scale)
            if out is not None:
                return out
    _check_decode(fn, q, k_cache, v_cache, cache_seqlens)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"{fn}: scale must be a finite float or None, got {scale!r}")
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    order, why = _auto_order(q.device)
    be = _dispatch.select(fn, q.device, backend, _supports(q.dtype, D, q.device), key=(q.dtype, D), order=order,
                          order_why=why)
    if be == "torch":
        return decode_attention_ref(q, k_cache, v_cache, cache_seqlens, scale)
    return _common.kernel_op("decode_attention", be)(q, k_cache, v_cache, cache_seqlens, scale, 0)
