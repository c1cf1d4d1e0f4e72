"""Benchmark harness: ``python -m gptkernels bench`` (see :mod:`gptkernels.bench.cli` for the options).

Layers: ``registry`` (OpSpec, Provider, register_op / register_provider), ``specs`` (the ops and shape presets),
``harness`` (inputs, fp64 reference, correctness check, timers), ``roofline`` (this machine's ceilings),
``runner`` (the suite loop), ``report`` (verdict, detail table, JSON/CSV/Markdown, --compare), ``plot``.
"""

from gptkernels.bench import specs as _specs  # noqa: F401  (registers the ops)
from gptkernels.bench.cli import main
from gptkernels.bench.registry import (
    OPS,
    OpSpec,
    Placeholder,
    Provider,
    register_op,
    register_provider,
    unregister_provider,
)

__all__ = [
    "OPS",
    "OpSpec",
    "Placeholder",
    "Provider",
    "main",
    "register_op",
    "register_provider",
    "unregister_provider",
]
