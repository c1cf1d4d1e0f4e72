"""The trainer (gptkernels/train.py) and its data (gptkernels/data.py) on CPU: tiny runs of a few steps.

Exactness claims tested here: a resumed run logs the same fp32 losses bit for bit as an uninterrupted one, and two
gloo ranks reproduce a one-process run with the same global batch (to fp32 reduction-order rounding).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gptkernels
from gptkernels import data as gkdata
from gptkernels import train as gktrain
from gptkernels.train import TrainConfigError, load_checkpoint, read_log, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(gptkernels.__file__)))
TINY = dict(model="tiny", block_size=32, batch_size=4, steps=8, warmup=2, log_every=1, eval_every=4, eval_steps=2,
            ckpt_every=0, no_progress=True, device="cpu", backend="cpu")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small text corpus: this package's own sources (about 100 kB)."""
    pkg = os.path.dirname(gptkernels.__file__)
    text = b"".join(open(os.path.join(pkg, n), "rb").read() for n in sorted(os.listdir(pkg)) if n.endswith(".py"))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(text)
    return str(path)


def train_losses(log_path):
    return {r["step"]: r["loss"] for r in read_log(log_path) if r["kind"] == "train"}


def val_losses(log_path):
    return {r["step"]: r["val_loss"] for r in read_log(log_path) if r["kind"] == "eval"}


def test_default_corpus_run_logs_learns_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    m = train(TINY, steps=40, lr=3e-3, eval_every=20, corpus_bytes=300_000, out_dir=str(out))
    assert m["steps"] == 40 and m["config"]["vocab_size"] == 256
    rows = read_log(m["log"])
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "start" and kinds.count("train") == 40 and kinds.count("eval") == 3  # steps 0, 20, 40
    for r in rows[1:]:
        fields = {"step", "loss", "lr", "tokens_per_s", "mfu", "elapsed"} if r["kind"] == "train" else \
                 {"step", "val_loss", "elapsed"}
        assert fields <= set(r), r
        assert all(math.isfinite(r[k]) for k in fields)
    val = val_losses(m["log"])
    print("val losses", val)
    assert val[0] > 5.0 and val[40] < val[0] - 1.0  # byte-level: ln 256 = 5.55 at init
    # A checkpoint written atomically (no temp file left) that loads with weights_only=True.
    assert sorted(os.listdir(out)) == sorted(n for n in ("ckpt.pt", "log.jsonl", "loss.png") if n != "loss.png"
                                             or m["plot"])
    ckpt = load_checkpoint(m["checkpoint"])
    assert ckpt["step"] == 40 and ckpt["config"] == m["config"] and ckpt["data"]["batches_drawn"] == 40
    assert {"model", "optimizer", "rng", "args"} <= set(ckpt)
    assert ckpt["args"]["lr"] == 3e-3


def test_loss_plot_written(tmp_path, text_file):
    pytest.importorskip("matplotlib")
    m = train(TINY, steps=3, data=text_file, out_dir=str(tmp_path))
    assert m["plot"] == str(tmp_path / "loss.png")
    with open(m["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bit_identical(tmp_path, text_file, dropout):
    common = dict(TINY, data=text_file, dropout=dropout, grad_accum=2)
    full = train(common, out_dir=str(tmp_path / "full"))
    half = train(common, stop_at=4, out_dir=str(tmp_path / "split"))
    assert half["steps"] == 4
    resumed = train(dict(resume=True, out_dir=str(tmp_path / "split"), no_progress=True, device="cpu"))
    assert resumed["steps"] == 8
    a, b = train_losses(full["log"]), train_losses(resumed["log"])
    print("uninterrupted", a)
    print("resumed      ", b)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # exact float equality, not a tolerance
    assert val_losses(full["log"])[8] == val_losses(resumed["log"])[8]
    sa, sb = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for k, t in sa["model"].items():
        assert torch.equal(t, sb["model"][k]), k


def test_resume_rejects_a_different_model(tmp_path, text_file):
    m = train(TINY, steps=2, data=text_file, out_dir=str(tmp_path))
    with pytest.raises(TrainConfigError, match="--block-size 64 differs from the checkpoint"):
        train(TINY, steps=4, block_size=64, resume=m["checkpoint"])


def test_ddp_two_gloo_ranks_match_one_process(tmp_path, text_file):
    opts = dict(TINY, data=text_file, steps=6, grad_accum=2)
    single = train(opts, out_dir=str(tmp_path / "single"))
    argv = []
    for k, v in dict(opts, out_dir=str(tmp_path / "ddp")).items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gptkernels.train", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert "2 ranks (DDP, gloo)" in proc.stdout
    a, b = train_losses(single["log"]), train_losses(tmp_path / "ddp" / "log.jsonl")
    print("1 process:", a)
    print("2 ranks:  ", b)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])
    va, vb = val_losses(single["log"]), val_losses(tmp_path / "ddp" / "log.jsonl")
    assert abs(va[6] - vb[6]) <= 1e-5 * va[6]
    assert load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))["step"] == 6  # written by rank 0


def test_text_data(tmp_path, text_file):
    m = train(TINY, steps=2, data=text_file, out_dir=str(tmp_path))
    assert m["config"]["vocab_size"] == 256 and math.isfinite(m["train_loss"])


def test_bin_data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tokens.bin"
    rng.integers(0, 1000, size=5000, dtype=np.uint16).tofile(path)
    m = train(TINY, steps=2, eval_steps=1, data=str(path), out_dir=str(tmp_path / "a"))
    assert m["config"]["vocab_size"] == gkdata.GPT2_VOCAB and math.isfinite(m["train_loss"])
    m = train(TINY, steps=2, eval_steps=1, data=str(path), vocab_size=1024, out_dir=str(tmp_path / "b"))
    assert m["config"]["vocab_size"] == 1024
    with pytest.raises(gkdata.DataError, match="token id 9.. >= vocab size 512"):
        train(TINY, steps=2, data=str(path), vocab_size=512, out_dir=str(tmp_path / "c"))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(gkdata.DataError, match="--data: .*odd.bin' has an odd number of bytes"):
        train(TINY, data=str(odd), out_dir=str(tmp_path / "d"))
    # nanoGPT's layout: a folder with train.bin and val.bin.
    folder = tmp_path / "prepared"
    folder.mkdir()
    for name in ("train.bin", "val.bin"):
        rng.integers(0, 300, size=3000, dtype=np.uint16).tofile(folder / name)
    ds = gkdata.load(str(folder))
    assert len(ds.train) == len(ds.val) == 3000 and ds.vocab_size == gkdata.GPT2_VOCAB


def test_batches_are_deterministic_and_sharded(text_file):
    ds = gkdata.load(text_file)
    s = gkdata.BatchSampler(ds, block_size=16, batch_size=6, seed=3, vocab_size=256)
    x, y = s.get("train", 5)
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, s.get("train", 5)[0]) and not torch.equal(x, s.get("train", 6)[0])
    parts = [s.get("train", 5, rank=r, world=3)[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), x)


def test_stdlib_split_is_deterministic():
    a, b = gkdata.stdlib_corpus(400_000), gkdata.stdlib_corpus(400_000)
    assert a.vocab_size == 256 and len(a.train) > 0 and len(a.val) > 0
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert len(a.train) + len(a.val) <= 400_000


def test_lr_schedule():
    ns = gktrain._namespace(dict(lr=1e-3, min_lr=1e-4, warmup=10, lr_decay_steps=110, steps=120), {})
    assert gktrain.lr_at(0, ns) == pytest.approx(1e-4)
    assert gktrain.lr_at(9, ns) == pytest.approx(1e-3)
    assert gktrain.lr_at(60, ns) == pytest.approx(5.5e-4)  # half way down the cosine
    assert gktrain.lr_at(110, ns) == gktrain.lr_at(119, ns) == pytest.approx(1e-4)
    lrs = [gktrain.lr_at(s, ns) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_checkpoint_write_is_atomic(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    gktrain.save_checkpoint(path, {"format": gktrain.CKPT_FORMAT, "w": torch.ones(3)})
    with pytest.raises(Exception):  # noqa: B017  (whatever pickling raises for a lambda)
        gktrain.save_checkpoint(path, {"format": gktrain.CKPT_FORMAT, "w": lambda: 0})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the failed write left no temp file ...
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))  # ... and the old checkpoint intact


@pytest.mark.parametrize("opts, error, match", [
    (dict(model="nope"), TrainConfigError, "--model 'nope': unknown preset; known: gpt2"),
    (dict(batch_size=0), TrainConfigError, "--batch-size 0: must be a positive integer"),
    (dict(min_lr=1.0, lr=1e-3), TrainConfigError, r"--min-lr 1.0: must be in \[0, --lr=0.001\]"),
    (dict(stop_at=20, steps=8), TrainConfigError, r"--stop-at 20: must be in \[1, --steps=8\]"),
    (dict(block_size=100_000, data="TEXT"), gkdata.DataError, "--block-size 100000: the val split .* has only"),
    (dict(backend="cuda"), TrainConfigError, "--backend 'cuda': cannot run on cpu"),
    (dict(data="/no/such/file.txt"), FileNotFoundError, "--data: no such file: '/no/such/file.txt'"),
    (dict(resume="/no/such/ckpt.pt"), FileNotFoundError, "--resume: no checkpoint at '/no/such/ckpt.pt'"),
    (dict(stepz=3), TrainConfigError, "unknown option.* stepz"),
])
def test_bad_arguments_name_the_option(tmp_path, text_file, opts, error, match):
    opts = {k: text_file if v == "TEXT" else v for k, v in opts.items()}
    with pytest.raises(error, match=match):
        train(dict(TINY, data=text_file, out_dir=str(tmp_path)), **opts)


def test_fresh_run_does_not_overwrite_a_checkpoint(tmp_path, text_file):
    train(TINY, steps=1, data=text_file, out_dir=str(tmp_path))
    with pytest.raises(TrainConfigError, match="--out-dir .* already holds a checkpoint"):
        train(TINY, steps=1, data=text_file, out_dir=str(tmp_path))


def test_cli_reports_bad_arguments(capsys, tmp_path):
    assert gktrain.main(["--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "gptkernels train: error: --data: no such file" in capsys.readouterr().err


def test_cli_runs_and_prints_progress_lines(capsys, tmp_path, text_file):
    argv = ["--model", "tiny", "--block-size", "32", "--batch-size", "4", "--steps", "2", "--log-every", "1",
            "--data", text_file, "--out-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert gktrain.main(argv) == 0
    out = capsys.readouterr().out
    assert "MFU vs measured CPU matmul peak" in out and "step      2/2 | loss " in out and "done: 2 steps" in out
    assert json.loads(open(tmp_path / "log.jsonl").readline())["kind"] == "start"


# ------------------------------------------------------------------------------- flags that change the run
@pytest.fixture
def no_peak_probe(monkeypatch):
    """Skip the ~1 s CPU matmul-peak measurement of each run: these tests do not look at MFU."""
    monkeypatch.setenv("GPTKERNELS_PEAK_FLOPS", "1e11")


@pytest.mark.usefixtures("no_peak_probe")
def test_grad_clip_clips_every_step_and_zero_disables(tmp_path, text_file, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        calls.append(max_norm)
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    clipped = train(TINY, steps=3, grad_clip=1e-3, data=text_file, out_dir=str(tmp_path / "clip"))
    assert calls == [1e-3] * 3
    rows = [r for r in read_log(clipped["log"]) if r["kind"] == "train"]
    assert all(r["grad_norm"] > 1e-3 for r in rows), "the pre-clip norm is logged; these gradients were clipped"
    calls.clear()
    free = train(TINY, steps=3, grad_clip=0.0, data=text_file, out_dir=str(tmp_path / "free"))
    assert calls == [] and not any("grad_norm" in r for r in read_log(free["log"]))
    a, b = train_losses(clipped["log"]), train_losses(free["log"])
    assert a[1] == b[1] and a[3] != b[3], "same first batch and weights; clipping changes the later updates"


@pytest.mark.usefixtures("no_peak_probe")
def test_weight_decay_shrinks_matrices_only(tmp_path, text_file):
    runs = {wd: load_checkpoint(train(TINY, steps=1, weight_decay=wd, lr=1e-2, data=text_file,
                                      out_dir=str(tmp_path / str(wd)))["checkpoint"]) for wd in (0.0, 0.5)}
    groups = runs[0.5]["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]
    m0, m5 = runs[0.0]["model"], runs[0.5]["model"]
    decayed = [k for k, t in m0.items() if t.dim() >= 2]
    assert decayed
    for k, t in m0.items():
        if t.dim() >= 2:  # one AdamW step from the same weights and gradients: w (1 - lr wd) vs w
            assert m5[k].norm() < t.norm(), k
        else:  # biases and LayerNorm gains are not decayed: bit-identical
            assert torch.equal(m5[k], t), k


@pytest.mark.usefixtures("no_peak_probe")
def test_compile_flag_compiles_the_model(tmp_path, text_file, monkeypatch, capsys):
    compiled = []

    def fake_compile(model, *a, **kw):  # the real one costs ~30 s on 2 cores; what matters is that it is asked
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    argv = ["--model", "tiny", "--block-size", "32", "--batch-size", "4", "--steps", "1", "--data", text_file,
            "--eval-steps", "1", "--out-dir", str(tmp_path / "c"), "--device", "cpu", "--no-progress", "--compile"]
    assert gktrain.main(argv) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], gptkernels.model.GPT)
    assert "torch.compile" in capsys.readouterr().out
    plain = [a for a in argv if a != "--compile"]
    plain[plain.index(str(tmp_path / "c"))] = str(tmp_path / "n")
    assert gktrain.main(plain) == 0
    assert len(compiled) == 1, "no --compile: not compiled"
