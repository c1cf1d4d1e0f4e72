"""The error rule: is a result close enough to a float64 reference? One function, used by the tests
(tests/conftest.py), the benchmark's correctness gate (gptkernels/bench/harness.py) and gptkernels.verify.

    fp32 (and fp64): rel <= 1e-5 (3e-4 where a dot runs in tf32; the caller passes fp32_bound)
    fp16/bf16, both of:
        max:  max|out - ref|   <= max(2 * max|eager - ref|, 2 ulps at max|ref|) + 1e-5
        norm: rel(out, ref)    <= 2 * rel(eager, ref) + 2 eps / sqrt(n_eff)
    NaN never passes (in the reference either: that is a broken comparison).

rel(a, ref) = ||a - ref|| / ||ref||, ||ref|| floored at 1e-3 * sqrt(n) (a reference that is zero in exact math comes
out as rounding noise, no scale to be relative to). eager: plain PyTorch in the same 16-bit dtype, the yardstick of
what that dtype costs (the flash-attention rule). eps: the dtype's machine epsilon (2^-7 bf16, 2^-10 fp16).
n_eff = ||ref||_1^2 / ||ref||_2^2: how many elements carry ||ref|| (0.64 n for Gaussian data, 6 for a (3, 4500)
causal softmax whose rows see 1, 2 and 3 columns; with n = numel the floor vanished there and rounding failed).

Why two criteria. The max criterion bounds the worst element, but alone it is one absolute number: with its
two-ulp floor a bf16 result can be wrong by a systematic 0.5% everywhere (0.64 eps) and still pass, since each
element stays within two ulps at max|ref|. The norm criterion sees the whole tensor: one rounding to the dtype costs
rel = 0.21 eps on random data (measured, n >= 64; 0.18-0.21 eps down to n = 1), so eager with a single rounding sits
at ~0.21 eps, the bound at ~0.43 eps (+ the floor), and a 0.5% bias (0.67 eps with the rounding) fails from
n ~ 256 elements on (every time in 2000 random draws; half the time at n = 64). A kernel that rounds once more than
eager (0.30 eps) passes.

The floors. max: two ulps at max|ref| (ulp_at says why). norm: 2 eps / sqrt(n_eff) covers small tensors, where eager's
rel can be far below its mean by luck while the kernel's is above it: the rel of n roundings fluctuates as 1/sqrt(n).
Measured on random data (2000 draws per n, bf16 and fp16, n = 1 ... 8192): a result with two roundings against eager
with one never failed; with three, 1 in 2000 at n = 7 (with eps / sqrt(n) as the floor: 0.3% and 2%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
FP32_BOUND = 1e-5
TF32_BOUND = 3e-4


def ulp_at(magnitude: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s values at ``magnitude`` (one unit in the last place there): eps * 2^floor(log2 m).

    The max criterion's floor is two of these at the reference's largest magnitude: on a tensor of a few elements
    eager's max error can be far below one rounding by luck, and a kernel that rounds at different points than
    eager (P to 16 bits before P^T dO, gate/up before SiLU, the output itself) carries up to two roundings of its
    own. With eps * m (1-2 ulps) as the floor, one CI run on fresh seeds failed two fp16 cases at 1.15 and 1.22 ulps
    (attention dv at b1 h2 q17 k33 d64; SwiGLU p at M=1).
    """
    if not magnitude > 0 or not math.isfinite(magnitude):
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| (0 for empty tensors)."""
    out, ref = _f64(out), _f64(ref)
    return (out - ref).abs().max().item() if out.numel() else 0.0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, with ||ref|| floored at 1e-3 * sqrt(numel) (see the module docstring)."""
    out, ref = _f64(out), _f64(ref)
    denom = max(ref.norm().item(), 1e-3 * max(ref.numel(), 1) ** 0.5)
    return (out - ref).norm().item() / denom


@dataclass(frozen=True)
class Verdict:
    """The outcome for one tensor. err / bound: the criterion closest to (or furthest past) its bound; ``what``
    names it ("max", "norm" or "rel"). message: why it failed ("" when ok)."""

    ok: bool
    err: float
    bound: float
    what: str
    max_abs: float
    rel: float
    eager_max_abs: float = math.nan
    eager_rel: float = math.nan
    max_bound: float = math.nan
    rel_bound: float = math.nan
    message: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _fail(message: str) -> Verdict:
    return Verdict(False, math.nan, 0.0, "structure", math.nan, math.nan, message=message)


def judge(out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor | None = None, dtype: torch.dtype | None = None,
          fp32_bound: float = FP32_BOUND, atol: float = 0.0) -> Verdict:
    """Apply the rule to ``out`` against the float64 (or fp64-accurate) ``ref``.

    Args:
        out: the result under test, any float dtype, any device.
        ref: the reference, same shape.
        eager: the same computation in plain PyTorch in the 16-bit dtype (required for fp16/bf16).
        dtype: the precision the computation ran in when it differs from out.dtype (an fp32 weight gradient computed
            from bf16 activations follows the bf16 rule). Default out.dtype.
        fp32_bound: the fp32 relative bound (TF32_BOUND where a dot runs in tf32).
        atol: an absolute escape, max|out - ref| <= atol passes, for references that are exactly zero in exact math
            (the caller says why).
    """
    if tuple(out.shape) != tuple(ref.shape):
        return _fail(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if torch.isnan(ref).any():
        return _fail("the reference has NaN (a broken comparison)")
    if torch.isnan(out).any():
        return _fail("NaN in output")
    dtype = dtype or out.dtype
    m, rel = max_err(out, ref), rel_err(out, ref)
    escaped = m <= atol
    if dtype not in LOW_PRECISION:
        ok = rel <= fp32_bound or escaped
        msg = "" if ok else f"rel err {rel:.3e} > {fp32_bound:.0e} ({dtype})"
        return Verdict(ok, rel, fp32_bound, "rel", m, rel, rel_bound=fp32_bound, message=msg)
    if eager is None:
        return _fail(f"the {dtype} rule needs the eager result (plain PyTorch in {dtype})")
    if tuple(eager.shape) != tuple(ref.shape):
        return _fail(f"eager shape {tuple(eager.shape)} != reference {tuple(ref.shape)}")
    n = ref.numel()
    if n == 0:
        return Verdict(True, 0.0, 1e-5, "max", 0.0, 0.0, 0.0, 0.0)  # nothing to compare
    e_m, e_rel = max_err(eager, ref), rel_err(eager, ref)
    ulp = ulp_at(_f64(ref).abs().max().item(), dtype)
    max_bound = max(2 * e_m, 2 * ulp) + 1e-5
    r = _f64(ref).abs()
    n_eff = max(r.sum().item() ** 2 / max(r.square().sum().item(), 1e-300), 1.0)  # elements that carry ||ref||
    floor = 2 * torch.finfo(dtype).eps / math.sqrt(n_eff)
    rel_bound = 2 * e_rel + floor
    max_ok, rel_ok = m <= max_bound or escaped, rel <= rel_bound or escaped
    if m / max_bound >= rel / rel_bound:
        err, bound, what = m, max_bound, "max"
    else:
        err, bound, what = rel, rel_bound, "norm"
    msgs = []
    if not max_ok:
        msgs.append(f"max err {m:.3e} > max(2 * eager max err {e_m:.3e}, 2 ulps {2 * ulp:.3e}) + 1e-5 ({dtype})")
    if not rel_ok:
        msgs.append(f"rel err {rel:.3e} > 2 * eager rel err {e_rel:.3e} + 2 eps/sqrt(n_eff) {floor:.1e} ({dtype}; "
                    f"a systematic error)")
    return Verdict(max_ok and rel_ok, err, bound, what, m, rel, e_m, e_rel, max_bound, rel_bound, "; ".join(msgs))
