"""The latency profiler: result fields, trace output, error paths, and CUDA-graph replay on a GPU.

torch.compile on this CPU costs ~10-30 s even for the tiny preset, so the compile row has one `slow` test.
"""

import json

import pytest
import torch

import gptkernels
from gptkernels import profile as prof

SMALL = dict(batch=1, prompt_len=8, new_tokens=8, repeats=2)
ROW_FIELDS = ("provider", "status", "backend", "backends", "prefill_ms", "decode_ms_p50", "decode_ms_p90",
              "decode_ms_p99", "tokens_per_s", "peak_mem_mb", "weights_mb", "kv_cache_mb", "activations_peak_mb",
              "speedup_prefill_vs_eager", "speedup_decode_vs_eager", "tokens_match_eager", "tokens",
              "weight_bytes_per_token", "weight_gbps", "pct_copy_ceiling")


def _check_row(row, new_tokens):
    for f in ROW_FIELDS:
        assert f in row, f"row {row['provider']} lacks {f}"
    assert row["status"] == "ok", row["error"]
    assert row["prefill_ms"] > 0
    assert 0 < row["decode_ms_p50"] <= row["decode_ms_p90"] <= row["decode_ms_p99"]
    assert row["tokens_per_s"] > 0
    assert row["peak_mem_mb"] >= row["weights_mb"] + row["kv_cache_mb"] > 0
    assert len(row["tokens"]) == new_tokens
    assert row["tokens_match_eager"] is True, "greedy tokens differ from the eager reference"
    assert row["tokens_same_every_repeat"] is True


def test_profile_eager_and_gptkernels(tmp_path):
    out = tmp_path / "res" / "p.json"
    trace = tmp_path / "trace.json"
    r = prof.profile("tiny", providers=["eager", "gptkernels"], device="cpu", json_path=out, trace=trace, **SMALL)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert [row["provider"] for row in r["rows"]] == ["eager", "gptkernels"]
    for row in r["rows"]:
        _check_row(row, 8)
        assert row["decode_steps_timed"] == 2 * 7
    eager, gk = r["rows"]
    assert eager["backend"] == "torch" and eager["speedup_decode_vs_eager"] == 1.0
    assert gk["backend"] == "cpu" and set(gk["backends"]) == set(prof.MODEL_OPS)
    assert r["dtype"] == "float32" and r["device"] == "cpu" and "profile_memory" in r["peak_mem_method"]
    for key in ("git_sha", "torch", "cpu_model", "date"):
        assert key in r["env"]
    # The trace is Chrome/Perfetto JSON with the prefill and decode steps labelled.
    t = json.loads(trace.read_text())
    names = {e.get("name") for e in t["traceEvents"]}
    assert {"prefill", "decode_step_0", "decode_step_3"} <= names
    assert r["trace"] == {"path": str(trace), "provider": "gptkernels"}
    table = prof.format_table(r)
    assert "gptkernels" in table and "decode p50" in table


def test_cli(capsys, tmp_path):
    out = tmp_path / "p.json"
    threads = torch.get_num_threads()
    rc = prof.main(["--model", "tiny", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--device", "cpu",
                    "--providers", "eager,gptkernels", "--json", str(out), "--threads", "1"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert torch.get_num_threads() == threads, "--threads must not outlive the run"
    assert json.loads(out.read_text())["env"]["torch_threads"] == 1
    assert "eager" in stdout and "gptkernels" in stdout and "tok/s" in stdout
    assert json.loads(out.read_text())["env"]["command"].startswith("python -m gptkernels profile")


def test_errors(capsys):
    with pytest.raises(prof.ProfileError, match="--cuda-graphs needs a CUDA device"):
        prof.profile("tiny", device="cpu", cuda_graphs=True, providers=["gptkernels"], **SMALL)
    rc = prof.main(["--model", "tiny", "--device", "cpu", "--cuda-graphs", "--new-tokens", "4", "--prompt-len", "4"])
    assert rc == 2 and "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(prof.ProfileError, match="--block-size 200"):
        prof.profile("tiny", prompt_len=100, new_tokens=100, device="cpu")
    with pytest.raises(prof.ProfileError, match="unknown provider"):
        prof.profile("tiny", providers=["eagre"], device="cpu", **SMALL)
    with pytest.raises(prof.ProfileError, match="unknown model preset"):
        prof.profile("gpt5", device="cpu", **SMALL)


def test_compile_failure_is_a_row_not_a_crash(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(torch, "compile", broken)
    r = prof.profile("tiny", providers=["gptkernels", "compile"], device="cpu", **SMALL)
    ok, failed = r["rows"]
    assert ok["status"] == "ok" and ok["tokens_match_eager"] is None  # no eager row to compare with
    assert failed["status"] == "failed" and "no compiler today" in failed["error"]
    assert "failed: RuntimeError: no compiler today" in prof.format_table(r)


@pytest.mark.slow
def test_compile_row():
    r = prof.profile("tiny", providers=["eager", "compile"], device="cpu", batch=1, prompt_len=8, new_tokens=4,
                     repeats=1)
    _check_row(r["rows"][1], 4)
    assert r["rows"][1]["warmup_s"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graphs_replay_matches_eager(dtype, tmp_path):
    trace = tmp_path / "trace.json"
    r = prof.profile("tiny", batch=2, prompt_len=16, new_tokens=24, providers=["eager", "gptkernels"],
                     device="cuda", dtype=dtype, repeats=2, cuda_graphs=True, trace=trace,
                     trace_provider="gptkernels+graphs")
    rows = {row["provider"]: row for row in r["rows"]}
    assert list(rows) == ["eager", "gptkernels", "eager+graphs", "gptkernels+graphs"]
    for p, row in rows.items():
        assert row["status"] == "ok", f"{p}: {row['error']}"
        assert 0 < row["decode_ms_p50"] <= row["decode_ms_p99"]
        assert row["tokens_same_every_repeat"] is True, p
    assert "torch" not in rows["gptkernels"]["backend"], rows["gptkernels"]["backends"]
    # Replaying the captured step gives exactly the tokens of running the same model step by step (same kernels,
    # so bit-identical logits). gptkernels vs the eager reference is not compared token for token: with random
    # weights the top two logits can be closer than the kernels' rounding differences, and greedy decoding then
    # diverges for good.
    for p in ("eager", "gptkernels"):
        assert rows[p + "+graphs"]["tokens_match_step_by_step"] is True, p
        assert rows[p]["tokens_match_step_by_step"] is None
    # The eager reference's graph replays (every batch row, the last repeat) equal its step-by-step tokens.
    assert rows["eager+graphs"]["tokens_match_eager"] is True
    assert "decode_step_0" in {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}


def test_profile_hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    r = prof.profile(providers=["eager", "gptkernels"], device="cpu", hf=tmp_path, **SMALL)
    assert r["weights"] == f"hf:{tmp_path}" and r["config"]["vocab_size"] == 300
    for row in r["rows"]:
        _check_row(row, 8)
    with pytest.raises(prof.ProfileError, match="config.json"):
        prof.profile(providers=["eager"], device="cpu", hf=tmp_path / "missing", **SMALL)


def _cli_json(capsys, tmp_path, *argv):
    out = tmp_path / "p.json"
    rc = prof.main(["--model", "tiny", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--device", "cpu",
                    "--providers", "eager,gptkernels", "--json", str(out), *argv])
    _, err = capsys.readouterr()
    return rc, err, (json.loads(out.read_text()) if rc == 0 else None)


def test_cli_block_size_fits_a_longer_run(capsys, tmp_path):
    from gptkernels.model import GPTConfig

    block = GPTConfig.preset("tiny").block_size
    argv = ["--prompt-len", str(block), "--new-tokens", "3"]
    rc, err, _ = _cli_json(capsys, tmp_path, *argv)
    assert rc == 2 and "block_size" in err
    rc, err, res = _cli_json(capsys, tmp_path, *argv, "--block-size", str(block + 3))
    assert rc == 0, err
    assert all(len(r["tokens"]) == 3 for r in res["rows"])


def test_cli_warmup_runs_untimed_generations(capsys, tmp_path, monkeypatch):
    runs = []
    real = prof._Runner.run

    def spy(self, *a, **kw):
        runs.append(self.name)
        return real(self, *a, **kw)

    monkeypatch.setattr(prof._Runner, "run", spy)
    counts = {}
    for w in (0, 2):
        runs.clear()
        rc, err, res = _cli_json(capsys, tmp_path, "--warmup", str(w))
        assert rc == 0, err
        assert res["warmup_runs"] == w
        counts[w] = len(runs)
    assert counts[2] - counts[0] == 2 * 2, "two more untimed runs for each of the two providers"


def test_cli_seed_sets_weights_and_prompt(capsys, tmp_path, monkeypatch):
    seen = []
    real = prof._Runner.run

    def spy(self, prompt, *a, **kw):  # the prompt and the first weight each provider runs with
        seen.append((prompt.clone(), next(self.model.parameters()).detach().clone()))
        return real(self, prompt, *a, **kw)

    monkeypatch.setattr(prof._Runner, "run", spy)
    runs = {}
    for key, seed in (("a", 1), ("b", 1), ("c", 2)):
        seen.clear()
        rc, err, res = _cli_json(capsys, tmp_path, "--seed", str(seed))
        assert rc == 0, err
        assert res["weights"] == f"random init (seed {seed})"
        runs[key] = (seen[0], res["rows"][0]["tokens"])
    (pa, wa), ta = runs["a"]
    (pb, wb), tb = runs["b"]
    (pc, wc), _ = runs["c"]
    assert torch.equal(pa, pb) and torch.equal(wa, wb) and ta == tb, "same seed: same prompt, weights, tokens"
    assert not torch.equal(pa, pc) and not torch.equal(wa, wc), "another seed: another prompt and weights"


def test_quantized_rows(capsys, tmp_path):
    """--quantize adds rows for weight-only int8 / int4 models; int8 keeps eager's greedy tokens on this model."""
    out = tmp_path / "q.json"
    rc = prof.main(["--model", "tiny", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--device", "cpu",
                    "--providers", "eager", "--quantize", "int8,int4", "--json", str(out), "--threads", "1",
                    "--calibrate", "mse"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out.read_text())
    rows = {row["provider"]: row for row in res["rows"]}
    assert list(rows) == ["eager", "int8", "int4"] and res["calibrate"] == "mse"
    assert rows["int8"]["backend"] == "cpu" and rows["int4"]["backend"] == "cpu"
    assert rows["int8"]["tokens_match_eager"] is True  # int8 per channel: the greedy tokens of the float model
    assert "wt MB/tok" in stdout and "% copy BW" in stdout and "copy ceiling of this run" in stdout
    # int8 reads about a quarter of the fp32 layers' bytes (lm_head / wte and the norms stay float).
    assert rows["int8"]["weight_bytes_per_token"] < 0.5 * rows["eager"]["weight_bytes_per_token"]
    with pytest.raises(prof.ProfileError, match="--calibrate must be absmax or mse"):
        prof.profile("tiny", providers=["int8"], device="cpu", calibrate="gptq", **SMALL)


def test_weight_bandwidth_columns():
    """Bytes a decode step reads: every weight once, the tied wte / lm_head once, wpe (gathered) not at all."""
    from gptkernels.model import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny"))
    params = dict(model.named_parameters())  # tied lm_head.weight is listed once, as transformer.wte.weight
    expect = sum(p.numel() * 4 for n, p in params.items() if n != "transformer.wpe.weight")
    assert prof.weight_bytes_per_step(model) == expect
    gptkernels.quantize(model)
    q = {n: b for n, b in model.named_buffers()}
    expect_q = sum(t.numel() * t.element_size() for t in (*model.parameters(), *q.values())) \
        - model.transformer.wpe.weight.numel() * 4
    assert prof.weight_bytes_per_step(model) == expect_q < expect / 2

    r = prof.profile("tiny", providers=["gptkernels", "int8"], device="cpu", **{**SMALL, "batch": 2})
    assert r["ceiling"]["copy_gbps"] > 0 and "KV cache" in r["weight_bandwidth_method"]
    for row in r["rows"]:
        per_step = row["weight_bytes_per_token"] * 2  # batch 2: a step reads the weights once for both tokens
        # The JSON rounds GB/s to 3 decimals and ms to 4: compare within that rounding.
        assert row["weight_gbps"] == pytest.approx(per_step / (row["decode_ms_p50"] * 1e-3) / 1e9, rel=1e-3, abs=1e-3)
        assert row["pct_copy_ceiling"] == pytest.approx(100 * row["weight_gbps"] / r["ceiling"]["copy_gbps"],
                                                        rel=1e-2, abs=0.1)
    assert r["rows"][0]["weight_bytes_per_token"] == pytest.approx(expect / 2, abs=0.1)


def test_generate_quantized(capsys):
    from gptkernels import generate

    assert generate.main(["--model", "tiny", "--prompt", "def ", "--max-new-tokens", "3", "--quantize", "int8"]) == 0
    assert "int8: 8 layers" in capsys.readouterr().out
    assert generate.main(["--model", "tiny", "--prompt", "def ", "--max-new-tokens", "3", "--quantize", "int4",
                          "--calibrate", "mse"]) == 0
    assert "int4: 2 layers" in capsys.readouterr().out  # g128: only the K = 256 projections (tiny is 64 wide)


def test_wrapper_subclass_weights_are_counted_once_each():
    """A tensor-subclass weight without storage of its own (data_ptr 0, as torchao's quantized weights) counts its
    inner tensors, and two such weights are two weights, not one shared address."""

    class Packed(torch.Tensor):
        @staticmethod
        def __new__(cls, data, scale):
            return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=torch.float32)

        def __init__(self, data, scale):
            self.data_, self.scale = data, scale

        def __tensor_flatten__(self):
            return ["data_", "scale"], None

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(f"{func} on a test wrapper")

    a = Packed(torch.zeros(8, 4, dtype=torch.int8), torch.ones(8))
    b = Packed(torch.zeros(8, 4, dtype=torch.int8), torch.ones(8))
    m = torch.nn.Module()
    m.register_buffer("a", a)
    m.register_buffer("b", b)
    assert prof._nbytes(a) == 8 * 4 + 8 * 4
    assert prof.weight_bytes_per_step(m) == 2 * (8 * 4 + 8 * 4)


def test_torchao_row_beside_ours():
    pytest.importorskip("torchao", reason="torchao is an optional comparison dependency (pip install torchao)")
    r = prof.profile("tiny", providers=["eager", "int8", "torchao-int8"], device="cpu", **SMALL)
    rows = {row["provider"]: row for row in r["rows"]}
    assert rows["torchao-int8"]["status"] == "ok", rows["torchao-int8"].get("error")
    # Its int8 weights: about a quarter of the float layers' bytes, as ours.
    assert rows["torchao-int8"]["weight_bytes_per_token"] < 0.6 * rows["eager"]["weight_bytes_per_token"]


def test_torchao_missing_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    r = prof.profile("tiny", providers=["eager", "torchao-int8"], device="cpu", **SMALL)
    row = {row["provider"]: row for row in r["rows"]}["torchao-int8"]
    assert row["status"] == "failed" and "pip install torchao" in row["error"]
