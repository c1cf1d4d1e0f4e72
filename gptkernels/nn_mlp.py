"""FusedMLP: the GPT-2 / nanoGPT MLP block on gptkernels.fused_mlp. Re-exported by gptkernels.nn."""

from __future__ import annotations

import torch

from gptkernels.ops.mlp import ACTIVATIONS, fused_mlp


def autocast_dtype(device_type: str):
    """The autocast dtype when autocast is on for ``device_type``, else None. Our custom ops are not on autocast's
    lists, so modules that feed GEMMs cast their inputs themselves, as nn.Linear does under autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast(t, dtype):
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


class FusedMLP(torch.nn.Module):
    """``c_proj(act(c_fc(x)))`` with nanoGPT's parameter names, so a nanoGPT ``MLP`` state_dict loads as is.

    ``c_fc``: nn.Linear(n_embd, hidden), ``c_proj``: nn.Linear(hidden, n_embd). ``forward(x, residual=None)``
    returns the MLP output, plus ``residual`` when given (added inside the proj GEMM). Hugging Face GPT-2 stores
    these weights as ``Conv1D`` ((in, out), transposed): load those with :meth:`from_conv1d_state_dict`.
    Under autocast the inputs and weights are cast to the autocast dtype (the output is in that dtype).
    Dropout is not part of this module (nanoGPT applies it after c_proj; do that outside).
    """

    def __init__(self, n_embd, hidden=None, activation="gelu_tanh", bias=True, device=None, dtype=None,
                 backend=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"FusedMLP: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        hidden = 4 * n_embd if hidden is None else hidden
        self.c_fc = torch.nn.Linear(n_embd, hidden, bias=bias, device=device, dtype=dtype)
        self.c_proj = torch.nn.Linear(hidden, n_embd, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, x, residual=None):
        dt = autocast_dtype(x.device.type)  # under autocast: everything in the autocast dtype, like nn.Linear
        w = [_cast(t, dt) for t in (x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                                    residual)]
        return fused_mlp(*w[:5], self.activation, residual=w[5], backend=self.backend)

    @staticmethod
    def conv1d_to_linear_state_dict(state_dict, prefix=""):
        """A copy of ``state_dict`` with ``{prefix}c_fc.weight`` / ``{prefix}c_proj.weight`` transposed from HF
        Conv1D layout (in, out) to nn.Linear layout (out, in); biases and every other key are unchanged."""
        out = dict(state_dict)
        for name in ("c_fc", "c_proj"):
            key = f"{prefix}{name}.weight"
            if key in out:
                out[key] = out[key].t().contiguous()
        return out

    @classmethod
    def from_conv1d_state_dict(cls, state_dict, prefix="", activation="gelu_tanh", backend=None):
        """A FusedMLP holding an HF GPT-2 ``mlp`` (Conv1D weights c_fc (C, H), c_proj (H, C)); ``prefix`` e.g.
        ``"transformer.h.0.mlp."``. Shapes, dtype, device and bias come from the tensors."""
        w_fc = state_dict[f"{prefix}c_fc.weight"]  # (C, H): Conv1D is (in, out)
        n_embd, hidden = w_fc.shape
        bias = f"{prefix}c_fc.bias" in state_dict
        mlp = cls(n_embd, hidden, activation, bias, device=w_fc.device, dtype=w_fc.dtype, backend=backend)
        sd = cls.conv1d_to_linear_state_dict(state_dict, prefix)
        mlp.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        return mlp

    def extra_repr(self):
        return f"activation={self.activation!r}, backend={self.backend!r}"
