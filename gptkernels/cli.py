"""python -m gptkernels <command>: info (what this install contains and can run), bench (the benchmark suite),
train (a GPT on the kernels), finetune (classify texts or continue pre-training), generate (sample from one),
profile (inference latency side by side).

train, finetune, generate, profile and bench take --threads N (threads for torch and the C++ kernels); on a machine
where other work holds cores they print a one-line hint at start. GPTKERNELS_BACKEND=<backend> is checked at start."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from gptkernels import _runtime

# The model-running commands: (module gptkernels.<name> with add_arguments(parser) and run(args), help). Each gets
# --threads and the shared start-up of gptkernels/_runtime.py.
COMMANDS = (
    ("train", "train a GPT on the kernels (default: the Python stdlib sources, byte-level, CPU)"),
    ("finetune", "fine-tune a GPT: classify texts (GPT-1's recipe) or continue pre-training (CPU default: 2 min)"),
    ("generate", "continue a prompt with a GPT (random, trained checkpoint or Hugging Face)"),
    ("profile", "inference latency: prefill and per-token decode, eager vs gptkernels vs compile"),
)


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
                f"archs {info['compiled_backends']['cuda']}" if b["cuda"] else
                f"no CUDA kernels in this build: {b.get('cuda_why') or 'reason not recorded'}")
        omp = f"on, {_runtime.threads_text(b['openmp_max_threads'])}" if b["openmp"] else "off"
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
    print(_backend_env_line(info))
    print("after a call, gptkernels.explain() tells which backend ran and why")
    return 0


def _backend_env_line(info: dict) -> str:
    env = os.environ.get("GPTKERNELS_BACKEND", "").strip()
    if not env:
        return "GPTKERNELS_BACKEND is not set"
    from gptkernels import _dispatch

    try:
        _dispatch.requested()
    except ValueError as e:
        return f"{e} (every command exits with this error)"
    if env == "auto":
        return "GPTKERNELS_BACKEND=auto"
    where = [dev for dev, reasons in info["usable"].items() if reasons.get(env) is None]
    return f"GPTKERNELS_BACKEND={env}: " + (f"runs on {', '.join(where)}" if where else "cannot run on any device here")


def _plain(text: str | None) -> str | None:
    """Help text as argparse prints it, raw: docstrings' RST literals (double backticks) become plain text."""
    return None if text is None else text.replace("``", "")


def _bench_threads(args) -> int | None:
    return 1 if args.suite == "overhead" else None  # the overhead suite's own default (see bench --help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gptkernels", description=_plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, compiled backends, and which backends can run here (with reasons)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    from gptkernels.bench import cli as bench_cli

    p = sub.add_parser("bench", help="benchmark every kernel against eager PyTorch and torch.compile",
                       description=_plain(bench_cli.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_cli.add_arguments(p)  # its own --threads (the overhead suite defaults to 1)
    p.set_defaults(func=_runtime.command("bench", bench_cli.run, default_threads=_bench_threads))
    for name, help_ in COMMANDS:
        mod = importlib.import_module(f"gptkernels.{name}")
        p = sub.add_parser(name, help=help_, description=_plain(mod.__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        _runtime.add_arguments(p)
        p.set_defaults(func=_runtime.command(name, mod.run))
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = ["python", "-m", "gptkernels", *argv]  # the command line as results record it
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
