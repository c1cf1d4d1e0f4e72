"""What a run shows and keeps: printed lines (through tqdm when a progress bar is shown), the JSON-lines log, and
the loss plot."""

from __future__ import annotations

import json
import os
import sys

LOG_NAME, PLOT_NAME = "log.jsonl", "loss.png"


class Output:
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


def trim_log(path: str, step: int):
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
    return _finish(fig, ax, "loss (nats / token)", title, png_path)


def plot_metric(logs: dict, key: str, png_path: str, title: str = "", baseline: float | None = None) -> str | None:
    """One eval metric (an eval-row key, e.g. "accuracy") against step for several runs: logs maps a label to a
    log.jsonl path. baseline: a horizontal reference line (e.g. the majority class's accuracy). Returns the path, or
    None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, path in logs.items():
        points = {r["step"]: r[key] for r in read_log(path) if r.get("kind") == "eval" and key in r}
        ax.plot(sorted(points), [points[s] for s in sorted(points)], "o-", ms=4, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label="majority class")
    return _finish(fig, ax, f"val {key.replace('_', ' ')}", title, png_path)


def _finish(fig, ax, ylabel: str, title: str, png_path: str) -> str:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path
