"""The eager fast path (gptkernels._C entry points + cached backend decisions) against the checked Python path.

Outside torch.compile a public op on the cpu/cuda backends runs one C++ call: checks, autograd and the kernel. These
tests pin what it must keep: bit-identical outputs and gradients to the registered-op path, the same errors for bad
input, explain() records, the environment still steering the choice, and tensor subclasses / dispatch modes seeing
the registered op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gptkernels as gk
from gptkernels import _dispatch
from gptkernels.ops import _common

pytestmark = pytest.mark.skipif(not _common.EAGER_BACKENDS, reason="extension without eager entry points")


class _Counting:
    """Proxy of gptkernels._C that counts the eager entry calls that returned a result."""

    def __init__(self, real):
        self.real, self.hits = real, {}

    def __getattr__(self, name):
        fn = getattr(self.real, name)

        def call(*args):
            out = fn(*args)
            if out is not None:
                self.hits[name] = self.hits.get(name, 0) + 1
            return out

        return call


@pytest.fixture
def counting(monkeypatch):
    proxy = _Counting(_common.C)
    monkeypatch.setattr(_common, "C", proxy)
    return proxy


def _slow(monkeypatch):
    monkeypatch.setattr(_common, "EAGER_BACKENDS", ())


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _cases():
    """(name, fn(**inputs) -> tensor or tuple, inputs factory, differentiable input names)."""
    lens = torch.tensor([5, 9], dtype=torch.int32)
    return [
        ("layer_norm", lambda x, w, b: gk.layer_norm(x, w, b, backend="cpu"),
         lambda: {"x": _rand(3, 5, 33), "w": _rand(33), "b": _rand(33)}, ("x", "w", "b")),
        ("layer_norm+residual", lambda x, w, b, r: gk.layer_norm(x, w, b, residual=r, backend="cpu"),
         lambda: {"x": _rand(2, 7, 65), "w": _rand(65), "b": _rand(65), "r": _rand(2, 7, 65)}, ("x", "w", "b", "r")),
        ("rms_norm+residual", lambda x, w, r: gk.rms_norm(x, w, 1e-6, residual=r, backend="cpu"),
         lambda: {"x": _rand(4, 17), "w": _rand(17), "r": _rand(4, 17)}, ("x", "w", "r")),
        ("layer_norm bf16, fp32 weight", lambda x, w, b: gk.layer_norm(x, w, b, backend="cpu"),
         lambda: {"x": _rand(3, 40, dtype=torch.bfloat16), "w": _rand(40), "b": _rand(40)}, ("x", "w", "b")),
        ("softmax causal", lambda x: gk.softmax(x, 0.7, causal=True, backend="cpu"),
         lambda: {"x": _rand(2, 3, 6, 9)}, ("x",)),
        ("softmax bool mask", lambda x, m: gk.softmax(x, mask=m, backend="cpu"),
         lambda: {"x": _rand(2, 5, 7), "m": torch.rand(5, 7) > 0.3}, ("x",)),
        ("attention causal gqa", lambda q, k, v: gk.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True, backend="cpu"),
         lambda: {"q": _rand(2, 4, 9, 16), "k": _rand(2, 2, 11, 16), "v": _rand(2, 2, 11, 16)}, ("q", "k", "v")),
        ("attention 3-D, float mask, scale", lambda q, k, v, m: gk.scaled_dot_product_attention(
            q, k, v, attn_mask=m, scale=0.3, backend="cpu"),
         lambda: {"q": _rand(3, 5, 8), "k": _rand(3, 6, 8), "v": _rand(3, 6, 8), "m": _rand(5, 6)}, ("q", "k", "v")),
        ("attention window, transposed q", lambda q, k, v: gk.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, window=3, backend="cpu"),
         lambda: {"q": _rand(2, 10, 3, 8), "k": _rand(2, 3, 10, 8), "v": _rand(2, 3, 10, 8)}, ("q", "k", "v")),
        ("flash_attn_func causal gqa, Tq < Tk", lambda q, k, v: gk.flash_attn_func(q, k, v, causal=True,
                                                                                 backend="cpu"),
         lambda: {"q": _rand(2, 7, 4, 16), "k": _rand(2, 11, 2, 16), "v": _rand(2, 11, 2, 16)}, ("q", "k", "v")),
        ("flash_attn_func window, softcap, scale, Tq > Tk", lambda q, k, v: gk.flash_attn_func(
            q, k, v, softmax_scale=0.4, window_size=(3, 1), softcap=2.5, backend="cpu"),
         lambda: {"q": _rand(1, 9, 2, 8), "k": _rand(1, 6, 2, 8), "v": _rand(1, 6, 2, 8)}, ("q", "k", "v")),
        ("decode_attention", lambda q, k, v: gk.decode_attention(q, k, v, lens, scale=0.2, backend="cpu"),
         lambda: {"q": _rand(2, 4, 2, 16), "k": _rand(2, 2, 12, 16), "v": _rand(2, 2, 12, 16)}, ()),
        ("bias_gelu erf", lambda x, b: gk.bias_gelu(x, b, approximate="none", backend="cpu"),
         lambda: {"x": _rand(3, 4, 31), "b": _rand(31)}, ("x", "b")),
        ("fused_mlp residual", lambda x, wf, bf, wp, bp, r: gk.fused_mlp(x, wf, bf, wp, bp, "gelu_tanh", residual=r,
                                                                          backend="cpu"),
         lambda: {"x": _rand(2, 3, 12), "wf": _rand(20, 12), "bf": _rand(20), "wp": _rand(12, 20), "bp": _rand(12),
                  "r": _rand(2, 3, 12)}, ("x", "wf", "bf", "wp", "bp", "r")),
        ("swiglu", lambda x, wg, wu, wd: gk.swiglu(x, wg, wu, wd, backend="cpu"),
         lambda: {"x": _rand(5, 12), "wg": _rand(18, 12), "wu": _rand(18, 12), "wd": _rand(12, 18)},
         ("x", "wg", "wu", "wd")),
    ]


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _run(fn, inputs, grads, grad_mode):
    kw = {k: (v.detach().clone().requires_grad_(grad_mode and k in grads) if v.is_floating_point() else v)
          for k, v in inputs.items()}
    outs = _outputs(fn(**kw))
    if not grad_mode or not grads:
        return [o.detach() for o in outs], []
    torch.manual_seed(1)
    dys = [torch.randn_like(o) for o in outs]
    gs = torch.autograd.grad(outs, [kw[k] for k in grads], dys)
    return [o.detach() for o in outs], list(gs)


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", _cases(), ids=[c[0] for c in _cases()])
def test_fast_path_is_bit_identical_to_registered_ops(case, grad_mode, monkeypatch, counting):
    name, fn, make, grads = case
    torch.manual_seed(0)
    inputs = make()
    fast, fast_grads = _run(fn, inputs, grads, grad_mode)
    fast, fast_grads = _run(fn, inputs, grads, grad_mode)  # the second call has the cached decision
    mlp_with_grad = name.startswith(("fused_mlp", "swiglu")) and grad_mode and grads  # Python path by design
    assert sum(counting.hits.values()) >= (0 if mlp_with_grad else 1), counting.hits
    _slow(monkeypatch)
    slow, slow_grads = _run(fn, inputs, grads, grad_mode)
    for a, b in zip(fast + fast_grads, slow + slow_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()
    assert len(fast_grads) == len(slow_grads)


def test_fast_path_matches_eager_reference():
    torch.manual_seed(0)
    x, w, b = _rand(2, 3, 100, dtype=torch.float64), _rand(100, dtype=torch.float64), _rand(100, dtype=torch.float64)
    gk.layer_norm(x.float(), w.float(), b.float())
    y = gk.layer_norm(x.float(), w.float(), b.float())
    ref = F.layer_norm(x, (100,), w, b)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-5


def _err(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


BAD_CALLS = [
    ("weight shape", lambda: gk.layer_norm(torch.randn(2, 8), torch.randn(7), None, backend="cpu")),
    ("residual dtype", lambda: gk.layer_norm(torch.randn(2, 8), torch.randn(8), residual=torch.randn(2, 8).double(),
                                             backend="cpu")),
    ("residual shape", lambda: gk.layer_norm(torch.randn(2, 8), torch.randn(8), residual=torch.randn(3, 8),
                                             backend="cpu")),
    ("negative eps", lambda: gk.rms_norm(torch.randn(2, 8), torch.randn(8), eps=-1.0, backend="cpu")),
    ("int weight", lambda: gk.layer_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.int64), backend="cpu")),
    ("softmax inf scale", lambda: gk.softmax(torch.randn(2, 8), scale=float("inf"), backend="cpu")),
    ("softmax bad mask", lambda: gk.softmax(torch.randn(2, 8), mask=torch.randn(3, 8), backend="cpu")),
    ("softmax int mask", lambda: gk.softmax(torch.randn(2, 8), mask=torch.ones(8, dtype=torch.int32), backend="cpu")),
    ("softmax causal 1-D", lambda: gk.softmax(torch.randn(8), causal=True, backend="cpu")),
    ("attention heads", lambda: gk.scaled_dot_product_attention(torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8),
                                                                torch.randn(1, 2, 3, 8), backend="cpu")),
    ("attention head dim", lambda: gk.scaled_dot_product_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4),
                                                                   torch.randn(1, 2, 3, 4), backend="cpu")),
    ("attention window 0", lambda: gk.scaled_dot_product_attention(*(torch.randn(1, 2, 3, 8),) * 3, window=0,
                                                                   backend="cpu")),
    ("attention nan scale", lambda: gk.scaled_dot_product_attention(*(torch.randn(1, 2, 3, 8),) * 3,
                                                                    scale=float("nan"), backend="cpu")),
    ("attention bool scale", lambda: gk.scaled_dot_product_attention(*(torch.randn(1, 2, 3, 8),) * 3, scale=True,
                                                                     backend="cpu")),
    ("attention mask shape", lambda: gk.scaled_dot_product_attention(*(torch.randn(1, 2, 3, 8),) * 3,
                                                                     attn_mask=torch.randn(4, 3), backend="cpu")),
    ("attention dtypes", lambda: gk.scaled_dot_product_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
                                                                 torch.randn(1, 2, 3, 8).half(), backend="cpu")),
    ("attention lead dims", lambda: gk.scaled_dot_product_attention(torch.randn(2, 2, 3, 8), torch.randn(1, 2, 3, 8),
                                                                    torch.randn(1, 2, 3, 8), backend="cpu")),
    ("flash_attn_func heads", lambda: gk.flash_attn_func(torch.randn(1, 3, 4, 8), torch.randn(1, 3, 3, 8),
                                                         torch.randn(1, 3, 3, 8), backend="cpu")),
    ("flash_attn_func k shape", lambda: gk.flash_attn_func(torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 4),
                                                           torch.randn(1, 3, 4, 4), backend="cpu")),
    ("flash_attn_func window", lambda: gk.flash_attn_func(*(torch.randn(1, 3, 2, 8),) * 3, window_size=(-2, 0),
                                                          backend="cpu")),
    ("flash_attn_func softcap", lambda: gk.flash_attn_func(*(torch.randn(1, 3, 2, 8),) * 3, softcap=-1.0,
                                                           backend="cpu")),
    ("flash_attn_func dtypes", lambda: gk.flash_attn_func(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8).double(),
                                                          torch.randn(1, 3, 2, 8), backend="cpu")),
    ("decode seqlens range", lambda: gk.decode_attention(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 5, 8),
                                                         torch.randn(1, 2, 5, 8), torch.tensor([1]), backend="cpu")),
    ("decode seqlens dtype", lambda: gk.decode_attention(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8),
                                                         torch.randn(1, 2, 5, 8), torch.tensor([1.0]), backend="cpu")),
    ("decode cache shape", lambda: gk.decode_attention(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8),
                                                       torch.randn(1, 2, 6, 8), torch.tensor([3]), backend="cpu")),
    ("bias_gelu bias shape", lambda: gk.bias_gelu(torch.randn(2, 8), torch.randn(9), backend="cpu")),
    ("bias_gelu approximate", lambda: gk.bias_gelu(torch.randn(2, 8), torch.randn(8), approximate="fast",
                                                   backend="cpu")),
    ("fused_mlp w_proj shape", lambda: gk.fused_mlp(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 15),
                                                    None, backend="cpu")),
    ("fused_mlp activation", lambda: gk.fused_mlp(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 16),
                                                  None, activation="silu", backend="cpu")),
    ("fused_mlp b_fc dtype", lambda: gk.fused_mlp(torch.randn(2, 8), torch.randn(16, 8), torch.randn(16).double(),
                                                  torch.randn(8, 16), None, backend="cpu")),
    ("swiglu w_up shape", lambda: gk.swiglu(torch.randn(2, 8), torch.randn(16, 8), torch.randn(15, 8),
                                            torch.randn(8, 16), backend="cpu")),
]


@pytest.mark.parametrize("call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_the_same_error_on_both_paths(call, monkeypatch):
    _, fn = call
    # Warm the decision cache with a good call of each op first, so the bad call takes the fast path's route.
    for _, good, make, _ in _cases():
        good(**make())
    fast = _err(fn)
    assert fast is not None, "bad input was accepted"
    _slow(monkeypatch)
    assert fast == _err(fn)


def test_explain_records_the_fast_path_call(counting):
    x, w = torch.randn(2, 16), torch.randn(16)
    gk.rms_norm(x, w, backend="cpu")
    gk.rms_norm(x, w)
    assert counting.hits.get("layernorm", 0) >= 1
    assert gk.last("rms_norm") == ("cpu", "auto on cpu: first usable of cpu, torch")
    gk.rms_norm(x, w, backend="cpu")
    assert gk.last("rms_norm") == ("cpu", "requested by backend= argument")


def test_environment_still_steers_a_cached_decision(monkeypatch):
    x, w = torch.randn(2, 16), torch.randn(16)
    monkeypatch.delenv("GPTKERNELS_BACKEND", raising=False)
    gk.layer_norm(x, w)
    assert gk.last("layer_norm")[0] == "cpu"
    monkeypatch.setenv("GPTKERNELS_BACKEND", "torch")
    gk.layer_norm(x, w)
    assert gk.last("layer_norm") == ("torch", "requested by GPTKERNELS_BACKEND")
    monkeypatch.setenv("GPTKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="from GPTKERNELS_BACKEND"):
        gk.layer_norm(x, w)
    monkeypatch.delenv("GPTKERNELS_BACKEND")
    gk.layer_norm(x, w)
    assert gk.last("layer_norm")[0] == "cpu"


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_registered_op():
    x, w = torch.randn(2, 16), torch.randn(16)
    gk.layer_norm(x, w, backend="cpu")
    with _OpLog() as log:
        gk.layer_norm(x, w, backend="cpu")
        gk.softmax(x, backend="cpu")
    assert any("gptkernels.layernorm_fwd" in o for o in log.ops), log.ops
    assert any("gptkernels.softmax_fwd" in o for o in log.ops), log.ops


def test_fake_tensors_take_the_registered_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(2, 16), torch.randn(16)
    gk.layer_norm(x, w, backend="cpu")
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        y = gk.layer_norm(fx, fw, backend="cpu")
        q = mode.from_tensor(torch.randn(1, 2, 3, 8))
        out = gk.scaled_dot_product_attention(q, q, q, backend="cpu")
    assert y.shape == (2, 16) and out.shape == (1, 2, 3, 8)


def test_nan_propagates_through_the_fast_path():
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(16)
    with torch.no_grad():
        x[1, 3] = float("nan")
    y = gk.layer_norm(x, w, backend="cpu")
    y = gk.layer_norm(x, w, backend="cpu")
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isnan(g[1]).all() and not torch.isnan(g[0]).any()
    q = torch.randn(1, 2, 4, 8)
    q[0, 1, 2, 0] = float("nan")
    out = gk.scaled_dot_product_attention(q, q.nan_to_num(), q.nan_to_num(), backend="cpu")
    assert torch.isnan(out[0, 1, 2]).all() and not torch.isnan(out[0, 0]).any()


def test_decision_cache_is_per_dtype_and_head_dim():
    q = torch.randn(1, 2, 3, 300)  # head_dim 300: beyond the cpu kernel's 256, auto takes torch
    gk.scaled_dot_product_attention(q, q, q)
    assert gk.last("scaled_dot_product_attention")[0] == "torch"
    q = torch.randn(1, 2, 3, 64)
    gk.scaled_dot_product_attention(q, q, q)
    assert gk.last("scaled_dot_product_attention")[0] == "cpu"
    gk.layer_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    assert gk.last("layer_norm")[0] == "torch"
    gk.layer_norm(torch.randn(2, 8), torch.randn(8))
    assert gk.last("layer_norm")[0] == "cpu"
    assert _dispatch.choice("layer_norm", torch.device("cpu"), None, torch.float64)[0] == "torch"


def test_attention_auto_order_puts_triton_first_on_hopper(monkeypatch):
    from gptkernels.ops import attention as A

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(A, "_capability", lambda device: (9, 0))
    order, why = A._auto_order(dev)
    assert order == ("triton", "cuda", "torch") and "sm_90" in why
    monkeypatch.setattr(A, "_capability", lambda device: (8, 0))
    assert A._auto_order(dev) == (None, None)
    assert A._auto_order(torch.device("cpu")) == (None, None)
    # Packed sequences on any GPU: Triton's kernels read cu_seqlens; the CUDA path pads to max_seqlen.
    order, why_varlen = A._auto_order(dev, varlen=True)
    assert order == ("triton", "cuda", "torch") and "cu_seqlens" in why_varlen
    assert A._auto_order(torch.device("cpu"), varlen=True) == (None, None)
    # The reason reaches explain(): select() formats the order and why into its note.
    monkeypatch.setattr(_dispatch, "backend_reason", lambda b, d: None)
    _dispatch.select("scaled_dot_product_attention", dev, None, None, order=("triton", "cuda", "torch"),
                     order_why=why)
    assert gk.last("scaled_dot_product_attention") == (
        "triton", f"auto on cuda: first usable of triton, cuda, torch ({why})")
