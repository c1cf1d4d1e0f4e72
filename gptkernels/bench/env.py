"""The environment fingerprint stored with every result: enough to tell two runs' machines and builds apart."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args) -> str | None:
    try:
        # --no-optional-locks: a status must not write the index of a repo someone may be committing in.
        r = subprocess.run(["git", "--no-optional-locks", "-C", REPO, *args], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_sha() -> str | None:
    """HEAD of the checkout gptkernels runs from, with '-dirty' when it has uncommitted changes; None outside git."""
    sha = _git("rev-parse", "--short=12", "HEAD")
    if sha and _git("status", "--porcelain"):
        sha += "-dirty"
    return sha


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def fingerprint(device: torch.device, argv: list[str] | None = None) -> dict:
    from gptkernels import _dispatch
    from gptkernels._version import __version__

    device = torch.device(device)
    gpu = None
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        gpu = {"name": props.name, "sm": f"sm_{props.major}{props.minor}", "sms": props.multi_processor_count,
               "memory_gib": round(props.total_memory / 2**30, 1)}
    build = _dispatch.build_info()
    return {
        "device": device.type,
        "device_name": gpu["name"] if gpu else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "openmp_threads": build.get("openmp_max_threads"),
        "gptkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "extension": build.get("error") or "ok",
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else [os.path.basename(sys.executable)] + sys.argv),
        "load_avg_1m": load_avg(),  # other work on the machine is the usual cause of noisy CPU rows
    }


def load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
