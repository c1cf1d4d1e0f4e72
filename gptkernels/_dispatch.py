"""Backend selection: the only place a backend is chosen, and where the reason is recorded.

Order: the ``backend=`` argument, then ``GPTKERNELS_BACKEND``, then automatic. Automatic never raises: it walks
the device's preference list and takes the first backend that can run this call. An explicitly requested backend
that cannot run raises :class:`BackendUnavailableError` naming the reason. ``explain()`` shows what ran last.
"""

from __future__ import annotations

import os
import platform

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")
# Preference per device type. The Triton interpreter (CPU tensors with TRITON_INTERPRET=1) exists for testing
# and is never picked automatically.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_LAST: dict[str, tuple[str, str]] = {}  # public op name -> (backend, why)
_NOTES: dict[tuple, str] = {}  # (device type, chosen backend, skipped reasons) -> the auto note
# Backend decisions, per (op, device, requested backend, the op's own key, the two environment values that change a
# decision). A hit costs two dict lookups; select() on a miss cost 2-4 us (measured on the 2-core EPYC).
_CHOICES: dict[tuple, tuple[str, str]] = {}
# os.environ's own byte-keyed dict: reading it directly costs 30 ns against ~0.5-1 us for os.environ.get (which
# encodes the key and decodes the value), and it follows os.environ / monkeypatch.setenv, which write through it.
# Where it is not a dict (not CPython on POSIX), the plain lookup is used.
_ENV_DATA = getattr(os.environ, "_data", None)
if isinstance(_ENV_DATA, dict) and os.name == "posix":
    _BACKEND_KEY, _INTERPRET_KEY = b"GPTKERNELS_BACKEND", b"TRITON_INTERPRET"
else:
    _ENV_DATA, _BACKEND_KEY, _INTERPRET_KEY = os.environ, "GPTKERNELS_BACKEND", "TRITON_INTERPRET"
# Machine facts, computed once. Plain dicts rather than functools caches: torch.compile traces select() and
# warns on lru_cache-wrapped calls.
_CACHE: dict = {}


def _cached(key, compute):
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape. Also a RuntimeError, so code written for torch's ops (which raise
    RuntimeError) catches it unchanged."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype. Also a RuntimeError, as :class:`ArgumentError`."""


def _load_extension():
    return _cached("ext", _import_extension)


def _import_extension():
    try:
        from gptkernels import _C  # noqa: F401  (loading registers the gptkernels:: C++ ops)

        return _C, None
    except ImportError as e:  # a missing or broken build is reported by info() and every cpu/cuda choice
        return None, f"extension gptkernels._C failed to import ({e}); reinstall with `pip install -e .`"


def extension():
    """The compiled module ``gptkernels._C``, or None if it failed to import."""
    return _load_extension()[0]


def build_info() -> dict:
    ext, err = _load_extension()
    if ext is None:
        return {"error": err, "cuda": False, "cuda_archs": "", "cuda_runtime_version": 0, "openmp": False}
    return dict(ext.build_info())


def _triton_import_error():
    return _cached("triton", _import_triton)


def _import_triton():
    try:
        import triton  # noqa: F401

        return None
    except ImportError as e:
        return f"triton is not installed ({e})"


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _sm(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _archs_str(info: dict) -> str:
    archs = [a for a in info.get("cuda_archs", "").replace(",", ";").split(";") if a]
    return ",".join("sm_" + a.replace(".", "") for a in archs) or "none"


def _cuda_device_reason(index: int):
    return _cached(("cuda", index), lambda: _probe_cuda(index))


def _probe_cuda(index: int):
    ext = extension()
    code, msg = ext.cuda_probe(index)
    if code == 0:
        return None
    dev = torch.device("cuda", index)
    return f"compiled for {_archs_str(build_info())}; cuda:{index} is {_sm(dev)} ({msg})"


def backend_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device`` on this machine, else a one-line reason."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if interpret_mode() else "CPU tensors need TRITON_INTERPRET=1 (the interpreter, for testing)"
        return f"no Triton target for device {device.type}"
    if backend in ("cpu", "cuda"):
        ext, err = _load_extension()
        if ext is None:
            return err
        if backend == "cpu":
            return None if device.type == "cpu" else f"runs on CPU tensors; input is on {device}"
        info = build_info()
        if not info["cuda"]:
            return "this build has no CUDA kernels (built without nvcc or CUDA torch, or with GPTKERNELS_CUDA=0)"
        if device.type != "cuda":
            return f"compiled for {_archs_str(info)}; input is on {device}, not a CUDA device"
        return _cuda_device_reason(device.index if device.index is not None else torch.cuda.current_device())
    raise ValueError(f"backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")


def _requested(backend: str | None) -> tuple[str, str]:
    if backend is not None:
        return backend, "backend= argument"
    env = os.environ.get("GPTKERNELS_BACKEND", "").strip()
    if env:
        return env, "GPTKERNELS_BACKEND"
    return "auto", "automatic"


def requested(backend: str | None = None) -> tuple[str, str]:
    """(the backend asked for, where from: "backend= argument", "GPTKERNELS_BACKEND" or "automatic") for a call with
    this ``backend=``; "auto" when nothing asks. Raises ValueError for a name that is not a backend."""
    name, source = _requested(backend)
    if name != "auto" and name not in BACKENDS:
        what = f"GPTKERNELS_BACKEND={name!r}" if source == "GPTKERNELS_BACKEND" else f"backend {name!r}"
        raise ValueError(f"{what} is not a backend; valid: {', '.join(BACKENDS)}, auto")
    return name, source


def select(op: str, device: torch.device, backend: str | None = None, supports=None, key=None,
           order: tuple[str, ...] | None = None, order_why: str | None = None) -> str:
    """Choose the backend for one call of ``op`` on ``device`` and record why.

    ``supports(backend) -> str | None`` gives the op's own limits (dtype, shape, head dim) for this call. ``key``:
    everything ``supports`` (and ``order``) depends on (hashable); given, the decision is cached for :func:`choice`.
    ``order``: the op's own automatic preference on this device instead of AUTO_ORDER, with ``order_why`` for
    explain().
    """
    if key is None or torch.compiler.is_compiling():
        return _select(op, device, backend, supports, order, order_why)
    rec = choice(op, device, backend, key)
    if rec is not None:
        return rec[0]
    be = _select(op, device, backend, supports, order, order_why)
    remember(op, device, backend, key)
    return be


def remember(op: str, device: torch.device, backend: str | None, key) -> None:
    """Cache ``op``'s current explain() record (after :func:`note`, with its note) as the decision for ``key``."""
    env = _ENV_DATA.get(_BACKEND_KEY), _ENV_DATA.get(_INTERPRET_KEY)
    _CHOICES[(op, device, backend, key, env)] = _LAST[op]


def _select(op, device, backend, supports, order=None, order_why=None):
    requested, source = _requested(backend)
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"backend: unknown backend {requested!r} (from {source}); choose one of "
                         f"{', '.join(BACKENDS)} or 'auto'")

    def reason(b):
        return backend_reason(b, device) or (supports(b) if supports is not None else None)

    if requested != "auto":
        why = reason(requested)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {requested!r} (from {source}) cannot run: "
                                          f"{requested}: {why}")
        _LAST[op] = (requested, f"requested by {source}")
        return requested
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if order is None:
        order = AUTO_ORDER.get(dev_type, ("torch",))
    skipped = []
    for b in order:
        why = reason(b)
        if why is None:
            # The note is cached per (device type, what was skipped): formatting it on every call cost more than
            # the rest of select (6.4 -> 2 us per call, measured on the 2-core EPYC).
            key = (dev_type, b, tuple(skipped), order, order_why)
            note = _NOTES.get(key)
            if note is None:
                note = f"auto on {dev_type}: first usable of {', '.join(order)}"
                if order_why:
                    note += f" ({order_why})"
                if skipped:
                    note += "; skipped " + "; ".join(skipped)
                _NOTES[key] = note
            _LAST[op] = (b, note)
            return b
        skipped.append(f"{b}: {why}")
    raise AssertionError("unreachable: the torch backend always runs")  # torch's reason() is always None


def choice(op: str, device: torch.device, backend: str | None, key) -> tuple[str, str] | None:
    """The cached (backend, why) of an earlier :func:`select` of ``op`` with the same ``key``, recorded for
    explain(); None on a miss (then call :func:`select` with ``key`` to fill the cache). Not for traced code."""
    env = _ENV_DATA.get(_BACKEND_KEY), _ENV_DATA.get(_INTERPRET_KEY)
    rec = _CHOICES.get((op, device, backend, key, env))
    if rec is not None:
        _LAST[op] = rec
    return rec


def dtype_support(dtype: torch.dtype, backend: str) -> str | None:
    """The common dtype rule of the kernel backends (the torch reference takes any float dtype)."""
    if backend == "torch" or dtype in KERNEL_DTYPES:
        return None
    return f"dtype {dtype} not supported; supported: float32, float16, bfloat16"


def note(op: str, text: str) -> None:
    """Append a detail of how the chosen backend ran ``op`` (e.g. which GEMM path) to its explain() line."""
    rec = _LAST.get(op)
    if rec is not None:
        _LAST[op] = (rec[0], f"{rec[1]}; {text}")


def ran() -> dict[str, tuple[str, str]]:
    """A copy of every op's last (backend, why)."""
    return dict(_LAST)


def last(op: str) -> tuple[str, str] | None:
    """(backend, why) of the last call of ``op``, or None if it has not run."""
    return _LAST.get(op)


def explain() -> str:
    """Which backend ran for the last call of each op, and why, as a printable table."""
    if not _LAST:
        return "no gptkernels op has run yet in this process"
    width = max(len(k) for k in _LAST)
    return "\n".join(f"{op:<{width}}  {b:<6}  {why}" for op, (b, why) in sorted(_LAST.items()))


def info() -> dict:
    """Versions, what the build contains, and which backends can run on this machine (with reasons)."""
    from gptkernels._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    usable = {}
    for dev in devices:
        usable[str(dev)] = {b: backend_reason(b, dev) for b in BACKENDS}
    b = build_info()
    return {
        "gptkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": interpret_mode(),
        "build": b,
        "compiled_backends": {
            "cpu": "C++ kernels (OpenMP)" if b.get("error") is None else False,
            "cuda": _archs_str(b) if b.get("cuda") else False,
            "triton": "JIT at first call" if triton_version else False,
            "torch": "eager reference",
        },
        "gpus": [f"cuda:{i} {torch.cuda.get_device_name(i)} ({_sm(torch.device('cuda', i))})"
                 for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "usable": usable,
    }
