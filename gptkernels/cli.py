"""``python -m gptkernels <command>``: info (what this install contains and can run), bench (the benchmark suite),
train (a GPT on the kernels), generate (sample from one), profile (inference latency side by side)."""

from __future__ import annotations

import argparse
import json
import sys


def _yes_no(reason):
    return "yes" if reason is None else f"no: {reason}"


def cmd_info(args) -> int:
    from gptkernels import _dispatch

    info = _dispatch.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    b = info["build"]
    print(f"gptkernels {info['gptkernels']}  (python {info['python']})")
    print(f"torch      {info['torch']}  (CUDA {info['torch_cuda'] or 'none'})")
    print(f"triton     {info['triton'] or 'not installed'}"
          f"{'  [TRITON_INTERPRET=1: Triton runs on CPU tensors]' if info['triton_interpret'] else ''}")
    if b.get("error"):
        print(f"extension  NOT LOADED: {b['error']}")
    else:
        cuda = (f"CUDA runtime {b['cuda_runtime_version'] // 1000}.{b['cuda_runtime_version'] % 1000 // 10}, "
                f"archs {info['compiled_backends']['cuda']}" if b["cuda"] else "no CUDA kernels in this build")
        omp = f"on, {b['openmp_max_threads']} threads" if b["openmp"] else "off"
        print(f"extension  gptkernels._C ({b['compiler']}, OpenMP {omp}; {cuda})")
    print("gpus       " + (", ".join(info["gpus"]) if info["gpus"] else "none visible"))
    print("\ncompiled backends:")
    for name, what in info["compiled_backends"].items():
        print(f"  {name:<7} {what if what else 'no'}")
    for dev, reasons in info["usable"].items():
        print(f"\nusable on {dev}:")
        for name, reason in reasons.items():
            print(f"  {name:<7} {_yes_no(reason)}")
    print("\nselection: backend= argument > GPTKERNELS_BACKEND > auto (cuda: cuda, triton, torch; cpu: cpu, torch)")
    print("after a call, gptkernels.explain() tells which backend ran and why")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, compiled backends, and which backends can run here (with reasons)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    from gptkernels.bench import cli as bench_cli

    p = sub.add_parser("bench", help="benchmark every kernel against eager PyTorch and torch.compile",
                       description=bench_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_cli.add_arguments(p)
    p.set_defaults(func=bench_cli.run)
    import importlib

    for name, help_ in (("train", "train a GPT on the kernels (default: the Python stdlib sources, byte-level, CPU)"),
                        ("generate", "continue a prompt with a GPT (random, trained checkpoint or Hugging Face)"),
                        ("profile", "inference latency: prefill and per-token decode, eager vs gptkernels vs compile")):
        mod = importlib.import_module(f"gptkernels.{name}")
        p = sub.add_parser(name, help=help_, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
