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


GPU_SKIP_REASON = "gpu test: no CUDA device on this machine"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _is_gpu_skip(report) -> bool:
    longrepr = getattr(report, "longrepr", None)
    return isinstance(longrepr, tuple) and len(longrepr) == 3 and longrepr[2] == f"Skipped: {GPU_SKIP_REASON}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """One line for the gpu tests skipped on a machine without CUDA, instead of one -ra line per test location; every
    other skip keeps its line and reason. The skips stay in the final count."""
    skipped = terminalreporter.stats.get("skipped", [])
    gpu = [r for r in skipped if _is_gpu_skip(r)]
    if gpu:
        terminalreporter.stats["skipped"] = [r for r in skipped if not _is_gpu_skip(r)]
    try:
        return (yield)  # the terminal reporter's own summary, -ra's short summary included, runs in here
    finally:
        if gpu:
            terminalreporter.stats["skipped"] = skipped
            terminalreporter.write_line(f"{len(gpu)} gpu tests skipped: no CUDA device (they run where torch sees one)")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed with GPTKERNELS_TEST_SEED."""
    seed = int(os.environ.get("GPTKERNELS_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"GPTKERNELS_TEST_SEED={seed}")
    return seed


def assert_close(out, ref, eager=None, name="out", fp32_bound=1e-5, atol=0.0, dtype=None):
    """The HOUSE_STYLE bound against an fp64 reference: gptkernels._tolerance.judge (its docstring has the rule).

    fp32 (and fp64): ||out - ref|| / ||ref|| <= fp32_bound (1e-5; 3e-4 where a dot runs in tf32).
    fp16/bf16: the max criterion (2 x eager's max error, floored at 2 ulps) and the norm criterion (2 x eager's
    relative-norm error + 2 eps/sqrt(n_eff), which catches systematic errors), eager being plain PyTorch in the
    same dtype.
    NaN never passes (a NaN in the reference is a broken test, also a failure).
    atol: an absolute escape for references that are exactly zero in exact math; each use says why.
    dtype: the precision the computation ran in, when it differs from out.dtype (an fp32 weight gradient computed
        from bf16 activations follows the bf16 rule).
    """
    # Imported here, not at the top: importing gptkernels may import triton, which must not happen before
    # TRITON_INTERPRET is set above.
    from gptkernels._tolerance import judge

    verdict = judge(out, ref, eager, dtype=dtype, fp32_bound=fp32_bound, atol=atol)
    assert verdict.ok, f"{name}: {verdict.message}"
