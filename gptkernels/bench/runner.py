"""Runs a suite: roofline first, then every (shape preset, op, dtype, mode) problem with every provider."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptkernels.bench import harness, roofline
from gptkernels.bench.env import fingerprint, load_avg
from gptkernels.bench.harness import Problem
from gptkernels.bench.model_spec import model_spec
from gptkernels.bench.registry import OPS, OpSpec, unavailable_reason
from gptkernels.bench.specs import parse_shape

SCHEMA = "gptkernels-bench/1"
NOISY = 1.3  # p80 / p20 above this: the row is flagged as noisy
ENV_IN_ROWS = ("device", "torch", "triton", "git_sha", "date")


@dataclass
class Config:
    ops: list[str]
    device: torch.device
    dtypes: list[torch.dtype]
    modes: list[str]
    presets: list[str]
    quick: bool = False
    modes_explicit: bool = True  # False: each op may run its own default modes (OpSpec.default_modes)
    providers: list[str] | None = None  # only these (None: all)
    exclude: dict[str, str] = field(default_factory=dict)  # provider -> why it is left out of this run
    model: str | None = None
    time_budget: float | None = None  # seconds; problems not started by then are reported as skipped
    seed: int | None = None
    argv: list[str] | None = None
    progress: bool = True
    on_update: Callable[[dict], None] | None = None  # called with the result after every problem
    on_start: Callable[[dict], None] | None = None  # called once the machine's fingerprint and ceilings are known


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_str(shape) -> str:
    return "x".join(str(d) for d in shape)


class _Progress:
    """tqdm on a terminal; one line per problem otherwise (a log file keeps the story of a run)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="problem", dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, label: str):
        if self.bar is not None:
            self.bar.set_description(label)
        self._t0 = time.perf_counter()
        self._label = label

    def finish(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {self._label}: {time.perf_counter() - self._t0:.1f} s", file=sys.stderr,
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _row(env: dict, op: str, preset, provider: str, mode, shape, dtype, status: str, reason: str = "") -> dict:
    row = {
        "op": op, "preset": preset, "provider": provider, "mode": mode,
        "shape": _shape_str(shape) if shape else None, "dtype": dtype_name(dtype) if dtype else None,
        "ms_p20": None, "ms_p50": None, "ms_p80": None, "gbps": None, "tflops": None, "pct_roofline": None,
        "speedup_vs_eager": None, "speedup_vs_compile": None, "peak_mem_mb": None,
        "status": status, "reason": reason, "noisy": False,
        "err": None, "err_bound": None, "bytes": None, "flops": None, "first_call_s": None, "samples": None,
        "rotation": None,
    }
    row.update({k: env.get(k) for k in ENV_IN_ROWS})
    return row


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _brief(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def run_problem(p: Problem, cfg: Config, env: dict, gen: torch.Generator) -> list[dict]:
    spec, device = p.spec, p.device
    roof = env["roofline"]
    work = spec.work(p.mode, p.shape, p.elsize)
    sets = harness.make_sets(p, 1, gen)
    footprint = work if spec.metric == "gbps" else sum(
        v.numel() * v.element_size() for v in sets[0].kwargs.values() if isinstance(v, torch.Tensor))
    k = harness.rotation(p, footprint, spec.stream_bytes(p.shape, p.elsize) if spec.stream_bytes else None)
    sets += harness.make_sets(p, k - 1, gen)
    ref = harness.reference(p, sets, gen)
    try:
        eager = harness.run_once(spec.eager, sets[0], p.mode)
    except Exception:  # noqa: BLE001  then the 16-bit bound is unavailable; rows say so
        eager = None

    def base(provider, status, reason=""):
        return _row(env, spec.name, p.preset, provider, p.mode, p.shape, p.dtype, status, reason)

    rows = []
    for prov in harness.providers_for(spec, device.type):
        if cfg.providers is not None and prov.name not in cfg.providers:
            continue
        why = cfg.exclude.get(prov.name) or prov.usable(p)
        if why:
            rows.append(base(prov.name, "skipped", why))
            continue
        try:
            fn = prov.make(p)
            t0 = time.perf_counter()
            got = harness.run_once(fn, sets[0], p.mode)
            _sync(device)
            first = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  a provider that raises is a failure, reported, never fatal
            rows.append(base(prov.name, "FAIL", "raised " + _brief(e)))
            continue
        ok, err, bound, msg = harness.check(got, ref, got if prov.name == "eager" else eager, p.dtype)
        del got
        row = base(prov.name, "ok" if ok else "FAIL", "" if ok else "wrong result: " + msg)
        row.update(err=err if math.isfinite(err) else None, err_bound=bound, first_call_s=first)
        if not ok:
            rows.append(row)
            continue
        try:
            with harness.grad_ctx(p.mode):
                step = harness.make_step(fn, sets, p.mode)
                if device.type == "cuda":
                    t = harness.time_cuda(step, cfg.quick)
                else:
                    t = harness.time_cpu(step, min_run_time=0.05 if cfg.quick else 0.25,
                                         min_samples=5 if cfg.quick else 10, max_time=1.0 if cfg.quick else 3.0)
                peak = harness.peak_mem_mb(step, device)
            del step
        except Exception as e:  # noqa: BLE001
            row.update(status="FAIL", reason="raised while timing: " + _brief(e))
            rows.append(row)
            continue
        row.update(ms_p20=t.p20, ms_p50=t.p50, ms_p80=t.p80, samples=t.samples, rotation=k, peak_mem_mb=peak)
        if spec.metric == "gbps":
            row["bytes"] = work
            row["gbps"] = work / (t.p50 * 1e-3) / 1e9
            row["pct_roofline"] = 100 * row["gbps"] / roof["copy_gbps"]
        else:
            row["flops"] = work
            row["tflops"] = work / (t.p50 * 1e-3) / 1e12
            row["pct_roofline"] = 100 * row["tflops"] / roof["matmul_tflops"]
        notes = []
        if t.p20 > 0 and t.p80 / t.p20 > NOISY:
            row["noisy"] = True
            notes.append(f"noisy: p80/p20 = {t.p80 / t.p20:.2f} > {NOISY}")
        if row["pct_roofline"] > 110:
            notes.append("above the measured ceiling: data stayed in cache, or the ceiling's own run was disturbed")
        row["reason"] = "; ".join(notes)
        rows.append(row)
    for baseline, col in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
        b = next((r for r in rows if r["provider"] == baseline and r["status"] == "ok"), None)
        for r in rows:
            if b is not None and r["ms_p50"]:
                r[col] = b["ms_p50"] / r["ms_p50"]
    return rows


def plan(cfg: Config, result: dict) -> list[Problem]:
    """The problems to run, in order: shape preset outermost, so a time budget cuts whole presets, not ops."""
    env = result["env"]
    specs: list[OpSpec] = []
    for name in cfg.ops:
        why = unavailable_reason(name) if name in OPS else "unknown op"
        if why:
            result["rows"].append(_row(env, name, None, "-", None, None, None, "skipped", "not available: " + why))
        else:
            specs.append(OPS[name])
    if cfg.model:
        spec, why = model_spec(cfg.model)
        if spec is None:
            result["rows"].append(_row(env, f"model:{cfg.model}", cfg.model, "-", None, None, None, "skipped", why))
        else:
            specs.append(spec)
    for spec in specs:
        result["formulas"][spec.name] = {"summary": spec.summary, "metric": spec.metric,
                                         **{m: spec.formula_for(m) for m in _modes(spec, cfg, [])}}
    problems, seen = [], {}
    for preset in cfg.presets:
        for spec in specs:
            modes = _modes(spec, cfg, result["notes"])
            shapes = parse_shape(preset) or spec.shape(preset, cfg.device.type)
            if shapes is None:
                result["notes"].append(f"{spec.name}: no {preset} shape")
                continue
            for shape in shapes if isinstance(shapes, list) else [shapes]:
                shape = tuple(shape)
                if (spec.name, shape) in seen:
                    result["notes"].append(f"{spec.name}: {preset} has the same shape as {seen[spec.name, shape]} "
                                           f"({_shape_str(shape)}) on {cfg.device.type}; not repeated")
                    continue
                seen[spec.name, shape] = preset
                for dtype in cfg.dtypes:
                    for mode in modes:
                        problems.append(Problem(spec, preset, shape, dtype, cfg.device, mode))
    return problems


def _modes(spec: OpSpec, cfg: Config, notes: list) -> list[str]:
    """The modes ``spec`` runs in: --mode when given, else the op's own default (e.g. fwd+bwd for a loss, whose
    peak memory is that of the whole step), else the run's; minus the modes the op does not have (noted once)."""
    wanted = cfg.modes if cfg.modes_explicit or spec.default_modes is None else list(spec.default_modes)
    dropped = [m for m in wanted if m not in spec.modes]
    note = f"{spec.name}: has no {'/'.join(dropped)} mode (it runs {', '.join(spec.modes)})"
    if dropped and cfg.modes_explicit and note not in notes:
        notes.append(note)
    return [m for m in wanted if m in spec.modes]


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    env = fingerprint(cfg.device, cfg.argv)
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    result = {"schema": SCHEMA, "env": env, "config": {
        "ops": cfg.ops, "model": cfg.model, "device": str(cfg.device), "dtypes": [dtype_name(d) for d in cfg.dtypes],
        "modes": cfg.modes, "shapes": cfg.presets, "quick": cfg.quick, "providers": cfg.providers,
        "excluded": cfg.exclude, "time_budget_s": cfg.time_budget, "seed": seed,
    }, "formulas": {}, "notes": [], "rows": []}
    env["roofline"] = roofline.measure(cfg.device, cfg.quick)
    problems = plan(cfg, result)
    if cfg.on_start is not None:
        cfg.on_start(result)
    progress = _Progress(len(problems), cfg.progress)
    group = None
    try:
        for i, p in enumerate(problems):
            label = f"{p.spec.name} {p.preset} {dtype_name(p.dtype)} {p.mode}"
            progress.start(label)
            if cfg.time_budget is not None and time.perf_counter() - start > cfg.time_budget:
                result["rows"].append(_row(env, p.spec.name, p.preset, "-", p.mode, p.shape, p.dtype, "skipped",
                                           f"time budget of {cfg.time_budget:.0f} s used up"))
            else:
                if p.key != group:
                    harness.clear_compiled()
                    group = p.key
                gen = torch.Generator(device=cfg.device).manual_seed(seed + i)
                try:
                    result["rows"] += run_problem(p, cfg, env, gen)
                except Exception as e:  # noqa: BLE001  inputs or the fp64 reference broke: say so, go on
                    result["rows"].append(_row(env, p.spec.name, p.preset, "-", p.mode, p.shape, p.dtype, "FAIL",
                                               "harness (inputs or fp64 reference) raised " + _brief(e)))
            progress.finish()
            result["wall_s"] = time.perf_counter() - start
            if cfg.on_update is not None:
                cfg.on_update(result)
    finally:
        progress.close()
        harness.clear_compiled()
    result["wall_s"] = time.perf_counter() - start
    env["load_avg_1m_end"] = load_avg()
    return result
