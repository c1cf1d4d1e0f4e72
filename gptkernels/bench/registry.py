"""What can be benchmarked: ops (one :class:`OpSpec` each) and the providers that run them.

An op is benchmarked by every provider usable on the device: ``eager`` (the PyTorch a user would write),
``compile`` (``torch.compile`` of that same eager function) and one ``gptkernels-<backend>`` per kernel backend.
Tests and new ops add more with :func:`register_provider` / :func:`register_op`. An op whose module fails to import
(a broken build, a missing optional dependency) or that has no benchmark spec yet (:class:`Placeholder`) stays in the
registry and is reported as "not available" with the reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MODES = ("fwd", "bwd", "fwd+bwd")
KERNEL_BACKENDS = ("cuda", "triton", "cpu")  # gptkernels' "torch" backend is the eager reference: redundant here


@dataclass
class OpSpec:
    """One benchmarked op.

    ``shape(preset, device_type)`` gives the input shape for a shape preset, or a list of shapes (e.g. one per decode
    batch size), or None (the op has no such shape).
    ``make_inputs(shape, dtype, device, generator)`` returns the keyword arguments of every provider function;
    the names in ``grad_inputs`` are the differentiable ones (leaves of the bwd graph). ``ref`` takes the same
    keywords in fp64 and is the correctness reference; ``eager`` is the baseline in the benchmark dtype;
    ``kernel(backend)`` returns the gptkernels function. Outputs are a tensor or a tuple of tensors.

    ``bytes[mode](shape, elsize)``: the bytes a call must move (memory-bound ops), with the formula as text in
    ``formula[mode]``; ``flops[mode](shape)`` likewise for compute-bound ops. "fwd+bwd" is the sum of both.
    """

    name: str
    summary: str
    module: str
    shape: Callable[[str, str], tuple | None]
    make_inputs: Callable[..., dict]
    grad_inputs: tuple[str, ...]
    ref: Callable[..., Any]
    eager: Callable[..., Any]
    kernel: Callable[[str], Callable[..., Any]] | None = None
    bytes: dict[str, Callable[[tuple, int], int]] = field(default_factory=dict)
    flops: dict[str, Callable[[tuple], int]] = field(default_factory=dict)
    formula: dict[str, str] = field(default_factory=dict)
    default_on: tuple[str, ...] = ("cpu", "cuda")  # device types whose default suite includes this op
    backends: tuple[str, ...] = KERNEL_BACKENDS
    modes: tuple[str, ...] = MODES  # the modes the op has (an inference-only op: ("fwd",))
    default_modes: tuple[str, ...] | None = None  # the modes of a run without --mode (None: the run's default)
    baselines: tuple[str, ...] = ("eager", "compile")  # built-in baseline providers that run it
    # Bytes the lightest provider reads per call, when far less than the inputs (quantized weights): the CPU input
    # rotation then overflows the cache for that provider too. None: the inputs' size (or ``bytes``) decides.
    stream_bytes: Callable[[tuple, int], int] | None = None

    @property
    def metric(self) -> str:
        return "tflops" if self.flops else "gbps"

    def work(self, mode: str, shape: tuple, elsize: int) -> int:
        """Bytes (memory-bound) or FLOPs (compute-bound) of one call in ``mode``."""
        table = self.flops or self.bytes
        parts = ("fwd", "bwd") if mode == "fwd+bwd" else (mode,)
        if self.flops:
            return sum(table[p](shape) for p in parts)
        return sum(table[p](shape, elsize) for p in parts)

    def formula_for(self, mode: str) -> str:
        if mode == "fwd+bwd":
            return f"({self.formula['fwd']}) + ({self.formula['bwd']})"
        return self.formula[mode]


@dataclass
class Provider:
    """A way to run an op: ``make(problem)`` returns ``fn(**inputs) -> outputs``; ``usable(problem)`` returns
    None or the reason it cannot run there (the row is then "skipped" with that reason)."""

    name: str
    make: Callable[[Any], Callable[..., Any]]
    usable: Callable[[Any], str | None] = lambda problem: None


@dataclass
class Placeholder:
    """An op that has no benchmark spec yet (its module may not exist): always reported as not available."""

    name: str
    module: str
    summary: str = ""
    default_on: tuple[str, ...] = ("cpu", "cuda")


OPS: dict[str, OpSpec | Placeholder] = {}
EXTRA_PROVIDERS: dict[str, dict[str, Provider]] = {}
_AVAILABLE: dict[str, str | None] = {}


def register_op(spec: OpSpec | Placeholder, replace: bool = False) -> None:
    if spec.name in OPS and not replace:
        raise ValueError(f"op {spec.name!r} is already registered")
    OPS[spec.name] = spec
    _AVAILABLE.pop(spec.name, None)


def register_provider(op: str, provider: Provider) -> None:
    """Add a provider to one op (e.g. a test's deliberately wrong one, or a third-party kernel to compare)."""
    EXTRA_PROVIDERS.setdefault(op, {})[provider.name] = provider


def unregister_provider(op: str, name: str) -> None:
    EXTRA_PROVIDERS.get(op, {}).pop(name, None)


def unavailable_reason(name: str) -> str | None:
    """None if op ``name`` can be benchmarked in this install, else why not (cached per process: a module that
    failed to import half-way may have registered custom ops already, so a second import would fail differently)."""
    if name not in _AVAILABLE:
        spec = OPS[name]
        try:
            importlib.import_module(spec.module)
            why = None
        except Exception as e:  # noqa: BLE001  an op being written may fail with anything at import time
            why = f"{spec.module} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if why is None and isinstance(spec, Placeholder):
            why = f"{spec.module} exists but has no benchmark spec yet (add one in gptkernels/bench/specs.py)"
        _AVAILABLE[name] = why
    return _AVAILABLE[name]

