"""What a new user sees from python -m gptkernels: start-up errors as one line, checkpoint errors that say what a file
is, --threads, the busy-machine hint, help texts, banners that match the run, and no third-party noise."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import gptkernels
from gptkernels import _dispatch, _runtime, cli
from gptkernels import profile as prof
from gptkernels import train as gktrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(gptkernels.__file__)))
TINY_TRAIN = [
    "--model",
    "tiny",
    "--block-size",
    "16",
    "--batch-size",
    "2",
    "--eval-steps",
    "1",
    "--device",
    "cpu",
    "--no-progress",
]


def _python(*args, env=None, timeout=300):
    """A child python in the repository root (so it imports this checkout), one thread, no inherited backend."""
    e = {k: v for k, v in os.environ.items() if k != "GPTKERNELS_BACKEND"}
    e.update({"OMP_NUM_THREADS": "1", "GPTKERNELS_PEAK_FLOPS": "1e11"}, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def _main(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    pkg = os.path.dirname(gptkernels.__file__)
    path.write_bytes(b"".join(open(os.path.join(pkg, n), "rb").read() for n in ("train.py", "model.py", "data.py")))
    return str(path)


@pytest.fixture
def quiet_machine(monkeypatch):
    """No busy-machine hint in these runs: the tests that look at stderr line by line run on a shared machine."""
    monkeypatch.setattr(_runtime, "check_busy", lambda threads: None)


def _unrunnable_backend():
    """A backend that cannot run on the default device here (cuda on a CPU machine), or None."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return next((b for b in _dispatch.BACKENDS if _dispatch.backend_reason(b, device) is not None), None)


# -------------------------------------------------------------------------------------------- GPTKERNELS_BACKEND
@pytest.mark.usefixtures("quiet_machine")
@pytest.mark.parametrize("command", ["train", "finetune", "generate", "profile", "bench"])
def test_backend_variable_that_cannot_run_is_one_line_and_exit_2(capsys, monkeypatch, command):
    bad = _unrunnable_backend()
    if bad is None:
        pytest.skip("every backend runs on this machine")
    monkeypatch.setenv("GPTKERNELS_BACKEND", bad)
    rc, out, err = _main(capsys, command)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"gptkernels {command}: error: GPTKERNELS_BACKEND={bad} cannot run")


@pytest.mark.usefixtures("quiet_machine")
@pytest.mark.parametrize("command", ["train", "finetune", "generate", "profile", "bench"])
def test_invalid_backend_variable_names_the_variable_and_the_valid_values(capsys, monkeypatch, command):
    monkeypatch.setenv("GPTKERNELS_BACKEND", "foo")
    rc, out, err = _main(capsys, command)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "GPTKERNELS_BACKEND='foo'" in err and "valid: cuda, triton, cpu, torch, auto" in err


def test_backend_variable_error_has_no_traceback_in_a_real_process():
    bad = _unrunnable_backend()
    if bad is None:
        pytest.skip("every backend runs on this machine")
    r = _python("-m", "gptkernels", "train", "--steps", "1", env={"GPTKERNELS_BACKEND": bad})
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if not line.startswith("busy machine:")]
    assert len(lines) == 1 and "GPTKERNELS_BACKEND" in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.usefixtures("quiet_machine")
def test_banners_name_the_backend_variable(capsys, monkeypatch, tmp_path, text_file):
    monkeypatch.setenv("GPTKERNELS_BACKEND", "torch")
    monkeypatch.setenv("GPTKERNELS_PEAK_FLOPS", "1e11")
    rc, out, err = _main(
        capsys,
        "train",
        *TINY_TRAIN,
        "--steps",
        "1",
        "--data",
        text_file,
        "--out-dir",
        str(tmp_path / "run"),
        "--threads",
        "1",
    )
    assert rc == 0, err
    assert "gptkernels train: device cpu (1 thread), backend torch (from GPTKERNELS_BACKEND)," in out
    rc, out, err = _main(capsys, "generate", "--device", "cpu", "--max-new-tokens", "2", "--threads", "1")
    assert rc == 0, err
    assert "backend: torch (from GPTKERNELS_BACKEND) | cpu float32, 1 thread |" in out.splitlines()[-1]


# -------------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_WORDS = ("not a checkpoint", "ckpt.pt", "python -m gptkernels train", "model, optimizer, config")


@pytest.mark.usefixtures("quiet_machine")
@pytest.mark.parametrize(
    "content, kind",
    [
        (b"# A README\n\nplain text\n", "is a text file"),
        (bytes(range(256)) * 4, "neither a zip archive"),
        (b"", "is an empty file"),
    ],
)
def test_a_file_that_is_no_checkpoint_says_what_it_is(capsys, tmp_path, content, kind):
    path = tmp_path / "README.md"
    path.write_bytes(content)
    for argv in (["generate", "--ckpt", str(path)], ["train", "--resume", str(path), "--out-dir", str(tmp_path)]):
        rc, _, err = _main(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1, err
        assert kind in err and all(w in err for w in CHECKPOINT_WORDS), err
        assert "weights_only` set to `False`" not in err and "likely succeed" not in err


@pytest.mark.usefixtures("quiet_machine")
def test_a_pickle_with_other_objects_is_reported_in_one_line(capsys, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": argparse.Namespace(a=1)}, path)  # weights_only=True refuses the Namespace
    rc, _, err = _main(capsys, "generate", "--ckpt", str(path))
    assert rc == 2 and err.count("\n") == 1, err
    assert "torch.load(weights_only=True) cannot read it" in err and "Namespace" in err and "likely succeed" not in err


@pytest.mark.usefixtures("quiet_machine")
def test_run_folder_is_a_checkpoint_path_for_generate_and_resume(capsys, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("GPTKERNELS_PEAK_FLOPS", "1e11")
    run = tmp_path / "run"
    rc, _, err = _main(
        capsys, "train", *TINY_TRAIN, "--steps", "2", "--stop-at", "1", "--data", text_file, "--out-dir", str(run)
    )
    assert rc == 0, err
    rc, out, err = _main(capsys, "generate", "--ckpt", str(run), "--max-new-tokens", "3", "--device", "cpu")
    assert rc == 0, err
    assert f"checkpoint {run / 'ckpt.pt'} (iter 1)" in out.splitlines()[-1]
    rc, out, err = _main(capsys, "train", "--resume", str(run), "--no-progress")
    assert rc == 0, err
    assert f"resumed from {run / 'ckpt.pt'} at step 1" in out and "done: 2 steps" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _main(capsys, "generate", "--ckpt", str(empty))
    assert rc == 2 and "has no ckpt.pt" in err


# ------------------------------------------------------------------------------------------------------ threads
@pytest.mark.usefixtures("quiet_machine")
def test_threads_sets_torch_and_the_kernels_openmp_for_the_run(capsys, monkeypatch):
    from gptkernels import generate as gen

    seen = {}

    def fake_generate_text(args):
        seen["torch"], seen["kernels"] = torch.get_num_threads(), _runtime._kernel_threads()
        raise gen.GenerateError("stop here")

    monkeypatch.setattr(gen, "generate_text", fake_generate_text)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc, _, _ = _main(capsys, "generate", "--threads", "1")
        assert rc == 2 and seen["torch"] == 1
        assert seen["kernels"] in (None, 1), "the C++ kernels' OpenMP runtime did not follow --threads"
        assert torch.get_num_threads() == 2, "--threads must not outlive the command"
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive(capsys):
    rc, _, err = _main(capsys, "generate", "--threads", "0")
    assert rc == 2 and "--threads must be a positive integer" in err


def test_every_model_command_takes_threads(capsys):
    for command in ("train", "finetune", "generate", "profile", "bench"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "--threads N" in capsys.readouterr().out, command


def test_thread_count_grammar():
    assert _runtime.threads_text(1) == "1 thread" and _runtime.threads_text(2) == "2 threads"
    assert _runtime.plural(1, "usable core") == "1 usable core"


def test_generate_line_counts_threads_in_a_real_process():
    r = _python("-m", "gptkernels", "generate", "--device", "cpu", "--max-new-tokens", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "cpu float32, 1 thread |" in r.stdout.splitlines()[-1]


# ------------------------------------------------------------------------------------------------- busy machine
def test_busy_hint_when_other_work_holds_a_core():
    line = _runtime.busy_hint(1.9, 1.9, usable=2, threads=2)
    assert line == (
        "busy machine: load 1.9 on 2 usable cores; with 2 threads OpenMP stalls on a descheduled thread: "
        "try --threads 1"
    )
    assert "\n" not in line
    assert _runtime.busy_hint(4.0, 4.0, usable=16, threads=16).endswith("try --threads 12")
    assert "1 usable core;" in _runtime.busy_hint(3.0, None, usable=1, threads=2)


@pytest.mark.parametrize(
    "load_avg, now, usable, threads",
    [
        (0.1, None, 2, 2),  # quiet
        (0.4, 0.4, 2, 2),  # within the margin
        (5.0, 5.0, 2, 1),  # one thread has no barrier to wait at
        (1.5, 0.05, 2, 2),  # the load average still counts a run that just ended; the machine is quiet now
        (4.0, 4.0, 16, 8),  # 12 free cores for 8 threads
    ],
)
def test_no_busy_hint(load_avg, now, usable, threads):
    assert _runtime.busy_hint(load_avg, now, usable, threads) is None


@pytest.mark.parametrize("load, printed", [(1.9, True), (0.05, False)])
def test_start_prints_the_hint_only_on_a_busy_machine(capsys, monkeypatch, load, printed):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(_runtime, "other_work_now", lambda window=0: load)
    monkeypatch.setattr(_runtime, "usable_cores", lambda: 2)
    monkeypatch.delenv("GPTKERNELS_BACKEND", raising=False)
    before = torch.get_num_threads()
    try:
        _runtime.start("generate", argparse.Namespace(threads=2, device="cpu", backend=None))
        _runtime.start("generate", argparse.Namespace(threads=1, device="cpu", backend=None))
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert err.count("busy machine:") == (1 if printed else 0), err


def test_other_work_now_measures_something_sane():
    now = _runtime.other_work_now(0.05)
    assert now is None or 0 <= now <= _runtime.usable_cores() + 0.5


# ------------------------------------------------------------------------------------------- help and messages
@pytest.mark.parametrize("command", ["", "info", "train", "finetune", "generate", "profile", "bench"])
def test_help_is_plain_text_without_internal_references(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out
    assert not re.search(r"#\d", out), out  # no tracker numbers


# -------------------------------------------------------------------------------------------------- LR schedule
def _banner_lrs(text):
    m = re.search(r"\blr (\S+) -> ([0-9.e+-]+)", text)
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize(
    "steps, warmup, decay",
    [(20, None, None), (6, None, None), (400, None, None), (6, 20, None), (50, 5, 30), (10, 0, None)],
)
def test_lr_banner_states_what_the_schedule_does(steps, warmup, decay):
    ns = gktrain._namespace(dict(steps=steps, warmup=warmup, lr_decay_steps=decay), {})
    ns, _, _ = gktrain._resolve(ns, gktrain._Dist(), torch.device("cpu"))
    lrs = [gktrain.lr_at(s, ns) for s in range(steps)]
    first, last = _banner_lrs(gktrain.lr_summary(ns))
    # "lr <peak> -> <last step's>", or for a run that ends in its warmup "lr <first step's> -> <last step's>"
    assert first == pytest.approx(lrs[0] if ns.warmup >= steps else max(lrs), rel=5e-3)
    assert last == pytest.approx(lrs[-1], rel=5e-3)


def test_short_run_decays_as_its_banner_says(capsys, monkeypatch, tmp_path, text_file, quiet_machine):
    monkeypatch.setenv("GPTKERNELS_PEAK_FLOPS", "1e11")
    rc, out, err = _main(
        capsys,
        "train",
        *TINY_TRAIN,
        "--steps",
        "20",
        "--log-every",
        "1",
        "--eval-steps",
        "1",
        "--data",
        text_file,
        "--out-dir",
        str(tmp_path),
    )
    assert rc == 0, err
    lrs = [r["lr"] for r in gktrain.read_log(str(tmp_path / "log.jsonl")) if r["kind"] == "train"]
    top, last = _banner_lrs(out)
    assert len(lrs) == 20 and top == pytest.approx(max(lrs), rel=5e-3) and last == pytest.approx(lrs[-1], rel=5e-3)
    assert lrs[-1] < 0.2 * max(lrs), "a 20-step run must decay, not end in warmup"


# ----------------------------------------------------------------------------------------------------- profile
def test_profile_tok_s_and_speedup_come_from_the_same_steps():
    r = prof.profile(
        "tiny", batch=2, prompt_len=4, new_tokens=6, repeats=1, providers=["eager", "gptkernels"], device="cpu"
    )
    eager, gk = r["rows"]
    for row in (eager, gk):
        assert row["tokens_per_s"] == pytest.approx(2e3 / row["decode_ms_p50"], rel=1e-3)
        assert row["activations_peak_mb"] > 0, "the CPU allocator's peak was not recorded"
    ratio = gk["tokens_per_s"] / eager["tokens_per_s"]
    assert gk["speedup_decode_vs_eager"] == pytest.approx(ratio, rel=1e-2)


# ------------------------------------------------------------------------------------------------------- noise
def test_ops_on_cpu_do_not_import_cpp_extension():
    code = (
        "import sys, torch, gptkernels\n"
        "x = torch.randn(3, 16, requires_grad=True)\n"
        "w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)\n"
        "gptkernels.layer_norm(x, w, b).sum().backward()\n"
        "gptkernels.softmax(x).sum().backward()\n"
        "q = torch.randn(1, 2, 5, 8, requires_grad=True)\n"
        "gptkernels.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()\n"
        "from gptkernels.cli import main\n"
        "assert main(['generate', '--device', 'cpu', '--max-new-tokens', '3']) == 0\n"
        "bad = sorted(m for m in sys.modules if m == 'torch.utils.cpp_extension')\n"
        "assert not bad, bad\n"
    )
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr


def test_start_up_silences_the_cuda_home_warning_of_torch_imports():
    # torch.utils.benchmark (the bench timers) imports torch.utils.cpp_extension, which warns about CUDA_HOME on a
    # CUDA build of torch without a GPU; the start-up turns that build-time warning off.
    code = "from gptkernels import _runtime; _runtime.quiet_build_warnings(); import torch.utils.benchmark"
    r = _python("-c", code)
    assert r.returncode == 0 and "CUDA_HOME" not in r.stderr and r.stderr.strip() == "", r.stderr


def test_profile_without_trace_prints_no_profiler_lines(tmp_path):
    out = tmp_path / "p.json"
    r = _python(
        "-m",
        "gptkernels",
        "profile",
        "--model",
        "tiny",
        "--prompt-len",
        "4",
        "--new-tokens",
        "3",
        "--repeats",
        "1",
        "--providers",
        "eager,gptkernels",
        "--device",
        "cpu",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    allowed = ("gptkernels profile: device cpu (1 thread)", "warming up ", "repeat ", "measuring the copy ceiling",
               "busy machine: ")
    assert [line for line in r.stderr.splitlines() if not line.startswith(allowed)] == [], r.stderr
    assert json.loads(out.read_text())["rows"][1]["peak_mem_mb"] > 0


def test_info_says_why_the_build_has_no_cuda(monkeypatch, capsys):
    real = _dispatch.info()
    build = dict(real["build"], cuda=False, cuda_why="GPTKERNELS_CUDA=0")
    monkeypatch.setattr(_dispatch, "info", lambda: dict(real, build=build))
    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("extension"))
    assert "no CUDA kernels in this build: GPTKERNELS_CUDA=0" in line


def test_build_records_why_cuda_is_in_or_out():
    why = _dispatch.build_info().get("cuda_why")
    assert why and why != "built without setup.py", why


# ---------------------------------------------------------------------------------------------------- finetune
@pytest.mark.usefixtures("quiet_machine")
def test_finetune_without_a_checkpoint_says_it_starts_from_random_weights(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    rows = [{"text": f"{w} {w} {i}", "label": w} for i in range(30) for w in ("spam", "eggs")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = _main(capsys, "finetune", "--data", "t.jsonl", "--steps", "2", "--batch-size", "4", "--eval-every",
                         "0", "--no-progress", "--device", "cpu", "--threads", "1")
    assert rc == 0, err
    assert "gptkernels finetune: device cpu (1 thread)" in out
    assert "start: random weights (mini): no default train checkpoint under runs/; python -m gptkernels train" in out
    assert re.search(r"val accuracy [0-9.]+ vs majority-class baseline 0\.500; macro-F1", out.splitlines()[-1])
