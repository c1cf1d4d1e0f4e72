"""gptkernels: fused Triton, CUDA C++ and C++ CPU kernels for GPT-style transformers."""

from gptkernels._dispatch import ArgumentError, ArgumentTypeError, BackendUnavailableError, explain, info, last
from gptkernels._version import __version__
from gptkernels.ops.attention import (
    attention,
    decode_attention,
    flash_attn_func,
    flash_attn_varlen_func,
    scaled_dot_product_attention,
)
from gptkernels.ops.cross_entropy import cross_entropy, linear_cross_entropy
from gptkernels.ops.layernorm import layer_norm, rms_norm
from gptkernels.ops.mlp import bias_gelu, fused_mlp, swiglu
from gptkernels.ops.qlinear import dequantize_weight, quantize_weight, quantized_linear
from gptkernels.ops.softmax import softmax
from gptkernels.patch import PatchReport, patch, unpatch
from gptkernels.quantize import QuantizeReport, load_quantized, quantize
from gptkernels.verify import VerifyReport, verify

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "BackendUnavailableError",
    "PatchReport",
    "QuantizeReport",
    "VerifyReport",
    "__version__",
    "attention",
    "bias_gelu",
    "cross_entropy",
    "decode_attention",
    "dequantize_weight",
    "explain",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "fused_mlp",
    "info",
    "last",
    "layer_norm",
    "linear_cross_entropy",
    "load_quantized",
    "patch",
    "quantize",
    "quantize_weight",
    "quantized_linear",
    "rms_norm",
    "scaled_dot_product_attention",
    "softmax",
    "swiglu",
    "unpatch",
    "verify",
]
