"""``bench --suite overhead``: host time per call of every public op at decode sizes, against the eager call it
replaces.

At decode sizes a kernel runs in microseconds, so the cost of a call is its host path: argument checks, backend
choice, autograd bookkeeping, allocation and the op dispatch. This suite measures exactly that.

Shapes are one token of a GPT-2-small layer: C = 768, H = 12, D = 64, a KV cache of 128, MLP hidden 3072 (SwiGLU
2048). Each case has an eager PyTorch call (what a user would write without gptkernels) and the gptkernels call, once
per usable kernel backend (the Triton interpreter is a test tool and is left out).

Timing. CPU: per provider, a block of ``calls`` back-to-back calls timed with ``time.perf_counter_ns``; providers
are interleaved block by block (eager, then each backend, then eager again ...) so that a change of machine load hits
every provider alike; p20/p50/p80 of the per-call time over the rounds. CUDA: the same blocks, each ended by one
``torch.cuda.synchronize``; the reported time is the host time to issue the block (before the synchronize), and
``sync_us_p50`` the time including it. Modes: ``no_grad`` (under ``torch.no_grad``) and ``grad`` (inputs that
require grad, grad mode on: the forward that builds the autograd graph; the backward is not timed here).

The ratio column is gptkernels time / eager time (the host-cost budget is <= 1.25). Before timing, every provider's
output is compared with the eager output (a wrong call is reported as FAIL and not timed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BUDGET = 1.25  # the host-cost budget: gptkernels time / eager time
MODES = ("no_grad", "grad")


@dataclass
class Case:
    op: str
    shape: str  # for the table: the shapes of the main inputs
    make: Callable[[torch.dtype, torch.device, torch.Generator], dict]  # keyword inputs
    grad_inputs: tuple[str, ...]  # which inputs require grad in "grad" mode (empty: no grad mode)
    eager: Callable[..., object]
    ours: Callable[[str], Callable[..., object]]  # backend -> call taking the same keywords
    eager_desc: str


def _randn(shape, dtype, device, gen, std=1.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


C, H, D, T_CACHE, HID, HID_SWIGLU = 768, 12, 64, 128, 3072, 2048
LOSS_ROWS, LOSS_V = 8, 512  # a loss small enough that the call's host path, not its math, is what is timed


def _norm_inputs(dtype, device, gen):
    return {"x": _randn((1, 1, C), dtype, device, gen), "weight": 1 + _randn((C,), dtype, device, gen, 0.1),
            "bias": _randn((C,), dtype, device, gen, 0.1)}


def _norm_res_inputs(dtype, device, gen):
    d = _norm_inputs(dtype, device, gen)
    d["residual"] = _randn((1, 1, C), dtype, device, gen)
    return d


def _rms_inputs(dtype, device, gen):
    d = _norm_inputs(dtype, device, gen)
    del d["bias"]
    return d


def _decode_inputs(dtype, device, gen):
    return {"q": _randn((1, H, 1, D), dtype, device, gen), "k": _randn((1, H, T_CACHE, D), dtype, device, gen),
            "v": _randn((1, H, T_CACHE, D), dtype, device, gen)}


def _mlp_inputs(dtype, device, gen):
    s = 1 / math.sqrt(C)
    return {"x": _randn((1, 1, C), dtype, device, gen), "w_fc": _randn((HID, C), dtype, device, gen, s),
            "b_fc": _randn((HID,), dtype, device, gen, 0.1), "w_proj": _randn((C, HID), dtype, device, gen, s / 2),
            "b_proj": _randn((C,), dtype, device, gen, 0.1)}


def _swiglu_inputs(dtype, device, gen):
    s = 1 / math.sqrt(C)
    return {"x": _randn((1, 1, C), dtype, device, gen), "w_gate": _randn((HID_SWIGLU, C), dtype, device, gen, s),
            "w_up": _randn((HID_SWIGLU, C), dtype, device, gen, s),
            "w_down": _randn((C, HID_SWIGLU), dtype, device, gen, s / 2)}


def _ce_inputs(dtype, device, gen):
    return {"logits": _randn((LOSS_ROWS, LOSS_V), dtype, device, gen),
            "target": torch.randint(0, LOSS_V, (LOSS_ROWS,), device=device, generator=gen)}


def _lce_inputs(dtype, device, gen):
    return {"h": _randn((LOSS_ROWS, C), dtype, device, gen), "weight": _randn((LOSS_V, C), dtype, device, gen, 0.05),
            "target": torch.randint(0, LOSS_V, (LOSS_ROWS,), device=device, generator=gen)}


def _qlinear_inputs(dtype, device, gen):
    from gptkernels.ops.qlinear import dequantize_weight, quantize_weight

    q, scales = quantize_weight(torch.randn((C, C), device=device, generator=gen) * C ** -0.5, bits=8)
    return {"x": _randn((1, 1, C), dtype, device, gen), "weight": dequantize_weight(q, scales, dtype=dtype),
            "qweight": q, "scales": scales}


def _ln_res_eager(x, weight, bias, residual):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias), h


def cases() -> list[Case]:
    import gptkernels as gk

    seqlens = {}

    def lens(device):  # the (B,) cache lengths: made once per device, as a decode loop keeps them
        if device not in seqlens:
            seqlens[device] = torch.full((1,), T_CACHE, dtype=torch.int32, device=device)
        return seqlens[device]

    return [
        Case("layer_norm", f"1x1x{C}", _norm_inputs, ("x", "weight", "bias"),
             lambda x, weight, bias: F.layer_norm(x, (x.shape[-1],), weight, bias),
             lambda be: lambda x, weight, bias: gk.layer_norm(x, weight, bias, backend=be), "F.layer_norm"),
        Case("layer_norm+residual", f"1x1x{C}", _norm_res_inputs, ("x", "weight", "bias", "residual"),
             _ln_res_eager,
             lambda be: lambda x, weight, bias, residual: gk.layer_norm(x, weight, bias, residual=residual,
                                                                        backend=be),
             "x + r, F.layer_norm"),
        Case("rms_norm", f"1x1x{C}", _rms_inputs, ("x", "weight"),
             lambda x, weight: F.rms_norm(x, (x.shape[-1],), weight, 1e-6),
             lambda be: lambda x, weight: gk.rms_norm(x, weight, 1e-6, backend=be), "F.rms_norm"),
        Case("softmax", f"1x{H}x1x{T_CACHE}", lambda dt, dev, g: {"x": _randn((1, H, 1, T_CACHE), dt, dev, g)},
             ("x",), lambda x: torch.softmax(x, -1), lambda be: lambda x: gk.softmax(x, backend=be),
             "torch.softmax"),
        Case("scaled_dot_product_attention", f"q 1x{H}x1x{D}, kv 1x{H}x{T_CACHE}x{D}", _decode_inputs,
             ("q", "k", "v"), lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
             lambda be: lambda q, k, v: gk.scaled_dot_product_attention(q, k, v, backend=be), "F.sdpa"),
        Case("decode_attention", f"q 1x{H}x1x{D}, cache 1x{H}x{T_CACHE}x{D}", _decode_inputs, (),
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
             lambda be: lambda q, k, v: gk.decode_attention(q, k, v, lens(q.device), backend=be),
             "F.sdpa, one query"),
        Case("bias_gelu", f"1x1x{HID}",
             lambda dt, dev, g: {"x": _randn((1, 1, HID), dt, dev, g), "bias": _randn((HID,), dt, dev, g, 0.1)},
             ("x", "bias"), lambda x, bias: F.gelu(x + bias, approximate="tanh"),
             lambda be: lambda x, bias: gk.bias_gelu(x, bias, backend=be), "F.gelu(x + b)"),
        Case("fused_mlp", f"1x1x{C} -> {HID}", _mlp_inputs, ("x", "w_fc", "b_fc", "w_proj", "b_proj"),
             lambda x, w_fc, b_fc, w_proj, b_proj: F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"),
                                                            w_proj, b_proj),
             lambda be: lambda x, w_fc, b_fc, w_proj, b_proj: gk.fused_mlp(x, w_fc, b_fc, w_proj, b_proj, backend=be),
             "linear, gelu, linear"),
        Case("swiglu", f"1x1x{C} -> {HID_SWIGLU}", _swiglu_inputs, ("x", "w_gate", "w_up", "w_down"),
             lambda x, w_gate, w_up, w_down: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down),
             lambda be: lambda x, w_gate, w_up, w_down: gk.swiglu(x, w_gate, w_up, w_down, backend=be),
             "linear x2, silu, mul, linear"),
        Case("cross_entropy", f"{LOSS_ROWS}x{LOSS_V}", _ce_inputs, ("logits",),
             lambda logits, target: F.cross_entropy(logits, target),
             lambda be: lambda logits, target: gk.cross_entropy(logits, target, backend=be), "F.cross_entropy"),
        # No grad mode: with grad, its forward also computes dh and dW (two more GEMMs that eager runs in backward),
        # so a forward-only ratio would not be host cost; the default suite times it fwd+bwd.
        Case("linear_cross_entropy", f"{LOSS_ROWS}x{C} @ {LOSS_V}x{C}", _lce_inputs, (),
             lambda h, weight, target: F.cross_entropy(F.linear(h, weight), target),
             lambda be: lambda h, weight, target: gk.linear_cross_entropy(h, weight, target, backend=be),
             "F.linear, F.cross_entropy"),
        Case("quantized_linear", f"1x1x{C} -> {C}, int8", _qlinear_inputs, (),
             lambda x, weight, qweight, scales: F.linear(x, weight),
             lambda be: lambda x, weight, qweight, scales: gk.quantized_linear(x, qweight, scales, backend=be),
             "F.linear, float weight"),
    ]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _close(a, b, dtype) -> float:
    """Max error of ``a`` against ``b`` relative to max|b| (0 for two empty tensors)."""
    a, b = _first(a).detach().double(), _first(b).detach().double()
    if a.shape != b.shape:
        return math.inf
    if torch.isnan(a).any() or torch.isnan(b).any():
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _tol(dtype) -> float:
    # Outputs are compared with eager in the same dtype: a smoke check that the timed call is the right call, not
    # the accuracy test (tests/ hold those, against fp64).
    return {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}.get(dtype, 1e-4)


def _block(fn, kw, calls, cuda):
    """Per-call host microseconds of ``calls`` back-to-back calls (CUDA: issue time, and time through a sync)."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn(**kw)
    t1 = time.perf_counter_ns()
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter_ns()
    return (t1 - t0) / calls / 1e3, (t2 - t0) / calls / 1e3


def _quantiles(xs):
    t = torch.tensor(sorted(xs), dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8)]


def run(device: torch.device, dtypes, backends=None, ops=None, rounds=25, calls=200, threads=1, argv=None,
        progress=True) -> dict:
    """Run the suite; returns a result dict (the bench JSON schema, rows with us_p20/p50/p80)."""
    import sys

    from gptkernels import _dispatch
    from gptkernels.bench.env import fingerprint, load_avg
    from gptkernels.bench.runner import NOISY, SCHEMA, _row, dtype_name

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    env = fingerprint(device, argv)
    kernel_backends = [b for b in ("cuda", "triton", "cpu") if _dispatch.backend_reason(b, device) is None]
    if device.type == "cpu":  # the interpreter is a test tool: its host time means nothing
        kernel_backends = [b for b in kernel_backends if b != "triton"]
    if backends:
        kernel_backends = [b for b in kernel_backends if b in backends]
    result = {"schema": SCHEMA, "suite": "overhead", "env": env, "config": {
        "device": str(device), "dtypes": [dtype_name(d) for d in dtypes], "backends": kernel_backends,
        "rounds": rounds, "calls_per_round": calls, "threads": torch.get_num_threads(), "budget_ratio": BUDGET,
    }, "notes": [], "rows": []}
    cuda = device.type == "cuda"
    try:
        for case in cases():
            if ops and case.op not in ops:
                continue
            for dtype in dtypes:
                for mode in MODES:
                    if mode == "grad" and not case.grad_inputs:
                        continue
                    if progress:
                        print(f"[overhead] {case.op} {dtype_name(dtype)} {mode}", file=sys.stderr, flush=True)
                    result["rows"] += _run_case(case, dtype, mode, device, kernel_backends, rounds, calls, cuda, env,
                                                _row)
    finally:
        torch.set_num_threads(old_threads)
    result["wall_s"] = time.perf_counter() - start
    env["load_avg_1m_end"] = load_avg()
    for r in result["rows"]:
        r["noisy"] = bool(r.get("us_p20") and r["us_p80"] / r["us_p20"] > NOISY)
    return result


def _run_case(case, dtype, mode, device, backends, rounds, calls, cuda, env, make_row):
    gen = torch.Generator(device=device).manual_seed(0)
    kw = case.make(dtype, device, gen)
    if mode == "grad":
        for name in case.grad_inputs:
            kw[name].requires_grad_(True)
    providers = [("eager", case.eager)] + [(f"gptkernels-{b}", case.ours(b)) for b in backends]
    ctx = torch.no_grad if mode == "no_grad" else torch.enable_grad
    rows, live = {}, []
    with ctx():
        want = case.eager(**kw)
        for name, fn in providers:
            row = make_row(env, case.op, "decode", name, mode, None, dtype, "ok")
            row.update(shape=case.shape, eager_call=case.eager_desc)
            try:
                err = _close(fn(**kw), want, dtype)
            except Exception as e:  # noqa: BLE001  an op that cannot run here is a row, not a crash
                row.update(status="FAIL", reason=f"raised {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                rows[name] = row
                continue
            row["err"] = err
            if not err <= _tol(dtype):
                row.update(status="FAIL", reason=f"output differs from eager: max rel err {err:.2e}")
            else:
                live.append((name, fn))
            rows[name] = row
        for _, fn in live:  # warm-up: first-call allocations, lazy imports, caches
            _block(fn, kw, max(10, calls // 10), cuda)
        times = {name: ([], []) for name, _ in live}
        for _ in range(rounds):
            for name, fn in live:  # interleaved: every provider sees the same machine state
                host, synced = _block(fn, kw, calls, cuda)
                times[name][0].append(host)
                times[name][1].append(synced)
    eager_p50 = None
    for name, _ in live:
        p20, p50, p80 = _quantiles(times[name][0])
        row = rows[name]
        row.update(us_p20=p20, us_p50=p50, us_p80=p80, ms_p20=p20 / 1e3, ms_p50=p50 / 1e3, ms_p80=p80 / 1e3,
                   samples=len(times[name][0]) * calls)
        if cuda:
            row["sync_us_p50"] = _quantiles(times[name][1])[1]
        if name == "eager":
            eager_p50 = p50
    for name, row in rows.items():
        if row.get("us_p50") and eager_p50:
            row["ratio_vs_eager"] = row["us_p50"] / eager_p50
            row["speedup_vs_eager"] = eager_p50 / row["us_p50"]
            if name != "eager":
                row["within_budget"] = row["ratio_vs_eager"] <= BUDGET
    return list(rows.values())


def markdown(result: dict) -> str:
    """The table: one line per (op, dtype, mode), eager µs then each backend's µs and ratio."""
    from gptkernels.bench.report import header

    rows = result["rows"]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "eager"]
    cuda = result["env"]["device"] == "cuda"
    unit = "host µs to issue a call" if cuda else "µs per call"
    lines = [header(result), "",
             f"Host time per call at decode sizes ({unit}, p50 [p20, p80]; ratio = gptkernels / eager, budget "
             f"≤ {BUDGET}x; {result['config']['threads']} torch thread(s)).", "",
             "| op | shape | dtype | mode | eager call | eager µs | "
             + " | ".join(f"{p} µs | ratio" for p in providers) + " |",
             "|" + "---|" * (6 + 2 * len(providers))]
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["dtype"], r["mode"]), {})[r["provider"]] = r

    def cell(r):
        if r is None:
            return "–"
        if r["status"] != "ok":
            return "FAIL"
        return f"{r['us_p50']:.2f} [{r['us_p20']:.2f}, {r['us_p80']:.2f}]"

    for (op, dtype, mode), g in groups.items():
        e = g.get("eager")
        cells = []
        for p in providers:
            r = g.get(p)
            ratio = r.get("ratio_vs_eager") if r else None
            mark = "" if ratio is None or ratio <= BUDGET else " ✗"
            cells += [cell(r), f"{ratio:.2f}x{mark}" if ratio is not None else "–"]
        lines.append(f"| {op} | {(e or next(iter(g.values())))['shape']} | {dtype} | {mode} | "
                     f"{(e or {}).get('eager_call', '')} | {cell(e)} | " + " | ".join(cells) + " |")
    over = [r for r in rows if r.get("within_budget") is False]
    fails = [r for r in rows if r["status"] == "FAIL"]
    lines.append("")
    lines.append(f"{len(over)} row(s) over the {BUDGET}x budget, {len(fails)} FAIL; wall time "
                 f"{result.get('wall_s', 0):.0f} s" + (f"; load average {result['env'].get('load_avg_1m')} -> "
                                                        f"{result['env'].get('load_avg_1m_end')}"))
    for r in fails:
        lines.append(f"- FAIL {r['op']} {r['provider']} {r['mode']}: {r['reason']}")
    return "\n".join(lines)
