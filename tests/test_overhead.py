"""bench --suite overhead: rows, ratios, the correctness gate before timing, the table and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from gptkernels.bench import overhead
from gptkernels.bench.cli import main as bench_main


def _run(ops, **kw):
    return overhead.run(torch.device("cpu"), [torch.float32], ops=ops, rounds=3, calls=5, progress=False, **kw)


def test_rows_have_times_ratios_and_the_environment():
    result = _run(["layer_norm", "softmax", "decode_attention"])
    assert result["suite"] == "overhead" and result["config"]["threads"] == 1
    rows = result["rows"]
    # decode_attention has no grad mode (no backward): 2 modes x 2 ops + 1, each eager + gptkernels-cpu.
    assert {(r["op"], r["mode"]) for r in rows} == {
        ("layer_norm", "no_grad"), ("layer_norm", "grad"), ("softmax", "no_grad"), ("softmax", "grad"),
        ("decode_attention", "no_grad")}
    assert {r["provider"] for r in rows} == {"eager", "gptkernels-cpu"}
    for r in rows:
        assert r["status"] == "ok", r
        assert 0 < r["us_p20"] <= r["us_p50"] <= r["us_p80"]
        assert r["samples"] == 15 and r["device"] == "cpu" and r["torch"] == torch.__version__
        assert r["ratio_vs_eager"] == pytest.approx(r["us_p50"] / next(
            e["us_p50"] for e in rows if e["provider"] == "eager" and (e["op"], e["mode"]) == (r["op"], r["mode"])))
    assert all("within_budget" in r for r in rows if r["provider"] != "eager")


def test_a_wrong_provider_fails_and_is_not_timed(monkeypatch):
    real = overhead.cases

    def cases():
        out = real()
        for c in out:
            if c.op == "softmax":
                good = c.ours
                c.ours = lambda be, good=good: (lambda x: good(be)(x) * 1.01)
        return out

    monkeypatch.setattr(overhead, "cases", cases)
    rows = _run(["softmax"])["rows"]
    bad = [r for r in rows if r["provider"] == "gptkernels-cpu"]
    assert bad and all(r["status"] == "FAIL" and "differs from eager" in r["reason"] for r in bad)
    assert all(r.get("us_p50") is None for r in bad)
    assert "FAIL" in overhead.markdown({"rows": rows, "env": _run(["softmax"])["env"], "config": {"threads": 1},
                                       "wall_s": 0})


def test_markdown_marks_rows_over_budget():
    result = _run(["rms_norm"])
    for r in result["rows"]:
        if r["provider"] != "eager":
            r["ratio_vs_eager"], r["within_budget"] = 2.0, False
    text = overhead.markdown(result)
    assert "2.00x ✗" in text and "row(s) over the 1.25x budget" in text


def test_cli_writes_json_and_summary_reads_it(tmp_path, capsys):
    rc = bench_main(["--suite", "overhead", "--quick", "--ops", "bias_gelu", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["suite"] == "overhead" and {r["op"] for r in data["rows"]} == {"bias_gelu"}
    assert (tmp_path / "results.csv").read_text().startswith("op,")
    capsys.readouterr()
    assert bench_main(["--summary", str(tmp_path / "results.json")]) == 0
    assert "| bias_gelu |" in capsys.readouterr().out


def test_cli_rejects_unknown_ops(capsys):
    assert bench_main(["--suite", "overhead", "--ops", "nope"]) == 2
    assert "unknown op for --suite overhead" in capsys.readouterr().err
