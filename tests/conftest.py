"""Shared test machinery: which backends run where, fresh random inputs, and the HOUSE_STYLE error bounds."""

import os
import random

import pytest
import torch

# Triton runs on CPU tensors only under its interpreter, which must be switched on before triton is imported.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_params():
    """(backend name passed to the API, device) for every backend; the gpu-marked ones skip without CUDA."""
    interp_skip = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (set here when no GPU)")
    return [
        pytest.param(("cpu", "cpu"), id="cpu"),
        pytest.param(("torch", "cpu"), id="torch"),
        pytest.param(("triton", "cpu"), id="triton-interp", marks=interp_skip),
        pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
        pytest.param(("triton", "cuda"), id="triton", marks=pytest.mark.gpu),
    ]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed with GPTKERNELS_TEST_SEED."""
    seed = int(os.environ.get("GPTKERNELS_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"GPTKERNELS_TEST_SEED={seed}")
    return seed


def rel_err(out, ref):
    """||out - ref|| / ||ref||, with ||ref|| floored at 1e-3 * sqrt(numel): a reference that is zero in exact math
    (e.g. dx of a 1-column LayerNorm) comes out as rounding noise, and noise is no scale to be relative to."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = max(ref.norm().item(), 1e-3 * max(ref.numel(), 1) ** 0.5)
    return (out - ref).norm().item() / denom


def max_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return (out - ref).abs().max().item() if out.numel() else 0.0


def assert_close(out, ref, eager=None, name="out", fp32_bound=1e-5, atol=0.0, dtype=None):
    """The HOUSE_STYLE bound against an fp64 reference.

    fp32 (and fp64): ||out - ref|| / ||ref|| <= fp32_bound (1e-5; 3e-4 where a dot runs in tf32).
    fp16/bf16: max|out - ref| <= max(2 * max|eager - ref|, 2 ulps at max|ref|) + 1e-5, eager being plain
    PyTorch in the same dtype.
    NaN never passes (a NaN in the reference is a broken test, also a failure).
    atol: an absolute escape for references that are exactly zero in exact math; each use says why.
    dtype: the precision the computation ran in, when it differs from out.dtype (an fp32 weight gradient computed
        from bf16 activations follows the bf16 rule).
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(ref).any(), f"{name}: reference has NaN (test bug)"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    dtype = dtype or out.dtype
    if dtype in LOW_PRECISION:
        assert eager is not None, f"{name}: the 16-bit rule needs the eager result"
        err, eager_err = max_err(out, ref), max_err(eager, ref)
        # Looser than the bare 2x rule in one way: never below two ulps of the dtype at the reference's largest
        # magnitude (ulp_at in gptkernels/bench/harness.py says why). Imported here, not at the top: importing
        # gptkernels may import triton, which must not happen before TRITON_INTERPRET is set above.
        from gptkernels.bench.harness import ulp_at

        ulp = ulp_at(ref.detach().abs().max().item(), dtype) if ref.numel() else 0.0
        bound = max(2 * eager_err, 2 * ulp) + 1e-5
        assert err <= max(bound, atol), (f"{name}: max err {err:.3e} > max(2 * eager err {eager_err:.3e}, "
                                         f"2 ulps {2 * ulp:.3e}) + 1e-5 ({dtype})")
    else:
        err = rel_err(out, ref)
        ok = err <= fp32_bound or max_err(out, ref) <= atol
        assert ok, f"{name}: rel err {err:.3e} > {fp32_bound:.0e} ({out.dtype})"

