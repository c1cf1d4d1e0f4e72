"""attn_implementation="gptkernels" in Hugging Face transformers (gptkernels.integrations.hf): tiny random GPT-2 and
Llama (GQA) models built from configs, offline, compared with the same weights on attn_implementation="eager"."""

import sys

import pytest
import torch
from conftest import assert_close

import gptkernels

transformers = pytest.importorskip("transformers")
from gptkernels.integrations import hf  # noqa: E402

transformers.logging.set_verbosity_error()


def test_import_gptkernels_does_not_import_transformers():
    import subprocess

    code = "import sys, gptkernels; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def config(arch, **extra):
    common = dict(vocab_size=97, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    if arch == "gpt2":
        return transformers.GPT2Config(n_positions=32, n_embd=48, n_layer=2, n_head=4, attn_pdrop=0.0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, **common)
    return transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=32, **common)


def pair(arch, reference="eager", **extra):
    """(reference model, gptkernels model) with the same weights, both in eval mode."""
    hf.register()
    eager = transformers.AutoModelForCausalLM.from_config(config(arch, **extra), attn_implementation=reference).eval()
    ours = transformers.AutoModelForCausalLM.from_config(config(arch, **extra),
                                                         attn_implementation="gptkernels").eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "gptkernels"
    return eager, ours


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_from_config_matches_eager(arch, padding):
    # HF's eager path in float64 turns a fully masked (left-padded) query row into NaN, which then leaks through the
    # next layer's keys into every row of that sequence; its sdpa path (the same math) is the float64 reference there.
    eager, ours = pair(arch, "sdpa" if padding == "left" else "eager")
    ids = torch.randint(1, 97, (3, 12))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 7:] = 0
        mask[2, 10:] = 0
    elif padding == "left":
        mask[1, :5] = 0
        mask[2, :2] = 0
    kw = {"attention_mask": mask} if padding != "none" else {}
    ref = eager.double()(ids, **kw).logits
    out = ours(ids, **kw).logits
    keep = mask.bool()  # padded query positions are garbage in every implementation (eager: uniform over all keys)
    assert_close(out[keep], ref[keep], name=f"logits ({arch}, {padding} padding)")
    assert gptkernels.last("scaled_dot_product_attention")[0] == "cpu"  # the C++ kernel ran, not a fallback
    assert hf.NAME in transformers.AttentionInterface().valid_keys()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_config_gradients_match_eager(arch):
    eager, ours = pair(arch)
    ids = torch.randint(1, 97, (2, 9))
    eager = eager.double()
    ref_loss = eager(ids, labels=ids).loss
    loss = ours(ids, labels=ids).loss
    params = dict(ours.named_parameters())
    names = [n for n, _ in eager.named_parameters()]
    ref_grads = torch.autograd.grad(ref_loss, [p for _, p in eager.named_parameters()])
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    assert_close(loss, ref_loss, name="loss")
    for name, g, rg in zip(names, grads, ref_grads):
        assert_close(g, rg, name=f"grad {name}")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_cache_matches_eager(arch):
    eager, ours = pair(arch, "sdpa")  # left padding: see test_from_config_matches_eager
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as batched generation uses
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    ref = eager.generate(ids, **kw)
    out = ours.generate(ids, **kw)  # prefill, then one-token decode steps against the cache
    assert torch.equal(out.sequences, ref.sequences)
    for step, (lo, lr) in enumerate(zip(out.logits, ref.logits)):
        assert_close(lo, lr, name=f"logits of generated token {step}", fp32_bound=1e-5)


@pytest.mark.parametrize("scaling", [None, 1.0, 0.05, 0.6])
def test_attention_forward_passes_scaling(scaling):
    # HF hands every attention function its module's `scaling`; the default 1/sqrt(D) is only one value of it.
    class M(torch.nn.Module):
        is_causal = True

    q = torch.randn(2, 4, 9, 16) * 2
    k, v = torch.randn(2, 2, 9, 16) * 2, torch.randn(2, 2, 9, 16)
    out, _ = hf.attention_forward(M(), q, k, v, None, scaling=scaling)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                           scale=scaling, enable_gqa=True)
    assert gptkernels.last("scaled_dot_product_attention")[0] == "cpu"
    assert_close(out, ref.transpose(1, 2), name=f"out, scaling={scaling}")


@pytest.mark.parametrize("variant", [dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True)],
                         ids=["unscaled", "inverse-layer-idx"])
def test_gpt2_nondefault_scaling_matches_eager(variant):
    # GPT-2's module scaling: 1.0 without scale_attn_weights; 1/sqrt(D) / (layer + 1) with
    # scale_attn_by_inverse_layer_idx (layer 1 attends at half the default scale).
    eager, ours = pair("gpt2", **variant)
    scalings = {m.scaling for m in ours.modules() if hasattr(m, "scaling")}
    assert scalings and scalings != {(48 // 4) ** -0.5}, scalings  # not (only) the default 1/sqrt(head_dim)
    ids = torch.randint(1, 97, (2, 12))
    ref = eager.double()(ids).logits
    out = ours(ids).logits
    assert_close(out, ref, name=f"logits ({variant})")


def test_unsupported_kwargs_raise():
    q = torch.randn(1, 2, 3, 8)

    class M(torch.nn.Module):
        is_causal = True

    with pytest.raises(NotImplementedError, match="softcap"):
        hf.attention_forward(M(), q, q, q, None, softcap=30.0)
    out, weights = hf.attention_forward(M(), q, q, q, None)
    assert out.shape == (1, 3, 2, 8) and weights is None
