"""Put gptkernels into an existing model, in place and reversibly: ``patch(model)`` and ``unpatch(model)``.

Recognition is by structure first, then by behaviour:

1. Structure: the module's type (``torch.nn.LayerNorm``, ``torch.nn.RMSNorm``), or the attributes and layers that
   GPT-2, nanoGPT and Llama-family blocks use (``weight`` + ``eps``/``variance_epsilon``; ``c_fc``/``act``/``c_proj``
   with nn.Linear or HF ``Conv1D`` layers; ``gate_proj``/``up_proj``/``down_proj``; ``c_attn``/``c_proj``/``n_head``;
   Hugging Face attention modules whose forward looks its kernel up in ``ALL_ATTENTION_FUNCTIONS``).
2. Behaviour (the probe): the module's own forward and the gptkernels forward run on the same small random input in
   float64, in eval mode, with random parameter values substituted through ``torch.func.functional_call`` (the
   module's parameters are never touched). They must agree to 1e-6 relative, or the module is skipped with the error
   in the report. That is what tells Llama's RMSNorm (``w * x * rsqrt(mean(x^2) + eps)``) from Gemma's
   (``(1 + w) * ...``), GPT-2's tanh GELU from the erf one, and a custom block from a look-alike. The probe's input
   has rows of magnitude 1 down to 1e-4, so a wrong ``eps`` shows too. Transient memory: one float64 copy of the
   largest probed module's parameters. HF attention modules are not probed (their forward needs rotary embeddings
   and masks); HF's attention-function contract is what they are matched on.

Swapping keeps the module objects: the instance gets a ``forward`` attribute (the class is untouched) and a
``_gptkernels_patch`` dict holding the plan; an HF attention module instead gets a view of its config whose
``_attn_implementation`` is "gptkernels", so its own forward calls gptkernels' attention from HF's registry (the
model's config, and so ``save_pretrained``, is unchanged). Parameters, buffers and state_dict keys are the same objects
before, during and after; ``unpatch`` deletes what ``patch`` added. A patched forward whose inputs it cannot match
exactly (a weight dtype other than the input's, autocast) runs the module's own forward and warns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import types
import warnings

import torch
import torch.nn.functional as F

from gptkernels import _dispatch
from gptkernels.nn import _flatten_normalized
from gptkernels.ops.attention import _supports as _attention_supports
from gptkernels.ops.attention import scaled_dot_product_attention
from gptkernels.ops.layernorm import layer_norm, rms_norm
from gptkernels.ops.mlp import fused_mlp, swiglu

OPS = ("layernorm", "rmsnorm", "attention", "mlp", "loss")
_STATE = "_gptkernels_patch"
_PROBE_RTOL = 1e-6  # float64 probe; loose enough for modules that compute in fp32 inside (Llama's RMSNorm does)
_EPS_GUESSES = (1e-5, 1e-6)  # norms that hard-code eps (nanoGPT's LayerNorm): the probe picks the one that matches
_FC_PROJ = (("c_fc", "c_proj"), ("fc1", "fc2"), ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"))
_ACT_NAMES = ("act", "act_fn", "activation", "activation_fn", "gelu")
_DROPOUT_NAMES = ("dropout", "drop", "resid_dropout")
_HF_IMPLS = ("eager", "sdpa")  # attn implementations whose masks (float additive or bool/None) we take as they are
_ACTIVATIONS = {
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class _Skip(Exception):
    """A recognised module that cannot be swapped; the message is the report's reason."""


# ------------------------------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class PatchEntry:
    """One candidate module. action: "swapped", "would swap" (dry run), "skipped" or "restored" (unpatch)."""

    name: str
    type: str
    kind: str
    action: str
    backend: str | None
    reason: str


class EntryReport:
    """What patch() and quantize() reports share: a list of dataclass entries, iterable and exportable."""

    entries: list

    def to_dicts(self) -> list[dict]:
        return [dataclasses.asdict(e) for e in self.entries]

    def __len__(self):
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)


@dataclasses.dataclass
class PatchReport(EntryReport):
    """Every module ``patch`` recognised, swapped or skipped, with the reason. ``str(report)`` is a table."""

    entries: list[PatchEntry]
    backend: str | None = None
    dry_run: bool = False
    title: str = "gptkernels.patch"

    @property
    def swapped(self) -> list[PatchEntry]:
        return [e for e in self.entries if e.action in ("swapped", "would swap", "restored")]

    @property
    def skipped(self) -> list[PatchEntry]:
        return [e for e in self.entries if e.action == "skipped"]

    def counts(self) -> dict:
        """{kind: {action: n}}."""
        out: dict = {}
        for e in self.entries:
            out.setdefault(e.kind, {}).setdefault(e.action, 0)
            out[e.kind][e.action] += 1
        return out

    def __str__(self):
        if self.title == "gptkernels.patch":
            verb = "would swap" if self.dry_run else "swapped"
            head = (f"{self.title}: {len(self.swapped)} {verb}, {len(self.skipped)} skipped "
                    f"(backend={self.backend or 'auto'}{'; dry run, nothing changed' if self.dry_run else ''})")
        else:
            head = f"{self.title}: {len(self.swapped)} restored"
        if not self.entries:
            return head + "\n(no candidate modules)"
        cols = ("module", "type", "kind", "action", "backend", "reason")
        rows = [(e.name or "(root)", e.type, e.kind, e.action, e.backend or "-", e.reason) for e in self.entries]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols[:-1])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        return "\n".join([head, fmt.format(*cols), *(fmt.format(*r) for r in rows)])

    __repr__ = __str__


# ------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _quiet_dispatch():
    """Planning and probing call the dispatcher; what they record must not show in gptkernels.explain()."""
    saved = dict(_dispatch._LAST)
    try:
        yield
    finally:
        _dispatch._LAST.clear()
        _dispatch._LAST.update(saved)


@contextlib.contextmanager
def _eval_mode(module):
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


def _first_param(module):
    return next(module.parameters(), None)


def _is_conv1d(layer):
    """HF's GPT-2 Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and getattr(layer, "weight", None) is not None


def _linear_weight(layer):
    """The weight in nn.Linear layout (out, in): a transposed view for Conv1D, so gradients reach the parameter."""
    return layer.weight.t() if _is_conv1d(layer) else layer.weight


def _linear_shape(layer):
    """(out, in) of a linear layer; a gptkernels QuantizedLinear has no float weight, only its sizes."""
    if type(layer).__name__ == "QuantizedLinear" and not hasattr(layer, "weight"):
        return (layer.out_features, layer.in_features)
    return tuple(_linear_weight(layer).shape)


def _check_linear(owner, name, want_bias=None):
    layer = getattr(owner, name, None)
    if type(layer).__name__ == "QuantizedLinear":
        raise _Skip(f"{name} is a QuantizedLinear (gptkernels.quantize): its own forward already runs "
                    f"quantized_linear, and the fused op needs float weights")
    if not (type(layer) is torch.nn.Linear or _is_conv1d(layer)):
        raise _Skip(f"{name} is {type(layer).__name__}, not nn.Linear or Conv1D (a wrapped layer, e.g. LoRA, "
                    f"would be bypassed)")
    if layer._forward_hooks or layer._forward_pre_hooks:
        raise _Skip(f"{name} has forward hooks, which the fused kernel would bypass")
    if want_bias is False and layer.bias is not None:
        raise _Skip(f"{name} has a bias; swiglu has no bias terms")
    return layer


def _rel(a, b):
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return math.inf
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return math.inf
    return (a - b).norm().item() / max(b.norm().item(), 1e-300)


def _probe_input(*shape):
    """Random float64 rows of magnitude 1 down to 1e-4: a norm with the wrong eps differs on the small rows."""
    x = torch.randn(*shape, dtype=torch.float64)
    scales = torch.tensor([1.0, 1e-2, 1e-3, 1e-4], dtype=torch.float64)
    return x * scales[torch.arange(x.shape[-2]) % 4].unsqueeze(-1)


def _probe_params(module):
    """Random float64 values for every parameter and float buffer (non-float buffers kept)."""
    out = {}
    for name, p in module.named_parameters():
        scale = 1.0 / math.sqrt(min(p.shape)) if p.dim() >= 2 else 1.0
        out[name] = torch.randn(p.shape, dtype=torch.float64) * scale
    for name, b in module.named_buffers():
        if b is not None and b.is_floating_point():
            out[name] = b.detach().to("cpu", torch.float64)
    return out


def _run_probe(module, forward, state, x):
    """rel err between the module's forward and ``forward`` on x, both in float64 on CPU with random parameters.

    Runs on CPU copies of the parameters, whatever device the module is on; the module itself is only borrowed.
    """
    params = _probe_params(module)
    dev = _first_param(module)
    if dev is not None and dev.device.type != "cpu":  # the module's own forward must run where its tensors are
        params = {k: v.to(dev.device) for k, v in params.items()}
        x = x.to(dev.device)
    with torch.no_grad(), _eval_mode(module), _quiet_dispatch(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ref = torch.func.functional_call(module, params, (x,))
        except Exception as e:  # a forward that cannot take this input is not the structure we matched
            raise _Skip(f"probe: the module's forward failed on a (…, {x.shape[-1]}) float64 input "
                        f"({type(e).__name__}: {e})") from None
        if isinstance(ref, tuple):
            raise _Skip("probe: the module's forward returns a tuple, not a tensor")
        module.__dict__["forward"] = types.MethodType(forward, module)
        module.__dict__[_STATE] = {**state, "backend": "torch", "probe": True}
        try:
            ours = torch.func.functional_call(module, params, (x,))
        finally:
            del module.__dict__["forward"], module.__dict__[_STATE]
    return _rel(ours, ref)


def _identify_activation(act, names):
    """The name in ``names`` whose function ``act`` computes (float64, on [-6, 6]), or None."""
    if not callable(act):
        return None
    t = torch.linspace(-6, 6, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = act(t)
    except Exception:
        return None
    for name in names:
        if _rel(y, _ACTIVATIONS[name](t)) <= 1e-9:
            return name
    return None


def _warn_fallback(module, why):
    warnings.warn(f"gptkernels.patch: {type(module).__name__} ran its own forward: {why}", stacklevel=3)


def _autocast_on(x):
    return torch.is_autocast_enabled(x.device.type)


# ------------------------------------------------------------------------------------------ patched forwards
def _norm_forward(self, x, *args, **kwargs):
    st = self.__dict__[_STATE]
    w = getattr(self, "weight", None)
    why = None
    if args or kwargs:
        why = "extra forward arguments"
    elif w is not None and w.dtype != x.dtype:
        why = f"weight dtype {w.dtype} != input dtype {x.dtype} (the kernel returns x.dtype; eager promotes)"
    elif _autocast_on(x) and not st.get("probe"):
        why = "autocast is on (eager norms run in fp32 under autocast)"
    if why is not None:
        _warn_fallback(self, why)
        return type(self).forward(self, x, *args, **kwargs)
    shape = st["shape"] if st["shape"] is not None else (x.shape[-1],)
    eps = getattr(self, st["eps_attr"]) if st["eps_attr"] else st["eps"]
    if eps is None:
        eps = torch.finfo(x.dtype).eps  # torch.nn.RMSNorm's default
    if st["rms"]:
        x2, (w2,) = _flatten_normalized(x, shape, w)
        y = rms_norm(x2, w2, eps, backend=st["backend"])
    else:
        x2, (w2, b2) = _flatten_normalized(x, shape, w, getattr(self, "bias", None))
        y = layer_norm(x2, w2, b2, eps, backend=st["backend"])
    return y if x2 is x else y.reshape(x.shape)


def _mlp_fallback(self, x, layers):
    if x.dtype != layers[0].weight.dtype:
        return f"input dtype {x.dtype} != weight dtype {layers[0].weight.dtype}"
    if _autocast_on(x) and not self.__dict__[_STATE].get("probe"):
        return "autocast is on (its GEMMs would run in the autocast dtype)"
    return None


def _mlp_forward(self, x):
    st = self.__dict__[_STATE]
    fc, proj = getattr(self, st["fc"]), getattr(self, st["proj"])
    why = _mlp_fallback(self, x, (fc, proj))
    if why is not None:
        _warn_fallback(self, why)
        return type(self).forward(self, x)
    y = fused_mlp(x, _linear_weight(fc), fc.bias, _linear_weight(proj), proj.bias, st["activation"],
                  backend=st["backend"])
    return getattr(self, st["dropout"])(y) if st["dropout"] else y


def _swiglu_forward(self, x):
    st = self.__dict__[_STATE]
    gate, up, down = self.gate_proj, self.up_proj, self.down_proj
    why = _mlp_fallback(self, x, (gate, up, down))
    if why is not None:
        _warn_fallback(self, why)
        return type(self).forward(self, x)
    return swiglu(x, _linear_weight(gate), _linear_weight(up), _linear_weight(down), backend=st["backend"])


def _causal_self_attention_forward(self, x):
    st = self.__dict__[_STATE]
    B, T, C = x.shape
    H = self.n_head
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, C) each
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    p = st["dropout_p"](self) if self.training else 0.0
    y = scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, backend=st["backend"])  # (B, H, T, D)
    y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))
    return self.resid_dropout(y) if isinstance(getattr(self, "resid_dropout", None), torch.nn.Module) else y


# ---------------------------------------------------------------------------------------------- matchers
# Each matcher returns None (not this kind) or a dict: kind, op (the public op name the dispatcher records), forward,
# state (and head_dim for attention); it raises _Skip for a recognised module it cannot swap.
def _match_norm(m):
    if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        rms_options, shape, eps_attr = [isinstance(m, torch.nn.RMSNorm)], tuple(m.normalized_shape), "eps"
    else:
        w = m._parameters.get("weight")
        if w is None or w.dim() != 1 or "norm" not in type(m).__name__.lower() or list(m.children()):
            return None
        b = m._parameters.get("bias")
        if set(m._parameters) - {"weight", "bias"} or (b is not None and b.shape != w.shape):
            return None
        if isinstance(m, torch.nn.GroupNorm) or any(True for _ in m.buffers()):  # BatchNorm keeps running stats
            return None
        eps_attr = next((a for a in ("variance_epsilon", "eps", "epsilon")
                         if isinstance(getattr(m, a, None), float)), None)
        rms_options, shape = ([False] if b is not None else [True, False]), None
    x = _probe_input(2, 8, *(shape or (m.weight.shape[0],)))
    errors = []
    for rms in rms_options:
        for eps in ([None] if eps_attr else _EPS_GUESSES):
            state = {"rms": rms, "shape": shape, "eps_attr": eps_attr, "eps": eps}
            err = _run_probe(m, _norm_forward, state, x)
            if err <= _PROBE_RTOL:
                return {"kind": "rmsnorm" if rms else "layernorm", "op": "rms_norm" if rms else "layer_norm",
                        "forward": _norm_forward, "state": state}
            desc = "x * rsqrt(mean(x^2) + eps) * weight" if rms else "layer_norm(x) * weight + bias"
            errors.append(f"{desc} with eps={getattr(m, eps_attr) if eps_attr else eps} (rel err {err:.1e})")
    raise _Skip("probe: forward computes none of " + "; ".join(errors) +
                " (e.g. Gemma's (1 + weight) scale, or another normalization)")


def _match_mlp(m):
    names = next(((f, p) for f, p in _FC_PROJ if isinstance(getattr(m, f, None), torch.nn.Module)
                  and isinstance(getattr(m, p, None), torch.nn.Module)), None)
    is_swiglu = all(isinstance(getattr(m, a, None), torch.nn.Module) for a in ("gate_proj", "up_proj", "down_proj"))
    act_name = next((a for a in _ACT_NAMES if callable(getattr(m, a, None))), None)
    if (names is None and not is_swiglu) or act_name is None:
        return None
    act = getattr(m, act_name)
    if is_swiglu:
        for name in ("gate_proj", "up_proj", "down_proj"):
            _check_linear(m, name, want_bias=False)
        if _identify_activation(act, ("silu",)) is None:
            raise _Skip(f"{act_name} ({type(act).__name__}) is not SiLU; swiglu computes silu(gate) * up")
        state, forward, op = {}, _swiglu_forward, "swiglu"
        c_in = m.gate_proj.weight.shape[1]
    else:
        fc, proj = (_check_linear(m, n) for n in names)
        activation = _identify_activation(act, ("gelu_tanh", "gelu", "relu"))
        if activation is None:
            raise _Skip(f"{act_name} ({type(act).__name__}) is none of gelu_tanh, gelu, relu (fused_mlp's)")
        dropout = next((d for d in _DROPOUT_NAMES if isinstance(getattr(m, d, None), torch.nn.Dropout)), None)
        state = {"fc": names[0], "proj": names[1], "activation": activation, "dropout": dropout}
        forward, op = _mlp_forward, "fused_mlp"
        c_in = _linear_weight(fc).shape[1]
    err = _run_probe(m, forward, state, _probe_input(2, 8, c_in))
    if err > _PROBE_RTOL:
        raise _Skip(f"probe: forward differs from {op} (rel err {err:.1e}); it does more than "
                    f"{'down(silu(gate(x)) * up(x))' if is_swiglu else 'proj(act(fc(x)))'}")
    return {"kind": "mlp", "op": op, "forward": forward, "state": state}


def _hf_attention_forward_uses_registry(m):
    fwd = inspect.unwrap(type(m).forward)
    code = getattr(fwd, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _match_attention(m):
    cfg = getattr(m, "config", None)
    if cfg is not None and hasattr(cfg, "_attn_implementation") and _hf_attention_forward_uses_registry(m):
        impl = cfg._attn_implementation
        if impl == "gptkernels" or getattr(cfg, "_gptkernels_view", False):
            raise _Skip("already on gptkernels attention (attn_implementation='gptkernels')")
        if impl not in _HF_IMPLS:
            raise _Skip(f"attn_implementation={impl!r}: its masks are built for another kernel; patch models "
                        f"loaded with 'eager' or 'sdpa'")
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise _Skip("needs attention logit softcapping, which gptkernels attention does not do")
        if isinstance(getattr(m, "sinks", None), torch.Tensor):
            raise _Skip("has attention sinks, which gptkernels attention does not do")
        head_dim = getattr(m, "head_dim", None)
        if not isinstance(head_dim, int):
            raise _Skip("no integer head_dim attribute")
        return {"kind": "attention", "op": "scaled_dot_product_attention", "forward": None,
                "state": {"hf": True, "config": cfg}, "head_dim": head_dim}
    if not all(isinstance(getattr(m, a, None), int) for a in ("n_head", "n_embd")):
        return None
    if not all(isinstance(getattr(m, a, None), torch.nn.Module) for a in ("c_attn", "c_proj")):
        return None
    n_embd, n_head = m.n_embd, m.n_head
    if n_head < 1 or n_embd % n_head or _linear_shape(m.c_attn) != (3 * n_embd, n_embd):
        raise _Skip(f"c_attn is not a fused (3 * n_embd, n_embd) = ({3 * n_embd}, {n_embd}) qkv projection")
    if isinstance(getattr(m, "dropout", None), float):
        def dropout_p(mod):
            return mod.dropout
    elif isinstance(getattr(m, "attn_dropout", None), torch.nn.Dropout):
        def dropout_p(mod):
            return mod.attn_dropout.p
    else:
        def dropout_p(mod):
            return 0.0
    state = {"dropout_p": dropout_p}
    T = 8
    mask = m._buffers.get("bias")  # nanoGPT's non-flash path keeps a (1, 1, block, block) causal mask here
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        T = min(T, mask.shape[-1])
    err = _run_probe(m, _causal_self_attention_forward, state, _probe_input(2, T, n_embd))
    if err > _PROBE_RTOL:
        raise _Skip(f"probe: forward differs from causal attention between c_attn and c_proj (rel err {err:.1e})")
    return {"kind": "attention", "op": "scaled_dot_product_attention", "forward": _causal_self_attention_forward,
            "state": state, "head_dim": n_embd // n_head}


# ------------------------------------------------------------------------------------------------- loss
class _Hidden(torch.nn.Module):
    """Stands in for an HF causal LM's lm_head during a fused-loss call: the model's forward gets its hidden states
    back where it expects logits, and hands them to ``loss_function``, which is then _FusedLoss."""

    def forward(self, h):
        return h


class _FusedLoss:
    """HF's ForCausalLMLoss (shift, ignore_index, mean or sum / num_items_in_batch) on hidden states, with the LM
    head folded in: linear_cross_entropy never builds the (tokens, vocab) logits."""

    def __init__(self, head, backend):
        self.head, self.backend = head, backend

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                 **kwargs):
        from gptkernels.ops.cross_entropy import linear_cross_entropy

        h = logits  # HF's name for what it passes: the hidden states, since lm_head is _Hidden during the call
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        w, b = self.head.weight, self.head.bias
        if w.dtype != h.dtype:  # autocast ran the model in a lower precision: F.linear would have cast the head too
            w, b = w.to(h.dtype), (b.to(h.dtype) if b is not None else None)
        loss = linear_cross_entropy(h, w, shift_labels.to(h.device), bias=b, ignore_index=ignore_index,
                                    reduction="sum" if num_items_in_batch is not None else "mean",
                                    backend=self.backend)
        loss = loss.float()  # HF's loss is fp32 whatever the model's dtype
        if num_items_in_batch is not None:
            loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                           else num_items_in_batch)
        return loss


def _causal_lm_loss_forward(self, *args, **kwargs):
    """An HF causal LM's forward where, in training mode with labels, the loss comes from linear_cross_entropy and
    no logits are built (``.logits`` is None); otherwise the model's own forward, logits included."""
    st = self.__dict__[_STATE]
    own = type(self).forward
    labels = kwargs.get("labels")
    if (labels is None or not self.training or kwargs.get("logits_to_keep", 0) not in (0, None)
            or "_loss_function" in self.__dict__  # a loss the user set: theirs to compute
            or getattr(self, "loss_type", None) not in (None, "ForCausalLM")):
        return own(self, *args, **kwargs)
    head = self._modules["lm_head"]
    self.__dict__["_loss_function"] = _FusedLoss(head, st["backend"])  # what HF's loss_function property returns
    self._modules["lm_head"] = _Hidden()
    try:
        out = own(self, *args, **kwargs)
    finally:
        self._modules["lm_head"] = head
        del self.__dict__["_loss_function"]
    out["logits"] = None
    return out


def _match_loss(m):
    """HF causal LMs whose forward is `logits = self.lm_head(hidden)` then `self.loss_function(logits, labels, ...)`
    with nothing between but the logits_to_keep slice (GPT-2, Llama, Mistral, Qwen2 and most others)."""
    head = getattr(m, "lm_head", None)
    cfg = getattr(m, "config", None)
    if not isinstance(head, torch.nn.Module) or cfg is None or not hasattr(cfg, "vocab_size"):
        return None
    if not hasattr(type(m), "loss_function"):
        return None
    if not isinstance(head, torch.nn.Linear):
        raise _Skip(f"lm_head is a {type(head).__name__}, not an nn.Linear")
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise _Skip(f"config.{attr} transforms the logits between lm_head and the loss")
    try:
        src = inspect.getsource(inspect.unwrap(type(m).forward))
    except (OSError, TypeError):
        raise _Skip("forward source unavailable: cannot check how the loss is formed") from None
    calls = ("self.lm_head(", "self.loss_function(")
    if not all(src.count(c) == 1 for c in calls) or "softcap" in src or "logits = logits" in src:
        raise _Skip("forward does more than lm_head then loss_function between the hidden states and the loss")
    return {"kind": "loss", "op": "linear_cross_entropy", "forward": _causal_lm_loss_forward, "state": {}}


def _match(m):
    """(kind, match dict) or (kind, _Skip) or None when the module is no candidate."""
    from gptkernels import nn as gnn
    from gptkernels.model import CausalSelfAttention

    for matcher, kind in ((_match_norm, "norm"), (_match_mlp, "mlp"), (_match_attention, "attention"),
                          (_match_loss, "loss")):
        if matcher is _match_norm and isinstance(m, (gnn.LayerNorm, gnn.RMSNorm)):
            return ("layernorm" if isinstance(m, gnn.LayerNorm) else "rmsnorm"), _Skip("already a gptkernels module")
        if matcher is _match_mlp and isinstance(m, (gnn.FusedMLP, gnn.QuantizedMLP)):
            return "mlp", _Skip("already a gptkernels module")
        if matcher is _match_attention and isinstance(m, CausalSelfAttention):
            # gptkernels.model's attention: its forward takes the KV cache and packing arguments, which the patched
            # forward does not (swapping it broke GPT's forward with a TypeError).
            return "attention", _Skip("already a gptkernels module")
        try:
            found = matcher(m)
        except _Skip as e:
            if kind == "norm":
                kind = "rmsnorm" if isinstance(m, torch.nn.RMSNorm) or getattr(m, "bias", None) is None \
                    else "layernorm"
            return kind, e
        if found is not None:
            return found["kind"], found
    return None


# ------------------------------------------------------------------------------------------------- plan
def _plan(op, module, backend, head_dim=None):
    """(backend, why) the dispatcher picks for this module's current device and dtype; raises _Skip if it cannot."""
    p = _first_param(module)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    if op == "scaled_dot_product_attention":
        supports = _attention_supports(dtype, head_dim, device)
    else:
        def supports(b):
            return _dispatch.dtype_support(dtype, b)
    with _quiet_dispatch():
        try:
            chosen = _dispatch.select(op, device, backend, supports)
        except _dispatch.BackendUnavailableError as e:
            raise _Skip(str(e)) from None
        return chosen, _dispatch._LAST[op][1] + f" ({dtype}, {device})".replace("torch.", "")


class _AttnConfigView:
    """An HF config as seen by one patched attention module: the same object in every respect (reads and writes
    go to it) except ``_attn_implementation``, which is "gptkernels". The model's config is left alone, so the
    model keeps building the masks of its own implementation and ``save_pretrained`` writes the original."""

    _gptkernels_view = True

    def __init__(self, base, impl):
        self.__dict__["_base"] = base
        self.__dict__["_attn_implementation"] = impl

    def __getattr__(self, name):
        if name.startswith("__") or name == "_base":  # copy/pickle probe dunders before __dict__ exists
            raise AttributeError(name)
        return getattr(self.__dict__["_base"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_base"], name, value)


def _apply(m, found, backend):
    state = {**found["state"], "kind": found["kind"], "backend": backend}
    if state.get("hf"):
        from gptkernels.integrations import hf

        hf.register()
        m.__dict__["config"] = _AttnConfigView(state["config"], hf.NAME)
    else:
        m.__dict__["forward"] = types.MethodType(found["forward"], m)
    m.__dict__[_STATE] = state


def patch(model, ops=OPS, backend=None, dry_run=False) -> PatchReport:
    """Swap gptkernels into ``model`` in place; returns the report of every candidate module.

    Args:
        model: any torch.nn.Module tree (a Hugging Face model, nanoGPT, your own).
        ops: which of "layernorm", "rmsnorm", "attention", "mlp", "loss" to swap; other candidates are listed as
            skipped. "loss": a Hugging Face causal LM (GPT-2, Llama, ...) called in training mode with ``labels``
            computes its loss with ``linear_cross_entropy`` (HF's shift, ignore_index -100, mean or sum /
            ``num_items_in_batch``) and returns ``logits=None``: the (tokens, vocab) logits are never built. In
            eval mode, or without labels, the model's own forward runs.
        backend: passed to every swapped op: "cuda", "triton", "cpu", "torch", or None/"auto" (then
            GPTKERNELS_BACKEND, then automatic, decided per call). A module the requested backend cannot run
            (device, dtype, head dim) is skipped with the dispatcher's reason.
        dry_run: plan and report only; the model is not changed.

    Returns:
        PatchReport: entries (name, type, kind, action, backend, reason); ``print(report)`` shows a table. The
        backend column is what the dispatcher picks for the module's dtype and device now; each call still
        dispatches on its own inputs (``gptkernels.explain()`` says what ran).
    """
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"patch: unknown ops {bad}; choose from {', '.join(OPS)}")
    if backend is not None and backend != "auto" and backend not in _dispatch.BACKENDS:
        raise ValueError(f"patch: unknown backend {backend!r}; choose one of {', '.join(_dispatch.BACKENDS)} or "
                         f"'auto'")
    entries = []
    for name, m in model.named_modules():
        if _STATE in m.__dict__:
            st = m.__dict__[_STATE]
            entries.append(PatchEntry(name, type(m).__name__, st["kind"], "skipped", st["backend"],
                                      "already patched; unpatch first to change it"))
            continue
        hit = _match(m)
        if hit is None:
            continue
        kind, found = hit
        tname = type(m).__name__
        if isinstance(found, _Skip):
            entries.append(PatchEntry(name, tname, kind, "skipped", None, str(found)))
            continue
        if kind not in ops:
            entries.append(PatchEntry(name, tname, kind, "skipped", None, f"{kind!r} not in ops={ops}"))
            continue
        try:
            chosen, why = _plan(found["op"], m, backend, found.get("head_dim"))
        except _Skip as e:
            entries.append(PatchEntry(name, tname, kind, "skipped", None, str(e)))
            continue
        if not dry_run:
            _apply(m, found, backend)
        entries.append(PatchEntry(name, tname, kind, "would swap" if dry_run else "swapped", chosen,
                                  f"{found['op']}: {why}"))
    return PatchReport(entries, backend=backend, dry_run=dry_run)


def unpatch(model) -> PatchReport:
    """Undo ``patch``: every module gets its own forward (and config) back. Returns the restored modules."""
    entries = []
    for name, m in model.named_modules():
        st = m.__dict__.pop(_STATE, None)
        if st is None:
            continue
        if st.get("hf"):
            m.__dict__["config"] = st["config"]
        else:
            m.__dict__.pop("forward", None)
        entries.append(PatchEntry(name, type(m).__name__, st["kind"], "restored", st["backend"],
                                  "original forward" + (" and config" if st.get("hf") else "")))
    return PatchReport(entries, title="gptkernels.unpatch")
