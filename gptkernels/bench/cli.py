"""python -m gptkernels bench: benchmark every provider of every op on this machine's best device.

Every row is checked against the fp64 reference before it is timed; a wrong provider is reported as FAIL and not
timed. The screen gets the machine and versions, progress (stderr), then the verdict: per op, the fastest gptkernels
backend's speedup over eager PyTorch and torch.compile, the geometric mean over ops, FAILs, skipped providers (one
line per reason) and the paths of the result files. The per-row detail (ms p20/p50/p80, GB/s or FLOP/s, % of the
ceiling measured in the same run) goes to results.json, results.csv and results.md in --out; --verbose prints it too.

Examples:
  python -m gptkernels bench --quick                 a first look in about a minute (CPU)
  python -m gptkernels bench --ops layernorm --verbose
  python -m gptkernels bench --summary bench-out/results.json
  python -m gptkernels bench --compare old/results.json bench-out/results.json

Exit status: 0, or 1 if any row FAILed (--compare: 1 on a regression, see --compare).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from gptkernels import _runtime

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=("ops", "overhead"), default="ops",
                   help="ops (default): throughput of every op at model shapes; overhead: host time per call of every "
                        "public op at decode sizes vs the eager call it replaces (gptkernels/bench/overhead.py)")
    _runtime.add_arguments(p, "threads for torch and the C++ kernels' OpenMP (default: the overhead suite 1, the "
                           "ops suite torch's, one per core)")
    p.add_argument("--ops", type=_csv, default=None,
                   help="comma list of ops, or 'all' (default: the device's default suite; see --list)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present, else cpu")
    p.add_argument("--dtype", type=_csv, default=None, help="comma list: float32, bfloat16, float16 (default: "
                   "bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--mode", type=_csv, default=None, help="comma list of fwd, bwd, fwd+bwd (default: fwd,bwd; "
                   "fwd+bwd for the losses, fwd for inference-only ops); bwd times the backward alone, fwd+bwd both")
    p.add_argument("--shapes", type=_csv, default=None,
                   help="comma list of presets (gpt2, gpt2-xl, llama-7b, standard = 16384x4096, tiny) or explicit "
                        "shapes like 4096x768 (default: cpu: gpt2,gpt2-xl,llama-7b; cuda: standard,gpt2,gpt2-xl,"
                        "llama-7b; --quick: gpt2 on cpu, standard on cuda)")
    p.add_argument("--providers", type=_csv, default=None,
                   help="only these providers (eager, compile, gptkernels-cpu, gptkernels-cuda, gptkernels-triton)")
    p.add_argument("--quick", action="store_true",
                   help="a first look (about a minute on a 2-core CPU): one shape preset (gpt2 on CPU, standard on "
                        "CUDA), shorter timing and smaller roofline probes, and on CPU no torch.compile; rougher "
                        "numbers than a full run")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default: bench-out/)")
    p.add_argument("--plot", nargs="?", const="per-op", choices=("per-op", "combined"), default=None,
                   help="also write PNGs into --out: throughput against shape, one line per provider and the "
                        "measured ceiling as a dashed line; per-op (the default) is one file per op, combined one "
                        "figure of all ops (needs matplotlib)")
    p.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                   help="compare two results.json files row by row (runs no benchmark): new/old p50 per row, SLOWER "
                        "or FASTER only beyond the rows' p20..p80 spread, and whether the runs can be compared at "
                        "all (machine, threads, --quick vs full, load). Exit status 1 if a row now FAILs, or is "
                        "SLOWER between comparable runs")
    p.add_argument("--summary", metavar="RESULTS.json",
                   help="print the verdict of an earlier run from its results.json (runs no benchmark); with "
                        "--verbose also every row")
    p.add_argument("--verbose", action="store_true",
                   help="also print the per-row detail table (ms p50 [p20, p80], throughput, %% of ceiling, "
                        "speedups, status), the skip reasons per provider and the work formulas; --compare: list "
                        "the rows within noise too")
    p.add_argument("--model", metavar="NAME",
                   help="also benchmark one step of a GPT model preset (tiny, gpt2, ...): logits and all grads")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new problem after S seconds; the rest are reported as skipped")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: fresh, recorded in the JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / per-problem lines on stderr")
    p.add_argument("--list", action="store_true", help="list ops, providers and shape presets, then exit")


def _command(args) -> list[str]:
    argv = getattr(args, "_argv", None)
    if argv is None:  # through gptkernels.cli: sys.argv is [.../__main__.py or gptkernels, 'bench', ...]
        argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    return ["python", "-m", "gptkernels", "bench", *argv]


def _list() -> int:
    from gptkernels.bench import specs
    from gptkernels.bench.registry import OPS, OpSpec, unavailable_reason

    print("ops:")
    for name, spec in OPS.items():
        why = unavailable_reason(name)
        default = ",".join(spec.default_on)
        print(f"  {name:<19} {'available' if why is None else 'not available: ' + why}  [default on: {default}]")
        if isinstance(spec, OpSpec):
            print(f"  {'':<19} {spec.summary}")
    print("providers: eager, compile, gptkernels-cuda, gptkernels-triton, gptkernels-cpu (+ any registered)")
    print("shape presets: " + ", ".join(specs.PRESETS) + "; or explicit shapes like 4096x768")
    for name, (c, h, t) in specs.MODELS.items():
        print(f"  {name:<9} C={c}, H={h}, T={t}")
    return 0


def run(args) -> int:
    if args.compare:
        from gptkernels.bench import report

        text, regressions = report.compare(report.load(args.compare[0]), report.load(args.compare[1]),
                                           verbose=args.verbose)
        print(text)
        return 1 if regressions else 0
    if args.summary:
        from gptkernels.bench import report

        result = report.load(args.summary)
        if result.get("suite") == "overhead":
            from gptkernels.bench import overhead

            print(overhead.markdown(result))
        else:
            print(report.header(result, show_busy=False))  # the verdict says it
            if args.verbose:
                print("\n" + report.detail(result))
            print("\n" + report.verdict(result, paths=[args.summary]))
        return 0
    if args.list:
        return _list()

    import torch

    if args.suite == "overhead":
        return _run_overhead(args)

    from gptkernels.bench import report, specs
    from gptkernels.bench.registry import MODES, OPS
    from gptkernels.bench.runner import Config
    from gptkernels.bench.runner import run as run_suite

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dev = device.type
    if args.ops is None:
        ops = [] if args.model else [n for n, s in OPS.items() if dev in s.default_on]
    elif args.ops == ["all"]:
        ops = list(OPS)
    else:
        ops = args.ops
    unknown = [o for o in ops if o not in OPS]
    modes = args.mode or ["fwd", "bwd"]
    bad_modes = [m for m in modes if m not in MODES]
    dtypes = args.dtype or (["bfloat16"] if dev == "cuda" else ["float32"])
    bad_dtypes = [d for d in dtypes if d not in DTYPES]
    presets = args.shapes or list((specs.QUICK_PRESETS if args.quick else specs.DEFAULT_PRESETS)[dev])
    bad_presets = [s for s in presets if s not in specs.PRESETS and specs.parse_shape(s) is None]
    for what, bad, known in (("op", unknown, list(OPS)), ("mode", bad_modes, MODES), ("dtype", bad_dtypes, DTYPES),
                             ("shape preset", bad_presets, specs.PRESETS)):
        if bad:
            print(f"bench: unknown {what} {', '.join(bad)}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
    exclude = {}
    if args.no_compile:
        exclude["compile"] = "left out by --no-compile"
    elif args.quick and dev == "cpu":
        exclude["compile"] = "left out by --quick on CPU (compiling costs seconds per shape there)"
    out = args.out

    def save(result):
        report.write(result, out)

    cfg = Config(ops=ops, device=device, dtypes=[getattr(torch, DTYPES[d]) for d in dtypes], modes=modes,
                 modes_explicit=args.mode is not None, presets=presets, quick=args.quick, providers=args.providers,
                 exclude=exclude, model=args.model,
                 time_budget=args.time_budget, seed=args.seed, argv=[shlex.quote(a) for a in _command(args)],
                 progress=not args.no_progress, on_update=save, on_start=_print_header)
    if args.threads:
        _runtime.set_threads(args.threads)
    result = run_suite(cfg)
    written = [*report.write(result, out), report.write_markdown(result, out)]
    if args.plot:
        try:
            from gptkernels.bench.plot import plot

            written += plot(result, out, combined=args.plot == "combined")
        except ImportError as e:
            print(f"bench: --plot needs matplotlib ({e}); pip install 'gptkernels[bench]'", file=sys.stderr)
    if args.verbose:
        print("\n" + report.detail(result))
    print("\n" + report.verdict(result, paths=written), flush=True)
    return 1 if any(r["status"] == "FAIL" for r in result["rows"]) else 0


def _print_header(result) -> None:
    """Before the first problem: what runs where (the busy-machine check waits for the end of the run)."""
    from gptkernels.bench import report

    print(report.header(result, show_busy=False), flush=True)


def _run_overhead(args) -> int:
    import torch

    from gptkernels.bench import overhead, report

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32"])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"bench: unknown dtype {', '.join(bad)}; choose from {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    ops = None if args.ops in (None, ["all"]) else args.ops
    known = [c.op for c in overhead.cases()]
    if ops and any(o not in known for o in ops):
        print(f"bench: unknown op for --suite overhead: {', '.join(o for o in ops if o not in known)}; choose from "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    backends = None
    if args.providers:
        backends = [p.removeprefix("gptkernels-") for p in args.providers if p != "eager"]
    rounds, calls = (7, 50) if args.quick else (25, 200)
    result = overhead.run(device, [getattr(torch, DTYPES[d]) for d in dtypes], backends=backends, ops=ops,
                          rounds=rounds, calls=calls, threads=args.threads if args.threads is not None else 1,
                          argv=[shlex.quote(a) for a in _command(args)], progress=not args.no_progress)
    jpath, cpath = report.write(result, args.out)
    print(overhead.markdown(result))
    print("\nwrote " + ", ".join(str(p) for p in (jpath, cpath)), file=sys.stderr)
    return 1 if any(r["status"] == "FAIL" for r in result["rows"]) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptkernels bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    return run(args)
