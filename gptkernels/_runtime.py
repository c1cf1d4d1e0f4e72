"""The start-up every model-running command shares (train, generate, profile, bench): the --threads option, the
GPTKERNELS_BACKEND check, the busy-machine hint, and the silencing of build-time warnings.

A command gets all of it from gptkernels/cli.py, which adds :func:`add_arguments` to its parser and registers its
``run(args)`` through :func:`command`; a new command is one more entry in cli.py's table.

Threads: torch.set_num_threads sets ATen's pool and omp_set_num_threads of the OpenMP runtime torch loaded. The C++
kernels size their parallel regions with omp_get_max_threads of the libgomp.so.1 they link, which the dynamic loader
resolves to the copy torch already loaded, so both follow --threads; :func:`set_threads` checks that and sets the
extension's runtime itself where it is a separate one.

Busy machine: with N threads, every OpenMP region (and ATen's) ends at a barrier that waits for the slowest thread;
when other processes hold a core, one of our threads is descheduled for a scheduler slice at a time. Measured on the
2-core EPYC VM with other processes keeping both cores busy (load average 2.4-4.3): train --model tiny --steps 6 ran
13,597-15,408 tok/s with 1 thread against 3,703-4,938 with 2; profile --model tiny (prompt 64, 64 new tokens) decoded
at an eager p50 of 0.95 ms per token with 1 thread against 10.0 ms with 2 (gptkernels: 0.40 against 0.66 ms).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import time

import torch

THREADS_HELP = (
    "threads for torch and the C++ kernels' OpenMP (default: torch's, one per core); on a machine where "
    "other work holds cores, fewer threads run faster"
)
# How much other work (in cores) the threads may share before the hint: at half a core of it, a barrier of N threads
# on N cores already waits on a descheduled thread for a good part of the time.
BUSY_MARGIN = 0.5
BUSY_WINDOW_S = 0.15  # the /proc/stat look; only taken when the load average already says busy


class StartupError(ValueError):
    """A setting a command cannot start with (bad --threads, GPTKERNELS_BACKEND); printed as one line, exit 2."""


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def threads_text(n: int | None = None) -> str:
    """'1 thread' / '2 threads': this process's torch thread count, or n."""
    return plural(torch.get_num_threads() if n is None else n, "thread")


def add_arguments(parser: argparse.ArgumentParser, threads_help: str = THREADS_HELP) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=threads_help)


# ------------------------------------------------------------------------------------------------------ threads
def _kernel_threads() -> int | None:
    """omp_get_max_threads of the C++ kernels' OpenMP runtime (None without the extension or OpenMP)."""
    from gptkernels import _dispatch

    info = _dispatch.build_info()
    return info.get("openmp_max_threads") if info.get("openmp") else None


def set_threads(n: int) -> None:
    """torch.set_num_threads(n), and the same for the C++ kernels' OpenMP runtime (see the module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise StartupError(f"--threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    if _kernel_threads() not in (None, n):  # a second OpenMP runtime (e.g. torch on Intel's): set it directly
        import ctypes

        try:
            ctypes.CDLL("libgomp.so.1").omp_set_num_threads(n)
        except (OSError, AttributeError):
            pass


# ------------------------------------------------------------------------------------------------- busy machine
def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _busy_ticks(cpus) -> int | None:
    """Non-idle clock ticks (user, nice, system, irq, softirq, steal) of the given CPUs from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    total, seen = 0, 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in rest.split()]
            total += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
            seen += 1
    return total if seen else None


def other_work_now(window: float = BUSY_WINDOW_S) -> float | None:
    """Cores' worth of CPU time that other processes used on our CPUs during a ``window``-second sleep (our own CPU
    time subtracted); None where /proc/stat is not readable."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    a, own_a, t_a = _busy_ticks(cpus), os.times(), time.monotonic()
    if a is None:
        return None
    time.sleep(window)
    b, own_b, t_b = _busy_ticks(cpus), os.times(), time.monotonic()
    if b is None:
        return None
    own = (own_b.user + own_b.system) - (own_a.user + own_a.system)
    return max(0.0, ((b - a) / os.sysconf("SC_CLK_TCK") - own) / (t_b - t_a))


def busy_hint(load_avg: float, now: float | None, usable: int, threads: int) -> str | None:
    """The one-line hint when other work leaves fewer free cores than ``threads``, else None.

    load_avg: the 1-minute load average; now: cores' worth of other work measured just now (None: not measured).
    Both must say busy: the load average alone still counts a run that ended seconds ago, a short look alone
    catches a burst.
    """
    if threads <= 1:
        return None
    load = load_avg if now is None else min(load_avg, now)
    if load <= usable - threads + BUSY_MARGIN:
        return None
    fix = min(threads - 1, max(1, round(usable - load)))
    return (
        f"busy machine: load {load:.1f} on {plural(usable, 'usable core')}; with {threads} threads OpenMP stalls "
        f"on a descheduled thread: try --threads {fix}"
    )


def check_busy(threads: int) -> str | None:
    """:func:`busy_hint` for this machine now (the short look only when the load average already says busy)."""
    try:
        load_avg = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    usable = usable_cores()
    if busy_hint(load_avg, None, usable, threads) is None:
        return None
    return busy_hint(load_avg, other_work_now(), usable, threads)


# ------------------------------------------------------------------------------------------------------ backend
def _device(name) -> torch.device | None:
    """The device a command will run on, as far as start-up can tell (None: the command reports the problem)."""
    try:
        device = torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError, ValueError):
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return None
    return device


def check_backend_env(device: torch.device | None) -> None:
    """Raise StartupError when GPTKERNELS_BACKEND names no backend, or one that cannot run on ``device``."""
    from gptkernels import _dispatch

    try:
        name, source = _dispatch.requested()
    except ValueError as e:
        raise StartupError(str(e)) from None
    if source != "GPTKERNELS_BACKEND" or name == "auto" or device is None:
        return
    why = _dispatch.backend_reason(name, device)
    if why is not None:
        ok = [b for b in _dispatch.BACKENDS if _dispatch.backend_reason(b, device) is None]
        raise StartupError(
            f"GPTKERNELS_BACKEND={name} cannot run on {device}: {why}; unset it or set one of {', '.join(ok)}, auto"
        )


def backend_text(backend: str | None = None) -> str:
    """The backend a command asks for, for its banner: 'auto', 'cpu', or 'torch (from GPTKERNELS_BACKEND)'."""
    from gptkernels import _dispatch

    name, source = _dispatch.requested(None if backend in (None, "auto") else backend)
    return f"{name} (from GPTKERNELS_BACKEND)" if source == "GPTKERNELS_BACKEND" else name


# -------------------------------------------------------------------------------------------------------- noise
def quiet_build_warnings() -> None:
    """torch.utils.cpp_extension warns at import 'No CUDA runtime is found, using CUDA_HOME=...' on a CUDA build of
    torch without a GPU. Nothing here builds CUDA code at run time; it is imported by torch.utils.benchmark (the
    bench timers) and by torch.compile's C++ code generation, so the warning is about a toolchain nobody uses."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


# -------------------------------------------------------------------------------------------------------- start
def start(name: str, args, default_threads=None) -> None:
    """The shared start-up of command ``name``: noise off, --threads, GPTKERNELS_BACKEND, the busy-machine hint.
    default_threads(args): the threads the command runs with when --threads is not given (None: torch's)."""
    quiet_build_warnings()
    threads = getattr(args, "threads", None)
    if threads is not None:
        set_threads(threads)
    device = _device(getattr(args, "device", None))
    if getattr(args, "backend", None) in (None, "auto"):  # a --backend argument overrides the variable
        check_backend_env(device)
    if device is not None and device.type == "cpu" and os.environ.get("RANK", "0") == "0":
        used = threads or (default_threads(args) if default_threads else None) or torch.get_num_threads()
        hint = check_busy(used)
        if hint:
            print(hint, file=sys.stderr, flush=True)


def command(name: str, run, default_threads=None):
    """``run(args)`` behind :func:`start`: a start-up error prints one line and returns 2; the thread count is
    restored afterwards (for callers in the same process: tests, notebooks)."""

    @functools.wraps(run)
    def wrapped(args) -> int:
        before = torch.get_num_threads()
        try:
            try:
                start(name, args, default_threads)
            except StartupError as e:
                print(f"gptkernels {name}: error: {e}", file=sys.stderr)
                return 2
            return run(args)
        finally:
            if torch.get_num_threads() != before:
                set_threads(before)

    return wrapped
