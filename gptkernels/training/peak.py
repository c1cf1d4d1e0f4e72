"""Peak FLOP/s of one rank, the denominator of MFU: a table of GPU datasheet numbers, a CPU matmul measurement."""

from __future__ import annotations

import os
import time

import torch

from gptkernels import _runtime

# Dense peak FLOP/s per GPU name fragment: bf16 tensor cores, and plain fp32 (what an fp32 run gets without TF32).
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},  # before "H100": the first matching fragment wins
    "H100 NVL": {"bf16": 835e12, "fp32": 60e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}
_CPU_PEAK: dict = {}


def measure_cpu_peak(sizes=(256, 512, 1024), seconds: float = 0.1) -> float:
    """Best fp32 matmul FLOP/s over n x n products on this process's threads, measured once per process: each size
    repeats for ``seconds`` (at least 3 times) and the fastest product counts, so a busy machine still shows its
    peak in its quiet moments. Several sizes because the best depends on the caches: on the 2-core EPYC VM this was
    written on, MKL reached ~190 GFLOP/s at n = 512 and ~60 at n = 1024.

    Not gptkernels.bench.roofline.measure, the benchmark's ceiling: it takes the p20 of one size (n = 1024 quick,
    2048 full) after timing a large copy. Side by side on that VM (1 thread, load average 3): this function read
    101-103 GFLOP/s in 0.38 s, roofline 72-92 (quick, 0.6-1.4 s) and 70-90 (full, 4.7-5.4 s), so switching would
    raise every MFU by 12-47% and add seconds to each start."""
    key = (tuple(sizes), torch.get_num_threads())
    if key not in _CPU_PEAK:
        best = 0.0
        for n in sizes:
            g = torch.Generator().manual_seed(n)  # its own generator: the global RNG stream stays untouched
            a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
            torch.mm(a, b)  # warm up the BLAS threads
            start, reps = time.perf_counter(), 0
            while reps < 3 or time.perf_counter() - start < seconds:
                t = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * n**3 / (time.perf_counter() - t))
                reps += 1
        _CPU_PEAK[key] = best
    return _CPU_PEAK[key]


def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one rank, how it was found). GPTKERNELS_PEAK_FLOPS overrides."""
    env = os.environ.get("GPTKERNELS_PEAK_FLOPS")
    if env:
        return float(env), f"MFU vs GPTKERNELS_PEAK_FLOPS {float(env) / 1e12:.1f} TFLOP/s"
    if device.type == "cpu":
        peak = measure_cpu_peak()
        return peak, (f"MFU vs measured CPU matmul peak {peak / 1e9:.1f} GFLOP/s (best fp32 n^3 matmul, n <= 1024, "
                      f"{_runtime.threads_text()})")
    name = torch.cuda.get_device_name(device)
    for frag, peaks in GPU_PEAK_FLOPS.items():
        if frag in name:
            return peaks[dtype], f"MFU vs {name} dense {dtype} peak {peaks[dtype] / 1e12:.0f} TFLOP/s"
    return None, f"MFU not reported: no peak known for {name} (set GPTKERNELS_PEAK_FLOPS)"
