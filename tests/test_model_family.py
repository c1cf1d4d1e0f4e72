"""The GPT family on one GPT class: GPT-1 (post-norm, no final LayerNorm), GPT-2, GPT-3-style (alternating dense and
banded attention). Kernels vs the fp64 eager model, Hugging Face parity (OpenAIGPT, GPT-Neo), the KV cache honouring
the band, presets and their counts, clear errors."""

import copy
import json

import pytest
import torch
from conftest import INTERPRET, assert_close

from gptkernels.model import GPT, PRESETS, GPTConfig

# Small shapes of the three layouts; window 4 with 16+ tokens, so keys fall outside the band.
SMALL = dict(block_size=32, vocab_size=97, n_layer=4, n_head=3, n_embd=48)  # head_dim 16, odd vocab
GPT1 = GPTConfig(**SMALL, norm="post", final_norm=False)
GPT3 = GPTConfig(**SMALL, attention_layers=("global", "local"), window_size=4)
NEO = GPTConfig(**SMALL, attention_layers=("local", "global", "global"), window_size=4, attn_scale=1.0,
                qkv_bias=False)  # a pattern that is not a simple alternation, and GPT-Neo's unscaled scores
FAMILY = [pytest.param(GPT1, id="gpt1"), pytest.param(GPT3, id="gpt3"), pytest.param(NEO, id="neo")]


def _perturbed(model):
    with torch.no_grad():  # non-trivial LayerNorm scales and biases: HF and our init (1 / 0) would hide mistakes
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _fp64_reference(model):
    ref = copy.deepcopy(model).double()
    for m in ref.modules():
        if hasattr(m, "backend"):
            m.backend = "torch"
    return ref


def _max_rel(got, want):
    """The parity metric: max |got - want| relative to max |want| (fp32 logits)."""
    return ((got - want).abs().max() / want.abs().max()).item()


# ----------------------------------------------------------------------------------------------- presets
def test_presets_shapes_and_parameter_counts():
    counts = {}
    with torch.device("meta"):
        for name in ("gpt1", "gpt3-small", "gpt3-medium", "gpt3-large", "gpt3-xl"):
            counts[name] = GPT(GPTConfig.preset(name), backend="torch").num_params(non_embedding=False)
    assert counts["gpt1"] == 116_534_784  # 12 x 768, 512 positions, vocab 40478, tied head: the paper's 117M
    # Brown et al. 2020, table 2.1: 125M, 350M, 760M, 1.3B (tied head, 2048 positions, vocab 50257).
    for name, paper in (("gpt3-small", 125e6), ("gpt3-medium", 350e6), ("gpt3-large", 760e6), ("gpt3-xl", 1.3e9)):
        assert abs(counts[name] / paper - 1) < 0.03, (name, counts[name])
    g1 = PRESETS["gpt1"]
    assert (g1.norm, g1.final_norm, g1.block_size, g1.vocab_size, g1.activation) == (
        "post", False, 512, 40478, "gelu_tanh")
    for name in ("gpt3-small", "gpt3-medium", "gpt3-large", "gpt3-xl"):
        c = PRESETS[name]
        assert (c.block_size, c.vocab_size, c.norm, c.final_norm) == (2048, 50257, "pre", True)
        assert [c.layer_window(i) for i in range(4)] == [None, 256, None, 256]
    assert PRESETS["gpt3-xl"].head_dim == 128 and PRESETS["gpt3-large"].head_dim == 96
    for name in PRESETS:  # what train, generate, profile and bench --model look up
        assert GPTConfig.preset(name) == PRESETS[name]


def test_flops_count_the_band():
    """6 N + 12 C sum_l T_l, a local layer's T_l being min(T, window): GPT-3 small at 2048 tokens."""
    with torch.device("meta"):
        m3 = GPT(GPTConfig.preset("gpt3-small"), backend="torch")
        m2 = GPT(GPTConfig.preset("gpt2"), backend="torch")
    n = m3.num_params()
    assert m3.flops_per_token(2048) == 6 * n + 12 * 768 * (6 * 2048 + 6 * 256)
    assert m3.flops_per_token(200) == 6 * n + 12 * 768 * 12 * 200  # the band is wider than the context
    assert m2.flops_per_token(1024) == 6 * m2.num_params() + 12 * 12 * 768 * 1024  # GPT-2 unchanged


def test_config_fields_and_errors():
    c = GPTConfig(**{**GPT3.to_dict(), "attention_layers": ["global", "local"]})  # as a JSON config reads back
    assert c == GPT3 and isinstance(c.attention_layers, tuple)
    assert GPTConfig(**json.loads(json.dumps(NEO.to_dict()))) == NEO
    assert GPTConfig(attn_scale=1).attn_scale == 1.0 and isinstance(GPTConfig(attn_scale=1).attn_scale, float)
    with pytest.raises(ValueError, match="norm must be 'pre' or 'post'"):
        GPTConfig(norm="sandwich")
    for bad in ("local", (), ("global", "sparse")):
        with pytest.raises(ValueError, match="attention_layers"):
            GPTConfig(attention_layers=bad)
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        GPTConfig(window_size=0)
    with pytest.raises(ValueError, match="attn_scale"):
        GPTConfig(attn_scale=-1.0)


def test_module_tree_follows_the_config():
    g1 = GPT(GPT1, backend="cpu")
    assert "transformer.ln_f.weight" not in g1.state_dict() and not hasattr(g1.transformer, "ln_f")
    assert g1.lm_head.weight is g1.transformer.wte.weight
    neo = GPT(NEO, backend="cpu")
    assert "transformer.h.0.attn.c_attn.bias" not in neo.state_dict()
    assert "transformer.h.0.attn.c_proj.bias" in neo.state_dict()
    assert [b.attn.window for b in neo.transformer.h] == [4, None, None, 4]
    assert all(b.attn.scale == 1.0 for b in neo.transformer.h)
    # GPT-2's key order is unchanged: ln_f last in transformer.
    assert list(GPT(GPTConfig.preset("tiny"), backend="cpu").state_dict())[-2:] == [
        "transformer.ln_f.bias", "lm_head.weight"]


# ------------------------------------------------------------------------------------ kernels vs fp64
@pytest.mark.parametrize("config, backend", [
    *[pytest.param(p.values[0], "cpu", id=f"{p.id}-cpu") for p in FAMILY],
    # Triton's window and scale paths; in the interpreter ~12 s on a 2-core CPU, so one config (band, scale 1).
    pytest.param(NEO, "triton", id="neo-triton", marks=pytest.mark.skipif(not INTERPRET, reason="needs "
                                                                             "TRITON_INTERPRET=1")),
])
def test_kernel_model_matches_fp64_reference(config, backend):
    """Logits, loss and every parameter gradient of the kernel model against the same weights in fp64."""
    model = _perturbed(GPT(config, backend=backend))
    ref = _fp64_reference(model)
    idx = torch.randint(0, config.vocab_size, (2, 17))
    targets = torch.randint(0, config.vocab_size, (2, 17))
    out = {}
    for name, m in (("kernels", model), ("fp64", ref)):
        logits, loss = m(idx, targets, return_logits=True)
        g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad((logits * g.to(logits.dtype)).sum() + loss, list(m.parameters()))
        out[name] = logits, loss, grads
    assert_close(out["kernels"][0], out["fp64"][0], name="logits")
    assert_close(out["kernels"][1], out["fp64"][1], name="loss")
    for (n, _), g, r in zip(model.named_parameters(), out["kernels"][2], out["fp64"][2]):
        assert_close(g, r, name=f"d{n}")


@pytest.mark.parametrize("config", [pytest.param(GPTConfig(**{**GPT1.to_dict(), "n_layer": 1}), id="gpt1"),
                                    pytest.param(GPTConfig(**{**NEO.to_dict(), "n_layer": 1}), id="neo")])
def test_post_norm_and_band_semantics_against_plain_pytorch(config):
    """One block written out in plain PyTorch (no gptkernels op), fp64: GPT-1's h = LN(h + attn(h));
    h = LN(h + mlp(h)), and a local layer's query i seeing keys i - w < j <= i with unscaled scores."""
    import torch.nn.functional as F

    model = _fp64_reference(_perturbed(GPT(config, backend="cpu")))
    b, T, C, H = model.transformer.h[0], 12, config.n_embd, config.n_head

    def ln(t, m):
        return F.layer_norm(t, (C,), m.weight, m.bias)

    def mlp(t):
        return b.mlp.c_proj(F.gelu(b.mlp.c_fc(t), approximate="tanh"))

    idx = torch.randint(0, config.vocab_size, (2, T))
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T))  # (B, T, C)
    qkv = b.attn.c_attn(x if config.norm == "post" else ln(x, b.ln_1))
    q, k, v = qkv.view(2, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    w = config.layer_window(0)
    seen = (j <= i) & (j > i - w if w else True)
    s = (q @ k.transpose(-1, -2)) * (config.attn_scale or (C // H) ** -0.5)
    a = b.attn.c_proj((s.masked_fill(~seen, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(2, T, C))
    if config.norm == "post":
        n = ln(x + a, b.ln_1)
        h = ln(n + mlp(n), b.ln_2)
    else:
        h = x + a
        h = ln(h + mlp(ln(h, b.ln_2)), model.transformer.ln_f)
    got, _ = model(idx)
    assert_close(got, h @ model.transformer.wte.weight.t(), name=f"{config.norm}-norm logits")


def test_compile_fullgraph_post_norm_and_band():
    """torch.compile(fullgraph=True) of a training step through a post-norm block and a banded, unscaled layer."""
    config = GPTConfig(**{**GPT1.to_dict(), "n_layer": 2, "attention_layers": ("global", "local"), "window_size": 4,
                          "attn_scale": 1.0})
    model = GPT(config, backend="cpu")
    idx = torch.randint(0, config.vocab_size, (2, 12))
    logits, loss = torch.compile(model, fullgraph=True, dynamic=False)(idx, idx, return_logits=True)
    loss.backward()
    g = model.transformer.h[1].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    elogits, eloss = model(idx, idx, return_logits=True)
    eloss.backward()
    assert_close(logits, elogits.double(), name="compiled logits")
    assert_close(g, model.transformer.h[1].attn.c_attn.weight.grad.double(), name="compiled dW")


def test_packed_documents_respect_the_band():
    """cu_seqlens: each document alone, banded layers included (flash_attn_varlen_func's window)."""
    model = _perturbed(GPT(GPT3, backend="cpu")).eval()
    lens = [5, 19, 8]
    docs = [torch.randint(0, GPT3.vocab_size, (n,)) for n in lens]
    cu = torch.tensor([0, 5, 24, 32], dtype=torch.int32)
    with torch.no_grad():
        packed, _ = model(torch.cat(docs).view(2, 16), cu_seqlens=cu, max_seqlen=19)
        alone = torch.cat([model(d[None])[0][0] for d in docs])
    assert_close(packed.view(-1, GPT3.vocab_size), alone.double(), name="packed logits")


# ---------------------------------------------------------------------------------------- Hugging Face
def _hf_openai_gpt():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OpenAIGPTConfig(vocab_size=100, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _perturbed(transformers.OpenAIGPTLMHeadModel(cfg).eval())


def _hf_gpt_neo(attention_types=(("global", "local"), 2), **kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoConfig(vocab_size=100, max_position_embeddings=32, hidden_size=64, num_layers=4,
                                    num_heads=4, attention_types=[list(attention_types)], window_size=4,
                                    resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
                                    bos_token_id=None, eos_token_id=None, **kw)
    return _perturbed(transformers.GPTNeoForCausalLM(cfg).eval())


@pytest.mark.parametrize("kind", ["openai-gpt", "gpt_neo", "gpt_neo-irregular"])
@pytest.mark.parametrize("source", ["object", "folder"])
def test_from_hf_logits_match(kind, source, tmp_path):
    if kind == "openai-gpt":
        hf = _hf_openai_gpt()
    elif kind == "gpt_neo":
        hf = _hf_gpt_neo()
    else:  # one local layer between three global ones: the pattern is stored per layer
        hf = _hf_gpt_neo(attention_types=(("global", "local", "global", "global"), 1))
    if source == "folder":
        hf.save_pretrained(tmp_path)
        model = GPT.from_hf(tmp_path, backend="cpu")
    else:
        model = GPT.from_hf(hf, backend="cpu")
    c = model.config
    if kind == "openai-gpt":
        assert (c.norm, c.final_norm, c.attention_layers, c.attn_scale) == ("post", False, ("global",), None)
    else:
        assert (c.norm, c.final_norm, c.window_size, c.attn_scale, c.qkv_bias) == ("pre", True, 4, 1.0, False)
        assert [c.layer_window(i) for i in range(c.n_layer)] == [
            4 if a == "local" else None for a in hf.config.attention_layers]
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = model(idx)
    assert not torch.isnan(got).any()
    assert _max_rel(got, want) <= 1e-4, f"{kind}: {_max_rel(got, want):.2e}"
    if kind == "gpt_neo":  # the band matters at this length: dense attention would be far off
        for b in model.transformer.h:
            b.attn.window = None
        with torch.no_grad():
            assert _max_rel(model(idx)[0], want) > 1e-3


def test_from_hf_rejects_other_models(tmp_path):
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    msg = r"'bert'.*not supported; supported: openai-gpt \(OpenAIGPTLMHeadModel\), gpt2 .*gpt_neo"
    with pytest.raises(ValueError, match=msg):
        GPT.from_hf(bert)
    bert.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=msg):
        GPT.from_hf(tmp_path)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        GPT.from_hf(_hf_gpt_neo(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="intermediate_size"):
        GPT.from_hf(_hf_gpt_neo(intermediate_size=100))


# ----------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("config", FAMILY)
def test_cached_greedy_equals_uncached(backend, config):
    """Prompt of 9 tokens, longer than the window of 4; 14 new tokens: the band slides during decoding. Weight
    matrices x8: with GPT-2's init the greedy tokens hardly depend on the context (a dense-attention variant of
    these models generated the same tokens in 10 of 10 tries; x8: 1 of 20), so the band would go untested."""
    model = _perturbed(GPT(config, backend=backend)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    idx = torch.randint(0, config.vocab_size, (2, 9))
    with_cache = model.generate(idx, 14, temperature=0.0)
    assert torch.equal(with_cache, model.generate(idx, 14, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_decode_never_reads_keys_outside_the_band(backend):
    """After the prefill, the local layers' cached keys and values that no later query may see are NaN; one-token
    steps (the gathered band) and a three-token step (the sliced band) must give the full forward's logits."""
    model = _perturbed(GPT(NEO, backend=backend)).eval()
    seq = torch.randint(0, NEO.vocab_size, (2, 20))
    cache = model.make_cache(2, 20)
    local = [i for i in range(NEO.n_layer) if NEO.layer_window(i)]
    with torch.no_grad():
        full, _ = model(seq)
        got = [model(seq[:, :10], cache=cache)[0]]
        for i in local:  # the first decoded position, 10, sees keys 7..10
            cache.k[i][:, :, :7] = float("nan")
            cache.v[i][:, :, :7] = float("nan")
        for t0, t1 in ((10, 11), (11, 12), (12, 15), (15, 16), (16, 20)):
            got.append(model(seq[:, t0:t1], cache=cache)[0])
    assert_close(torch.cat(got, 1), full.double(), name="cached logits")


def test_cache_band_is_static_and_follows_pos():
    """The one-token band comes from the device pos (capturable): positions and count as pos advances."""
    cache = GPT(NEO, backend="cpu").make_cache(1, 12)
    assert cache.window == 4 and GPT(GPT1, backend="cpu").make_cache(1).band() is None
    assert GPT(NEO, backend="cpu").make_cache(1, 4).band() is None  # the band holds the whole cache
    for pos, first, n in ((0, 0, 1), (2, 0, 3), (3, 0, 4), (4, 1, 4), (11, 8, 4)):
        cache.pos.fill_(pos)
        idx, cnt = cache.band()
        assert idx.tolist() == list(range(first, first + 4)) and cnt.tolist() == [n]


def test_one_token_step_reads_its_position_from_the_device_only():
    """A CUDA graph replays a captured step without rerunning its Python, so host ints stay at their capture values.
    Here cache.length is held at the prompt length while pos advances (what replays do): with the band taken from
    pos, the logits are still those of the full forward. The prompt (2) is shorter than the window (4), so the band
    first grows, then slides."""
    model = _perturbed(GPT(GPT3, backend="cpu")).eval()
    seq = torch.randint(0, GPT3.vocab_size, (1, 20))
    cache = model.make_cache(1, 20)
    with torch.no_grad():
        full, _ = model(seq)
        got = [model(seq[:, :2], cache=cache)[0]]
        for t in range(2, 20):
            got.append(model(seq[:, t:t + 1], cache=cache)[0])
            cache.length = 2  # as captured
    assert int(cache.pos) == 20
    assert_close(torch.cat(got, 1), full.double(), name="logits with a frozen host length")


@pytest.mark.gpu
def test_cuda_graph_replay_of_a_banded_model():
    """profile --cuda-graphs on the GPT-3-style tiny preset, prompt (24) longer than its window (16): replaying the
    captured one-token step gives the tokens of running it step by step."""
    from gptkernels import profile as prof

    r = prof.profile("gpt3-tiny", batch=2, prompt_len=24, new_tokens=24, providers=["eager", "gptkernels"],
                     device="cuda", dtype="fp32", repeats=2, cuda_graphs=True)
    rows = {row["provider"]: row for row in r["rows"]}
    for p, row in rows.items():
        assert row["status"] == "ok", f"{p}: {row['error']}"
    for p in ("eager", "gptkernels"):
        assert rows[p + "+graphs"]["tokens_match_step_by_step"] is True, p


def test_generate_cli_runs_the_tiny_family(capsys):
    from gptkernels import generate as gen_cli

    for name in ("gpt1-tiny", "gpt3-tiny"):
        rc = gen_cli.main(["--device", "cpu", "--model", name, "--prompt", "x" * 20, "--max-new-tokens", "6",
                           "--temperature", "0"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert "6 new tokens" in out.strip().splitlines()[-1]
