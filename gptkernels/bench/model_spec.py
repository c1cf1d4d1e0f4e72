"""``python -m gptkernels bench --model NAME``: one GPT training step (fwd, bwd, fwd+bwd) as a benchmarked op.

The model's parameters are the op's inputs, so every provider (eager = ``GPT(config, backend="torch")``,
``compile`` of it, and ``GPT(config, backend=b)`` per kernel backend) runs the same weights through
``torch.func.functional_call``, and the harness checks the loss and every parameter gradient against the model in
fp64 before timing. The step ends in the loss (random targets), as training does: eager builds the logits and
calls F.cross_entropy, the kernel backends fuse the LM head with the loss, and the rows' peak memory shows the
difference. Shape (B, T): tokens per step; FLOPs from ``GPT.flops_per_token`` (6N + 12·L·C·T, fwd 1/3;
T capped at the window on banded layers).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gptkernels.bench.registry import OpSpec


def _key(name: str) -> str:
    return name.replace(".", "__")  # parameter names become keyword arguments


@functools.cache
def _model(name: str, backend: str):
    from gptkernels.model import GPT, GPTConfig

    return GPT(GPTConfig.preset(name), backend=backend)


def _fn(name: str, backend: str):
    """A training step's loss. Kernel backends: ``GPT.forward(idx, targets)``, whose LM head and loss are one
    linear_cross_entropy (the (B, T, V) logits never exist). Eager ("torch"): what a PyTorch user writes, the logits
    and then F.cross_entropy, so the two rows' peak memory shows what the fused loss saves."""
    model = _model(name, backend)

    def step(idx, targets, **params):
        state = {k.replace("__", "."): v for k, v in params.items()}
        if backend == "torch":
            logits, _ = torch.func.functional_call(model, state, (idx,), tie_weights=True, strict=False)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        _, loss = torch.func.functional_call(model, state, (idx, targets), tie_weights=True, strict=False)
        return loss

    return step


def bench_spec(name: str) -> OpSpec:
    """The OpSpec of a training step of model preset ``name`` (see gptkernels.model.PRESETS)."""
    from gptkernels.model import GPT, GPTConfig

    config = GPTConfig.preset(name)  # raises with the known names
    meta = GPT(config, backend="torch")  # for parameter names, shapes and the FLOP count
    names = [n for n, _ in meta.named_parameters() if n != "lm_head.weight"]  # tied to transformer.wte.weight
    per_token = meta.flops_per_token  # (seq_len) -> fwd+bwd FLOPs per token
    del meta

    def shape(preset, device_type):
        t = min(config.block_size, 64 if preset == "tiny" else 1024 if device_type == "cuda" else 256)
        b = 8 if device_type == "cuda" and preset != "tiny" else 1
        return (b, t)

    def make_inputs(shape, dtype, device, gen):
        b, t = shape
        ref = _model(name, "torch")
        out = {"idx": torch.randint(0, config.vocab_size, (b, t), device=device, generator=gen),
               "targets": torch.randint(0, config.vocab_size, (b, t), device=device, generator=gen)}
        for n, p in ref.named_parameters():
            if n in names:
                x = torch.randn(p.shape, device=device, generator=gen, dtype=torch.float32)
                # GPT-2-like magnitudes: weights ~0.02, norm scales ~1, biases small.
                x = x * 0.02 + (1.0 if n.endswith("ln_1.weight") or n.endswith("ln_2.weight")
                                or n.endswith("ln_f.weight") else 0.0)
                out[_key(n)] = x.to(dtype)
        return out

    def flops(frac):
        return lambda shape: int(frac * shape[0] * shape[1] * per_token(shape[1]))

    eager = _fn(name, "torch")
    return OpSpec(
        name=f"model:{name}", summary=f"GPT {name} ({config.n_layer}L, {config.n_embd}C, {config.n_head}H): the "
        f"training loss and every parameter gradient", module="gptkernels.model", shape=shape, make_inputs=make_inputs,
        grad_inputs=tuple(_key(n) for n in names), ref=eager, eager=eager, kernel=lambda b: _fn(name, b),
        flops={"fwd": flops(1 / 3), "bwd": flops(2 / 3)},
        formula={"fwd": "(6N + 12*L*C*T') * B*T / 3", "bwd": "(6N + 12*L*C*T') * B*T * 2/3"},  # T' = min(T, window)
        default_on=(),
    )


def model_spec(name: str) -> tuple[OpSpec | None, str | None]:
    """The whole-model benchmark: an :class:`OpSpec` of one GPT training step (then it runs like any op), or
    (None, why) for an unknown model preset."""
    try:
        return bench_spec(name), None
    except ValueError as e:
        return None, str(e)
