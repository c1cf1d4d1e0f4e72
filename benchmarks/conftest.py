"""pytest-benchmark microbenchmarks of the CPU kernels: ``pytest benchmarks/ --benchmark-only``.

Not collected by a plain ``pytest`` (pyproject's testpaths is tests/). Each case is checked against the fp64
reference before it is timed, with the same rule and the same harness as ``python -m gptkernels bench``.
Track them in CI with e.g. ``--benchmark-json=out.json`` and ``--benchmark-compare``.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(benchmark):
    """Record the thread count with every result: CPU timings mean little without it."""
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
