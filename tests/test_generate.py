"""Generation: the KV cache changes nothing but speed, sampling limits reduce to greedy, and the generate CLI."""

import pytest
import torch

from gptkernels import generate as gen_cli
from gptkernels.model import GPT, GPTConfig

BACKENDS = ["cpu", "torch"]


def _model(backend, **overrides):
    # block_size 32 keeps "beyond block_size" cheap to reach.
    return GPT(GPTConfig.preset("tiny", block_size=32, **overrides), backend=backend).eval()


def _prompt(T, B=2, V=256):
    return torch.randint(0, V, (B, T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 5])
def test_cache_equals_no_cache_greedy(backend, T):
    model, idx = _model(backend), _prompt(T)
    with_cache = model.generate(idx, 12, temperature=0.0)
    without = model.generate(idx, 12, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, T + 12)
    assert torch.equal(with_cache[:, :T], idx)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_equals_no_cache_sampling(backend):
    # Same generator seed, same draws: the cache must not change the probabilities beyond rounding.
    model, idx = _model(backend), _prompt(4)
    a = model.generate(idx, 10, temperature=0.9, top_k=50, generator=torch.Generator().manual_seed(7))
    b = model.generate(idx, 10, temperature=0.9, top_k=50, generator=torch.Generator().manual_seed(7),
                       use_cache=False)
    assert torch.equal(a, b)
    c = model.generate(idx, 10, temperature=0.9, top_k=50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, c), "the same seed must give the same tokens"


def test_cache_logits_match_full_forward():
    # Every decode step's logits equal the last row of a full forward over the same sequence (fp32 bound).
    model, idx = _model("cpu"), _prompt(3, B=1)
    seq = model.generate(idx, 6, temperature=0.0)
    cache = model.make_cache(1, seq.shape[1])
    with torch.no_grad():
        logits, _ = model(seq[:, :3], cache=cache, last_only=True)
        for t in range(3, seq.shape[1]):
            full, _ = model(seq[:, :t], last_only=True)
            err = (logits - full).norm() / full.norm()
            assert err <= 1e-5, f"step {t}: rel err {err:.2e}"
            logits, _ = model(seq[:, t:t + 1], cache=cache, last_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_1_and_tiny_top_p_are_greedy(backend):
    model, idx = _model(backend), _prompt(3)
    greedy = model.generate(idx, 8, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(idx, 8, temperature=1.5, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(idx, 8, temperature=1.5, top_p=1e-6, generator=g), greedy)


def test_decode_beyond_block_size_with_cache_is_a_clear_error():
    model, idx = _model("cpu"), _prompt(30)
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model.generate(idx, 3)
    # Without the cache the context is cropped to block_size and generation goes on.
    assert model.generate(idx, 3, use_cache=False).shape == (2, 33)
    cache = model.make_cache(2, 32)
    with torch.no_grad():
        model(idx, cache=cache)
        model(idx[:, :2], cache=cache)
        with pytest.raises(ValueError, match="exceeds block_size"):
            model(idx[:, :1], cache=cache)


# ------------------------------------------------------------------------------------------------------ CLI
def _run(capsys, *argv):
    rc = gen_cli.main(["--device", "cpu", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_random_tiny(capsys):
    rc, out, err = _run(capsys, "--model", "tiny", "--prompt", "Hello", "--max-new-tokens", "8", "--seed", "3",
                        "--num-samples", "2", "--top-k", "20")
    assert rc == 0, err
    assert out.count("Hello") == 2 and "--- sample 2 ---" in out
    last = out.strip().splitlines()[-1]
    assert "16 new tokens" in last and "tokens/s" in last and "backend: cpu" in last


def test_cli_greedy_ckpt_matches_model(capsys, tmp_path):
    config = GPTConfig.preset("tiny", block_size=64)
    model = GPT(config).eval()
    # A nanoGPT-style file: compiled-model key prefixes, extra config keys, iteration number.
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "config": {**config.to_dict(), "lr": 3e-4}, "iter": 100}, path)
    rc, out, err = _run(capsys, "--ckpt", str(path), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0")
    assert rc == 0, err
    want = model.generate(torch.tensor([[97, 98]]), 6, temperature=0.0)[0].tolist()
    assert out.splitlines()[0] == bytes(want).decode("utf-8", errors="replace")
    assert "(iter 100)" in out


def test_cli_bad_ckpt(capsys, tmp_path):
    rc, _, err = _run(capsys, "--ckpt", str(tmp_path / "missing.pt"))
    assert rc == 2 and "no such file" in err
    bad = tmp_path / "no_config.pt"
    torch.save({"model": GPT(GPTConfig.preset("tiny")).state_dict()}, bad)
    rc, _, err = _run(capsys, "--ckpt", str(bad))
    assert rc == 2 and "'config'" in err and "the file has keys 'model'" in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    rc, _, err = _run(capsys, "--ckpt", str(garbage))
    assert rc == 2 and "is a text file, not a checkpoint" in err and "ckpt.pt" in err


def test_cli_errors(capsys):
    rc, _, err = _run(capsys, "--model", "tiny", "--prompt", "x" * 120, "--max-new-tokens", "20")
    assert rc == 2 and "exceeds block_size" in err
    rc, _, err = _run(capsys, "--model", "tiny", "--prompt-ids", "1,300")
    assert rc == 2 and "outside the vocabulary" in err
    rc, _, err = _run(capsys, "--model", "tiny", "--backend", "fast")
    assert rc == 2 and "choose one of cuda, triton, cpu, torch" in err
    if not torch.cuda.is_available():
        rc, _, err = _run(capsys, "--model", "tiny", "--backend", "cuda", "--max-new-tokens", "2")
        assert rc == 2 and "backend 'cuda'" in err and "cannot run" in err


def test_prompt_encoding():
    assert gen_cli.encode_prompt("hé", None, 256) == [104, 195, 169]
    assert gen_cli.encode_prompt(None, "464, 3290", 50257) == [464, 3290]
    assert gen_cli.encode_prompt(None, None, 50257) == [50256]
    with pytest.raises(gen_cli.GenerateError, match="--prompt-ids"):
        gen_cli.encode_prompt("text", None, 50257)
    assert gen_cli.decode_tokens([104, 195], 256) == "h\ufffd"


@pytest.fixture
def hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    path = tmp_path / "hf-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_cli_hf_prompt_ids(capsys, hf_folder):
    rc, out, err = _run(capsys, "--hf", str(hf_folder), "--prompt-ids", "5,17,299", "--max-new-tokens", "4",
                        "--temperature", "0")
    assert rc == 0, err
    ids = [int(t) for t in out.splitlines()[0].split(",")]  # no tokenizer in the folder: ids are printed
    assert ids[:3] == [5, 17, 299] and len(ids) == 7
    want = GPT.from_hf(hf_folder).generate(torch.tensor([[5, 17, 299]]), 4, temperature=0.0)
    assert ids == want[0].tolist()
    rc, _, err = _run(capsys, "--hf", str(hf_folder), "--prompt", "text")
    assert rc == 2 and "--prompt-ids" in err


def test_cli_no_cache_reruns_the_context_and_gives_the_same_text(capsys):
    from gptkernels import _dispatch

    texts = {}
    for flag in ([], ["--no-cache"]):
        _dispatch._LAST.pop("decode_attention", None)
        rc, out, err = _run(capsys, "--model", "tiny", "--prompt", "abc", "--max-new-tokens", "6", "--temperature",
                            "0", "--backend", "cpu", *flag)
        assert rc == 0, err
        ran_decode = _dispatch.last("decode_attention") is not None
        assert ran_decode == (not flag), "decode_attention runs only with the KV cache"
        assert ("no cache" if flag else "KV cache") in out.strip().splitlines()[-1]
        texts[bool(flag)] = out.strip().splitlines()[0]
    assert texts[True] == texts[False], "greedy: the cache changes nothing but speed"


def test_cli_dtype_runs_the_model_in_that_dtype(capsys, monkeypatch):
    seen = []
    real = GPT.generate

    def spy(self, *a, **kw):
        seen.append(next(self.parameters()).dtype)
        return real(self, *a, **kw)

    monkeypatch.setattr(GPT, "generate", spy)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        rc, out, err = _run(capsys, "--model", "tiny", "--prompt", "abc", "--max-new-tokens", "4", "--dtype", name)
        assert rc == 0, err
        assert seen[-1] == dtype and f"cpu {str(dtype)[6:]}" in out.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ sampling flags (CLI)
def _error_line(err):
    """The CLI's one error line: no traceback, nothing else of ours on stderr."""
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("gptkernels generate: error: ")]
    assert len(ours) == 1, err
    return ours[0]


def _generate(*argv):
    from gptkernels.cli import build_parser

    return gen_cli.generate_text(build_parser().parse_args(["generate", "--device", "cpu", *argv]))


def test_cli_processors_match_model_generate(tmp_path):
    config = GPTConfig.preset("tiny", block_size=64)
    model = GPT(config).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": config.to_dict()}, path)
    prompt = torch.tensor([list(b"abab")])
    greedy = dict(temperature=0.0, repetition_penalty=1.5, no_repeat_ngram_size=2)
    sampled = dict(temperature=0.8, min_p=0.2, top_k=30, repetition_penalty=1.2)
    for flags, kw in (
        (["--temperature", "0", "--repetition-penalty", "1.5", "--no-repeat-ngram-size", "2"], greedy),
        (["--temperature", "0.8", "--min-p", "0.2", "--top-k", "30", "--repetition-penalty", "1.2", "--seed", "4"],
         dict(sampled, generator=torch.Generator().manual_seed(4))),
    ):
        ids = _generate("--ckpt", str(path), "--prompt", "abab", "--max-new-tokens", "12", *flags)["ids"][0]
        assert ids == model.generate(prompt, 12, **kw)[0].tolist()
    ids = _generate("--ckpt", str(path), "--prompt", "abab", "--max-new-tokens", "20", "--temperature", "0",
                    "--no-repeat-ngram-size", "2")["ids"][0]
    pairs = list(zip(ids, ids[1:]))
    assert len(pairs) == len(set(pairs)) + 1, "only the prompt's own (a, b) may repeat"


@pytest.mark.parametrize("flags, msg", [
    (["--min-p", "1.5"], "--min-p must be in [0, 1] or None, got 1.5"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0"),
    (["--no-repeat-ngram-size", "0"], "--no-repeat-ngram-size must be an int >= 1"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_cli_bad_sampling_values_fail_before_loading(capsys, monkeypatch, flags, msg):
    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the sampling arguments were checked")

    monkeypatch.setattr(gen_cli, "load_model", no_load)
    rc, _, err = _run(capsys, "--model", "tiny", *flags)
    assert rc == 2 and msg in _error_line(err)


# --------------------------------------------------------------------------------------- weights that do not fit
def test_cli_ckpt_and_a_different_model_name_both(capsys, tmp_path):
    config = GPTConfig.preset("tiny", block_size=64)  # block_size differs from tiny's: train's --block-size may
    path = tmp_path / "ckpt.pt"
    torch.save({"model": GPT(config).state_dict(), "config": config.to_dict()}, path)
    rc, _, err = _run(capsys, "--ckpt", str(path), "--model", "mini", "--max-new-tokens", "2")
    line = _error_line(err)
    assert rc == 2 and str(path) in line and "--model mini" in line
    assert "n_layer 2 (--model mini: 4)" in line and "n_embd 64 (--model mini: 128)" in line
    assert "it is the tiny preset" in line and "leave --model out" in line
    rc, _, err = _run(capsys, "--ckpt", str(path), "--model", "tiny", "--max-new-tokens", "2")
    assert rc == 0, err
    rc, _, err = _run(capsys, "--ckpt", str(path), "--model", "tinny")
    assert rc == 2 and "unknown model preset 'tinny'" in _error_line(err)


def test_cli_ckpt_weights_that_do_not_fit_their_config_one_line(capsys, tmp_path):
    big = GPT(GPTConfig.preset("mini", block_size=64)).state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": big, "config": GPTConfig.preset("tiny", block_size=64).to_dict()}, path)
    rc, _, err = _run(capsys, "--ckpt", str(path))
    line = _error_line(err)
    assert rc == 2 and "the weights do not fit its config" in line
    assert "unexpected (" in line and "transformer.h.2." in line and "shape file vs config" in line


def test_cli_ckpt_given_a_hugging_face_folder(capsys, hf_folder):
    rc, _, err = _run(capsys, "--ckpt", str(hf_folder))
    assert rc == 2 and "a Hugging Face folder loads with --hf" in _error_line(err)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_from_hf_other_model_types_named(capsys, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg = transformers.BertConfig(**small) if kind == "bert" else transformers.LlamaConfig(**small)
    cfg.save_pretrained(tmp_path)  # a config folder is enough: the type is read before any weights
    supported = r"supported: openai-gpt \(OpenAIGPTLMHeadModel\), gpt2 \(GPT2LMHeadModel\), gpt_neo"
    with pytest.raises(ValueError, match=f"type '{kind}'.*not supported; {supported}"):
        GPT.from_hf(tmp_path)
    rc, _, err = _run(capsys, "--hf", str(tmp_path), "--max-new-tokens", "2")
    line = _error_line(err)
    assert rc == 2 and f"--hf '{tmp_path}'" in line and f"type '{kind}'" in line and "gpt2 (GPT2LMHeadModel)" in line


def test_from_hf_unreadable_folders(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not readable JSON"):
        GPT.from_hf(bad)
    (bad / "config.json").write_text('{"vocab_size": 5}')
    with pytest.raises(ValueError, match="names no model_type.*supported: openai-gpt"):
        GPT.from_hf(bad)
    no_weights = tmp_path / "no_weights"
    # bos/eos inside the small vocabulary: transformers would log a warning about them otherwise
    transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                            eos_token_id=0).save_pretrained(no_weights)
    with pytest.raises(FileNotFoundError, match="the gpt2 model in .* could not be loaded"):
        GPT.from_hf(no_weights)
    rc, _, err = _run(capsys, "--hf", str(no_weights))
    assert rc == 2 and "could not be loaded" in _error_line(err)
    base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1,
                                                          n_head=2))
    with pytest.raises(ValueError, match="a GPT2Model is not a causal language model.*give a GPT2LMHeadModel"):
        GPT.from_hf(base)


def test_cli_hf_and_a_different_model(capsys, hf_folder):
    rc, _, err = _run(capsys, "--hf", str(hf_folder), "--model", "gpt2", "--prompt-ids", "5")
    line = _error_line(err)
    assert rc == 2 and "--model gpt2" in line and "n_layer 2 (--model gpt2: 12)" in line
