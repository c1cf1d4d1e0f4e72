"""One benchmark problem: fresh inputs, the fp64 reference, the correctness check, and the timed step.

Correctness (HOUSE_STYLE, checked before any timing; a provider that fails is not timed): gptkernels._tolerance.judge,
the tests' rule, on every output and gradient against the fp64 reference. fp32: ||out - ref|| / ||ref|| <= 1e-5;
fp16/bf16: max error within 2x eager's (floored at 2 ulps) and relative-norm error within 2x eager's
+ 2 eps/sqrt(n_eff), eager being the plain PyTorch baseline in the same dtype. NaN never passes. In bwd modes
the outputs and every gradient are checked, with one shared random upstream grad.

Timing: CUDA: ``triton.testing.do_bench`` (warm-up, L2 flushed before every call, CUDA events),
quantiles 0.2/0.5/0.8. CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` at the process's thread count,
p20/p50/p80 over the per-block times; the inputs rotate over enough copies to overflow the last-level cache, so a
small problem is not timed out of cache. bwd mode times only the backward: the graph of each input copy is built
once and ``torch.autograd.grad(..., retain_graph=True)`` runs with a fixed upstream grad. fwd+bwd times both.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from gptkernels._tolerance import FP32_BOUND, LOW_PRECISION, judge
from gptkernels.bench.registry import OpSpec, Provider

QUANTILES = (0.2, 0.5, 0.8)


@dataclass
class Problem:
    spec: OpSpec
    preset: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    mode: str

    @property
    def elsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def key(self) -> tuple:
        return (self.spec.name, self.shape, self.dtype, str(self.device))


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def grad_ctx(mode: str):
    """fwd mode is inference: no graph. The check and the timing run under the same context (torch.compile
    guards on grad mode)."""
    return torch.no_grad() if mode == "fwd" else nullcontext()


# --------------------------------------------------------------------------------------------- providers
_COMPILED: dict = {}


def _compiled(problem: Problem):
    """torch.compile of the eager function, one static (dynamic=False) compile per op, shape, dtype and device:
    what a user gets for a fixed training shape, and never a silently dynamic or recompile-limited one."""
    if problem.key not in _COMPILED:
        # Timing bwd alone re-runs one graph's backward (retain_graph=True), which donated buffers forbid. Their
        # saving is memory (reusing saved activations for gradients), not time.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        _COMPILED[problem.key] = torch.compile(problem.spec.eager, dynamic=False, fullgraph=True)
    return _COMPILED[problem.key]


def clear_compiled() -> None:
    """Forget compiled functions (called when the runner moves to the next op/shape/dtype): dynamo's per-function
    recompile limit would otherwise turn later shapes into silent eager fallbacks."""
    if _COMPILED:  # importing dynamo costs seconds: only when something was compiled
        _COMPILED.clear()
        torch._dynamo.reset()


def _kernel_usable(backend: str):
    def usable(problem: Problem) -> str | None:
        from gptkernels import _dispatch

        spec = problem.spec
        if spec.kernel is None or backend not in spec.backends:
            return f"{spec.name} has no {backend} kernel"
        if backend == "triton" and problem.device.type == "cpu":
            return "Triton on CPU tensors is the interpreter: for tests, never timed"
        return _dispatch.backend_reason(backend, problem.device) or _dispatch.dtype_support(problem.dtype, backend)

    return usable


def _kernel_make(backend: str):
    return lambda problem: problem.spec.kernel(backend)


BUILTIN = {"eager": Provider("eager", lambda problem: problem.spec.eager), "compile": Provider("compile", _compiled)}
for _b in ("cuda", "triton", "cpu"):
    BUILTIN[f"gptkernels-{_b}"] = Provider(f"gptkernels-{_b}", _kernel_make(_b), _kernel_usable(_b))
# Per device: the backends that run there first (the rest are listed as skipped with their reason).
KERNEL_ORDER = {"cuda": ("cuda", "triton", "cpu"), "cpu": ("cpu", "cuda", "triton")}


def providers_for(spec: OpSpec, device_type: str) -> list[Provider]:
    """The providers of ``spec`` on a device: its baselines (eager, compile), every kernel backend (the device's own
    first; the rest report why they cannot run), then the providers registered for the op."""
    from gptkernels.bench.registry import EXTRA_PROVIDERS

    order = KERNEL_ORDER.get(device_type, KERNEL_ORDER["cpu"])
    builtin = [BUILTIN[b] for b in ("eager", "compile") if b in spec.baselines]
    builtin += [BUILTIN[f"gptkernels-{b}"] for b in order]
    return builtin + list(EXTRA_PROVIDERS.get(spec.name, {}).values())


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class InputSet:
    kwargs: dict  # keyword arguments of the provider functions; in bwd modes the grad inputs require grad
    leaves: tuple[str, ...]  # names of the differentiable inputs (empty in fwd mode)
    upstream: tuple = ()  # one fixed random upstream grad per output (bwd modes)


def make_sets(problem: Problem, count: int, gen: torch.Generator) -> list[InputSet]:
    spec = problem.spec
    leaves = spec.grad_inputs if problem.mode != "fwd" else ()
    sets = []
    for _ in range(count):
        kw = spec.make_inputs(problem.shape, problem.dtype, problem.device, gen)
        for name in leaves:
            kw[name] = kw[name].detach().requires_grad_(True)
        sets.append(InputSet(kw, tuple(n for n in leaves if n in kw)))
    return sets


def reference(problem: Problem, sets: list[InputSet], gen: torch.Generator) -> dict:
    """The fp64 reference of ``sets[0]`` (outputs, and grads in bwd modes) on the problem's device. Also draws
    each set's upstream grads, shaped like the reference outputs."""
    s0 = sets[0]
    kw64 = {}
    for k, v in s0.kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().double()
            if k in s0.leaves:
                v.requires_grad_(True)
        kw64[k] = v
    outs = as_tuple(problem.spec.ref(**kw64))
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    if not s0.leaves:
        return result
    for s in sets:
        s.upstream = tuple(torch.randn(o.shape, device=o.device, generator=gen).to(problem.dtype) for o in outs)
    grads = torch.autograd.grad(outs, [kw64[n] for n in s0.leaves], [u.double() for u in s0.upstream],
                                allow_unused=True)
    result.update({f"d{n}": g for n, g in zip(s0.leaves, grads)})
    return result


def run_once(fn, s: InputSet, mode: str) -> dict:
    """Outputs (and grads of the leaves in bwd modes) of one call, by name: out0, out1, ..., d<input>."""
    with grad_ctx(mode):
        outs = as_tuple(fn(**s.kwargs))
        result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
        if s.leaves:
            if len(outs) != len(s.upstream):
                raise ValueError(f"returned {len(outs)} outputs, the reference returns {len(s.upstream)}")
            grads = torch.autograd.grad(outs, [s.kwargs[n] for n in s.leaves], s.upstream, allow_unused=True)
            result.update({f"d{n}": g for n, g in zip(s.leaves, grads)})
    return result


# --------------------------------------------------------------------------------------------- correctness
def _tensor_check(out, r, eager_out, dtype) -> tuple[float, float, str]:
    """(err, bound, what) of one tensor; err = inf / nan for structural failures."""
    if out is None:
        return math.inf, 0.0, "missing (the reference has it)"
    if tuple(out.shape) != tuple(r.shape):
        return math.inf, 0.0, f"shape {tuple(out.shape)} != reference {tuple(r.shape)}"
    if torch.isnan(out).any():
        return math.nan, 0.0, "NaN in output"
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(out), finite):
        return math.inf, 0.0, "inf where the reference is finite (or the reverse)"
    pick = (lambda t: t.double()) if bool(finite.all()) else (lambda t: t.double()[finite])
    if dtype in LOW_PRECISION and eager_out is None:
        return math.nan, 0.0, f"no eager result to bound the {dtype} error by"
    # err / bound: the criterion furthest past (or closest to) its bound, so a failure reports err > bound
    v = judge(pick(out), pick(r), pick(eager_out) if eager_out is not None else None, dtype=dtype)
    return v.err, v.bound, v.message


def check(got: dict, ref: dict, eager: dict | None, dtype: torch.dtype) -> tuple[bool, float, float, str]:
    """(ok, err, bound, message): the first tensor that fails, else the one closest to its bound."""
    worst = (True, 0.0, FP32_BOUND, "")
    worst_ratio = -1.0
    for name, r in ref.items():
        if r is None:
            continue
        err, bound, what = _tensor_check(got.get(name), r, (eager or {}).get(name), dtype)
        if not err <= bound:  # also NaN
            return False, err, bound, f"{name}: {what}"
        if err / bound > worst_ratio:
            worst_ratio, worst = err / bound, (True, err, bound, "")
    return worst


# ------------------------------------------------------------------------------------------------- timing
def make_step(fn, sets: list[InputSet], mode: str):
    """A no-argument callable doing one timed call, on the next input copy each time."""
    counter = [0]
    n = len(sets)

    def nxt():
        i = counter[0]
        counter[0] = (i + 1) % n
        return i

    if mode == "fwd":
        def step():
            fn(**sets[nxt()].kwargs)
    elif mode == "bwd":
        graphs = [(as_tuple(fn(**s.kwargs)), [s.kwargs[k] for k in s.leaves], s.upstream) for s in sets]

        def step():
            outs, leaves, up = graphs[nxt()]
            torch.autograd.grad(outs, leaves, up, retain_graph=True, allow_unused=True)
    else:
        def step():
            s = sets[nxt()]
            torch.autograd.grad(as_tuple(fn(**s.kwargs)), [s.kwargs[k] for k in s.leaves], s.upstream,
                                allow_unused=True)
    return step


@dataclass
class Timing:
    p20: float  # ms
    p50: float
    p80: float
    samples: int | None
    method: str


def time_cpu(step, min_run_time: float, min_samples: int = 10, max_time: float = 5.0) -> Timing:
    """``blocked_autorange`` for ``min_run_time`` seconds, topped up to ``min_samples`` blocks of ~2 ms (or one call)
    with ``Timer.timeit``, within ``max_time``. The top-up matters on a busy machine, where blocked_autorange's
    block-size estimate can balloon to a single block and p20 = p50 = p80 would say nothing about the noise."""
    from torch.utils.benchmark import Timer

    step()  # warm-up
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)  # seconds per call, one per block
    numbers = {m.number_per_run}
    if len(times) < min_samples:
        number = max(1, int(2e-3 / float(np.median(times))))
        numbers.add(number)
        start = time.perf_counter()
        while len(times) < min_samples and time.perf_counter() - start < max_time:
            times += timer.timeit(number).times
    q = np.quantile(np.array(times) * 1e3, QUANTILES)
    return Timing(*(float(v) for v in q), len(times),
                  f"torch.utils.benchmark blocked_autorange (+ timeit top-up), {torch.get_num_threads()} threads, "
                  f"{'/'.join(map(str, sorted(numbers)))} call(s) per sample")


def time_cuda(step, quick: bool) -> Timing:
    from triton.testing import do_bench

    warmup, rep = (10, 30) if quick else (25, 100)
    q = do_bench(step, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
    return Timing(*(float(v) for v in q), None, f"triton.testing.do_bench(warmup={warmup}, rep={rep}), L2 flushed")


def peak_mem_mb(step, device: torch.device) -> float | None:
    """Peak memory of one step above what was in use before it, in MiB.

    CUDA: ``max_memory_allocated`` after a reset. CPU (Linux): the process's resident-set high-water mark
    (``VmHWM``) after resetting it with ``/proc/self/clear_refs`` and returning glibc's free pages (``malloc_trim``),
    minus the resident set before the step. Freed-but-cached heap pages that the step reuses would hide part of its
    peak; the trim releases them first. None where /proc or the reset is unavailable (other systems, a container
    that forbids it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type != "cpu":
        return None
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        base = _proc_status_kb("VmRSS")
        step()
        peak = _proc_status_kb("VmHWM")
    except OSError:
        return None
    if base is None or peak is None:
        return None
    return max(0, peak - base) / 1024


def _proc_status_kb(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def llc_bytes() -> int:
    """Size of the largest CPU cache level (the last-level cache), 32 MiB if sysfs does not say."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or 32 << 20


def rotation(problem: Problem, work_bytes: int, stream_bytes: int | None = None) -> int:
    """Input copies to cycle through: on CPU enough that one round moves >= 2x the last-level cache (at most 64,
    and at most 1 GiB of copies); on CUDA 1 (do_bench flushes L2 itself). work_bytes: one copy's size;
    stream_bytes: what the lightest provider reads of it per call, when less (an int4 GEMV reads an eighth of what
    its fp32 baseline does: its copies alone must overflow the cache too)."""
    if problem.device.type != "cpu" or work_bytes <= 0:
        return 1
    want = math.ceil(2 * llc_bytes() / max(1, min(work_bytes, stream_bytes or work_bytes)))
    return int(max(1, min(64, want, (1 << 30) // work_bytes)))
