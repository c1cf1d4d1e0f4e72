"""The benchmark harness on CPU: the CLI end to end on a tiny suite, FAIL detection, --compare, plots."""

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptkernels import bench
from gptkernels.bench import report
from gptkernels.bench.registry import OPS, Placeholder, Provider, register_op, register_provider, unregister_provider

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--quick", "--shapes", "tiny", "--no-progress"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One real `python -m gptkernels bench` on the tiny suite (both modes), shared by the checks below."""
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptkernels",
            "bench",
            *TINY,
            "--ops",
            "layernorm,rmsnorm,attention",
            "--mode",
            "fwd,bwd",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout, json.loads((out / "results.json").read_text())


def test_cli_writes_sane_json_csv_and_table(cli_run):
    out, stdout, res = cli_run
    env = res["env"]
    for key in ("device_name", "cpu_model", "torch", "triton", "git_sha", "date", "command", "torch_threads"):
        assert key in env, key
    assert env["device"] == "cpu" and env["torch_threads"] >= 1
    assert "bench" in env["command"] and "--quick" in env["command"]
    roof = env["roofline"]
    assert roof["copy_gbps"] > 0 and roof["matmul_tflops"] > 0
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    assert {(r["op"], r["mode"], r["provider"]) for r in ok} >= {
        (op, mode, prov)
        for op in ("layernorm", "rmsnorm")
        for mode in ("fwd", "bwd")
        for prov in ("eager", "gptkernels-cpu")
    }
    for r in ok:
        assert 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"], r
        assert r["pct_roofline"] > 0 and r["speedup_vs_eager"] > 0
        # CPU: the resident high-water mark above the step's start where Linux can reset it, else unknown (None)
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
        assert r["err"] is not None and r["err"] <= r["err_bound"]
        assert r["dtype"] == "float32" and r["device"] == "cpu"
        if r["op"] == "attention":  # compute-bound: TFLOP/s by 4*B*H*T*T*D/2 (causal)
            assert r["tflops"] > 0 and r["flops"] > 0 and r["shape"] == "1x2x40x32"
        else:
            assert r["gbps"] > 0 and r["bytes"] > 0 and r["shape"] == "33x96"
    eager = [r for r in ok if r["provider"] == "eager"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in eager)
    # --quick on CPU leaves out torch.compile, and Triton is never timed through its CPU interpreter, even with
    # TRITON_INTERPRET=1 (which the test conftest sets, and the subprocess inherits).
    skipped = {r["provider"]: r["reason"] for r in res["rows"] if r["status"] == "skipped"}
    assert "quick" in skipped["compile"] and "interpreter" in skipped["gptkernels-triton"]
    assert "gptkernels-torch" not in {r["provider"] for r in res["rows"]}
    attention = {(r["mode"], r["provider"]): r for r in res["rows"] if r["op"] == "attention"}
    for mode in ("fwd", "bwd"):
        for prov in ("eager", "gptkernels-cpu", "sdpa", "sdpa-math"):
            assert attention[(mode, prov)]["status"] == "ok", attention[(mode, prov)]
        assert "CUDA only" in attention[(mode, "sdpa-flash")]["reason"]
    assert "fwd" in res["formulas"]["layernorm"] and "2*M*N*e" in res["formulas"]["layernorm"]["fwd"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res["rows"])
    assert set(report.CSV_FIELDS) == set(rows[0])
    # The screen: header first, then the verdict with the paths; the per-row table is in results.md (and --verbose).
    assert stdout.index("roofline") < stdout.index("verdict:") < stdout.index("results: ")
    assert str(out / "results.json") in stdout and str(out / "results.md") in stdout
    assert "| shape (preset)" not in stdout
    verdict = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    assert {"layernorm", "rmsnorm", "attention", "geomean over 3 ops"} <= set(verdict)
    assert "skipped: compile: left out by --quick" in stdout
    md = (out / "results.md").read_text()
    assert "| shape (preset)" in md and "gptkernels-cpu" in md and "verdict:" in md
    # Units: the attention rows are FLOP rates of a tiny shape, never rounded to 0.0 under a TFLOP/s heading.
    attention = [line for line in md.splitlines() if line.startswith("| attention ") and "(tiny)" in line]
    assert attention and all("FLOP/s" in line and "GB/s" not in line for line in attention)
    assert not any(" 0.0 " in line for line in md.splitlines())


def _wrong_fwd(problem):
    eager = problem.spec.eager

    def fn(**kw):
        outs = eager(**kw)
        return tuple(o * 1.02 for o in outs) if isinstance(outs, tuple) else outs * 1.02  # 2%: past bf16's ulp too

    return fn


def _wrong_bwd(problem):
    """Right forward values, wrong gradient: y + 0.01 * (x - x.detach()) equals y but adds 0.01 to dx."""
    eager = problem.spec.eager

    def fn(**kw):
        x = kw["x"]
        return eager(**kw) + 0.01 * (x - x.detach())

    return fn


def _raises(problem):
    def fn(**kw):
        raise RuntimeError("kernel exploded")

    return fn


def test_wrong_provider_is_fail_and_not_timed(tmp_path):
    register_provider("layernorm", Provider("wrong-fwd", _wrong_fwd))
    register_provider("layernorm", Provider("wrong-bwd", _wrong_bwd))
    register_provider("layernorm", Provider("raises", _raises))
    try:
        rc = bench.main(
            [
                *TINY,
                "--ops",
                "layernorm",
                "--mode",
                "fwd,bwd",
                "--dtype",
                "float32,bfloat16",
                "--providers",
                "eager,wrong-fwd,wrong-bwd,raises",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        for name in ("wrong-fwd", "wrong-bwd", "raises"):
            unregister_provider("layernorm", name)
    assert rc == 1  # any FAIL makes the run fail
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]

    def status(prov, mode, dtype):
        (r,) = [r for r in rows if (r["provider"], r["mode"], r["dtype"]) == (prov, mode, dtype)]
        return r

    for dtype in ("float32", "bfloat16"):
        for mode in ("fwd", "bwd"):
            assert status("eager", mode, dtype)["status"] == "ok"
            r = status("wrong-fwd", mode, dtype)
            assert r["status"] == "FAIL" and "wrong result: out0" in r["reason"] and r["ms_p50"] is None
            r = status("raises", mode, dtype)
            assert r["status"] == "FAIL" and "kernel exploded" in r["reason"] and r["ms_p50"] is None
        # The gradient trick leaves the forward exact: only the bwd check can catch it, and it does.
        assert status("wrong-bwd", "fwd", dtype)["status"] == "ok"
        r = status("wrong-bwd", "bwd", dtype)
        assert r["status"] == "FAIL" and "dx" in r["reason"] and r["ms_p50"] is None


def test_unavailable_op_and_model_are_reported_not_raised(tmp_path):
    register_op(Placeholder("not_written_yet", "gptkernels.ops.not_written_yet"))
    try:
        rc = bench.main([*TINY, "--ops", "not_written_yet", "--model", "no-such-model", "--out", str(tmp_path)])
    finally:
        OPS.pop("not_written_yet")
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    reasons = {r["op"]: r["reason"] for r in rows}
    assert "No module named 'gptkernels.ops.not_written_yet'" in reasons["not_written_yet"]
    assert reasons["model:no-such-model"].startswith("unknown model preset 'no-such-model'")


def test_model_step_is_checked_and_timed(tmp_path):
    """--model: a whole GPT step, logits and every parameter gradient checked against fp64 before timing."""
    rc = bench.main(
        [*TINY, "--model", "tiny", "--mode", "fwd+bwd", "--providers", "eager,gptkernels-cpu", "--out", str(tmp_path)]
    )
    assert rc == 0
    rows = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["op"] == "model:tiny"]
    got = {r["provider"]: r for r in rows}
    for prov in ("eager", "gptkernels-cpu"):
        assert got[prov]["status"] == "ok", got[prov]["reason"]
        assert got[prov]["ms_p50"] > 0 and got[prov]["tflops"] > 0


def _row(op, provider, p50, spread=1.02, status="ok"):
    return {
        "op": op,
        "provider": provider,
        "mode": "fwd",
        "shape": "1024x768",
        "dtype": "float32",
        "status": status,
        "reason": "",
        "ms_p20": p50 / spread**0.5,
        "ms_p50": p50,
        "ms_p80": p50 * spread**0.5,
    }


def _result(rows):
    env = {"device_name": "AMD EPYC", "git_sha": "abc", "date": "2026-11-30", "device": "cpu"}
    return {"env": env, "rows": rows}


def test_compare_flags_slowdown_beyond_noise(tmp_path):
    old = _result(
        [
            _row("layernorm", "eager", 1.0),
            _row("layernorm", "gptkernels-cpu", 0.5),
            _row("rmsnorm", "gptkernels-cpu", 0.5, spread=1.6),
            _row("softmax", "gptkernels-cpu", 0.4),
        ]
    )
    new = copy.deepcopy(old)
    new["rows"][1] = _row("layernorm", "gptkernels-cpu", 1.0)  # 2x slower, tight spread: flagged
    new["rows"][2] = _row("rmsnorm", "gptkernels-cpu", 0.6, spread=1.6)  # 1.2x, but the spread is 60%: noise
    new["rows"][3] = _row("softmax", "gptkernels-cpu", 0.4, status="FAIL")  # ok -> FAIL: a regression
    text, regressions = report.compare(old, new, verbose=True)
    assert regressions == 2
    lines = {
        line.split("|")[1].strip() + "/" + line.split("|")[5].strip(): line
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line and "op |" not in line
    }
    assert "SLOWER" in lines["layernorm/gptkernels-cpu"] and "2.000" in lines["layernorm/gptkernels-cpu"]
    assert "within noise" in lines["rmsnorm/gptkernels-cpu"]
    assert "within noise" in lines["layernorm/eager"]
    assert "now FAIL" in lines["softmax/gptkernels-cpu"]
    # Through the CLI, with the exit status a CI job can act on.
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert bench.main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    assert bench.main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "old.json")]) == 0


def test_summary_and_plot(cli_run, tmp_path, capsys):
    out, _, res = cli_run
    assert bench.main(["--summary", str(out / "results.json")]) == 0
    text = capsys.readouterr().out
    assert "verdict:" in text and "| layernorm " in text and "geomean over 3 ops" in text
    assert "| shape (preset)" not in text
    assert bench.main(["--summary", str(out / "results.json"), "--verbose"]) == 0
    text = capsys.readouterr().out
    assert "| shape (preset)" in text and "gptkernels-cpu" in text and "% of copy" in text
    pytest.importorskip("matplotlib")
    from gptkernels.bench.plot import plot

    paths = plot(res, tmp_path) + plot(res, tmp_path, combined=True)
    assert {p.name for p in paths} >= {"layernorm.png", "rmsnorm.png", "bench.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_presets_are_the_models_and_scaled_per_device():
    ln, sm = OPS["layernorm"], OPS["softmax_causal"]
    assert ln.shape("gpt2", "cuda") == (16384, 768) and ln.shape("gpt2-xl", "cpu") == (1024, 1600)
    assert ln.shape("standard", "cpu") == ln.shape("standard", "cuda") == (16384, 4096)
    assert sm.shape("gpt2", "cuda") == (16, 12, 1024, 1024) and sm.shape("llama-7b", "cuda") == (1, 32, 4096, 4096)
    assert sm.shape("standard", "cuda") is None
    assert OPS["softmax"].shape("llama-7b", "cpu")[-1] == 4096  # rows are cut on CPU, never the row length
    m, n = 1024, 768
    assert ln.work("fwd", (m, n), 4) == 2 * m * n * 4 + 2 * n * 4
    assert ln.work("fwd+bwd", (m, n), 2) == ln.work("fwd", (m, n), 2) + ln.work("bwd", (m, n), 2)


@pytest.mark.skipif(not os.path.isdir(ROOT / "benchmarks"), reason="no benchmarks/ in this checkout")
def test_pytest_benchmark_files_run_and_are_not_collected_by_default():
    pytest.importorskip("pytest_benchmark")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-q",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
            "-k",
            "layernorm-256x768 and fwd",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
    # Plain `pytest` from the root collects tests/ only: the microbenchmarks stay opt-in.
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()


# ------------------------------------------------------------------------------------- flags and their effect
SMALL = [*TINY, "--ops", "layernorm", "--mode", "fwd", "--providers", "eager,gptkernels-cpu"]


def _bench(tmp_path, name, *argv):
    out = tmp_path / name
    rc = bench.main([*SMALL, "--out", str(out), *argv])
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return rc, out, res


def test_seed_fixes_the_inputs_and_plot_writes_pngs(tmp_path):
    rc, out, a = _bench(tmp_path, "a", "--seed", "123", "--device", "cpu")
    assert rc == 0 and a["config"]["seed"] == 123
    assert a["env"]["device"] == "cpu" and a["config"]["device"] == "cpu"
    assert not list(out.glob("*.png")), "no --plot: no PNG"
    _, _, b = _bench(tmp_path, "b", "--seed", "123")
    _, _, c = _bench(tmp_path, "c", "--seed", "124")

    def errs(res):
        return {(r["op"], r["provider"], r["shape"]): r["err"] for r in res["rows"] if r["status"] == "ok"}

    assert errs(a) and errs(a) == errs(b), "same seed: the same inputs, so the same errors to the last bit"
    assert errs(a) != errs(c)
    pytest.importorskip("matplotlib")
    _, out, _ = _bench(tmp_path, "p", "--seed", "1", "--plot")
    assert [p.name for p in out.glob("*.png")] == ["layernorm.png"]
    _, out, _ = _bench(tmp_path, "q", "--seed", "1", "--plot", "combined")
    assert [p.name for p in out.glob("*.png")] == ["bench.png"]


def test_time_budget_skips_what_it_cannot_start(tmp_path):
    # The budget counts from the start of the run (the roofline probes included), so 0 s starts no problem.
    rc, _, res = _bench(tmp_path, "t", "--time-budget", "0", "--shapes", "tiny,gpt2")
    assert rc == 0 and res["config"]["time_budget_s"] == 0
    assert {r["preset"] for r in res["rows"]} == {"tiny", "gpt2"}
    assert all(r["status"] == "skipped" and "time budget of 0 s used up" in r["reason"] for r in res["rows"])
    _, _, res = _bench(tmp_path, "u", "--time-budget", "600")
    assert res["rows"] and not any(r["status"] == "skipped" for r in res["rows"] if r["provider"] != "compile")


def test_verbose_prints_the_detail_table(tmp_path, capsys):
    capsys.readouterr()
    rc, out, _ = _bench(tmp_path, "v", "--verbose")
    text = capsys.readouterr().out
    assert rc == 0
    assert text.index("roofline") < text.index("| shape (preset)") < text.index("verdict:")
    assert "| layernorm " in text and " GB/s |" in text
    rc, _, _ = _bench(tmp_path, "w")
    assert rc == 0 and "| shape (preset)" not in capsys.readouterr().out


def test_no_compile_and_device_flags(tmp_path, capsys):
    _, _, res = _bench(tmp_path, "n", "--no-compile", "--providers", "eager,compile")
    compile_rows = [r for r in res["rows"] if r["provider"] == "compile"]
    assert compile_rows and all(r["status"] == "skipped" and "--no-compile" in r["reason"] for r in compile_rows)
    if not __import__("torch").cuda.is_available():
        assert bench.main([*SMALL, "--device", "cuda", "--out", str(tmp_path / "d")]) == 2
        assert "--device cuda but torch sees no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "d").exists()


def test_list_prints_the_catalogue_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in OPS:
        assert f"  {name}" in out
    assert "providers:" in out and "shape presets:" in out and "gpt2" in out
    assert not list(tmp_path.iterdir()), "--list writes nothing"


# ------------------------------------------------------------------------------- losses, qlinear, peak memory
def test_cpu_peak_memory_sees_what_a_step_allocates():
    """The CPU peak-memory reading (VmHWM after a reset) grows with what the step touches and ignores what was
    already resident before it."""
    import torch

    from gptkernels.bench import harness

    cpu = torch.device("cpu")
    held = torch.ones(32 << 20, dtype=torch.uint8)  # resident before the step: never counted

    def big():
        torch.ones(96 << 20, dtype=torch.uint8)  # 96 MiB written, then freed

    def small():
        torch.ones(1 << 10, dtype=torch.uint8)

    got_big, got_small = harness.peak_mem_mb(big, cpu), harness.peak_mem_mb(small, cpu)
    if got_big is None:
        pytest.skip("this system has no /proc/self/clear_refs peak reset")
    assert 90 <= got_big <= 140, got_big
    assert got_small < 20, got_small
    del held


def test_loss_and_qlinear_ops_run_checked_with_memory(tmp_path):
    """The loss ops run fwd+bwd by default (their peak memory is the whole step's) and record it; the quantized
    linears run fwd only against eager F.linear on the dequantized weight and aten's int8 GEMM."""
    rc = bench.main([*TINY, "--ops", "cross_entropy,linear_cross_entropy,qlinear_int8,qlinear_int4",
                     "--providers", "eager,gptkernels-cpu,aten-int8pack", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in res["rows"] if r["status"] == "ok"]
    by = {}
    for r in rows:
        by.setdefault(r["op"], set()).add((r["mode"], r["provider"], r["shape"]))
    for op in ("cross_entropy", "linear_cross_entropy"):
        assert {m for m, _, _ in by[op]} == {"fwd+bwd"}, by[op]
        assert {p for _, p, _ in by[op]} == {"eager", "gptkernels-cpu"}
    for op in ("qlinear_int8", "qlinear_int4"):
        assert {m for m, _, _ in by[op]} == {"fwd"}
        assert {s for _, _, s in by[op]} == {"1x96x256", "3x96x256"}  # one row per decode batch size
    assert ("fwd", "aten-int8pack", "1x96x256") in by["qlinear_int8"] or not hasattr(
        __import__("torch").ops.aten, "_weight_int8pack_mm")
    assert not any(r["provider"] == "compile" for r in res["rows"] if r["op"].startswith("qlinear"))
    if any(r["peak_mem_mb"] is not None for r in rows):  # Linux with a resettable peak
        assert all(r["peak_mem_mb"] is not None for r in rows if r["op"].endswith("cross_entropy"))
    assert not any("has no bwd mode" in n for n in res["notes"])  # only said when --mode asks for it


def test_an_explicit_mode_the_op_lacks_is_noted(tmp_path):
    rc = bench.main([*TINY, "--ops", "qlinear_int8", "--mode", "fwd,bwd", "--providers", "eager", "--out",
                     str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert {r["mode"] for r in res["rows"] if r["op"] == "qlinear_int8"} == {"fwd"}
    assert "qlinear_int8: has no bwd mode (it runs fwd)" in res["notes"]


def test_loss_and_qlinear_shapes_per_device():
    ce, lce, q8 = OPS["cross_entropy"], OPS["linear_cross_entropy"], OPS["qlinear_int8"]
    assert ce.shape("gpt2", "cuda") == (8192, 50257) and ce.shape("standard", "cuda") == (4096, 50257)
    assert lce.shape("llama-7b", "cuda") == (4096, 4096, 128256)
    assert lce.shape("gpt2", "cpu") == (256, 768, 50257) and lce.shape("llama-7b", "cpu") is None
    assert q8.shape("gpt2", "cpu") == [(1, 3072, 768), (4, 3072, 768), (16, 3072, 768)]
    assert lce.work("fwd+bwd", (8, 4, 10), 4) == 3 * 2 * 8 * 4 * 10
