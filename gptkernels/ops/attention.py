"""Attention: a drop-in for torch.nn.functional.scaled_dot_product_attention, FlashAttention's flash_attn_func and
flash_attn_varlen_func, and KV-cache decode attention. The binding contract of the kernels is
docs/attention_contract.md.

Math (per batch b, query head h, query row i; in fp32 whatever the input dtype):
    pos_i = i (top-left, SDPA) or i + Tk - Tq (bottom-right, FlashAttention and CausalBias lower_right)
    key j is visible iff (left < 0 or j >= pos_i - left) and (right < 0 or j <= pos_i + right)
        (causal: right = 0; SDPA's window w: left = w - 1, right = 0)
    s_ij = scale * <q_i, k_j>;  softcap * tanh(s_ij / softcap) if softcap;  - slope_bh * |pos_i - j| if ALiBi;
        + mask_ij (additive; bool: 0 / -inf; a -inf entry hides key j whatever the score)
    p_ij = softmax_j(s_ij) over visible j,  lse_i = log sum_j exp(s_ij)
    out_i = sum_j p_ij * keep_ij / (1 - dropout_p) * v_j,  keep_ij ~ Bernoulli(1 - dropout_p)
A row with no visible key gives out = 0 and zero gradients. NaN or inf in a visible score gives NaN in that row's
out and in the gradients it touches, never a silent zero.

Shapes (SDPA's layout): q (..., H, Tq, E); k (..., Hkv, Tk, E), v (..., Hkv, Tk, Ev) with the same leading dims;
out (..., H, Tq, Ev). Hkv == H, Hkv == 1, or (enable_gqa) Hkv divides H: query head h reads kv head h // (H // Hkv).
attn_mask broadcastable (right-aligned) to (..., H, Tq, Tk). Kernels see 4-D (B, H, T, D) views: leading dims are
flattened into B. flash_attn_func takes FlashAttention's (B, T, H, D); flash_attn_varlen_func (total, H, D) with
cu_seqlens offsets.

Backward saves q, k, v, out, the fp32 lse (B, H, Tq), the fp32 mask (in its own broadcast shape) and the ALiBi slopes:
never a Tq x Tk matrix. It recomputes p = exp(s - lse) tile by tile (FlashAttention-2), with delta_i = sum_d dout_i
out_i; dropout regenerates keep_ij from (seed, b, h, i, j). No gradient flows to attn_mask or the slopes.

Dropout: the seed is drawn from torch's default CPU generator (torch.manual_seed makes a run reproducible); each
kernel backend has its own keep-mask generator, so cpu, cuda and triton give different (equally valid) masks.

decode_attention: q (B, H, Tn, D) holds the Tn newest tokens; k_cache, v_cache (B, Hkv, Tmax, D); cache_seqlens
(B,) the valid lengths L_b (new tokens included). Query t sits at position L_b - Tn + t and sees keys j <= it.
Split-K flash-decoding; no backward.

Backends: cuda (CUDA C++), triton, cpu (C++), torch (attention_ref below, autograd by PyTorch). See
gptkernels._dispatch; limits in _supports. Bad arguments raise ArgumentError / ArgumentTypeError, which are also
RuntimeErrors (as SDPA's errors).
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
def _visible(tq, tk, left, right, offset, device):
    """(Tq, Tk) bool: key j visible to query i (at position i + offset) under the (left, right) window, or None when
    all are (left, right < 0: unbounded; right 0: causal)."""
    if left < 0 and right < 0:
        return None
    pos = torch.arange(tq, device=device)[:, None] + offset
    j = torch.arange(tk, device=device)[None, :]
    vis = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= pos - left
    if right >= 0:
        vis &= j <= pos + right
    return vis


def _window(is_causal, window):
    """SDPA-style (is_causal, window) as (left, right): causal is right 0, window w is left w - 1 (implies causal)."""
    right = 0 if is_causal or window is not None else -1
    return (window - 1 if window is not None else -1), right


def attention_ref(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  window=None, dropout_mask=None, return_lse=False, *, window_size=None, bottom_right=False,
                  softcap=0.0, alibi_slopes=None):
    """Eager PyTorch in fp32 (fp64 for fp64 inputs), materializing the (..., Tq, Tk) scores. Returns out in q.dtype,
    or (out, lse) with return_lse (lse fp32/fp64, (..., H, Tq), -inf on fully masked rows).

    q (..., H, Tq, E); k (..., Hkv, Tk, E); v (..., Hkv, Tk, Ev); kv heads are repeated when Hkv != H (whatever
    enable_gqa says). is_causal / window (w >= 1, implies causal) are SDPA's; window_size=(left, right) replaces both
    (-1: unbounded). bottom_right aligns query i with key position i + Tk - Tq (FlashAttention) instead of i. softcap
    > 0: s = softcap * tanh(s / softcap). alibi_slopes (H,) or (B, H): s -= slope * |pos_i - j|. A -inf mask entry
    hides its key whatever the score. dropout_mask: bool, broadcastable to (..., H, Tq, Tk), True = keep; drawn with
    torch.rand from the default generator when dropout_p > 0 and it is None. Fully masked rows give zeros and zero
    gradients; NaN in a visible score gives NaN (out, lse and the gradients of what that row sees).
    Differentiable in q, k, v (and a float mask).
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
    s = s + s * 0  # an infinite score poisons its row (NaN): no softcap or exp(-inf) = 0 may hide an inf input
    tq, tk = s.shape[-2], s.shape[-1]
    offset = tk - tq if bottom_right else 0
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if alibi_slopes is not None:
        pos = torch.arange(tq, device=s.device)[:, None] + offset
        dist = (pos - torch.arange(tk, device=s.device)[None, :]).abs().to(dt)
        slopes = alibi_slopes.to(dt)
        slopes = slopes[..., None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * dist
    left, right = window_size if window_size is not None else _window(is_causal, window)
    vis = _visible(tq, tk, left, right, offset, s.device)
    hidden = None if vis is None else ~vis
    if attn_mask is not None:
        add = _common.additive_mask(attn_mask, dt)
        s = s + add
        hidden = torch.isneginf(add) if hidden is None else hidden | torch.isneginf(add)  # whatever the score
    if hidden is None:
        hidden = torch.zeros((), dtype=torch.bool, device=s.device)
    s = s.masked_fill(hidden, _NEG_INF)
    # softmax is shift invariant: the max carries no gradient. An all -inf row subtracts 0. Hidden keys take the
    # constant branch of the where, so a NaN max (a NaN row) reaches neither their p nor their gradient; a visible
    # key whose score is -inf gets p = exp(-inf - max): 0 in a finite row, NaN in a NaN row (as SDPA).
    m = s.amax(-1, keepdim=True).detach() if tk else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(torch.where(hidden, torch.full_like(s, _NEG_INF), s - m))
    denom = e.sum(-1, keepdim=True)
    # A row with no visible key is empty: zeros. Visible keys whose scores are all -inf (inf inputs) are 0 / 0: NaN.
    dead = hidden.expand(s.shape).all(-1, keepdim=True)
    p = (e / torch.where(dead, torch.ones_like(denom), denom)).masked_fill(hidden, 0.0)  # 0, even / NaN
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask.to(dt) / (1.0 - dropout_p)
    out = (p @ vf).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(dead, torch.full_like(m, _NEG_INF), torch.where(denom == 0, math.nan, torch.log(denom) + m))
    lse = lse.squeeze(-1)
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
def _fwd_fake(q, k, v, mask, alibi, scale, window_left, window_right, bottom_right, softcap, dropout_p, seed):
    B, H, Tq, D = q.shape
    return q.new_empty((B, H, Tq, D)), q.new_empty((B, H, Tq), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, mask, alibi, scale, window_left, window_right, bottom_right, softcap,
              dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale, num_splits):
    return q.new_empty(q.shape)


@_common.python_op("attention_fwd_triton", _fwd_fake)
def _attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, alibi: torch.Tensor | None,
    scale: float, window_left: int, window_right: int, bottom_right: bool, softcap: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from gptkernels.triton import attention as tl_attn

    return tl_attn.attention_fwd(q, k, v, mask, alibi, scale, window_left, window_right, bottom_right, softcap,
                                 dropout_p, seed)


@_common.python_op("attention_bwd_triton", _bwd_fake)
def _attention_bwd_triton(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, alibi: torch.Tensor | None, scale: float, window_left: int, window_right: int,
    bottom_right: bool, softcap: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import attention as tl_attn

    return tl_attn.attention_bwd(dout, q, k, v, out, lse, mask, alibi, scale, window_left, window_right, bottom_right,
                                 softcap, dropout_p, seed)


@_common.python_op("decode_attention_triton", _decode_fake)
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


_VARLEN_ORDER = ("triton", "cuda", "torch")
_VARLEN_WHY = "varlen: the Triton kernels read cu_seqlens, the CUDA kernels pad every sequence to max_seqlen"


def _auto_order(device, varlen=False):
    """(order, why) of the automatic choice for attention on ``device``, or (None, None) for the default."""
    if device.type == "cuda" and varlen:
        return _VARLEN_ORDER, _VARLEN_WHY
    if device.type == "cuda" and _capability(device)[0] >= 9:
        return _HOPPER_ORDER, _HOPPER_WHY
    return None, None


def _supports(dtype, head_dim, device, value_dim=None):
    """supports(backend) -> None or the reason this call cannot run there (the contract's backend limits)."""

    def supports(backend):
        why = _dispatch.dtype_support(dtype, backend)
        if why is not None or backend == "torch":
            return why
        if value_dim is not None and value_dim != head_dim:
            return f"value head dim {value_dim} != query/key head dim {head_dim}; the kernels need them equal"
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
    """args: (mask, alibi, scale, window_left, window_right, bottom_right, softcap, dropout_p, seed) of the kernel
    ops; returns (out, lse), lse not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, backend, mask, alibi, *args):
        out, lse = _common.kernel_op("attention_fwd", backend)(q, k, v, mask, alibi, *args)
        ctx.save_for_backward(q, k, v, out, lse, mask, alibi)
        ctx.args = args
        ctx.backend = backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        del dlse  # lse is returned for inspection (return_attn_probs), not differentiated through
        q, k, v, out, lse, mask, alibi = ctx.saved_tensors
        dq, dk, dv = _common.kernel_op("attention_bwd", ctx.backend)(dout, q, k, v, out, lse, mask, alibi, *ctx.args)
        return (dq, dk, dv) + (None,) * (3 + len(ctx.args))


# ------------------------------------------------------------------------------------------------- public
def _is_float_tensor(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _describe(t):
    return f"a tensor of dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


_Err, _TypeErr = _dispatch.ArgumentError, _dispatch.ArgumentTypeError


def _check_qkv(fn, q, k, v, names=("query", "key", "value"), layout="(..., heads, seq, head_dim)", ndim=None):
    """Float tensors of one dtype and device, with at least 3 dims (exactly ndim when given)."""
    for name, t in zip(names, (q, k, v)):
        if not _is_float_tensor(t):
            raise _TypeErr(f"{fn}: {name} must be a floating-point tensor, got {_describe(t)}")
        if t.dim() < 3 or (ndim is not None and t.dim() != ndim):
            need = f"be {ndim}-D" if ndim is not None else "have at least 3 dims"
            raise _Err(f"{fn}: {name} must {need} {layout}, got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise _TypeErr(f"{fn}: {names[0]}, {names[1]} and {names[2]} must have the same dtype, got {q.dtype}, "
                       f"{k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise _Err(f"{fn}: {names[0]}, {names[1]} and {names[2]} must be on the same device, got {q.device}, "
                   f"{k.device}, {v.device}")


def _check_heads(fn, H, Hkv, enable_gqa):
    """SDPA's head rule: equal, or one kv head (broadcast), or (enable_gqa) Hkv divides H."""
    if H == Hkv or Hkv == 1:
        return
    if not enable_gqa:
        raise _Err(f"{fn}: query has {H} heads but key/value have {Hkv}; pass enable_gqa=True for grouped-query "
                   f"attention (or one key/value head, which broadcasts)")
    if Hkv < 1 or H % Hkv:
        raise _Err(f"{fn}: enable_gqa needs the key/value head count {Hkv} to divide the query head count {H}")


def _check_scalars(fn, dropout_p, scale, scale_name="scale"):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise _TypeErr(f"{fn}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise _Err(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise _TypeErr(f"{fn}: {scale_name} must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise _Err(f"{fn}: {scale_name} must be finite, got {scale}")


def _plain_torch_function(t):
    """Whether t's class keeps torch.Tensor's __torch_function__ (a plain tensor, a Parameter) rather than a
    subclass that reinterprets the ops it meets (CausalBias, logging or quantized wrappers)."""
    impl = getattr(type(t).__torch_function__, "__func__", type(t).__torch_function__)
    return impl in (torch.Tensor.__torch_function__.__func__, torch._C._disabled_torch_function_impl)


def _check(fn, q, k, v, attn_mask, dropout_p, scale, enable_gqa, window):
    _check_qkv(fn, q, k, v)
    if not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        raise _Err(f"{fn}: query {tuple(q.shape)}, key {tuple(k.shape)} and value {tuple(v.shape)} must have the "
                   f"same leading (batch) dims")
    if k.shape[-3:-1] != v.shape[-3:-1]:
        raise _Err(f"{fn}: key {tuple(k.shape)} and value {tuple(v.shape)} must have the same heads and sequence "
                   f"length")
    E = q.shape[-1]
    if E < 1 or E != k.shape[-1] or v.shape[-1] < 1:
        raise _Err(f"{fn}: query and key must have the same head dim (last) >= 1, and value's must be >= 1; got "
                   f"query {E}, key {k.shape[-1]}, value {v.shape[-1]}")
    _check_heads(fn, q.shape[-3], k.shape[-3], enable_gqa)
    _check_scalars(fn, dropout_p, scale)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise _TypeErr(f"{fn}: window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise _Err(f"{fn}: window must be >= 1 (query i sees keys i - window < j <= i), got {window}")
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise _TypeErr(f"{fn}: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.is_nested or not _plain_torch_function(attn_mask):
        raise _TypeErr(f"{fn}: attn_mask of type {type(attn_mask).__name__} is not supported (a tensor subclass "
                       f"with its own semantics); pass a plain bool or float tensor, or a CausalBias")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise _TypeErr(f"{fn}: attn_mask must be bool (True = attend) or floating point (additive), got "
                       f"{attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise _Err(f"{fn}: attn_mask is on {attn_mask.device} but query is on {q.device}")
    target = (*q.shape[:-1], k.shape[-2])
    ok = attn_mask.dim() <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))
    if not ok:
        raise _Err(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to (..., H, Tq, Tk) = "
                   f"{target}")
    if attn_mask.requires_grad and torch.is_grad_enabled():
        raise _Err(f"{fn}: attn_mask gradients are not supported; pass attn_mask.detach() (a float mask that "
                   f"requires grad would silently get none)")


def _causal_bias(fn, attn_mask, tq, tk):
    """A torch.nn.attention.bias.CausalBias as (bottom_right,), checked against the call's lengths; None for any
    other mask."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover (torch 2.11+ has it)
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (tq, tk):
        raise _Err(f"{fn}: attn_mask is a CausalBias for (Tq, Tk) = ({attn_mask.seq_len_q}, "
                   f"{attn_mask.seq_len_kv}) but query and key have ({tq}, {tk})")
    return attn_mask.variant == CausalVariant.LOWER_RIGHT


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


def _run(fn, q, k, v, mask, dropout_p, scale, left, right, bottom_right, softcap, alibi, backend):
    """The checked call on 4-D views q (B, H, Tq, E), k (B, Hkv, Tk, E), v (B, Hkv, Tk, Ev); mask None or 4-D
    (any dtype), alibi None or fp32 (1 or B, H). Returns (out (B, H, Tq, Ev), lse (B, H, Tq) fp32)."""
    E, Ev = q.shape[-1], v.shape[-1]
    order, why = _auto_order(q.device)
    be = _dispatch.select(fn, q.device, backend, _supports(q.dtype, E, q.device, Ev), key=(q.dtype, E, Ev),
                          order=order, order_why=why)
    if be == "torch":
        out, lse = attention_ref(q, k, v, mask, float(dropout_p), scale=scale, window_size=(left, right),
                                 bottom_right=bottom_right, softcap=softcap, alibi_slopes=alibi, return_lse=True)
        return out, lse.float()
    mask32 = _common.additive_mask(mask, torch.float32) if mask is not None else None
    seed = _draw_seed() if dropout_p > 0 else 0
    return _common.apply(AttentionFunction, q, k, v, be, mask32, alibi, scale, left, right, bottom_right, softcap,
                         float(dropout_p), seed)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, window=None, backend=None):
    """Attention with the signature and semantics of torch.nn.functional.scaled_dot_product_attention.

    Args:
        query: (..., H, Tq, E) float32, float16 or bfloat16 (any float dtype on the torch backend). At least 3 dims;
            the leading dims (batch) are flattened for the kernels. Any strides: e.g. (B, T, H, E).transpose(1, 2).
            Any size may be 0 (an empty result of the right shape).
        key: (..., Hkv, Tk, E), same leading dims, dtype and device as query. Hkv == H, Hkv == 1 (broadcast), or
            (enable_gqa) Hkv divides H.
        value: (..., Hkv, Tk, Ev). Ev != E runs on the torch backend only (the automatic choice says so).
        attn_mask: None, bool (True = attend) or float (added to the scores; -inf hides a key), broadcastable
            right-aligned to (..., H, Tq, Tk), e.g. (Tq, Tk), (B, 1, 1, Tk), (B, H, Tq, Tk). Never materialized at
            (B, H, Tq, Tk) size. No gradient flows to it (a float mask that requires grad raises). May be combined
            with is_causal (SDPA forbids the combination; here both apply). Also a
            torch.nn.attention.bias.CausalBias (causal_upper_left / causal_lower_right), run as causal attention
            aligned top-left / bottom-right without building a mask. Other tensor subclasses raise.
        dropout_p: probability in [0, 1) of zeroing each attention weight (survivors scaled by 1/(1 - dropout_p)).
            Applied whenever > 0, as SDPA does: pass 0.0 in eval mode. The seed comes from torch's default CPU
            generator; under torch.compile its draw is a graph break (not allowed with fullgraph=True) so compiled
            and eager runs drop the same weights.
        is_causal: query i sees keys j <= i (top-left aligned, as SDPA).
        scale: multiplies q k^T; default 1/sqrt(E).
        enable_gqa: allow 1 < Hkv < H (grouped-query attention).
        window: None, or w >= 1 for sliding-window attention: query i sees keys i - w < j <= i (implies causal).
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        out (..., H, Tq, Ev) in query's dtype. A query row that sees no key gets zeros; NaN in a score a row sees
        makes that row (and the gradients it touches) NaN.

    Raises:
        ArgumentError / ArgumentTypeError (subclasses of ValueError / TypeError and of RuntimeError, as SDPA's
        errors are) for bad arguments.
    """
    fn = _OP
    if (not _common.is_compiling() and type(query) is torch.Tensor and query.dim() >= 3 and dropout_p == 0
            and type(dropout_p) in (float, int) and (scale is None or type(scale) is float)
            and (window is None or type(window) is int) and (attn_mask is None or type(attn_mask) is torch.Tensor)
            and type(key) is torch.Tensor and type(value) is torch.Tensor):
        # Eager fast path (no dropout: its seed is drawn here): the cached backend decision, then the C++ entry.
        # Only plain tensors: a subclass that overrides __torch_function__ alone (CausalBias) has no dispatch key
        # of its own, and the C++ entry would read it as an ordinary tensor.
        rec = _dispatch.choice(fn, query.device, backend, (query.dtype, query.shape[-1], query.shape[-1]))
        if rec is not None and rec[0] in _common.EAGER_BACKENDS:
            out = _common.eager_call(_common.C.attention, query, key, value, attn_mask, scale, is_causal, enable_gqa,
                                     window)
            if out is not None:
                return out
    if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() >= 2 and key.dim() >= 2:
        bottom_right = _causal_bias(fn, attn_mask, query.shape[-2], key.shape[-2])
        if bottom_right is not None:
            if window is not None:
                raise _Err(f"{fn}: a CausalBias attn_mask cannot be combined with window")
            attn_mask, is_causal = None, True
    else:
        bottom_right = None
    _check(fn, query, key, value, attn_mask, dropout_p, scale, enable_gqa, window)
    lead = tuple(query.shape[:-3])
    H, Tq, E = query.shape[-3:]
    Hkv, Tk, Ev = value.shape[-3:]
    B = math.prod(lead)
    q = query.reshape(B, H, Tq, E)  # views for 3-D and 4-D inputs
    k = key.reshape(B, Hkv, Tk, E)
    v = value.reshape(B, Hkv, Tk, Ev)
    mask = _mask_4d(attn_mask, lead, B)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    left, right = _window(is_causal, window)
    out, _ = _run(fn, q, k, v, mask, dropout_p, scale, left, right, bool(bottom_right), 0.0, None, backend)
    return out.reshape(*lead, H, Tq, Ev)


attention = scaled_dot_product_attention

_FA_OP = "flash_attn_func"


def _check_fa_heads(fn, H, Hkv):
    if Hkv != H and (Hkv < 1 or H % Hkv):
        raise _Err(f"{fn}: the k/v head count {Hkv} must divide q's head count {H}")


def _fa_window(fn, causal, window_size):
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)):
        raise _TypeErr(f"{fn}: window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise _Err(f"{fn}: window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    return left, (0 if causal else right)


def _fa_alibi(fn, alibi_slopes, B, H, device):
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
        raise _TypeErr(f"{fn}: alibi_slopes must be a float32 tensor of shape (H,) or (B, H), got "
                       f"{_describe(alibi_slopes)}")
    if alibi_slopes.device != device:
        raise _Err(f"{fn}: alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise _Err(f"{fn}: alibi_slopes must have shape (H,) = ({H},) or (B, H) = ({B}, {H}), got "
                   f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise _Err(f"{fn}: alibi_slopes gradients are not supported; pass alibi_slopes.detach()")
    return alibi_slopes.reshape(-1, H)


def _fa_scalars(fn, dropout_p, softmax_scale, softcap):
    _check_scalars(fn, dropout_p, softmax_scale, "softmax_scale")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise _TypeErr(f"{fn}: softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise _Err(f"{fn}: softcap must be finite and >= 0 (0: no capping), got {softcap}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend=None):
    """FlashAttention's ``flash_attn_func``, in its layout and with its conventions, on every backend (CPUs too).

    Causal masking and windows are aligned bottom-right: query i sits at key position i + Tk - Tq, so the last query
    sees the last key (chunked prefill and speculative decoding rely on it); with Tq > Tk the first Tq - Tk rows see
    no key and get zeros.

    Args:
        q: (B, Tq, H, E) float32, float16 or bfloat16. Any size may be 0.
        k: (B, Tk, Hkv, E), same dtype and device; Hkv divides H (MQA / GQA).
        v: (B, Tk, Hkv, Ev). Ev != E runs on the torch backend only.
        dropout_p: probability in [0, 1) of zeroing each attention weight (survivors scaled by 1/(1 - dropout_p));
            FlashAttention's convention: pass 0.0 for evaluation. Seeded from torch's default CPU generator.
        softmax_scale: multiplies q k^T; default 1/sqrt(E).
        causal: query i sees keys j <= i + Tk - Tq (sets window_size's right to 0).
        window_size: (left, right): query i sees keys i + Tk - Tq - left <= j <= i + Tk - Tq + right; -1 means
            unbounded on that side.
        softcap: > 0 caps the scores: s = softcap * tanh(s / softcap), in the kernels (before ALiBi).
        alibi_slopes: None, or float32 (H,) or (B, H): adds -slope * |i + Tk - Tq - j| to the scores, computed in
            the kernels (no (Tq, Tk) bias is built).
        deterministic: accepted for compatibility; every backward here is deterministic (no atomics).
        return_attn_probs: also return the log-sum-exp of each row. FlashAttention's third result, the dropout
            pattern, is not built: None in its place.
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        out (B, Tq, H, Ev) in q's dtype (contiguous); with return_attn_probs, (out, lse, None) where lse is
        (B, H, Tq) float32 (-inf for rows that see no key) and carries no gradient.
    """
    del deterministic
    fn = _FA_OP
    if (not return_attn_probs and alibi_slopes is None and dropout_p == 0 and type(dropout_p) in (float, int)
            and not _common.is_compiling() and type(q) is torch.Tensor and type(k) is torch.Tensor
            and type(v) is torch.Tensor and q.dim() == 4 and type(window_size) is tuple and len(window_size) == 2
            and type(window_size[0]) is int and type(window_size[1]) is int and type(softcap) in (float, int)
            and (softmax_scale is None or type(softmax_scale) is float)):
        # Eager fast path, as scaled_dot_product_attention's: the cached backend decision, then the C++ entry,
        # which returns None for anything the checks below would reject.
        rec = _dispatch.choice(fn, q.device, backend, (q.dtype, q.shape[-1], v.shape[-1]))
        if rec is not None and rec[0] in _common.EAGER_BACKENDS:
            out = _common.eager_call(_common.C.flash_attn, q, k, v, softmax_scale, bool(causal), window_size[0],
                                     window_size[1], float(softcap))
            if out is not None:
                return out
    _check_qkv(fn, q, k, v, ("q", "k", "v"), "(batch, seqlen, heads, head_dim)", ndim=4)
    B, Tq, H, E = q.shape
    Tk, Hkv, Ev = v.shape[1:]
    if k.shape != (B, Tk, Hkv, E) or v.shape[0] != B:
        raise _Err(f"{fn}: q {tuple(q.shape)} is (B, Tq, H, E), so k must be (B, Tk, Hkv, E) and v (B, Tk, Hkv, Ev); "
                   f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_fa_heads(fn, H, Hkv)
    _fa_scalars(fn, dropout_p, softmax_scale, softcap)
    left, right = _fa_window(fn, causal, window_size)
    alibi = _fa_alibi(fn, alibi_slopes, B, H, q.device)
    scale = 1.0 / math.sqrt(E) if softmax_scale is None else float(softmax_scale)
    out, lse = _run(fn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, dropout_p, scale, left, right,
                    True, float(softcap), alibi, backend)
    out = out.transpose(1, 2).contiguous()
    return (out, lse, None) if return_attn_probs else out


def _check_decode(fn, q, k_cache, v_cache, cache_seqlens):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not _is_float_tensor(t):
            raise _TypeErr(f"{fn}: {name} must be a floating-point tensor, got {_describe(t)}")
        if t.dim() != 4:
            raise _Err(f"{fn}: {name} must be 4-D, got shape {tuple(t.shape)}")
    B, H, Tn, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise _Err(f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the "
                         f"same shape (B, Hkv, Tmax, D)")
    Bk, Hkv, Tmax, Dk = k_cache.shape
    if Bk != B or Dk != D or D < 1:
        raise _Err(f"{fn}: q {tuple(q.shape)} is (B, H, Tn, D) so k_cache/v_cache must be (B={B}, Hkv, Tmax, "
                         f"D={D}), got {tuple(k_cache.shape)}")
    if (Hkv < 1 or H % Hkv) and not H == Hkv == 0:
        raise _Err(f"{fn}: the cache head count {Hkv} must divide the query head count {H}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise _TypeErr(f"{fn}: q, k_cache and v_cache must have the same dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if not q.device == k_cache.device == v_cache.device:
        raise _Err(f"{fn}: q, k_cache and v_cache must be on the same device")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise _TypeErr(f"{fn}: cache_seqlens must be an int32 or int64 tensor, got {_describe(cache_seqlens)}")
    if tuple(cache_seqlens.shape) != (B,):
        raise _Err(f"{fn}: cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise _Err(f"{fn}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    # Values are checked only where it is free: reading a CUDA tensor would synchronize every decode step (the
    # kernels clamp lengths to Tmax, so a bad value there gives wrong rows, never an out-of-bounds read).
    if cache_seqlens.device.type == "cpu" and B and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(cache_seqlens))  # one pass: this runs every decode step
        if lo < max(Tn, 1) or hi > Tmax:
            raise _Err(f"{fn}: cache_seqlens must be in [max(Tn, 1), Tmax] = [{max(Tn, 1)}, {Tmax}] (each "
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
        raise _Err(f"{fn}: scale must be a finite float or None, got {scale!r}")
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    order, why = _auto_order(q.device)
    be = _dispatch.select(fn, q.device, backend, _supports(q.dtype, D, q.device), key=(q.dtype, D), order=order,
                          order_why=why)
    if be == "torch":
        return decode_attention_ref(q, k_cache, v_cache, cache_seqlens, scale)
    return _common.kernel_op("decode_attention", be)(q, k_cache, v_cache, cache_seqlens, scale, 0)


_VARLEN_OP = "flash_attn_varlen_func"


def _check_cu_seqlens(fn, name, cu, total, max_seqlen, device):
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
        raise _TypeErr(f"{fn}: {name} must be a 1-D int32 or int64 tensor, got {_describe(cu)}")
    if cu.numel() < 1:
        raise _Err(f"{fn}: {name} must hold at least one offset (0), got none")
    if cu.device != device:
        raise _Err(f"{fn}: {name} is on {cu.device} but q is on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise _TypeErr(f"{fn}: max_seqlen for {name} must be an int >= 0, got {max_seqlen!r}")
    # Values are checked where that is free: reading a CUDA tensor would synchronize every call. Returns them as a
    # list then (the CPU strategy reuses it), else None.
    if cu.device.type != "cpu" or _common.is_compiling():
        return None
    offs = cu.tolist()
    lens = [b - a for a, b in zip(offs, offs[1:])]
    if offs[0] != 0 or offs[-1] != total or min(lens, default=0) < 0:
        raise _Err(f"{fn}: {name} must start at 0, never decrease and end at the token count {total}; got "
                   f"{offs if len(offs) <= 16 else 'offsets that do not'}")
    if max(lens, default=0) > max_seqlen:
        raise _Err(f"{fn}: a sequence of {max(lens)} tokens is longer than its max_seqlen {max_seqlen}")
    return offs


def sequence_positions(cu_seqlens, total):
    """(seq, pos) int64 (total,): the sequence of each of the total packed tokens and its position in it, from the
    (nseq + 1,) offsets cu_seqlens (on their device, no host sync)."""
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True).clamp_(max=max(cu.numel() - 2, 0))
    return seq, t - cu[seq]


def _pad_index(cu, total, width):
    """Index of each packed token in a (nseq * width) buffer where sequence b fills the LAST lens[b] slots of its
    row: front padding keeps one bottom-right offset (width_k - width_q) right for every sequence."""
    seq, pos = sequence_positions(cu, total)
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    return seq * width + (width - lens[seq]) + pos, lens


# The triton backend runs varlen natively: its kernels read cu_seqlens (triton/attention.py, VARLEN). Registered as
# custom ops with fakes, as the dense ones, so torch.compile traces through them.
def _varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, alibi, scale, window_left, window_right, bottom_right, softcap,
                     dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, scale, window_left, window_right,
                     bottom_right, softcap, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@_common.python_op("attention_varlen_fwd_triton", _varlen_fwd_fake)
def _attention_varlen_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
    alibi: torch.Tensor | None, scale: float, window_left: int, window_right: int, bottom_right: bool, softcap: float,
    dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from gptkernels.triton import attention as tl_attn

    return tl_attn.attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, scale, window_left, window_right,
                                        bottom_right, softcap, dropout_p, seed)


@_common.python_op("attention_varlen_bwd_triton", _varlen_bwd_fake)
def _attention_varlen_bwd_triton(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, alibi: torch.Tensor | None, scale: float,
    window_left: int, window_right: int, bottom_right: bool, softcap: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import attention as tl_attn

    return tl_attn.attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, scale, window_left,
                                        window_right, bottom_right, softcap, dropout_p, seed)


class AttentionVarlenFunction(torch.autograd.Function):
    """Packed q (total_q, H, E), k, v (total_k, Hkv, E) with int32 offsets cu_q, cu_k and the max lengths, on the
    triton varlen ops. args: (scale, window_left, window_right, bottom_right, softcap, dropout_p, seed); returns
    (out (total_q, H, E), lse (H, total_q)), lse not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, alibi, *args):
        out, lse = _common.kernel_op("attention_varlen_fwd", "triton")(q, k, v, cu_q, cu_k, max_q, max_k, alibi, *args)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
        ctx.max_lengths = (max_q, max_k)
        ctx.args = args
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        del dlse  # lse is returned for inspection (return_attn_probs), not differentiated through
        q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
        dq, dk, dv = _common.kernel_op("attention_varlen_bwd", "triton")(dout, q, k, v, out, lse, cu_q, cu_k,
                                                                         *ctx.max_lengths, alibi, *ctx.args)
        return (dq, dk, dv) + (None,) * (5 + len(ctx.args))


# What explain() adds for each varlen strategy.
_VARLEN_NATIVE = "native varlen: the kernels read cu_seqlens (work and memory of the real tokens)"
_VARLEN_PADDED = "padded to max_seqlen: an (nseq, max_seqlen) batch with a key-padding mask"
_VARLEN_LOOP = "one dense call per sequence"

# On the CPU the offsets are free to read, so when padding every sequence to max_seqlen would do more than 1.25x the
# attention work of the sequences themselves, each sequence runs as its own dense call instead (each call costs ~20 us
# of host time, hence the cap on their number).
_VARLEN_PAD_WASTE = 1.25
_VARLEN_LOOP_MAX = 256


def _varlen_loop(fn, q, k, v, lq, lk, dropout_p, scale, left, right, softcap, alibi, backend, return_lse):
    """flash_attn_varlen_func as one dense call per sequence (CPU tensors, offsets as lists)."""
    H, Ev = q.shape[1], v.shape[2]
    outs, lses = [], []
    for b in range(len(lq) - 1):
        if lq[b + 1] == lq[b]:
            continue
        qb = q[lq[b]:lq[b + 1]].transpose(0, 1)[None]  # (1, H, Lq, E)
        kb = k[lk[b]:lk[b + 1]].transpose(0, 1)[None]
        vb = v[lk[b]:lk[b + 1]].transpose(0, 1)[None]
        o, lse = _run(fn, qb, kb, vb, None, dropout_p, scale, left, right, True, float(softcap),
                      None if alibi is None else alibi[b:b + 1] if alibi.shape[0] > 1 else alibi, backend)
        outs.append(o[0].transpose(0, 1))  # (Lq, H, Ev)
        lses.append(lse[0])  # (H, Lq)
    out = torch.cat(outs) if outs else q.new_zeros(0, H, Ev)
    if not return_lse:
        return out
    return out, (torch.cat(lses, dim=1) if lses else q.new_zeros(H, 0, dtype=torch.float32)), None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, backend=None):
    """FlashAttention's ``flash_attn_varlen_func``: attention within each of several packed sequences, no attention
    across them, with :func:`flash_attn_func`'s conventions (bottom-right causal and windows, softcap, ALiBi).

    On the triton backend the kernels read the offsets themselves, as FlashAttention's varlen kernels do: one
    program per (tile of max_seqlen rows, sequence, head), and a tile past its sequence's end exits at once, so the
    work and memory are those of the real tokens (no host synchronization: max_seqlen comes from the caller). The
    other backends gather the sequences into a front-padded (nseq, max_seqlen) batch, run the dense kernels with a
    key-padding mask, and scatter back: the attention itself costs what the padded batch costs. On the CPU, where
    the offsets are free to read, a batch whose padding would cost over 1.25x the sequences' own attention work (and
    has at most 256 sequences) runs one dense call per sequence instead. explain() says which strategy ran.

    Args:
        q: (total_q, H, E); k: (total_k, Hkv, E); v: (total_k, Hkv, Ev); Hkv divides H.
        cu_seqlens_q, cu_seqlens_k: (nseq + 1,) int32 or int64 offsets: sequence b holds tokens
            cu[b] .. cu[b + 1] - 1. Checked on the CPU; on a GPU the values are trusted (reading them would stall).
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence (as FlashAttention requires).
        dropout_p, softmax_scale, causal, window_size, softcap, deterministic, backend: as flash_attn_func.
        alibi_slopes: None, or float32 (H,) or (nseq, H).
        return_attn_probs: also return lse (H, total_q) float32 (and None for the dropout pattern).
        block_table: paged KV caches are not supported (must be None).

    Returns:
        out (total_q, H, Ev) in q's dtype; with return_attn_probs, (out, lse, None).
    """
    del deterministic
    fn = _VARLEN_OP
    _check_qkv(fn, q, k, v, ("q", "k", "v"), "(total_tokens, heads, head_dim)", ndim=3)
    if block_table is not None:
        raise _Err(f"{fn}: block_table (a paged KV cache) is not supported; pass contiguous k and v")
    total_q, H, E = q.shape
    total_k, Hkv, Ev = v.shape
    if k.shape != (total_k, Hkv, E):
        raise _Err(f"{fn}: k must be (total_k, Hkv, E) = ({total_k}, {Hkv}, {E}) to match v {tuple(v.shape)} and q "
                   f"{tuple(q.shape)}, got {tuple(k.shape)}")
    _check_fa_heads(fn, H, Hkv)
    lq = _check_cu_seqlens(fn, "cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, q.device)
    lk = _check_cu_seqlens(fn, "cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise _Err(f"{fn}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                   f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    _fa_scalars(fn, dropout_p, softmax_scale, softcap)
    left, right = _fa_window(fn, causal, window_size)
    nseq = cu_seqlens_q.numel() - 1
    alibi = _fa_alibi(fn, alibi_slopes, nseq, H, q.device)
    scale = 1.0 / math.sqrt(E) if softmax_scale is None else float(softmax_scale)
    mq, mk = int(max_seqlen_q), int(max_seqlen_k)
    order, why = _auto_order(q.device, varlen=True)
    be = _dispatch.select(fn, q.device, backend, _supports(q.dtype, E, q.device, Ev), key=(q.dtype, E, Ev),
                          order=order, order_why=why)
    if be == "triton":
        cu_q, cu_k = (cu if cu.dtype == torch.int32 else cu.to(torch.int32) for cu in (cu_seqlens_q, cu_seqlens_k))
        seed = _draw_seed() if dropout_p > 0 else 0
        out, lse = _common.apply(AttentionVarlenFunction, q, k, v, cu_q, cu_k, mq, mk, alibi, scale, left, right,
                                 True, float(softcap), float(dropout_p), seed)
        _dispatch.note(fn, _VARLEN_NATIVE)
        return (out, lse, None) if return_attn_probs else out
    if lq is not None and 0 < nseq <= _VARLEN_LOOP_MAX:  # CPU offsets, already read by the checks
        work = sum((lq[b + 1] - lq[b]) * (lk[b + 1] - lk[b]) for b in range(nseq))
        if nseq * mq * mk > _VARLEN_PAD_WASTE * work:
            result = _varlen_loop(fn, q, k, v, lq, lk, dropout_p, scale, left, right, softcap, alibi, backend,
                                  return_attn_probs)
            _dispatch.note(fn, _VARLEN_LOOP)
            return result
    iq, _ = _pad_index(cu_seqlens_q, total_q, mq)
    ik, lens_k = _pad_index(cu_seqlens_k, total_k, mk)
    qp = q.new_zeros(nseq * mq, H, E).index_copy(0, iq, q).view(nseq, mq, H, E)
    kp = k.new_zeros(nseq * mk, Hkv, E).index_copy(0, ik, k).view(nseq, mk, Hkv, E)
    vp = v.new_zeros(nseq * mk, Hkv, Ev).index_copy(0, ik, v).view(nseq, mk, Hkv, Ev)
    keys = torch.arange(mk, device=q.device)
    mask = (keys >= mk - lens_k[:, None]).view(nseq, 1, 1, mk)  # the padding slots are hidden
    out, lse = _run(fn, qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), mask, dropout_p, scale, left,
                    right, True, float(softcap), alibi, backend)
    _dispatch.note(fn, _VARLEN_PADDED)
    out = out.transpose(1, 2).reshape(nseq * mq, H, Ev).index_select(0, iq)
    if not return_attn_probs:
        return out
    lse = lse.permute(1, 0, 2).reshape(H, nseq * mq).index_select(1, iq)
    return out, lse, None
