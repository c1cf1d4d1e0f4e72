"""Host cost of flash_attn_func at a decode size, against the calls it replaces, interleaved in one process.

    python benchmarks/bench_fa_host.py [--rounds 15] [--out benchmarks/results/cpu]

One query against 128 cached keys, 12 heads, head dim 64, fp32, batch 1, FlashAttention's (B, T, H, D) layout, one
thread. Rows: flash_attn_func (the C++ eager entry), the same call forced through the checked Python path,
F.scaled_dot_product_attention on transposed views (what a user writes without flash-attn) and
gptkernels.scaled_dot_product_attention on the same views. Each round times every row (best of 3 x 100 calls);
the result is the median over rounds, in us per call.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gptkernels as gk  # noqa: E402
from gptkernels.bench.env import fingerprint  # noqa: E402
from gptkernels.ops import _common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 12, 64), torch.randn(1, 128, 12, 64), torch.randn(1, 128, 12, 64)

    def checked():
        saved, _common.EAGER_BACKENDS = _common.EAGER_BACKENDS, ()
        try:
            return gk.flash_attn_func(q, k, v, causal=True)
        finally:
            _common.EAGER_BACKENDS = saved

    def views(t):
        return t.transpose(1, 2)

    rows = {
        "flash_attn_func": lambda: gk.flash_attn_func(q, k, v, causal=True),
        "flash_attn_func, checked Python path": checked,
        "F.scaled_dot_product_attention on transposed views":
            lambda: F.scaled_dot_product_attention(views(q), views(k), views(v)).transpose(1, 2),
        "gptkernels.scaled_dot_product_attention on transposed views":
            lambda: gk.scaled_dot_product_attention(views(q), views(k), views(v)).transpose(1, 2),
    }
    for f in rows.values():
        f(), f()
    samples = {n: [] for n in rows}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for n, f in rows.items():
            samples[n].append(min(timeit.repeat(f, number=100, repeat=3)) / 100 * 1e6)
    load.append(os.getloadavg()[0])
    us = {n: round(statistics.median(s), 2) for n, s in samples.items()}
    base = us["F.scaled_dot_product_attention on transposed views"]
    result = {
        "what": "host us per call at decode size: flash_attn_func vs the calls it replaces (median over rounds)",
        "shape": {"B": 1, "Tq": 1, "Tk": 128, "H": 12, "D": 64}, "dtype": "float32", "threads": 1,
        "load_avg_1m": load, "us_per_call": us, "ratio_vs_F_sdpa": {n: round(u / base, 3) for n, u in us.items()},
        "env": fingerprint(torch.device("cpu"), sys.argv), "kernel": gk.last("flash_attn_func"),
    }
    for n, u in us.items():
        print(f"{n:60s} {u:8.2f} us  {u / base:.2f}x F.sdpa")
    out = Path(args.out) / f"{datetime.date.today().isoformat()}-fa-host.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} (load {load[0]:.2f} -> {load[1]:.2f})")


if __name__ == "__main__":
    main()
