"""``verify(reference, candidate, batch)``: does a patched (or rewritten) model compute what the original does?

Three copies run on the same batch: the reference in float64 (the ground truth), the reference in the run dtype and
the candidate in the run dtype. Every output tensor (logits, loss) and every parameter gradient is compared against
the ground truth with the HOUSE_STYLE bounds:

    float32/float64: ||cand - truth|| / ||truth|| <= 1e-5
    float16/bfloat16: max|cand - truth| <= max(2 * max|ref - truth|, 2 ulps at max|truth|) + 1e-5
                      (the flash-attention rule: at most twice the error eager PyTorch makes in that dtype), and
                      rel(cand) <= 2 * rel(ref) + 2 eps / sqrt(n_eff), rel = ||. - truth|| / ||truth||, which catches a
                      systematic error (a 0.5% bias) that stays within the max bound

(gptkernels._tolerance.judge, the tests' and the benchmark's rule; its docstring says why.)

NaN never passes. The gradients come from the model's own ``.loss`` when it returns one (pass labels), else from
``sum(out * dy)`` with one random ``dy`` shared by the three copies. (Hugging Face computes its loss from
``logits.float()``: the float64 copy's loss and the gradient entering its logits are then fp32-rounded, about 1e-7
relative, well inside the fp32 bound; pass no labels for a ground truth that is float64 end to end.)
``steps > 0`` then trains the three copies for that many optimizer steps on the batch (same seed, same optimizer)
and compares the loss curves, per step: |cand - truth| <= 2 * |ref - truth| + (1e-5 relative in fp32, 1 ulp in
fp16/bf16): training compounds rounding, so each step is held to twice the reference's own drift from float64.

``quantized=True`` checks a weight-only quantized model (:func:`gptkernels.quantize`) against its float original
instead: quantization changes the function on purpose, so the rows are the relative error of each output against the
float64 original, ||cand - truth|| / ||truth||, held to a looser bound (:data:`QUANTIZED_BOUNDS`: 1e-2 when every
quantized layer is int8, 5e-2 when any is int4; ``bound=`` overrides), and the report adds the greedy-token agreement:
the share of positions where argmax of the candidate's logits is the float64 original's. No gradient rows and no
training steps: quantized layers have no backward. On random-init weights int4 g32 measures 6-12% (see
tests/test_qlinear.py's LOGITS_BOUNDS for why), so the 5e-2 bound is one a trained model may meet, not a random one.

The models passed in are not modified: verify works on deep copies.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from gptkernels._tolerance import LOW_PRECISION, judge, max_err

# quantized=True: relative error of each output against the float64 float model, by the narrowest quantized layer.
QUANTIZED_BOUNDS = {8: 1e-2, 4: 5e-2}


@dataclasses.dataclass(frozen=True)
class VerifyRow:
    """One compared tensor. err / bound: the criterion closest to (or past) its bound (rel for fp32; max abs or rel
    for 16-bit, see gptkernels._tolerance)."""

    name: str
    max_abs: float
    rel: float
    ref_max_abs: float
    err: float
    bound: float
    ok: bool
    note: str = ""


@dataclasses.dataclass
class VerifyReport:
    """Rows for outputs, the loss, every parameter gradient and (steps > 0) each step's loss. ``.ok``: all pass."""

    rows: list[VerifyRow]
    dtype: torch.dtype
    steps: int = 0
    loss_source: str = ""
    # quantized=True only: the bits of the candidate's quantized layers, the relative bound, and the share of
    # positions whose argmax token matches the float64 original's.
    quantized_bits: tuple[int, ...] = ()
    bound: float | None = None
    token_agreement: float | None = None

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[VerifyRow]:
        return [r for r in self.rows if not r.ok]

    def __bool__(self):
        return self.ok

    def __str__(self):
        if self.quantized_bits:
            return self._table(
                f"gptkernels.verify (quantized, {'/'.join(f'int{b}' for b in self.quantized_bits)}): "
                f"{'OK' if self.ok else 'FAILED'} ({len(self.rows) - len(self.failures)}/{len(self.rows)} outputs "
                f"within bounds; {str(self.dtype).replace('torch.', '')} quantized model vs its float original in "
                f"float64; rel err <= {self.bound:g}; greedy tokens agree at "
                + ("-" if self.token_agreement is None else f"{100 * self.token_agreement:.1f}%") + " of positions)")
        rule = ("max abs err <= max(2 x ref err, 2 ulps) + 1e-5 and rel err <= 2 x ref rel err + 2 eps/sqrt(n_eff)"
                if self.dtype in LOW_PRECISION else "rel err <= 1e-5")
        head = (f"gptkernels.verify: {'OK' if self.ok else 'FAILED'} ({len(self.rows) - len(self.failures)}/"
                f"{len(self.rows)} tensors within bounds; {str(self.dtype).replace('torch.', '')} vs a float64 "
                f"reference; {rule}; gradients from {self.loss_source}"
                f"{f'; {self.steps} training steps' if self.steps else ''})")
        return self._table(head)

    def _table(self, head):
        cols = ("tensor", "max_abs_err", "rel_err", "ref_max_abs_err", "err", "bound", "ok")
        rows = [(r.name, f"{r.max_abs:.2e}", f"{r.rel:.2e}", f"{r.ref_max_abs:.2e}", f"{r.err:.2e}", f"{r.bound:.2e}",
                 ("ok" if r.ok else "FAIL") + (f" ({r.note})" if r.note else "")) for r in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([head, fmt.format(*cols), *(fmt.format(*r) for r in rows)])

    __repr__ = __str__


# ------------------------------------------------------------------------------------------------ compare
def _row(name, cand, ref, truth, dtype, note=""):
    if cand is None or truth is None or ref is None:
        if cand is None and truth is None:
            return None
        missing = "candidate" if cand is None else "reference"
        return VerifyRow(name, math.inf, math.inf, math.inf, math.inf, 0.0, False, f"no {missing} tensor")
    if tuple(cand.shape) != tuple(truth.shape):
        return VerifyRow(name, math.inf, math.inf, math.inf, math.inf, 0.0, False,
                         f"shape {tuple(cand.shape)} != {tuple(truth.shape)}")
    if torch.isnan(truth).any():
        return VerifyRow(name, math.nan, math.nan, math.nan, math.nan, 0.0, False, "NaN in the float64 reference")
    if torch.isnan(cand).any():
        return VerifyRow(name, math.nan, math.nan, math.nan, math.nan, 0.0, False, "NaN")
    v = judge(cand, truth, ref, dtype=dtype)
    ref_max_abs = v.eager_max_abs if dtype in LOW_PRECISION else max_err(ref, truth)
    return VerifyRow(name, v.max_abs, v.rel, ref_max_abs, v.err, v.bound, v.ok, note or v.message)


def _loss_row(name, cand, ref, truth, dtype):
    """Scalar losses along a training run: twice the reference's drift from float64, plus a relative floor."""
    c, r, t = (torch.tensor(float(v), dtype=torch.float64) for v in (cand, ref, truth))
    if math.isnan(float(t)) or math.isnan(float(c)):
        return VerifyRow(name, math.nan, math.nan, math.nan, math.nan, 0.0, False, "NaN")
    max_abs, ref_max_abs = abs(float(c - t)), abs(float(r - t))
    floor = (torch.finfo(dtype).eps if dtype in LOW_PRECISION else 1e-5) * abs(float(t))
    bound = 2 * ref_max_abs + floor + 1e-5 * (dtype in LOW_PRECISION)
    rel = max_abs / abs(float(t)) if float(t) else (0.0 if max_abs == 0 else math.inf)
    return VerifyRow(name, max_abs, rel, ref_max_abs, max_abs, bound, max_abs <= bound)


# ---------------------------------------------------------------------------------------------------- run
def _cast_batch(batch, dtype, device):
    def cast(v):
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            return v.to(dtype) if v.is_floating_point() else v
        return v

    if isinstance(batch, dict):
        return {k: cast(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(cast(v) for v in batch)
    return cast(batch)


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _outputs(out):
    """(named output tensors, loss or None) from a tensor, a tuple, or an HF ModelOutput (.logits, .loss)."""
    if isinstance(out, torch.Tensor):
        return {"output": out}, None
    if hasattr(out, "logits") or hasattr(out, "loss"):
        tensors = {}
        if getattr(out, "logits", None) is not None:
            tensors["logits"] = out.logits
        return tensors, getattr(out, "loss", None)
    if isinstance(out, (tuple, list)):
        tensors = {f"output[{i}]": t for i, t in enumerate(out)
                   if isinstance(t, torch.Tensor) and t.is_floating_point()}
        return tensors, None
    raise TypeError(f"verify: cannot read outputs of type {type(out).__name__}; return a tensor, a tuple of "
                    f"tensors, or an object with .logits/.loss")


def _param_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dy_loss(tensors, dys):
    """sum(out * dy), accumulated in fp32 (fp64 for the truth): its gradient is dy exactly, in any dtype."""
    total = 0.0
    for name, t in tensors.items():
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        total = total + (t.to(acc) * dys[name].to(acc)).sum()
    return total


def _forward_backward(model, batch, dys, seed):
    """Outputs, loss and {param name: grad} of one step; dys: output name -> dy (None: use the model's loss)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tensors, loss = _outputs(_call(model, batch))
    if dys is not None:
        loss = _dy_loss(tensors, dys)
    model.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return tensors, loss, grads


def _make_optimizer(name, params, lr):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"verify: optimizer must be 'sgd' or 'adamw', got {name!r}")


def verify(reference, candidate, batch, steps=0, dtype=None, *, optimizer="adamw", lr=1e-3, train=False,
           seed=0, quantized=False, bound=None) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` on ``batch``: outputs, loss, every parameter gradient, and optionally
    the loss curve of ``steps`` training steps.

    Args:
        reference: the original model (e.g. before ``gptkernels.patch``); its float64 copy is the ground truth.
        candidate: the model under test, with the same parameter names (``patch`` keeps them).
        batch: a tensor (``model(batch)``), a tuple of args or a dict of kwargs. Floating-point tensors are cast to
            each copy's dtype; integer ones (token ids, labels) are kept. Include ``labels`` for an HF ``.loss``.
        steps: training steps to run after the comparison (0: none).
        dtype: run dtype of the reference and candidate copies; None keeps the candidate's parameter dtype.
        optimizer: "adamw" or "sgd" for ``steps``; lr: its learning rate.
        train: run the copies in train mode (dropout on: only meaningful with dropout 0); default eval mode.
        seed: torch's seed before every forward (same dropout draws where the implementations share an RNG).
        quantized: ``candidate`` is ``reference`` after :func:`gptkernels.quantize`: compare outputs only, with the
            relative bound of :data:`QUANTIZED_BOUNDS` (or ``bound``), and report greedy-token agreement (module
            docstring). ``steps`` must be 0.
        bound: quantized mode only: the relative error bound for every output, instead of QUANTIZED_BOUNDS.

    Returns:
        VerifyReport: ``.ok``, ``.rows`` (name, max_abs, rel, ref_max_abs, err, bound, ok), printable as a table.
    """
    if quantized:
        return _verify_quantized(reference, candidate, batch, steps, dtype, train, seed, bound)
    if bound is not None:
        raise ValueError("verify: bound= is for quantized=True; the float comparison uses the HOUSE_STYLE bounds")
    if dtype is None:
        p = next(candidate.parameters(), None)
        dtype = p.dtype if p is not None else torch.float32
    device = _param_device(candidate)
    models = {}
    for key, src, dt in (("truth", reference, torch.float64), ("ref", reference, dtype), ("cand", candidate, dtype)):
        m = copy.deepcopy(src).to(device=device, dtype=dt)
        m.train(train)
        models[key] = m
    batches = {k: _cast_batch(batch, m_dtype, device)
               for k, m_dtype in (("truth", torch.float64), ("ref", dtype), ("cand", dtype))}

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe, loss = _outputs(_call(models["truth"], batches["truth"]))
    if loss is not None:
        dys, loss_source = None, "the model's .loss"
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        # dy rounded to the run dtype first, so all three copies backpropagate the very same numbers.
        dys = {n: torch.randn(t.shape, generator=gen).to(dtype).to(device) for n, t in probe.items()}
        loss_source = "sum(output * dy), one random dy"

    results = {k: _forward_backward(models[k], batches[k], dys, seed) for k in models}
    rows = []
    (t_out, t_loss, t_grads), (r_out, r_loss, r_grads), (c_out, c_loss, c_grads) = (
        results["truth"], results["ref"], results["cand"])
    fused_loss = candidate.__dict__.get("_gptkernels_patch", {}).get("kind") == "loss"
    for name in t_out:
        if name == "logits" and name not in c_out and fused_loss and c_loss is not None:
            continue  # patch's "loss" kind builds no logits in training mode: its loss and gradients are compared
        rows.append(_row(name, c_out.get(name), r_out.get(name), t_out[name], dtype))
    if dys is None:
        rows.append(_row("loss", c_loss, r_loss, t_loss, dtype))
    cand_names = set(c_grads)
    for name, tg in t_grads.items():
        if name not in cand_names:
            rows.append(VerifyRow(f"grad {name}", math.inf, math.inf, math.inf, math.inf, 0.0, False,
                                  "no such parameter in the candidate"))
            continue
        rows.append(_row(f"grad {name}", c_grads[name], r_grads.get(name), tg, dtype))
    rows = [r for r in rows if r is not None]

    if steps > 0:
        curves = {}
        for key, m in models.items():
            opt = _make_optimizer(optimizer, [p for p in m.parameters() if p.requires_grad], lr)
            curve = []
            for i in range(steps):
                _, loss_i, _ = _forward_backward(m, batches[key], dys, seed + i)
                opt.step()
                curve.append(float(loss_i.detach()))
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + steps)
                tensors, loss_end = _outputs(_call(m, batches[key]))
            if dys is not None:
                loss_end = _dy_loss(tensors, dys)
            curve.append(float(loss_end))
            curves[key] = curve
        for i in range(steps + 1):
            rows.append(_loss_row(f"loss after {i} step{'s' if i != 1 else ''} ({optimizer}, lr={lr:g})",
                                  curves["cand"][i], curves["ref"][i], curves["truth"][i], dtype))
    return VerifyReport(rows, dtype, steps, loss_source)


def _float_dtype(model):
    """The dtype of a model's float parameters or float buffers (a quantized model's may all be buffers)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _verify_quantized(reference, candidate, batch, steps, dtype, train, seed, bound):
    from gptkernels.nn import QuantizedLinear

    bits = tuple(sorted({m.bits for m in candidate.modules() if isinstance(m, QuantizedLinear)}, reverse=True))
    if not bits:
        raise ValueError("verify(quantized=True): the candidate has no QuantizedLinear layers; quantize it with "
                         "gptkernels.quantize(model) first, or compare float models with quantized=False")
    if steps:
        raise ValueError(f"verify(quantized=True): steps={steps}, but quantized layers have no backward; use steps=0")
    if bound is None:
        bound = QUANTIZED_BOUNDS[min(bits)]
    if dtype is None:
        dtype = _float_dtype(candidate)
    device = _param_device(reference)
    outs = {}
    for key, src, dt in (("truth", reference, torch.float64), ("ref", reference, dtype), ("cand", candidate, dtype)):
        m = copy.deepcopy(src).to(device=device, dtype=dt)
        m.train(train)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            outs[key] = _outputs(_call(m, _cast_batch(batch, dt, device)))
    (t_out, t_loss), (r_out, r_loss), (c_out, c_loss) = outs["truth"], outs["ref"], outs["cand"]
    named = [(n, c_out.get(n), r_out.get(n), t) for n, t in t_out.items()]
    if t_loss is not None:
        named.append(("loss", c_loss, r_loss, t_loss))
    rows = []
    for name, c, r, t in named:
        if c is None:
            rows.append(VerifyRow(name, math.inf, math.inf, math.inf, math.inf, bound, False, "no candidate tensor"))
            continue
        if tuple(c.shape) != tuple(t.shape):
            rows.append(VerifyRow(name, math.inf, math.inf, math.inf, math.inf, bound, False,
                                  f"shape {tuple(c.shape)} != {tuple(t.shape)}"))
            continue
        t64, c64 = t.detach().double(), c.detach().double()
        norm = t64.norm().item()
        rel = (c64 - t64).norm().item() / norm if norm else (0.0 if torch.equal(c64, t64) else math.inf)
        nan = bool(torch.isnan(c64).any())
        rows.append(VerifyRow(name, (c64 - t64).abs().max().item(), rel, max_err(r, t), rel, bound,
                              not nan and rel <= bound, "NaN" if nan else "quantized vs float original"))
    agreement = None
    if "logits" in t_out or len(t_out) == 1:  # the token logits: .logits, or a model's only output
        t = t_out.get("logits", next(iter(t_out.values())))
        c = c_out.get("logits", next(iter(c_out.values()), None))
        if c is not None and c.shape == t.shape and t.dim() >= 2:
            agreement = (c.argmax(-1) == t.argmax(-1)).double().mean().item()
    return VerifyReport(rows, dtype, 0, "", quantized_bits=bits, bound=bound, token_agreement=agreement)
