"""Weight-only quantized linear (quantized_linear, quantize_weight, QuantizedLinear, quantize, load_quantized) on every
backend against an fp64 dequantize-then-matmul reference."""

import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close, backend_params

import gptkernels
from gptkernels import ArgumentError, ArgumentTypeError
from gptkernels.nn import QuantizedLinear, QuantizedMLP
from gptkernels.ops.qlinear import (
    GEMV_MAX_ROWS,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    quantized_linear,
    quantized_linear_ref,
    unpack_int4,
)

# (bits, group_size): int8 per channel, int8 groups, int4 groups.
FORMATS = [(8, None), (8, 64), (8, 128), (4, 32), (4, 64), (4, 128)]
FORMAT_IDS = ["int8", "int8-g64", "int8-g128", "int4-g32", "int4-g64", "int4-g128"]
ROWS = [1, 3, 17, 128]  # GEMV (1, 3) and dequantize + GEMM (17, 128) paths


def _shape(bits, group_size):
    """(N, K): N odd; K odd where the format allows (int8 per channel), else a multiple of the group."""
    return (97, 771) if group_size is None else (97, 384)


def _weights(bits, group_size, device="cpu", n_k=None):
    n, k = n_k or _shape(bits, group_size)
    w = torch.randn(n, k) * 0.05
    q, s = quantize_weight(w, bits, group_size)
    return w, q.to(device), s.to(device)


def _skip_unsupported(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton interpreter truncates fp32->bf16; bf16 Triton runs in the gpu-marked tests")


def _eager(x, q, s, b, group_size, bits):
    """Plain PyTorch in x's dtype: the yardstick of what a 16-bit dtype costs (the flash-attention rule)."""
    w = dequantize_weight(q.cpu(), s.cpu(), group_size=group_size, bits=bits).to(x.dtype)
    xc = x.detach().cpu()
    return F.linear(xc, w, b.detach().cpu().to(x.dtype) if b is not None else None)


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", ROWS)
def test_matches_fp64(bd, fmt, dtype, m):
    backend, device = bd
    bits, group_size = fmt
    _skip_unsupported(backend, device, dtype)
    if device == "cpu" and backend == "triton" and m == 128 and group_size is not None and group_size < 128:
        pytest.skip("interpreter time: the dequantize + GEMM path is covered at M = 17 and g128")
    _, q, s = _weights(bits, group_size, device)
    n, k = q.shape[0], _shape(bits, group_size)[1]
    with_bias = m != 3  # both forms, on both paths
    b = torch.randn(n, device=device, dtype=dtype) if with_bias else None
    if m in (3, 17):  # a non-contiguous x (every other column of a wider tensor, 3-D), on both paths
        x = torch.randn(1, m, 2 * k, device=device, dtype=dtype)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(m, k, device=device, dtype=dtype)
    y = quantized_linear(x, q, s, b, group_size=group_size, bits=bits, backend=backend)
    assert gptkernels.last("quantized_linear")[0] == backend
    assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype
    ref = quantized_linear_ref(x.detach().cpu().double(), q.cpu(), s.cpu(),
                               b.cpu().double() if b is not None else None, group_size=group_size, bits=bits)
    eager = _eager(x, q, s, b, group_size, bits) if dtype != torch.float32 else None
    assert_close(y, ref, eager, f"{backend} {fmt} m={m}", dtype=dtype)


def test_path_is_recorded():
    _, q, s = _weights(8, None)
    k = q.shape[1]
    for m, path in ((GEMV_MAX_ROWS, "fused GEMV"), (GEMV_MAX_ROWS + 1, "dequantize + GEMM")):
        for _ in range(2):  # the second call takes the eager fast path with the cached record
            quantized_linear(torch.randn(m, k), q, s, backend="cpu")
            assert path in gptkernels.last("quantized_linear")[1], gptkernels.explain()
    quantized_linear(torch.randn(1, k), q, s, backend="torch")
    assert "eager reference" in gptkernels.last("quantized_linear")[1]


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpu_isa_copies(isa):
    """The AVX2 and generic copies of the CPU kernels (the process picks one at start-up)."""
    code = (
        "import torch\n"
        "from gptkernels.ops.qlinear import quantize_weight, quantized_linear, quantized_linear_ref\n"
        "worst = 0.0\n"
        "for bits, g, k in ((8, None, 771), (8, 64, 384), (4, 32, 384), (4, 128, 384)):\n"
        "    q, s = quantize_weight(torch.randn(37, k), bits, g)\n"
        "    for m in (1, 2, 3, 5, 9, 16):\n"
        "        x, b = torch.randn(m, k), torch.randn(37)\n"
        "        y = quantized_linear(x, q, s, b, group_size=g, bits=bits, backend='cpu').double()\n"
        "        r = quantized_linear_ref(x.double(), q, s, b.double(), group_size=g, bits=bits)\n"
        "        worst = max(worst, ((y - r).norm() / r.norm()).item())\n"
        "print(worst)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "GPTKERNELS_CPU_ISA": isa, "OMP_NUM_THREADS": "2", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-5


def test_multithreaded_cpu_split():
    """Row blocks split over threads: uneven N, every tile width, the same result as one thread."""
    _, q, s = _weights(4, 64, n_k=(1000, 256))
    x = torch.randn(5, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantized_linear(x, q, s, group_size=64, bits=4, backend="cpu")
        torch.set_num_threads(3)
        three = quantized_linear(x, q, s, group_size=64, bits=4, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, three)


# ----------------------------------------------------------------------------------------------- quantize_weight
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_quantize_weight_round_trip(fmt):
    bits, group_size = fmt
    n, k = _shape(bits, group_size)
    w = torch.randn(n, k) * torch.logspace(-3, 0, n).unsqueeze(1)  # rows of very different magnitude
    q, s = quantize_weight(w, bits, group_size)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.shape == (n, k if bits == 8 else k // 2)
    assert s.dtype == torch.float32 and s.shape == ((n,) if group_size is None else (n, k // group_size))
    err = (dequantize_weight(q, s, group_size=group_size, bits=bits) - w).abs()  # (N, K)
    g = k if group_size is None else group_size
    step = s.abs().reshape(n, -1).repeat_interleave(g, dim=1)  # (N, K)
    qmax = 127 if bits == 8 else 7
    # absmax: each group's largest-magnitude weight lands exactly on -(qmax + 1), so every level is in use.
    assert (torch.as_tensor(q if bits == 8 else unpack_int4(q)).reshape(n, k // g, g).amin(-1) == -qmax - 1).all()
    # Round to nearest: within half a step, except values of the other sign beyond qmax + 1/2 steps, which clamp to
    # qmax (within one step). Slack for fp32: w / scale rounds (a quotient just under k + 0.5 can land on it and round
    # away) and q * scale rounds: a few ulps of |w|.
    slack = 4 * torch.finfo(torch.float32).eps * w.abs() + 1e-12
    inside = w.abs() <= (qmax + 0.5) * step
    assert (err[inside] <= step[inside] * 0.5 + slack[inside]).all()
    assert (err <= step + slack).all()
    mse_q, mse_s = quantize_weight(w, bits, group_size, calibrate="mse")
    err_mse = (dequantize_weight(mse_q, mse_s, group_size=group_size, bits=bits) - w).pow(2).reshape(n, k // g, g)
    err_abs = err.pow(2).reshape(n, k // g, g)
    # The MSE search includes ratio 1.0 (absmax), so no group gets worse.
    assert (err_mse.sum(-1) <= err_abs.sum(-1) * (1 + 1e-5) + 1e-12).all()


def test_int4_nibble_order_and_mse_gain():
    q = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    for blk in range(2):  # byte j of a 32-value block: k = j low nibble, k = j + 16 high nibble, stored as q + 8
        for j in range(16):
            byte = int(packed[1, blk * 16 + j])
            assert byte & 15 == int(q[1, blk * 32 + j]) + 8 and byte >> 4 == int(q[1, blk * 32 + 16 + j]) + 8
    assert torch.equal(unpack_int4(packed), q)
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))  # Gaussian, like a random-init layer

    def rel(q, s):
        return ((dequantize_weight(q, s, group_size=32, bits=4) - w).norm() / w.norm()).item()

    # The [-7, 7] grid (scale max|w| / 7, 15 of the 16 levels) that absmax replaced, as a yardstick.
    wg = w.reshape(256, 16, 32)
    s7 = wg.abs().amax(-1) / 7  # (N, G)
    q7 = torch.round(wg / s7.unsqueeze(-1)).reshape(256, 512).to(torch.int8)
    errs = {"[-7, 7]": rel(pack_int4(q7), s7), None: rel(*quantize_weight(w, 4, 32)),
            "mse": rel(*quantize_weight(w, 4, 32, calibrate="mse"))}
    assert errs[None] == rel(*quantize_weight(w, 4, 32, calibrate="absmax"))
    # Measured 9.7%, 8.6%, 8.2% (int4 g32 on N(0, 1) weights: ~8% is the floor of round-to-nearest on 16 levels).
    assert errs[None] < errs["[-7, 7]"] * 0.92 and errs["mse"] < errs[None] * 0.97 and errs["mse"] < 0.085, errs


def test_module_dtype_moves_keep_fp32_scales():
    layer = QuantizedLinear.from_float(torch.nn.Linear(64, 24), bits=4, group_size=32)
    scales = layer.scales.clone()
    layer.half()
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales) and layer.bias.dtype == torch.half
    x = torch.randn(3, 64, dtype=torch.half)
    assert layer(x).dtype == torch.half and gptkernels.last("quantized_linear")[0] == "cpu"


def test_zero_group_and_meta():
    w = torch.zeros(4, 64)
    w[0, :32] = torch.randn(32)
    q, s = quantize_weight(w, 4, 32)
    assert torch.equal(dequantize_weight(q, s, group_size=32, bits=4)[1:], w[1:]) and (s[1:] == 0).all()
    qm, sm = quantize_weight(torch.empty(8, 64, device="meta"), 8, 32)
    assert qm.is_meta and qm.shape == (8, 64) and sm.shape == (8, 2)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs():
    w = torch.randn(16, 96)
    with pytest.raises(ArgumentError, match="not divisible by group_size 64"):
        quantize_weight(w, 8, 64)
    with pytest.raises(ArgumentError, match="bits must be 4 or 8"):
        quantize_weight(w, 3)
    with pytest.raises(ArgumentError, match="int4 needs group_size 32, 64 or 128"):
        quantize_weight(w, 4)
    with pytest.raises(ArgumentError, match="NaN or inf"):
        quantize_weight(torch.full((2, 32), float("nan")), 8)
    with pytest.raises(ArgumentError, match="calibrate must be None or one of 'absmax', 'mse', got 'percentile'"):
        quantize_weight(w, 8, calibrate="percentile")
    with pytest.raises(ArgumentError, match="quantize: bits must be 4 or 8, got 3"):
        gptkernels.quantize(torch.nn.Linear(96, 16), bits=3)
    with pytest.raises(ArgumentError, match="QuantizedLinear: K = 96 .* not divisible by group_size 64"):
        QuantizedLinear(96, 16, bits=8, group_size=64)
    with pytest.raises(ArgumentError, match="QuantizedLinear: bits must be 4 or 8"):
        QuantizedLinear(96, 16, bits=2)
    grouped = QuantizedLinear.from_float(torch.nn.Linear(96, 16), bits=8, group_size=32)
    sd = grouped.state_dict()
    sd["scales"] = torch.ones(16, 2)  # a state dict whose scales do not fit the layer's groups
    with pytest.raises(RuntimeError, match=r"size mismatch for scales.*\[16, 2\].*\[16, 3\]"):
        grouped.load_state_dict(sd)
    with pytest.raises(ArgumentError, match="quantize: calibrate must be"):
        gptkernels.quantize(torch.nn.Linear(96, 16), calibrate="gptq", dry_run=True)
    q, s = quantize_weight(w, 8, 32)
    x = torch.randn(2, 96)
    with pytest.raises(ArgumentError, match="not divisible by group_size 64"):
        quantized_linear(x, q, s, group_size=64, backend="cpu")
    with pytest.raises(ArgumentError, match="bits must be 4 or 8"):
        quantized_linear(x, q, s, group_size=32, bits=2)
    with pytest.raises(ArgumentError, match=r"scales must have shape \(16, 3\)"):
        quantized_linear(x, q, s[:, :2], group_size=32, backend="cpu")
    with pytest.raises(ArgumentTypeError, match="needs qweight of dtype torch.uint8"):
        quantized_linear(x, q, s, group_size=32, bits=4)
    with pytest.raises(ArgumentError, match="x's last dim is 95"):
        quantized_linear(torch.randn(2, 95), q, s, group_size=32)
    with pytest.raises(ArgumentTypeError, match="scales must be a float32"):
        quantized_linear(x, q, s.int(), group_size=32)
    with pytest.raises(gptkernels.BackendUnavailableError, match="the kernels read float32 scales"):
        quantized_linear(x, q, s.half(), group_size=32, backend="cpu")
    with pytest.raises(ArgumentError, match=r"bias must have shape \(16,\)"):
        quantized_linear(x, q, s, torch.randn(15), group_size=32)
    for backend in ("cpu", "torch"):
        with pytest.raises(ArgumentError, match="quantized_linear: no backward.*x requires grad"):
            quantized_linear(x.clone().requires_grad_(), q, s, group_size=32, backend=backend)
    with torch.no_grad():  # no grad needed: runs
        quantized_linear(x.clone().requires_grad_(), q, s, group_size=32)
    layer = QuantizedLinear.from_float(torch.nn.Linear(96, 16), bits=8, name="blocks.0.fc")
    with pytest.raises(ArgumentError, match="QuantizedLinear 'blocks.0.fc'.*no backward"):
        layer(x.clone().requires_grad_())
    layer.bias.requires_grad_()
    with pytest.raises(ArgumentError, match="bias requires grad"):
        layer(x)


# ------------------------------------------------------------------------------------------- ops, compile
@pytest.mark.parametrize("bd", [p for p in backend_params() if p.id != "torch"])  # torch: no custom op
def test_opcheck(bd):
    backend, device = bd
    from gptkernels.ops._common import registered_op

    op = registered_op("qlinear_fwd", backend)
    for bits, group_size in ((8, None), (8, 32), (4, 32)):
        _, q, s = _weights(bits, group_size, device, n_k=(24, 64))
        for dequant in (False, True):
            for b in (torch.randn(24, device=device), None):
                torch.library.opcheck(op, (torch.randn(2, 3, 64, device=device), q, s, b, group_size or 64, bits,
                                           dequant))


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("cuda", marks=pytest.mark.gpu),
                                     pytest.param("triton", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph(backend):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    torch._dynamo.reset()
    fc = QuantizedLinear.from_float(torch.nn.Linear(64, 96), bits=4, group_size=32, backend=backend).to(device)
    _, q8, s8 = _weights(8, None, device, n_k=(40, 96))

    def f(x):
        h = torch.relu(fc(x))  # (M, 96)
        return quantized_linear(h, q8, s8, group_size=None, bits=8, backend=backend) * 2

    for m in (1, 20):  # both paths
        x = torch.randn(m, 64, device=device)
        with torch.no_grad():
            out = torch.compile(f, fullgraph=True)(x)
            ref = f(x)
        assert_close(out, ref.double(), name=f"compiled m={m}")


# -------------------------------------------------------------------------------------------------- models
def _hf_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval(), cfg


def _ours(seed=0):
    from gptkernels.model import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig.preset("tiny")
    return GPT(cfg).eval(), cfg


def _logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _hf_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


# Logits of the quantized model vs the float one (rel. L2), max over seeds 0-4 (2x12 random tokens), 2026-12-07:
#                    int8      int4 g32 absmax   int4 g32 mse
#   HF GPT-2 tiny    0.54%     7.7%              7.2%
#   HF Llama tiny    0.76%     11.5%             10.2%
#   gptkernels tiny  0.58%     8.1%              7.6%
# int8 meets the 1e-2 asked for. int4 g32 cannot meet 5e-2 on random-init weights with round-to-nearest: they are
# Gaussian, where 16 uniform levels per group of 32 leave ~8.2% error per weight even with the best clip
# (test_int4_nibble_order_and_mse_gain), and every quantized layer adds its share (14 in the Llama, 8 in the
# others). Data-aware methods (GPTQ, AWQ) are not implemented. The bounds below are the measured maxima plus ~10%.
LOGITS_BOUNDS = {("hf", 8): 1e-2, ("ours", 8): 1e-2, ("llama", 8): 1e-2,
                 ("hf", 4): 8.5e-2, ("ours", 4): 9e-2, ("llama", 4): 1.25e-1}
_MODELS = {"hf": _hf_gpt2, "ours": _ours, "llama": _hf_llama}


@pytest.mark.parametrize("which", ["hf", "ours", "llama"])
@pytest.mark.parametrize("fmt,calibrate", [((8, None), None), ((4, 32), None), ((4, 32), "mse")],
                         ids=["int8", "int4-g32", "int4-g32-mse"])
def test_quantize_model_logits(which, fmt, calibrate):
    model, _ = _MODELS[which]()
    vocab = 256 if which == "ours" else 97
    idx = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(100))
    ref = _logits(model, idx)
    dry = gptkernels.quantize(model, *fmt, dry_run=True)
    assert all(e.action != "quantized" for e in dry) and not any(isinstance(m, QuantizedLinear)
                                                                 for m in model.modules())
    report = gptkernels.quantize(model, *fmt, calibrate=calibrate)
    n_layers = 14 if which == "llama" else 8  # Llama: q, k, v, o, gate, up, down per block
    assert len(report.quantized) == n_layers and [e.name for e in report.skipped] == ["lm_head"]
    if which != "llama":
        assert "tied to transformer.wte.weight" in report.skipped[0].reason
        assert report.bytes_after < report.bytes_before / (3.4 if fmt[0] == 8 else 5.5)
    assert f"{n_layers} quantized, 1 skipped" in str(report)
    assert (f"calibrate={calibrate}" in str(report)) == (calibrate is not None)
    n_q = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert n_q == n_layers and not any(isinstance(m, torch.nn.Linear) and m is not model.lm_head
                                       for m in model.modules())
    if which == "ours":
        assert all(isinstance(b.mlp, QuantizedMLP) for b in model.transformer.h)
    out = _logits(model, idx)
    assert _rel(out, ref) <= LOGITS_BOUNDS[which, fmt[0]], _rel(out, ref)
    assert "quantized_linear" in gptkernels.explain()
    sd = model.state_dict()
    assert any(k.endswith(".qweight") for k in sd) and any(k.endswith(".scales") for k in sd)
    assert not any(k.endswith("_proj.weight") or k.endswith("c_attn.weight") for k in sd)
    again = gptkernels.quantize(model, *fmt)  # a second call changes nothing
    assert not again.quantized and all("already quantized" in e.reason or e.name == "lm_head" for e in again)


@pytest.mark.parametrize("which", ["hf", "ours"])
@pytest.mark.parametrize("order", ["patch-then-quantize", "quantize-then-patch"])
def test_quantize_with_patch(which, order):
    model, _ = _hf_gpt2() if which == "hf" else _ours()
    idx = torch.randint(0, 97, (2, 12))
    ref = _logits(model, idx)
    if order == "patch-then-quantize":
        gptkernels.patch(model)
        report = gptkernels.quantize(model)
        if which == "hf":  # the patched MLPs ran fused_mlp on float weights: their own forward is back
            assert sum("patch forward" in e.reason for e in report) == 2
            assert all("forward" not in b.mlp.__dict__ for b in model.transformer.h)
    else:
        gptkernels.quantize(model)
        report = gptkernels.patch(model)
        mlps = [e for e in report if e.kind == "mlp"]
        assert mlps and all(e.action == "skipped" for e in mlps)
        if which == "hf":
            assert all("QuantizedLinear" in e.reason for e in mlps)
            assert sum(e.action == "swapped" for e in report if e.kind == "attention") == 2
    out = _logits(model, idx)
    assert _rel(out, ref) <= 1e-2
    quantized_only, _ = _hf_gpt2() if which == "hf" else _ours()
    gptkernels.quantize(quantized_only)
    assert _rel(out, _logits(quantized_only, idx)) <= 1e-5  # patching changes the float ops only


def test_quantize_then_patch_nanogpt_attention():
    """A nanoGPT attention whose c_attn is quantized is still recognised and patched (its sizes, not its weight)."""
    from test_patch import NanoGPT

    torch.manual_seed(0)
    model = NanoGPT().eval()
    idx = torch.randint(0, 61, (2, 8))
    gptkernels.quantize(model)
    before = _logits(model, idx)
    report = gptkernels.patch(model)
    assert any(e.kind == "attention" and e.action == "swapped" for e in report), report
    assert _rel(_logits(model, idx), before) <= 1e-5


def test_quantize_skip_and_layers():
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40),
                                torch.nn.MultiheadAttention(32, 2))
    model[0].register_forward_hook(lambda *a: None)
    report = gptkernels.quantize(model, 8, 32, skip=())
    by = {e.name: e for e in report}
    assert "forward hooks" in by["0"].reason and by["0"].action == "skipped"
    assert by["2"].action == "skipped" and "not divisible by group_size 32" in by["2"].reason  # 48 % 32
    assert "subclass of nn.Linear" in by["3.out_proj"].reason
    lin = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Sequential(torch.nn.Linear(64, 8)))
    report = gptkernels.quantize(lin, skip=("1.*",))
    assert [e.action for e in report] == ["quantized", "skipped"]
    with pytest.raises(ArgumentError, match="int4 needs group_size"):
        gptkernels.quantize(lin, bits=4)


@pytest.mark.parametrize("which", ["hf", "ours"])
@pytest.mark.parametrize("fmt", [(8, None), (4, 64)], ids=["int8", "int4-g64"])
def test_save_load_round_trip(which, fmt):
    model, cfg = _hf_gpt2() if which == "hf" else _ours()
    skip = () if fmt[0] == 4 else ("lm_head",)  # int4: lm_head quantized too (the embedding keeps its float copy)
    gptkernels.quantize(model, *fmt, skip=skip)
    idx = torch.randint(0, 97, (2, 12))
    expect = _logits(model, idx)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    loaded = gptkernels.load_quantized(cfg, sd)
    assert not any(t.is_meta for t in loaded.state_dict().values() if isinstance(t, torch.Tensor))
    if fmt[0] == 8:  # lm_head stayed float and tied to the embedding
        emb = loaded.transformer.wte.weight
        assert loaded.lm_head.weight is emb
    else:
        assert isinstance(loaded.lm_head, QuantizedLinear)
    assert torch.equal(_logits(loaded, idx), expect)
    assert gptkernels.quantize.load_quantized is gptkernels.load_quantized
    # the reverse and the wrong ones
    fresh, _ = _hf_gpt2() if which == "hf" else _ours()
    # A quantized state dict into a float model: PyTorch's key error for HF's model, ours names the fix for GPT.
    with pytest.raises(RuntimeError if which == "hf" else ValueError, match="qweight" if which == "hf" else
                       "load_quantized"):
        fresh.load_state_dict(sd)
    with pytest.raises(ArgumentError, match="no quantized layers"):
        gptkernels.load_quantized(cfg, fresh.state_dict())
    with pytest.raises(RuntimeError, match="holds a float weight"):  # a float state dict into a quantized model
        model.load_state_dict(fresh.state_dict())
    other, _ = _hf_gpt2() if which == "hf" else _ours()
    gptkernels.quantize(other, 4, 32, skip=skip)
    with pytest.raises(RuntimeError, match="holds bits=4, group_size=32; this layer is bits="):  # another format
        model.load_state_dict(other.state_dict(), strict=False)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_misaligned_and_large_m():
    """Offset views (16-byte loads need aligned rows: the glue copies) and M > 16 on the GEMV op itself."""
    _, q, s = _weights(4, 32, "cuda", n_k=(50, 256))
    big = torch.randn(5 * 256 + 1, device="cuda")
    x = big[1:].view(5, 256)  # 4-byte offset
    ref = quantized_linear_ref(x.double().cpu(), q.cpu(), s.cpu(), group_size=32, bits=4)
    for backend in ("cuda", "triton"):
        assert_close(quantized_linear(x, q, s, group_size=32, bits=4, backend=backend), ref, name=backend)
        op = gptkernels.ops._common.registered_op("qlinear_fwd", backend)
        xl = torch.randn(40, 256, device="cuda")
        assert_close(op(xl, q, s, None, 32, 4, False),
                     quantized_linear_ref(xl.double().cpu(), q.cpu(), s.cpu(), group_size=32, bits=4), name="gemv m=40")


def test_float_and_quantized_checkpoints_do_not_mix():
    """A quantized state dict into a float GPT, and a float one into a quantized GPT: one error that says what to do,
    not PyTorch's lists of missing and unexpected keys."""
    from gptkernels.model import GPT, GPTConfig

    config = GPTConfig.preset("tiny")
    float_sd = GPT(config).state_dict()
    qmodel = GPT(config)
    gptkernels.quantize(qmodel)
    q_sd = qmodel.state_dict()
    with pytest.raises(ValueError, match=r"holds weight-only quantized layers \(.*\) but this model's are float: "
                                         r"build it with gptkernels.load_quantized"):
        GPT(config).load_state_dict(q_sd)
    with pytest.raises(gptkernels.ArgumentError, match=r"holds a float weight .* gptkernels.quantize\(model\)"):
        qmodel.load_state_dict(float_sd)
    qmodel.load_state_dict(q_sd)  # the matching pair still loads
