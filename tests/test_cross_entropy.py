"""cross_entropy and linear_cross_entropy on every backend against an fp64 reference (F.cross_entropy in float64 on
the same inputs, plus the z-loss and softcap terms)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close, backend_params

from gptkernels import ArgumentError, ArgumentTypeError, _dispatch
from gptkernels.ops import cross_entropy as ce_mod
from gptkernels.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_ref,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def _skip_interp(backend, device, dtype, n=1, v=1):
    if backend != "triton" or device != "cpu":
        return
    if dtype == torch.bfloat16:
        # triton 3.8's interpreter casts fp32 -> bf16 by truncation, not round-to-nearest-even as the GPU does.
        pytest.skip("Triton interpreter truncates fp32->bf16; bf16 Triton runs in the gpu-marked tests")
    if n * v > (300_000 if dtype == torch.float32 else 100_000):
        pytest.skip("Triton interpreter: this shape is too slow (in this dtype); the GPU runs it")


def _targets(shape, v, p_ignore=0.0):
    t = torch.randint(0, v, shape)
    if p_ignore:
        t[torch.rand(shape) < p_ignore] = IGNORE
    return t


def _eager(x, t, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """Plain PyTorch in x's own dtype (the 16-bit yardstick), class dim last."""
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    t1 = t.reshape(-1)
    if softcap:
        x2 = softcap * torch.tanh(x2 / softcap)
    loss = F.cross_entropy(x2, t1, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    keep = t1 != ignore_index
    if z_loss:
        loss = loss + torch.where(keep, z_loss * torch.logsumexp(x2, -1).square(), 0.0).to(loss.dtype)
    if reduction == "none":
        return loss.reshape(t.shape)
    s = loss.float().sum()
    return (s / keep.sum() if reduction == "mean" else s).to(x.dtype)


def _grads(out, inputs, dy):
    return torch.autograd.grad((out.double() * dy).sum(), inputs)


# (name, logits shape, target ignore fraction, kwargs)
CE_CASES = [
    ("v1", (4, 1), 0.0, {}),
    ("v3-sum", (5, 3), 0.0, {"reduction": "sum"}),
    ("odd-none", (37, 97), 0.2, {"reduction": "none"}),
    ("btv", (2, 9, 123), 0.2, {}),
    ("ls", (19, 300), 0.3, {"label_smoothing": 0.1}),
    ("ls-none", (7, 301), 0.3, {"label_smoothing": 0.25, "reduction": "none"}),
    ("zloss", (13, 517), 0.1, {"z_loss": 1e-2}),
    ("softcap", (11, 259), 0.1, {"softcap": 4.0}),
    ("all-sum", (9, 1000), 0.3, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0, "reduction": "sum"}),
    ("gpt2", (3, 50257), 0.0, {}),
    ("gpt2-all", (2, 50257), 0.0, {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}),
    ("v262144", (2, 262144), 0.0, {"label_smoothing": 0.05}),
]


def _check_ce(backend, device, x, t, dtype, fp32_bound=1e-5, **kw):
    """Runs cross_entropy on (backend, device); checks the loss and dlogits against fp64 and, for 16-bit, eager."""
    opts = {"ignore_index": IGNORE, "reduction": "mean", "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None}
    opts.update(kw)
    xd = x.to(dtype).to(device).requires_grad_()
    td = t.to(device)
    out = cross_entropy(xd, td, opts["ignore_index"], opts["reduction"], opts["label_smoothing"],
                        z_loss=opts["z_loss"], softcap=opts["softcap"], backend=backend)
    assert _dispatch.last("cross_entropy")[0] == backend
    assert out.dtype == dtype and out.device == xd.device
    assert out.shape == (t.shape if opts["reduction"] == "none" else ())
    dy = torch.randn(out.shape, dtype=torch.float64)
    (dx,) = _grads(out, [xd], dy.to(device))
    x64 = xd.detach().cpu().double().requires_grad_()
    ref = cross_entropy_ref(x64, t, **opts)
    (dref,) = _grads(ref, [x64], dy)
    eager = (None, None)
    if dtype in (torch.float16, torch.bfloat16):
        xe = xd.detach().cpu().requires_grad_()
        ye = _eager(xe, t, **opts)
        eager = (ye, _grads(ye, [xe], dy)[0])
    assert_close(out, ref, eager[0], "loss", fp32_bound=fp32_bound)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, dref, eager[1], "dlogits", fp32_bound=fp32_bound)
    return out, dx


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CE_CASES, ids=[c[0] for c in CE_CASES])
def test_cross_entropy_matches_fp64(bd, dtype, case):
    backend, device = bd
    name, shape, p_ignore, kw = case
    v = shape[-1]
    _skip_interp(backend, device, dtype, math.prod(shape[:-1]), v)
    if v > 60000 and dtype != torch.float32 and device == "cpu":
        pytest.skip("the widest rows run in fp32 only on CPU (time); every dtype runs on the GPU")
    x = 3 * torch.randn(shape)
    t = _targets(shape[:-1], v, p_ignore)
    # The torch backend is eager PyTorch in fp32: its log_softmax sums a 262144-wide row with errors that reach 6e-5
    # relative in dlogits (measured, 3 of 14 seeds over 1e-5); the kernels sum in blocks and stay inside 1e-5.
    bound = 1e-4 if backend == "torch" and v > 65536 else 1e-5
    _check_ce(backend, device, x, t, dtype, fp32_bound=bound, **kw)


# (name, N, C, V, bias, ignore fraction, kwargs)
LCE_CASES = [
    ("mean-bias", 37, 24, 301, True, 0.2, {}),
    ("sum", 19, 16, 97, False, 0.0, {"reduction": "sum"}),
    ("none-ls", 23, 16, 203, True, 0.2, {"reduction": "none", "label_smoothing": 0.1}),
    ("zloss-softcap", 29, 32, 150, False, 0.1, {"z_loss": 1e-2, "softcap": 3.0}),
    ("v3", 11, 8, 3, True, 0.0, {}),
]


def _check_lce(backend, device, h, w, b, t, dtype, **kw):
    opts = {"ignore_index": IGNORE, "reduction": "mean", "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None}
    opts.update(kw)
    args = [a.detach().to(dtype).to(device).requires_grad_() if a is not None else None for a in (h, w, b)]
    hd, wd, bd_ = args
    td = t.to(device)
    out = linear_cross_entropy(hd, wd, td, bd_, opts["ignore_index"], opts["reduction"], opts["label_smoothing"],
                               z_loss=opts["z_loss"], softcap=opts["softcap"], backend=backend)
    assert _dispatch.last("linear_cross_entropy")[0] == backend
    assert out.dtype == dtype and out.shape == (t.shape if opts["reduction"] == "none" else ())
    inputs = [a for a in args if a is not None]
    dy = torch.randn(out.shape, dtype=torch.float64)
    grads = _grads(out, inputs, dy.to(device))
    a64 = [a.detach().cpu().double().requires_grad_() for a in inputs]
    b64 = a64[2] if b is not None else None
    ref = linear_cross_entropy_ref(a64[0], a64[1], t, b64, **opts)
    grads64 = _grads(ref, a64, dy)
    eager = (None, [None] * len(inputs))
    if dtype in (torch.float16, torch.bfloat16):
        ae = [a.detach().cpu().requires_grad_() for a in inputs]
        logits = F.linear(ae[0], ae[1], ae[2] if b is not None else None)
        ye = _eager(logits, t, **opts)
        eager = (ye, list(_grads(ye, ae, dy)))
    assert_close(out, ref, eager[0], "loss")
    for name, g, g64, ge, a in zip(["dh", "dweight", "dbias"], grads, grads64, eager[1], inputs):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        assert_close(g, g64, ge, name)
    return out, grads


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LCE_CASES, ids=[c[0] for c in LCE_CASES])
def test_linear_cross_entropy_matches_fp64(bd, dtype, case, monkeypatch):
    backend, device = bd
    name, n, c, v, bias, p_ignore, kw = case
    _skip_interp(backend, device, dtype, n, v)
    # chunks of 7 rows (fp32; 14 for 16-bit): several chunks, and N is not a multiple of the chunk
    monkeypatch.setattr(ce_mod, "_CHUNK_BYTES", 7 * v * 4)
    h = torch.randn(n, c)
    w = torch.randn(v, c) / math.sqrt(c) * 2
    b = torch.randn(v) if bias else None
    _check_lce(backend, device, h, w, b, _targets((n,), v, p_ignore), dtype, **kw)


@pytest.mark.parametrize("bd", backend_params())
def test_linear_cross_entropy_noncontiguous_3d_and_partial_grads(bd, monkeypatch):
    """A (B, T, C) h that is a transposed view, a weight that is a transposed view, and grads wanted only for some
    inputs (a frozen weight; a frozen h)."""
    backend, device = bd
    monkeypatch.setattr(ce_mod, "_CHUNK_BYTES", 5 * 64 * 4)
    h = torch.randn(2, 24, 9).transpose(1, 2)  # (2, 9, 24), not contiguous
    w = torch.randn(24, 64).t() / 3  # (64, 24), column-major
    t = _targets((2, 9), 64, 0.2)
    _check_lce(backend, device, h, w, None, t, torch.float32, reduction="sum")
    # only h needs grad / only the weight does
    hd, wd = h.to(device), w.to(device)
    for needs in ((True, False), (False, True)):
        ha, wa = hd.clone().requires_grad_(needs[0]), wd.clone().requires_grad_(needs[1])
        out = linear_cross_entropy(ha, wa, t.to(device), backend=backend)
        (g,) = torch.autograd.grad(out, [ha if needs[0] else wa])
        h64, w64 = hd.double().cpu().requires_grad_(), wd.double().cpu().requires_grad_()
        (g64,) = torch.autograd.grad(linear_cross_entropy_ref(h64, w64, t), [h64 if needs[0] else w64])
        assert_close(g, g64, name="partial grad")


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id != "torch"])  # torch: eager autograd
def test_linear_second_backward_fails_loudly(bd):
    """mean/sum scale the saved dh, dW in place in backward: a retained graph must not scale them twice."""
    backend, device = bd
    h = torch.randn(6, 4, device=device, requires_grad=True)
    w = torch.randn(10, 4, device=device, requires_grad=True)
    loss = linear_cross_entropy(h, w, _targets((6,), 10).to(device), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id != "torch"])
def test_linear_under_autocast_runs_in_h_dtype(bd):
    """An enclosing autocast does not reach the chunk GEMMs: fp32 h and weight give the fp32 result."""
    backend, device = bd
    h = torch.randn(9, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    t = _targets((9,), 40, 0.2).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, t, backend=backend)
    gh, gw = torch.autograd.grad(out, [h, w])
    h64, w64 = (a.detach().double().cpu().requires_grad_() for a in (h, w))
    ref = linear_cross_entropy_ref(h64, w64, t.cpu())
    rh, rw = torch.autograd.grad(ref, [h64, w64])
    assert out.dtype == torch.float32
    for name, a, r in (("loss", out, ref), ("dh", gh, rh), ("dweight", gw, rw)):
        assert_close(a, r, name=name)


@pytest.mark.parametrize("bd", backend_params())
def test_noncontiguous_logits_and_stride0_grads(bd):
    backend, device = bd
    x = (3 * torch.randn(300, 12)).t()  # (12, 300), column stride 12
    t = _targets((12,), 300, 0.2)
    for reduction in ("none", "sum"):
        _check_ce(backend, device, x, t, torch.float32, reduction=reduction)
    # "none" then .sum(): the kernel gets an expanded (stride-0) gradient
    xd = x.to(device).requires_grad_()
    (dx,) = torch.autograd.grad(cross_entropy(xd, t.to(device), reduction="none", backend=backend).sum(), [xd])
    x64 = x.double().requires_grad_()
    (d64,) = torch.autograd.grad(F.cross_entropy(x64, t, reduction="sum"), [x64])
    assert_close(dx, d64, name="dlogits (stride-0 dy)")
    # a (B, T) "none" loss with a broadcast (B, 1) gradient
    x3 = (3 * torch.randn(3, 5, 40)).to(device).requires_grad_()
    t3 = _targets((3, 5), 40, 0.2).to(device)
    dy = torch.randn(3, 1, dtype=torch.float32, device=device).expand(3, 5)
    (dx3,) = torch.autograd.grad(cross_entropy(x3, t3, reduction="none", backend=backend), [x3], dy)
    x64 = x3.detach().double().cpu().requires_grad_()
    (d64,) = torch.autograd.grad(cross_entropy_ref(x64, t3.cpu(), reduction="none"), [x64], dy.double().cpu())
    assert_close(dx3, d64, name="dlogits (broadcast dy)")


@pytest.mark.parametrize("bd", backend_params())
def test_linear_none_with_stride0_grad(bd, monkeypatch):
    backend, device = bd
    monkeypatch.setattr(ce_mod, "_CHUNK_BYTES", 4 * 50 * 4)
    h = torch.randn(13, 16, device=device, requires_grad=True)
    w = torch.randn(50, 16, device=device, requires_grad=True)
    t = _targets((13,), 50, 0.2).to(device)
    loss = linear_cross_entropy(h, w, t, reduction="none", backend=backend)
    gh, gw = torch.autograd.grad(loss.sum(), [h, w])  # expanded ones
    h64, w64 = (a.detach().double().cpu().requires_grad_() for a in (h, w))
    rh, rw = torch.autograd.grad(linear_cross_entropy_ref(h64, w64, t.cpu(), reduction="sum"), [h64, w64])
    assert_close(gh, rh, name="dh")
    assert_close(gw, rw, name="dweight")


@pytest.mark.parametrize("bd", backend_params())
def test_all_ignored_and_ignored_nan_rows(bd):
    backend, device = bd
    x = torch.randn(6, 50, device=device, requires_grad=True)
    t = torch.full((6,), IGNORE, device=device)
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0)):
        out = cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, backend=backend)
        ref = F.cross_entropy(x.detach().cpu().double(), t.cpu(), reduction=reduction, label_smoothing=0.1)
        assert math.isnan(out.item()) == math.isnan(expect) and math.isnan(ref.item()) == math.isnan(expect)
        if not math.isnan(expect):
            assert out.item() == 0.0
        (dx,) = torch.autograd.grad(out, [x])
        assert (dx == 0).all(), "ignored rows must get a zero gradient"
    h = torch.randn(6, 8, device=device, requires_grad=True)
    w = torch.randn(50, 8, device=device, requires_grad=True)
    out = linear_cross_entropy(h, w, t, backend=backend)
    assert math.isnan(out.item())
    gh, gw = torch.autograd.grad(out, [h, w])
    assert (gh == 0).all() and (gw == 0).all()
    # An ignored row full of NaN: loss 0, gradient 0; the other rows are untouched.
    xn = torch.randn(4, 30, device=device)
    xn[1] = float("nan")
    xn.requires_grad_()
    tn = torch.tensor([3, IGNORE, 7, 0], device=device)
    out = cross_entropy(xn, tn, reduction="none", backend=backend)
    assert out[1].item() == 0.0 and torch.isfinite(out).all()
    (dx,) = torch.autograd.grad(out.sum(), [xn])
    assert (dx[1] == 0).all() and torch.isfinite(dx).all()


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("where", ["target-col", "other-col"])
def test_nan_propagates_in_its_row(bd, where):
    backend, device = bd
    x = torch.randn(4, 70)
    t = torch.tensor([5, 9, 0, 69])
    x[2, 0 if where == "target-col" else 33] = float("nan")
    x[3, 69] = float("inf")  # +inf: NaN as eager's log_softmax (inf - inf)
    xd = x.to(device).requires_grad_()
    for kw in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 10.0}):
        out = cross_entropy(xd, t.to(device), reduction="none", backend=backend, **kw)
        (dx,) = torch.autograd.grad(out.sum(), [xd])
        out, dx = out.cpu(), dx.cpu()
        assert torch.isnan(out[2]) and torch.isfinite(out[:2]).all(), (kw, out)
        assert torch.isnan(dx[2]).all() and torch.isfinite(dx[:2]).all(), kw
        if not kw.get("softcap"):  # softcap maps +inf to the finite softcap
            assert torch.isnan(out[3]) and torch.isnan(dx[3]).all(), kw
        total = cross_entropy(xd, t.to(device), backend=backend, **kw)
        assert torch.isnan(total)


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.values[0][1] == "cpu"])
def test_cpu_target_out_of_range_raises(bd):
    backend, device = bd
    x = torch.randn(5, 10)
    for bad in (10, -1, 1000):
        t = torch.tensor([1, 2, bad, IGNORE, 3])
        with pytest.raises(ArgumentError, match=rf"target: class index {bad} at position 2 is outside \[0, 10\)"):
            cross_entropy(x, t, backend=backend)
        with pytest.raises(ArgumentError, match=r"target: .*outside \[0, 10\)"):
            cross_entropy(x.requires_grad_(), t, reduction="none", backend=backend)
        with pytest.raises(ArgumentError, match=r"linear_cross_entropy: target: .*outside \[0, 10\)"):
            linear_cross_entropy(torch.randn(5, 4, requires_grad=True), torch.randn(10, 4), t, backend=backend)
    x.requires_grad_(False)
    # ignore_index itself may be any value, in range or not
    out = cross_entropy(x, torch.tensor([1, 2, 3, 4, 3]), ignore_index=3, backend=backend)
    ref = F.cross_entropy(x.double(), torch.tensor([1, 2, 3, 4, 3]), ignore_index=3)
    assert_close(out, ref, name="ignore_index in range")


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(ArgumentTypeError, match="target must be an int64 tensor of class indices.*int32"):
        cross_entropy(x, t.int())
    with pytest.raises(ArgumentTypeError, match="logits must be a floating-point tensor"):
        cross_entropy(x.long(), t)
    with pytest.raises(ArgumentError, match=r"target of shape \(5,\) must have logits' shape"):
        cross_entropy(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ArgumentError, match="reduction must be one of mean, sum, none"):
        cross_entropy(x, t, reduction="avg")
    with pytest.raises(ArgumentError, match=r"label_smoothing must be in \[0, 1\]"):
        cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ArgumentError, match="z_loss must be finite and >= 0"):
        cross_entropy(x, t, z_loss=-1.0)
    with pytest.raises(ArgumentError, match="softcap must be finite and > 0"):
        cross_entropy(x, t, softcap=0.0)
    with pytest.raises(ArgumentError, match="class dim .* of size >= 1"):
        cross_entropy(torch.randn(4, 0), t)
    with pytest.raises(ArgumentError, match=r"weight must be \(V, C\) with C = h.size\(-1\) = 8"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), t)
    with pytest.raises(ArgumentTypeError, match="weight dtype torch.float16 must match h's torch.float32"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8).half(), t)
    with pytest.raises(ArgumentError, match=r"bias must be \(V,\) = \(10,\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), t, torch.randn(9))
    with pytest.raises(ArgumentError, match=r"target of shape \(3,\) must be h's shape"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), t[:3])
    if HAS_CUDA:
        with pytest.raises(ArgumentError, match="target is on cuda:0 but logits is on cpu"):
            cross_entropy(x, t.cuda())
        with pytest.raises(ArgumentError, match="weight is on cuda:0 but h is on cpu"):
            linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8, device="cuda"), t)
    with pytest.raises(_dispatch.BackendUnavailableError, match="cpu.*dtype torch.float64 not supported"):
        cross_entropy(x.double(), t, backend="cpu")
    if not HAS_CUDA:
        with pytest.raises(_dispatch.BackendUnavailableError, match="cuda"):
            cross_entropy(x, t, backend="cuda")
    cross_entropy(x.double(), t)  # auto falls back to the torch reference and says why
    backend, why = _dispatch.last("cross_entropy")
    assert backend == "torch" and "float64 not supported" in why


def test_reference_is_f_cross_entropy():
    """The fp64 reference is F.cross_entropy itself where the op's extras are off; z_loss and softcap checked against
    log_softmax written out."""
    x = (3 * torch.randn(2, 7, 33, dtype=torch.float64)).requires_grad_()
    t = _targets((2, 7), 33, 0.3)
    for reduction in ("mean", "sum", "none"):
        for ls in (0.0, 0.2):
            ours = cross_entropy_ref(x, t, IGNORE, reduction, ls)
            theirs = F.cross_entropy(x.transpose(1, 2), t, ignore_index=IGNORE, reduction=reduction,
                                     label_smoothing=ls)
            torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    z = 4.0 * torch.tanh(x / 4.0)
    logp = torch.log_softmax(z, -1)
    keep = t != IGNORE
    nll = -logp.gather(-1, t.clamp_min(0)[..., None])[..., 0]
    rows = torch.where(keep, 0.9 * nll + 0.1 * (-logp.mean(-1)) + 1e-2 * torch.logsumexp(z, -1) ** 2, 0.0)
    ours = cross_entropy_ref(x, t, IGNORE, "mean", 0.1, z_loss=1e-2, softcap=4.0)
    torch.testing.assert_close(ours, rows.sum() / keep.sum(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id != "torch"])  # torch: no custom op
def test_opcheck(bd, monkeypatch):
    backend, device = bd
    from gptkernels.ops._common import registered_op

    monkeypatch.setattr(ce_mod, "_CHUNK_BYTES", 4 * 40 * 4)
    x = torch.randn(9, 40, device=device)
    t = _targets((9,), 40, 0.3).to(device)
    fwd, bwd = registered_op("cross_entropy_fwd", backend), registered_op("cross_entropy_bwd", backend)
    for args in ((IGNORE, 0.0, 0.0, 0.0), (IGNORE, 0.1, 1e-3, 5.0)):
        torch.library.opcheck(fwd, (x, t, *args))
        _, lse = fwd(x, t, *args)
        torch.library.opcheck(bwd, (torch.randn(9, device=device), x, t, lse, *args))
        torch.library.opcheck(bwd, (torch.ones(1, device=device).expand(9), x, t, lse, *args))
    if backend in ("cpu", "cuda"):
        torch.library.opcheck(torch.ops.gptkernels.cross_entropy_fwd_bwd, (x.clone(), t, None, IGNORE, 0.1, 0.0, 0.0))
        torch.library.opcheck(torch.ops.gptkernels.cross_entropy_fwd_bwd,
                              (x.clone(), t, torch.randn(9, device=device), IGNORE, 0.0, 1e-3, 3.0))
    lf, lb = registered_op("linear_cross_entropy_fwd", backend), registered_op("linear_cross_entropy_bwd", backend)
    h, w, b = torch.randn(9, 8, device=device), torch.randn(40, 8, device=device), torch.randn(40, device=device)
    cases = ((b, (True, True, True)), (None, (True, False, False)), (b, (False, False, False)))
    for bias, need in cases if backend != "triton" or device != "cpu" else cases[:1]:  # the interpreter is slow
        torch.library.opcheck(lf, (h, w, bias, t, IGNORE, 0.1, 1e-3, 0.0, *need))
        torch.library.opcheck(lb, (torch.randn(9, device=device), h, w, bias, t, IGNORE, 0.0, 0.0, 4.0, *need))


@pytest.mark.parametrize(
    "backend",
    ["cpu", "torch", pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("triton", marks=pytest.mark.gpu)],
)
def test_torch_compile_fullgraph(backend, monkeypatch):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    monkeypatch.setattr(ce_mod, "_CHUNK_BYTES", 4 * 64 * 4)
    torch._dynamo.reset()

    def losses(x, t, h, w, b):
        a = cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3, backend=backend)
        c = cross_entropy(x, t, reduction="none", softcap=5.0, backend=backend).sum()
        d = linear_cross_entropy(h, w, t, b, backend=backend)
        e = linear_cross_entropy(h, w, t, b, reduction="none", backend=backend).sum()
        return a + c + d + e

    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    t = _targets((2, 5), 64, 0.2).to(device)
    h = torch.randn(2, 5, 16, device=device, requires_grad=True)
    w = torch.randn(64, 16, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    compiled = torch.compile(losses, fullgraph=True)
    out = compiled(x, t, h, w, b)
    grads = torch.autograd.grad(out, (x, h, w, b))
    ref = losses(x, t, h, w, b)
    ref_grads = torch.autograd.grad(ref, (x, h, w, b))
    assert_close(out, ref, name="compiled loss")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, name="compiled grad")


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id in ("cpu", "cuda")])
def test_eager_entry_matches_checked_path(bd, monkeypatch):
    """The C++ eager entry (checks, autograd, kernel and reduction in one call) gives bit-identical losses and
    gradients to the Python path through the registered ops."""
    backend, device = bd
    from gptkernels.ops import _common

    if not hasattr(_common.C, "cross_entropy"):
        pytest.skip("this build of the extension has no eager cross_entropy entry")
    x = (3 * torch.randn(2, 7, 301)).to(device)
    t = _targets((2, 7), 301, 0.3).to(device)
    dy = torch.randn(2, 7, device=device)
    cross_entropy(x, t, backend=backend)  # fills the backend decision cache the entry is gated on
    for kw in ({}, {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0},
               {"reduction": "sum", "ignore_index": 4}):
        results = []
        for eager in (True, False):
            if not eager:
                monkeypatch.setattr(ce_mod, "_EAGER", ())
            xa = x.clone().requires_grad_()
            tk = torch.where(t == IGNORE, kw.get("ignore_index", IGNORE), t)
            out = cross_entropy(xa, tk, backend=backend, **kw)
            results.append((out, torch.autograd.grad(out, [xa], dy if out.dim() else None)[0]))
            monkeypatch.undo()
        assert torch.equal(results[0][0], results[1][0]), kw
        assert torch.equal(results[0][1], results[1][1]), kw
    calls = []
    monkeypatch.setattr(_common, "eager_call", lambda *a: calls.append(a) or None)
    cross_entropy(x, t, backend=backend)
    assert calls, "a plain call must try the eager entry"


@pytest.mark.parametrize("bd", backend_params())
def test_no_grad_and_empty(bd):
    backend, device = bd
    x = torch.randn(7, 20, device=device)
    t = _targets((7,), 20, 0.2).to(device)
    with torch.no_grad():
        out = cross_entropy(x.requires_grad_(), t, backend=backend)
        lout = linear_cross_entropy(torch.randn(7, 4, device=device), torch.randn(20, 4, device=device), t,
                                    backend=backend)
    assert not out.requires_grad and not lout.requires_grad
    assert_close(out, F.cross_entropy(x.detach().double().cpu(), t.cpu()), name="no-grad loss")
    e = torch.randn(0, 20, device=device, requires_grad=True)
    te = torch.zeros(0, dtype=torch.long, device=device)
    assert math.isnan(cross_entropy(e, te, backend=backend).item())
    assert cross_entropy(e, te, reduction="none", backend=backend).shape == (0,)
    s = cross_entropy(e, te, reduction="sum", backend=backend)
    s.backward()
    assert s.item() == 0.0 and e.grad.shape == (0, 20)
    he = torch.randn(0, 4, device=device, requires_grad=True)
    we = torch.randn(20, 4, device=device, requires_grad=True)
    s = linear_cross_entropy(he, we, te, reduction="sum", backend=backend)
    gh, gw = torch.autograd.grad(s, [he, we])
    assert s.item() == 0.0 and gh.shape == (0, 4) and (gw == 0).all()
    assert math.isnan(linear_cross_entropy(he, we, te, backend=backend).item())
