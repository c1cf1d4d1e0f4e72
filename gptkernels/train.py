"""Train a GPT on gptkernels: python -m gptkernels train (or python -m gptkernels.train).

With no arguments it trains a small byte-level model on the Python standard library's own sources, a corpus every
machine has (see gptkernels/data.py), with defaults chosen by device: on CPU the mini preset with the C++ kernels
in fp32, on CUDA gpt2 (124M at vocab 50257; 85M at the byte vocab) in bf16 autocast.

    AdamW (fused on CUDA) | linear warmup + cosine decay to --min-lr | gradient clipping | gradient accumulation
    periodic val loss | tokens/s and MFU | progress bar | log.jsonl + loss.png + ckpt.pt in --out-dir

This file is the command; the machinery it shares with finetune lives in gptkernels/training/: args.py (options,
defaults, resolution), dist.py (ranks, DDP), checkpoint.py (finding, reading, atomic writing), schedule.py (LR),
peak.py (the peak FLOP/s of MFU), output.py (printing, log.jsonl, loss plot) and loop.py (the training loop).

Batches: --batch-size sequences of --block-size tokens per micro-step in total over all ranks, --grad-accum
micro-steps per optimizer step; so the same command does the same math on one process or under
torchrun --nproc_per_node=N -m gptkernels.train (DistributedDataParallel: NCCL on GPU, gloo on CPU), where each
rank takes its slice of every global batch.

Documents (--docs, default concat): concat trains on windows of the concatenated corpus, across document
boundaries, as nanoGPT does. pack (or --pack) separates the documents with an EOT token and draws the same kind
of windows, but each row attends only within each of its documents (boundaries found on the host from the EOT
positions, passed to the model as cu_seqlens; positions restart at every document) and pays nothing for padding.
pad (or --pad) is packing's baseline: each document chunk of at most block_size tokens in a row of its own,
padded, the padding left out of the loss. In pad mode tokens/s and MFU count the real (non-padding) tokens only.

Checkpoints (atomic: a temp file in --out-dir, then os.replace) hold everything a run depends on: model, optimizer,
step, model config, train arguments, RNG states and the data position. --resume continues bit-exactly: on CPU in
fp32 the resumed loss curve is identical to an uninterrupted one. --stop-at ends a run early (checkpointed)
without changing the LR schedule. --resume, and generate's --ckpt, take a ckpt.pt or the run folder that holds it.

log.jsonl, one JSON object per line (only rank 0 writes):
    {"kind": "start", "step", "time", "world", "device", "threads", "config", "args", "peak_flops", "resumed_from"}
    {"kind": "train", "step", "loss", "lr", "tokens_per_s", "mfu", "elapsed", "grad_norm"}   every --log-every steps
    {"kind": "eval", "step", "val_loss", "elapsed"}                                          every --eval-every steps
"step" counts finished optimizer steps; "loss" is that step's loss (mean over micro-steps and ranks); tokens/s and
MFU cover the steps since the previous train row, without eval and checkpoint time; "elapsed" is seconds of wall
time since step 0, summed over resumed runs. MFU = flops_per_token * tokens/s / (peak FLOP/s per rank * ranks).
"""


from __future__ import annotations

import os

import torch

from gptkernels import data as gkdata
from gptkernels.model import GPT
from gptkernels.training import loop

# The trainer's public names stay importable from here (generate, the tests and the benchmarks use them).
from gptkernels.training.args import (  # noqa: F401
    COMMON_DEFAULTS,
    DEFAULTS,
    NOT_INHERITED,
    TrainConfigError,
    add_arguments,
    module_main,
    namespace,
    parser,
    run_command,
)
from gptkernels.training.args import model_config as _model_config
from gptkernels.training.args import resolve as _resolve
from gptkernels.training.checkpoint import (  # noqa: F401
    CKPT_FORMAT,
    CKPT_HINT,
    CKPT_NAME,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    torch_load,
)
from gptkernels.training.checkpoint import set_rng_state as _set_rng_state
from gptkernels.training.dist import Dist as _Dist
from gptkernels.training.dist import resolve_device as _resolve_device
from gptkernels.training.output import LOG_NAME, PLOT_NAME, plot_losses, read_log  # noqa: F401
from gptkernels.training.peak import GPU_PEAK_FLOPS, measure_cpu_peak, peak_flops  # noqa: F401
from gptkernels.training.schedule import lr_at, lr_summary  # noqa: F401


def _parser():
    return parser(add_arguments, "python -m gptkernels.train", __doc__)


def _namespace(args_or_config, overrides: dict):
    return namespace(args_or_config, overrides)


# -------------------------------------------------------------------------------------------------------- train
def train(args_or_config=None, **overrides) -> dict:
    """Train with the given options (an argparse.Namespace, a dict of option names, or keywords, e.g.
    train(model="tiny", block_size=32, steps=10)); missing ones take the device defaults.

    Returns the final metrics: steps, train_loss (last logged), val_loss (last eval), tokens_per_s and mfu (of this
    run's training time), elapsed, out_dir, log, checkpoint, plot (paths), config (the model's, a dict).
    Raises TrainConfigError, CheckpointError or gptkernels.data.DataError (ValueErrors) or FileNotFoundError for bad
    arguments, checkpoints and data, naming the option.
    """
    ns = _namespace(args_or_config, overrides)
    dist = _Dist()
    device = _resolve_device(ns, dist)
    dist.init(device)
    try:
        return _train(ns, dist, device)
    finally:
        dist.close()


def _train(ns, dist: _Dist, device: torch.device) -> dict:
    args, ckpt, ckpt_path = _resolve(ns, dist, device)
    save_path = os.path.join(args.out_dir, CKPT_NAME)
    if ckpt is None and os.path.exists(save_path):
        raise TrainConfigError(f"--out-dir {args.out_dir!r} already holds a checkpoint ({CKPT_NAME}); continue it with "
                               f"--resume or choose another --out-dir")
    # Raises DataError or FileNotFoundError naming --data.
    dataset = gkdata.load(args.data, args.corpus_bytes, docs=args.docs != "concat")
    config = _model_config(args, ckpt, dataset.vocab_size)
    sampler = gkdata.make_sampler(dataset, args.docs, config.block_size, args.batch_size, args.seed,
                                  config.vocab_size)

    torch.manual_seed(args.seed)  # the same initialization on every rank
    raw = GPT(config, backend=args.backend).to(device)
    optimizer = raw.configure_optimizer(args.lr, args.weight_decay, (0.9, 0.95), device.type)
    step, batches, prev_elapsed = 0, 0, 0.0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, batches, prev_elapsed = ckpt["step"], ckpt["data"]["batches_drawn"], ckpt["elapsed"]
        _set_rng_state(ckpt["rng"], device)
        del ckpt

    B, T, A, W = args.batch_size, config.block_size, args.grad_accum, dist.world
    tokens_per_step = B * T * A
    flops_per_token = raw.flops_per_token(T)
    banner = [f"model {args.model}: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, block {T}, "
              f"vocab {config.vocab_size}: {raw.num_params() / 1e6:.2f}M params, "
              f"{flops_per_token / 1e6:.1f} MFLOP/token",
              f"data: {dataset.description}: train {len(dataset.train):,} tokens, val {len(dataset.val):,}"]
    if args.docs == "pad":
        banner.append(f"docs: pad, one document chunk per row; padding fills {100 * sampler.padding_fraction():.1f}% "
                      f"of the train slots and counts in neither the loss nor tokens/s")
    elif args.docs == "pack":
        banner.append("docs: pack, EOT-separated documents; attention within each document, positions restart at each")
    total = tokens_per_step * args.steps
    per_rank = f" ({B // W} per rank)" if W > 1 else ""
    slots = " slots (real tokens fewer by the padding)" if args.docs == "pad" else ""
    banner.append(f"batch: {B}{per_rank} x {T} tokens x {A} accum = {tokens_per_step:,} tokens{slots}/step; "
                  f"{args.steps} steps = {total:,} tokens ({total / len(dataset.train):.2f} epochs); "
                  f"{lr_summary(args)}")

    def step_loss(model, b):
        return model(b.x, b.y, **b.model_kwargs())[1]

    def evaluate(model, amp):
        total = torch.zeros((), device=device)
        for k in range(args.eval_steps):  # the same val batches every time: evals are comparable
            b = sampler.get_batch("val", k, dist.rank, W, device)
            with amp():
                total += model(b.x, b.y, **b.model_kwargs())[1].float()
        return {"val_loss": dist.mean(total / args.eval_steps).item()}

    job = loop.Job("train", args, raw, optimizer, sampler, step_loss, evaluate, config.to_dict(), flops_per_token,
                   tokens_per_step, dataset.source, banner,
                   plot_title=f"{args.model} ({config.n_layer}L {config.n_embd}C, block {T}) on {dataset.source}",
                   step=step, batches=batches, prev_elapsed=prev_elapsed, resumed_from=ckpt_path)
    metrics = loop.run(job, dist, device)
    del metrics["eval"]
    return metrics


# ---------------------------------------------------------------------------------------------------------- CLI
def run(args) -> int:
    """python -m gptkernels train: train with parsed arguments; a user mistake prints one line and returns 2."""
    return run_command("train", train, args)


def main(argv=None) -> int:
    """python -m gptkernels.train (and torchrun -m gptkernels.train): the same as python -m gptkernels train."""
    return module_main("train", argv)


if __name__ == "__main__":
    raise SystemExit(main())
