"""The benchmarked ops and the shape presets, named after real models.

Presets (C = model width, H = heads, T = context):
    gpt2      C=768,  H=12, T=1024
    gpt2-xl   C=1600, H=25, T=1024
    llama-7b  C=4096, H=32, T=4096
    standard  (16384, 4096) rows x columns, the GPU shape for norms and plain softmax (any device, not scaled)
    tiny      a few KB, for tests

Norms run on (tokens, C): 16384 tokens per step on CUDA (e.g. 16 x 1024), 1024 on CPU. Attention-score softmax
runs on (B, H, Tq, T): on CUDA Tq = T and B = 16384 // T tokens' worth, cut so one tensor stays <= 2**28 elements
(llama-7b: B=1); on CPU at most ~4M elements (gpt2: 4 of its 12 heads; llama-7b, plain softmax: 1024 query rows of
one head; causal keeps Tq = T). The row length, which is what a kernel's design depends on, is never cut; the shape
in each result row is the one that ran.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from gptkernels.bench.registry import OpSpec, Provider, register_op, register_provider

MODELS = {  # name: (C, H, T)
    "gpt2": (768, 12, 1024),
    "gpt2-xl": (1600, 25, 1024),
    "llama-7b": (4096, 32, 4096),
}
STANDARD = (16384, 4096)
PRESETS = tuple(MODELS) + ("standard", "tiny")
DEFAULT_PRESETS = {"cpu": ("gpt2", "gpt2-xl", "llama-7b"), "cuda": ("standard", "gpt2", "gpt2-xl", "llama-7b")}
QUICK_PRESETS = {"cpu": ("gpt2",), "cuda": ("standard",)}
CPU_ELEMENTS = 4 << 20  # per-tensor cap on CPU for attention scores
CUDA_TOKENS = 16384
CPU_TOKENS = 1024
CUDA_SCORE_ELEMENTS = 1 << 28
SCALE = 0.125  # 1/sqrt(head_dim 64), the softmax scale of gpt2 and llama-7b
LN_EPS, RMS_EPS = 1e-5, 1e-6


def parse_shape(text: str) -> tuple | None:
    """'4096x768' -> (4096, 768); None if ``text`` is not an explicit shape."""
    return tuple(int(d) for d in text.split("x")) if re.fullmatch(r"\d+(x\d+)*", text) else None


def _rows(shape) -> int:
    return math.prod(shape[:-1])


# ------------------------------------------------------------------------------------------------- shapes
def _norm_shape(preset, device_type):
    if preset == "tiny":
        return (33, 96)
    if preset == "standard":
        return STANDARD
    c, _, _ = MODELS[preset]
    return (CUDA_TOKENS if device_type == "cuda" else CPU_TOKENS, c)


def _score_shape(preset, device_type):
    """(B, H, T, T) attention scores of a model preset."""
    _, h, t = MODELS[preset]
    if device_type == "cuda":
        b = max(1, min(CUDA_TOKENS // t, CUDA_SCORE_ELEMENTS // (h * t * t)))
        return (b, h, t, t)
    return (1, max(1, min(h, CPU_ELEMENTS // (t * t))), t, t)


def _softmax_shape(preset, device_type):
    """Attention-score rows; on CPU the query rows are cut too (to Tq <= T) so llama-7b stays ~4M elements."""
    if preset == "tiny":
        return (33, 80)
    if preset == "standard":
        return STANDARD
    b, h, t, _ = _score_shape(preset, device_type)
    if device_type == "cuda":
        return (b, h, t, t)
    return (b, h, max(1, min(t, CPU_ELEMENTS // (h * t))), t)


def _causal_shape(preset, device_type):
    if preset == "tiny":
        return (1, 2, 24, 24)
    if preset == "standard":
        return None  # causal masking needs a (T, T) score matrix; the standard shape is a plain row batch
    return _score_shape(preset, device_type)


# ------------------------------------------------------------------------------------------------- inputs
def _randn(shape, dtype, device, gen, std=1.0, mean=0.0):
    """Fresh normal values drawn in fp32 then rounded to ``dtype`` (never zeros, never a constant)."""
    return (torch.randn(shape, device=device, generator=gen) * std + mean).to(dtype)


def _norm_inputs(residual, bias):
    def make(shape, dtype, device, gen):
        n = shape[-1]
        d = {"x": _randn(shape, dtype, device, gen, 2.0, 0.5)}
        if residual:
            d["residual"] = _randn(shape, dtype, device, gen)
        d["weight"] = _randn((n,), dtype, device, gen, 0.1, 1.0)
        if bias:
            d["bias"] = _randn((n,), dtype, device, gen, 0.1)
        return d

    return make


def _softmax_inputs(shape, dtype, device, gen):
    return {"x": _randn(shape, dtype, device, gen, 8.0)}  # scaled logits ~ N(0, 1)


def _causal_inputs(shape, dtype, device, gen):
    t, n = shape[-2:]
    keep = torch.ones(t, n, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(t, n, device=device).masked_fill(~keep, float("-inf")).to(dtype)  # (T, N) additive
    return {"x": _randn(shape, dtype, device, gen, 8.0), "mask": mask}


# ------------------------------------------------------------------------- eager (what a user would write)
def _ln_eager(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)


def _ln_res_eager(x, residual, weight, bias):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, LN_EPS), h


def _rms_eager(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, RMS_EPS)


def _rms_res_eager(x, residual, weight):
    h = x + residual
    return F.rms_norm(h, (h.shape[-1],), weight, RMS_EPS), h


def _softmax_eager(x):
    return torch.softmax(x * SCALE, dim=-1)


def _causal_eager(x, mask):
    return torch.softmax(x * SCALE + mask, dim=-1)


# ------------------------------------------------------------------------------- references (run in fp64)
def _ln_ref(x, weight, bias, residual=None):
    from gptkernels.ops.layernorm import layer_norm_ref

    return layer_norm_ref(x, weight, bias, LN_EPS, residual)


def _rms_ref(x, weight, residual=None):
    from gptkernels.ops.layernorm import rms_norm_ref

    return rms_norm_ref(x, weight, RMS_EPS, residual)


def _softmax_ref(x):
    from gptkernels.ops.softmax import softmax_ref

    return softmax_ref(x, SCALE)


def _causal_ref(x, mask):
    from gptkernels.ops.softmax import softmax_ref

    return softmax_ref(x, SCALE, causal=True)


# ----------------------------------------------------------------------------------------- gptkernels
def _ln_kernel(backend):
    from gptkernels.ops.layernorm import layer_norm

    def fn(x, weight, bias, residual=None):
        return layer_norm(x, weight, bias, LN_EPS, residual=residual, backend=backend)

    return fn


def _rms_kernel(backend):
    from gptkernels.ops.layernorm import rms_norm

    def fn(x, weight, residual=None):
        return rms_norm(x, weight, RMS_EPS, residual=residual, backend=backend)

    return fn


def _softmax_kernel(backend):
    from gptkernels.ops.softmax import softmax

    return lambda x: softmax(x, SCALE, backend=backend)


def _causal_kernel(backend):
    from gptkernels.ops.softmax import softmax

    return lambda x, mask: softmax(x, SCALE, causal=True, backend=backend)  # the mask is generated, not read


# ----------------------------------------------------------------------------- bytes that must move
# M = rows (all dims but the last), N = last dim, e = element size; weights are in the input dtype. The per-row
# mean/rstd a kernel may save for bwd (8*M bytes) are not counted: bwd could recompute them from x.
def _bytes(rows_mult, n_mult):
    def b(shape, e):
        m, n = _rows(shape), shape[-1]
        return rows_mult * m * n * e + n_mult * n * e

    return b


NORMS = [
    # name, residual, rms, summary
    ("layernorm", False, False, "F.layer_norm(x, w, b)"),
    ("layernorm_residual", True, False, "h = x + r; y = F.layer_norm(h, w, b); returns (y, h)"),
    ("rmsnorm", False, True, "F.rms_norm(x, w)"),
    ("rmsnorm_residual", True, True, "h = x + r; y = F.rms_norm(h, w); returns (y, h)"),
]


def _register_norms():
    for name, residual, rms, summary in NORMS:
        wb = "weight" if rms else "weight, bias"
        nw = 1 if rms else 2
        if residual:
            fwd = (f"read x, residual + write y, h: 4*M*N*e; read {wb}: {nw}*N*e", _bytes(4, nw))
            bwd = (f"read dy, dh, h + write dx (= dresidual): 4*M*N*e; read weight, write d{wb.replace(', ', ', d')}: "
                   f"{nw + 1}*N*e", _bytes(4, nw + 1))
        else:
            fwd = (f"read x + write y: 2*M*N*e; read {wb}: {nw}*N*e", _bytes(2, nw))
            bwd = (f"read dy, x + write dx: 3*M*N*e; read weight, write d{wb.replace(', ', ', d')}: {nw + 1}*N*e",
                   _bytes(3, nw + 1))
        grads = ("x",) + (("residual",) if residual else ()) + (("weight",) if rms else ("weight", "bias"))
        if rms:
            eager = _rms_res_eager if residual else _rms_eager
            ref = _rms_ref
            kernel = _rms_kernel
        else:
            eager = _ln_res_eager if residual else _ln_eager
            ref = _ln_ref
            kernel = _ln_kernel
        register_op(OpSpec(
            name=name, summary=summary, module="gptkernels.ops.layernorm", shape=_norm_shape,
            make_inputs=_norm_inputs(residual, bias=not rms), grad_inputs=grads, ref=ref, eager=eager, kernel=kernel,
            bytes={"fwd": fwd[1], "bwd": bwd[1]}, formula={"fwd": fwd[0], "bwd": bwd[0]},
            default_on=("cuda",) if residual else ("cpu", "cuda"),
        ), replace=True)


def _register_softmax():
    fwd = ("read x + write y: 2*M*N*e", _bytes(2, 0))
    bwd = ("read y, dy + write dx: 3*M*N*e", _bytes(3, 0))
    register_op(OpSpec(
        name="softmax", summary=f"torch.softmax(x * {SCALE}, -1)", module="gptkernels.ops.softmax",
        shape=_softmax_shape, make_inputs=_softmax_inputs, grad_inputs=("x",), ref=_softmax_ref, eager=_softmax_eager,
        kernel=_softmax_kernel, bytes={"fwd": fwd[1], "bwd": bwd[1]}, formula={"fwd": fwd[0], "bwd": bwd[0]},
    ), replace=True)
    register_op(OpSpec(
        name="softmax_causal", summary=f"torch.softmax(x * {SCALE} + causal_mask, -1) on (B, H, T, T) scores",
        module="gptkernels.ops.softmax", shape=_causal_shape, make_inputs=_causal_inputs, grad_inputs=("x",),
        ref=_causal_ref, eager=_causal_eager, kernel=_causal_kernel,
        bytes={"fwd": fwd[1], "bwd": bwd[1]},
        formula={"fwd": fwd[0] + " (the causal mask is generated, not read)", "bwd": bwd[0]},
        default_on=("cuda",),
    ), replace=True)


# ------------------------------------------------------------------------------------------------ attention
# Causal self-attention on (B, H, T, D). CUDA: llama-7b is the headline shape B=4, H=32, T=4096, D=128; gpt2 is
# B=16, H=12, T=1024, D=64. CPU: one sequence, heads cut so the (T, T) scores of eager stay small; the CPU goal
# is measured at `--shapes 4x8x1024x64`.
def _attn_shape(preset, device_type):
    if preset == "tiny":
        return (1, 2, 40, 32)
    if preset == "standard":
        return (4, 32, 4096, 128) if device_type == "cuda" else (4, 8, 1024, 64)
    c, h, t = MODELS[preset]
    d = c // h
    if device_type == "cuda":
        return (max(1, CUDA_TOKENS // t), h, t, d) if preset != "llama-7b" else (4, h, t, d)
    if preset == "llama-7b":
        return (1, 4, 1024, d)
    return (1, h, t, d) if preset == "gpt2" else None  # CPU: gpt2-xl repeats gpt2's D=64 at 2x the time


def _attn_inputs(shape, dtype, device, gen):
    return {k: _randn(shape, dtype, device, gen) for k in ("q", "k", "v")}


def _attn_eager(q, k, v):
    """matmul -> masked softmax -> matmul, as a user writes it without SDPA (materializes the (T, T) scores)."""
    t = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def _attn_ref(q, k, v):
    from gptkernels.ops.attention import attention_ref

    return attention_ref(q, k, v, is_causal=True)


def _attn_kernel(backend):
    from gptkernels.ops.attention import scaled_dot_product_attention

    return lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)


def _attn_flops(mult):
    # 4*B*H*T*T*D for QK^T and PV, halved for causal; backward 2.5x forward (HOUSE_STYLE)
    return lambda shape: int(mult * 0.5 * 4 * shape[0] * shape[1] * shape[2] * shape[2] * shape[3])


def _sdpa_provider(name, backend_enum):
    def make(problem):
        import torch.nn.attention as tna

        def fn(q, k, v):
            ctx = tna.sdpa_kernel([getattr(tna.SDPBackend, backend_enum)]) if backend_enum else nullcontext()
            with ctx:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return fn

    def usable(problem):
        cuda_only = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
        if backend_enum in cuda_only and problem.device.type != "cuda":
            return f"SDPA {backend_enum.lower()} runs on CUDA only"
        if backend_enum == "FLASH_ATTENTION" and problem.dtype == torch.float32:
            return "SDPA flash takes fp16/bf16 only"
        return None

    return Provider(name, make, usable)


def _register_attention():
    register_op(OpSpec(
        name="attention", summary="causal SDPA on (B, H, T, D) vs eager matmul-softmax-matmul and every SDPA backend",
        module="gptkernels.ops.attention", shape=_attn_shape, make_inputs=_attn_inputs, grad_inputs=("q", "k", "v"),
        ref=_attn_ref, eager=_attn_eager, kernel=_attn_kernel,
        flops={"fwd": _attn_flops(1.0), "bwd": _attn_flops(2.5)},
        formula={"fwd": "4*B*H*T*T*D * 0.5 (causal)", "bwd": "2.5 * 4*B*H*T*T*D * 0.5 (causal)"},
    ), replace=True)
    for name, enum in (("sdpa", None), ("sdpa-math", "MATH"), ("sdpa-flash", "FLASH_ATTENTION"),
                       ("sdpa-efficient", "EFFICIENT_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
        register_provider("attention", _sdpa_provider(name, enum))


# ------------------------------------------------------------------------------------------------------ MLP
# GPT-2 MLP on (tokens, C) with hidden 4C: fc -> GELU(tanh) -> proj.
def _mlp_shape(preset, device_type):
    if preset == "tiny":
        return (33, 64)
    if preset == "standard":
        return (CUDA_TOKENS, 4096) if device_type == "cuda" else (CPU_TOKENS, 768)
    c, _, _ = MODELS[preset]
    if device_type != "cuda" and preset != "gpt2":
        return None  # CPU: GEMM-bound seconds per call at the wider presets; the default suite stays < 5 min
    return (CUDA_TOKENS if device_type == "cuda" else CPU_TOKENS, c)


def _mlp_inputs(shape, dtype, device, gen):
    m, c = shape
    h = 4 * c
    return {"x": _randn(shape, dtype, device, gen), "w_fc": _randn((h, c), dtype, device, gen, c ** -0.5),
            "b_fc": _randn((h,), dtype, device, gen, 0.1), "w_proj": _randn((c, h), dtype, device, gen, h ** -0.5),
            "b_proj": _randn((c,), dtype, device, gen, 0.1)}


def _mlp_eager(x, w_fc, b_fc, w_proj, b_proj):
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)


def _mlp_ref(x, w_fc, b_fc, w_proj, b_proj):
    return _mlp_eager(x, w_fc, b_fc, w_proj, b_proj)  # called on fp64 tensors by the harness


def _mlp_kernel(backend):
    from gptkernels.ops.mlp import fused_mlp

    return lambda x, w_fc, b_fc, w_proj, b_proj: fused_mlp(x, w_fc, b_fc, w_proj, b_proj, "gelu_tanh",
                                                           backend=backend)


def _mlp_flops(mult):
    return lambda shape: int(mult * 2 * 2 * shape[0] * shape[1] * 4 * shape[1])  # two GEMMs of 2*M*C*4C


def _bias_gelu_shape(preset, device_type):
    """The (tokens, 4C) hidden activation of the MLP preset (every preset on CPU: it is memory-bound and quick)."""
    if preset == "tiny":
        return (33, 256)
    tokens = CUDA_TOKENS if device_type == "cuda" else CPU_TOKENS
    c = 4096 if preset == "standard" else MODELS[preset][0]
    return (tokens, 4 * c)


def _bias_gelu_inputs(shape, dtype, device, gen):
    return {"x": _randn(shape, dtype, device, gen), "bias": _randn((shape[-1],), dtype, device, gen, 0.1)}


def _bias_gelu_eager(x, bias):
    return F.gelu(x + bias, approximate="tanh")


def _bias_gelu_kernel(backend):
    from gptkernels.ops.mlp import bias_gelu

    return lambda x, bias: bias_gelu(x, bias, "tanh", backend=backend)


def _register_mlp():
    register_op(OpSpec(
        name="mlp", summary="GPT-2 MLP: linear(C->4C) + GELU(tanh) + linear(4C->C), weights in nn.Linear layout",
        module="gptkernels.ops.mlp", shape=_mlp_shape, make_inputs=_mlp_inputs,
        grad_inputs=("x", "w_fc", "b_fc", "w_proj", "b_proj"), ref=_mlp_ref, eager=_mlp_eager, kernel=_mlp_kernel,
        flops={"fwd": _mlp_flops(1.0), "bwd": _mlp_flops(2.0)},
        formula={"fwd": "2 GEMMs: 2 * 2*M*C*4C", "bwd": "4 GEMMs: 2 * (2 * 2*M*C*4C)"},
    ), replace=True)
    fwd = ("read x + write y: 2*M*N*e; read bias: N*e", _bytes(2, 1))
    bwd = ("read dy, x + write dx: 3*M*N*e; read bias, write dbias: 2*N*e", _bytes(3, 2))
    register_op(OpSpec(
        name="bias_gelu", summary="gelu(x + b, approximate='tanh') on the (tokens, 4C) hidden activation",
        module="gptkernels.ops.mlp", shape=_bias_gelu_shape,
        make_inputs=_bias_gelu_inputs, grad_inputs=("x", "bias"), ref=_bias_gelu_eager, eager=_bias_gelu_eager,
        kernel=_bias_gelu_kernel, bytes={"fwd": fwd[1], "bwd": bwd[1]}, formula={"fwd": fwd[0], "bwd": bwd[0]},
    ), replace=True)


# ------------------------------------------------------------------------------------------------------ loss
# The LM head's loss at GPT-2's vocabulary (and a Llama-3-sized one on CUDA). Tokens per row: CUDA 4096 (standard)
# and 8192 (the models); CPU 1024 for cross_entropy and 256 for linear_cross_entropy, whose eager fwd+bwd is three
# (N, C) x (C, V) GEMMs (1.7 s per call at 256 x 768 x 50257 on 2 cores) and the default suite must stay short.
# `--shapes 8192x768x50257` runs any size. Timed fwd+bwd by default: the loss's peak memory is that of the whole step.
GPT2_VOCAB, LLAMA3_VOCAB = 50257, 128256
LOSS_TOKENS = {"cpu": (1024, 256), "cuda": (8192, 8192)}  # (cross_entropy, linear_cross_entropy)
IGNORED = 0.05  # share of targets set to ignore_index (padding), so the ignore path is part of every timing


def _loss_dims(preset, device_type):
    """(tokens for cross_entropy, tokens for linear_cross_entropy, C, V) of a preset, or None."""
    if preset == "tiny":
        return 33, 33, 48, 301
    ce, lce = LOSS_TOKENS["cuda" if device_type == "cuda" else "cpu"]
    if preset == "standard":
        return (4096, 4096, 768, GPT2_VOCAB) if device_type == "cuda" else None
    if preset == "llama-7b":
        return (4096, 4096, 4096, LLAMA3_VOCAB) if device_type == "cuda" else None
    if preset == "gpt2-xl" and device_type != "cuda":
        return None  # CPU: the same vocabulary as gpt2; only the GEMMs grow
    return ce, lce, MODELS[preset][0], GPT2_VOCAB


def _ce_shape(preset, device_type):
    d = _loss_dims(preset, device_type)
    return None if d is None else (d[0], d[3])


def _lce_shape(preset, device_type):
    d = _loss_dims(preset, device_type)
    return None if d is None else (d[1], d[2], d[3])


def _targets(n, v, device, gen):
    t = torch.randint(0, v, (n,), device=device, generator=gen)
    drop = torch.rand(n, device=device, generator=gen) < IGNORED
    return t.masked_fill(drop, -100)


def _ce_inputs(shape, dtype, device, gen):
    n, v = shape
    return {"logits": _randn(shape, dtype, device, gen, 2.0), "target": _targets(n, v, device, gen)}


def _lce_inputs(shape, dtype, device, gen):
    n, c, v = shape
    return {"h": _randn((n, c), dtype, device, gen), "weight": _randn((v, c), dtype, device, gen, 2 * c ** -0.5),
            "target": _targets(n, v, device, gen)}


def _ce_eager(logits, target):
    return F.cross_entropy(logits.float(), target)  # .float(): what HF's and nanoGPT's losses do with 16-bit logits


def _ce_ref(logits, target):
    return F.cross_entropy(logits, target)  # fp64 in the harness


def _lce_eager(h, weight, target):
    return F.cross_entropy(F.linear(h, weight).float(), target)


def _lce_ref(h, weight, target):
    return F.cross_entropy(F.linear(h, weight), target)


def _ce_kernel(backend):
    from gptkernels.ops.cross_entropy import cross_entropy

    return lambda logits, target: cross_entropy(logits, target, backend=backend)


def _lce_kernel(backend):
    from gptkernels.ops.cross_entropy import linear_cross_entropy

    return lambda h, weight, target: linear_cross_entropy(h, weight, target, backend=backend)


def _lce_flops(gemms):
    return lambda shape: int(gemms * 2 * shape[0] * shape[1] * shape[2])


def _register_loss():
    register_op(OpSpec(
        name="cross_entropy", summary="F.cross_entropy on (tokens, V) logits, 5% of targets ignored",
        module="gptkernels.ops.cross_entropy", shape=_ce_shape, make_inputs=_ce_inputs, grad_inputs=("logits",),
        ref=_ce_ref, eager=_ce_eager, kernel=_ce_kernel,
        bytes={"fwd": lambda shape, e: shape[0] * shape[1] * e, "bwd": lambda shape, e: 2 * shape[0] * shape[1] * e},
        formula={"fwd": "read logits: N*V*e", "bwd": "read logits + write dlogits: 2*N*V*e"},
        default_modes=("fwd+bwd",),
    ), replace=True)
    register_op(OpSpec(
        name="linear_cross_entropy",
        summary="cross_entropy(h @ W^T, target): the LM head and its loss, (N, C) x (V, C)",
        module="gptkernels.ops.cross_entropy", shape=_lce_shape, make_inputs=_lce_inputs,
        grad_inputs=("h", "weight"), ref=_lce_ref, eager=_lce_eager, kernel=_lce_kernel,
        flops={"fwd": _lce_flops(1), "bwd": _lce_flops(2)},
        formula={"fwd": "logits GEMM: 2*N*C*V", "bwd": "dh and dW GEMMs: 2 * 2*N*C*V (a recompute is not counted)"},
        default_modes=("fwd+bwd",),
    ), replace=True)


# ------------------------------------------------------------------------------------------ quantized linear
# Weight-only int8 (per output channel) and int4 (groups of 128) GEMV/skinny GEMM at decode batch sizes, on the
# MLP's up projection (N = 4C, K = C; llama-7b: its 11008 x 4096). The float weight given to eager F.linear is the
# dequantized one, so every provider computes the same product and the fp64 reference checks them all.
QLINEAR_ROWS = (1, 4, 16)
# GPT-2's and Llama-7B's layers (gpt2-xl adds nothing new to a GEMV's behaviour, and its K = 1600 has no int4 g128).
QLINEAR_LAYERS = {"gpt2": (3072, 768), "llama-7b": (11008, 4096), "standard": (11008, 4096)}


def _qlinear_shape(preset, device_type):
    if preset == "tiny":
        return [(1, 96, 256), (3, 96, 256)]
    if preset not in QLINEAR_LAYERS:
        return None
    n, k = QLINEAR_LAYERS[preset]
    return [(m, n, k) for m in QLINEAR_ROWS]


def _qlinear_inputs(bits, group):
    def make(shape, dtype, device, gen):
        from gptkernels.ops.qlinear import dequantize_weight, quantize_weight

        m, n, k = shape
        w = torch.randn((n, k), device=device, generator=gen) * k ** -0.5
        q, sc = quantize_weight(w, bits=bits, group_size=group)
        return {"x": _randn((m, k), dtype, device, gen), "weight": dequantize_weight(q, sc, group_size=group,
                bits=bits, dtype=dtype), "qweight": q, "scales": sc}
    return make


def _qlinear_eager(x, weight, qweight, scales):
    return F.linear(x, weight)


def _qlinear_ref(bits, group):
    def ref(x, weight, qweight, scales):
        from gptkernels.ops.qlinear import quantized_linear_ref

        return quantized_linear_ref(x, qweight, scales, group_size=group, bits=bits)
    return ref


def _qlinear_kernel(bits, group):
    def kernel(backend):
        from gptkernels.ops.qlinear import quantized_linear

        return lambda x, weight, qweight, scales: quantized_linear(x, qweight, scales, group_size=group, bits=bits,
                                                                   backend=backend)
    return kernel


def _int8pack_provider():
    def make(problem):
        return lambda x, weight, qweight, scales: torch.ops.aten._weight_int8pack_mm(x, qweight, scales.to(x.dtype))

    def usable(problem):
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "this torch has no aten._weight_int8pack_mm"
        if problem.device.type != "cpu":
            return "aten._weight_int8pack_mm: compared on CPU only"
        return None

    return Provider("aten-int8pack", make, usable)


def _register_qlinear():
    for bits, group in ((8, None), (4, 128)):
        name = "qlinear_int8" if bits == 8 else "qlinear_int4"
        fmt = "int8, one scale per output channel" if bits == 8 else "int4, a scale per 128 K values"
        register_op(OpSpec(
            name=name, summary=f"weight-only {fmt}: x (M, K) @ dequant(W)^T at decode batch sizes M = 1, 4, 16, vs "
            f"F.linear on the float weight", module="gptkernels.ops.qlinear", shape=_qlinear_shape,
            make_inputs=_qlinear_inputs(bits, group), grad_inputs=(), ref=_qlinear_ref(bits, group),
            eager=_qlinear_eager, kernel=_qlinear_kernel(bits, group),
            flops={"fwd": lambda shape: 2 * shape[0] * shape[1] * shape[2]}, formula={"fwd": "2*M*N*K"},
            modes=("fwd",), baselines=("eager",),
            stream_bytes=(lambda shape, e, bits=bits: shape[1] * shape[2] * bits // 8 + shape[0] * shape[2] * e),
        ), replace=True)
    register_provider("qlinear_int8", _int8pack_provider())


_register_norms()
_register_softmax()
_register_attention()
_register_mlp()
_register_loss()
_register_qlinear()
