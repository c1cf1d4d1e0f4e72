"""gptkernels: fused Triton, CUDA C++ and C++ CPU kernels for GPT-style transformers."""

from gptkernels._dispatch import BackendUnavailableError, explain, info, last
from gptkernels._version import __version__
from gptkernels.ops.layernorm import layer_norm, rms_norm

__all__ = ["BackendUnavailableError", "__version__", "explain", "info", "last", "layer_norm", "rms_norm"]
