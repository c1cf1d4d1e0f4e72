"""The trainer's options: the argparse definitions, the defaults by device, and their resolution (explicit option >
the checkpoint's on --resume > device default), with one-line errors that name the option."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from gptkernels import _dispatch
from gptkernels import data as gkdata
from gptkernels.model import PRESETS, GPTConfig
from gptkernels.training.checkpoint import find_checkpoint, load_checkpoint

# Defaults by device type. CPU: measured on a 2-core x86 VM (torch 2.14, C++ backend, fp32): mini at 16 x 256
# tokens runs ~210 ms/step (~19k tok/s), so 400 steps take about 1.5 minutes and bring the val loss from 5.5 to ~2.
DEFAULTS = {
    "cpu": dict(model="mini", block_size=256, batch_size=16, grad_accum=1, steps=400, lr=1e-3, warmup=20,
                eval_every=100, eval_steps=8, log_every=10, ckpt_every=200, dtype="fp32"),
    "cuda": dict(model="gpt2", block_size=1024, batch_size=32, grad_accum=1, steps=1000, lr=6e-4, warmup=100,
                 eval_every=250, eval_steps=20, log_every=10, ckpt_every=500, dtype="bf16"),
}
COMMON_DEFAULTS = dict(weight_decay=0.1, grad_clip=1.0, seed=1337, dropout=0.0, corpus_bytes=gkdata.DEFAULT_MAX_BYTES,
                       compile=False, no_progress=False, docs="concat")
# Not taken from a checkpoint's arguments on --resume: where and how this process runs, not what it trains.
NOT_INHERITED = ("resume", "out_dir", "device", "backend", "compile", "no_progress", "stop_at")
# The options that fix the model: a resumed run may not change them.
IDENTITY = ("model", "block_size", "vocab_size", "dropout")


class TrainConfigError(ValueError):
    """A bad argument or combination of arguments; the message starts with the option's name."""


def add_arguments(p: argparse.ArgumentParser, data_help: str | None = None) -> None:
    """The trainer's options. Defaults are None here and resolved per device (see DEFAULTS) or from --resume."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PRESET", help=f"model preset: {', '.join(PRESETS)} (default: mini on CPU, "
                   "gpt2 on CUDA)")
    g.add_argument("--block-size", type=int, help="context length in tokens (default: 256 on CPU, 1024 on CUDA)")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (default: the data's: 256 bytes, 50257 .bin)")
    g.add_argument("--dropout", type=float, help="dropout probability (default 0)")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE", help=data_help or "a text file (trained as bytes), a uint16 .bin token "
                   "file, or a folder with train.bin and val.bin (default: this Python's stdlib .py sources)")
    g.add_argument("--corpus-bytes", type=int, help="cap of the default stdlib corpus in bytes (default 10e6)")
    g.add_argument("--docs", choices=gkdata.DOC_MODES, help="how documents (the corpus's files; the documents of a "
                   ".bin) fill the rows: concat: windows across document boundaries (default); pack: the same "
                   "windows, EOT-separated, attention within each document only; pad: one document chunk per row, "
                   "padded, padding out of the loss")
    g.add_argument("--pack", dest="docs", action="store_const", const="pack", help="same as --docs pack")
    g.add_argument("--pad", dest="docs", action="store_const", const="pad", help="same as --docs pad")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, help="sequences per micro-step, summed over all ranks (default: 16 on "
                   "CPU, 32 on CUDA)")
    g.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--steps", type=int, help="optimizer steps of the whole run (default: 400 on CPU, 1000 on CUDA)")
    g.add_argument("--stop-at", type=int, metavar="STEP", help="end this run at STEP (checkpointed) without changing "
                   "the schedule; continue later with --resume")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 on CPU, 6e-4 on CUDA)")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default: lr / 10)")
    g.add_argument("--warmup", type=int, help="linear warmup steps (default: 5%% of --lr-decay-steps, at most 20, on "
                   "CPU; 10%%, at most 100, on CUDA)")
    g.add_argument("--lr-decay-steps", type=int, help="step where the cosine reaches --min-lr (default: --steps)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this; 0 disables (default 1.0)")
    g.add_argument("--seed", type=int, help="seed of the initialization and the batches (default 1337)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--eval-every", type=int, help="val loss every N steps, and at the end; 0: only at the end")
    g.add_argument("--eval-steps", type=int, help="val batches per evaluation (default: 8 on CPU, 20 on CUDA)")
    g.add_argument("--log-every", type=int, help="log the train loss every N steps (default 10)")
    g.add_argument("--ckpt-every", type=int, help="checkpoint every N steps, and at the end; 0: only at the end")
    g.add_argument("--out-dir", help="where log.jsonl, loss.png and ckpt.pt go (default: runs/<timestamp>)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH", help="continue from a checkpoint: a ckpt.pt, "
                   "a run folder, or with no PATH the --out-dir's (else the newest runs/*/ckpt.pt)")
    g.add_argument("--no-progress", action="store_true", default=None, help="plain log lines, no progress bar")
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--backend", choices=[*_dispatch.BACKENDS, "auto"], help="gptkernels backend (default: auto, "
                   "the C++ kernels on CPU)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 "
                   "on CPU)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")


def parser(add=add_arguments, prog: str = "python -m gptkernels.train", doc: str | None = None):
    """A parser of one command's options: ``add(parser)`` defines them."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add(p)
    return p


def namespace(args_or_config, overrides: dict, add=add_arguments, command: str = "train") -> argparse.Namespace:
    """An argparse.Namespace with every option that ``add`` defines, from a Namespace, a dict of option names, or
    keywords."""
    ns = parser(add).parse_args([])
    if args_or_config is None:
        given = {}
    elif isinstance(args_or_config, argparse.Namespace):
        given = vars(args_or_config)
    elif isinstance(args_or_config, dict):
        given = dict(args_or_config)
    else:
        raise TypeError(f"{command}: expected an argparse.Namespace or a dict of options, got "
                        f"{type(args_or_config).__name__}")
    known = set(vars(ns))
    if isinstance(args_or_config, argparse.Namespace):  # a wrapping CLI adds its own keys (the subcommand, ...)
        given = {k: v for k, v in given.items() if k in known}
    given.update(overrides)
    bad = sorted(k for k in given if k.replace("-", "_") not in known)
    if bad:
        raise TrainConfigError(f"{command}: unknown option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    for k, v in given.items():
        setattr(ns, k.replace("-", "_"), v)
    return ns


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve(ns, dist, device: torch.device, defaults: dict | None = None, presets=PRESETS):
    """Fill every None option: explicit > the checkpoint's arguments (on --resume) > ``defaults`` (default: the
    trainer's for this device type). Validate; ``presets``: the --model names this command accepts.
    Returns (args, checkpoint or None, checkpoint path or None)."""
    ckpt = ckpt_path = None
    if ns.resume:
        ckpt_path = find_checkpoint(ns)
        ckpt = load_checkpoint(ckpt_path)
        saved_cfg = ckpt["config"]
        for name in IDENTITY:
            mine, theirs = getattr(ns, name), ckpt["args"].get(name) if name == "model" else saved_cfg.get(name)
            if mine is not None and mine != theirs:
                raise TrainConfigError(f"{flag(name)} {mine!r} differs from the checkpoint's ({theirs!r}); the "
                                       f"model of a resumed run cannot change")
        for k, v in ckpt["args"].items():
            if k not in NOT_INHERITED and getattr(ns, k, None) is None:
                setattr(ns, k, v)
        if ns.out_dir is None:
            ns.out_dir = os.path.dirname(os.path.abspath(ckpt_path))
    if defaults is None:
        defaults = {**DEFAULTS[device.type], **COMMON_DEFAULTS}
    for k, v in defaults.items():
        if getattr(ns, k) is None and k != "warmup":
            setattr(ns, k, v)
    if ns.min_lr is None:
        ns.min_lr = ns.lr / 10
    if ns.lr_decay_steps is None:
        ns.lr_decay_steps = ns.steps
    if ns.warmup is None:  # the default's share of the default run; a 20-step run would otherwise never leave warmup
        if isinstance(ns.lr_decay_steps, int):
            ns.warmup = min(defaults["warmup"], ns.lr_decay_steps * defaults["warmup"] // defaults["steps"])
        else:
            ns.warmup = defaults["warmup"]  # validate names the bad --lr-decay-steps
    if ns.backend == "auto":
        ns.backend = None
    if ns.out_dir is None:
        ns.out_dir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    validate(ns, dist, device, presets)
    return ns, ckpt, ckpt_path


def validate(ns, dist, device: torch.device, presets=PRESETS):
    def need(ok, name, msg):
        if not ok:
            raise TrainConfigError(f"{flag(name)} {getattr(ns, name)!r}: {msg}")

    for name in ("block_size", "batch_size", "grad_accum", "steps", "eval_steps", "log_every", "lr_decay_steps"):
        v = getattr(ns, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "must be a positive integer")
    for name in ("warmup", "eval_every", "ckpt_every", "corpus_bytes"):
        v = getattr(ns, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "must be an integer >= 0")
    need(ns.model in presets, "model", f"unknown preset; known: {', '.join(PRESETS)}")
    need(ns.vocab_size is None or (isinstance(ns.vocab_size, int) and ns.vocab_size >= 1), "vocab_size",
         "must be a positive integer")
    need(ns.stop_at is None or (isinstance(ns.stop_at, int) and 1 <= ns.stop_at <= ns.steps), "stop_at",
         f"must be in [1, --steps={ns.steps}]")
    need(isinstance(ns.lr, (int, float)) and ns.lr > 0 and math.isfinite(ns.lr), "lr", "must be a positive number")
    need(isinstance(ns.min_lr, (int, float)) and 0 <= ns.min_lr <= ns.lr, "min_lr", f"must be in [0, --lr={ns.lr}]")
    need(ns.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(ns.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
    need(0 <= ns.dropout < 1, "dropout", "must be in [0, 1)")
    need(ns.dtype in ("fp32", "bf16"), "dtype", "must be fp32 or bf16")
    need(ns.docs in gkdata.DOC_MODES, "docs", f"must be one of {', '.join(gkdata.DOC_MODES)}")
    if ns.dtype == "bf16" and device.type == "cuda":
        need(torch.cuda.is_bf16_supported(), "dtype", f"{torch.cuda.get_device_name(device)} has no bf16")
    need(ns.batch_size % dist.world == 0, "batch_size", f"must be divisible by the number of ranks ({dist.world}); "
         "it is the global batch per micro-step")
    if ns.backend is not None:
        try:
            why = _dispatch.backend_reason(ns.backend, device)
        except ValueError as e:
            raise TrainConfigError(f"--backend {ns.backend!r}: {e}") from None
        need(why is None, "backend", f"cannot run on {device}: {why}")


def model_config(ns, ckpt, vocab_size: int) -> GPTConfig:
    try:
        if ckpt is not None:
            return GPTConfig(**ckpt["config"])
        return GPTConfig.preset(ns.model, block_size=ns.block_size, vocab_size=ns.vocab_size or vocab_size,
                                dropout=ns.dropout)
    except ValueError as e:
        raise TrainConfigError(f"--model {ns.model}: bad configuration: {e}") from None


def run_command(name: str, fn, args) -> int:
    """``fn(args)`` for ``python -m gptkernels <name>``: a user mistake (bad option, checkpoint or data file) prints
    one line and returns 2 instead of a traceback."""
    from gptkernels.training.checkpoint import CheckpointError

    try:
        fn(args)
    except (TrainConfigError, CheckpointError, gkdata.DataError, FileNotFoundError) as e:
        print(f"gptkernels {name}: error: {e}", file=sys.stderr)
        return 2
    return 0


def module_main(name: str, argv=None) -> int:
    """``python -m gptkernels.<name>`` (and torchrun -m): the same as ``python -m gptkernels <name>``."""
    from gptkernels.cli import main as cli_main

    return cli_main([name, *(sys.argv[1:] if argv is None else argv)])
