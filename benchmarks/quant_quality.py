"""What weight-only quantization costs in quality on a trained model: val loss and greedy-token agreement.

    python benchmarks/quant_quality.py --ckpt runs/<run> [--eval-batches 32] [--new-tokens 256]
                                       [--prompt "def "] [--threads 1] [--out benchmarks/results/cpu]

The checkpoint is one `python -m gptkernels train` writes (its ckpt.pt or run folder; the default run trains the
`mini` preset on the Python standard library's sources). Each format is applied to a fresh copy of the float model
with gptkernels.quantize (lm_head, tied to the token embedding, stays float):

    float                 the checkpoint as trained (fp32)
    int8                  int8 per output channel (absmax)
    int4-g128, int4-g32   int4 in groups of 128 / 32 along K (absmax)
    ...-mse               the same with calibrate="mse" (per-group clip search)

Per format:
    val_loss              mean cross-entropy over --eval-batches val batches of the checkpoint's batch size and
                          block size, drawn as the trainer draws them (same seed, batches 0..N-1: the first 8 are the
                          trainer's own eval batches), the same batches for every format
    val_loss_rel          (val_loss - float's) / float's
    logits_rel_err        ||logits - float's|| / ||float's|| over every val position (the spec's logits error)
    val_top1_agreement    share of val positions where the argmax token equals float's (teacher-forced)
    greedy_agreement      greedy decoding of --new-tokens tokens from --prompt (bytes) without a KV cache (the
                          context is cropped to the block size): share of positions equal to float's tokens, and the
                          first position that differs (None: none does)
Targets checked: int8 val loss within 0.5% of float, int4 g128 within 3%.
"""

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an installed gptkernels
import gptkernels  # noqa: E402
from gptkernels.bench.env import fingerprint  # noqa: E402
from gptkernels.data import BatchSampler  # noqa: E402
from gptkernels.data import load as load_data  # noqa: E402
from gptkernels.generate import load_checkpoint  # noqa: E402

# name -> (bits, group_size, calibrate)
FORMATS = {
    "int8": (8, None, None),
    "int4-g128": (4, 128, None),
    "int4-g128-mse": (4, 128, "mse"),
    "int4-g32": (4, 32, None),
    "int4-g32-mse": (4, 32, "mse"),
}
TARGETS = {"int8": 0.005, "int4-g128": 0.03}  # relative val-loss increase allowed


def val_pass(model, batches, ref_logits=None):
    """(mean loss, argmax tokens (N, B, T), logits per batch, ||logits - ref|| / ||ref|| over all batches or None)."""
    losses, tops, all_logits = [], [], []
    d2 = r2 = 0.0
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            logits, _ = model(x)  # (B, T, V)
            losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
            tops.append(logits.argmax(-1))
            if ref_logits is None:
                all_logits.append(logits)
            else:
                d2 += (logits.double() - ref_logits[i].double()).pow(2).sum().item()
                r2 += ref_logits[i].double().pow(2).sum().item()
    rel = (d2 / r2) ** 0.5 if ref_logits is not None else None
    return sum(losses) / len(losses), torch.stack(tops), all_logits, rel


def greedy(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(prompt, new_tokens, temperature=0.0, use_cache=False)
    return out[0, prompt.shape[1]:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a ckpt.pt written by python -m gptkernels train, or its run folder")
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/cpu")
    ap.add_argument("--tag", default="quant-quality")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    float_model, info = load_checkpoint(args.ckpt)
    float_model.eval()
    cfg = float_model.config
    ckpt = torch.load(info["path"], map_location="cpu", weights_only=False)  # the run's arguments (data, batches)
    targs = ckpt["args"]
    data = load_data(targs.get("data"), targs.get("corpus_bytes") or 10_000_000)
    sampler = BatchSampler(data, cfg.block_size, targs["batch_size"], targs["seed"], cfg.vocab_size)
    batches = [sampler.get("val", k) for k in range(args.eval_batches)]
    prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long)

    t0 = time.perf_counter()
    f_loss, f_top, f_logits, _ = val_pass(float_model, batches)
    f_tokens = greedy(float_model, prompt, args.new_tokens)
    rows = [{"format": "float", "bits": None, "group_size": None, "calibrate": None, "val_loss": f_loss,
             "val_loss_rel": 0.0, "logits_rel_err": 0.0, "val_top1_agreement": 1.0, "greedy_agreement": 1.0,
             "first_divergence": None,
             "layers_quantized": 0, "weight_bytes_before": None, "weight_bytes_after": None,
             "seconds": round(time.perf_counter() - t0, 1)}]
    print(f"float: val loss {f_loss:.4f}", flush=True)
    for name in [f.strip() for f in args.formats.split(",") if f.strip()]:
        bits, group, cal = FORMATS[name]
        t0 = time.perf_counter()
        model = copy.deepcopy(float_model)
        report = gptkernels.quantize(model, bits, group, calibrate=cal)
        loss, top, _, rel = val_pass(model, batches, f_logits)
        tokens = greedy(model, prompt, args.new_tokens)
        diff = (tokens != f_tokens).nonzero()
        row = {"format": name, "bits": bits, "group_size": group, "calibrate": cal, "val_loss": loss,
               "val_loss_rel": (loss - f_loss) / f_loss, "logits_rel_err": rel,
               "val_top1_agreement": (top == f_top).double().mean().item(),
               "greedy_agreement": (tokens == f_tokens).double().mean().item(),
               "first_divergence": int(diff[0, 0]) if len(diff) else None,
               "layers_quantized": len(report.quantized), "layers_skipped": [e.name for e in report.skipped],
               "weight_bytes_before": report.bytes_before, "weight_bytes_after": report.bytes_after,
               "seconds": round(time.perf_counter() - t0, 1)}
        if name in TARGETS:
            row["target_val_loss_rel"] = TARGETS[name]
            row["target_met"] = row["val_loss_rel"] <= TARGETS[name]
        rows.append(row)
        print(f"{name}: val loss {loss:.4f} ({100 * row['val_loss_rel']:+.2f}%), logits rel err {rel:.4f}, top-1 "
              f"{100 * row['val_top1_agreement']:.1f}%, greedy {100 * row['greedy_agreement']:.1f}% (first diff "
              f"{row['first_divergence']}), {len(report.quantized)} layers", flush=True)

    result = {
        "kind": "gptkernels.quant_quality",
        "checkpoint": os.fspath(info["path"]),
        "checkpoint_step": info["iter"],
        "config": cfg.to_dict(),
        "data": data.description,
        "eval": {"batches": args.eval_batches, "batch_size": targs["batch_size"], "block_size": cfg.block_size,
                 "seed": targs["seed"], "tokens": args.eval_batches * targs["batch_size"] * cfg.block_size},
        "greedy": {"prompt": args.prompt, "new_tokens": args.new_tokens, "kv_cache": False},
        "targets": TARGETS,
        "env": fingerprint(torch.device("cpu"), ["python", "benchmarks/quant_quality.py", *(argv or sys.argv[1:])]),
        "rows": rows,
    }
    out = Path(args.out) / f"{datetime.date.today().isoformat()}-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"json: {out}")


if __name__ == "__main__":
    main()
