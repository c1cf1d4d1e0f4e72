"""Weight-only quantized linear on the CPU: gptkernels int8 / int4 vs fp32 F.linear and ATen's int8 kernel, and a
GPT-2 (124M, random weights) batch-1 decode with quantized layers.

    python benchmarks/bench_qlinear.py [--shapes 3072x768,768x3072,2304x768,11008x4096] [--rows 1,4,16]
                                       [--threads 1,2] [--rounds 15] [--decode-tokens 32] [--tag qlinear]
                                       [--out benchmarks/results/cpu]

Linear layers (x fp32 (M, K), W (N, K); shapes are NxK):
  fp32           torch.nn.functional.linear(x, W, b)
  gk.int8        gptkernels.quantized_linear(x, q8, s8, b, backend="cpu")           int8 per output channel
  gk.int4-g128   gptkernels.quantized_linear(x, q4, s4, b, group_size=128, bits=4, backend="cpu")
  aten.int8pack  torch.ops.aten._weight_int8pack_mm(x, q8, s8)  (no bias; where the op exists)
Weight bytes (what must move at M <= 16): fp32 4*N*K; int8 N*K + 4*N; int4 N*K/2 + 4*N*K/128. GB/s = those / p50.
Two cache modes: "hot" calls the same weight (L2/L3-resident where it fits the 32 MB L3: every GPT-2 shape),
"cold" rotates over copies of the weight totalling >= 96 MB, so every call reads it from DRAM, as a whole-model
decode step does. pct_read_bw = GB/s over the read ceiling (torch.sum of 256 MB, p20) measured in the same run.

Decode: gptkernels.model.GPT preset gpt2, one random init (seed 0), a 16-token prompt, greedy with a KV cache;
ms/token = p50 over the timed decode steps of every round (prefill excluded). Providers:
  eager          GPT(config, backend="torch"): the eager PyTorch reference model, fp32
  gk             GPT(config): our fp32 kernels
  gk+int8        gk, then gptkernels.quantize(model) (int8 per channel; lm_head, tied to wte, stays fp32)
  gk+int4        gk, then gptkernels.quantize(model, 4, 128)
  gk+int8-all    gk, then gptkernels.quantize(model, skip=()): the lm_head too (50257x768: 154 MB of fp32 read per
                 token, a third of GPT-2's; the embedding keeps its fp32 copy for the lookup)
Token agreement vs eager: free-running (share of positions equal, first divergence) and teacher-forced (each step fed
the eager tokens: share of equal argmaxes). Random weights give flat logits, so greedy choices are fragile.

Each thread count runs in its own process with OMP_NUM_THREADS set before start. Providers alternate per round; a
linear sample is the mean of n back-to-back calls (n sized to ~2 ms), p20/p50/p80 over the samples. The 1-minute
load average is recorded per thread count: on a shared machine the numbers move with it, 2-thread ones most (a
parallel region waits for a descheduled thread).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an installed gptkernels
import gptkernels  # noqa: E402
from gptkernels.bench.env import cpu_model, git_sha  # noqa: E402
from gptkernels.model import GPT, GPTConfig  # noqa: E402

COLD_BYTES = 96 << 20  # three times the 32 MB L3 of the 2-core EPYC


def quantiles(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return q[1], statistics.median(xs), q[7]


def read_ceiling(rounds=9):
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32).uniform_()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        src.sum()
        ts.append(time.perf_counter() - t0)
    return src.numel() * 4 / quantiles(ts)[0] / 1e9


# ------------------------------------------------------------------------------------------------ linear layers
def _copies(tensors, nbytes):
    """Enough copies of ``tensors`` that cycling through them streams >= COLD_BYTES from memory."""
    n = max(1, -(-COLD_BYTES // nbytes))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


class _Timer:
    """Calls of one provider, cycling through its weight copies."""

    def __init__(self, call, pool, x):
        self.call, self.pool, self.x, self.pos = call, pool, x, 0

    def run(self, reps):
        """us per call, mean of ``reps`` back-to-back calls."""
        t0 = time.perf_counter_ns()
        for _ in range(reps):
            self.call(self.x, self.pool[self.pos % len(self.pool)])
            self.pos += 1
        return (time.perf_counter_ns() - t0) / reps / 1e3


def bench_linear(shapes, rows, rounds, nt, read_gbps):
    has_aten = hasattr(torch.ops.aten, "_weight_int8pack_mm")
    out = []
    for n_, k_ in shapes:
        torch.manual_seed(0)
        w = torch.randn(n_, k_) * 0.02
        b = torch.randn(n_) * 0.02
        q8, s8 = gptkernels.quantize_weight(w, 8)
        q4, s4 = gptkernels.quantize_weight(w, 4, 128)
        nbytes = {"fp32": 4 * n_ * k_, "gk.int8": n_ * k_ + 4 * n_, "gk.int4-g128": n_ * k_ // 2 + 4 * n_ * k_ // 128,
                  "aten.int8pack": n_ * k_ + 4 * n_}
        sets = {"fp32": (w,), "gk.int8": (q8, s8), "gk.int4-g128": (q4, s4), "aten.int8pack": (q8, s8)}
        calls = {
            "fp32": lambda x, t, b=b: F.linear(x, t[0], b),
            "gk.int8": lambda x, t, b=b: gptkernels.quantized_linear(x, t[0], t[1], b, backend="cpu"),
            "gk.int4-g128": lambda x, t, b=b: gptkernels.quantized_linear(x, t[0], t[1], b, group_size=128, bits=4,
                                                                          backend="cpu"),
            "aten.int8pack": lambda x, t: torch.ops.aten._weight_int8pack_mm(x, t[0], t[1]),
        }
        if not has_aten:
            del calls["aten.int8pack"]
        for mode in ("hot", "cold"):
            pools = {p: (_copies(sets[p], nbytes[p]) if mode == "cold" else [sets[p]]) for p in calls}
            for m in rows:
                x = torch.randn(m, k_)
                ref = F.linear(x.double(), gptkernels.dequantize_weight(q8, s8, dtype=torch.float64), b.double())
                got = calls["gk.int8"](x, sets["gk.int8"]).double()
                assert ((got - ref).norm() / ref.norm()).item() < 1e-5, "gk.int8 disagrees with its fp64 reference"
                timers = {p: _Timer(calls[p], pools[p], x) for p in calls}
                reps = {}
                for p, t in timers.items():
                    t.run(2)
                    reps[p] = max(1, int(2000 / max(t.run(3), 1e-3)))
                samples = {p: [] for p in calls}
                for _ in range(rounds):
                    for p, t in timers.items():
                        samples[p].append(t.run(reps[p]))
                base = quantiles(samples["fp32"])[1]
                for p in calls:
                    p20, p50, p80 = quantiles(samples[p])
                    gbps = nbytes[p] / (p50 * 1e-6) / 1e9
                    out.append({
                        "op": "quantized_linear", "provider": p, "mode": mode, "shape": {"M": m, "N": n_, "K": k_},
                        "dtype": "float32", "threads": nt, "us_p20": round(p20, 2), "us_p50": round(p50, 2),
                        "us_p80": round(p80, 2), "calls_per_sample": reps[p], "weight_bytes": nbytes[p],
                        "gbps": round(gbps, 2), "pct_read_bw": round(100 * gbps / read_gbps, 1),
                        "speedup_vs_fp32": round(base / p50, 3),
                    })
                    print(f"threads={nt} {mode:4s} {n_}x{k_} M={m:2d} {p:13s} p20/p50/p80 {p20:9.1f} {p50:9.1f} "
                          f"{p80:9.1f} us  {gbps:6.1f} GB/s  x{base / p50:.2f} vs fp32", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- decode
def _models(seed=0):
    cfg = GPTConfig.preset("gpt2")
    torch.manual_seed(seed)
    eager = GPT(cfg, backend="torch").eval()
    sd = eager.state_dict()
    models = {"eager": eager}
    for name, args in (("gk", None), ("gk+int8", ((8, None), ("lm_head",))), ("gk+int4", ((4, 128), ("lm_head",))),
                       ("gk+int8-all", ((8, None), ()))):
        m = GPT(cfg).eval()
        m.load_state_dict(sd)
        if args is not None:
            gptkernels.quantize(m, *args[0], skip=args[1])
        models[name] = m
    return cfg, models


def _bytes_per_token(model):
    """Parameter and buffer bytes a decode step reads: every tensor once (tied ones once), except the embedding
    tables, of which it reads one row (a float lm_head tied to wte is read whole, through lm_head)."""
    seen, total = set(), 0
    for k, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or k in ("transformer.wte.weight", "transformer.wpe.weight"):
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def _decode(model, prompt, tokens, forced=None):
    """Greedy decode; returns (generated tokens, per-step seconds). forced: feed these tokens instead (teacher
    forcing) and return the argmaxes."""
    cache = model.make_cache(1, prompt.shape[1] + tokens + 1)
    logits, _ = model(prompt, cache=cache, last_only=True)
    out, times = [], []
    for i in range(tokens):
        nxt = logits[:, -1, :].argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(nxt))
        feed = nxt if forced is None else torch.tensor([[forced[i]]])
        t0 = time.perf_counter()
        logits, _ = model(feed, cache=cache, last_only=True)
        times.append(time.perf_counter() - t0)
    return out, times


def bench_decode(tokens, rounds, nt):
    cfg, models = _models()
    torch.manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    for m in models.values():  # warm-up: first-call dispatch decisions, page faults
        _decode(m, prompt, 2)
    steps = {n: [] for n in models}
    gen = {}
    for _ in range(rounds):
        for name, m in models.items():
            toks, ts = _decode(m, prompt, tokens)
            steps[name] += ts
            gen[name] = toks
    ref = gen["eager"]
    base = statistics.median(steps["eager"])
    rows = []
    for name, m in models.items():
        forced, _ = _decode(m, prompt, tokens, forced=ref)
        agree = sum(a == b for a, b in zip(gen[name], ref)) / tokens
        first = next((i for i, (a, b) in enumerate(zip(gen[name], ref)) if a != b), None)
        forced_agree = sum(a == b for a, b in zip(forced, ref)) / tokens
        p20, p50, p80 = quantiles([t * 1e3 for t in steps[name]])
        wbytes = _bytes_per_token(m)
        rows.append({
            "op": "gpt2_decode", "provider": name, "threads": nt, "batch": 1, "prompt": 16, "tokens": tokens,
            "rounds": rounds, "ms_per_token_p20": round(p20, 3), "ms_per_token_p50": round(p50, 3),
            "ms_per_token_p80": round(p80, 3), "speedup_vs_eager": round(base * 1e3 / p50, 3),
            "weight_bytes_per_token": wbytes, "token_agreement": round(agree, 3),
            "first_divergence": first, "teacher_forced_agreement": round(forced_agree, 3),
        })
        print(f"threads={nt} decode {name:12s} p20/p50/p80 {p20:7.2f} {p50:7.2f} {p80:7.2f} ms/token  "
              f"x{base * 1e3 / p50:.2f} vs eager  weights {wbytes / 1e6:6.1f} MB/token  agree {agree:.2f} "
              f"(first diff {first}) forced {forced_agree:.2f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="3072x768,768x3072,2304x768,11008x4096", help="NxK")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--tag", default="qlinear")
    ap.add_argument("--note", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one thread count, write rows here
    args = ap.parse_args()
    if args.child is None:
        return parent(args)
    nt = int(args.threads)
    assert os.environ.get("OMP_NUM_THREADS") == str(nt), "the parent sets OMP_NUM_THREADS per child"
    torch.set_num_threads(nt)
    env = {"load_avg_1m_start": os.getloadavg()[0], "read_gbps": read_ceiling()}
    rows = []
    if not args.skip_linear:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        rows += bench_linear(shapes, [int(r) for r in args.rows.split(",")], args.rounds, nt, env["read_gbps"])
    env["load_avg_1m_mid"] = os.getloadavg()[0]
    if not args.skip_decode:
        rows += bench_decode(args.decode_tokens, args.decode_rounds, nt)
    env["load_avg_1m_end"] = os.getloadavg()[0]
    Path(args.child).write_text(json.dumps({"rows": rows, "env": env}))


def parent(args):
    rows, per_threads = [], {}
    for nt in args.threads.split(","):
        tmp = Path(args.out) / f".child-{os.getpid()}-{nt}.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--shapes", args.shapes, "--rows", args.rows, "--threads", nt,
               "--rounds", str(args.rounds), "--decode-tokens", str(args.decode_tokens),
               "--decode-rounds", str(args.decode_rounds), "--child", str(tmp)]
        cmd += ["--skip-decode"] if args.skip_decode else []
        cmd += ["--skip-linear"] if args.skip_linear else []
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": nt})
        got = json.loads(tmp.read_text())
        tmp.unlink()
        rows += got["rows"]
        per_threads[nt] = got["env"]
    result = {
        "schema": "gptkernels-bench-qlinear-cpu/1",
        "env": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gptkernels": getattr(gptkernels, "__version__", None),
            "build_info": gptkernels._C.build_info(),
            "gptkernels_cpu_isa_env": os.environ.get("GPTKERNELS_CPU_ISA"),
            "git_sha": git_sha(),
            "note": args.note,
            "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "per_threads": per_threads,
            "timer": "perf_counter_ns, mean of n calls per sample, providers interleaved per round",
            "bytes_formula": "weight bytes: fp32 4NK; int8 NK + 4N; int4 g128 NK/2 + 4NK/128",
            "cold_bytes": COLD_BYTES,
        },
        "rows": rows,
    }
    path = Path(args.out) / f"{datetime.date.today().isoformat()}-{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
