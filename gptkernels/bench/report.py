"""Results out: the verdict a run ends with, the per-row detail table, results.json / .csv / .md, and --compare.

Units: every printed figure carries its own. A memory-bound row's rate is GB/s (bytes that must move / p50 time), a
compute-bound row's FLOP/s, in GFLOP/s below 1 TFLOP/s so that a CPU row never rounds to 0.0; "% of ceiling" names
its ceiling (copy for GB/s, matmul for FLOP/s); a speedup is a ratio of p50 times, printed with ×.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from gptkernels.bench.runner import NOISY

CSV_FIELDS = (
    "op", "preset", "provider", "mode", "shape", "dtype", "ms_p20", "ms_p50", "ms_p80", "gbps", "tflops",
    "pct_roofline", "speedup_vs_eager", "speedup_vs_compile", "peak_mem_mb", "status", "reason", "noisy", "err",
    "err_bound", "bytes", "flops", "first_call_s", "samples", "rotation", "device", "torch", "triton", "git_sha",
    "date",
)  # fmt: skip
MIN_TOL = 0.03  # two p50s within 3% are never called different (--compare, the verdict), however tight the spreads
UNKNOWN_NOISE = 0.10  # the noise assumed for rows whose file has no p20/p80
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
DASH = "–"


# ------------------------------------------------------------------------------------------------ formatting
def sig(v, n: int = 3) -> str:
    """``v`` to ``n`` significant figures in fixed point, never an exponent: 0.000123, 0.0957, 1.23, 123, 3012."""
    if v is None or not math.isfinite(v):
        return DASH
    if v == 0:
        return "0"
    return f"{v:.{max(0, n - 1 - math.floor(math.log10(abs(v))))}f}"


def flop_rate(tflops: float | None) -> str:
    """A FLOP rate with its unit: TFLOP/s from 1 TFLOP/s up, GFLOP/s below."""
    if tflops is None:
        return DASH
    return f"{sig(tflops)} TFLOP/s" if tflops >= 1 else f"{sig(tflops * 1e3)} GFLOP/s"


def rate(r: dict) -> str:
    """The row's throughput with its unit (GB/s for memory-bound ops, FLOP/s for compute-bound ones)."""
    if r.get("tflops") is not None:
        return flop_rate(r["tflops"])
    if r.get("gbps") is not None:
        return f"{sig(r['gbps'])} GB/s"
    return DASH


def pct_of_ceiling(r: dict) -> str:
    if r.get("pct_roofline") is None:
        return DASH
    return f"{r['pct_roofline']:.0f}% of {'matmul' if r.get('tflops') is not None else 'copy'}"


def times(x) -> str:
    return DASH if x is None else f"{sig(x)}×"


def _ms(r):
    if r.get("ms_p50") is None:
        return DASH
    return f"{r['ms_p50']:.4g} [{_f4(r.get('ms_p20'))}, {_f4(r.get('ms_p80'))}]"


def _short_dtype(d):
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(d, d)


def _shape(r):
    return r["shape"] if r["preset"] in (None, r["shape"]) else f"{r['shape']} ({r['preset']})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def table(head: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """A Markdown table padded to aligned columns (readable raw on a terminal, renders anywhere Markdown does)."""
    widths = [max([3, len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    rule = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    return [line(head) + " |", line(rule) + " |"] + [line(r) + " |" for r in rows]


def _spread(r) -> float | None:
    """p80/p20 - 1 of a row, None when the file does not carry both."""
    p20, p80 = r.get("ms_p20"), r.get("ms_p80")
    return p80 / p20 - 1 if p20 and p80 else None


def noise(a: dict, b: dict) -> tuple[float, bool]:
    """(noise, measured) of comparing two rows' p50: the wider of their p20..p80 spreads (p80/p20 - 1), or
    UNKNOWN_NOISE when neither row carries them. Two p50s differ only beyond 1 + max(noise, MIN_TOL)."""
    spreads = [x for x in (_spread(a), _spread(b)) if x is not None]
    return (max(spreads), True) if spreads else (UNKNOWN_NOISE, False)


# ------------------------------------------------------------------------------------------------ header
def machine(env: dict) -> str:
    gpu = env.get("gpu")
    cpu = f"CPU {env.get('cpu_model')} ({env.get('cpu_count')} cores)"
    return f"{gpu['name']} ({gpu['sm']}, {gpu['sms']} SMs), host {cpu}" if gpu else cpu


def threads(env: dict) -> str:
    n = env.get("torch_threads")
    return f"{n} torch thread{'' if n == 1 else 's'}, OpenMP {env.get('openmp_threads')}"


def busy(env: dict) -> str | None:
    """Why a CPU run's timings shared the cores with other work, else None: the 1-min load average from other work
    above half the cores. At the start that is the load itself; at the end the run's own threads are part of it (a
    2-thread run on an idle 2-core machine ends near 2), so they are taken off first."""
    start, end = env.get("load_avg_1m"), env.get("load_avg_1m_end")
    own = env.get("torch_threads") or 1
    others = [v for v in (start, None if end is None else max(0.0, end - own)) if v is not None]
    if env.get("device") == "cpu" and others and max(others) > 0.5 * (env.get("cpu_count") or 1):
        load = [v for v in (start, end) if v is not None]
        return (f"1-min load average {' -> '.join(f'{v:.1f}' for v in load)} on {env.get('cpu_count')} cores "
                f"(this run's {own} thread{'s' if own != 1 else ''} included at the end)")
    return None


def header(result: dict, show_busy: bool = True) -> str:
    """Machine, versions, command and the ceilings measured in the run."""
    env, roof = result["env"], result["env"].get("roofline") or {}
    lines = [
        f"gptkernels bench on {env['device']}: {machine(env)}; torch {env['torch']}, triton {env.get('triton')}, "
        f"{threads(env)}; git {env.get('git_sha')}; {env['date']}",
        f"command: `{env.get('command')}`",
    ]
    why = busy(env) if show_busy else None
    if why:
        lines.append(f"⚠ busy machine: {why} during the run; CPU timings share the cores with that work")
    if roof:
        lines.append(
            f"roofline (measured in this run, from p20 times): copy {sig(roof['copy_gbps'])} GB/s "
            f"({roof['copy_bytes'] >> 20} MiB read + written), matmul {roof['matmul_dtype']} {roof['matmul_shape']} "
            f"{flop_rate(roof['matmul_tflops'])}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ detail table
def _all_skip_reasons(rows) -> list[str]:
    skipped = {}
    for r in rows:
        if r["status"] == "skipped" and r["provider"] != "-":
            skipped.setdefault((r["provider"], r["reason"]), set()).add(r["op"])
    return [f"- {prov} ({', '.join(sorted(ops))}): {why}" for (prov, why), ops in skipped.items()]


def detail(result: dict) -> str:
    """Every row (the table --verbose prints and results.md holds), then each skip reason, the byte/FLOP formulas
    and the notes of the run."""
    rows = result["rows"]
    shown = [r for r in rows if r["status"] != "skipped" or r["provider"] == "-" and r["shape"]]
    body = []
    for r in shown:
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        if r["status"] == "ok" and r["reason"]:
            status = "ok ⚠ " + r["reason"]
        peak = DASH if r.get("peak_mem_mb") is None else sig(r["peak_mem_mb"])
        body.append(
            [
                r["op"],
                _shape(r),
                _short_dtype(r["dtype"] or DASH),
                r["mode"] or DASH,
                r["provider"],
                _ms(r),
                rate(r),
                pct_of_ceiling(r),
                times(r["speedup_vs_eager"]),
                times(r["speedup_vs_compile"]),
                peak,
                status,
            ]
        )
    head = [
        "op",
        "shape (preset)",
        "dtype",
        "mode",
        "provider",
        "ms p50 [p20, p80]",
        "throughput",
        "% of ceiling",
        "vs eager",
        "vs compile",
        "peak MB",
        "status",
    ]
    out = table(head, body, right={5, 6, 7, 8, 9, 10})
    for r in rows:
        if r["provider"] == "-" and not r["shape"]:
            out.append(f"\n**{r['op']}**: {r['reason']}")
    skipped = _all_skip_reasons(rows)
    if skipped:
        out += ["", "not run:"] + skipped
    if result.get("formulas"):
        out.append("\nwork per call (bytes that must move, or FLOPs; M = rows, N = last dim, e = bytes per element):")
        for op, f in result["formulas"].items():
            modes = "; ".join(f"{m}: {t}" for m, t in f.items() if m not in ("summary", "metric"))
            out.append(f"- {op} = `{f['summary']}` — {modes}")
    for note in result.get("notes", []):
        out.append(f"- note: {note}")
    return "\n".join(out)


def markdown(result: dict) -> str:
    """The whole report: header, every row, verdict (what results.md holds)."""
    return "\n\n".join((header(result, show_busy=False), detail(result), verdict(result)))


# ------------------------------------------------------------------------------------------------ verdict
def _geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _is_kernel(provider: str) -> bool:
    return provider.startswith("gptkernels-")


def _problem(r) -> tuple:
    return (r["op"], r["preset"], r["shape"], r["dtype"], r["mode"])


def speedups(result: dict) -> dict:
    """The numbers behind the verdict.

    Per problem (op, shape, dtype, mode) the fastest ok gptkernels provider is "gptkernels"; its speedup over eager
    (over compile) is eager's p50 / its p50. Per op and mode: the geometric mean over the op's shapes. Per mode:
    the geometric mean over ops of those per-op values, so that every op weighs the same however many shapes it ran.

    Returns {"ops": {label: {mode: cell}}, "geomean": {mode: {"vs_eager": x, "vs_compile": x, "n_eager": n,
    "n_compile": n}}, "modes": [...], "beaten": {...}}; a cell has vs_eager / vs_compile (geomeans), their lists
    per shape, the winning backends, and "fail" when no gptkernels provider passed the check but one ran. A row op is
    labelled "op dtype" when the run has several dtypes. "beaten" maps (label, mode, provider, gptkernels provider)
    to the speedups of another provider (not eager or compile) that is faster than gptkernels' best beyond the two
    rows' noise (see :func:`noise`).
    """
    rows = result["rows"]
    problems = {}
    for r in rows:
        if r["provider"] != "-" and r["mode"]:
            problems.setdefault(_problem(r), []).append(r)
    dtypes = {r["dtype"] for r in rows if r["dtype"]}
    ops, beaten = {}, {}
    for (op, _, _, dtype, mode), group in problems.items():
        by = {r["provider"]: r for r in group}
        kernels = [r for r in group if _is_kernel(r["provider"])]
        if not kernels:
            continue
        label = f"{op} {_short_dtype(dtype)}" if len(dtypes) > 1 else op
        cell = ops.setdefault(label, {}).setdefault(
            mode, {"eager": [], "compile": [], "backends": {}, "fail": False, "shapes": 0}
        )
        ok = [r for r in kernels if r["status"] == "ok" and r.get("ms_p50")]
        if not ok:
            cell["fail"] = cell["fail"] or any(r["status"] == "FAIL" for r in kernels)
            continue
        best = min(ok, key=lambda r: r["ms_p50"])
        cell["shapes"] += 1
        backend = best["provider"].removeprefix("gptkernels-")
        cell["backends"][backend] = cell["backends"].get(backend, 0) + 1
        for base in ("eager", "compile"):
            b = by.get(base)
            if b is not None and b["status"] == "ok" and b.get("ms_p50"):
                cell[base].append(b["ms_p50"] / best["ms_p50"])
        for r in group:  # another provider (e.g. PyTorch's SDPA) that beats gptkernels' best here
            if r["provider"] in ("eager", "compile") or _is_kernel(r["provider"]) or r["status"] != "ok":
                continue
            if r.get("ms_p50") and best["ms_p50"] / r["ms_p50"] > 1 + max(noise(r, best)[0], MIN_TOL):
                b = beaten.setdefault((label, mode, r["provider"], best["provider"]), [])
                b.append(best["ms_p50"] / r["ms_p50"])
    for cells in ops.values():
        for cell in cells.values():
            cell["vs_eager"], cell["vs_compile"] = _geomean(cell["eager"]), _geomean(cell["compile"])
    modes = [m for m in MODE_ORDER if any(m in cells for cells in ops.values())]
    modes += sorted({m for cells in ops.values() for m in cells} - set(modes))
    geomean = {}
    for m in modes:
        per_op = {
            base: [c[m][f"vs_{base}"] for c in ops.values() if m in c and c[m][f"vs_{base}"] is not None]
            for base in ("eager", "compile")
        }
        geomean[m] = {
            "vs_eager": _geomean(per_op["eager"]),
            "vs_compile": _geomean(per_op["compile"]),
            "n_eager": len(per_op["eager"]),
            "n_compile": len(per_op["compile"]),
        }
    return {"ops": ops, "geomean": geomean, "modes": modes, "beaten": beaten}


def _cell(cell, base) -> str:
    if cell is None:
        return DASH
    if cell["fail"] and not cell["shapes"]:
        return "FAIL"
    xs = cell[base]
    if not xs:
        return DASH
    text = times(cell[f"vs_{base}"])
    if len(xs) > 1:
        text += f" ({sig(min(xs), 2)}..{sig(max(xs), 2)})"
    return text


def skip_groups(result: dict) -> list[str]:
    """One line per reason a provider (or a whole op or problem) did not run, naming every provider it hit.

    On a CPU run every reason that names CUDA is one reason: no CUDA device here. A reason that names its op
    ("layernorm has no triton kernel") is grouped across ops, which are then listed."""
    rows = result["rows"]
    cpu_run = result["env"].get("device") == "cpu"
    run_ops = {r["op"] for r in rows if r["provider"] != "-"}
    groups = {}  # reason -> (providers, ops)
    problems = {}  # reason -> problems (op, preset, mode) that never started
    for r in rows:
        if r["status"] != "skipped":
            continue
        why = r["reason"] or "no reason given"
        if r["provider"] == "-":
            problems.setdefault(why, []).append(r)
            continue
        if cpu_run and "cuda" in why.lower():
            why = "no CUDA device: this run is on cpu"
        elif why.startswith(r["op"] + " "):  # "layernorm has no triton kernel"
            why = "the op" + why[len(r["op"]) :]
        provs, ops = groups.setdefault(why, ({}, set()))
        provs[r["provider"]] = None
        ops.add(r["op"])
    out = []
    for why, (provs, ops) in groups.items():
        where = "" if ops >= run_ops else f" ({', '.join(sorted(ops))})"
        out.append(f"skipped: {', '.join(provs)}{where}: {why}")
    for why, rs in problems.items():
        if any(r["shape"] for r in rs):
            ops = ", ".join(dict.fromkeys(r["op"] for r in rs))
            out.append(f"not run: {_plural(len(rs), 'problem')} ({ops}): {why}")
        else:
            out.append(f"not run: {', '.join(r['op'] for r in rs)}: {why}")
    return out


MEM_FLAG = 0.8  # peak memory below this share of eager's (or above its inverse) is worth a verdict line


def memory_lines(result: dict) -> list[str]:
    """One line per op whose fastest gptkernels provider's peak memory differs from eager's by more than
    MEM_FLAG either way (geomean of the per-shape ratios, with the MB of the largest shape): what a fused loss or a
    recompute saves, or what a kernel costs in workspace."""
    problems = {}
    for r in result["rows"]:
        if r["provider"] != "-" and r["mode"] and r["status"] == "ok" and r.get("ms_p50"):
            problems.setdefault(_problem(r), {})[r["provider"]] = r
    per_op = {}
    for (op, _, _, _, mode), by in problems.items():
        kernels = [r for p, r in by.items() if _is_kernel(p)]
        eager = by.get("eager")
        if not kernels or eager is None or not eager.get("peak_mem_mb"):
            continue
        best = min(kernels, key=lambda r: r["ms_p50"])
        if best.get("peak_mem_mb") is None:
            continue
        per_op.setdefault((op, mode), []).append((best["peak_mem_mb"] / eager["peak_mem_mb"], best, eager))
    out = []
    for (op, mode), xs in per_op.items():
        g = _geomean([max(x, 1e-6) for x, _, _ in xs])
        if g is None or MEM_FLAG <= g <= 1 / MEM_FLAG:
            continue
        _, best, eager = max(xs, key=lambda t: t[2]["peak_mem_mb"])
        # A bwd row runs on a graph built before the measurement: what each forward saved is already held, so a
        # kernel that saves less and recomputes in backward looks heavier there than it is over the whole step.
        what = "above the inputs and what the forward saved" if mode == "bwd" else "above the inputs"
        out.append(f"memory: {op} {mode} peak {sig(g, 2)}× eager's (largest shape {best['shape']}: "
                   f"{best['peak_mem_mb']:.0f} MB vs {eager['peak_mem_mb']:.0f} MB, {what})")
    return out


def verdict(result: dict, paths: list | None = None) -> str:
    """What the run says, in a few lines a person can act on: per op the fastest gptkernels backend's speedup over
    eager PyTorch and torch.compile (per mode, geomean over shapes), the geomean over ops, what FAILed, what was
    skipped and why (one line per reason), how trustworthy the timings are, and where the files went."""
    rows = result["rows"]
    s = speedups(result)
    modes = s["modes"]
    bases = [b for b in ("eager", "compile") if any(s["geomean"][m][f"n_{b}"] for m in modes)]
    out = []
    if modes and bases:
        several = any(c["shapes"] > 1 for cells in s["ops"].values() for c in cells.values())
        out.append(
            "verdict: speedup of the fastest gptkernels backend = baseline p50 / gptkernels p50 (>1×: gptkernels is "
            "faster)" + ("; per op the geomean over its shapes (range)" if several else "")
        )
        head = ["op", "gptkernels"] + [f"{m} vs {b}" for m in modes for b in bases]
        body = []
        for label, cells in s["ops"].items():
            backends = {}
            for c in cells.values():
                for b, n in c["backends"].items():
                    backends[b] = backends.get(b, 0) + n
            best = "/".join(sorted(backends, key=lambda b: -backends[b])) or DASH
            body.append([label, best] + [_cell(cells.get(m), b) for m in modes for b in bases])
        n_ops = len(s["ops"])
        foot = []
        for m in modes:
            for b in bases:
                g, n = s["geomean"][m][f"vs_{b}"], s["geomean"][m][f"n_{b}"]
                foot.append(times(g) + (f" ({_plural(n, 'op')})" if g is not None and n != n_ops else ""))
        body.append([f"geomean over {_plural(n_ops, 'op')}", ""] + foot)
        out += table(head, body, right=set(range(2, len(head))))
        if "compile" not in bases:
            out.append("torch.compile: not timed in this run (see skipped below)")
        for (label, mode, prov, kernel), xs in s["beaten"].items():
            n = s["ops"][label][mode]["shapes"]
            out.append(
                f"⚠ {label} {mode}: {prov} is faster than {kernel} at {len(xs)} of {_plural(n, 'shape')} "
                f"(by up to {times(max(xs))}, beyond the rows' p20..p80 noise)"
            )
    else:
        out.append("verdict: no gptkernels row was timed against a baseline in this run")
    out += memory_lines(result)
    for r in rows:
        if r["status"] == "FAIL":
            what = " ".join(str(x) for x in (r["op"], r["mode"], r["shape"], r["dtype"], r["provider"]) if x)
            out.append(f"FAIL {what}: {r['reason']}")
    why = busy(result["env"])
    if why:
        out.append(f"⚠ busy machine: {why} during the run: timings shared the cores; treat them as rough")
    noisy = [r for r in rows if r.get("noisy")]
    if noisy:
        presets = len({r["preset"] for r in rows if r["preset"]}) > 1
        dtypes = len({r["dtype"] for r in rows if r["dtype"]}) > 1
        names = [
            " ".join(x for x in (r["op"], presets and r["preset"], dtypes and _short_dtype(r["dtype"])) if x)
            + f" {r['mode']} {r['provider']}"
            for r in noisy
        ]
        more = f", and {len(names) - 6} more" if len(names) > 6 else ""
        out.append(f"⚠ {_plural(len(noisy), 'noisy row')} (p80/p20 > {NOISY}): {', '.join(names[:6])}{more}")
    out += skip_groups(result)
    count = {k: sum(r["status"] == k for r in rows) for k in ("ok", "FAIL", "skipped")}
    out.append(
        f"rows: {count['ok']} ok, {count['FAIL']} FAIL, {count['skipped']} skipped; "
        f"wall time {result.get('wall_s', 0):.0f} s"
    )
    if paths:
        out.append("results: " + ", ".join(str(p) for p in paths))
        out.append("  (every row with ms p20/p50/p80, throughput, % of ceiling: --verbose prints them here)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ files
def write(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / "results.json", out_dir / "results.csv"
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(jpath)  # a run killed mid-write still leaves the previous complete file
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return jpath, cpath


def write_markdown(result: dict, out_dir: Path) -> Path:
    """results.md: the whole report (header, every row, verdict), for reading or pasting."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.md"
    path.write_text(markdown(result) + "\n")
    return path


def load(path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------------ compare
def _key(r):
    return (r["op"], r["provider"], r["mode"], r["shape"], r["dtype"])


def _fingerprint(env: dict) -> tuple:
    gpu = env.get("gpu") or {}
    return (env.get("device"), gpu.get("name"), env.get("cpu_model"), env.get("cpu_count"))


def suite(result: dict) -> str:
    cfg = result.get("config") or {}
    if result.get("suite") == "overhead":
        return f"overhead suite ({cfg.get('rounds')} rounds x {cfg.get('calls_per_round')} calls)"
    return "ops suite, " + ("--quick" if cfg.get("quick") else "full timing")


def _describe(name: str, result: dict) -> str:
    env, cfg = result["env"], result.get("config") or {}
    shapes = f" ({', '.join(cfg['shapes'])})" if cfg.get("shapes") else ""
    return (
        f"{name}: {machine(env)}; {threads(env)}; {suite(result)}{shapes}; torch {env.get('torch')}; "
        f"git {env.get('git_sha')}; {env.get('date')}"
    )


def context(old: dict, new: dict) -> tuple[str, list[str], list[str]]:
    """How far two runs can be compared: (level, lines saying why, the short reasons for the verdict line).

    Level "not comparable": another machine (device, GPU name, CPU model or core count) or another suite.
    "indicative": other threads, --quick against full timing, or a run measured under load (1-min load average
    above half the cores, or rows that carry a true "busy" flag). Otherwise "comparable". Other differences (torch
    version, shape presets) are said but do not change the level."""
    oe, ne = old["env"], new["env"]
    order = ("comparable", "indicative", "not comparable")
    level, lines, reasons = "comparable", [], []

    def worse(to, short, line):
        nonlocal level
        level = max(level, to, key=order.index)
        reasons.append(short)
        lines.append(line)

    if _fingerprint(oe) != _fingerprint(ne):
        worse(
            "not comparable",
            "different machine",
            f"not comparable: different machine ({machine(oe)} vs {machine(ne)}): the ratios compare machines, "
            "not code",
        )
    if (old.get("suite") or "ops") != (new.get("suite") or "ops"):
        worse("not comparable", "different suites", f"not comparable: different suites ({suite(old)} vs {suite(new)})")
    elif suite(old) != suite(new):
        worse(
            "indicative",
            f"suite {suite(old)} vs {suite(new)}",
            f"runs differ in suite: {suite(old)} vs {suite(new)} (timing length and roofline probes differ): "
            "treat ratios as indicative",
        )
    ot, nt = (oe.get("torch_threads"), oe.get("openmp_threads")), (ne.get("torch_threads"), ne.get("openmp_threads"))
    if ot != nt:
        worse(
            "indicative",
            f"threads {ot[0]} vs {nt[0]}" if ot[0] != nt[0] else f"OpenMP threads {ot[1]} vs {nt[1]}",
            f"runs differ in threads: {threads(oe)} vs {threads(ne)}: treat ratios as indicative",
        )
    for name, res in (("old", old), ("new", new)):
        why = busy(res["env"])
        flagged = sum(1 for r in res["rows"] if r.get("busy"))
        if flagged:
            why = (why + "; " if why else "") + f"{_plural(flagged, 'row')} flagged busy"
        if why:
            worse(
                "indicative", f"{name} run busy", f"{name} run measured under load ({why}): treat ratios as indicative"
            )
    if oe.get("torch") != ne.get("torch"):
        lines.append(
            f"note: torch {oe.get('torch')} vs {ne.get('torch')}: eager and compile rows compare torch versions too"
        )
    oshapes, nshapes = (old.get("config") or {}).get("shapes"), (new.get("config") or {}).get("shapes")
    if oshapes and nshapes and oshapes != nshapes:
        lines.append(
            f"note: shape presets differ ({', '.join(oshapes)} vs {', '.join(nshapes)}): only rows in both are compared"
        )
    sha = oe.get("git_sha")
    if sha and sha == ne.get("git_sha") and not sha.endswith("-dirty"):
        lines.append(f"note: same code in both runs (git {sha}): a difference is the machine's state or noise")
    return level, lines, reasons


def compare(old: dict, new: dict, verbose: bool = False) -> tuple[str, int]:
    """Per row present in both runs: new p50 / old p50. The noise of a row is the wider of its two runs'
    p20..p80 spreads (p80/p20 - 1; 10% when a file lacks them); a ratio beyond 1 + max(noise, 3%) is SLOWER,
    below 1 / (1 + that) FASTER, else within noise. A row that was ok and now FAILs is a regression in any case; a
    SLOWER row is one only when the runs are comparable (see :func:`context`), else the report says how to read it.
    The table lists the rows that changed (all rows with ``verbose``). Returns (Markdown report, regressions)."""
    o_rows = {_key(r): r for r in old["rows"] if r["provider"] != "-"}
    n_rows = {_key(r): r for r in new["rows"] if r["provider"] != "-"}
    level, ctx, reasons = context(old, new)
    out = [_describe("old", old), _describe("new", new)] + [c if c.startswith("note:") else "⚠ " + c for c in ctx]
    body, counts, fails, ratios = [], {"slower": 0, "faster": 0, "within noise": 0}, 0, {}
    for key, n in n_rows.items():
        o = o_rows.get(key)
        if o is None:
            continue
        op, prov, mode, shape, dtype = key
        cells = [op, shape or DASH, _short_dtype(dtype or DASH), mode or DASH, prov]
        if o["status"] == "ok" and n["status"] == "FAIL":
            fails += 1
            body.append(cells + [_f4(o["ms_p50"]), DASH, DASH, DASH, f"**REGRESSION: now FAIL** ({n['reason']})"])
            continue
        if o["status"] != "ok" or n["status"] != "ok" or not o.get("ms_p50") or not n.get("ms_p50"):
            continue
        ratio = n["ms_p50"] / o["ms_p50"]
        ratios.setdefault(prov, []).append(ratio)
        spread, measured = noise(o, n)
        tol = max(spread, MIN_TOL)
        word = "slower" if ratio > 1 + tol else "faster" if ratio < 1 / (1 + tol) else "within noise"
        counts[word] += 1
        if word == "within noise":
            shown = word
            if not verbose:
                continue
        elif level == "comparable":
            shown = f"**{word.upper()}**"
        else:
            shown = f"{word} ({level})"
        body.append(
            cells
            + [
                _f4(o["ms_p50"]),
                _f4(n["ms_p50"]),
                f"{ratio:.3f}",
                f"±{spread * 100:.0f}%" + ("" if measured else " (assumed)"),
                shown,
            ]
        )
    head = ["op", "shape", "dtype", "mode", "provider", "old ms p50", "new ms p50", "new/old", "noise", "verdict"]
    if body:
        out += [""] + table(head, body, right={5, 6, 7, 8})
    if counts["within noise"] and not verbose:
        out.append(f"({_plural(counts['within noise'], 'row')} within noise not listed; --verbose lists every row)")
    only_old = sum(1 for k in o_rows if k not in n_rows)
    only_new = sum(1 for k in n_rows if k not in o_rows)
    if only_old or only_new:
        out.append(f"{only_old} row(s) only in old, {only_new} only in new (not compared)")
    if ratios:
        parts = [f"{p} {_geomean(xs):.3f} ({_plural(len(xs), 'row')})" for p, xs in sorted(ratios.items())]
        out.append(
            "geomean new/old p50 per provider (<1: new is faster; baselines that moved as much as gptkernels "
            "mean the machine changed, not the code): " + "; ".join(parts)
        )
    changed = (
        f"{counts['slower']} slower, {counts['faster']} faster beyond noise, {counts['within noise']} within noise"
    )
    now_fail = f"; {fails} row(s) ok -> FAIL" if fails else ""
    if level == "comparable":
        regressions = counts["slower"] + fails
        out.append(
            f"\nverdict: {_plural(regressions, 'regression')} ({changed}{now_fail}); noise = the wider "
            f"p20..p80 spread of the two runs, at least {MIN_TOL:.0%}"
        )
    else:
        regressions = fails
        advice = "compare machines, not code" if level == "not comparable" else "treat ratios as indicative"
        out.append(
            f"\nverdict: {level} ({'; '.join(reasons)}): {advice}; {changed}{now_fail}; slower rows are not "
            "counted as regressions, only ok -> FAIL is"
        )
    return "\n".join(out), regressions


def _f4(v):
    return DASH if v is None else f"{v:.4g}"
