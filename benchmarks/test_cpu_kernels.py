"""CPU microbenchmarks: eager PyTorch vs gptkernels-cpu on a few small shapes, fwd and bwd, fp32.

One pytest-benchmark group per (op, shape, mode), so the two providers sit side by side in the report. Inputs
rotate over enough copies to overflow the last-level cache, as in the main harness.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from gptkernels.bench import OPS
from gptkernels.bench.harness import (
    BUILTIN,
    Problem,
    check,
    grad_ctx,
    make_sets,
    make_step,
    reference,
    rotation,
    run_once,
)
from gptkernels.bench.registry import unavailable_reason

CASES = [
    ("layernorm", (256, 768)),
    ("layernorm", (64, 4096)),
    ("layernorm_residual", (256, 768)),
    ("rmsnorm", (256, 768)),
    ("rmsnorm", (64, 4096)),
    ("softmax", (256, 1024)),
]


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("provider", ["eager", "gptkernels-cpu"])
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{op}-{'x'.join(map(str, s))}" for op, s in CASES])
def test_cpu(benchmark, op, shape, provider, mode):
    if unavailable_reason(op):
        pytest.skip(f"{op}: {unavailable_reason(op)}")
    spec = OPS[op]
    p = Problem(spec, "custom", shape, torch.float32, torch.device("cpu"), mode)
    prov = BUILTIN[provider]
    why = prov.usable(p)
    if why:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(0)
    work = spec.work(mode, shape, p.elsize)
    sets = make_sets(p, rotation(p, work), gen)
    ref = reference(p, sets, gen)
    fn = prov.make(p)
    ok, err, bound, msg = check(run_once(fn, sets[0], mode), ref, run_once(spec.eager, sets[0], mode), p.dtype)
    assert ok, msg
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {mode} fp32"
    benchmark.extra_info.update(bytes=work, formula=spec.formula_for(mode))
    with grad_ctx(mode):
        benchmark(make_step(fn, sets, mode))
