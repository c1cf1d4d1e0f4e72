"""This machine's ceilings, measured at the start of every run with the same timers as the ops.

Bandwidth: a large device copy ``dst.copy_(src)``; GB/s = (bytes read + bytes written) / time, i.e. 2 * nbytes.
    CUDA: 1 GiB (quick: 256 MiB); CPU: 256 MiB (quick: 64 MiB), both far beyond any cache.
Compute: a square matmul; TFLOP/s = 2 * n^3 / time. CUDA: bf16 n = 8192 (quick: 4096); CPU: fp32 n = 2048
    (quick: 1024).
The ceiling comes from the p20 time (what the machine can do, less the disturbances a busy machine adds); the ops'
metrics from their p50, so a % of the ceiling errs low, never high. On CPU a row can still pass 100%: an output
buffer the allocator hands back while it is still in cache is written without a trip to DRAM.
"""

from __future__ import annotations

import torch

from gptkernels.bench.harness import time_cpu, time_cuda


def _time(step, device, quick):
    if device.type == "cuda":
        return time_cuda(step, quick)
    return time_cpu(step, min_run_time=0.1 if quick else 0.5, min_samples=5 if quick else 10, max_time=2.0)


def _copy_ms(device, nbytes, quick):
    src = torch.rand(nbytes // 4, device=device)  # random, never zeros
    dst = torch.empty_like(src)
    return _time(lambda: dst.copy_(src), device, quick)


def _matmul_ms(device, n, dtype, quick):
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return _time(lambda: torch.mm(a, b, out=c), device, quick)


def measure(device: torch.device, quick: bool = False) -> dict:
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = (256 << 20 if quick else 1 << 30) if cuda else (64 << 20 if quick else 256 << 20)
    t = _copy_ms(device, nbytes, quick)
    n, dtype = ((4096 if quick else 8192), torch.bfloat16) if cuda else ((1024 if quick else 2048), torch.float32)
    tm = _matmul_ms(device, n, dtype, quick)
    if cuda:
        torch.cuda.empty_cache()
    return {
        "copy_gbps": 2 * nbytes / (t.p20 * 1e-3) / 1e9,
        "copy_bytes": nbytes,
        "copy_ms": [t.p20, t.p50, t.p80],
        "copy_formula": "2 * nbytes (read + write) / p20 time",
        "matmul_tflops": 2 * n**3 / (tm.p20 * 1e-3) / 1e12,
        "matmul_shape": f"{n}x{n}x{n}",
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_ms": [tm.p20, tm.p50, tm.p80],
        "matmul_formula": "2 * n^3 / p20 time",
        "timer": t.method,
    }
