"""LayerNorm / RMSNorm (+ fused residual) on every backend against an fp64 reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, HAS_CUDA, assert_close, backend_params

import gptkernels
from gptkernels.ops.layernorm import layer_norm_ref

SHAPES = [(1, 1), (3, 7), (6, 42, 123), (2, 781), (2, 1023), (2, 4097), (1, 65537)]
BIG = 4097  # the Triton interpreter is slow: above this many columns it runs one dtype only


def _eager(x, w, b, r, eps, rms):
    """Plain PyTorch in the inputs' own dtype, as a user would write it (the 16-bit error yardstick)."""
    h = x + r if r is not None else x
    y = F.rms_norm(h, (h.shape[-1],), w, eps) if rms else F.layer_norm(h, (h.shape[-1],), w, b, eps)
    return y, h


def _inputs(shape, dtype, device, residual, bias, rms, wdtype=None):
    n = shape[-1]
    x = torch.randn(shape, dtype=torch.float32).mul_(2).add_(0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(n)).to(wdtype or dtype)
    b = (0.5 * torch.randn(n)).to(wdtype or dtype) if bias and not rms else None
    r = torch.randn(shape).to(dtype) if residual else None
    return [t.to(device).requires_grad_() if t is not None else None for t in (x, w, b, r)]


def _run(fn, x, w, b, r, eps, rms, dy, dh):
    """Outputs and every gradient (dx, dw, db, dresidual) through torch.autograd.grad with shared dy/dh."""
    out = fn(x, w, b, r, eps, rms)
    y, h = out if r is not None else (out, None)
    loss = (y.double() * dy).sum()
    if r is not None:
        loss = loss + (h.double() * dh).sum()
    inputs = [t for t in (x, w, b, r) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    return y, h, grads


def _check_all(backend, device, shape, dtype, residual, bias, rms, wdtype=None, eps=1e-5):
    x, w, b, r = _inputs(shape, dtype, device, residual, bias, rms, wdtype)
    dy = torch.randn(shape, dtype=torch.float64, device=device)
    dh = torch.randn(shape, dtype=torch.float64, device=device) if residual else None

    def ours(x, w, b, r, eps, rms):
        if rms:
            return gptkernels.rms_norm(x, w, eps, residual=r, backend=backend)
        return gptkernels.layer_norm(x, w, b, eps, residual=r, backend=backend)

    y, h, grads = _run(ours, x, w, b, r, eps, rms, dy, dh)
    op = "rms_norm" if rms else "layer_norm"
    assert gptkernels.last(op)[0] == backend

    def to64(t):
        return t.detach().double().cpu().requires_grad_() if t is not None else None

    x64, w64, b64, r64 = map(to64, (x, w, b, r))
    y64, h64, grads64 = _run(lambda *a: layer_norm_ref(a[0], a[1], a[2], a[4], a[3], a[5]),
                             x64, w64, b64, r64, eps, rms, dy.cpu(), dh.cpu() if dh is not None else None)
    eager = (None, None, [None] * len(grads))
    if dtype in (torch.float16, torch.bfloat16):
        xe, we, be, re = [t.detach().cpu().requires_grad_() if t is not None else None for t in (x, w, b, r)]
        eager = _run(lambda *a: _eager(*a)[0] if a[3] is None else _eager(*a), xe, we, be, re, eps, rms,
                     dy.cpu(), dh.cpu() if dh is not None else None)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, eager[0], "y")
    if residual:
        assert_close(h, h64, eager[1], "h")
    names = ["dx", "dweight"] + (["dbias"] if b is not None else []) + (["dresidual"] if r is not None else [])
    # One column is degenerate for both norms: LayerNorm's h - mean is exactly 0 (dx = 0 exactly, and
    # rstd = eps^-1/2 ~ 316 amplifies any fp32 formula's rounding, eager PyTorch's included, to ~1e-4), and
    # RMSNorm's dx = rstd*w*dy*(1 - xhat^2) cancels catastrophically. The answer is ~0 on a scale of ~1, so an
    # absolute bound is the meaningful one there.
    atol = 1e-3 if shape[-1] == 1 else 0.0
    for name, g, g64, ge in zip(names, grads, grads64, eager[2]):
        assert g.dtype == (x.dtype if name in ("dx", "dresidual") else w.dtype), name
        assert_close(g, g64, ge, name, atol=atol, dtype=dtype)


def _skip_slow_interp(backend, device, shape, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        # triton 3.8's interpreter casts fp32 -> bf16 by truncation (runtime/interpreter.py cast_impl), not by
        # round-to-nearest-even as the GPU does, so its bf16 results carry an extra ulp the bound cannot allow.
        pytest.skip("Triton interpreter truncates fp32->bf16; bf16 Triton runs in the gpu-marked tests")
    if backend == "triton" and device == "cpu" and shape[-1] > BIG and dtype != torch.float32:
        pytest.skip("Triton interpreter: widest rows are checked in fp32 only (time); all dtypes run on the GPU")


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_norm_matches_fp64(bd, dtype, shape, residual, rms):
    backend, device = bd
    _skip_slow_interp(backend, device, shape, dtype)
    _check_all(backend, device, shape, dtype, residual, bias=True, rms=rms)


@pytest.mark.parametrize("bd", backend_params())
def test_no_bias_fp32_weight_and_no_weight(bd):
    backend, device = bd
    # fp32 master weights with 16-bit activations (mixed precision), no bias; bf16 except in the interpreter
    act = torch.float16 if (backend, device) == ("triton", "cpu") else torch.bfloat16
    _check_all(backend, device, (5, 96), act, residual=True, bias=False, rms=False, wdtype=torch.float32)
    x = torch.randn(4, 33, device=device)
    y = gptkernels.layer_norm(x, None, backend=backend)
    assert_close(y, F.layer_norm(x.double().cpu(), (33,)), name="y (no weight)")


@pytest.mark.parametrize("bd", backend_params())
def test_noncontiguous_input_and_stride0_grad(bd):
    backend, device = bd
    base = torch.randn(40, 6, device=device)
    x = base.t().requires_grad_()  # (6, 40), column stride 6: not contiguous
    w = torch.randn(40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    y = gptkernels.layer_norm(x, w, b, backend=backend)
    dy = torch.randn(1, 40, device=device).expand(6, 40)  # stride 0 along rows
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    y64 = F.layer_norm(x64, (40,), w64, b64)
    rx, rw, rb = torch.autograd.grad(y64, (x64, w64, b64), dy.double().cpu())
    for name, a, r in (("y", y, y64), ("dx", dx, rx), ("dw", dw, rw), ("db", db, rb)):
        assert_close(a, r, name=name)
    # y.sum().backward() hands the kernel an expanded scalar gradient
    x.grad = None
    gptkernels.layer_norm(x, w, b, backend=backend).sum().backward()
    (ref,) = torch.autograd.grad(F.layer_norm(x64, (40,), w64, b64).sum(), x64)
    assert_close(x.grad, ref, name="dx from sum()")


@pytest.mark.parametrize("bd", backend_params())
def test_empty_batch(bd):
    backend, device = bd
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    y = gptkernels.rms_norm(x, w, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        gptkernels.layer_norm(torch.ones(4, 8, dtype=torch.int32), torch.ones(8))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        gptkernels.layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        gptkernels.layer_norm(x, torch.ones(8), torch.ones(9))
    with pytest.raises(ValueError, match="residual shape"):
        gptkernels.layer_norm(x, torch.ones(8), residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual dtype"):
        gptkernels.rms_norm(x, torch.ones(8), residual=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        gptkernels.rms_norm(x, torch.ones(8), eps=-1.0)
    with pytest.raises(ValueError, match="at least 1 dim"):
        gptkernels.layer_norm(torch.randn(()), torch.ones(1))
    # an empty last dim is an empty result, as F.layer_norm gives (tests/test_nan_empty.py checks every backend)
    assert gptkernels.layer_norm(torch.randn(3, 0), torch.ones(0)).shape == (3, 0)
    with pytest.raises(gptkernels.BackendUnavailableError, match="cpu.*dtype torch.float64 not supported"):
        gptkernels.layer_norm(x.double(), torch.ones(8, dtype=torch.float64), backend="cpu")
    if not HAS_CUDA:
        with pytest.raises(gptkernels.BackendUnavailableError, match="cuda"):
            gptkernels.layer_norm(x, torch.ones(8), backend="cuda")
    # the torch reference takes float64; auto falls back to it and says why
    gptkernels.layer_norm(x.double(), torch.ones(8, dtype=torch.float64))
    backend, why = gptkernels.last("layer_norm")
    assert backend == "torch" and "float64 not supported" in why


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id != "torch"])  # torch: no custom op
def test_opcheck(bd):
    backend, device = bd
    from gptkernels.ops._common import registered_op

    fwd, bwd = registered_op("layernorm_fwd", backend), registered_op("layernorm_bwd", backend)
    for rms, with_res, with_bias in ((False, True, True), (True, False, False)):
        x = torch.randn(3, 5, 40, device=device)
        w = torch.randn(40, device=device)
        b = torch.randn(40, device=device) if with_bias else None
        r = torch.randn(3, 5, 40, device=device) if with_res else None
        y, h, mean, rstd = fwd(x, w, b, r, 1e-5, rms)
        torch.library.opcheck(fwd, (x, w, b, r, 1e-5, rms))
        hin = h if with_res else x
        dh = torch.randn_like(x) if with_res else None
        torch.library.opcheck(bwd, (torch.randn_like(x), dh, hin, w, mean, rstd, with_bias, rms))


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("cuda", marks=pytest.mark.gpu),
                                     pytest.param("triton", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph(backend):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    torch._dynamo.reset()

    def block(x, r, w, b):
        y, h = gptkernels.layer_norm(x, w, b, residual=r, backend=backend)
        return y * 2 + h  # a tensor, compared with one shared dy (a summed scalar would cancel)

    x = torch.randn(6, 64, device=device, requires_grad=True)
    r = torch.randn(6, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, r, w, b)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, r, w, b), dy)
    ref = block(x, r, w, b)
    ref_grads = torch.autograd.grad(ref, (x, r, w, b), dy)
    assert_close(out, ref, name="compiled out")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, name="compiled grad")


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_matches_pytorch_norms_in_fp64(bd, rms):
    # Independent oracles: F.layer_norm / F.rms_norm in fp64 on h = x + residual (layer_norm_ref's RMSNorm is our own
    # formula), for the reference and straight for each backend in fp32, outputs and every gradient.
    backend, device = bd
    shape, eps = (5, 97), 1e-5
    x, w, b, r = _inputs(shape, torch.float32, device, residual=True, bias=True, rms=rms)
    dy = torch.randn(shape, dtype=torch.float64, device=device)
    dh = torch.randn(shape, dtype=torch.float64, device=device)

    def oracle(x, w, b, r, eps, rms):
        h = x + r
        y = F.rms_norm(h, (h.shape[-1],), w, eps) if rms else F.layer_norm(h, (h.shape[-1],), w, b, eps)
        return y, h

    def ours(x, w, b, r, eps, rms):
        if rms:
            return gptkernels.rms_norm(x, w, eps, residual=r, backend=backend)
        return gptkernels.layer_norm(x, w, b, eps, residual=r, backend=backend)

    def to64(t):
        return t.detach().double().cpu().requires_grad_() if t is not None else None

    args64 = [to64(t) for t in (x, w, b, r)]
    y_o, h_o, g_o = _run(oracle, *args64, eps, rms, dy.cpu(), dh.cpu())
    y_r, h_r, g_r = _run(lambda *a: layer_norm_ref(a[0], a[1], a[2], a[4], a[3], a[5]), *args64, eps, rms, dy.cpu(),
                         dh.cpu())
    torch.testing.assert_close(y_r, y_o, rtol=1e-12, atol=1e-12)
    for g, go in zip(g_r, g_o):
        torch.testing.assert_close(g, go, rtol=1e-10, atol=1e-12)
    y, h, grads = _run(ours, x, w, b, r, eps, rms, dy, dh)
    assert_close(y, y_o, name="y vs F." + ("rms_norm" if rms else "layer_norm"))
    assert_close(h, h_o, name="h")
    for name, g, go in zip(("dx", "dweight", "dbias", "dresidual"), grads, g_o):
        assert_close(g, go, name=name)
