"""The learning-rate schedule: linear warmup, then a cosine decay to --min-lr."""

from __future__ import annotations

import math


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
