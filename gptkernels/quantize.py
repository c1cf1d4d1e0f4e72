"""Weight-only quantization of a model, in place: ``quantize(model)``, and quantized checkpoints: ``load_quantized``.

``quantize`` swaps every ``nn.Linear``, Hugging Face ``Conv1D`` (weight stored (in, out)) and gptkernels ``FusedMLP``
(for a :class:`gptkernels.nn.QuantizedMLP` holding its two layers) for :class:`gptkernels.nn.QuantizedLinear`, whose
forward is :func:`gptkernels.quantized_linear`. The report lists what was quantized, the bytes before and after, and
what was skipped and why: a name in ``skip`` (default ``("lm_head",)``, which GPT-2 ties to the token embedding:
quantizing it would keep the float embedding and add a quantized copy), an in_features not divisible by the group,
an ``nn.Linear`` subclass or a layer with hooks (its owner or hook may need the float weight).

With ``gptkernels.patch`` in either order:
    patch, then quantize: a patched MLP's fused forward reads float weights, so quantizing its layers restores the
        module's own forward (which calls the quantized layers); the report says so. Patched attention and norms stay.
    quantize, then patch: patch leaves MLPs with quantized layers alone (their layers are not float) and patches
        attention and norms around the quantized projections.

Checkpoints: a quantized model's ``state_dict`` holds ``qweight``, ``scales`` and ``bias`` and each layer's format as
its extra state. :func:`load_quantized` builds the float model's structure on the meta device (no float weights are
ever allocated), swaps in the quantized layers the state dict describes, and loads it with ``assign=True``.
``torch.save(model.state_dict())`` / ``torch.load(path, weights_only=True)`` round-trip it.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch

from gptkernels import _dispatch
from gptkernels.nn import QuantizedLinear, QuantizedMLP
from gptkernels.nn_mlp import FusedMLP
from gptkernels.ops.qlinear import _check_calibrate, _check_format, quantize_weight  # noqa: F401  (quantize_weight: re-exported)
from gptkernels.patch import EntryReport

_Err = _dispatch.ArgumentError
_PATCH_STATE = "_gptkernels_patch"  # gptkernels/patch.py's per-module state


# ------------------------------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class QuantizeEntry:
    """One candidate layer. action: "quantized", "would quantize" (dry run) or "skipped"."""

    name: str
    type: str
    action: str
    format: str
    bytes_before: int
    bytes_after: int
    reason: str


def _mb(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@dataclasses.dataclass
class QuantizeReport(EntryReport):
    """Every layer ``quantize`` quantized or skipped, with the reason. ``str(report)`` is a table."""

    entries: list[QuantizeEntry]
    bits: int = 8
    group_size: int | None = None
    calibrate: str | None = None
    dry_run: bool = False
    title: str = "gptkernels.quantize"

    @property
    def quantized(self) -> list[QuantizeEntry]:
        return [e for e in self.entries if e.action in ("quantized", "would quantize")]

    @property
    def skipped(self) -> list[QuantizeEntry]:
        return [e for e in self.entries if e.action == "skipped"]

    @property
    def bytes_before(self) -> int:
        """Bytes of the quantized layers' float weights and biases."""
        return sum(e.bytes_before for e in self.quantized)

    @property
    def bytes_after(self) -> int:
        """Bytes of their qweight, scales and biases."""
        return sum(e.bytes_after for e in self.quantized)

    def counts(self) -> dict:
        out: dict = {}
        for e in self.entries:
            out[e.action] = out.get(e.action, 0) + 1
        return out

    def __str__(self):
        fmt = _format_name(self.bits, self.group_size) + (f", calibrate={self.calibrate}" if self.calibrate else "")
        verb = "would quantize" if self.dry_run else "quantized"
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else 0.0
        head = (f"{self.title}: {len(self.quantized)} {verb}, {len(self.skipped)} skipped ({fmt}); their weights "
                f"{_mb(self.bytes_before)} -> {_mb(self.bytes_after)} ({ratio:.2f}x smaller)"
                f"{'; dry run, nothing changed' if self.dry_run else ''}")
        if not self.entries:
            return head + "\n(no candidate layers)"
        cols = ("layer", "type", "action", "format", "before", "after", "reason")
        rows = [(e.name or "(root)", e.type, e.action, e.format, _mb(e.bytes_before) if e.bytes_before else "-",
                 _mb(e.bytes_after) if e.bytes_after else "-", e.reason) for e in self.entries]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols[:-1])]
        line = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        return "\n".join([head, line.format(*cols), *(line.format(*r) for r in rows)])

    __repr__ = __str__


def _format_name(bits, group_size):
    return f"int{bits} " + (f"g{group_size}" if group_size else "per-channel")


# ------------------------------------------------------------------------------------------------ helpers
def _is_conv1d(layer):
    """Hugging Face's GPT-2 Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and isinstance(getattr(layer, "weight", None),
                                                                                    torch.Tensor)


def _is_plain_linear(layer):
    return type(layer) is torch.nn.Linear or _is_conv1d(layer)


def _shape(layer):
    """(N, K) of a linear layer's weight in nn.Linear layout."""
    w = layer.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(layer) else tuple(w.shape)


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _float_bytes(layer):
    return _nbytes(layer.weight) + _nbytes(getattr(layer, "bias", None))


def _quant_bytes(n, k, bits, group_size, bias):
    q = n * k if bits == 8 else n * k // 2
    s = 4 * n * (1 if group_size is None else k // group_size)
    return q + s + _nbytes(bias)


def _skipped_by(name, skip):
    for pat in skip:
        if name == pat or name.endswith("." + pat) or fnmatch.fnmatchcase(name, pat):
            return pat
    return None


def _param_owners(model):
    """id(tensor) -> the qualified names of every parameter that is that tensor (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _parent(model, name):
    if "." not in name:
        return model, name
    path, child = name.rsplit(".", 1)
    return model.get_submodule(path), child


def _plan_layer(name, layer, bits, group_size, skip, owners):
    """None when ``layer`` (a plain linear) can be quantized, else the reason it is skipped."""
    pat = _skipped_by(name, skip)
    tied = [o for o in owners.get(id(layer.weight), []) if o != f"{name}.weight"]
    if pat is not None:
        why = f"in skip ({pat!r})"
        if tied:
            why += f"; its weight is tied to {', '.join(tied)}, which stays float"
        return why
    if layer._forward_hooks or layer._forward_pre_hooks:
        return "has forward hooks, which may read the float weight"
    if not layer.weight.is_floating_point():
        return f"weight dtype {layer.weight.dtype} is not a float"
    n, k = _shape(layer)
    g = k if group_size is None else group_size
    if k % g:
        return f"in_features {k} is not divisible by group_size {group_size}"
    return None


def _candidates(model):
    """(name, module, kind) for every layer quantize looks at; kind: "linear", "fused_mlp", "quantized",
    "subclass". Children of a FusedMLP / QuantizedMLP are reported through their parent."""
    out, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (FusedMLP, QuantizedMLP)):
            inside.add(name)
            out.append((name, m, "fused_mlp" if isinstance(m, FusedMLP) else "quantized_mlp"))
        elif isinstance(m, QuantizedLinear):
            out.append((name, m, "quantized"))
        elif _is_plain_linear(m):
            out.append((name, m, "linear"))
        elif isinstance(m, torch.nn.Linear):
            out.append((name, m, "subclass"))
    return out


def _inherited_backend(parent, backend):
    if backend is not None:
        return backend
    b = getattr(parent, "backend", None)
    return b if isinstance(b, str) else None


def _restore_patched_parent(model, name, dry_run, restored):
    """A parent MLP patched by gptkernels.patch runs fused_mlp on float weights: give it its own forward back."""
    parent, _ = _parent(model, name)
    st = parent.__dict__.get(_PATCH_STATE)
    if st is None or st.get("kind") != "mlp":
        return ""
    pname = name.rsplit(".", 1)[0] if "." in name else "(root)"
    if not dry_run and id(parent) not in restored:
        parent.__dict__.pop(_PATCH_STATE, None)
        parent.__dict__.pop("forward", None)
        restored.add(id(parent))
    return (f"; {pname}'s gptkernels.patch forward (fused_mlp on float weights) "
            f"{'would be' if dry_run else 'was'} removed: its own forward calls the quantized layers")


# ------------------------------------------------------------------------------------------------- public
def quantize(model, bits=8, group_size=None, skip=("lm_head",), dry_run=False, *, calibrate=None, backend=None,
             _layout=None) -> QuantizeReport:
    """Quantize ``model``'s linear layers in place (weight-only; activations stay float). Returns the report.

    Args:
        model: any torch.nn.Module tree (a Hugging Face model, nanoGPT, gptkernels.model.GPT).
        bits: 8 (int8) or 4 (int4, two values a byte).
        group_size: None (int8: one scale per output channel) or the K-group of each scale (int4: 32, 64 or 128;
            int8: any divisor of in_features). A layer whose in_features it does not divide is skipped.
        skip: qualified names (or their last components, or fnmatch patterns) left float. Default ("lm_head",):
            GPT-2's lm_head shares its weight with the token embedding.
        dry_run: report only; the model is not changed.
        calibrate: None / "absmax" (each group's largest-magnitude weight sets its scale) or "mse" (per group, the
            clip ratio with the least squared error), as :func:`gptkernels.quantize_weight`.
        backend: for every QuantizedLinear; None inherits the ``backend`` attribute of the layer's parent module
            when it has one (gptkernels.model.GPT's modules do), else automatic.

    Returns:
        QuantizeReport: entries (name, type, action, format, bytes_before, bytes_after, reason); ``print(report)``.
    """
    _check_format("quantize", bits, group_size)
    _check_calibrate("quantize", calibrate)
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip or ())
    owners = _param_owners(model)
    entries, restored = [], set()

    def layout_for(name):
        return _layout[name] if _layout is not None else (bits, group_size)

    for name, m, kind in _candidates(model):
        tname = type(m).__name__
        if kind in ("quantized", "quantized_mlp"):
            entries.append(QuantizeEntry(name, tname, "skipped", "-", 0, 0, "already quantized"))
            continue
        if kind == "subclass":
            entries.append(QuantizeEntry(name, tname, "skipped", "-", 0, 0,
                                         f"a subclass of nn.Linear ({tname}): its owner may read .weight directly "
                                         f"(nn.MultiheadAttention does)"))
            continue
        layers = [(name, m)] if kind == "linear" else [(f"{name}.c_fc", m.c_fc), (f"{name}.c_proj", m.c_proj)]
        new_layers = {}
        for lname, layer in layers:
            lay = layout_for(lname)
            if lay is None:  # load_quantized: a layer the checkpoint keeps float
                continue
            lbits, lgroup = lay
            why = _plan_layer(lname, layer, lbits, lgroup, skip, owners) if _layout is None else None
            fmt = _format_name(lbits, lgroup)
            if why is not None:
                entries.append(QuantizeEntry(lname, type(layer).__name__, "skipped", fmt, 0, 0, why))
                continue
            n, k = _shape(layer)
            before, after = _float_bytes(layer), _quant_bytes(n, k, lbits, lgroup, getattr(layer, "bias", None))
            reason = "nn.Linear" if type(layer) is torch.nn.Linear else "Conv1D, weight (in, out) transposed"
            tied = [o for o in owners.get(id(layer.weight), []) if o != f"{lname}.weight"]
            if tied:
                reason += f"; weight tied to {', '.join(tied)}, which keeps the float tensor"
            if kind == "fused_mlp":
                reason = "FusedMLP layer: the FusedMLP becomes a QuantizedMLP"
            else:
                reason += _restore_patched_parent(model, lname, dry_run, restored)
            entries.append(QuantizeEntry(lname, type(layer).__name__, "would quantize" if dry_run else "quantized",
                                         fmt, before, after, reason))
            if not dry_run:
                parent, _ = _parent(model, lname)
                be = _inherited_backend(parent if kind == "linear" else m, backend)
                if _layout is not None:  # structure only: the values come from the state dict
                    b = getattr(layer, "bias", None)
                    q = QuantizedLinear(k, n, b is not None, lbits, lgroup, device=layer.weight.device,
                                        bias_dtype=b.dtype if b is not None else torch.float32, backend=be)
                    q.name = lname
                else:
                    q = QuantizedLinear.from_float(layer, lbits, lgroup, calibrate, backend=be, name=lname)
                q.train(layer.training)
                new_layers[lname] = q
        if dry_run or not new_layers:
            continue
        if kind == "linear":
            parent, child = _parent(model, name)
            setattr(parent, child, new_layers[name])
        else:
            c_fc = new_layers.get(f"{name}.c_fc", m.c_fc)
            c_proj = new_layers.get(f"{name}.c_proj", m.c_proj)
            qm = QuantizedMLP(c_fc, c_proj, m.activation, m.backend if backend is None else backend)
            qm.train(m.training)
            if name:
                parent, child = _parent(model, name)
                setattr(parent, child, qm)
            else:
                raise _Err("quantize: the model itself is a FusedMLP; quantize a module that holds it")
    return QuantizeReport(entries, bits=bits, group_size=group_size, calibrate=calibrate, dry_run=dry_run)


def _layout_of(state_dict):
    """{layer name: (bits, group_size)} of every quantized layer in a state dict (from its extra state)."""
    layout = {}
    for key in state_dict:
        if not key.endswith(".qweight") and key != "qweight":
            continue
        prefix = key[: -len("qweight")]
        extra = state_dict.get(prefix + "_extra_state")
        if not isinstance(extra, dict) or extra.get("format") != "gptkernels.qlinear":
            raise _Err(f"load_quantized: {key} has no gptkernels format record ({prefix}_extra_state); the state dict "
                       f"was not saved from a gptkernels-quantized model")
        layout[prefix[:-1]] = (extra["bits"], extra["group_size"])
    return layout


def _build(model_or_ctor):
    """The float model on the meta device: an nn.Module as given, a GPTConfig or Hugging Face config, or a callable."""
    if isinstance(model_or_ctor, torch.nn.Module):
        return model_or_ctor
    from gptkernels.model import GPT, GPTConfig

    with torch.device("meta"):
        if isinstance(model_or_ctor, GPTConfig):
            return GPT(model_or_ctor)
        if hasattr(model_or_ctor, "model_type") and hasattr(model_or_ctor, "to_dict"):  # transformers config
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_config(model_or_ctor)
        if callable(model_or_ctor):
            return model_or_ctor()
    raise _Err(f"load_quantized: expected an nn.Module, a GPTConfig, a transformers config or a callable that builds "
               f"the float model, got {type(model_or_ctor).__name__}")


def load_quantized(model_or_ctor, state_dict, *, strict=True, backend=None, device=None):
    """A model holding a quantized checkpoint, built without float weights.

    Args:
        model_or_ctor: the float model's structure: a ``GPTConfig`` (gptkernels.model.GPT), a transformers config
            (AutoModelForCausalLM.from_config), a callable returning the model (called under
            ``torch.device("meta")``), or an nn.Module (its quantized layers are swapped in; best built on meta).
        state_dict: from a quantized model's ``state_dict()`` (``torch.load(path, weights_only=True)`` works).
        strict: as ``load_state_dict``.
        backend: for the QuantizedLinear layers (None: inherited, as :func:`quantize`).
        device: move the loaded model there (the tensors are otherwise those of ``state_dict``).

    Returns the model, in eval mode. Tied parameters (GPT-2's lm_head and wte) stay tied. Raises ArgumentError for a
    float state dict (no quantized layers), and when a tensor of the model is neither in the state dict nor tied to one
    that is (it would stay on the meta device).
    """
    if not isinstance(state_dict, dict):
        raise _Err(f"load_quantized: state_dict must be a dict, got {type(state_dict).__name__}")
    layout = _layout_of(state_dict)
    if not layout:
        raise _Err("load_quantized: the state dict holds no quantized layers (no '*.qweight' keys): it is a float "
                   "checkpoint; load it with model.load_state_dict(...) and call gptkernels.quantize(model)")
    model = _build(model_or_ctor)
    owners = _param_owners(model)
    tied = [names for names in owners.values() if len(names) > 1]
    modules = dict(model.named_modules())
    for name in layout:
        m = modules.get(name)
        if m is None:
            raise _Err(f"load_quantized: the state dict has a quantized layer {name!r} that the model does not have")
        if isinstance(m, QuantizedLinear):
            continue
        if not _is_plain_linear(m):
            raise _Err(f"load_quantized: {name!r} is {type(m).__name__} in the model, not nn.Linear or Conv1D")
    plan = {}
    for name, _, kind in _candidates(model):
        if kind in ("linear", "fused_mlp"):
            for lname in [name] if kind == "linear" else [f"{name}.c_fc", f"{name}.c_proj"]:
                plan[lname] = layout.get(lname)
    if any(v is not None for v in plan.values()):
        quantize(model, skip=(), backend=backend, _layout=plan)
    sd = dict(state_dict)
    for names in tied:  # a tied parameter the checkpoint stores once: every name gets that tensor
        present = [n for n in names if n in sd]
        for n in names:
            if n not in sd and present and n.rsplit(".", 1)[0] not in layout:
                sd[n] = sd[present[0]]
    model.load_state_dict(sd, strict=strict, assign=True)
    for names in tied:  # assign=True made each name its own Parameter: share one again
        live = [n for n in names if n.rsplit(".", 1)[0] not in layout]
        if len(live) > 1:
            first = model.get_parameter(live[0])
            for n in live[1:]:
                parent, child = _parent(model, n)
                setattr(parent, child, first)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise _Err(f"load_quantized: {', '.join(left[:8])}{' ...' if len(left) > 8 else ''} not in the state dict "
                   f"(left on the meta device)")
    if device is not None:
        model.to(device)
    return model.eval()


quantize.load_quantized = load_quantized  # gptkernels.quantize is this function; keep the loader reachable from it
quantize.QuantizeReport = QuantizeReport
