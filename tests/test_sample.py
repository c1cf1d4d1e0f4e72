"""Sampling: each logits processor and warper equals Hugging Face's on the same logits and histories, the chain runs
in HF's order, greedy generation with the history processors matches GPT2LMHeadModel.generate, bad arguments."""

import pytest
import torch

from gptkernels.model import GPT, GPTConfig
from gptkernels.sample import (
    Sampling,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf  # noqa: E402

V = 97  # an odd vocabulary: no kernel-friendly sizes


def _inputs(B=4, L=23, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * scale  # (B, V) both signs, a spread wide enough for top-p/min-p cuts
    # A small alphabet per row (rows differ), so tokens and n-grams repeat.
    seq = (torch.randint(0, 6, (B, L), generator=g) + torch.arange(B)[:, None] * 7) % V  # (B, L)
    return logits, seq


def _same(ours, theirs):
    """Bit-equal where finite, and -inf in the same places."""
    assert ours.dtype == theirs.dtype == torch.float32
    fin = torch.isfinite(theirs)
    assert torch.equal(torch.isfinite(ours), fin), "a different set of tokens was filtered"
    assert torch.equal(ours[~fin], theirs[~fin])
    assert torch.equal(ours[fin], theirs[fin])


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_hf(penalty):
    logits, seq = _inputs()
    _same(apply_repetition_penalty(logits, seq, penalty), hf.RepetitionPenaltyLogitsProcessor(penalty)(seq, logits))


def test_repetition_penalty_semantics():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0, 4]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0]]  # seen: 2 -> 1, -2 -> -4; unseen unchanged


@pytest.mark.parametrize("n", [1, 2, 3, 4, 30])
@pytest.mark.parametrize("L", [1, 2, 5, 23])
def test_no_repeat_ngram_equals_hf(n, L):
    logits, seq = _inputs(L=L, seed=n * 100 + L)
    ours = ban_repeated_ngrams(logits, seq, n)
    _same(ours, hf.NoRepeatNGramLogitsProcessor(n)(seq, logits.clone()))
    if L == 23 and n <= 3:
        assert torch.isinf(ours).any(), "a 6-token alphabet must repeat some n-gram prefix in 23 tokens"


def test_no_repeat_ngram_semantics():
    # History 1 2 3 1 2: the next token would complete (1, 2, ?) and "1 2 3" exists, so 3 is banned (n = 3).
    logits = torch.zeros(1, 5)
    out = ban_repeated_ngrams(logits, torch.tensor([[1, 2, 3, 1, 2]]), 3)
    assert torch.isinf(out).nonzero()[:, 1].tolist() == [3]
    # Two rows with their own histories: row 1 ends "4" and has "4 0" and "4 1": both banned (n = 2).
    out = ban_repeated_ngrams(torch.zeros(2, 5), torch.tensor([[1, 2, 3, 1, 2], [4, 0, 4, 1, 4]]), 2)
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [3]
    assert torch.isinf(out[1]).nonzero().flatten().tolist() == [0, 1]


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_min_p_equals_hf(min_p, scale):
    logits, _ = _inputs(scale=scale)
    ours = min_p_filter(logits, min_p)
    _same(ours, hf.MinPLogitsWarper(min_p)(None, logits))
    assert torch.isfinite(ours).any(dim=-1).all(), "the top token always stays"


@pytest.mark.parametrize("top_k", [1, 5, V, V + 3])
def test_top_k_equals_hf(top_k):
    logits, _ = _inputs()
    _same(top_k_filter(logits, top_k), hf.TopKLogitsWarper(top_k)(None, logits))


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_top_p_equals_hf(top_p, scale):
    logits, _ = _inputs(scale=scale)
    _same(top_p_filter(logits, top_p), hf.TopPLogitsWarper(top_p)(None, logits))


def _hf_chain(temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
              no_repeat_ngram_size=None):
    # The list transformers' GenerationMixin._get_logits_processor builds for these generation-config fields.
    procs = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        procs.append(hf.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size:
        procs.append(hf.NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if temperature != 1.0:
        procs.append(hf.TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(hf.TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(hf.TopPLogitsWarper(top_p))
    if min_p is not None:
        procs.append(hf.MinPLogitsWarper(min_p))
    return hf.LogitsProcessorList(procs)


CHAINS = [
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(temperature=1.5, top_p=0.8, min_p=0.1, repetition_penalty=0.8),
    dict(temperature=0.5, top_k=40, min_p=0.2, no_repeat_ngram_size=3),
    dict(temperature=1.0, min_p=0.02, repetition_penalty=1.2),
    dict(temperature=2.0, top_k=3, top_p=0.5, min_p=0.5, repetition_penalty=1.5, no_repeat_ngram_size=1),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kw", CHAINS)
def test_chain_equals_hf(kw, device):
    logits, seq = (t.to(device) for t in _inputs(L=31, seed=5))
    _same(Sampling(**kw).process(logits, seq), _hf_chain(**kw)(seq, logits.clone()))


def test_chain_order_matters_and_min_p_follows_temperature():
    # min_p after temperature: a hot temperature flattens the probabilities, so fewer tokens fall below the cut.
    logits, seq = _inputs(scale=3.0)
    cold = Sampling(temperature=0.5, min_p=0.1).process(logits, seq)
    hot = Sampling(temperature=2.0, min_p=0.1).process(logits, seq)
    assert torch.isfinite(hot).sum() > torch.isfinite(cold).sum()
    # The penalty runs before the warpers: a penalized top token can fall out of top_k = 1.
    top = logits.argmax(dim=-1, keepdim=True)
    seq = torch.cat([seq, top], dim=1)
    kept = Sampling(top_k=1, repetition_penalty=100.0).process(logits, seq).argmax(dim=-1, keepdim=True)
    assert not torch.equal(kept, top)


def test_greedy_applies_only_the_history_processors():
    logits, seq = _inputs()
    greedy = Sampling(temperature=0.0, top_k=1, top_p=1e-6, min_p=1.0, repetition_penalty=1.3,
                      no_repeat_ngram_size=2)
    want = _hf_chain(repetition_penalty=1.3, no_repeat_ngram_size=2)(seq, logits.clone())
    _same(greedy.process(logits, seq), want)
    assert torch.equal(greedy.sample(logits, seq), want.argmax(dim=-1, keepdim=True))


def test_sample_reproducible_and_inside_the_kept_set():
    logits, seq = _inputs(B=64)
    kw = dict(temperature=0.8, top_k=30, min_p=0.1, repetition_penalty=1.3, no_repeat_ngram_size=2)
    a = sample_next(logits, generator=torch.Generator().manual_seed(1), seq=seq, **kw)
    b = sample_next(logits, generator=torch.Generator().manual_seed(1), seq=seq, **kw)
    assert torch.equal(a, b) and a.shape == (64, 1)
    kept = Sampling(**kw).process(logits, seq)
    assert torch.isfinite(kept.gather(1, a)).all()


def test_every_token_banned_is_a_clear_error():
    seq = torch.arange(5)[None]  # every token of a 5-token vocabulary already seen
    with pytest.raises(ValueError, match="no_repeat_ngram_size 1 bans every token"):
        sample_next(torch.zeros(1, 5), 0.0, seq=seq, no_repeat_ngram_size=1)


@pytest.mark.parametrize("kw, match", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be"),
    (dict(no_repeat_ngram_size=0), "no_repeat_ngram_size must be an int >= 1"),
    (dict(no_repeat_ngram_size=2.0), "no_repeat_ngram_size must be an int >= 1"),
    (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size must be an int >= 1"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(min_p=float("nan")), r"min_p must be in \[0, 1\]"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be an int >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kw)
    model = GPT(GPTConfig.preset("tiny", block_size=16)).eval()
    with pytest.raises(ValueError, match="generate: " + match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, **kw)


def test_history_processors_need_the_history():
    with pytest.raises(ValueError, match="need the token history"):
        sample_next(torch.zeros(2, 5), repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"need the token history seq \(2, L\), got \(3, 4\)"):
        sample_next(torch.zeros(2, 5), no_repeat_ngram_size=2, seq=torch.zeros(3, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------ generation vs HF's generate
@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    # A wide initializer spreads the logits, so no two are within rounding of each other and argmax is stable.
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                                  pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
                                dict(no_repeat_ngram_size=1), dict(repetition_penalty=0.7)])
def test_greedy_generate_equals_hf(hf_gpt2, kw, use_cache):
    prompt = torch.tensor([[5, 17, 5, 40, 17], [1, 2, 3, 4, 5]])  # (B, T)
    n_new = 20
    ours = GPT.from_hf(hf_gpt2, backend="torch" if use_cache else "cpu").eval().generate(
        prompt, n_new, temperature=0.0, use_cache=use_cache, **kw)
    theirs = hf_gpt2.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n_new,
                              min_new_tokens=n_new, **kw)
    assert torch.equal(ours, theirs)
    plain = hf_gpt2.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n_new,
                             min_new_tokens=n_new)
    assert not torch.equal(ours, plain), "the processors must change this generation, or the test proves nothing"
