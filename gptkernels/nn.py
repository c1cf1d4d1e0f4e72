"""Drop-in modules. They pass ``backend=`` through to the ops and decide nothing themselves."""

from __future__ import annotations

import math

import torch

from gptkernels.nn_mlp import FusedMLP  # noqa: F401  (re-exported: gptkernels.nn.FusedMLP)
from gptkernels.ops.layernorm import layer_norm, rms_norm


def _flatten_normalized(x, normalized_shape, *params):
    """Normalizing over several trailing dims is normalizing one flattened dim: (..., *S) -> (..., prod(S))."""
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != tuple(normalized_shape):
        raise ValueError(f"input shape {tuple(x.shape)} does not end with normalized_shape {tuple(normalized_shape)}")
    if k == 1:
        return x, params
    n = math.prod(normalized_shape)
    return x.reshape(*x.shape[: x.dim() - k], n), tuple(p.reshape(n) if p is not None else None for p in params)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the same arguments, parameters and ``state_dict`` keys, on gptkernels.

    ``forward(x, residual=None)``: with a residual it returns ``(y, h)``, h = x + residual, y = LayerNorm(h).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, x, residual=None):
        x2, (w, b) = _flatten_normalized(x, self.normalized_shape, self.weight, self.bias)
        r2 = residual.reshape(x2.shape) if residual is not None and x2 is not x else residual
        out = layer_norm(x2, w, b, self.eps, residual=r2, backend=self.backend)
        if x2 is x:
            return out
        return tuple(t.reshape(x.shape) for t in out) if residual is not None else out.reshape(x.shape)

    def extra_repr(self):
        return super().extra_repr() + f", backend={self.backend!r}"


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with the same arguments, parameters and ``state_dict`` keys, on gptkernels.

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as in PyTorch. ``forward(x, residual=None)`` returns ``(y, h)``
    with a residual.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, x, residual=None):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        x2, (w,) = _flatten_normalized(x, self.normalized_shape, self.weight)
        r2 = residual.reshape(x2.shape) if residual is not None and x2 is not x else residual
        out = rms_norm(x2, w, eps, residual=r2, backend=self.backend)
        if x2 is x:
            return out
        return tuple(t.reshape(x.shape) for t in out) if residual is not None else out.reshape(x.shape)

    def extra_repr(self):
        return super().extra_repr() + f", backend={self.backend!r}"
