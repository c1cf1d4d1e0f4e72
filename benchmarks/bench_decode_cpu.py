"""Decode attention on the CPU: gptkernels vs PyTorch SDPA with one query against a KV cache.

    python benchmarks/bench_decode_cpu.py [--lens 128,2048,16384] [--dtypes float32,bfloat16] [--threads 1,2]
                                          [--tag NAME] [--out benchmarks/results/cpu]

Providers, all on the same inputs (q (B, H, 1, D), caches (B, H, Tmax, D), Tmax = the longest L):
  gk.decode  gptkernels.decode_attention(q, k_cache, v_cache, cache_seqlens=L, backend="cpu")
  gk.sdpa    gptkernels.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L], backend="cpu")
  sdpa       torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L])
Each thread count runs in its own process with OMP_NUM_THREADS set before start, so that torch and the extension's
OpenMP runtime agree on it. Timing: per thread count, the providers alternate in blocks (one sample of each per
round); a sample is the mean of n back-to-back calls (n sized so a sample takes about 2 ms); p20/p50/p80 over the
samples. The caches stay as they are between calls (the 128-key cache is hot in L2; 16384 keys, 100 MB in fp32,
stream from DRAM each call). Bytes that must move: K and V rows of the L keys, 2*B*H*L*D*elsize; pct_read_bw is
that over the read ceiling (torch.sum of 256 MB, p20) measured in the same run at each thread count (a 256 MB copy
is recorded too); it means something only where the cache does not fit in L2/L3. The 1-minute load average is
recorded per thread count: on a shared machine the numbers move with it, 2-thread ones most (a parallel region
waits for a descheduled thread).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# The checkout this script lives in, not whatever gptkernels is installed: `python benchmarks/x.py` puts
# benchmarks/ first on sys.path, and a site-packages gptkernels would be timed instead.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gptkernels  # noqa: E402
from gptkernels.bench.env import cpu_model, git_sha  # noqa: E402

B, H, D = 1, 12, 64


def quantiles(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return q[1], statistics.median(xs), q[7]


def time_block(fn, n):
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t0) / n / 1e3  # µs per call


def bandwidth_ceilings(rounds=9):
    """GB/s at p20 of a 256 MB copy (read + write) and of a 256 MB sum (read only: decode's access pattern)."""
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    tc, ts = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        tc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.sum()
        ts.append(time.perf_counter() - t0)
    nbytes = src.numel() * 4
    return {"copy_gbps": 2 * nbytes / quantiles(tc)[0] / 1e9, "read_gbps": nbytes / quantiles(ts)[0] / 1e9}


def cpu_has(flag):
    try:
        return any(line.startswith("flags") and flag in line.split() for line in open("/proc/cpuinfo"))
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="128,2048,16384")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--tag", default="decode")
    ap.add_argument("--note", default=None, help="free text stored in env.note (e.g. which kernels were built)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one thread count, write rows here
    args = ap.parse_args()
    if args.child is None:
        return parent(args)
    lens = [int(x) for x in args.lens.split(",")]
    dtypes = [getattr(torch, x) for x in args.dtypes.split(",")]
    threads = [int(x) for x in args.threads.split(",")]
    tmax = max(lens)
    torch.manual_seed(0)

    rows, ceilings = [], {}
    for nt in threads:
        assert os.environ.get("OMP_NUM_THREADS") == str(nt), "the parent sets OMP_NUM_THREADS per child"
        torch.set_num_threads(nt)
        ceilings[nt] = {**bandwidth_ceilings(), "load_avg_1m": os.getloadavg()[0]}
        for dt in dtypes:
            q = torch.randn(B, H, 1, D, dtype=dt)
            kc = torch.randn(B, H, tmax, D, dtype=dt)
            vc = torch.randn(B, H, tmax, D, dtype=dt)
            for L in lens:
                k, v = kc[:, :, :L], vc[:, :, :L]
                lens_t = torch.full((B,), L, dtype=torch.int64)
                provs = {
                    "gk.decode": lambda q=q, kc=kc, vc=vc, n=lens_t: gptkernels.decode_attention(
                        q, kc, vc, n, backend="cpu"),
                    "gk.sdpa": lambda q=q, k=k, v=v: gptkernels.scaled_dot_product_attention(q, k, v, backend="cpu"),
                    "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                }
                ref = provs["sdpa"]().double()
                for name, fn in provs.items():
                    err = (fn().double() - ref).abs().max().item()
                    assert err < (1e-5 if dt == torch.float32 else 3e-2), (name, err)
                # calls per sample: about 2 ms of the slowest provider
                n = {}
                for name, fn in provs.items():
                    for _ in range(3):
                        fn()
                    n[name] = max(1, int(2000 / max(time_block(fn, 3), 1e-3)))
                samples = {name: [] for name in provs}
                for _ in range(args.rounds):
                    for name, fn in provs.items():
                        samples[name].append(time_block(fn, n[name]))
                base = quantiles(samples["sdpa"])[1]
                nbytes = 2 * B * H * L * D * q.element_size()
                for name in provs:
                    p20, p50, p80 = quantiles(samples[name])
                    rows.append(
                        {
                            "op": "decode_attention",
                            "provider": name,
                            "shape": {"B": B, "H": H, "Hkv": H, "Tq": 1, "L": L, "Tmax": tmax, "D": D},
                            "dtype": str(dt).replace("torch.", ""),
                            "threads": nt,
                            "us_p20": round(p20, 2),
                            "us_p50": round(p50, 2),
                            "us_p80": round(p80, 2),
                            "calls_per_sample": n[name],
                            "gbps": round(nbytes / (p50 * 1e-6) / 1e9, 2),
                            "pct_read_bw": round(100 * nbytes / (p50 * 1e-6) / 1e9 / ceilings[nt]["read_gbps"], 1),
                            "speedup_vs_sdpa": round(base / p50, 3),
                        }
                    )
                    r = rows[-1]
                    print(
                        f"threads={nt} {r['dtype']:8s} L={L:6d} {name:10s} p20/p50/p80 {p20:9.2f} {p50:9.2f} "
                        f"{p80:9.2f} us  {r['gbps']:6.2f} GB/s ({r['pct_read_bw']:5.1f}% of read)  "
                        f"x{r['speedup_vs_sdpa']:.2f} vs sdpa",
                        flush=True,
                    )
        ceilings[nt]["load_avg_1m_end"] = os.getloadavg()[0]

    Path(args.child).write_text(json.dumps({"rows": rows, "ceilings": ceilings}))


def parent(args):
    rows, ceilings = [], {}
    for nt in args.threads.split(","):
        tmp = Path(args.out) / f".child-{os.getpid()}-{nt}.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--lens", args.lens, "--dtypes", args.dtypes, "--threads", nt,
               "--rounds", str(args.rounds), "--child", str(tmp)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": nt})
        got = json.loads(tmp.read_text())
        tmp.unlink()
        rows += got["rows"]
        ceilings.update(got["ceilings"])
    result = {
        "schema": "gptkernels-bench-decode-cpu/1",
        "env": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gptkernels": getattr(gptkernels, "__version__", None),
            "cpu_avx512f": cpu_has("avx512f"),
            "gptkernels_cpu_isa_env": os.environ.get("GPTKERNELS_CPU_ISA"),
            "build_info": gptkernels._C.build_info(),
            "gptkernels_file": gptkernels.__file__,
            "git_sha": git_sha(),
            "note": args.note,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "per_threads": ceilings,
            "timer": "perf_counter_ns, mean of n calls per sample, providers interleaved per round",
            "bytes_formula": "2 * B * H * L * D * elsize (K and V rows read once)",
        },
        "rows": rows,
    }
    out = Path(args.out)
    path = out / f"{datetime.date.today().isoformat()}-{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
