"""Backend selection: argument > GPTKERNELS_BACKEND > auto; explicit requests that cannot run raise with a reason."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA

import gptkernels
from gptkernels import _dispatch


def test_auto_on_cpu_picks_the_cpp_kernel_and_says_why(monkeypatch):
    monkeypatch.delenv("GPTKERNELS_BACKEND", raising=False)
    gptkernels.layer_norm(torch.randn(2, 8), torch.ones(8))
    backend, why = gptkernels.last("layer_norm")
    assert backend == "cpu" and "auto on cpu" in why
    assert "layer_norm" in gptkernels.explain() and "cpu" in gptkernels.explain()


def test_env_var_selects_and_argument_wins(monkeypatch):
    monkeypatch.setenv("GPTKERNELS_BACKEND", "torch")
    gptkernels.rms_norm(torch.randn(2, 8), torch.ones(8))
    assert gptkernels.last("rms_norm") == ("torch", "requested by GPTKERNELS_BACKEND")
    gptkernels.rms_norm(torch.randn(2, 8), torch.ones(8), backend="cpu")
    assert gptkernels.last("rms_norm") == ("cpu", "requested by backend= argument")


def test_unknown_backend_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        gptkernels.layer_norm(torch.randn(2, 8), torch.ones(8), backend="fast")
    monkeypatch.setenv("GPTKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="from GPTKERNELS_BACKEND"):
        gptkernels.layer_norm(torch.randn(2, 8), torch.ones(8))


def test_explicit_backend_that_cannot_run_raises_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(gptkernels.BackendUnavailableError, match="triton: CPU tensors need TRITON_INTERPRET=1"):
        gptkernels.layer_norm(torch.randn(2, 8), torch.ones(8), backend="triton")
    if not HAS_CUDA:
        with pytest.raises(gptkernels.BackendUnavailableError, match="backend 'cuda'"):
            gptkernels.layer_norm(torch.randn(2, 8), torch.ones(8), backend="cuda")


def test_auto_never_raises_and_falls_back_visibly():
    x = torch.randn(2, 8, dtype=torch.float64)
    gptkernels.layer_norm(x, torch.ones(8, dtype=torch.float64))  # no kernel takes fp64: the reference does
    backend, why = gptkernels.last("layer_norm")
    assert backend == "torch" and "skipped cpu: dtype torch.float64 not supported" in why


def test_reasons_for_every_backend_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = {b: _dispatch.backend_reason(b, torch.device("cpu")) for b in _dispatch.BACKENDS}
    assert reasons["cpu"] is None and reasons["torch"] is None
    assert "TRITON_INTERPRET" in reasons["triton"]
    assert reasons["cuda"] is not None and len(reasons["cuda"]) > 10


@pytest.mark.gpu
def test_cuda_backend_usable_on_gpu():
    dev = torch.device("cuda", 0)
    assert _dispatch.backend_reason("cuda", dev) is None, _dispatch.backend_reason("cuda", dev)
    assert _dispatch.backend_reason("triton", dev) is None
    assert "runs on CPU tensors" in _dispatch.backend_reason("cpu", dev)
    gptkernels.layer_norm(torch.randn(2, 8, device=dev), torch.ones(8, device=dev))
    assert gptkernels.last("layer_norm")[0] == "cuda"


def test_extension_is_built_and_reports_itself():
    info = _dispatch.build_info()
    assert "error" not in info, info.get("error")
    assert info["openmp"] is True
    if torch.version.cuda is not None:
        assert isinstance(info["cuda"], bool)


def test_info_cli_text_and_json():
    out = subprocess.run([sys.executable, "-m", "gptkernels", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usable on cpu:" in out.stdout and "torch" in out.stdout and "triton" in out.stdout
    js = subprocess.run([sys.executable, "-m", "gptkernels", "info", "--json"], capture_output=True, text=True,
                        timeout=120)
    data = json.loads(js.stdout)
    assert data["usable"]["cpu"]["cpu"] is None and data["usable"]["cpu"]["torch"] is None
    assert data["torch"] == torch.__version__
