"""`vibevoice-mlx doctor`: the sections it prints, the model it recommends, the fixes it names."""

import json

import pytest
from click.testing import CliRunner

from vibevoice_mlx import doctor
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
def test_fit_recommendation(gb, model, precision):
    rec = doctor.doctor_report(memory_bytes=gb * GB)["recommendation"]
    assert rec["model"] == model
    assert rec["precision"].startswith(precision)
    if model == "VibeVoice-7B" and gb < 32:
        assert "4-bit" in rec["precision"]  # 16 GB: 7B with a 4/8-bit language model


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


def test_nothing_missing_when_everything_is_installed():
    report = doctor.doctor_report(memory_bytes=16 * GB)
    # The test environment has the full install (pip install -e '.[torch,test]'); what may remain is about the
    # machine: an NVIDIA GPU without the cuda extra, or the slow BLAS of MLX's Linux CPU wheel.
    missing = [m for m in report["missing"] if "NVIDIA" not in m["what"] and "GFLOP/s" not in m["what"]]
    assert missing == []
    if not report["missing"]:
        assert doctor.format_report(report).endswith("Missing\n  nothing")


@pytest.mark.parametrize("gflops, told", [(5.0, True), (300.0, False)])
def test_slow_cpu_blas_is_reported_with_the_fix(monkeypatch, gflops, told):
    monkeypatch.setattr(doctor, "cpu_matmul_gflops", lambda: gflops)
    monkeypatch.setattr(doctor.platform, "system", lambda: "Linux")
    report = doctor.doctor_report(memory_bytes=16 * GB)
    if report["mlx"]["backend"] != "CPU":
        pytest.skip("MLX runs on a GPU here: the CPU BLAS check does not apply")
    blas = [m for m in report["missing"] if "GFLOP/s" in m["what"]]
    assert bool(blas) == told
    if told:
        assert "LD_PRELOAD" in blas[0]["fix"] and "openblas" in blas[0]["fix"]
        assert f"CPU float32 matmul: {gflops}" in doctor.format_report(report)
