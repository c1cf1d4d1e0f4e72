"""Results out: the Markdown table, results.json / results.csv, the headline summary, and --compare."""

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
)
MIN_TOL = 0.03  # --compare never calls a change under 3% a regression, however tight the spreads


def _f(v, spec=".3g", none="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _ms(r):
    if r["ms_p50"] is None:
        return "–"
    return f"{r['ms_p50']:.4g} [{r['ms_p20']:.4g}, {r['ms_p80']:.4g}]"


def _short_dtype(d):
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(d, d)


def _shape(r):
    return r["shape"] if r["preset"] in (None, r["shape"]) else f"{r['shape']} ({r['preset']})"


def header(result: dict) -> str:
    env, roof = result["env"], result["env"].get("roofline") or {}
    gpu = env.get("gpu")
    where = (f"{gpu['name']} ({gpu['sm']}, {gpu['sms']} SMs)" if gpu
             else f"CPU {env.get('cpu_model')} ({env.get('cpu_count')} cores)")
    lines = [
        f"gptkernels bench on {env['device']}: {where}; torch {env['torch']}, triton {env.get('triton')}, "
        f"{env['torch_threads']} torch threads, OpenMP {env.get('openmp_threads')}; git {env.get('git_sha')}; "
        f"{env['date']}",
        f"command: `{env.get('command')}`",
    ]
    load = [v for v in (env.get("load_avg_1m"), env.get("load_avg_1m_end")) if v is not None]
    if env["device"] == "cpu" and load and max(load) > 0.5 * (env.get("cpu_count") or 1):
        lines.append(f"⚠ busy machine: 1-min load average {' -> '.join(f'{v:.1f}' for v in load)} on "
                     f"{env.get('cpu_count')} cores during the run; CPU timings share the cores with that work")
    if roof:
        lines.append(
            f"roofline (measured in this run, from p20 times): copy {roof['copy_gbps']:.1f} GB/s "
            f"({roof['copy_bytes'] >> 20} MiB read + written), matmul {roof['matmul_dtype']} {roof['matmul_shape']} "
            f"{roof['matmul_tflops']:.3g} TFLOP/s")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    rows = result["rows"]
    shown = [r for r in rows if r["status"] != "skipped" or r["provider"] == "-" and r["shape"]]
    out = [header(result), ""]
    metric = "TFLOP/s" if any(r["tflops"] is not None for r in shown) else "GB/s"
    out.append(f"| op | shape (preset) | dtype | mode | provider | ms p50 [p20, p80] | {metric} | % roof | vs eager "
               f"| vs compile | peak MB | status |")
    out.append("| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in shown:
        value = r["tflops"] if r["tflops"] is not None else r["gbps"]
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        if r["status"] == "ok" and r["reason"]:
            status = "ok ⚠ " + r["reason"]
        out.append(
            f"| {r['op']} | {_shape(r)} | {_short_dtype(r['dtype'])} | {r['mode']} | {r['provider']} "
            f"| {_ms(r)} | {_f(value, '.1f')} | {_f(r['pct_roofline'], '.0f')} "
            f"| {_f(r['speedup_vs_eager'], '.2f')} | {_f(r['speedup_vs_compile'], '.2f')} "
            f"| {_f(r['peak_mem_mb'], '.1f')} | {status} |")
    missing = [r for r in rows if r["provider"] == "-" and not r["shape"]]
    for r in missing:
        out.append(f"\n**{r['op']}**: {r['reason']}")
    skipped = {}
    for r in rows:
        if r["status"] == "skipped" and r["provider"] != "-":
            skipped.setdefault((r["provider"], r["reason"]), set()).add(r["op"])
    if skipped:
        out.append("\nnot run:")
        for (prov, why), ops in skipped.items():
            out.append(f"- {prov} ({', '.join(sorted(ops))}): {why}")
    if result.get("formulas"):
        out.append("\nbytes that must move (M = rows, N = last dim, e = bytes per element):")
        for op, f in result["formulas"].items():
            modes = "; ".join(f"{m}: {t}" for m, t in f.items() if m not in ("summary", "metric"))
            out.append(f"- {op} = `{f['summary']}` — {modes}")
    noisy = sum(1 for r in rows if r["noisy"])
    if noisy:
        out.append(f"\n⚠ {noisy} row(s) noisy (p80/p20 > {NOISY}): treat their numbers as rough.")
    for note in result.get("notes", []):
        out.append(f"- note: {note}")
    fails = sum(1 for r in rows if r["status"] == "FAIL")
    out.append(f"\n{sum(1 for r in rows if r['status'] == 'ok')} ok, {fails} FAIL, "
               f"{sum(1 for r in rows if r['status'] == 'skipped')} skipped; wall time {result.get('wall_s', 0):.0f} s")
    return "\n".join(out)


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


def load(path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------------ summary
def headline(result: dict) -> list[dict]:
    """Per op and mode: the fastest gptkernels provider at the op's largest shape (of the first dtype)."""
    best = {}
    for r in result["rows"]:
        if r["status"] != "ok" or not r["provider"].startswith("gptkernels-"):
            continue
        size = math.prod(int(d) for d in r["shape"].split("x"))
        key = (r["op"], r["mode"])
        cur = best.get(key)
        if cur is None or (size, -r["ms_p50"]) > (cur[0], -cur[1]["ms_p50"]):
            best[key] = (size, r)
    return [r for _, r in best.values()]


def summary(result: dict) -> str:
    roof = result["env"].get("roofline") or {}
    rows = result["rows"]
    out = [f"benchmark: {sum(r['status'] == 'ok' for r in rows)} ok, {sum(r['status'] == 'FAIL' for r in rows)} "
           f"FAIL, {sum(r['status'] == 'skipped' for r in rows)} skipped on {result['env'].get('device_name')}; "
           f"ceilings: copy {_f(roof.get('copy_gbps'), '.4g')} GB/s, matmul {_f(roof.get('matmul_tflops'), '.4g')} "
           f"TFLOP/s"]
    for r in headline(result):
        value = (f"{r['tflops']:.4g} TFLOP/s" if r["tflops"] is not None else f"{r['gbps']:.4g} GB/s")
        out.append(f"  {r['op']:<19} {r['mode']:<7} {r['shape']:<17} {_short_dtype(r['dtype']):<5} "
                   f"{r['provider']:<18} {r['ms_p50']:.4g} ms  {value} = {r['pct_roofline']:.0f}% of ceiling; "
                   f"{_f(r['speedup_vs_eager'], '.2f')}x eager, {_f(r['speedup_vs_compile'], '.2f')}x compile")
    for r in rows:
        if r["status"] == "FAIL":
            out.append(f"  FAIL {r['op']} {r['mode']} {r['shape']} {r['dtype']} {r['provider']}: {r['reason']}")
        elif r["provider"] == "-":
            out.append(f"  {r['op']}: {r['reason']}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ compare
def _key(r):
    return (r["op"], r["provider"], r["mode"], r["shape"], r["dtype"])


def _spread(r) -> float:
    return r["ms_p80"] / r["ms_p20"] - 1 if r["ms_p20"] else math.inf


def compare(old: dict, new: dict) -> tuple[str, int]:
    """Per row present in both runs: new p50 / old p50. The noise of a row is the wider of its two runs'
    p20..p80 spreads (p80/p20 - 1); a ratio beyond 1 + max(noise, 3%) is SLOWER, below 1 / (1 + that) FASTER.
    A row that was ok and now FAILs is a regression too. Returns (Markdown report, number of regressions)."""
    o_rows = {_key(r): r for r in old["rows"] if r["provider"] != "-"}
    n_rows = {_key(r): r for r in new["rows"] if r["provider"] != "-"}
    oe, ne = old["env"], new["env"]
    out = [f"old: {oe.get('device_name')}, git {oe.get('git_sha')}, {oe.get('date')}",
           f"new: {ne.get('device_name')}, git {ne.get('git_sha')}, {ne.get('date')}"]
    if oe.get("device_name") != ne.get("device_name"):
        out.append("⚠ different devices: ratios compare machines, not code")
    out += ["", "| op | shape | dtype | mode | provider | old ms p50 | new ms p50 | new/old | noise | verdict |",
            "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    regressions = 0
    for key, n in n_rows.items():
        o = o_rows.get(key)
        if o is None:
            continue
        op, prov, mode, shape, dtype = key
        if o["status"] == "ok" and n["status"] == "FAIL":
            regressions += 1
            out.append(f"| {op} | {shape} | {_short_dtype(dtype)} | {mode} | {prov} | {_f(o['ms_p50'], '.4g')} | – | – "
                       f"| – | **REGRESSION: now FAIL** ({n['reason']}) |")
            continue
        if o["status"] != "ok" or n["status"] != "ok":
            continue
        ratio = n["ms_p50"] / o["ms_p50"]
        noise = max(_spread(o), _spread(n))
        tol = max(noise, MIN_TOL)
        if ratio > 1 + tol:
            verdict = "**SLOWER**"
            regressions += 1
        elif ratio < 1 / (1 + tol):
            verdict = "faster"
        else:
            verdict = "within noise"
        out.append(f"| {op} | {shape} | {_short_dtype(dtype)} | {mode} | {prov} | {o['ms_p50']:.4g} "
                   f"| {n['ms_p50']:.4g} | {ratio:.3f} | ±{noise * 100:.0f}% | {verdict} |")
    only_old = [k for k in o_rows if k not in n_rows]
    only_new = [k for k in n_rows if k not in o_rows]
    if only_old or only_new:
        out.append(f"\n{len(only_old)} row(s) only in old, {len(only_new)} only in new (not compared)")
    out.append(f"\n{regressions} regression(s): new/old p50 beyond the wider p20..p80 spread of the two runs "
               f"(at least {MIN_TOL:.0%}), or ok -> FAIL")
    return "\n".join(out), regressions
