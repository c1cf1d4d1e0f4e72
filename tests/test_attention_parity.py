"""What SDPA and FlashAttention users expect of attention: NaN propagation, empty inputs, CausalBias, SDPA's error
types and head rules, and flash_attn_func against an fp64 reference written here from FlashAttention's definitions
(bottom-right alignment, (left, right) windows, softcap, ALiBi, GQA/MQA, odd length pairs, head dims 32..256).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, backend_params

import gptkernels as gk
from gptkernels._tolerance import rel_err

BACKENDS = backend_params()


# --------------------------------------------------------------------------------------------- fp64 oracle
def fa_ref(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None):
    """FlashAttention's forward in fp64 on (B, T, H, D) tensors: (out (B, Tq, H, Dv), lse (B, H, Tq)).

    Query i sits at key position i + Tk - Tq; it sees key j iff j >= pos - left (left >= 0) and j <= pos + right
    (right >= 0; causal sets right = 0). Scores: scale * q.k, then softcap * tanh(s / softcap), then
    - slope * |pos - j|. A row that sees nothing gives zeros and lse = -inf. Differentiable in q, k, v.
    """
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    Tq, Tk = q.shape[2], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    s = scale * q @ k.transpose(-1, -2)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(Tq)[:, None] + Tk - Tq
    j = torch.arange(Tk)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().reshape(-1, H)[:, :, None, None]
        s = s - slopes * (pos - j).abs()
    left, right = window_size[0], 0 if causal else window_size[1]
    vis = torch.ones(Tq, Tk, dtype=torch.bool)
    if left >= 0:
        vis &= j >= pos - left
    if right >= 0:
        vis &= j <= pos + right
    s = s.masked_fill(~vis, -math.inf)
    m = s.amax(-1, keepdim=True).detach() if Tk else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / den.clamp_min(1e-300)
    lse = torch.where(den > 0, den.log() + m, torch.full_like(m, -math.inf)).squeeze(-1)
    return (p @ v).transpose(1, 2), lse


def _qkv(B, Tq, Tk, H, Hkv, D, device, dtype=torch.float32, Dv=None):
    q = torch.randn(B, Tq, H, D, device=device, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, Dv or D, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=False)


# ------------------------------------------------------------------------------------- flash_attn_func parity
# (B, Tq, Tk, H, Hkv, D, causal, window, softcap, alibi): odd length pairs, bottom-right causal with Tq < Tk and
# Tq > Tk (leading rows see nothing), (left, right) windows, softcap, ALiBi per head and per (batch, head).
FA_CASES = [
    (2, 113, 203, 4, 4, 64, True, (-1, -1), 0.0, None),
    (1, 128, 217, 4, 2, 32, False, (-1, -1), 0.0, None),
    (1, 108, 256, 4, 1, 128, True, (-1, -1), 0.0, None),
    (1, 217, 128, 2, 2, 64, True, (-1, -1), 0.0, None),  # Tq > Tk: rows < 89 see no key
    (1, 113, 203, 2, 1, 64, False, (32, 7), 0.0, None),
    (1, 203, 113, 2, 2, 64, True, (16, -1), 0.0, None),
    (1, 97, 97, 2, 2, 64, False, (-1, 5), 0.0, None),
    (1, 97, 129, 2, 2, 64, False, (9, -1), 0.0, None),
    (1, 113, 203, 4, 2, 64, True, (-1, -1), 2.0, None),
    (1, 113, 203, 4, 2, 64, False, (-1, -1), 0.0, "head"),
    (2, 108, 256, 4, 4, 64, True, (40, -1), 5.0, "batch_head"),
    (1, 33, 65, 2, 2, 256, True, (-1, -1), 0.0, "head"),
    (1, 1, 239, 4, 1, 64, True, (-1, -1), 0.0, None),  # a decode step: the one query sees every key
]
FA_INTERP_CASES = [  # the Triton interpreter is slow: small shapes
    (1, 13, 29, 2, 1, 16, True, (-1, -1), 0.0, None),
    (1, 29, 13, 2, 2, 32, True, (4, -1), 0.0, None),
    (1, 13, 29, 2, 2, 16, False, (3, 2), 1.5, "head"),
    (1, 17, 17, 2, 1, 16, False, (-1, -1), 0.0, "batch_head"),
]


def _fa_case_id(c):
    B, Tq, Tk, H, Hkv, D, causal, w, cap, alibi = c
    return (f"b{B}-q{Tq}k{Tk}-h{H}kv{Hkv}-d{D}" + ("-causal" if causal else "") + (f"-w{w[0]}_{w[1]}" if w != (-1, -1)
            else "") + (f"-cap{cap}" if cap else "") + (f"-alibi_{alibi}" if alibi else ""))


def _run_fa_case(case, backend, device, dtype=torch.float32):
    B, Tq, Tk, H, Hkv, D, causal, window, softcap, alibi = case
    q, k, v = _qkv(B, Tq, Tk, H, Hkv, D, device, dtype)
    # Bigger scores than randn's when capping, so tanh saturates somewhere.
    scale = 4.0 / math.sqrt(D) if softcap else None
    slopes = None
    if alibi == "head":
        slopes = torch.rand(H, device=device) * 0.3
    elif alibi == "batch_head":
        slopes = torch.rand(B, H, device=device) * 0.3
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, softmax_scale=scale)
    out, lse, none = gk.flash_attn_func(q, k, v, return_attn_probs=True, backend=backend, **kw)
    assert none is None and out.shape == (B, Tq, H, D) and out.is_contiguous() and lse.shape == (B, H, Tq)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, lse_ref = fa_ref(q64, k64, v64, **{**kw, "alibi_slopes": None if slopes is None else slopes.cpu()})
    grads_ref = _grads(ref, (q64, k64, v64), dout.cpu().double())
    eager = None
    if dtype != torch.float32:  # the 16-bit yardstick: the same math in the same dtype
        qe, ke, ve = (t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v))
        oe, _ = fa_ref(qe, ke, ve, **{**kw, "alibi_slopes": None if slopes is None else slopes.cpu()})
        eager = (oe.to(dtype), *(g.to(dtype) for g in _grads(oe, (qe, ke, ve), dout.cpu().double())))
    assert_close(out.cpu(), ref, None if eager is None else eager[0], name="out")
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(lse_ref)), "rows that see no key: lse = -inf"
    assert_close(lse.cpu()[finite], lse_ref[finite], name="lse")
    for i, (name, g, gr) in enumerate(zip(("dq", "dk", "dv"), grads, grads_ref)):
        assert_close(g.cpu(), gr, None if eager is None else eager[i + 1], name=name)
    dead = ~finite.any(-1) if Tq else None
    if dead is not None and (~finite).any():
        assert (out.cpu().transpose(1, 2)[~finite] == 0).all(), "rows that see no key give exact zeros"


@pytest.mark.parametrize("case", FA_CASES, ids=_fa_case_id)
@pytest.mark.parametrize("bd", [p for p in BACKENDS if p.id in ("cpu", "torch", "cuda", "triton")])
def test_flash_attn_func_parity(bd, case):
    backend, device = bd
    _run_fa_case(case, backend, device)


@pytest.mark.parametrize("case", FA_INTERP_CASES, ids=_fa_case_id)
@pytest.mark.parametrize("bd", [p for p in BACKENDS if p.id != "torch"])
def test_flash_attn_func_parity_small(bd, case):
    backend, device = bd
    _run_fa_case(case, backend, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bd", [p for p in BACKENDS if p.id in ("cpu", "cuda", "triton")])
def test_flash_attn_func_16bit(bd, dtype):
    backend, device = bd
    for case in (FA_CASES[0], FA_CASES[8], FA_CASES[10]):
        _run_fa_case(case, backend, device, dtype)


@pytest.mark.parametrize("head_dim", [32, 40, 64, 96, 128, 160, 256])
@pytest.mark.parametrize("bd", [p for p in BACKENDS if p.id in ("cpu", "cuda", "triton")])
def test_flash_attn_func_head_dims(bd, head_dim):
    backend, device = bd
    _run_fa_case((1, 37, 53, 2, 1, head_dim, True, (-1, -1), 0.0, None), backend, device)


@pytest.mark.parametrize("bd", [p for p in BACKENDS if p.id != "torch"])
def test_flash_attn_func_dropout_statistics(bd):
    """With q = k = 0 (uniform weights 1/Tk) and v = I, out[i, j] = keep_ij / ((1 - p) Tk): every entry is 0 or
    exactly 1 / ((1 - p) Tk), and the dropped fraction is p within 5 standard deviations."""
    backend, device = bd
    p, Tk = 0.3, 64
    B, Tq, H = (1, 16, 2) if backend == "triton" and device == "cpu" else (2, 128, 4)
    q = torch.zeros(B, Tq, H, Tk, device=device)
    k = torch.zeros(B, Tk, H, Tk, device=device)
    v = torch.eye(Tk, device=device).expand(B, H, Tk, Tk).transpose(1, 2).contiguous()
    out = gk.flash_attn_func(q, k, v, dropout_p=p, backend=backend).cpu()
    kept_value = 1 / ((1 - p) * Tk)
    assert torch.all((out == 0) | ((out - kept_value).abs() <= 1e-6 * kept_value)), "entries are 0 or 1/((1-p)Tk)"
    n = out.numel()
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / n), f"dropped fraction {dropped} vs p = {p} (n = {n})"
    torch.manual_seed(3)
    a = gk.flash_attn_func(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(3)
    b = gk.flash_attn_func(q, k, v, dropout_p=p, backend=backend)
    assert torch.equal(a, b), "torch.manual_seed reproduces the dropout pattern"


def test_flash_attn_func_bad_inputs():
    q = torch.randn(2, 5, 4, 16)
    kv = torch.randn(2, 7, 2, 16)
    with pytest.raises(gk.ArgumentError, match="must be 4-D"):
        gk.flash_attn_func(q[0], kv[0], kv[0])
    with pytest.raises(gk.ArgumentError, match="must divide q's head count 4"):
        gk.flash_attn_func(q, torch.randn(2, 7, 3, 16), torch.randn(2, 7, 3, 16))
    with pytest.raises(gk.ArgumentTypeError, match="window_size must be a pair"):
        gk.flash_attn_func(q, kv, kv, window_size=3)
    with pytest.raises(gk.ArgumentError, match="window_size entries must be >= -1"):
        gk.flash_attn_func(q, kv, kv, window_size=(-2, 0))
    with pytest.raises(gk.ArgumentError, match="softcap must be finite and >= 0"):
        gk.flash_attn_func(q, kv, kv, softcap=-1.0)
    with pytest.raises(gk.ArgumentTypeError, match="alibi_slopes must be a float32 tensor"):
        gk.flash_attn_func(q, kv, kv, alibi_slopes=torch.ones(4, dtype=torch.float64))
    with pytest.raises(gk.ArgumentError, match=r"alibi_slopes must have shape \(H,\)"):
        gk.flash_attn_func(q, kv, kv, alibi_slopes=torch.ones(3))
    with pytest.raises(RuntimeError, match="k must be"):  # SDPA-style code catches RuntimeError
        gk.flash_attn_func(q, torch.randn(2, 7, 2, 8), kv)


# ---------------------------------------------------------------------------------------------------- NaN
def _nan_case(backend, device, causal, where):
    """out and the gradients for q, k, v (1, 2, 4, 16) with an inf in query row 1 or a NaN in key 2, of head 0."""
    q, k, v = (torch.randn(1, 2, 4, 16, device=device) for _ in range(3))
    if where == "q":
        q[0, 0, 1, 3] = math.inf
    else:
        k[0, 0, 2, 5] = math.nan
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = gk.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    return out.cpu(), dq.cpu(), dk.cpu(), dv.cpu()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bd", BACKENDS)
def test_nan_in_query_reaches_every_gradient_it_touches(bd, causal):
    """An inf in query row 1 of head 0 makes its scores +-inf, so its softmax is NaN: out and dq of that row, and dk /
    dv of every key that row sees, are NaN (SDPA agrees). Keys it cannot see (causal: keys 2, 3) get nothing from it,
    and other rows' out and dq, and the other head, stay finite."""
    out, dq, dk, dv = _nan_case(*bd, causal, "q")
    assert out[0, 0, 1].isnan().all() and dq[0, 0, 1].isnan().all()
    seen = slice(0, 2) if causal else slice(0, 4)
    assert dk[0, 0, seen].isnan().all() and dv[0, 0, seen].isnan().all()
    if causal:  # row 1 gives keys 2, 3 exactly nothing: dv finite; dk = sum_i ds_ij q_i meets 0 * inf only in column 3
        assert torch.isfinite(dv[0, 0, 2:]).all()
        assert torch.isfinite(dk[0, 0, 2:, [0, 1, 2, *range(4, 16)]]).all()
    for row in (0, 2, 3):
        assert torch.isfinite(out[0, 0, row]).all() and torch.isfinite(dq[0, 0, row]).all()
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t[0, 1]).all(), "the other head is untouched"


@pytest.mark.parametrize("bd", BACKENDS)
def test_nan_in_key_reaches_every_row_that_sees_it(bd):
    out, dq, dk, dv = _nan_case(*bd, True, "k")  # causal: key 2 is seen by rows 2 and 3
    assert out[0, 0, 2:].isnan().all() and dq[0, 0, 2:].isnan().all()
    # Rows 0, 1 do not see key 2: finite out; dq = sum_j ds_ij k_j meets 0 * NaN only in column 5.
    assert torch.isfinite(out[0, 0, :2]).all() and torch.isfinite(dq[0, 0, :2, [*range(5), *range(6, 16)]]).all()
    assert dk[0, 0, :3].isnan().all() and dv[0, 0, :3].isnan().all()  # keys 0..2 are seen by rows 2, 3
    assert torch.isfinite(dk[0, 1]).all() and torch.isfinite(dv[0, 1]).all()


@pytest.mark.parametrize("bd", BACKENDS)
def test_nan_behind_a_minus_inf_mask_stays_hidden(bd):
    """A -inf mask entry hides its key even when the score is NaN; a fully masked row gives exact zeros."""
    backend, device = bd
    q, k, v = (torch.randn(1, 2, 5, 16, device=device) for _ in range(3))
    k[0, :, 4, 0] = math.nan  # key 4: masked out for every row below
    mask = torch.ones(5, 5, dtype=torch.bool, device=device)
    mask[:, 4] = False
    mask[2] = False  # row 2 sees nothing
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = gk.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for t in (out, grads[1], grads[2]):
        assert torch.isfinite(t).all()
    assert torch.isfinite(grads[0][..., 1:]).all()  # dq = sum_j ds_ij k_j meets 0 * NaN in column 0 only
    assert (out[:, :, 2] == 0).all() and (grads[0][:, :, 2, 1:] == 0).all()
    assert (grads[1][:, :, 4] == 0).all() and (grads[2][:, :, 4] == 0).all()


# ---------------------------------------------------------------------------------------------- zero sizes
EMPTY = [((2, 0, 10, 64), (2, 0, 10, 64)), ((0, 2, 10, 64), (0, 2, 10, 64)), ((2, 2, 0, 64), (2, 2, 0, 64)),
         ((2, 2, 5, 64), (2, 2, 0, 64)), ((2, 2, 0, 64), (2, 2, 7, 64)), ((0, 10, 64), (0, 10, 64))]


@pytest.mark.parametrize("shapes", EMPTY, ids=lambda s: "q{}-kv{}".format(*s))
@pytest.mark.parametrize("bd", BACKENDS)
def test_zero_size_inputs(bd, shapes):
    """SDPA's results: an empty output of the right shape (a row with no key gets zeros), gradients of the inputs'
    shapes (zeros)."""
    backend, device = bd
    qs, ks = shapes
    q = torch.randn(qs, device=device, requires_grad=True)
    k = torch.randn(ks, device=device, requires_grad=True)
    v = torch.randn(ks, device=device, requires_grad=True)
    out = gk.scaled_dot_product_attention(q, k, v, backend=backend)
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    assert out.shape == ref.shape
    assert (out == 0).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out), allow_unused=True)
    for g, t in zip(grads, (q, k, v)):
        assert g is None or (g.shape == t.shape and (g == 0).all())
    fa = gk.flash_attn_func(q.detach().transpose(-3, -2), k.detach().transpose(-3, -2),
                            v.detach().transpose(-3, -2), causal=True, backend=backend) if q.dim() == 4 else None
    assert fa is None or fa.shape == q.transpose(-3, -2).shape


@pytest.mark.parametrize("bd", BACKENDS)
def test_zero_size_decode(bd):
    backend, device = bd
    q = torch.randn(0, 4, 1, 32, device=device)
    kv = torch.randn(0, 2, 9, 32, device=device)
    out = gk.decode_attention(q, kv, kv, torch.zeros(0, dtype=torch.int32, device=device), backend=backend)
    assert out.shape == q.shape
    q = torch.randn(2, 0, 1, 32, device=device)
    kv = torch.randn(2, 0, 9, 32, device=device)
    out = gk.decode_attention(q, kv, kv, torch.tensor([3, 4], dtype=torch.int32, device=device), backend=backend)
    assert out.shape == q.shape


# ------------------------------------------------------------------------------------------------ CausalBias
@pytest.mark.parametrize("lengths", [(23, 56), (56, 23), (17, 17), (1, 40)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("bd", BACKENDS)
def test_causal_bias(bd, variant, lengths):
    """torch.nn.attention.bias.causal_upper_left / causal_lower_right give SDPA's results, without a mask."""
    from torch.nn.attention import bias

    backend, device = bd
    tq, tk = lengths
    make = getattr(bias, f"causal_{variant}")
    q = torch.randn(2, 2, tq, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, tk, 16, device=device, requires_grad=True)
    v = torch.randn(2, 2, tk, 16, device=device, requires_grad=True)
    out = gk.scaled_dot_product_attention(q, k, v, attn_mask=make(tq, tk), backend=backend)
    assert type(out) is torch.Tensor
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=make(tq, tk))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())
    # Rows with no visible key: SDPA's math gives NaN (softmax of an all -inf row), ours zeros.
    ref = torch.nan_to_num(ref, nan=0.0)
    grads_ref = [torch.nan_to_num(g, nan=0.0) for g in grads_ref]
    assert_close(out.cpu(), ref, name="out")
    one_key = tq == 1 and variant == "upper_left"  # the only row sees key 0 alone
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        # A row that sees one key has p = 1 and ds = p (dp - delta) = 0: dq and dk are 0 in exact math, only rounding
        # remains (and rel err of a zero reference measures nothing).
        assert_close(g.cpu(), gr, name=name, atol=1e-6 if one_key and name != "dv" else 0.0)


def test_causal_bias_checks():
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(1, 2, 5, 16)
    k = torch.randn(1, 2, 9, 16)
    with pytest.raises(gk.ArgumentError, match=r"CausalBias for \(Tq, Tk\) = \(5, 8\)"):
        gk.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(5, 8))
    with pytest.raises(gk.ArgumentError, match="cannot be combined with window"):
        gk.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(5, 9), window=3)


class _LoggingTensor(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_unknown_mask_subclass_raises():
    q = torch.randn(1, 2, 5, 16)
    mask = torch.zeros(5, 5).as_subclass(_LoggingTensor)
    with pytest.raises(gk.ArgumentTypeError, match="attn_mask of type _LoggingTensor is not supported"):
        gk.scaled_dot_product_attention(q, q, q, attn_mask=mask)


# ------------------------------------------------------------------------------------------ SDPA's rules
def test_errors_are_runtime_errors_too():
    """Code written for SDPA catches RuntimeError; ours are also ValueError / TypeError."""
    assert issubclass(gk.ArgumentError, ValueError) and issubclass(gk.ArgumentError, RuntimeError)
    assert issubclass(gk.ArgumentTypeError, TypeError) and issubclass(gk.ArgumentTypeError, RuntimeError)
    q = torch.randn(2, 4, 5, 16)
    for call in (lambda: gk.scaled_dot_product_attention(q, torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)),
                 lambda: gk.scaled_dot_product_attention(q.long(), q, q),
                 lambda: gk.scaled_dot_product_attention(q, q, q, dropout_p=1.5),
                 lambda: gk.decode_attention(q, q, q, torch.tensor([1.0, 2.0]))):
        with pytest.raises(RuntimeError):
            call()


@pytest.mark.parametrize("bd", BACKENDS)
def test_value_head_dim_differs(bd):
    """SDPA allows Ev != E (MLA-style): the automatic choice runs it (on the torch backend, saying why); a kernel
    backend asked for by name raises with the reason."""
    backend, device = bd
    q = torch.randn(2, 4, 9, 32, device=device, requires_grad=True)
    k = torch.randn(2, 4, 11, 32, device=device, requires_grad=True)
    v = torch.randn(2, 4, 11, 16, device=device, requires_grad=True)
    if backend != "torch":
        with pytest.raises(gk.BackendUnavailableError, match="value head dim 16 != query/key head dim 32"):
            gk.scaled_dot_product_attention(q, k, v, backend=backend)
        backend = None
    out = gk.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    assert out.shape == (2, 4, 9, 16)
    dout = torch.randn_like(out)
    assert_close(out.cpu(), ref)
    for g, gr in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q64, k64, v64),
                                                                                  dout.cpu().double())):
        assert_close(g.cpu(), gr)
    if backend is None:
        assert gk.last(gk.ops.attention._OP)[0] == "torch"


@pytest.mark.parametrize("bd", BACKENDS)
def test_one_kv_head_broadcasts_without_enable_gqa(bd):
    backend, device = bd
    q = torch.randn(2, 4, 9, 32, device=device)
    k = torch.randn(2, 1, 11, 32, device=device)
    v = torch.randn(2, 1, 11, 32, device=device)
    out = gk.scaled_dot_product_attention(q, k, v, backend=backend)
    ref = F.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double())
    assert_close(out.cpu(), ref)
    with pytest.raises(RuntimeError):  # SDPA raises here too
        gk.scaled_dot_product_attention(q, torch.randn(2, 2, 11, 32, device=device), torch.randn(2, 2, 11, 32,
                                                                                                    device=device))


# ------------------------------------------------------------------------------------- fp32 gradient precision
PRECISION_CASES = [  # (B, H, Hkv, Tq, Tk, D, causal, bias, scale multiplier)
    (1, 4, 4, 97, 97, 64, False, False, 1.0),
    (1, 4, 4, 97, 97, 64, True, False, 1.0),
    (1, 4, 2, 65, 129, 32, False, True, 1.0),
    (1, 4, 4, 97, 97, 64, True, True, 1.0),
    (1, 4, 1, 129, 65, 128, True, False, 1.0),
    (1, 4, 4, 97, 97, 16, False, True, 4.0),
    (1, 4, 4, 97, 97, 64, False, False, 4.0),
    (1, 2, 2, 128, 128, 64, True, True, 4.0),
]


@pytest.mark.parametrize("bd", [p for p in BACKENDS if p.id in ("cpu", "cuda", "triton")])
def test_fp32_gradients_close_to_naive_fp32(bd):
    """fp32 dq, dk, dv errors against fp64 are within 2x those of naive fp32 attention (materialized softmax,
    autograd) on average over the matrix, and within 4x in every case."""
    backend, device = bd
    ratios = []
    for B, H, Hkv, Tq, Tk, D, causal, bias, mult in PRECISION_CASES:
        q = torch.randn(B, H, Tq, D, device=device, requires_grad=True)
        k = torch.randn(B, Hkv, Tk, D, device=device, requires_grad=True)
        v = torch.randn(B, Hkv, Tk, D, device=device, requires_grad=True)
        mask = torch.randn(B, H, Tq, Tk, device=device) * 2 if bias else None
        scale = mult / math.sqrt(D)
        out = gk.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=True, backend=backend)
        dout = torch.randn_like(out)
        ours = torch.autograd.grad(out, (q, k, v), dout)
        add = torch.zeros(Tq, Tk) if mask is None else mask.cpu()
        if causal:
            add = add + torch.full((Tq, Tk), -math.inf).triu(1)
        refs = {}
        for dt in (torch.float64, torch.float32):
            qq, kk, vv = (t.detach().cpu().to(dt).requires_grad_() for t in (q, k, v))
            o = F.scaled_dot_product_attention(qq, kk.repeat_interleave(H // Hkv, 1), vv.repeat_interleave(H // Hkv, 1),
                                               attn_mask=add.to(dt), scale=scale)
            refs[dt] = torch.autograd.grad(o, (qq, kk, vv), dout.cpu().to(dt))
        for g, g64, g32 in zip(ours, refs[torch.float64], refs[torch.float32]):
            ratios.append(rel_err(g.cpu(), g64) / max(rel_err(g32, g64), 1e-9))
    mean = sum(ratios) / len(ratios)
    print(f"ours / naive fp32 error: mean {mean:.2f}, max {max(ratios):.2f}")
    assert mean <= 2.0 and max(ratios) <= 4.0, f"mean {mean:.2f}, max {max(ratios):.2f}: {ratios}"


# ---------------------------------------------------------------------------------------------------- varlen
VARLEN_CASES = [  # (lengths q, lengths k, H, Hkv, D, causal, window, alibi)
    ([5, 17, 1, 30], [5, 17, 1, 30], 4, 2, 32, True, (-1, -1), False),
    ([3, 11, 8], [9, 11, 20], 2, 2, 64, True, (-1, -1), False),  # bottom-right per sequence
    ([12, 0, 7], [12, 4, 7], 2, 1, 32, False, (4, 2), True),  # an empty query sequence
    ([9, 6], [4, 6], 2, 2, 16, True, (-1, -1), False),  # Tq > Tk in the first: leading rows see nothing
]


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.mark.parametrize("path", ["padded", "per_sequence"])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"q{c[0]}-k{c[1]}-h{c[2]}kv{c[3]}-d{c[4]}")
@pytest.mark.parametrize("bd", BACKENDS)
def test_flash_attn_varlen_func(bd, case, path, monkeypatch):
    """Each packed sequence against fa_ref on that sequence alone: no attention across sequences. Both strategies:
    the front-padded batch, and (CPU tensors only) one dense call per sequence."""
    backend, device = bd
    if path == "per_sequence" and device != "cpu":
        pytest.skip("one call per sequence is the CPU strategy (it reads the offsets on the host)")
    from gptkernels.ops import attention as attn_mod

    monkeypatch.setattr(attn_mod, "_VARLEN_PAD_WASTE", math.inf if path == "padded" else 0.0)
    lq, lk, H, Hkv, D, causal, window, alibi = case
    q = torch.randn(sum(lq), H, D, device=device, requires_grad=True)
    k = torch.randn(sum(lk), Hkv, D, device=device, requires_grad=True)
    v = torch.randn(sum(lk), Hkv, D, device=device, requires_grad=True)
    slopes = torch.rand(len(lq), H, device=device) * 0.3 if alibi else None
    out, lse, _ = gk.flash_attn_varlen_func(q, k, v, _cu(lq, device), _cu(lk, device), max(lq), max(lk),
                                            causal=causal, window_size=window, alibi_slopes=slopes,
                                            return_attn_probs=True, backend=backend)
    assert out.shape == (sum(lq), H, D) and lse.shape == (H, sum(lq))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    outs, lses = [], []
    cq, ck = _cu(lq, "cpu").tolist(), _cu(lk, "cpu").tolist()
    for b in range(len(lq)):
        o, l_ = fa_ref(q64[None, cq[b]:cq[b + 1]], k64[None, ck[b]:ck[b + 1]], v64[None, ck[b]:ck[b + 1]],
                       causal=causal, window_size=window, alibi_slopes=None if slopes is None else slopes[b].cpu())
        outs.append(o[0])
        lses.append(l_[0])
    ref = torch.cat(outs)
    lse_ref = torch.cat(lses, dim=1)
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), dout.cpu().double())
    assert_close(out.cpu(), ref, name="out")
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(lse_ref))
    fin = torch.isfinite(lse_ref)
    assert_close(lse.cpu()[fin], lse_ref[fin], name="lse")
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(g.cpu(), gr, name=name)


def test_flash_attn_varlen_func_bad_offsets():
    q = torch.randn(10, 2, 16)
    with pytest.raises(gk.ArgumentError, match="end at the token count 10"):
        gk.flash_attn_varlen_func(q, q, q, _cu([4, 5], "cpu"), _cu([4, 5], "cpu"), 5, 5)
    with pytest.raises(gk.ArgumentError, match="longer than its max_seqlen 4"):
        gk.flash_attn_varlen_func(q, q, q, _cu([4, 6], "cpu"), _cu([4, 6], "cpu"), 4, 6)
    with pytest.raises(gk.ArgumentTypeError, match="cu_seqlens_q must be a 1-D int32 or int64"):
        gk.flash_attn_varlen_func(q, q, q, _cu([4, 6], "cpu").float(), _cu([4, 6], "cpu"), 6, 6)
    with pytest.raises(gk.ArgumentError, match="block_table"):
        gk.flash_attn_varlen_func(q, q, q, _cu([4, 6], "cpu"), _cu([4, 6], "cpu"), 6, 6, block_table=q)
