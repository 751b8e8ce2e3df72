"""The command group as a whole, and the bench command on the tiny model."""

import re

import pytest
from click.testing import CliRunner

from vibevoice_mlx.cli import main


def test_help_lists_every_command():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for command in ("convert", "say", "doctor", "bench"):
        assert re.search(rf"^\s+{command}\s", r.output, re.M), command


def test_unknown_option_is_a_usage_error_not_a_traceback():
    r = CliRunner().invoke(main, ["say", "--no-such-option"])
    assert r.exit_code == 2 and "No such option" in r.output and "Traceback" not in r.output


@pytest.mark.needs_torch
def test_bench_times_both_backends_and_prints_the_ratio(tiny):
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny["original"]), "--tokenizer", str(tiny["tokenizer"]),
                                  "--backends", "mlx,torch", "--force-frames", "--frames", "3", "--runs", "1",
                                  "--voice-seconds", "0.01", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    rows = re.findall(r"^(mlx|torch)\s+float32\s*:\s+([\d.]+) ms/frame \(median of (\d+)\)", r.output, re.M)
    assert [b for b, *_ in rows] == ["mlx", "torch"]
    assert all(float(ms) > 0 and int(n) >= 2 for _, ms, n in rows)
    assert re.search(r"^mlx / torch speed per frame: [\d.]+x$", r.output, re.M)


def test_bench_rejects_an_unknown_backend(tiny):
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny["original"]), "--backends", "onnx"])
    assert r.exit_code != 0 and "Unknown backend" in r.output
