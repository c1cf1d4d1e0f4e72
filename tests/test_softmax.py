"""Softmax (scale, float/bool masks, causal) on every backend against an fp64 reference."""

import pytest
import torch
from conftest import DTYPES, HAS_CUDA, assert_close, backend_params

from gptkernels import _dispatch
from gptkernels.ops.softmax import softmax, softmax_ref

SHAPES = [(1, 1), (3, 7), (6, 42, 123), (2, 5, 123), (4, 300), (2, 781), (2, 1023), (2, 4097), (2, 12000), (1, 65537)]
INTERP_MAX_ROWS = 256  # the Triton interpreter runs one program per row (~1-10 ms each): keep its row counts small
SCALE = 0.7
NEG_INF = float("-inf")


def _additive(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)
    return mask.to(dtype)


def _eager(x, scale, causal, mask):
    """Plain PyTorch in x's own dtype, as a user would write it (the 16-bit error yardstick). Fully masked rows
    come out NaN here; they are zeroed, so the yardstick is eager's error on the rows it can compute."""
    z = x * scale
    if mask is not None:
        z = z + _additive(mask, x.dtype)
    if causal:
        t, n = z.shape[-2:]
        z = z.masked_fill(~torch.ones(t, n, dtype=torch.bool, device=z.device).tril(), NEG_INF)
    return torch.nan_to_num(torch.softmax(z, -1), nan=0.0)


def _run(fn, x, mask, dy):
    """y and every gradient (dx, and dmask for a float mask that requires grad) with the shared dy."""
    y = fn(x, mask)
    inputs = [x] + ([mask] if mask is not None and mask.requires_grad else [])
    grads = torch.autograd.grad((y.double() * dy).sum(), inputs)
    return y, grads


def _check(backend, device, x, scale=SCALE, causal=False, mask=None):
    """Runs `softmax` on (backend, device) and checks y, dx (and dmask) against fp64 and, for 16-bit, eager."""
    dtype = x.dtype
    x = x.to(device).requires_grad_()
    mask = mask.detach().to(device).requires_grad_(mask.requires_grad) if mask is not None else None
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)

    y, grads = _run(lambda a, m: softmax(a, scale, causal, m, backend=backend), x, mask, dy)
    assert _dispatch.last("softmax")[0] == backend
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device

    def to64(t):
        if t is None:
            return None
        t64 = t.detach().cpu()
        t64 = t64.double() if t64.is_floating_point() else t64
        return t64.requires_grad_(t.requires_grad)

    x64, m64 = to64(x), to64(mask)
    y64, grads64 = _run(lambda a, m: softmax_ref(a, scale, causal, m), x64, m64, dy.cpu())
    eager = (None, [None] * len(grads))
    if dtype in (torch.float16, torch.bfloat16):
        xe = x.detach().cpu().requires_grad_()
        me = mask.detach().cpu().requires_grad_(mask.requires_grad) if mask is not None else None
        ye, ge = _run(lambda a, m: _eager(a, scale, causal, m), xe, me, dy.cpu())
        eager = (ye, [torch.nan_to_num(g, nan=0.0) for g in ge])  # NaN rows of eager's backward, as above
    assert_close(y, y64, eager[0], "y")
    # dmask sums dz = y * (dy - c), c = sum_j y_j dy_j, over the rows that share a mask entry, and backward sees y
    # stored in x.dtype (it saves y only): rounding y moves dz by up to eps/2 * |y| * (|dy - c| + sum_k |y_k dy_k|)
    # to first order. Summed over rows, and where the sum cancels (a mask broadcast along the row has dmask = 0
    # in exact math; rows of 2 or 3 live columns), that is all that is left, and eager PyTorch's own error there
    # is the luck of its own roundings of y, no yardstick. So dmask may also miss by that bound (absolute).
    atol_dmask = 0.0
    if len(grads) > 1:
        y64d, dyd = y64.detach(), dy.cpu()
        c = (y64d * dyd).sum(-1, keepdim=True)
        dz_err = y64d.abs() * ((dyd - c).abs() + (y64d * dyd).abs().sum(-1, keepdim=True))
        atol_dmask = 0.5 * torch.finfo(dtype).eps * dz_err.sum_to_size(mask.shape).max().item() + 1e-7
    for name, g, g64, ge in zip(["dx", "dmask"], grads, grads64, eager[1]):
        assert g.dtype == (x.dtype if name == "dx" else mask.dtype), name
        assert_close(g, g64, ge, name, dtype=dtype, atol=atol_dmask if name == "dmask" else 0.0)
    return y, grads


def _skip_interp(backend, device, dtype, rows=1, n=1):
    if backend != "triton" or device != "cpu":
        return
    if dtype == torch.bfloat16:
        # triton 3.8's interpreter casts fp32 -> bf16 by truncation (runtime/interpreter.py cast_impl), not by
        # round-to-nearest-even as the GPU does, so its bf16 results carry an extra ulp the bound cannot allow.
        pytest.skip("Triton interpreter truncates fp32->bf16; bf16 Triton runs in the gpu-marked tests")
    if rows > INTERP_MAX_ROWS:
        pytest.skip(f"Triton interpreter: more than {INTERP_MAX_ROWS} rows is too slow; the GPU runs this shape")
    if n > 4097 and dtype != torch.float32:
        pytest.skip("Triton interpreter: the widest rows run in fp32 only (time); all dtypes run on the GPU")


def _rows(shape):
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax_matches_fp64(bd, dtype, shape):
    backend, device = bd
    _skip_interp(backend, device, dtype, _rows(shape), shape[-1])
    x = (2 * torch.randn(shape)).to(dtype)
    _check(backend, device, x)


# (name, x shape, causal, mask builder). Masks are built on CPU, in x's dtype when float (or fp32: "f32").
def _mask_cases():
    def fmask(*shape, grad=True, dt=None):
        def build(dtype):
            m = (2 * torch.randn(shape)).to(dt or dtype)
            return m.requires_grad_(grad)

        return build

    def bmask(*shape, kill_row0=False, p=0.3):
        def build(dtype):
            m = torch.rand(shape) > p
            m[..., :, 0] |= True  # column 0 kept: no fully masked row unless asked for
            if kill_row0:
                m[..., 0, :] = False
            return m

        return build

    return [
        ("causal-square", (2, 3, 16, 16), True, None),
        ("causal-wide", (2, 3, 8, 24), True, None),  # Tq < Tk: top-left aligned, row i sees j <= i
        ("causal-tall", (2, 3, 24, 8), True, None),  # Tq > Tk: rows i >= Tk see every column
        ("float-1x1xTxT", (2, 3, 12, 12), False, fmask(1, 1, 12, 12)),
        ("float-N", (2, 3, 12, 40), False, fmask(40)),
        ("float-Bx1x1xN-f32", (2, 3, 5, 40), False, fmask(2, 1, 1, 40, dt=torch.float32)),
        ("float-Tx1-causal", (2, 9, 20), True, fmask(9, 1)),  # broadcast along the row: one value per row
        ("bool-TxT", (2, 3, 12, 12), False, bmask(12, 12)),
        ("bool-kill-row0", (2, 3, 12, 12), False, bmask(12, 12, kill_row0=True)),
        ("bool-causal-kill-row0", (2, 3, 12, 20), True, bmask(1, 1, 12, 20, kill_row0=True)),
        ("bool-all-false", (3, 17), False, lambda dtype: torch.zeros(17, dtype=torch.bool)),
        (
            "float-neginf-rows",
            (4, 33),
            False,
            lambda dtype: torch.randn(4, 33).to(dtype).index_fill_(0, torch.tensor([1, 3]), NEG_INF).requires_grad_(),
        ),
        ("float-5d", (2, 2, 3, 4, 24), False, fmask(2, 1, 3, 1, 24)),  # > 4 dims, mask not foldable: copied
        ("bool-long-row", (2, 4500), False, bmask(2, 4500, kill_row0=True)),
        ("float-long-row-causal", (3, 4500), True, fmask(4500)),
    ]


MASK_CASES = _mask_cases()


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_causal_and_masks(bd, dtype, case):
    backend, device = bd
    name, shape, causal, build = case
    _skip_interp(backend, device, dtype, _rows(shape), shape[-1])
    x = (2 * torch.randn(shape)).to(dtype)
    mask = build(dtype) if build is not None else None
    y, grads = _check(backend, device, x, causal=causal, mask=mask)
    # Fully masked rows are exact zeros in y and dx (and dmask), never NaN.
    z = torch.zeros(shape, dtype=torch.bool)
    if mask is not None:
        keep = (_additive(mask.detach(), torch.float32) > NEG_INF).expand(shape)
        if causal:
            keep = keep & torch.ones(shape[-2:], dtype=torch.bool).tril()
        z = ~keep.any(-1, keepdim=True).expand(shape)
    if z.any():
        assert (y.detach().cpu()[z] == 0).all(), "fully masked rows of y must be 0"
        assert (grads[0].cpu()[z] == 0).all(), "fully masked rows of dx must be 0"


@pytest.mark.parametrize("bd", backend_params())
def test_chunked_loops_small_chunks(bd, monkeypatch):
    """The Triton long-row loops (online max/sum, then normalize) with tiny chunks, so causal rows span several
    chunks on a small shape; the other backends run the same case for parity."""
    backend, device = bd
    from gptkernels.triton import softmax as tl_sm

    for name in ("_FWD_MAX_BLOCK_N", "_BWD_MAX_BLOCK_N", "_CPU_MAX_BLOCK_N", "_CHUNK"):
        monkeypatch.setattr(tl_sm, name, 32)
    x = 2 * torch.randn(2, 40, 150)
    mask = torch.rand(40, 150) > 0.2
    mask[3] = False  # a fully masked row
    _check(backend, device, x, causal=True, mask=mask)
    _check(backend, device, 2 * torch.randn(3, 150), mask=(2 * torch.randn(150)).requires_grad_())


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id in ("cuda", "triton")])
def test_causal_long_rows_gpu(bd):
    """CUDA's loop path (rows > 16384 columns) walks 2048-column fp32 chunks: with 2100 causal rows the last ones
    span two chunks in the online pass, and every row's normalize pass writes the zero chunks past its limit.
    (Triton's loops with causal rows over several chunks run in test_chunked_loops_small_chunks.)"""
    backend, device = bd
    _check(backend, device, 2 * torch.randn(2100, 16400), causal=True)


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id != "triton-interp"])  # 1030 rows: too slow
def test_large_outputs(bd):
    """Outputs over 4 MiB: the cpu glue prefaults them (madvise) before the kernel writes; with a float mask that
    needs a gradient, dx and the fp32 dz are both that large."""
    backend, device = bd
    mask = (2 * torch.randn(1100)).requires_grad_()
    _check(backend, device, 2 * torch.randn(1030, 1100), causal=True, mask=mask)


@pytest.mark.parametrize("bd", backend_params())
def test_noncontiguous_and_stride0_grads(bd):
    backend, device = bd
    base = 2 * torch.randn(2, 40, 6, device=device)
    x = base.transpose(-1, -2).requires_grad_()  # (2, 6, 40), column stride 6
    mask = (torch.randn(40, 6, device=device).t()).requires_grad_()  # (6, 40), transposed too
    y = softmax(x, SCALE, mask=mask, backend=backend)
    dy = torch.randn(2, 1, 40, device=device).expand(2, 6, 40)  # stride 0 along rows
    dx, dm = torch.autograd.grad(y, (x, mask), dy)
    x64, m64 = (t.detach().double().cpu().requires_grad_() for t in (x, mask))
    y64 = softmax_ref(x64, SCALE, mask=m64)
    rx, rm = torch.autograd.grad(y64, (x64, m64), dy.double().cpu())
    for name, a, r in (("y", y, y64), ("dx", dx, rx), ("dmask", dm, rm)):
        assert_close(a, r, name=name)
    # y.sum().backward() hands the kernel an expanded scalar gradient (every stride 0): dx = 0 in exact math, so
    # the bound is absolute.
    x.grad = None
    softmax(x, SCALE, causal=True, backend=backend).sum().backward()
    assert not torch.isnan(x.grad).any() and x.grad.abs().max().item() < 1e-6
    # and a ones(1).expand_as(y) gradient written out, plus a row-stride-0 x (an expanded input)
    xe = torch.randn(1, 50, device=device).expand(4, 50).requires_grad_()
    ye = softmax(xe, SCALE, causal=False, backend=backend)
    (dxe,) = torch.autograd.grad(ye, xe, torch.ones(1, device=device).expand_as(ye))
    assert_close(ye, softmax_ref(xe.detach().double().cpu(), SCALE), name="y (expanded x)")
    assert dxe.abs().max().item() < 1e-6


@pytest.mark.parametrize("bd", backend_params())
def test_empty(bd):
    backend, device = bd
    x = torch.randn(0, 16, device=device, requires_grad=True)
    y = softmax(x, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        softmax(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 1 dim"):
        softmax(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"causal=True needs x with at least 2 dims .*\(8,\)"):
        softmax(torch.randn(8), causal=True)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 8\) is not broadcastable to x of shape \(4, 8\)"):
        softmax(x, mask=torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 4, 8\) is not broadcastable"):
        softmax(x, mask=torch.zeros(1, 4, 8))  # more dims than x
    with pytest.raises(TypeError, match="mask must be bool .* or floating point .*torch.int64"):
        softmax(x, mask=torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask must be a tensor"):
        softmax(x, mask=[[0.0] * 8] * 4)
    with pytest.raises(TypeError, match="scale must be a Python float"):
        softmax(x, scale=torch.tensor(2.0))
    with pytest.raises(ValueError, match="scale must be finite"):
        softmax(x, scale=float("nan"))
    if HAS_CUDA:
        with pytest.raises(ValueError, match="mask is on cuda:0 but x is on cpu"):
            softmax(x, mask=torch.zeros(4, 8, device="cuda"))
    with pytest.raises(_dispatch.BackendUnavailableError, match="cpu.*dtype torch.float64 not supported"):
        softmax(x.double(), backend="cpu")
    if not HAS_CUDA:
        with pytest.raises(_dispatch.BackendUnavailableError, match="cuda"):
            softmax(x, backend="cuda")
    # the torch reference takes float64; auto falls back to it and says why
    softmax(x.double())
    backend, why = _dispatch.last("softmax")
    assert backend == "torch" and "float64 not supported" in why


@pytest.mark.gpu
def test_mask_on_other_device_gpu():
    with pytest.raises(ValueError, match="mask is on cpu but x is on cuda"):
        softmax(torch.randn(4, 8, device="cuda"), mask=torch.zeros(4, 8))


@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id != "torch"])  # torch: no custom op
def test_opcheck(bd):
    backend, device = bd
    from gptkernels.ops._common import registered_op

    fwd, bwd = registered_op("softmax_fwd", backend), registered_op("softmax_bwd", backend)
    x = torch.randn(2, 3, 5, 24, device=device)
    for mask, causal in (
        (None, False),
        (torch.randn(5, 24, device=device), True),
        (torch.randn(24, device=device), False),
    ):
        torch.library.opcheck(fwd, (x, mask, 0.5, causal))
    y = fwd(x, None, 0.5, False)
    for mask_grad in (False, True):
        torch.library.opcheck(bwd, (y, torch.randn_like(y), 0.5, mask_grad))


@pytest.mark.parametrize(
    "backend",
    ["cpu", "torch", pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("triton", marks=pytest.mark.gpu)],
)
def test_torch_compile_fullgraph(backend):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    torch._dynamo.reset()

    def attn_probs(x, bias):
        p = softmax(x, 0.125, causal=True, mask=bias, backend=backend)
        return (p * p).sum()

    x = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    bias = torch.randn(16, 16, device=device, requires_grad=True)  # a learned additive bias
    compiled = torch.compile(attn_probs, fullgraph=True)
    out = compiled(x, bias)
    grads = torch.autograd.grad(out, (x, bias))
    ref = attn_probs(x, bias)
    ref_grads = torch.autograd.grad(ref, (x, bias))
    assert_close(out, ref, name="compiled out")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, name="compiled grad")


def _oracle_softmax(x, scale, causal, mask):
    """torch.softmax in x's dtype on x * scale + mask, the causal limit built from triu here (softmax_ref uses tril);
    fully masked rows are zeros (torch.softmax: NaN), as the op defines them."""
    z = x * scale
    if mask is not None:
        z = z + (torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool
                 else mask)
    if causal:
        t, n = z.shape[-2:]
        z = z + torch.zeros(t, n, dtype=x.dtype).masked_fill(torch.ones(t, n, dtype=torch.bool).triu(1), NEG_INF)
    dead = torch.isneginf(z).all(-1, keepdim=True)
    return torch.softmax(torch.where(dead, 0.0, z), -1) * ~dead  # not nan_to_num: its backward passes NaN


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("kind", ["plain", "causal-wide", "causal-tall", "bool", "float"])
def test_matches_torch_softmax_in_fp64(bd, kind):
    # Independent oracle: torch.softmax in fp64, for the reference and straight for each backend in fp32.
    backend, device = bd
    shape = {"causal-wide": (2, 3, 8, 24), "causal-tall": (2, 3, 24, 8)}.get(kind, (2, 3, 12, 40))
    causal = kind.startswith("causal")
    mask = None
    if kind == "bool":
        mask = torch.rand(shape[-2:]) > 0.3
        mask[1] = False  # one fully masked row
    elif kind == "float":
        mask = (2 * torch.randn(shape[-3:])).requires_grad_()
    x = (2 * torch.randn(shape)).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    x64 = x.detach().double().requires_grad_()
    m64 = mask.detach().double().requires_grad_() if mask is not None and mask.is_floating_point() else mask
    y_o, g_o = _run(lambda a, m: _oracle_softmax(a, SCALE, causal, m), x64, m64, dy)
    y_r, g_r = _run(lambda a, m: softmax_ref(a, SCALE, causal, m), x64, m64, dy)
    torch.testing.assert_close(y_r, y_o, rtol=1e-12, atol=1e-14)
    for g, go in zip(g_r, g_o):
        torch.testing.assert_close(g, go, rtol=1e-10, atol=1e-12)
    xd = x.detach().to(device).requires_grad_()
    md = mask.detach().to(device).requires_grad_(mask.requires_grad) if mask is not None else None
    y, grads = _run(lambda a, m: softmax(a, SCALE, causal, m, backend=backend), xd, md, dy.to(device))
    assert _dispatch.last("softmax")[0] == backend
    assert_close(y, y_o, name="y vs torch.softmax")
    for name, g, go in zip(("dx", "dmask"), grads, g_o):
        assert_close(g, go, name=f"{name} vs torch.softmax")
