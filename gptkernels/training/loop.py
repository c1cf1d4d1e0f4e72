"""The training loop that train and finetune share: AdamW steps with the LR schedule, gradient accumulation and
clipping, DDP, periodic evaluation, the log rows, atomic checkpoints, the progress bar and the final summary.

A command builds a :class:`Job` (its model, optimizer, batches, how one batch gives a loss, how an evaluation runs)
and hands it to :func:`run`; everything a checkpoint needs for an exact --resume (step, batches drawn, RNG states,
elapsed time) is kept here, so a command only restores the model and optimizer and passes the counters on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptkernels import _dispatch, _runtime
from gptkernels.training.checkpoint import CKPT_FORMAT, CKPT_NAME, rng_state, save_checkpoint
from gptkernels.training.output import LOG_NAME, PLOT_NAME, Output, plot_losses, trim_log
from gptkernels.training.peak import peak_flops
from gptkernels.training.schedule import lr_at


@dataclass
class Job:
    """What a command hands the loop.

    step_loss(model, batch) -> scalar loss tensor of one micro-batch (called under autocast; ``model`` may be the
    DDP or compiled wrapper of ``raw``). evaluate(model, amp) -> the eval row's metrics, "val_loss" first (called in
    eval mode under no_grad; ``amp()`` gives the autocast context). eval_text(metrics) -> what the eval line adds
    after the val loss. The sampler's get_batch(split, index, rank, world, device) returns an object with a
    ``tokens`` count (real tokens in the global batch: what tokens/s counts).
    """

    command: str  # "train", "finetune": names the printed lines
    args: argparse.Namespace
    raw: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: object
    step_loss: Callable
    evaluate: Callable
    config: dict  # the GPT config (a checkpoint holds it; a resume compares against it)
    flops_per_token: float
    tokens_per_step: int
    data_source: str
    banner: list[str] = field(default_factory=list)  # lines printed after the device line
    eval_text: Callable = lambda metrics: ""
    checkpoint_extra: dict = field(default_factory=dict)  # what the command adds to every checkpoint
    plot_title: str = ""
    step: int = 0  # from a checkpoint: finished steps, batches drawn, seconds of earlier runs
    batches: int = 0
    prev_elapsed: float = 0.0
    resumed_from: str | None = None


def run(job: Job, dist, device: torch.device) -> dict:
    """Train until --stop-at or --steps. Returns steps, train_loss (last logged), val_loss and eval (the last
    evaluation's metrics), tokens_per_s and mfu (this run's training time), elapsed, out_dir, log, checkpoint, plot,
    config."""
    args, raw, optimizer, sampler = job.args, job.raw, job.optimizer, job.sampler
    out_dir = args.out_dir
    log_path, plot_path, save_path = (os.path.join(out_dir, n) for n in (LOG_NAME, PLOT_NAME, CKPT_NAME))
    step, batches, prev_elapsed = job.step, job.batches, job.prev_elapsed
    model = torch.compile(raw) if args.compile else raw
    eval_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    end = args.stop_at or args.steps
    A, W = args.grad_accum, dist.world
    flops_per_token = job.flops_per_token
    peak, peak_note = peak_flops(device, args.dtype)

    if dist.master:
        os.makedirs(out_dir, exist_ok=True)
        if step == 0 and os.path.exists(log_path):
            os.remove(log_path)
        trim_log(log_path, step)
    out = Output(dist.master, log_path, not args.no_progress, end, step)
    threads = f" ({_runtime.threads_text()})" if device.type == "cpu" else ""
    ranks = f"{W} ranks (DDP, {'nccl' if device.type == 'cuda' else 'gloo'})" if W > 1 else "1 rank"
    out.print(f"gptkernels {job.command}: device {device}{threads}, backend {_runtime.backend_text(args.backend)}, "
              f"{args.dtype}, {ranks}" + (", torch.compile" if args.compile else ""))
    for line in job.banner:
        out.print(line)
    out.print(peak_note)
    out.print(f"out: {out_dir}/{{{LOG_NAME}, {CKPT_NAME}, {PLOT_NAME}}}"
              + (f"; resumed from {job.resumed_from} at step {step}" if job.resumed_from else ""))
    out.record({"kind": "start", "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "world": W,
                "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "config": job.config, "args": vars(args), "peak_flops": peak, "resumed_from": job.resumed_from})

    t_start = time.perf_counter()
    train_time, tokens_done = 0.0, 0  # this run's optimizer-step time (no eval, no checkpoints) and real tokens
    real_tokens = 0  # real tokens since the last train row
    last_loss = last_eval = None
    reported_kernels = False

    def elapsed():
        return prev_elapsed + time.perf_counter() - t_start

    def do_eval():
        nonlocal last_eval
        was_training = eval_model.training
        eval_model.eval()
        with torch.no_grad():
            last_eval = job.evaluate(eval_model, amp)
        eval_model.train(was_training)
        out.record({"kind": "eval", "step": step, **last_eval, "elapsed": round(elapsed(), 3)})
        out.print(f"step {step:>6}/{args.steps} | val loss {last_eval['val_loss']:.4f}{job.eval_text(last_eval)}")

    def do_checkpoint():
        if dist.master:
            save_checkpoint(save_path, {
                "format": CKPT_FORMAT, "step": step, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                "config": job.config, "args": vars(args), "rng": rng_state(device),
                "data": {"batches_drawn": batches, "source": job.data_source, "seed": args.seed},
                "elapsed": elapsed(), "torch": str(torch.__version__),  # a str subclass that weights_only rejects
                **job.checkpoint_extra,
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
                        loss = job.step_loss(model, b)
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
        plot_done = plot_losses(log_path, plot_path, job.plot_title) \
            if dist.master and os.path.isfile(log_path) else None
    tok_s = tokens_done / train_time if train_time else None
    mfu = flops_per_token * tok_s / (peak * W) if peak and tok_s else None
    last_val = last_eval["val_loss"] if last_eval else None
    summary = (f"done: {step} steps in {elapsed():.1f} s | train loss {last_loss:.4f} | val loss {last_val:.4f}"
               if last_loss is not None and last_val is not None else f"done: {step} steps")
    if tok_s:
        summary += f" | {tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.2f}%" if mfu is not None else "")
    out.print(summary)
    out.print(f"wrote {log_path}, {save_path}" + (f", {plot_done}" if plot_done else " (no matplotlib: no plot)"))
    return {"steps": step, "train_loss": last_loss, "val_loss": last_val, "eval": last_eval, "tokens_per_s": tok_s,
            "mfu": mfu, "elapsed": elapsed(), "out_dir": out_dir, "log": log_path, "checkpoint": save_path,
            "plot": plot_done, "config": job.config}
