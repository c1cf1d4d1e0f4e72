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

Timing: one warm-up call each, then the two providers take turns call by call (so load on the machine hits both
alike) until each has had --min-run-time seconds and 5 calls; p20/p50/p80 of the per-call times. Greedy generation
must give identical tokens patched and unpatched (recorded; the run exits 1 otherwise).
Writes benchmarks/results/<device>/<date>-patch.json (environment fingerprint from gptkernels.bench.env).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch

import gptkernels
from gptkernels.bench.env import fingerprint

HERE = os.path.dirname(os.path.abspath(__file__))


def quantiles(times):
    t = torch.tensor(sorted(times), dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8)]


def time_interleaved(fns: dict, min_run_time):
    """p20/p50/p80 ms per call of each provider, the providers taking turns call by call (a change of machine load
    hits them alike). Runs until each has had ``min_run_time`` seconds and at least 5 calls."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocations, lazy init
    times = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    while min(spent.values()) < min_run_time or min(len(t) for t in times.values()) < 5:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[name].append(dt * 1e3)
            spent[name] += dt
    return {name: quantiles(t) for name, t in times.items()}


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
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; use 1 when other work shares the cores)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/<date>-patch.json)")
    args = ap.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    providers = {"hf-sdpa": base, "gptkernels-patch": patched}
    train_fns, gen_fns, tokens = {}, {}, {}
    for provider, model in providers.items():
        model = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train_fns[provider] = train_step
        gen_model = copy.deepcopy(providers[provider]).eval()

        def generate(model=gen_model):
            with torch.no_grad():
                out = model.generate(prompt, **gen_kw)
            assert out.shape[1] == args.prompt_tokens + args.new_tokens
            return out

        gen_fns[provider] = generate
        tokens[provider] = generate()
    same_tokens = torch.equal(tokens["hf-sdpa"], tokens["gptkernels-patch"])
    print(f"greedy tokens identical: {same_tokens}")
    rows = []
    for mode, fns in (("train_step", train_fns), ("generate", gen_fns)):
        for provider, ms in time_interleaved(fns, args.min_run_time).items():
            if mode == "train_step":
                rows.append({"op": "gpt2_model", "provider": provider, "mode": mode,
                             "shape": {"batch": args.batch, "seq": args.seq}, "tokens": args.batch * args.seq,
                             "ms_p20": ms[0], "ms_p50": ms[1], "ms_p80": ms[2],
                             "tokens_per_s": args.batch * args.seq / (ms[1] / 1e3)})
            else:
                rows.append({"op": "gpt2_model", "provider": provider, "mode": mode,
                             "shape": {"batch": args.gen_batch, "prompt": args.prompt_tokens, "new": args.new_tokens},
                             "tokens": args.gen_batch * args.new_tokens, "ms_p20": ms[0], "ms_p50": ms[1],
                             "ms_p80": ms[2], "tokens_per_s": args.gen_batch * args.new_tokens / (ms[1] / 1e3),
                             "tokens_identical": same_tokens})
    for r in rows:
        print(f"{r['provider']:<17} {r['mode']:<10} {r['tokens_per_s']:9.1f} tok/s  p50 {r['ms_p50']:.2f} ms")
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
                   "timer": "interleaved per-call perf_counter, p20/p50/p80"},
        "patch_report": report.to_dicts(),
        "explain": gptkernels.explain().splitlines(),
        "verify_ok": check.ok,
        "greedy_tokens_identical": same_tokens,
        "rows": rows,
    }
    out = args.out or os.path.join(HERE, "results", device.type,
                                   f"{datetime.date.today().isoformat()}-patch.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0 if check.ok and same_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
