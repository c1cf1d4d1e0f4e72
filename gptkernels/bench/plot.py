"""--plot: the op's metric (GB/s or TFLOP/s) against problem size (shape preset), one line per provider, with the
ceiling measured in the same run drawn as a horizontal line. One PNG per op, or all ops in one figure
(``--plot combined``)."""

from __future__ import annotations

import math
from pathlib import Path


def _series(rows):
    """{(mode, dtype): {provider: [(elements, value, label)]}} of the ok rows of one op."""
    out = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        value = r["tflops"] if r["tflops"] is not None else r["gbps"]
        size = math.prod(int(d) for d in r["shape"].split("x"))
        out.setdefault((r["mode"], r["dtype"]), {}).setdefault(r["provider"], []).append((size, value, r["preset"]))
    return out


COLORS = {
    "eager": "tab:gray",
    "compile": "tab:blue",
    "gptkernels-cuda": "tab:green",
    "gptkernels-triton": "tab:red",
    "gptkernels-cpu": "tab:purple",
    "sdpa": "tab:orange",
}


def _draw(ax, op, mode, dtype, lines, roof, tflops):
    # Sizes on a categorical axis (ordered by element count): two presets can share a size on one device.
    ticks = sorted({(p[0], p[2]) for pts in lines.values() for p in pts})
    pos = {t: i for i, t in enumerate(ticks)}
    for prov, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([pos[p[0], p[2]] for p in pts], [p[1] for p in pts], marker="o", label=prov, color=COLORS.get(prov))
    ceiling = roof.get("matmul_tflops") if tflops else roof.get("copy_gbps")
    if ceiling:
        ax.axhline(
            ceiling,
            color="k",
            linestyle="--",
            linewidth=1,
            label=f"{'matmul' if tflops else 'copy'} ceiling {ceiling:.3g} {'TFLOP/s' if tflops else 'GB/s'}",
        )
    ax.set_xticks(range(len(ticks)))
    ax.set_xticklabels([f"{t[1]}\n{t[0] / 2**20:.3g}M el." for t in ticks], fontsize=7)
    ax.set_xlim(-0.5, len(ticks) - 0.5)
    ax.set_title(f"{op} {mode} {dtype}", fontsize=9)
    ax.set_ylabel("TFLOP/s" if tflops else "GB/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(result: dict, out_dir: Path, combined: bool = False) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roof = result["env"].get("roofline") or {}
    by_op = {}
    for r in result["rows"]:
        by_op.setdefault(r["op"], []).append(r)
    panels = []  # (op, mode, dtype, lines, tflops)
    for op, rows in by_op.items():
        tflops = any(r["tflops"] is not None for r in rows)
        for (mode, dtype), lines in _series(rows).items():
            panels.append((op, mode, dtype, lines, tflops))
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{result['env'].get('device_name')} — git {result['env'].get('git_sha')}, {result['env']['date'][:10]}"
    paths = []
    groups = [("bench", panels)] if combined else [(op, [p for p in panels if p[0] == op]) for op in by_op]
    for name, group in groups:
        if not group:
            continue
        cols = min(len(group), 4 if combined else 3)
        nrows = math.ceil(len(group) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, (op, mode, dtype, lines, tflops) in zip(axes.flat, group):
            _draw(ax, op, mode, dtype, lines, roof, tflops)
        for ax in list(axes.flat)[len(group) :]:
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
