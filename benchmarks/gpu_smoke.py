"""Smoke test of every public op on one backend, in ~30 s: does it run, and is it roughly right?

    python3 benchmarks/gpu_smoke.py                      # backend cuda, bf16, on the GPU
    python3 benchmarks/gpu_smoke.py --device cpu         # the same plumbing on a machine without a GPU

One line per op: `SMOKE PASS|FAIL <op> rel_err=... max_err=... <ms> ms <backend: why>`, then `SMOKE SUMMARY`.
Each op runs at a GPT-2-sized shape (C=768, head dim 64: the vectorized kernel paths), forward and, where listed,
backward with one random dy through torch.autograd.grad, against the op's own reference (gptkernels.ops.<stem>.
<stem>_ref) in fp64 on the same device. The bound is deliberately loose (relative norm error 3e-2 for 16-bit,
1e-4 for fp32: a wrong kernel is off by O(1)); tests/ hold every op to the HOUSE_STYLE bounds. A failing op
(wrong, NaN or raising) never stops the others. Exit status: the number of failing ops (0 = all passed).
"""

import argparse
import math
import sys
import time
import traceback

import torch

import gptkernels
from gptkernels.ops.attention import attention_ref, decode_attention_ref
from gptkernels.ops.layernorm import layer_norm_ref, rms_norm_ref
from gptkernels.ops.mlp import bias_gelu_ref, fused_mlp_ref, swiglu_ref
from gptkernels.ops.softmax import softmax_ref

BOUND = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def _rand(*shape, scale=1.0):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).mul_(scale).to(DT)


def _grads(fn, inputs, dy):
    """(outputs, grads of every input) through torch.autograd.grad with one shared dy (outputs: tuple)."""
    leaves = [t.detach().clone().requires_grad_(dy is not None and t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = ()
    if dy is not None:
        grads = torch.autograd.grad(outs[0], [t for t in leaves if t.requires_grad], dy.to(outs[0].dtype))
    return tuple(o.detach() for o in outs), tuple(grads)


def _f64(ts):
    return [t.double() if t is not None and t.is_floating_point() else t for t in ts]


# Each case: (name, stem for gptkernels.last, inputs, ours(*inputs), ref(*inputs), dy shape or None).
def cases():
    B, H, T, D, C = 2, 12, 256, 64, 768
    M = 1024  # tokens of the MLP cases
    q, k, v = (_rand(B, H, T, D) for _ in range(3))
    seqlens = torch.tensor([300, 512], device=DEV, dtype=torch.int32)
    kc, vc = _rand(B, H, 512, D), _rand(B, H, 512, D)
    qd = _rand(B, H, 1, D)
    be = BACKEND
    return [
        ("layer_norm", "layer_norm", [_rand(4096, C), _rand(C), _rand(C)],
         lambda x, w, b: gptkernels.layer_norm(x, w, b, backend=be), layer_norm_ref, None),
        ("rms_norm+residual", "rms_norm", [_rand(4096, C), _rand(C), _rand(4096, C)],
         lambda x, w, r: gptkernels.rms_norm(x, w, residual=r, backend=be),
         lambda x, w, r: rms_norm_ref(x, w, residual=r), None),
        ("softmax causal", "softmax", [_rand(B, H, T, T, scale=4.0)],
         lambda x: gptkernels.softmax(x, scale=0.125, causal=True, backend=be),
         lambda x: softmax_ref(x, scale=0.125, causal=True), None),
        ("sdpa causal fwd+bwd", "scaled_dot_product_attention", [q, k, v],
         lambda q, k, v: gptkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend=be),
         lambda q, k, v: attention_ref(q, k, v, is_causal=True), (B, H, T, D)),
        ("decode_attention", "decode_attention", [qd, kc, vc, seqlens],
         lambda q, k, v, s: gptkernels.decode_attention(q, k, v, s, backend=be), decode_attention_ref, None),
        ("bias_gelu", "bias_gelu", [_rand(M, 4 * C), _rand(4 * C)],
         lambda x, b: gptkernels.bias_gelu(x, b, backend=be), bias_gelu_ref, None),
        ("fused_mlp fwd+bwd", "fused_mlp",
         [_rand(M, C), _rand(4 * C, C, scale=C**-0.5), _rand(4 * C, scale=0.1),
          _rand(C, 4 * C, scale=(4 * C) ** -0.5), _rand(C, scale=0.1), _rand(M, C)],
         lambda x, wf, bf, wp, bp, r: gptkernels.fused_mlp(x, wf, bf, wp, bp, residual=r, backend=be),
         lambda x, wf, bf, wp, bp, r: fused_mlp_ref(x, wf, bf, wp, bp, residual=r), (M, C)),
        ("swiglu fwd+bwd", "swiglu",
         [_rand(M, C), _rand(2048, C, scale=C**-0.5), _rand(2048, C, scale=C**-0.5), _rand(C, 2048, scale=2048**-0.5)],
         lambda x, wg, wu, wd: gptkernels.swiglu(x, wg, wu, wd, backend=be), swiglu_ref, (M, C)),
    ]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item(), (out - ref).abs().max().item()


def run_case(name, stem, inputs, ours, ref, dy_shape):
    dy = torch.randn(*dy_shape, device=DEV, dtype=torch.float64) if dy_shape else None
    sync()
    t0 = time.perf_counter()
    outs, grads = _grads(ours, inputs, dy)
    sync()
    ms = (time.perf_counter() - t0) * 1e3
    outs64, grads64 = _grads(ref, _f64(inputs), dy)
    worst, worst_max, nan = 0.0, 0.0, False
    for got, want in zip(outs + grads, outs64 + grads64):
        nan |= bool(torch.isnan(got).any())
        e, m = rel_err(got, want)
        worst, worst_max = max(worst, e), max(worst_max, m)
    rec = gptkernels.last(stem)
    ok = not nan and math.isfinite(worst) and worst <= BOUND[DT]
    why = f"{rec[0]}: {rec[1][:90]}" if rec else "no dispatch record"
    return ok, f"rel_err={worst:.2e} max_err={worst_max:.2e}{' NaN' if nan else ''} {ms:7.1f} ms  [{why}]"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def main():
    global DEV, DT, BACKEND
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backend", default=None, help="default: the device's C++ backend (cuda or cpu)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    DEV, DT, BACKEND = args.device, getattr(torch, args.dtype), args.backend or args.device
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print(f"SMOKE backend={BACKEND} device={DEV} dtype={args.dtype} torch {torch.__version__} "
          f"build {gptkernels._dispatch.build_info()}", flush=True)
    if DEV == "cuda":
        print(f"SMOKE gpu: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})",
              flush=True)
    try:
        todo = cases()
    except Exception as e:  # input creation itself failed (no device): every op fails, one line each
        print(f"SMOKE FAIL inputs: {type(e).__name__}: {e}", flush=True)
        return 99
    fails = []
    for name, stem, inputs, ours, ref, dy_shape in todo:
        try:
            ok, msg = run_case(name, stem, inputs, ours, ref, dy_shape)
        except Exception as e:  # one broken op never stops the rest
            ok, msg = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            traceback.print_exc(limit=3, file=sys.stdout)
        print(f"SMOKE {'PASS' if ok else 'FAIL'} {name:<22} {msg}", flush=True)
        if not ok:
            fails.append(name)
    n = len(todo)
    print(f"SMOKE SUMMARY {n - len(fails)}/{n} passed{' (failed: ' + ', '.join(fails) + ')' if fails else ''} "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return len(fails)


if __name__ == "__main__":
    sys.exit(main())
