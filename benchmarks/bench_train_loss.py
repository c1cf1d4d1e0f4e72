"""A training step of a GPT preset with three ways to compute its loss, interleaved in one run.

    python benchmarks/bench_train_loss.py [--model mini] [--batch 16] [--seq 256] [--rounds 8] [--steps 3]
                                          [--threads 1] [--out benchmarks/results/cpu] [--tag NAME]

Paths (same weights, same batches, AdamW step included, fp32, backend "cpu" for every gptkernels op):
    fused       GPT.forward(idx, targets): linear_cross_entropy on the final hidden states, no logits
    logits+ce   GPT.forward(idx, targets, return_logits=True): the (B, T, V) logits, then gptkernels.cross_entropy
    logits+F    the logits, then F.cross_entropy(logits.float(), targets): what the trainer did before the fused loss
Timing: after two warm-up steps per path, `rounds` rounds in which each path runs `steps` consecutive steps (paths
alternate, so a change of machine load hits them alike); ms per step p20/p50/p80 over all steps, tokens/s from p50.
Peak memory: gptkernels.bench.harness.peak_mem_mb of one step (VmHWM after a reset, above what was resident before).
Loss agreement: every path trains a fresh copy of the model from the same initial weights on the same batches for
`--check-steps` steps; the largest |loss - loss of logits+F| over those steps is reported.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gptkernels.bench.env import cpu_model, git_sha, load_avg  # noqa: E402
from gptkernels.bench.harness import peak_mem_mb  # noqa: E402
from gptkernels.model import GPT, GPTConfig  # noqa: E402

PATHS = ("fused", "logits+ce", "logits+F")


def loss_of(model, path, idx, targets):
    if path == "fused":
        return model(idx, targets)[1]
    if path == "logits+ce":
        return model(idx, targets, return_logits=True)[1]
    logits, _ = model(idx)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def make_step(model, opt, path, batches):
    it = [0]

    def step():
        idx, targets = batches[it[0] % len(batches)]
        it[0] += 1
        loss = loss_of(model, path, idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def quantiles(xs):
    t = torch.tensor(sorted(xs), dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--check-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--tag", default="train-loss")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    config = GPTConfig.preset(args.model, block_size=max(args.seq, GPTConfig.preset(args.model).block_size))
    torch.manual_seed(0)
    base = GPT(config, backend="cpu")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen),
                torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)) for _ in range(4)]

    # Loss agreement from identical starting points.
    losses = {}
    for path in PATHS:
        model = copy.deepcopy(base)
        step = make_step(model, model.configure_optimizer(1e-3), path, batches)
        losses[path] = [step() for _ in range(args.check_steps)]
    ref = losses["logits+F"]
    agreement = {path: max(abs(a - b) for a, b in zip(losses[path], ref)) for path in PATHS}

    models = {path: copy.deepcopy(base) for path in PATHS}
    steps = {path: make_step(m, m.configure_optimizer(1e-3), path, batches) for path, m in models.items()}
    for path in PATHS:
        for _ in range(2):
            steps[path]()
    times = {path: [] for path in PATHS}
    for _ in range(args.rounds):
        for path in PATHS:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                steps[path]()
                times[path].append((time.perf_counter() - t0) * 1e3)
    peaks = {path: peak_mem_mb(steps[path], torch.device("cpu")) for path in PATHS}

    tokens = args.batch * args.seq
    rows = []
    ref_p50 = quantiles(times["logits+F"])[1]
    for path in PATHS:
        p20, p50, p80 = quantiles(times[path])
        rows.append({"path": path, "ms_p20": p20, "ms_p50": p50, "ms_p80": p80, "tok_s": tokens / (p50 * 1e-3),
                     "speedup_vs_logits_F": ref_p50 / p50, "peak_mem_mb": peaks[path], "steps": len(times[path]),
                     "max_abs_loss_diff_vs_logits_F": agreement[path], "losses": losses[path]})
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {
        "schema": "gptkernels-bench-train-loss/1",
        "env": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "git_sha": git_sha(), "date": now, "threads": args.threads, "load_avg_start": load_start,
                "load_avg_end": os.getloadavg(), "load_avg_1m_end": load_avg(),
                "command": " ".join(["benchmarks/bench_train_loss.py", *(argv or sys.argv[1:])])},
        "config": {"model": args.model, "batch": args.batch, "seq": args.seq, "vocab": config.vocab_size,
                   "n_embd": config.n_embd, "rounds": args.rounds, "steps_per_round": args.steps, "dtype": "float32"},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.date.today().isoformat()}-{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model} {args.batch}x{args.seq}, {args.threads} thread(s), load {load_start[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f} MB"
        print(f"  {r['path']:10s} {r['ms_p50']:8.1f} ms/step [{r['ms_p20']:.1f}, {r['ms_p80']:.1f}]  "
              f"{r['tok_s']:8.0f} tok/s  {r['speedup_vs_logits_F']:.3f}x logits+F  peak {mem}  "
              f"max |dloss| {r['max_abs_loss_diff_vs_logits_F']:.2e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
