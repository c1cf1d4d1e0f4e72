"""The GPT model: kernels vs the fp64 eager model, Hugging Face parity, presets and clear errors."""

import copy

import pytest
import torch
from conftest import INTERPRET, assert_close

from gptkernels.model import GPT, PRESETS, GPTConfig, KVCache

TINY = GPTConfig.preset("tiny", block_size=32, vocab_size=97, n_embd=48, n_head=3)  # head_dim 16, odd vocab


def _fp64_reference(model):
    ref = copy.deepcopy(model).double()
    for m in ref.modules():
        if hasattr(m, "backend"):
            m.backend = "torch"
    ref.backend = "torch"
    return ref


def _grads(model, idx, targets):
    logits, loss = model(idx, targets, return_logits=True)
    params = [p for _, p in model.named_parameters()]
    dy = torch.Generator().manual_seed(1)
    g = torch.randn(logits.shape, generator=dy, dtype=torch.float64).to(logits.dtype)
    grads = torch.autograd.grad((logits * g).sum() + loss, params)
    return logits, loss, dict(zip([n for n, _ in model.named_parameters()], grads))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="needs TRITON_INTERPRET=1"))])
def test_model_matches_fp64_reference(backend):
    """Logits, loss and every parameter gradient of the kernel model against the same weights in fp64."""
    torch.manual_seed(torch.initial_seed())
    model = GPT(TINY, backend=backend)
    with torch.no_grad():  # non-trivial norm parameters and biases, so their gradients and effects are exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ref = _fp64_reference(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 17))
    targets = torch.randint(0, TINY.vocab_size, (2, 17))
    targets[0, 3] = -1  # ignored position
    logits, loss, grads = _grads(model, idx, targets)
    rlogits, rloss, rgrads = _grads(ref, idx, targets)
    assert_close(logits, rlogits, name="logits")
    assert_close(loss, rloss, name="loss")
    assert set(grads) == set(rgrads)
    for n in grads:
        assert_close(grads[n], rgrads[n], name=f"d{n}")


def test_presets_and_parameter_counts():
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"}
    with torch.device("meta"):
        n = GPT(GPTConfig.preset("gpt2"), backend="torch").num_params(non_embedding=False)
    assert n == 124_439_808  # GPT-2 small with tied embeddings, vocab 50257, 1024 positions
    assert GPTConfig.preset("gpt2", block_size=256).block_size == 256


def test_state_dict_has_nanogpt_names_and_tied_head():
    model = GPT(TINY, backend="cpu")
    keys = set(model.state_dict())
    for k in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.1.ln_2.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight",
              "lm_head.weight"):
        assert k in keys
    assert model.lm_head.weight is model.transformer.wte.weight
    # c_proj init scaled by 1/sqrt(2 * n_layer) (GPT-2)
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert 0.5 * 0.02 / 2 < std < 1.5 * 0.02 / 2


def test_bad_config_and_inputs_raise_clearly():
    with pytest.raises(ValueError, match="n_embd .* divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="no field"):
        GPTConfig.preset("tiny", n_layers=3)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)
    model = GPT(TINY, backend="cpu")
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be \(B, T\)"):
        model(torch.zeros(33, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        KVCache(TINY, 1, max_len=64)
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_hf("/nonexistent/checkpoint")


def test_kv_cache_prefill_then_decode_equals_full_forward():
    model = GPT(TINY, backend="cpu").eval()
    idx = torch.randint(0, TINY.vocab_size, (3, 12))
    full, _ = model(idx)
    cache = model.make_cache(3, 12)
    first, _ = model(idx[:, :7], cache=cache)
    steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 10)]
    last, _ = model(idx[:, 10:], cache=cache)  # two tokens at once (chunked prefill / speculative)
    got = torch.cat([first, *steps, last], dim=1)
    assert cache.length == 12 and int(cache.pos) == 12
    assert_close(got, full.double(), name="cached logits")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_loss_without_logits_matches_fp64_reference(backend, monkeypatch):
    """With targets and no return_logits the loss comes from linear_cross_entropy: the LM head never runs, and the loss
    and every parameter gradient (the tied wte/lm_head weight included) match the logits path in fp64."""
    torch.manual_seed(torch.initial_seed())
    model = GPT(TINY, backend=backend)
    ref = _fp64_reference(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 17))
    targets = torch.randint(0, TINY.vocab_size, (2, 17))
    targets[1, :5] = -1
    _, rloss = ref(idx, targets, return_logits=True)
    rgrads = torch.autograd.grad(rloss, list(ref.parameters()))

    def no_head(*args):
        raise AssertionError("the LM head ran: the logits were built")

    monkeypatch.setattr(model.lm_head, "forward", no_head)
    logits, loss = model(idx, targets)
    assert logits is None and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_close(loss, rloss, name="loss")
    for (n, _), g, r in zip(model.named_parameters(), grads, rgrads):
        assert_close(g, r, name=f"grad {n}")


def test_autocast_bf16_runs_in_bf16():
    model = GPT(TINY, backend="cpu")
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx, return_logits=True)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    # The 16-bit rule, with the same model on the torch backend (eager PyTorch) under the same autocast as the
    # yardstick and the model in float64 as the reference: logits, loss and every parameter gradient.
    eager = GPT(TINY, backend="torch")
    eager.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        elogits, eloss = eager(idx, idx, return_logits=True)
    eloss.backward()
    ref64 = copy.deepcopy(eager).double()
    ref64.zero_grad()
    rlogits, rloss = ref64(idx, idx, return_logits=True)
    rloss.backward()
    bf16 = torch.bfloat16
    assert_close(logits, rlogits, elogits, "autocast logits", dtype=bf16)
    assert_close(loss, rloss, eloss, "autocast loss", dtype=bf16)
    rparams, eparams = dict(ref64.named_parameters()), dict(eager.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, rparams[name].grad, eparams[name].grad, f"autocast grad {name}", dtype=bf16)


def test_compile_fullgraph_train_step():
    model = GPT(TINY, backend="cpu")
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    logits, loss = compiled(idx, idx)  # the loss through linear_cross_entropy, no logits
    assert logits is None
    loss.backward()
    g = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    _, eloss = model(idx, idx)
    eloss.backward()
    assert_close(loss, eloss.double(), name="compiled loss")
    assert_close(g, model.transformer.h[0].attn.c_attn.weight.grad.double(), name="compiled dW")


def _hf_gpt2(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=48, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("source", ["object", "folder"])
def test_from_hf_logits_match(source, tmp_path):
    hf = _hf_gpt2()
    with torch.no_grad():  # random LN / bias values: HF initialises them to 1 / 0, which would hide mistakes
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    if source == "folder":
        hf.save_pretrained(tmp_path)
        model = GPT.from_hf(tmp_path, backend="cpu")
    else:
        model = GPT.from_hf(hf, backend="cpu")
    idx = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = model(idx)
    assert (got - want).abs().max().item() <= 1e-4
    assert not torch.isnan(got).any()


def test_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT.from_hf(_hf_gpt2(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_hf(_hf_gpt2(activation_function="silu"))
