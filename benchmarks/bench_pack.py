"""Packed vs padded training on the default corpus: real tokens/s and loss of a short run, both modes interleaved.

    python benchmarks/bench_pack.py [--model mini] [--block-size 256] [--batch-size 16] [--steps 60] [--threads 1]
                                    [--backend torch] [--out benchmarks/results/cpu] [--tag pack]

The corpus is the trainer's default one with document boundaries (``--docs pack`` / ``--docs pad``): the Python
standard library's .py files, one document each, so the length mix is that of those files (at block 256 most are
longer than a row and padding fills under 1% of the padded rows; the JSON records the measured fraction).

  pack  random windows of the EOT-separated stream, each row attending within its documents (cu_seqlens built on
        the host, flash_attn_varlen_func in the model): every slot is a real token.
  pad   one document chunk (<= block_size tokens) per row, padded, padding out of the loss.

Two models start from the same weights and train with the same AdamW and LR schedule, one step of each in turn (the
mode that goes first alternates), so machine load hits both alike. A step's time covers drawing the batch, forward,
backward, clipping and the optimizer step. tokens/s = real (non-padding) target tokens / time, summed over the timed
steps (the first --warmup steps of each are not timed); p20/p50/p80 are over per-step tokens/s. Loss: the mean train
loss of the last 10 steps, and each model's loss on the same fixed val batches of both layouts (the padded one scores
every val target once per chunk; the packed one random windows).
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# The checkout this script lives in, not whatever gptkernels is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gptkernels import _dispatch  # noqa: E402
from gptkernels import data as gkdata  # noqa: E402
from gptkernels.bench.env import fingerprint  # noqa: E402
from gptkernels.model import GPT, GPTConfig  # noqa: E402
from gptkernels.train import lr_at  # noqa: E402

MODES = ("pack", "pad")


def quantiles(xs):
    q = statistics.quantiles(sorted(xs), n=10, method="inclusive")
    return q[1], statistics.median(xs), q[7]


def step(model, opt, batch, lr, clip):
    for g in opt.param_groups:
        g["lr"] = lr
    _, loss = model(batch.x, batch.y, **batch.model_kwargs())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _median_ms(times, nseq, keep):
    picked = [t for t, k in zip(times, nseq) if keep(k)]
    return 1e3 * statistics.median(picked) if picked else None


@torch.no_grad()
def evaluate(model, sampler, n):
    model.eval()
    total = sum(model(b.x, b.y, **b.model_kwargs())[1].item() for b in (sampler.get_batch("val", k) for k in range(n)))
    model.train()
    return total / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode at the start")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="torch", help="gptkernels backend of both models (default torch: the eager "
                   "reference, which runs wherever PyTorch does)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu"))
    p.add_argument("--tag", default="pack")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    T, B = args.block_size, args.batch_size

    ds = gkdata.load(None, docs=True)
    config = GPTConfig.preset(args.model, block_size=T, vocab_size=ds.vocab_size)
    samplers = {m: gkdata.make_sampler(ds, m, T, B, args.seed, config.vocab_size) for m in MODES}
    models, opts = {}, {}
    for m in MODES:
        torch.manual_seed(args.seed)  # the same initial weights for both
        models[m] = GPT(config, backend=args.backend)
        opts[m] = models[m].configure_optimizer(args.lr)
    sched = argparse.Namespace(lr=args.lr, min_lr=args.lr / 10, warmup=max(1, args.steps // 10),
                               lr_decay_steps=args.steps)
    env = fingerprint(torch.device("cpu"))
    print(f"{env['cpu_model']}, {args.threads} thread(s), torch {torch.__version__}, backend {args.backend}, load "
          f"{env['load_avg_1m']}; {args.model} block {T} batch {B}, {args.steps} steps per mode", flush=True)
    print(f"padded rows: {100 * samplers['pad'].padding_fraction():.2f}% padding over a train epoch", flush=True)

    rec = {m: {"time": [], "tokens": [], "loss": [], "nseq": []} for m in MODES}
    t_all = time.perf_counter()
    for i in range(args.steps):
        lr = lr_at(i, sched)
        for m in (MODES if i % 2 == 0 else MODES[::-1]):
            t0 = time.perf_counter()
            batch = samplers[m].get_batch("train", i)
            loss = step(models[m], opts[m], batch, lr, 1.0)
            dt = time.perf_counter() - t0
            r = rec[m]
            r["time"].append(dt)
            r["tokens"].append(batch.tokens)
            r["loss"].append(loss)
            r["nseq"].append(B if batch.cu_seqlens is None else batch.cu_seqlens.numel() - 1)
        if (i + 1) % 10 == 0:
            print(f"step {i + 1:>4}: " + " | ".join(f"{m} loss {rec[m]['loss'][-1]:.3f} {rec[m]['time'][-1]:.2f} s"
                                                      for m in MODES), flush=True)
    train_s = time.perf_counter() - t_all

    rows = {}
    for m in MODES:
        r = rec[m]
        t, n = r["time"][args.warmup:], r["tokens"][args.warmup:]
        p20, p50, p80 = quantiles([k / s for k, s in zip(n, t)])
        rows[m] = {
            "tokens_per_s": sum(n) / sum(t), "tokens_per_s_p20": p20, "tokens_per_s_p50": p50, "tokens_per_s_p80": p80,
            "step_ms_p50": 1e3 * statistics.median(t), "real_tokens_per_step": sum(n) / len(n),
            "slots_per_step": B * T, "docs_per_step": statistics.mean(r["nseq"]),
            # pack: the steps whose rows hold a document boundary run flash_attn_varlen_func, the others the dense
            # causal path (Batch.model_kwargs); their step times apart show what the varlen path costs.
            "timed_steps_with_boundaries": sum(k > B for k in r["nseq"][args.warmup:]),
            "step_ms_p50_with_boundaries": _median_ms(t, r["nseq"][args.warmup:], lambda k: k > B),
            "step_ms_p50_without_boundaries": _median_ms(t, r["nseq"][args.warmup:], lambda k: k == B),
            "train_loss_last10": statistics.mean(r["loss"][-10:]), "train_loss_curve": [round(x, 4) for x in r["loss"]],
            "val_loss_padded_batches": evaluate(models[m], samplers["pad"], args.eval_batches),
            "val_loss_packed_batches": evaluate(models[m], samplers["pack"], args.eval_batches),
        }
    result = {
        "what": "packed vs padded training on the default corpus (stdlib .py files as documents), interleaved steps",
        "env": env,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "threads": args.threads,
        "backend": args.backend,
        "kernels": {op: b for op, (b, _) in sorted(_dispatch.ran().items())},
        "model": args.model, "config": config.to_dict(), "dtype": "float32",
        "shape": {"batch_size": B, "block_size": T, "steps": args.steps, "timed_steps": args.steps - args.warmup},
        "lr": args.lr, "seed": args.seed,
        "corpus": ds.description,
        "padding_fraction_train_epoch": samplers["pad"].padding_fraction(),
        "modes": rows,
        "ratio_tokens_per_s_pack_over_pad": rows["pack"]["tokens_per_s"] / rows["pad"]["tokens_per_s"],
        "ratio_tokens_per_s_p50_pack_over_pad": rows["pack"]["tokens_per_s_p50"] / rows["pad"]["tokens_per_s_p50"],
        "val_loss_diff_pack_minus_pad_padded_batches": rows["pack"]["val_loss_padded_batches"]
        - rows["pad"]["val_loss_padded_batches"],
        "wall_s": round(train_s, 1),
    }
    for m in MODES:
        r = rows[m]
        print(f"{m}: {r['tokens_per_s']:,.0f} real tok/s (p20/p50/p80 {r['tokens_per_s_p20']:,.0f}/"
              f"{r['tokens_per_s_p50']:,.0f}/{r['tokens_per_s_p80']:,.0f}), {r['docs_per_step']:.1f} docs/step, "
              f"train loss {r['train_loss_last10']:.4f}, val loss {r['val_loss_padded_batches']:.4f} (padded val) "
              f"{r['val_loss_packed_batches']:.4f} (packed val)")
    print(f"pack / pad tokens/s: {result['ratio_tokens_per_s_pack_over_pad']:.3f}")
    assert all(math.isfinite(r["train_loss_last10"]) for r in rows.values())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{datetime.date.today().isoformat()}-{args.tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
