"""Train a GPT on gptkernels: python -m gptkernels train (or python -m gptkernels.train).

With no arguments it trains a small byte-level model on the Python standard library's own sources, a corpus every
machine has (see gptkernels/data.py), with defaults chosen by device: on CPU the mini preset with the C++ kernels
in fp32, on CUDA gpt2 (124M at vocab 50257; 85M at the byte vocab) in bf16 autocast.

    AdamW (fused on CUDA) | linear warmup + cosine decay to --min-lr | gradient clipping | gradient accumulation
    periodic val loss | tokens/s and MFU | progress bar | log.jsonl + loss.png + ckpt.pt in --out-dir

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

import argparse
import contextlib
import glob
import json
import math
import os
import sys
import tempfile
import time

import torch

from gptkernels import _dispatch, _runtime
from gptkernels import data as gkdata
from gptkernels.model import GPT, PRESETS, GPTConfig

CKPT_NAME, LOG_NAME, PLOT_NAME = "ckpt.pt", "log.jsonl", "loss.png"
CKPT_FORMAT = 1

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

# Dense peak FLOP/s per GPU name fragment: bf16 tensor cores, and plain fp32 (what an fp32 run gets without TF32).
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},  # before "H100": the first matching fragment wins
    "H100 NVL": {"bf16": 835e12, "fp32": 60e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


class TrainConfigError(ValueError):
    """A bad argument or combination of arguments; the message starts with the option's name."""


class CheckpointError(ValueError):
    """A file that is no usable checkpoint; the message names the option, says what the file is and what a checkpoint
    looks like."""


# ------------------------------------------------------------------------------------------------------ arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's options. Defaults are None here and resolved per device (see DEFAULTS) or from --resume."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PRESET", help=f"model preset: {', '.join(PRESETS)} (default: mini on CPU, "
                   "gpt2 on CUDA)")
    g.add_argument("--block-size", type=int, help="context length in tokens (default: 256 on CPU, 1024 on CUDA)")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (default: the data's: 256 bytes, 50257 .bin)")
    g.add_argument("--dropout", type=float, help="dropout probability (default 0)")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE", help="a text file (trained as bytes), a uint16 .bin token file, or a "
                   "folder with train.bin and val.bin (default: this Python's stdlib .py sources)")
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptkernels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _namespace(args_or_config, overrides: dict) -> argparse.Namespace:
    """An argparse.Namespace with every option, from a Namespace, a dict of option names, or keywords."""
    ns = _parser().parse_args([])
    if args_or_config is None:
        given = {}
    elif isinstance(args_or_config, argparse.Namespace):
        given = vars(args_or_config)
    elif isinstance(args_or_config, dict):
        given = dict(args_or_config)
    else:
        raise TypeError(f"train: expected an argparse.Namespace or a dict of options, got "
                        f"{type(args_or_config).__name__}")
    known = set(vars(ns))
    if isinstance(args_or_config, argparse.Namespace):  # a wrapping CLI adds its own keys (the subcommand, ...)
        given = {k: v for k, v in given.items() if k in known}
    given.update(overrides)
    bad = sorted(k for k in given if k.replace("-", "_") not in known)
    if bad:
        raise TrainConfigError(f"train: unknown option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    for k, v in given.items():
        setattr(ns, k.replace("-", "_"), v)
    return ns


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------------ distributed
class _Dist:
    """Rank, world size and device of this process; DDP when torchrun set WORLD_SIZE > 1."""

    def __init__(self):
        env = os.environ
        self.world = int(env.get("WORLD_SIZE", "1")) if "RANK" in env else 1
        self.rank = int(env["RANK"]) if self.world > 1 else 0
        self.local_rank = int(env.get("LOCAL_RANK", "0")) if self.world > 1 else 0
        self.owns_group = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device):
        if self.world == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over ranks (every rank must call it at the same point)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return t / self.world

    def close(self):
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------- resolving
def _resolve_device(ns, dist: _Dist) -> torch.device:
    name = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TrainConfigError(f"--device {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainConfigError(f"--device {name!r}: the trainer runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainConfigError(f"--device {name!r}: CUDA is not available on this machine")
        if dist.world > 1:
            device = torch.device("cuda", dist.local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _find_checkpoint(ns) -> str:
    target = ns.resume
    if target is True or target == "auto":
        if ns.out_dir:
            target = ns.out_dir
        else:
            found = sorted(glob.glob(os.path.join("runs", "*", CKPT_NAME)), key=os.path.getmtime)
            if not found:
                raise FileNotFoundError("--resume: no PATH given, no --out-dir, and no runs/*/ckpt.pt here")
            target = found[-1]
    return checkpoint_path(target, "--resume")


# What the errors say a checkpoint is.
CKPT_HINT = (f"a checkpoint is the {CKPT_NAME} that python -m gptkernels train writes into its run folder (a "
             f"torch.save dict with keys format, step, model, optimizer, config, args, rng, data, elapsed); give that "
             f"file or the run folder")


def checkpoint_path(target, option: str = "--resume") -> str:
    """The checkpoint file of ``target``: a ckpt.pt (any file name), or a run folder holding ckpt.pt. Raises
    FileNotFoundError naming ``option``."""
    target = os.fspath(target)
    if os.path.isdir(target):
        path = os.path.join(target, CKPT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{option}: no checkpoint at {path!r}: the folder {target!r} has no {CKPT_NAME} "
                                    f"(train writes it every --ckpt-every steps and at the end)")
        return path
    if not os.path.isfile(target):
        raise FileNotFoundError(f"{option}: no checkpoint at {target!r}: no such file or folder")
    return target


def _file_kind(path: str) -> str | None:
    """What a file that torch.load cannot read is, from its first bytes; None for a zip archive or a pickle (the two
    torch.save formats), where torch's own error says more."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
        text = b"\0" not in head
    except UnicodeDecodeError as e:
        text = e.start >= len(head) - 3  # a character cut at the 4096-byte boundary
    return "a text file" if text else "a binary file, neither a zip archive (torch.save's format) nor a pickle"


def torch_load(path: str, option: str = "--resume", map_location="cpu"):
    """torch.load(weights_only=True) of a checkpoint; a file it cannot read raises CheckpointError, which says what the
    file is and what a checkpoint looks like (not torch's advice to load with weights_only=False)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        kind = _file_kind(path)
        if kind is not None:
            raise CheckpointError(f"{option} {path!r} is {kind}, not a checkpoint; {CKPT_HINT}") from None
        msg = str(e)
        # weights_only refusals are paragraphs; the line after "WeightsUnpickler error:" names what was refused.
        detail = msg.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in msg else msg
        detail = next((line.strip() for line in detail.splitlines() if line.strip()), type(e).__name__)
        detail = detail.split(". ", 1)[0].rstrip(".")  # the first sentence: what failed, not how to load it anyway
        raise CheckpointError(f"{option} {path!r}: torch.load(weights_only=True) cannot read it ({detail}); "
                              f"{CKPT_HINT}") from None


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A trainer checkpoint, loaded with weights_only=True (tensors, dicts, lists and primitives only)."""
    ckpt = torch_load(path, "--resume", map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"--resume: {path!r} is not a gptkernels trainer checkpoint (format {CKPT_FORMAT}); "
                              f"{CKPT_HINT}")
    return ckpt


def _resolve(ns, dist: _Dist, device: torch.device):
    """Fill every None option: explicit > the checkpoint's arguments (on --resume) > device defaults. Validate.
    Returns (args, checkpoint or None, checkpoint path or None)."""
    ckpt = ckpt_path = None
    if ns.resume:
        ckpt_path = _find_checkpoint(ns)
        ckpt = load_checkpoint(ckpt_path)
        saved_cfg = ckpt["config"]
        for name in ("model", "block_size", "vocab_size", "dropout"):
            mine, theirs = getattr(ns, name), ckpt["args"].get(name) if name == "model" else saved_cfg.get(name)
            if mine is not None and mine != theirs:
                raise TrainConfigError(f"{_flag(name)} {mine!r} differs from the checkpoint's ({theirs!r}); the "
                                       f"model of a resumed run cannot change")
        for k, v in ckpt["args"].items():
            if k not in NOT_INHERITED and getattr(ns, k, None) is None:
                setattr(ns, k, v)
        if ns.out_dir is None:
            ns.out_dir = os.path.dirname(os.path.abspath(ckpt_path))
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
            ns.warmup = defaults["warmup"]  # _validate names the bad --lr-decay-steps
    if ns.backend == "auto":
        ns.backend = None
    if ns.out_dir is None:
        ns.out_dir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    _validate(ns, dist, device)
    return ns, ckpt, ckpt_path


def _validate(ns, dist: _Dist, device: torch.device):
    def need(ok, name, msg):
        if not ok:
            raise TrainConfigError(f"{_flag(name)} {getattr(ns, name)!r}: {msg}")

    for name in ("block_size", "batch_size", "grad_accum", "steps", "eval_steps", "log_every", "lr_decay_steps"):
        v = getattr(ns, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "must be a positive integer")
    for name in ("warmup", "eval_every", "ckpt_every", "corpus_bytes"):
        v = getattr(ns, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "must be an integer >= 0")
    need(ns.model in PRESETS, "model", f"unknown preset; known: {', '.join(PRESETS)}")
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


def _model_config(ns, ckpt, vocab_size: int) -> GPTConfig:
    try:
        if ckpt is not None:
            return GPTConfig(**ckpt["config"])
        return GPTConfig.preset(ns.model, block_size=ns.block_size, vocab_size=ns.vocab_size or vocab_size,
                                dropout=ns.dropout)
    except ValueError as e:
        raise TrainConfigError(f"--model {ns.model}: bad configuration: {e}") from None


# ---------------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, ns) -> float:
    """Linear warmup over --warmup steps, then a cosine from --lr down to --min-lr at --lr-decay-steps."""
    if step < ns.warmup:
        return ns.lr * (step + 1) / ns.warmup
    if step >= ns.lr_decay_steps:
        return ns.min_lr
    frac = (step - ns.warmup) / max(1, ns.lr_decay_steps - ns.warmup)
    return ns.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (ns.lr - ns.min_lr)


def lr_summary(ns) -> str:
    """The schedule as the banner states it, computed with lr_at: the highest LR of the run's --steps steps and the LR
    of the last one."""
    last = lr_at(ns.steps - 1, ns)
    if ns.warmup >= ns.steps:
        return (f"lr {lr_at(0, ns):.3g} -> {last:.3g}: linear warmup to {ns.lr:g} over {ns.warmup} steps, longer than "
                f"the run's {ns.steps} (no decay)")
    return (f"lr {ns.lr:g} -> {last:.3g} at step {ns.steps} (warmup {ns.warmup}, cosine to {ns.min_lr:g} at step "
            f"{ns.lr_decay_steps})")


# --------------------------------------------------------------------------------------------------------- peak
_CPU_PEAK: dict = {}


def measure_cpu_peak(sizes=(256, 512, 1024), seconds: float = 0.1) -> float:
    """Best fp32 matmul FLOP/s over n x n products on this process's threads, measured once per process: each size
    repeats for ``seconds`` (at least 3 times) and the fastest product counts, so a busy machine still shows its
    peak in its quiet moments. Several sizes because the best depends on the caches: on the 2-core EPYC VM this was
    written on, MKL reached ~190 GFLOP/s at n = 512 and ~60 at n = 1024."""
    key = (tuple(sizes), torch.get_num_threads())
    if key not in _CPU_PEAK:
        best = 0.0
        for n in sizes:
            g = torch.Generator().manual_seed(n)  # its own generator: the global RNG stream stays untouched
            a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
            torch.mm(a, b)  # warm up the BLAS threads
            start, reps = time.perf_counter(), 0
            while reps < 3 or time.perf_counter() - start < seconds:
                t = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * n**3 / (time.perf_counter() - t))
                reps += 1
        _CPU_PEAK[key] = best
    return _CPU_PEAK[key]


def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one rank, how it was found). GPTKERNELS_PEAK_FLOPS overrides."""
    env = os.environ.get("GPTKERNELS_PEAK_FLOPS")
    if env:
        return float(env), f"MFU vs GPTKERNELS_PEAK_FLOPS {float(env) / 1e12:.1f} TFLOP/s"
    if device.type == "cpu":
        peak = measure_cpu_peak()
        return peak, (f"MFU vs measured CPU matmul peak {peak / 1e9:.1f} GFLOP/s (best fp32 n^3 matmul, n <= 1024, "
                      f"{_runtime.threads_text()})")
    name = torch.cuda.get_device_name(device)
    for frag, peaks in GPU_PEAK_FLOPS.items():
        if frag in name:
            return peaks[dtype], f"MFU vs {name} dense {dtype} peak {peaks[dtype] / 1e12:.0f} TFLOP/s"
    return None, f"MFU not reported: no peak known for {name} (set GPTKERNELS_PEAK_FLOPS)"


# ------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: a reader sees the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a checkpoint is as readable as the log next to it
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------------------- output
class _Output:
    """Printing (through tqdm when a bar is shown) and the JSON-lines log; only rank 0 writes anything."""

    def __init__(self, master: bool, log_path: str | None, progress: bool, total: int, initial: int):
        self.master, self.log_path, self.bar = master, log_path, None
        if master and progress and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)
            except ImportError:
                pass

    def print(self, msg: str):
        if not self.master:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def record(self, row: dict):
        if self.master and self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def advance(self, n: int, postfix: dict | None = None):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _trim_log(path: str, step: int):
    """On resume, drop log rows past the checkpoint's step (a run that went on after its last checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    keep = [line for line in rows if json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(log_path: str, png_path: str, title: str = "") -> str | None:
    """Train and val loss against step from log.jsonl, as a PNG (matplotlib's Agg canvas, no pyplot state).
    Returns the path, or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = read_log(log_path)
    train = {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}  # last row per step wins
    val = {r["step"]: r["val_loss"] for r in rows if r.get("kind") == "eval"}
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(sorted(train), [train[s] for s in sorted(train)], lw=1.2, label="train")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", ms=4, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path


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
    out_dir = args.out_dir
    log_path, plot_path, save_path = (os.path.join(out_dir, n) for n in (LOG_NAME, PLOT_NAME, CKPT_NAME))
    if ckpt is None and os.path.exists(save_path):
        raise TrainConfigError(f"--out-dir {out_dir!r} already holds a checkpoint ({CKPT_NAME}); continue it with "
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
    model = torch.compile(raw) if args.compile else raw
    eval_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    end = args.stop_at or args.steps
    B, T, A, W = args.batch_size, config.block_size, args.grad_accum, dist.world
    tokens_per_step = B * T * A
    flops_per_token = raw.flops_per_token(T)
    peak, peak_note = peak_flops(device, args.dtype)

    if dist.master:
        os.makedirs(out_dir, exist_ok=True)
        if step == 0 and os.path.exists(log_path):
            os.remove(log_path)
        _trim_log(log_path, step)
    out = _Output(dist.master, log_path, not args.no_progress, end, step)
    threads = f" ({_runtime.threads_text()})" if device.type == "cpu" else ""
    ranks = f"{W} ranks (DDP, {'nccl' if device.type == 'cuda' else 'gloo'})" if W > 1 else "1 rank"
    out.print(f"gptkernels train: device {device}{threads}, backend {_runtime.backend_text(args.backend)}, "
              f"{args.dtype}, {ranks}" + (", torch.compile" if args.compile else ""))
    out.print(f"model {args.model}: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, block {T}, "
              f"vocab {config.vocab_size}: {raw.num_params() / 1e6:.2f}M params, "
              f"{flops_per_token / 1e6:.1f} MFLOP/token")
    out.print(f"data: {dataset.description}: train {len(dataset.train):,} tokens, val {len(dataset.val):,}")
    if args.docs == "pad":
        out.print(f"docs: pad, one document chunk per row; padding fills {100 * sampler.padding_fraction():.1f}% of "
                  f"the train slots and counts in neither the loss nor tokens/s")
    elif args.docs == "pack":
        out.print("docs: pack, EOT-separated documents; attention within each document, positions restart at each")
    total = tokens_per_step * args.steps
    per_rank = f" ({B // W} per rank)" if W > 1 else ""
    slots = " slots (real tokens fewer by the padding)" if args.docs == "pad" else ""
    out.print(f"batch: {B}{per_rank} x {T} tokens x {A} accum = {tokens_per_step:,} tokens{slots}/step; "
              f"{args.steps} steps = {total:,} tokens ({total / len(dataset.train):.2f} epochs); {lr_summary(args)}")
    out.print(peak_note)
    out.print(f"out: {out_dir}/{{{LOG_NAME}, {CKPT_NAME}, {PLOT_NAME}}}"
              + (f"; resumed from {ckpt_path} at step {step}" if ckpt_path else ""))
    out.record({"kind": "start", "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "world": W,
                "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "config": config.to_dict(), "args": vars(args), "peak_flops": peak,
                "resumed_from": ckpt_path})

    t_start = time.perf_counter()
    train_time, tokens_done = 0.0, 0  # this run's optimizer-step time (no eval, no checkpoints) and real tokens
    real_tokens = 0  # real tokens since the last train row
    last_loss = last_val = None
    reported_kernels = False

    def elapsed():
        return prev_elapsed + time.perf_counter() - t_start

    def evaluate():
        was_training = eval_model.training
        eval_model.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for k in range(args.eval_steps):  # the same val batches every time: evals are comparable
                b = sampler.get_batch("val", k, dist.rank, W, device)
                with amp():
                    total += eval_model(b.x, b.y, **b.model_kwargs())[1].float()
        eval_model.train(was_training)
        return dist.mean(total / args.eval_steps).item()

    def do_eval():
        nonlocal last_val
        last_val = evaluate()
        out.record({"kind": "eval", "step": step, "val_loss": last_val, "elapsed": round(elapsed(), 3)})
        out.print(f"step {step:>6}/{args.steps} | val loss {last_val:.4f}")

    def do_checkpoint():
        if dist.master:
            save_checkpoint(save_path, {
                "format": CKPT_FORMAT, "step": step, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                "config": config.to_dict(), "args": vars(args), "rng": _rng_state(device),
                "data": {"batches_drawn": batches, "source": dataset.source, "seed": args.seed},
                "elapsed": elapsed(), "torch": str(torch.__version__),  # a str subclass that weights_only rejects
            })

    model.train()
    if step == 0 and args.eval_steps:
        do_eval()
    t_log, steps_since_log = time.perf_counter(), 0
    try:
        while step < end:
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Dropout masks are a function of (seed, rank, step): a resumed run draws what the uninterrupted one did.
            torch.manual_seed(args.seed + 1_000_003 * (step + 1) + dist.rank)
            loss_sum = torch.zeros((), device=device)
            for micro in range(A):
                b = sampler.get_batch("train", batches, dist.rank, W, device)
                batches += 1
                real_tokens += b.tokens  # counted on the host: B * T unless rows are padded
                # Gradients are all-reduced on the last micro-step only.
                sync = model.no_sync() if W > 1 and micro < A - 1 else contextlib.nullcontext()
                with sync:
                    with amp():
                        _, loss = model(b.x, b.y, **b.model_kwargs())
                    (loss / A).backward()
                loss_sum += loss.detach().float()
            if args.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since_log += 1
            if not reported_kernels:
                reported_kernels = True
                ran = sorted({f"{op} {b}" for op, (b, _) in _dispatch.ran().items()})
                out.print("kernels: " + ", ".join(ran) + " (gptkernels.explain() tells why)")
            if step % args.log_every == 0 or step == end:
                last_loss = dist.mean(loss_sum / A).item()  # .item() syncs the device: the timing below is real
                dt = time.perf_counter() - t_log
                train_time += dt
                tokens_done += real_tokens
                tok_s = real_tokens / dt
                mfu = flops_per_token * tok_s / (peak * W) if peak else None
                row = {"kind": "train", "step": step, "loss": last_loss, "lr": lr, "tokens_per_s": round(tok_s, 1),
                       "mfu": None if mfu is None else round(mfu, 5), "elapsed": round(elapsed(), 3)}
                if args.grad_clip > 0:
                    row["grad_norm"] = round(dist.mean(grad_norm.float()).item(), 5)
                out.record(row)
                mfu_s = f" | MFU {100 * mfu:5.2f}%" if mfu is not None else ""
                out.advance(steps_since_log, {"loss": f"{last_loss:.3f}", "tok/s": f"{tok_s:,.0f}"})
                out.print(f"step {step:>6}/{args.steps} | loss {last_loss:.4f} | lr {lr:.2e} | {tok_s:9,.0f} tok/s"
                          f"{mfu_s} | {elapsed():7.1f} s")
                steps_since_log = real_tokens = 0
            t_pause = time.perf_counter()
            if step == end or (args.eval_every and step % args.eval_every == 0):
                do_eval()
            if step == end or (args.ckpt_every and step % args.ckpt_every == 0):
                do_checkpoint()
            # Eval and checkpoint time stays out of tokens/s.
            t_log = time.perf_counter() if steps_since_log == 0 else t_log + time.perf_counter() - t_pause
    except KeyboardInterrupt:
        where = f"continue from {save_path} with --resume" if os.path.isfile(save_path) else "no checkpoint yet"
        out.print(f"interrupted at step {step}; {where}")
        raise
    finally:
        out.close()
        if dist.master and os.path.isfile(log_path):
            title = f"{args.model} ({config.n_layer}L {config.n_embd}C, block {T}) on {dataset.source}"
            plot_done = plot_losses(log_path, plot_path, title)
        else:
            plot_done = None
    tok_s = tokens_done / train_time if train_time else None
    mfu = flops_per_token * tok_s / (peak * W) if peak and tok_s else None
    summary = (f"done: {step} steps in {elapsed():.1f} s | train loss {last_loss:.4f} | val loss {last_val:.4f}"
               if last_loss is not None and last_val is not None else f"done: {step} steps")
    if tok_s:
        summary += f" | {tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.2f}%" if mfu is not None else "")
    out.print(summary)
    out.print(f"wrote {log_path}, {save_path}" + (f", {plot_done}" if plot_done else " (no matplotlib: no plot)"))
    return {"steps": step, "train_loss": last_loss, "val_loss": last_val, "tokens_per_s": tok_s, "mfu": mfu,
            "elapsed": elapsed(), "out_dir": out_dir, "log": log_path, "checkpoint": save_path, "plot": plot_done,
            "config": config.to_dict()}


# ---------------------------------------------------------------------------------------------------------- CLI
def run(args) -> int:
    """python -m gptkernels train: train with parsed arguments; a bad argument prints one line and returns 2."""
    try:
        train(args)
    except (TrainConfigError, CheckpointError, gkdata.DataError, FileNotFoundError) as e:
        print(f"gptkernels train: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """python -m gptkernels.train (and torchrun -m gptkernels.train): the same as python -m gptkernels train."""
    from gptkernels.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
