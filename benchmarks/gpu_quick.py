"""pytest plugin for the short GPU run of benchmarks/gpu_check.sh: a small matrix per test function, one backend.

    PYTHONPATH=benchmarks python3 -m pytest -p gpu_quick tests/test_layernorm.py -v -rfE

The full GPU matrix (hundreds of cases, fp64 host references at T=4097) does not fit a run of a few minutes that
must also build and benchmark; this keeps, per test function, a few small and mid-sized cases of one backend,
spread over the dtypes, so every op is reached. Environment:

    GPTKERNELS_QUICK_BACKEND   cuda (default): gpu-marked cases that are not Triton's. triton: Triton's gpu-marked
                               cases. cpu, triton-interp: the cpu backend's / the Triton interpreter's cases (the
                               scripts' dry runs on a machine without a GPU).
    GPTKERNELS_QUICK_PER_TEST  cases kept per test function (default 6).
    GPTKERNELS_QUICK_COMPILE   0 (default): torch.compile cases left out; 1: kept; only: nothing else.

A plugin rather than a conftest option, so tests/conftest.py stays as it is.
"""

import os
import re

import torch


def _ints(v):
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, (tuple, list)):
        return [i for x in v for i in _ints(x)]
    return []


def _size(item):
    """Product of the integer parameters: a rough cost, small shapes first."""
    n = 1
    for v in getattr(item, "callspec", None).params.values() if hasattr(item, "callspec") else ():
        for i in _ints(v):
            n *= max(abs(i), 1)
    return n


def _dtype(item):
    params = item.callspec.params.values() if hasattr(item, "callspec") else ()
    return next((str(v) for v in params if isinstance(v, torch.dtype)), "")


def _wanted(item, backend, compile_mode):
    ids = re.split(r"[-\[\]]", item.callspec.id) if hasattr(item, "callspec") else []
    is_compile = "compile" in item.name
    if compile_mode == "only" and not is_compile or compile_mode == "0" and is_compile:
        return False
    triton = "triton" in ids or "triton" in item.name
    if backend == "cpu":
        return "cpu" in ids and "gpu" not in item.keywords
    if backend == "triton-interp":
        return "interp" in ids and "gpu" not in item.keywords
    if backend == "triton":
        return "gpu" in item.keywords and triton
    return "gpu" in item.keywords and not triton


# Which cases of a dtype's size-sorted list come first: mid-sized ones (real code paths, not 1x1 corner cases), then
# small, never the largest quarter (T=4097 with an fp64 host reference takes seconds per case).
_PICK = (0.4, 0.05, 0.6, 0.2, 0.3, 0.5, 0.1)


def _spread(cases):
    order = list(dict.fromkeys(int(f * len(cases)) for f in _PICK))
    return [cases[i] for i in order if i < len(cases)]


def pytest_collection_modifyitems(config, items):
    backend = os.environ.get("GPTKERNELS_QUICK_BACKEND", "cuda")
    per_test = int(os.environ.get("GPTKERNELS_QUICK_PER_TEST", "6"))
    compile_mode = os.environ.get("GPTKERNELS_QUICK_COMPILE", "0")
    groups = {}  # test function -> dtype -> [(size, index, item)]
    for idx, item in enumerate(items):
        if _wanted(item, backend, compile_mode):
            key = (item.module.__name__ if item.module else "", item.originalname)
            groups.setdefault(key, {}).setdefault(_dtype(item), []).append((_size(item), idx, item))
    keep = set()
    for by_dtype in groups.values():
        queues = [_spread(sorted(v, key=lambda t: t[:2])) for _, v in sorted(by_dtype.items())]
        picked = 0
        while picked < per_test and any(queues):
            for q in queues:  # round-robin over dtypes: the smallest case of each, then the next
                if q and picked < per_test:
                    keep.add(q.pop(0)[1])
                    picked += 1
    kept = [it for i, it in enumerate(items) if i in keep]
    dropped = [it for i, it in enumerate(items) if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept
