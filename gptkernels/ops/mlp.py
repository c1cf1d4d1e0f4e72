"""FFN kernels of a GPT block: fused bias + GELU, the GPT-2 MLP, and the SwiGLU MLP.

Math (fp32 inside the kernels whatever the input dtype; shapes x: (..., C), M = numel / C rows):
    bias_gelu: y = gelu(x + b), x (..., N), b (N,); approximate="tanh" (GPT-2's gelu_new) or "none" (erf).
    fused_mlp: h = x @ W_fc^T (M, H);  a = act(h + b_fc);  y = a @ W_proj^T + b_proj (+ residual)  (..., C)
               W_fc (H, C), b_fc (H,), W_proj (C, H), b_proj (C,): nn.Linear layout; act in gelu_tanh, gelu, relu.
    swiglu:    g = x @ W_gate^T, u = x @ W_up^T (M, H);  p = silu(g) * u;  y = p @ W_down^T  (..., C)

Where the GEMMs run (the "gemm path", appended to gptkernels.explain()'s reason for fused_mlp and swiglu):
    cpu:    ATen (torch.mm / addmm) with our elementwise epilogue ops between them (gptkernels::bias_gelu_fwd/bwd,
            silu_mul_fwd/bwd). The biases and the residual are added by the GEMMs themselves (addmm).
    triton: gptkernels/triton/matmul.py, a Triton GEMM with the epilogue fused (custom ops gptkernels::matmul_*):
            fc writes pre and act(pre) from one kernel, proj adds b_proj + residual, the grad GEMM dy @ W_proj
            writes dpre = (dy @ W_proj) * act'(pre), act(pre) and db_fc's partial sums; SwiGLU computes gate and up
            from one read of x and writes silu(g) * u, and its grad GEMM writes dg, du, p. The plain GEMMs
            (dx, dW) stay in ATen: with no epilogue to fuse, cuBLAS is the faster GEMM.
    cuda:   for 16-bit x, activation="gelu_tanh", H % 8 == 0 and more than one row, cuBLASLt epilogues
            (gptkernels::mlp_fc_gelu_lt, mlp_linear_lt, mlp_dgelu_lt: GELU_AUX_BIAS, BIAS + beta=1 residual,
            DGELU_BGRAD). Otherwise (fp32: cuBLASLt's fp32 epilogue accuracy is undocumented; "gelu"/"relu": its GELU
            is the tanh form only; H % 8 != 0; a single row; GPTKERNELS_MLP_CUBLASLT=0) the cpu-style path with the
            CUDA epilogue kernels, and explain() says why. SwiGLU on cuda: the cpu-style path (no SiLU-mul epilogue).

What backward saves (activation memory; the weights are parameters and are saved by reference):
    bias_gelu: x and b, never y; the backward recomputes x + b and gelu'.
    fused_mlp: x and pre = fc(x) + b_fc (the pre-activation, M*H elements), never a = act(pre). The backward kernel
               reads pre and da = dy @ W_proj once and writes dpre = da * act'(pre) (fused with the fp32 db_fc
               reduction) and a recomputed (needed for dW_proj) in the same pass (triton: in the epilogue of the
               dy @ W_proj GEMM itself; cuBLASLt: DGELU_BGRAD, then our GELU kernel recomputes a). Eager saves x, pre
               and a: M*(C + 2H) elements against our M*(C + H) (tests/test_mlp.py measures it). b_fc is added by the fc
               GEMM (addmm), so pre is rounded once, as in eager; the activation kernel runs without a bias there.
    swiglu:    x, g and u, never p = silu(g) * u (recomputed by the fused backward kernel, which also gives dg, du).
dbias is reduced in fp32 (per-thread / per-block partial rows, then a final reduce) and cast to the bias dtype.
NaN and inf follow eager PyTorch on every backend: relu(NaN) = NaN and relu's backward is a select (threshold_backward:
dy where pre > 0 or NaN, 0 where pre <= 0, even for an inf dy); gelu(-inf) = silu(-inf) = -inf * 0 = NaN; their
gradients at +-inf are NaN. Zero-size inputs (no rows, C == 0, H == 0) give eager's shapes and zero sums.

Backends: cuda (CUDA C++), triton, cpu (C++/OpenMP), torch (the eager references below). See gptkernels._dispatch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gptkernels import _dispatch
from gptkernels.ops import _common

_Err, _TypeErr = _dispatch.ArgumentError, _dispatch.ArgumentTypeError
_rows = _common.rows

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
_APPROXIMATE = {"tanh": "gelu_tanh", "none": "gelu"}


# ----------------------------------------------------------------------------------------------- reference
def _up(t):
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def _act_ref(v, activation):
    if activation == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    if activation == "gelu":
        return F.gelu(v)
    return F.relu(v)


def bias_gelu_ref(x, bias, approximate="tanh"):
    """Eager gelu(x + bias); 16-bit inputs are computed in fp32 (no rounding of x + bias), fp32/fp64 in their own."""
    v = _up(x) + _up(bias).to(_up(x).dtype) if bias is not None else _up(x)
    return _act_ref(v, _APPROXIMATE[approximate]).to(x.dtype)


def fused_mlp_ref(x, w_fc, b_fc, w_proj, b_proj, activation="gelu_tanh", residual=None):
    """Eager proj(act(fc(x))) (+ residual); 16-bit inputs in fp32, output in x.dtype. Under autocast the linears
    follow autocast, as eager PyTorch does (this is also the eager baseline of GPT(backend="torch"))."""
    xf = _up(x)
    a = _act_ref(F.linear(xf, _up(w_fc), _up(b_fc)), activation)
    y = F.linear(a, _up(w_proj), _up(b_proj))
    if residual is not None:
        y = y + _up(residual)
    return y.to(x.dtype)


def swiglu_ref(x, w_gate, w_up, w_down):
    """Eager down(silu(gate(x)) * up(x)); 16-bit inputs in fp32, output in x.dtype (linears follow autocast)."""
    xf = _up(x)
    return F.linear(F.silu(F.linear(xf, _up(w_gate))) * F.linear(xf, _up(w_up)), _up(w_down)).to(x.dtype)


# ------------------------------------------------------------------------------------------- registration
def _bias_gelu_fwd_fake(x, bias, activation):
    return torch.empty_like(x)


def _bias_gelu_bwd_fake(dy, x, bias, activation, want_dbias, want_y):
    db = x.new_empty(x.shape[-1] if want_dbias else 0, dtype=torch.float32)
    return torch.empty_like(x), db, torch.empty_like(x) if want_y else x.new_empty(0)


def _silu_mul_fwd_fake(g, u):
    return torch.empty_like(g)


def _silu_mul_bwd_fake(dp, g, u, want_p):
    return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g) if want_p else g.new_empty(0)


@_common.python_op("bias_gelu_fwd_triton", _bias_gelu_fwd_fake)
def _bias_gelu_fwd_triton(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    from gptkernels.triton import mlp as tl_mlp

    y = tl_mlp.bias_gelu_fwd(_rows(x), bias.float().contiguous() if bias is not None else None, activation)
    return y.view(x.shape)


@_common.python_op("bias_gelu_bwd_triton", _bias_gelu_bwd_fake)
def _bias_gelu_bwd_triton(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str, want_dbias: bool, want_y: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import mlp as tl_mlp

    # reshape keeps an expanded dy expanded (row stride 0) where it can; the launcher handles any row stride.
    dx, db, y = tl_mlp.bias_gelu_bwd(_rows(dy), _rows(x),
                                     bias.float().contiguous() if bias is not None else None, activation,
                                     want_dbias, want_y)
    return dx.view(x.shape), db, y.view(x.shape) if want_y else y


@_common.python_op("silu_mul_fwd_triton", _silu_mul_fwd_fake)
def _silu_mul_fwd_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    from gptkernels.triton import mlp as tl_mlp

    return tl_mlp.silu_mul_fwd(g, u)


@_common.python_op("silu_mul_bwd_triton", _silu_mul_bwd_fake)
def _silu_mul_bwd_triton(
    dp: torch.Tensor, g: torch.Tensor, u: torch.Tensor, want_p: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import mlp as tl_mlp

    return tl_mlp.silu_mul_bwd(dp, g, u, want_p)


_common.register_cpp_fakes({"bias_gelu_fwd": _bias_gelu_fwd_fake, "bias_gelu_bwd": _bias_gelu_bwd_fake,
                            "silu_mul_fwd": _silu_mul_fwd_fake, "silu_mul_bwd": _silu_mul_bwd_fake})


# The Triton GEMMs with fused epilogues (gptkernels/triton/matmul.py). b operands are (K, N) views of nn.Linear weights
# (w.t()), any strides; activation "none" = no activation.
def _matmul_act_fake(a, b, bias, residual, activation, save_pre):
    m, n = a.shape[0], b.shape[1]
    return a.new_empty(m, n), a.new_empty((m, n) if save_pre else 0)


def _matmul_dact_fake(a, b, pre, activation, want_act, want_dbias):
    m, n = a.shape[0], b.shape[1]
    return a.new_empty(m, n), a.new_empty((m, n) if want_act else 0), a.new_empty(n if want_dbias else 0,
                                                                                   dtype=torch.float32)


def _matmul_swiglu_fake(a, b_gate, b_up):
    m, n = a.shape[0], b_gate.shape[1]
    return a.new_empty(m, n), a.new_empty(m, n), a.new_empty(m, n)


def _matmul_dswiglu_fake(a, b, g, u, want_p):
    m, n = a.shape[0], b.shape[1]
    return a.new_empty(m, n), a.new_empty(m, n), a.new_empty((m, n) if want_p else 0)


@_common.python_op("matmul_act_fwd_triton", _matmul_act_fake)
def _matmul_act_fwd_triton(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                           residual: torch.Tensor | None, activation: str,
                           save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from gptkernels.triton import matmul as tl_mm

    out = tl_mm.matmul(a, b, bias, None if activation == "none" else activation, residual, save_pre)
    return out if save_pre else (out, a.new_empty(0))


@_common.python_op("matmul_act_bwd_triton", _matmul_dact_fake)
def _matmul_act_bwd_triton(a: torch.Tensor, b: torch.Tensor, pre: torch.Tensor, activation: str, want_act: bool,
                           want_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import matmul as tl_mm

    return tl_mm.matmul_dact(a, b, pre, activation, want_act, want_dbias)


@_common.python_op("matmul_swiglu_fwd_triton", _matmul_swiglu_fake)
def _matmul_swiglu_fwd_triton(a: torch.Tensor, b_gate: torch.Tensor,
                              b_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import matmul as tl_mm

    return tl_mm.matmul_swiglu(a, b_gate, b_up)


@_common.python_op("matmul_swiglu_bwd_triton", _matmul_dswiglu_fake)
def _matmul_swiglu_bwd_triton(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                              want_p: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gptkernels.triton import matmul as tl_mm

    return tl_mm.matmul_dswiglu(a, b, g, u, want_p)




# The cuBLASLt epilogue GEMMs (csrc/ops/mlp.cpp), CUDA only. w in nn.Linear layout.
def _mlp_fc_gelu_lt_fake(x, w, bias):
    m, h = x.shape[0], w.shape[0]
    return x.new_empty(m, h), x.new_empty(m, h)


def _mlp_linear_lt_fake(x, w, bias, residual):
    return x.new_empty(x.shape[0], w.shape[0])


def _mlp_dgelu_lt_fake(dy, w, pre, want_dbias):
    h = w.shape[1]
    return dy.new_empty(dy.shape[0], h), dy.new_empty(h if want_dbias else 0)


# An extension built before the cuBLASLt ops existed lacks them; the cuda path then says so (see _lt_reason).
_HAS_LT = _common.register_cpp_fakes({"mlp_fc_gelu_lt": _mlp_fc_gelu_lt_fake, "mlp_linear_lt": _mlp_linear_lt_fake,
                                      "mlp_dgelu_lt": _mlp_dgelu_lt_fake})


def _op(name, backend):
    return _common.kernel_op(name, backend)


# ----------------------------------------------------------------------------------------------- autograd
def _reduce_dbias(db, bias):
    return db.to(bias.dtype) if bias is not None else None


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, activation, backend):
        ctx.save_for_backward(x, bias)
        ctx.activation, ctx.backend = activation, backend
        return _op("bias_gelu_fwd", backend)(x, bias, activation)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db, _ = _op("bias_gelu_bwd", ctx.backend)(dy, x, bias, ctx.activation, bias is not None, False)
        return dx, _reduce_dbias(db, bias), None, None


# Read once at import: the choice must be a constant while torch.compile traces.
_LT_ENABLED = os.environ.get("GPTKERNELS_MLP_CUBLASLT", "1").strip() != "0"


def _lt_reason(activation, hid, rows, dtype=None):
    """None when the cuda backend's fused_mlp can run on cuBLASLt epilogues, else why not (shape/dtype facts only,
    so it traces under torch.compile; operand alignment is fixed in C++ by copying, not by falling back)."""
    if not _LT_ENABLED:
        return "disabled by GPTKERNELS_MLP_CUBLASLT=0"
    if dtype == torch.float32:
        return "float32: cuBLASLt's fp32 GELU epilogue accuracy is undocumented and our fp32 bound is 1e-5"
    if activation != "gelu_tanh":
        return f"cuBLASLt's GELU epilogue is the tanh form; activation {activation!r} needs our epilogue kernel"
    if rows <= 1:
        # PyTorch's own cuBLASLt path notes that the heuristic finds no algorithm for a one-row operand; a decode
        # step would pay for descriptors and a failed query before falling back anyway.
        return "a single token (M = 1, decode): ATen's GEMV path"
    if hid % 8:
        return f"H = {hid} is not a multiple of 8 (cuBLASLt's GELU aux matrix needs ld % 8 == 0)"
    if not _HAS_LT:
        return "the built extension lacks the cuBLASLt ops (rebuild with `pip install -e .`)"
    return None


def _gemm_path(op, backend, activation=None, hid=0, rows=0, dtype=None):
    """'triton', 'cublaslt' or 'aten' for this call, and the note for explain()'s reason."""
    if backend == "triton":
        return "triton", "gemm path: Triton matmul with fused epilogues"
    if backend == "cuda" and op == "fused_mlp":
        why = _lt_reason(activation, hid, rows, dtype)
        if why is None:
            return "cublaslt", "gemm path: cuBLASLt epilogues (GELU_AUX_BIAS, BIAS, DGELU_BGRAD)"
        return "aten", f"gemm path: ATen GEMM + gptkernels epilogue kernel ({why})"
    return "aten", "gemm path: ATen GEMM + gptkernels epilogue kernel"


def _select_with_path(fn, x, backend, key, activation=None, hid=0, rows=0):
    """(backend, gemm path) of a fused_mlp / swiglu call; the cached explain() record carries the path note."""
    rec = _dispatch.choice(fn, x.device, backend, key) if not _common.is_compiling() else None
    if rec is not None and "gemm path" in rec[1]:
        be = rec[0]
        return be, _gemm_path(fn, be, activation, hid, rows, x.dtype)[0]
    be = _dispatch.select(fn, x.device, backend, lambda b: _dispatch.dtype_support(x.dtype, b))
    path, note = _gemm_path(fn, be, activation, hid, rows, x.dtype)
    _dispatch.note(fn, note)
    if not _common.is_compiling():
        _dispatch.remember(fn, x.device, backend, key)
    return be, path


class FusedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj, residual, activation, backend, path):
        x2 = _rows(x)  # (M, C)
        r2 = _rows(residual) if residual is not None else None
        if path == "triton":
            # One kernel each: fc writes pre (saved) and a = act(pre); proj adds b_proj and the residual.
            mm = _op("matmul_act_fwd", "triton")
            a, pre = mm(x2, w_fc.t(), b_fc, None, activation, True)
            y, _ = mm(a, w_proj.t(), b_proj, r2, "none", False)
        elif path == "cublaslt":
            a, pre = torch.ops.gptkernels.mlp_fc_gelu_lt(x2, w_fc, b_fc)  # GELU_AUX_BIAS: a and pre, one GEMM
            y = torch.ops.gptkernels.mlp_linear_lt(a, w_proj, b_proj, r2)  # BIAS, beta = 1 on the residual
        else:
            fwd = _op("bias_gelu_fwd", backend)
            # The fc bias rides in the GEMM (addmm): pre = fc(x) + b_fc is rounded once, as eager nn.Linear rounds
            # it. Adding b_fc in the activation kernel instead would save an (M, H) pass on the CPU but round fc(x)
            # before the bias: in bf16 that moved pre-activations near ReLU's kink by up to 2^-9 * |fc(x)| and
            # failed the 2x-eager bound on dx (0.23 vs 0.011, tests/test_mlp.py at (17, 771, 1000)).
            pre = torch.addmm(b_fc, x2, w_fc.t()) if b_fc is not None else torch.mm(x2, w_fc.t())  # (M, H)
            a = fwd(pre, None, activation)  # (M, H)
            if r2 is not None:
                y = torch.addmm(r2, a, w_proj.t())  # (M, C), residual added by the GEMM
                if b_proj is not None:
                    y.add_(b_proj)
            elif b_proj is not None:
                y = torch.addmm(b_proj, a, w_proj.t())
            else:
                y = torch.mm(a, w_proj.t())
        ctx.save_for_backward(x2, pre, w_fc, w_proj)
        ctx.x_shape, ctx.has_bproj, ctx.has_res = x.shape, b_proj is not None, residual is not None
        ctx.bfc_dtype = b_fc.dtype if b_fc is not None else None
        ctx.activation, ctx.backend, ctx.path = activation, backend, path
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, pre, w_fc, w_proj = ctx.saved_tensors
        dy2 = _rows(dy)  # (M, C); may be expanded (row stride 0): the GEMMs take strides
        has_bfc = ctx.bfc_dtype is not None
        if ctx.path == "triton":
            # dh = (dy @ W_proj) * act'(pre), a = act(pre) and db_fc's partial sums from the GEMM's epilogue.
            dh, a, db_fc = _op("matmul_act_bwd", "triton")(dy2, w_proj, pre, ctx.activation, True, has_bfc)
        elif ctx.path == "cublaslt":
            dh, db_fc = torch.ops.gptkernels.mlp_dgelu_lt(dy2, w_proj, pre, has_bfc)  # DGELU_BGRAD
            # For dW_proj: recomputed, not saved (one (M, H) pass).
            a = _op("bias_gelu_fwd", ctx.backend)(pre, None, ctx.activation)
        else:
            bwd = _op("bias_gelu_bwd", ctx.backend)
            da = torch.mm(dy2, w_proj)  # (M, H)
            # One pass over (M, H): dh = da * act'(pre), db_fc = sum_rows(dh) in fp32, and a = act(pre) for dW_proj.
            dh, db_fc, a = bwd(da, pre, None, ctx.activation, has_bfc, True)
        dw_proj = torch.mm(dy2.t(), a)  # (C, H)
        db_proj = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if ctx.has_bproj else None
        dx = torch.mm(dh, w_fc).view(ctx.x_shape)  # (..., C)
        dw_fc = torch.mm(dh.t(), x2)  # (H, C)
        dres = dy if ctx.has_res else None
        return dx, dw_fc, db_fc.to(ctx.bfc_dtype) if has_bfc else None, dw_proj, db_proj, dres, None, None, None


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, backend, path):
        x2 = _rows(x)  # (M, C)
        if path == "triton":
            p, g, u = _op("matmul_swiglu_fwd", "triton")(x2, w_gate.t(), w_up.t())  # one read of x
        else:
            fwd = _op("silu_mul_fwd", backend)
            g = torch.mm(x2, w_gate.t())  # (M, H)
            u = torch.mm(x2, w_up.t())  # (M, H)
            p = fwd(g, u)  # (M, H)
        ctx.save_for_backward(x2, g, u, w_gate, w_up, w_down)
        ctx.x_shape, ctx.backend, ctx.path = x.shape, backend, path
        return torch.mm(p, w_down.t()).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        dy2 = _rows(dy)  # (M, C)
        if ctx.path == "triton":
            dg, du, p = _op("matmul_swiglu_bwd", "triton")(dy2, w_down, g, u, True)
        else:
            bwd = _op("silu_mul_bwd", ctx.backend)
            dp = torch.mm(dy2, w_down)  # (M, H)
            dg, du, p = bwd(dp, g, u, True)  # p recomputed in the same pass, for dW_down
        dw_down = torch.mm(dy2.t(), p)  # (C, H)
        dx = torch.addmm(torch.mm(dg, w_gate), du, w_up).view(ctx.x_shape)
        return dx, torch.mm(dg.t(), x2), torch.mm(du.t(), x2), dw_down, None, None


# ------------------------------------------------------------------------------------------------- public
def _check_x(fn, x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise _TypeErr(f"{fn}: x must be a floating-point tensor, got {type(x).__name__}"
                        f"{' of dtype ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    if x.dim() < 1:
        raise _Err(f"{fn}: x must have at least 1 dim (..., N), got a 0-d tensor")


def _check_param(fn, name, t, shape, x, same_dtype=True):
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise _TypeErr(f"{fn}: {name} must be a floating-point tensor")
    if tuple(t.shape) != tuple(shape):
        raise _Err(f"{fn}: {name} must have shape {tuple(shape)} (x's last dim is {x.shape[-1]}), "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise _Err(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if same_dtype and t.dtype != x.dtype:
        raise _TypeErr(f"{fn}: {name} dtype {t.dtype} must equal x dtype {x.dtype} (it feeds a GEMM with x)")


def _check_weight2d(fn, name, w, x):
    if not isinstance(w, torch.Tensor):
        raise _TypeErr(f"{fn}: {name} must be a tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise _Err(f"{fn}: {name} must be 2-D (nn.Linear layout (out, in)), got shape {tuple(w.shape)}")


def bias_gelu(x, bias, approximate="tanh", backend=None):
    """gelu(x + bias) in one pass.

    Args:
        x: (..., N) float32, float16 or bfloat16 (any float dtype on the torch backend).
        bias: (N,) or None; same dtype as x or float32.
        approximate: "tanh" (GPT-2's gelu_new, F.gelu(approximate="tanh")) or "none" (exact erf GELU).
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        y (..., N) in x.dtype. Backward saves x and bias only (see the module docstring).
    """
    if not _common.is_compiling() and isinstance(x, torch.Tensor) and type(approximate) is str:
        # Eager fast path: the cached backend decision, then the C++ entry (checks, autograd, kernel) in one call.
        rec = _dispatch.choice("bias_gelu", x.device, backend, x.dtype)
        act = _APPROXIMATE.get(approximate)
        if rec is not None and rec[0] in _common.EAGER_BACKENDS and act is not None:
            out = _common.eager_call(_common.C.bias_gelu, x, bias, act)
            if out is not None:
                return out
    _check_x("bias_gelu", x)
    if approximate not in _APPROXIMATE:
        raise _Err(f"bias_gelu: approximate must be 'tanh' or 'none', got {approximate!r}")
    _check_param("bias_gelu", "bias", bias, (x.shape[-1],), x, same_dtype=False)
    be = _dispatch.select("bias_gelu", x.device, backend, lambda b: _dispatch.dtype_support(x.dtype, b),
                          key=x.dtype)
    if be == "torch":
        return bias_gelu_ref(x, bias, approximate)
    return _common.apply(BiasGeluFunction, x, bias, _APPROXIMATE[approximate], be)


def fused_mlp(x, w_fc, b_fc, w_proj, b_proj, activation="gelu_tanh", residual=None, backend=None):
    """GPT-2 MLP: proj(act(fc(x))) (+ residual), with the bias + activation fused and a lean backward.

    Args:
        x: (..., C) float32, float16 or bfloat16 (any float dtype on the torch backend).
        w_fc: (H, C) fc weight (nn.Linear layout), dtype of x.  b_fc: (H,) or None.
        w_proj: (C, H) proj weight, dtype of x.  b_proj: (C,) or None.
        activation: "gelu_tanh" (GPT-2), "gelu" (erf) or "relu".
        residual: (..., C) like x, or None: added to the output by the proj GEMM (a GPT block's x + mlp(ln(x))).
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        y (..., C) in x.dtype. Backward saves x and fc(x) + b_fc (M*H elements), not the activation.
    """
    fn = "fused_mlp"
    if (not _common.is_compiling() and isinstance(x, torch.Tensor) and isinstance(w_fc, torch.Tensor) and x.dim()
            and w_fc.dim() and type(activation) is str):
        # Eager fast path (no grad, ATen-GEMM path: inference and decode): cached decision, then the C++ entry.
        rows, hid = x.numel() // max(x.shape[-1], 1), w_fc.shape[0]
        rec = _dispatch.choice(fn, x.device, backend, (x.dtype, activation, rows <= 1, hid % 8 == 0))
        if (rec is not None and rec[0] in _common.EAGER_BACKENDS
                and (rec[0] == "cpu" or _gemm_path(fn, rec[0], activation, hid, rows, x.dtype)[0] == "aten")):
            out = _common.eager_call(_common.C.fused_mlp, x, w_fc, b_fc, w_proj, b_proj, activation, residual)
            if out is not None:
                return out
    _check_x(fn, x)
    if activation not in ACTIVATIONS:
        raise _Err(f"{fn}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    _check_weight2d(fn, "w_fc", w_fc, x)
    _check_weight2d(fn, "w_proj", w_proj, x)
    c, hid = x.shape[-1], w_fc.shape[0]
    _check_param(fn, "w_fc", w_fc, (hid, c), x)
    _check_param(fn, "b_fc", b_fc, (hid,), x)
    _check_param(fn, "w_proj", w_proj, (c, hid), x)
    _check_param(fn, "b_proj", b_proj, (c,), x)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise _TypeErr(f"{fn}: residual must be a tensor")
        if residual.shape != x.shape:
            raise _Err(f"{fn}: residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        _check_param(fn, "residual", residual, x.shape, x)
    rows = x.numel() // max(c, 1)
    be, path = _select_with_path(fn, x, backend, (x.dtype, activation, rows <= 1, hid % 8 == 0), activation, hid, rows)
    if be == "torch":
        return fused_mlp_ref(x, w_fc, b_fc, w_proj, b_proj, activation, residual)
    return _common.apply(FusedMLPFunction, x, w_fc, b_fc, w_proj, b_proj, residual, activation, be, path)


def swiglu(x, w_gate, w_up, w_down, backend=None):
    """SwiGLU MLP (LLaMA-style, no biases): down(silu(gate(x)) * up(x)).

    Args:
        x: (..., C) float32, float16 or bfloat16 (any float dtype on the torch backend).
        w_gate: (H, C), w_up: (H, C), w_down: (C, H): nn.Linear layout, dtype of x.
        backend: "cuda", "triton", "cpu", "torch" or None (then GPTKERNELS_BACKEND, then automatic).

    Returns:
        y (..., C) in x.dtype. Backward saves x, gate(x) and up(x), not their product.
    """
    fn = "swiglu"
    if not _common.is_compiling() and isinstance(x, torch.Tensor):
        # Eager fast path (no grad: inference and decode): the cached backend decision, then the C++ entry.
        rec = _dispatch.choice(fn, x.device, backend, x.dtype)
        if rec is not None and rec[0] in _common.EAGER_BACKENDS:
            out = _common.eager_call(_common.C.swiglu, x, w_gate, w_up, w_down)
            if out is not None:
                return out
    _check_x(fn, x)
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        _check_weight2d(fn, name, w, x)
    c, hid = x.shape[-1], w_gate.shape[0]
    _check_param(fn, "w_gate", w_gate, (hid, c), x)
    _check_param(fn, "w_up", w_up, (hid, c), x)
    _check_param(fn, "w_down", w_down, (c, hid), x)
    be, path = _select_with_path(fn, x, backend, x.dtype)
    if be == "torch":
        return swiglu_ref(x, w_gate, w_up, w_down)
    return _common.apply(SwiGLUFunction, x, w_gate, w_up, w_down, be, path)
