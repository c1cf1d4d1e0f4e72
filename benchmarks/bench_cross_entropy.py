"""cross_entropy and linear_cross_entropy on the CPU, forward + backward, against eager PyTorch.

    python benchmarks/bench_cross_entropy.py [--tokens 4096,8192] [--vocab 50257] [--hidden 768] [--reps 5]
                                             [--tag NAME] [--out benchmarks/results/cpu]

Problems (fp32, --threads N threads, default 1: torch.set_num_threads and OMP_NUM_THREADS for the extension's OpenMP):
  cross_entropy         logits (N, V), targets (N,), reduction "mean":
                          eager  F.cross_entropy(x, t) + backward
                          gk.cpu gptkernels.cross_entropy(x, t, backend="cpu") + backward
  linear_cross_entropy  h (N, C), weight (V, C) (GPT-2's tied LM head: no bias), targets (N,), "mean":
                          eager  F.cross_entropy(F.linear(h, w), t) + backward (dh, dw)
                          gk.cpu gptkernels.linear_cross_entropy(h, w, t, backend="cpu") + backward (dh, dw)
Timing: torch.utils.benchmark.Timer, one fwd+bwd call per sample (the gradients of the inputs are cleared by
autograd.grad, which returns them instead of accumulating); one warm-up call per provider, then `reps` rounds in which
the providers alternate, so a change in machine load hits both alike. p20/p50/p80 over the rounds.
Peak extra memory: each provider in a fresh subprocess: the high-water mark of its RSS is reset to the current RSS
(/proc/self/clear_refs) once the inputs are allocated and written, and VmHWM (/proc/self/status) after one fwd+bwd
call minus VmHWM before it is what the call added at its peak (outputs and gradients included: dlogits (N, V) for
cross_entropy, dh and dw for linear_cross_entropy, alike for both providers). resource.getrusage's ru_maxrss is
recorded too (peak_mem_mb_ru_maxrss), but in a child started by fork + exec it also holds the parent's pre-exec
high-water mark (the kernel's signal->maxrss, which clear_refs does not reset): with the timing process holding
gigabytes of inputs it read 0 MB extra for every provider, so VmHWM is the number used.
Formulas: cross_entropy moves at least 3*N*V*4 bytes (read the logits in the forward and again in the backward,
write dlogits); linear_cross_entropy does 3 GEMMs of 2*N*V*C flops (logits, dh, dw). Ceilings measured in the same
run, at the same thread count: a 256 MB copy (GB/s, read + write) and a 2048^3 fp32 matmul (GFLOP/s), from their p20.
The 1-minute load average is recorded before and after: this is a shared 2-core VM, and the numbers move with it.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

if "--threads" in sys.argv[:-1]:  # before torch loads: the extension's OpenMP reads it once
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import benchmark  # noqa: E402

# The checkout this script lives in, not an installed gptkernels.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gptkernels  # noqa: E402
from gptkernels.bench.env import cpu_model, git_sha  # noqa: E402
from gptkernels.bench.harness import _proc_status_kb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ("eager", "gk.cpu")


def quantiles(xs):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return q[1], statistics.median(xs), q[7]


def make_inputs(op, n, v, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    if op == "cross_entropy":
        return {"x": torch.randn(n, v, generator=g).requires_grad_(), "t": t}
    return {"h": torch.randn(n, c, generator=g).requires_grad_(),
            "w": (torch.randn(v, c, generator=g) * 0.02).requires_grad_(), "t": t}


def step_fn(op, provider, inp):
    """One forward + backward; returns the loss and the gradients."""
    if op == "cross_entropy":
        x, t = inp["x"], inp["t"]
        if provider == "eager":
            return lambda: torch.autograd.grad(F.cross_entropy(x, t), [x])
        return lambda: torch.autograd.grad(gptkernels.cross_entropy(x, t, backend="cpu"), [x])
    h, w, t = inp["h"], inp["w"], inp["t"]
    if provider == "eager":
        return lambda: torch.autograd.grad(F.cross_entropy(F.linear(h, w), t), [h, w])
    return lambda: torch.autograd.grad(gptkernels.linear_cross_entropy(h, w, t, backend="cpu"), [h, w])


def check(op, inp):
    """The two providers agree (fp32 bound of the tests, vs the fp64 eager on the same inputs) before timing."""
    from gptkernels._tolerance import judge

    ref = {k: (v.detach().double().requires_grad_() if v.is_floating_point() else v) for k, v in inp.items()}
    ref_grads = step_fn(op, "eager", ref)()
    for name, g, r in zip(("d0", "d1"), step_fn(op, "gk.cpu", inp)(), ref_grads):
        verdict = judge(g, r)
        if not verdict.ok:
            raise SystemExit(f"{op} {name}: gk.cpu fails the fp32 bound: {verdict.message}")


def ceilings(reps=7):
    src = torch.empty(32 * 1024 * 1024, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    tc = benchmark.Timer("dst.copy_(src)", globals={"dst": dst, "src": src}).blocked_autorange(min_run_time=1.0)
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    tm = [benchmark.Timer("torch.mm(a, b)", globals={"a": a, "b": b, "torch": torch}).timeit(1).times[0]
          for _ in range(reps)]
    copy_s = sorted(tc.times)[max(0, len(tc.times) // 5 - 1)]
    mm_s = quantiles(tm)[0]
    return {"copy_gbps": 2 * src.numel() * 4 / copy_s / 1e9, "matmul_gflops": 2 * 2048**3 / mm_s / 1e9}


def _vm_hwm_kib():
    return _proc_status_kb("VmHWM") or 0


def measure_memory(op, provider, n, v, c):
    """(ru_maxrss, VmHWM) peak extra MB of one fwd+bwd of `provider`, measured in this (fresh) process."""
    inp = make_inputs(op, n, v, c)
    # The high-water mark may stand above today's RSS since the imports; writing 5 to clear_refs (Linux >= 4.0)
    # resets it to the current RSS, so the step's own peak shows.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _vm_hwm_kib()
    grads = step_fn(op, provider, inp)()
    peak, peak_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _vm_hwm_kib()
    del grads
    return (peak - base) / 1024.0, (peak_hwm - base_hwm) / 1024.0  # both in KiB on Linux


def memory_in_subprocess(op, provider, n, v, c):
    cmd = [sys.executable, __file__, "--memory", op, provider, str(n), str(v), str(c)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    ru, hwm = (float(s) for s in out.stdout.strip().splitlines()[-1].split())
    return ru, hwm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ops", default="cross_entropy,linear_cross_entropy")
    ap.add_argument("--tag", default="cross-entropy")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu"))
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads (default 1)")
    ap.add_argument("--memory", nargs=5, metavar=("OP", "PROVIDER", "N", "V", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        op, provider, n, v, c = args.memory
        print(*measure_memory(op, provider, int(n), int(v), int(c)))
        return

    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    ceil = ceilings()
    print(f"ceilings ({args.threads} thread(s)): {ceil}", flush=True)
    v, c = args.vocab, args.hidden
    rows = []
    for op in args.ops.split(","):
        for n in (int(s) for s in args.tokens.split(",")):
            inp = make_inputs(op, n, v, c)
            check(op, make_inputs(op, 64, v, c, seed=1))
            fns = {p: step_fn(op, p, inp) for p in PROVIDERS}
            for p in PROVIDERS:
                fns[p]()  # warm-up
            times = {p: [] for p in PROVIDERS}
            for _ in range(args.reps):
                for p in PROVIDERS:
                    times[p].append(benchmark.Timer("f()", globals={"f": fns[p]}).timeit(1).times[0])
            del inp, fns
            mems = {p: memory_in_subprocess(op, p, n, v, c) for p in PROVIDERS}
            mem = {p: m[1] for p, m in mems.items()}  # VmHWM (see the module docstring for why not ru_maxrss)
            p50_eager = quantiles(times["eager"])[1]
            for p in PROVIDERS:
                q = quantiles(times[p])
                row = {"op": op, "provider": p, "mode": "fwd+bwd", "shape": {"N": n, "V": v} | (
                    {"C": c} if op != "cross_entropy" else {}), "dtype": "float32", "threads": args.threads,
                       "ms_p20": round(q[0] * 1e3, 2), "ms_p50": round(q[1] * 1e3, 2), "ms_p80": round(q[2] * 1e3, 2),
                       "speedup_vs_eager": round(p50_eager / q[1], 3), "peak_mem_mb": round(mem[p], 1),
                       "peak_mem_vs_eager": round(mem[p] / mem["eager"], 4) if mem["eager"] > 0 else None,
                       "peak_mem_mb_ru_maxrss": round(mems[p][0], 1),
                       "samples": len(times[p])}
                if op == "cross_entropy":
                    row["gbps"] = round(3 * n * v * 4 / q[1] / 1e9, 2)
                    row["pct_roofline"] = round(100 * row["gbps"] / ceil["copy_gbps"], 1)
                else:
                    row["gflops"] = round(3 * 2 * n * v * c / q[1] / 1e9, 1)
                    row["pct_roofline"] = round(100 * row["gflops"] / ceil["matmul_gflops"], 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    load_end = os.getloadavg()
    env = {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "gptkernels": gptkernels.__version__,
        "build_info": gptkernels.info()["build"], "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads, "load_avg_start": load_start, "load_avg_end": load_end, "ceilings": ceil,
        "chunk_bytes": gptkernels.ops.cross_entropy._CHUNK_BYTES,
        "timer": "torch.utils.benchmark.Timer.timeit(1) per sample, providers alternating per round",
        "memory": "ru_maxrss after one fwd+bwd minus after input allocation and a high-water reset (clear_refs 5), "
                  "fresh subprocess per provider",
        "command": " ".join(sys.argv),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{datetime.date.today().isoformat()}-{args.tag}.json"
    path.write_text(json.dumps({"schema": "gptkernels-bench-cross-entropy/1", "env": env, "rows": rows}, indent=1)
                    + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
