"""Tokens/s of a Hugging Face GPT-2 before and after ``gptkernels.patch``: one training step and greedy generation.

    python benchmarks/bench_patch.py                       # small random GPT-2, CPU, < 1 min
    python benchmarks/bench_patch.py --n-embd 768 --n-layer 12 --n-head 12 --seq 512   # GPT-2 small shapes

The model is random (built from a config, offline). Before timing, ``gptkernels.verify`` checks the patched model's
logits and every gradient against a float64 copy of the unpatched one; a failing check is recorded and the run
exits 1. Providers: ``hf-sdpa`` (the unpatched model, transformers' default attention) and ``gptkernels-patch``
(the same model after ``gptkernels.patch``; backend automatic). Modes:

    train_step: forward + loss + backward + AdamW step on (batch, seq) tokens; tokens/s = batch * seq / time
    generate:   model.generate(greedy, KV cache) of --new-tokens after a --prompt-tokens prompt, batch --gen-batch;
                tokens/s = gen_batch * new_tokens / time (prefill included in the time)

Timing: torch.utils.benchmark Timer.blocked_autorange (warm-up call first), p20/p50/p80 over its samples.
Writes benchmarks/results/<device>/<date>-patch.json (environment fingerprint from gptkernels.bench.env).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys

import torch
import torch.utils.benchmark as tb

import gptkernels
from gptkernels.bench.env import fingerprint

HERE = os.path.dirname(os.path.abspath(__file__))


def quantiles(times):
    t = torch.tensor(sorted(times), dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8)]


def time_it(fn, min_run_time):
    fn()  # warm-up: first-call allocations, lazy init
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < 3:  # a slow step gives blocked_autorange few samples: top up for the quantiles
        times += tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(1).times
    return quantiles(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timed case")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/<date>-patch.json)")
    args = ap.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    device = torch.device("cpu")
    dtype = torch.float32
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=max(args.seq, args.prompt_tokens +
                                                                           args.new_tokens),
                                  n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).to(device, dtype)
    patched = copy.deepcopy(base)
    report = gptkernels.patch(patched)
    print(report)

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    check = gptkernels.verify(base, patched, {"input_ids": ids[:, :64], "labels": ids[:, :64]})
    print(check if not check.ok else f"verify: OK ({len(check.rows)} tensors within bounds)")

    prompt = torch.randint(0, args.vocab, (args.gen_batch, args.prompt_tokens), device=device)
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
    rows = []
    for provider, model in (("hf-sdpa", base), ("gptkernels-patch", patched)):
        model = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = [t * 1e3 for t in time_it(train_step, args.min_run_time)]
        rows.append({"op": "gpt2_model", "provider": provider, "mode": "train_step",
                     "shape": {"batch": args.batch, "seq": args.seq}, "tokens": args.batch * args.seq,
                     "ms_p20": ms[0], "ms_p50": ms[1], "ms_p80": ms[2],
                     "tokens_per_s": args.batch * args.seq / (ms[1] / 1e3)})
        model.eval()

        def generate(model=model):
            with torch.no_grad():
                out = model.generate(prompt, **gen_kw)
            assert out.shape[1] == args.prompt_tokens + args.new_tokens

        ms = [t * 1e3 for t in time_it(generate, args.min_run_time)]
        rows.append({"op": "gpt2_model", "provider": provider, "mode": "generate",
                     "shape": {"batch": args.gen_batch, "prompt": args.prompt_tokens, "new": args.new_tokens},
                     "tokens": args.gen_batch * args.new_tokens, "ms_p20": ms[0], "ms_p50": ms[1], "ms_p80": ms[2],
                     "tokens_per_s": args.gen_batch * args.new_tokens / (ms[1] / 1e3)})
        print(f"{provider:<17} train_step {rows[-2]['tokens_per_s']:9.0f} tok/s   generate "
              f"{rows[-1]['tokens_per_s']:7.1f} tok/s")
    base_rows = {r["mode"]: r for r in rows if r["provider"] == "hf-sdpa"}
    for r in rows:
        r["speedup_vs_unpatched"] = base_rows[r["mode"]]["ms_p50"] / r["ms_p50"]
        r["dtype"] = str(dtype).replace("torch.", "")
    with torch.no_grad():
        patched(ids[:, :8])
    result = {
        "schema": "gptkernels-bench-patch/1",
        "env": {**fingerprint(device, sys.argv if argv is None else argv),
                "transformers": transformers.__version__},
        "config": {"model": "GPT2LMHeadModel (random)", "n_embd": args.n_embd, "n_layer": args.n_layer,
                   "n_head": args.n_head, "vocab": args.vocab, "dtype": str(dtype).replace("torch.", ""),
                   "min_run_time_s": args.min_run_time,
                   "timer": "torch.utils.benchmark blocked_autorange, p20/p50/p80 of its samples"},
        "patch_report": report.to_dicts(),
        "explain": gptkernels.explain().splitlines(),
        "verify_ok": check.ok,
        "rows": rows,
    }
    out = args.out or os.path.join(HERE, "results", device.type,
                                   f"{datetime.date.today().isoformat()}-patch.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
