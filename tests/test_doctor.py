"""`vibevoice-mlx doctor`: the sections it prints, the model it recommends, the fixes it names."""

import json
import sys

import pytest
from click.testing import CliRunner

from vibevoice_mlx import blas, doctor
from vibevoice_mlx.cli import main

GB = 1024**3
SECTIONS = ["Platform", "Python", "MLX", "Memory", "PyTorch", "Recommended model", "Missing"]


def test_cli_prints_every_section(monkeypatch):
    monkeypatch.setattr(doctor, "system_memory_bytes", lambda: 8 * GB)
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == SECTIONS
    assert "  8.0 GB" in result.output and "VibeVoice-1.5B" in result.output
    assert "backend: CPU" in result.output or "backend: Metal GPU" in result.output or "backend: CUDA" in result.output


def test_cli_json(monkeypatch):
    monkeypatch.setattr(doctor, "system_memory_bytes", lambda: 64 * GB)
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["memory"]["gb"] == 64.0
    assert report["mlx"]["backend"] in ("Metal GPU", "CUDA", "CPU")
    assert report["recommendation"]["model"] == "VibeVoice-7B"


@pytest.mark.parametrize("gb, model, precision", [
    (8, "VibeVoice-1.5B", "float16"),
    (16, "VibeVoice-7B", "8-bit"),
    (24, "VibeVoice-7B", "8-bit"),
    (64, "VibeVoice-7B", "float16"),
])
@pytest.mark.parametrize("backend", ["Metal GPU", "CUDA"])
def test_fit_recommendation_on_a_gpu(gb, model, precision, backend):
    rec = doctor.recommend(gb, backend)
    assert rec["model"] == model
    assert rec["precision"].startswith(precision)
    if model == "VibeVoice-7B" and gb < 32:
        assert "4-bit" in rec["precision"]  # 16 GB: 7B with a 4/8-bit language model


@pytest.mark.parametrize("gb, model, precision", [
    (8, "VibeVoice-1.5B", "float16"),
    (16, "VibeVoice-1.5B", "float32"),
    (24, "VibeVoice-1.5B", "float32"),
    (64, "VibeVoice-7B", "float32"),
    (None, "VibeVoice-1.5B", "float32"),
])
def test_fit_recommendation_on_the_cpu_is_never_quantized(gb, model, precision):
    # The loader warns that MLX's CPU backend runs quantized matmuls very slowly: doctor must not advise them.
    rec = doctor.recommend(gb, "CPU")
    assert rec["model"] == model
    assert rec["precision"].startswith(precision)
    assert "-bit" not in rec["precision"] and "not quantized" in rec["precision"]
    assert "without -q" in rec["why"]  # and says why


@pytest.mark.parametrize("backend", ["CPU", "Metal GPU"])
def test_report_recommends_for_the_backend_mlx_runs_on(monkeypatch, backend):
    monkeypatch.setattr(doctor, "_mlx_info", lambda: {"version": "0.32.4", "backend": backend, "device": "x",
                                                      "error": None})
    rec = doctor.doctor_report(memory_bytes=16 * GB)["recommendation"]
    assert rec == doctor.recommend(16.0, backend)
    assert ("8-bit" in rec["precision"]) == (backend != "CPU")


def test_missing_torch_and_mlx_name_the_fix(monkeypatch):
    monkeypatch.setattr(doctor, "_torch_info", lambda: {"version": None, "transformers": None, "diffusers": None,
                                                        "mps": False, "cuda": False})
    monkeypatch.setattr(doctor, "_mlx_info", lambda: {"version": None, "backend": None, "device": None,
                                                      "error": "ImportError: libmlx.so"})
    report = doctor.doctor_report(memory_bytes=16 * GB)
    fixes = [m["fix"] for m in report["missing"]]
    assert any(f.endswith("pip install 'vibevoice-mlx[torch]'") for f in fixes)
    assert any("mlx" in f and "vibevoice" not in f for f in fixes)
    text = doctor.format_report(report)
    assert "libmlx.so" in text and "fix: " in text and "not installed" in text


@pytest.mark.needs_torch
def test_nothing_missing_when_everything_is_installed():
    report = doctor.doctor_report(memory_bytes=16 * GB)
    # The test environment has the full install (pip install -e '.[torch,test]'); what may remain is about the
    # machine: an NVIDIA GPU without the cuda extra, or the slow BLAS of MLX's Linux CPU wheel.
    missing = [m for m in report["missing"] if "NVIDIA" not in m["what"] and "GFLOP/s" not in m["what"]]
    assert missing == []
    if not report["missing"]:
        assert doctor.format_report(report).endswith("Missing\n  nothing")


def _fake_blas(name, path, gflops, system=blas.openblas_paths("x86_64")[0], how=None):
    fast = not blas.is_reference(name)
    return {"name": name, "path": path, "how": how, "gflops": gflops, "fast": fast, "config": None,
            "setting": "auto", "system_blas": system, "python_command": blas.python_command(system),
            "fix": None if fast else "LD_PRELOAD=... (fake)"}


@pytest.mark.parametrize("name, told", [("reference BLAS (bundled with mlx[cpu])", True), ("OpenBLAS", False)])
def test_slow_cpu_blas_is_reported_with_the_fix(monkeypatch, name, told):
    fake = _fake_blas(name, "/x/libblas.so.3", 4.5 if told else 31.5)
    monkeypatch.setattr(blas, "blas_report", lambda: fake)
    monkeypatch.setattr(doctor.platform, "system", lambda: "Linux")
    report = doctor.doctor_report(memory_bytes=16 * GB)
    if report["mlx"]["backend"] != "CPU":
        pytest.skip("MLX runs on a GPU here: the CPU BLAS check does not apply")
    slow = [m for m in report["missing"] if "GFLOP/s" in m["what"]]
    assert bool(slow) == told
    text = doctor.format_report(report)
    assert f"BLAS: {name} (/x/libblas.so.3), {fake['gflops']} GFLOP/s" in text
    if told:
        assert slow[0]["fix"] == fake["fix"] and name in slow[0]["what"]
    else:  # fast in this command: tell how a Python program gets the same
        assert f"in Python programs: LD_PRELOAD={fake['system_blas']} python" in text
        assert "in ComfyUI: the VibeVoice nodes load it by themselves" in text
        assert f"start it as LD_PRELOAD={fake['system_blas']} python main.py" in text


@pytest.mark.skipif(sys.platform != "linux", reason="MLX's CPU BLAS fix is for Linux")
@pytest.mark.parametrize("system, setting, want", [
    ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0", "auto",
     "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python"),
    ("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4", "auto",
     "BLIS_IC_NT=2 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4 python"),
    (None, "auto", "apt-get install libblis4-pthread"),
    ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0", "off", "unset VIBEVOICE_MLX_BLAS"),
])
def test_the_blas_fix_is_the_command_that_applies(monkeypatch, system, setting, want):
    monkeypatch.setattr(blas, "active_blas", lambda: {"name": "reference BLAS (bundled with mlx[cpu])",
                                                      "path": "/w/mlx_cpu.libs/libblas-1.so.3"})
    monkeypatch.setattr(blas, "find_system_blas", lambda: system)
    monkeypatch.setattr(blas.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv(blas.ENV, setting)
    report = blas.blas_report(measure=False)
    assert not report["fast"] and report["how"] == "bundled with mlx[cpu]"
    assert want in report["fix"]
