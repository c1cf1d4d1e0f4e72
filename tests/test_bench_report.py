"""What `python -m gptkernels bench` prints, on synthetic rows (fast): units, the verdict, --compare's context,
--verbose, and the help texts."""

import argparse
import copy
import json
import re
from pathlib import Path

import pytest

from gptkernels import bench
from gptkernels.bench import cli, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cpu"


def _row(
    op,
    provider,
    mode,
    p50,
    *,
    shape="1024x768",
    preset="gpt2",
    dtype="float32",
    status="ok",
    reason="",
    gbps=None,
    tflops=None,
    spread=1.02,
):
    timed = status == "ok" and p50 is not None
    return {
        "op": op,
        "preset": preset,
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "dtype": dtype,
        "ms_p20": p50 / spread**0.5 if timed else None,
        "ms_p50": p50 if timed else None,
        "ms_p80": p50 * spread**0.5 if timed else None,
        "gbps": gbps,
        "tflops": tflops,
        "pct_roofline": 50.0 if timed else None,
        "speedup_vs_eager": None,
        "speedup_vs_compile": None,
        "peak_mem_mb": None,
        "status": status,
        "reason": reason,
        "noisy": False,
    }


def _env(**kw):
    env = {
        "device": "cpu",
        "device_name": "AMD EPYC",
        "cpu_model": "AMD EPYC",
        "cpu_count": 2,
        "gpu": None,
        "torch_threads": 1,
        "openmp_threads": 1,
        "torch": "2.14.1",
        "triton": "3.8.0",
        "git_sha": "abc123",
        "date": "2026-12-07",
        "command": "python -m gptkernels bench",
        "load_avg_1m": 0.1,
        "load_avg_1m_end": 0.2,
        "roofline": {
            "copy_gbps": 40.0,
            "copy_bytes": 64 << 20,
            "matmul_dtype": "float32",
            "matmul_shape": "1024x1024x1024",
            "matmul_tflops": 0.0957,
        },
    }
    env.update(kw)
    return env


def _result(rows, quick=True, **env):
    return {
        "schema": "gptkernels-bench/1",
        "env": _env(**env),
        "rows": rows,
        "wall_s": 12.0,
        "notes": [],
        "formulas": {},
        "config": {"quick": quick, "shapes": ["gpt2"]},
    }


# ---------------------------------------------------------------------------------------------------- units
def _table(text, first_header):
    """The Markdown table that starts with `| first_header ` as (headers, rows of cells)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\|\s*{re.escape(first_header)}\s*\|", line))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split("|")])
    return block[0], block[2:]


def test_sig_keeps_significant_figures_and_never_an_exponent():
    assert report.sig(0.0957) == "0.0957"
    assert report.sig(0.000123) == "0.000123"
    assert report.sig(38.31) == "38.3"
    assert report.sig(147.2) == "147"
    assert report.sig(3012.0) == "3012"
    assert report.sig(None) == report.sig(float("nan")) == "–"


def test_every_throughput_carries_its_unit():
    rows = [
        _row("layernorm", "eager", "fwd", 0.16, gbps=38.3),
        _row("attention", "gptkernels-cpu", "fwd", 22.4, tflops=0.0719),  # 71.9 GFLOP/s: once printed as 0.1
        _row("mlp", "eager", "fwd", 286.0, tflops=0.00338),  # once printed as 0.0
        _row("attention", "gptkernels-cuda", "fwd", 0.5, tflops=312.4),
    ]
    res = _result(rows)
    head, body = _table(report.detail(res), "op")
    assert not any("GB/s" in h or "FLOP/s" in h for h in head), head  # no column-wide unit that a row could break
    got = {(r[0], r[4]): r[head.index("throughput")] for r in body}
    assert got[("layernorm", "eager")] == "38.3 GB/s"
    assert got[("attention", "gptkernels-cpu")] == "71.9 GFLOP/s"
    assert got[("mlp", "eager")] == "3.38 GFLOP/s"
    assert got[("attention", "gptkernels-cuda")] == "312 TFLOP/s"
    for r in body:
        cell = r[head.index("throughput")]
        assert not re.match(r"0(\.0+)?( |$)", cell), cell
    ceil = {(r[0], r[4]): r[head.index("% of ceiling")] for r in body}
    assert ceil[("layernorm", "eager")] == "50% of copy" and ceil[("mlp", "eager")] == "50% of matmul"
    # The header's matmul ceiling of a CPU is small too: in GFLOP/s, never "0.1 TFLOP/s".
    assert "matmul float32 1024x1024x1024 95.7 GFLOP/s" in report.header(res)


# ---------------------------------------------------------------------------------------------------- verdict
def _verdict_rows():
    """Op A at two shapes: gptkernels 2x and 8x eager (geomean 4x), 1x and 4x compile (geomean 2x); the fastest of
    two gptkernels backends counts. Op B at one shape: 0.25x eager, no compile row."""
    rows = []
    for shape, eager, compile_, cuda, triton in (("256x768", 2.0, 1.0, 1.0, 1.5), ("1024x768", 8.0, 4.0, 2.0, 1.0)):
        rows += [
            _row("A", "eager", "fwd", eager, shape=shape, gbps=1.0),
            _row("A", "compile", "fwd", compile_, shape=shape, gbps=1.0),
            _row("A", "gptkernels-cuda", "fwd", cuda, shape=shape, gbps=1.0),
            _row("A", "gptkernels-triton", "fwd", triton, shape=shape, gbps=1.0),
        ]
    rows += [
        _row("B", "eager", "fwd", 1.0, tflops=0.1),
        _row("B", "gptkernels-cuda", "fwd", 4.0, tflops=0.1),
        _row("B", "compile", "fwd", None, status="skipped", reason="left out by --no-compile"),
    ]
    return rows


def test_verdict_geomean_over_shapes_then_over_ops():
    s = report.speedups(_result(_verdict_rows()))
    a, b = s["ops"]["A"]["fwd"], s["ops"]["B"]["fwd"]
    # The fastest gptkernels backend per shape: cuda at 256x768 (1.0 < 1.5), triton at 1024x768 (1.0 < 2.0).
    assert a["eager"] == pytest.approx([2.0, 8.0]) and a["vs_eager"] == pytest.approx(4.0)
    assert a["compile"] == pytest.approx([1.0, 4.0]) and a["vs_compile"] == pytest.approx(2.0)
    assert a["backends"] == {"cuda": 1, "triton": 1}
    assert b["vs_eager"] == pytest.approx(0.25) and b["vs_compile"] is None
    g = s["geomean"]["fwd"]
    assert g["vs_eager"] == pytest.approx(1.0) and g["n_eager"] == 2  # sqrt(4 * 0.25): each op weighs the same
    assert g["vs_compile"] == pytest.approx(2.0) and g["n_compile"] == 1

    text = report.verdict(_result(_verdict_rows()), paths=["out/results.json", "out/results.csv"])
    head, body = _table(text, "op")
    assert head == ["op", "gptkernels", "fwd vs eager", "fwd vs compile"]
    cells = {r[0]: r for r in body}
    assert cells["A"][2].startswith("4.00×") and "(2.0..8.0)" in cells["A"][2]
    assert cells["A"][3].startswith("2.00×")
    assert cells["B"][2] == "0.250×" and cells["B"][3] == "–"
    assert cells["geomean over 2 ops"][2] == "1.00×" and cells["geomean over 2 ops"][3] == "2.00× (1 op)"
    assert "results: out/results.json, out/results.csv" in text
    assert "skipped: compile (B): left out by --no-compile" in text


def test_verdict_says_fail_and_a_faster_other_provider():
    rows = [
        _row("attention", "eager", "bwd", 10.0, tflops=0.01),
        _row("attention", "gptkernels-cpu", "bwd", 5.0),
        _row("attention", "sdpa", "bwd", 4.0, tflops=0.01),
        _row("softmax", "eager", "fwd", 1.0, gbps=9.0),
        _row("softmax", "gptkernels-cpu", "fwd", None, status="FAIL", reason="wrong result: out0"),
    ]
    text = report.verdict(_result(rows))
    assert "attention bwd: sdpa is faster than gptkernels-cpu at 1 of 1 shape (by up to 1.25×" in text
    rows[2] = _row("attention", "sdpa", "bwd", 4.9, tflops=0.01, spread=1.1)  # 2% faster, 10% spread: noise
    assert "faster than" not in report.verdict(_result(rows))
    assert "FAIL softmax fwd 1024x768 float32 gptkernels-cpu: wrong result: out0" in text
    _, body = _table(text, "op")
    assert {r[0]: r for r in body}["softmax"][-2:] == ["FAIL", "–"]


def test_skips_are_grouped_one_line_per_reason():
    ops = ("layernorm", "rmsnorm", "softmax")
    rows = []
    for op in ops:
        rows += [_row(op, "eager", "fwd", 1.0, gbps=1.0), _row(op, "gptkernels-cpu", "fwd", 0.5, gbps=2.0)]
        for mode in ("fwd", "bwd"):
            rows += [
                _row(
                    op,
                    "gptkernels-cuda",
                    mode,
                    None,
                    status="skipped",
                    reason="compiled for sm_80,sm_90; input is on cpu, not a CUDA device",
                ),
                _row(
                    op,
                    "gptkernels-triton",
                    mode,
                    None,
                    status="skipped",
                    reason="Triton on CPU tensors is the interpreter: for tests, never timed",
                ),
                _row(op, "compile", mode, None, status="skipped", reason="left out by --quick on CPU"),
            ]
    rows += [_row("attention", "eager", "fwd", 1.0, tflops=0.1)]
    rows += [
        _row("attention", f"sdpa-{b}", "fwd", None, status="skipped", reason=f"SDPA {b} runs on CUDA only")
        for b in ("flash", "efficient", "cudnn")
    ]
    rows += [
        _row(
            "mlp",
            "-",
            None,
            None,
            shape=None,
            preset=None,
            dtype=None,
            status="skipped",
            reason="not available: gptkernels.ops.mlp does not import",
        )
    ]
    lines = report.skip_groups(_result(rows))
    assert lines == [
        "skipped: gptkernels-cuda, sdpa-flash, sdpa-efficient, sdpa-cudnn: no CUDA device: this run is on cpu",
        "skipped: gptkernels-triton (layernorm, rmsnorm, softmax): Triton on CPU tensors is the interpreter: for "
        "tests, never timed",
        "skipped: compile (layernorm, rmsnorm, softmax): left out by --quick on CPU",
        "not run: mlp: not available: gptkernels.ops.mlp does not import",
    ]
    # On a CUDA run a reason that names its op is still one line, with the ops listed.
    cuda = [
        _row(op, "gptkernels-triton", "fwd", None, status="skipped", reason=f"{op} has no triton kernel")
        for op in ("layernorm", "rmsnorm")
    ] + [_row("softmax", "eager", "fwd", 1.0, gbps=1.0)]
    lines = report.skip_groups(_result(cuda, device="cuda"))
    assert lines == ["skipped: gptkernels-triton (layernorm, rmsnorm): the op has no triton kernel"]


def test_verdict_is_short_and_verbose_prints_every_row(tmp_path, capsys):
    rows = _verdict_rows()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_result(rows)))
    assert bench.main(["--summary", str(path)]) == 0
    short = capsys.readouterr().out
    assert "verdict:" in short and "| op " in short and "| shape (preset)" not in short
    assert len(short.splitlines()) < 20
    assert bench.main(["--summary", str(path), "--verbose"]) == 0
    full = capsys.readouterr().out
    head, body = _table(full, "op")
    assert head[:2] == ["op", "shape (preset)"] and len(body) == len(rows) - 1  # all but the skipped compile row
    assert full.index("| shape (preset)") < full.index("verdict:")


# ---------------------------------------------------------------------------------------------------- compare
def _pair(**new_env):
    old = _result([_row("layernorm", "eager", "fwd", 1.0), _row("layernorm", "gptkernels-cpu", "fwd", 0.5)])
    new = copy.deepcopy(old)
    new["rows"][1] = _row("layernorm", "gptkernels-cpu", "fwd", 1.0)  # 2x slower, 2% spread: beyond noise
    new["env"].update(new_env)
    return old, new


def test_compare_comparable_runs_count_slower_rows():
    text, regressions = report.compare(*_pair())
    assert regressions == 1
    assert "**SLOWER**" in text and "verdict: 1 regression" in text
    assert "not comparable" not in text and "indicative" not in text
    assert "note: same code in both runs (git abc123)" in text
    assert "(1 row within noise not listed; --verbose lists every row)" in text
    assert "within noise |" in report.compare(*_pair(), verbose=True)[0]


@pytest.mark.parametrize(
    "change, level, line",
    [
        (
            {"cpu_model": "Intel Xeon", "device_name": "Intel Xeon", "cpu_count": 16},
            "not comparable",
            "not comparable: different machine (CPU AMD EPYC (2 cores) vs CPU Intel Xeon (16 cores))",
        ),
        (
            {"torch_threads": 2, "openmp_threads": 2},
            "indicative",
            "runs differ in threads: 1 torch thread, OpenMP 1 vs 2 torch threads, OpenMP 2: treat ratios as indicative",
        ),
        (
            {"load_avg_1m_end": 3.2},
            "indicative",
            "new run measured under load (1-min load average 0.1 -> 3.2 on 2 cores (this run's 1 thread included at "
            "the end)): treat ratios as indicative",
        ),
    ],
)
def test_compare_says_why_runs_differ_and_weighs_the_verdict(change, level, line):
    text, regressions = report.compare(*_pair(**change))
    assert line in text
    assert f"verdict: {level} (" in text
    assert regressions == 0, "a slower row between runs that differ is no regression"
    assert f"slower ({level})" in text and "**SLOWER**" not in text


def test_compare_quick_against_full_and_threads_reasons():
    old, new = _pair(torch_threads=2)
    new["config"]["quick"] = False
    text, _ = report.compare(old, new)
    assert "runs differ in suite: ops suite, --quick vs ops suite, full timing" in text
    assert "verdict: indicative (suite ops suite, --quick vs ops suite, full timing; threads 1 vs 2)" in text


def test_compare_still_counts_a_new_fail_and_reads_rows_without_spreads():
    old, new = _pair(cpu_count=64)
    new["rows"][0] = _row("layernorm", "eager", "fwd", None, status="FAIL", reason="wrong result")
    for r in old["rows"] + new["rows"]:
        r.pop("ms_p20"), r.pop("ms_p80")
    text, regressions = report.compare(old, new)
    assert regressions == 1 and "REGRESSION: now FAIL" in text
    assert "±10% (assumed)" in text


@pytest.mark.skipif(not RESULTS.is_dir(), reason="no stored results in this checkout")
def test_compare_reads_the_stored_result_files():
    quick = report.load(RESULTS / "2026-11-30-quick-after-isa-clones.json")
    full = report.load(RESULTS / "2026-12-07-default.json")
    text, regressions = report.compare(quick, full)
    assert "runs differ in suite: ops suite, --quick vs ops suite, full timing" in text
    assert "verdict: indicative" in text and regressions == 0
    text, _ = report.compare(report.load(RESULTS / "2026-11-30-default.json"), full)
    assert "new/old" in text and "geomean new/old p50 per provider" in text
    assert report.verdict(full).count("skipped:") == 2  # cuda + CUDA-only SDPA backends, the Triton interpreter


# ---------------------------------------------------------------------------------------------------- help
def test_help_texts_are_plain_and_say_what_the_flags_do():
    p = argparse.ArgumentParser(
        prog="python -m gptkernels bench", description=cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_arguments(p)
    text = p.format_help()
    assert "``" not in text
    flat = " ".join(text.split())
    for needle in (
        "--quick a first look",
        "--summary RESULTS.json print the verdict",
        "--plot [{per-op,combined}]",
        "--compare OLD.json NEW.json compare two results.json",
        "--verbose also print the per-row detail",
        "% of ceiling",
    ):
        assert needle in flat, needle


def test_verdict_names_a_peak_memory_difference_only_when_large():
    def mem(r, mb):
        r["peak_mem_mb"] = mb
        return r

    rows = [
        mem(_row("linear_cross_entropy", "eager", "fwd+bwd", 10.0, shape="256x768x50257"), 600.0),
        mem(_row("linear_cross_entropy", "gptkernels-cpu", "fwd+bwd", 9.0, shape="256x768x50257"), 60.0),
        mem(_row("layernorm", "eager", "fwd", 1.0), 10.0),
        mem(_row("layernorm", "gptkernels-cpu", "fwd", 0.5), 9.0),
    ]
    rows += [mem(_row("mlp", "eager", "bwd", 2.0), 36.0), mem(_row("mlp", "gptkernels-cpu", "bwd", 2.0), 57.0)]
    text = report.verdict(_result(rows))
    assert "memory: linear_cross_entropy fwd+bwd peak 0.10× eager's (largest shape 256x768x50257: 60 MB vs 600 MB" \
        in text
    assert "memory: layernorm" not in text
    # bwd rows: the graph was built before, so what the forward saved is not in the number; the line says so
    assert "memory: mlp bwd peak 1.6× eager's (largest shape 1024x768: 57 MB vs 36 MB, above the inputs and what " \
        "the forward saved)" in text


def test_busy_counts_other_work_not_the_runs_own_threads():
    """A 2-thread run on an idle 2-core machine ends with a load near 2: that is the run itself, not a busy machine."""
    assert report.busy(_env(load_avg_1m=0.1, load_avg_1m_end=1.9, torch_threads=2)) is None
    assert report.busy(_env(load_avg_1m=1.5, load_avg_1m_end=1.9, torch_threads=2)).startswith(
        "1-min load average 1.5 -> 1.9 on 2 cores")
    assert report.busy(_env(load_avg_1m=0.1, load_avg_1m_end=3.5, torch_threads=2)) is not None  # 1.5 from others
    assert report.busy(_env(load_avg_1m=0.2, load_avg_1m_end=1.4, torch_threads=1)) is None
