"""The error rule itself (gptkernels._tolerance.judge), on synthetic results with known faults: what it must catch
(a 0.5% bf16 bias, one element off by a few ulps, NaN) and what it must let through (rounding like eager's).

Each case draws many random tensors at once (fresh seed per run), so a flaky bound shows up here first.
"""

import math

import pytest
import torch

from gptkernels._tolerance import judge, ulp_at

SHAPES = [(1,), (7,), (3, 17), (64,), (97, 65), (4, 257, 33), (1, 65537)]
LOW = [torch.bfloat16, torch.float16]
DRAWS = 20


def _ulps(x, dtype):
    """Elementwise spacing of dtype's values at x."""
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))))


def _draws(shape):
    n = math.prod(shape)
    return DRAWS if n < 10_000 else 3


def _ref(shape):
    return torch.randn(shape, dtype=torch.float64) * 3 + 0.5


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_eager_level_rounding_passes(dtype, shape):
    # A kernel that rounds once more than eager (an intermediate to 16 bits, then the output) is as good as eager.
    for _ in range(_draws(shape)):
        ref = _ref(shape)
        eager = ref.to(dtype)
        two = (ref + (torch.rand(shape, dtype=torch.float64) - 0.5) * _ulps(ref, dtype)).to(dtype)
        for out in (eager, two, (ref.float() * (1 + 1e-7)).to(dtype)):
            v = judge(out, ref, eager)
            assert v.ok, v.message


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if math.prod(s) >= 256], ids=str)
@pytest.mark.parametrize("sign", [1, -1])
def test_small_systematic_bias_is_caught(dtype, shape, sign):
    # 0.5% in bf16 (0.64 eps; the same 0.64 eps = 0.06% in fp16): within two ulps everywhere, so the max criterion
    # alone lets it through. The norm criterion must not. Below ~256 elements rounding noise can hide it.
    bias = 0.64 * torch.finfo(dtype).eps
    for _ in range(_draws(shape)):
        ref = _ref(shape)
        eager = ref.to(dtype)
        out = (ref * (1 + sign * bias)).to(dtype)
        v = judge(out, ref, eager)
        assert not v.ok, f"a {bias:.2%} bias passed: rel {v.rel:.3e} <= {v.rel_bound:.3e}"
        assert v.max_abs <= v.max_bound, "expected the max criterion to pass (the norm criterion is the net)"
        assert v.what == "norm" and "systematic" in v.message


@pytest.mark.parametrize("shape", [s for s in SHAPES if math.prod(s) >= 256], ids=str)
def test_half_percent_bias_in_bf16_is_caught_even_against_a_noisier_eager(shape):
    # eager with an extra rounding of its own (a 16-bit intermediate, as F.gelu(x + b) in bf16): rel ~0.30 eps,
    # so the bound is ~0.6 eps; 0.5% (0.64 eps) with the output's rounding still fails.
    dtype = torch.bfloat16
    for _ in range(_draws(shape)):
        ref = _ref(shape)
        eager = (ref + (torch.rand(shape, dtype=torch.float64) - 0.5) * _ulps(ref, dtype)).to(dtype)
        v = judge((ref * 1.005).to(dtype), ref, eager)
        assert not v.ok, f"rel {v.rel:.3e} <= {v.rel_bound:.3e}"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_one_element_off_is_caught_by_the_max_criterion(dtype):
    ref = _ref((33, 65))
    eager = ref.to(dtype)
    out = eager.clone()
    i = ref.abs().argmax()
    out.view(-1)[i] += 3 * ulp_at(ref.abs().max().item(), dtype) * torch.sign(ref.view(-1)[i]).to(dtype)
    v = judge(out, ref, eager)
    assert not v.ok and v.what == "max" and "max err" in v.message


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_nan_never_passes(dtype):
    ref = _ref((17, 9))
    eager = ref.to(dtype)
    out = eager.clone()
    out[3, 4] = math.nan
    assert not judge(out, ref, eager, atol=math.inf).ok, "NaN in the output"
    bad_ref = ref.clone()
    bad_ref[0, 0] = math.nan
    assert not judge(eager, bad_ref, eager, atol=math.inf).ok, "NaN in the reference"
    if dtype != torch.float32:
        bad_eager = eager.clone()
        bad_eager[1, 1] = math.nan
        assert not judge(eager, ref, bad_eager).ok, "NaN in eager: no yardstick"


def test_fp32_relative_bound_and_tf32():
    ref = _ref((97, 65))
    assert judge(ref.float(), ref).ok
    off = (ref * (1 + 2e-5)).float()
    assert not judge(off, ref).ok
    assert judge(off, ref, fp32_bound=3e-4).ok  # a tf32 dot
    assert not judge((ref * (1 + 5e-4)).float(), ref, fp32_bound=3e-4).ok


def test_dtype_override_and_missing_eager():
    # An fp32 weight gradient computed from bf16 activations follows the bf16 rule: it needs eager.
    ref = _ref((64, 64))
    out = ref.to(torch.bfloat16).float()
    assert not judge(out, ref).ok, "fp32 rule: bf16-level error fails 1e-5"
    assert not judge(out, ref, dtype=torch.bfloat16).ok, "16-bit rule without eager"
    assert judge(out, ref, ref.to(torch.bfloat16), dtype=torch.bfloat16).ok


def test_atol_escape_and_shapes():
    ref = torch.zeros(5, 3, dtype=torch.float64)
    noise = torch.full((5, 3), 1e-6)
    assert not judge(noise, ref).ok
    assert judge(noise, ref, atol=1e-5).ok
    assert not judge(torch.zeros(3, 5), ref).ok, "shape mismatch"
    empty = torch.zeros(0, 4, dtype=torch.float64)
    assert judge(empty.to(torch.bfloat16), empty, empty.to(torch.bfloat16)).ok


def test_the_three_callers_share_the_rule():
    # tests (conftest.assert_close), the benchmark gate and gptkernels.verify give the same verdict.
    from conftest import assert_close

    from gptkernels.bench.harness import _tensor_check

    ref = _ref((4, 257, 33))
    eager = ref.to(torch.bfloat16)
    biased = (ref * 1.005).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="systematic"):
        assert_close(biased, ref, eager)
    assert_close(eager, ref, eager)
    err, bound, what = _tensor_check(biased, ref, eager, torch.bfloat16)
    assert err > bound and "systematic" in what
    err, bound, _ = _tensor_check(eager, ref, eager, torch.bfloat16)
    assert err <= bound

    from gptkernels.verify import _row

    assert not _row("x", biased, eager, ref, torch.bfloat16).ok
    assert _row("x", eager, eager, ref, torch.bfloat16).ok
