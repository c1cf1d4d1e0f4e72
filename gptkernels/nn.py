"""Drop-in modules. They pass ``backend=`` through to the ops and decide nothing themselves."""

from __future__ import annotations

import math

import torch

from gptkernels._dispatch import ArgumentError
from gptkernels.nn_mlp import FusedMLP  # noqa: F401  (re-exported: gptkernels.nn.FusedMLP)
from gptkernels.ops.layernorm import layer_norm, rms_norm
from gptkernels.ops.mlp import bias_gelu
from gptkernels.ops.qlinear import _check_format, _check_group, dequantize_weight, quantize_weight, quantized_linear


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


class QuantizedLinear(torch.nn.Module):
    """Weight-only quantized stand-in for ``nn.Linear`` (and Hugging Face ``Conv1D``): y = x @ dequant(W)^T + b.

    Buffers (all in ``state_dict``): ``qweight`` (N, K) int8 or (N, K // 2) uint8 (int4, nibble order in
    gptkernels/ops/qlinear.py), ``scales`` float32 (N,) or (N, K // group_size), ``bias`` (N,) or None. The format
    (bits, group_size) is the module's extra state (``<prefix>_extra_state`` in ``state_dict``), so a quantized
    checkpoint describes itself (:func:`gptkernels.quantize.load_quantized`). No backward: a forward that would need
    one raises an error naming the module. Build one with :meth:`from_float` or :func:`gptkernels.quantize`.
    """

    def __init__(self, in_features, out_features, bias=True, bits=8, group_size=None, device=None,
                 bias_dtype=torch.float32, backend=None):
        super().__init__()
        _check_format("QuantizedLinear", bits, group_size)
        _check_group("QuantizedLinear", in_features, in_features if group_size is None else group_size, bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        self.name = None  # the qualified name in its model, set by gptkernels.quantize (error messages)
        qk = in_features if bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.empty(out_features, qk, dtype=torch.int8 if bits == 8 else torch.uint8,
                                                    device=device))
        shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("scales", torch.empty(shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, layer, bits=8, group_size=None, calibrate=None, backend=None, name=None):
        """A QuantizedLinear holding ``layer``'s weight (nn.Linear (N, K), or HF Conv1D (K, N)) quantized with
        :func:`gptkernels.quantize_weight`, and a copy of its bias. On the layer's device; ``layer`` is unchanged."""
        w = layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight  # (N, K)
        n, k = w.shape
        bias = getattr(layer, "bias", None)
        m = cls(k, n, bias is not None, bits, group_size, device=w.device,
                bias_dtype=bias.dtype if bias is not None else torch.float32, backend=backend)
        q, s = quantize_weight(w, bits, group_size, calibrate)
        m.qweight, m.scales = q, s
        if bias is not None:
            m.bias = bias.detach().clone()
        m.name = name
        return m

    def _apply(self, fn, recurse=True):
        # model.half() / .to(torch.bfloat16) convert every float buffer: the scales stay float32 (a 16-bit copy
        # would round every weight a second time, and the kernels read float32). Device moves still apply.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32 and scales.dtype == torch.float32:
            self.scales = scales.to(self.scales.device)
        return self

    def _label(self):
        fmt = f"int{self.bits}" + (f" g{self.group_size}" if self.group_size else " per-channel")
        return f"QuantizedLinear {self.name!r} ({self.in_features} -> {self.out_features}, {fmt})" if self.name \
            else f"QuantizedLinear ({self.in_features} -> {self.out_features}, {fmt})"

    def forward(self, x):
        try:
            return quantized_linear(x, self.qweight, self.scales, self.bias, group_size=self.group_size,
                                    bits=self.bits, backend=self.backend)
        except ArgumentError as e:  # the op's message, with the module it happened in
            raise ArgumentError(f"{self._label()}: {e}") from None

    def dequantize(self, dtype=torch.float32):
        """The float weight (N, K) this layer encodes."""
        return dequantize_weight(self.qweight, self.scales, group_size=self.group_size, bits=self.bits, dtype=dtype)

    def get_extra_state(self):
        return {"format": "gptkernels.qlinear", "bits": self.bits, "group_size": self.group_size}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or state.get("format") != "gptkernels.qlinear":
            raise ArgumentError(f"{self._label()}: the state dict's extra state {state!r} is not a gptkernels "
                               f"quantized layer's")
        if (state.get("bits"), state.get("group_size")) != (self.bits, self.group_size):
            raise ArgumentError(f"{self._label()}: the state dict holds bits={state.get('bits')}, group_size="
                               f"{state.get('group_size')}; this layer is bits={self.bits}, group_size="
                               f"{self.group_size} (gptkernels.quantize.load_quantized builds the layers the state "
                               f"dict describes)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict and prefix + "qweight" not in state_dict:
            raise ArgumentError(f"{self._label()}: the state dict holds a float weight ({prefix}weight) for this "
                               f"quantized layer; load the float checkpoint into a float model and call "
                               f"gptkernels.quantize(model)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, backend={self.backend!r}")


class QuantizedMLP(torch.nn.Module):
    """:class:`FusedMLP` with quantized layers: ``c_proj(act(c_fc(x)))`` (+ residual), c_fc / c_proj
    :class:`QuantizedLinear` (either may stay ``nn.Linear``). Same ``forward(x, residual=None)`` and state_dict
    prefixes as FusedMLP, so it replaces one in place (:func:`gptkernels.quantize`). The biases ride in the GEMVs'
    epilogues; the activation is gptkernels' (bias_gelu without a bias, or relu)."""

    def __init__(self, c_fc, c_proj, activation="gelu_tanh", backend=None):
        super().__init__()
        self.c_fc, self.c_proj = c_fc, c_proj
        self.activation, self.backend = activation, backend

    def forward(self, x, residual=None):
        h = self.c_fc(x)
        if self.activation == "relu":
            a = torch.relu(h)
        else:
            a = bias_gelu(h, None, "tanh" if self.activation == "gelu_tanh" else "none", backend=self.backend)
        y = self.c_proj(a)
        return y if residual is None else y + residual

    def extra_repr(self):
        return f"activation={self.activation!r}, backend={self.backend!r}"
