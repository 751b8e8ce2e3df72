"""The command group as a whole, and the bench command on the tiny model."""

import logging
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


@pytest.mark.parametrize("flags, ours, libraries", [([], logging.INFO, logging.WARNING),
                                                    (["-v"], logging.DEBUG, logging.WARNING),
                                                    (["-vv"], logging.DEBUG, logging.DEBUG),
                                                    (["-q"], logging.ERROR, logging.WARNING)])
def test_verbosity_flags_set_the_log_levels(flags, ours, libraries, monkeypatch):
    for name in ("vibevoice_mlx", None):  # put the levels back afterwards: later tests rely on them
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    r = CliRunner().invoke(main, [*flags, "doctor", "--json"])
    assert r.exit_code == 0, r.output
    assert logging.getLogger("vibevoice_mlx").level == ours
    assert logging.getLogger().level == libraries


def _say(tiny, *args):
    return CliRunner().invoke(main, ["say", "Speaker 1: Hi.", "--model", str(tiny["original"]), "--tokenizer",
                                     str(tiny["tokenizer"]), *args])


def test_a_user_error_is_one_line_and_an_internal_error_keeps_its_traceback(tiny, tmp_path, monkeypatch):
    from vibevoice_mlx import generation

    r = _say(tiny, "-o", tmp_path / "a.wav", "--voice", tmp_path / "nothing.wav")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert [line for line in r.output.splitlines() if line.startswith("Error:")] == \
        [f"Error: Voice file not found: {tmp_path / 'nothing.wav'}"]

    def broken(*args, **kwargs):
        raise KeyError("an internal bug")  # not a UserError: must not be dressed up as one

    monkeypatch.setattr(generation, "stream_generate", broken)
    r = _say(tiny, "-o", tmp_path / "b.wav")
    assert r.exit_code == 1 and isinstance(r.exception, KeyError), r.output
    assert "Error:" not in r.output and not (tmp_path / "b.wav").exists()


def test_quiet_hides_the_warnings(tiny, tmp_path, monkeypatch):
    for name in ("vibevoice_mlx", None):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    from vibevoice_mlx import generation

    monkeypatch.setattr(generation, "greedy", lambda logits, ids: ids[2])
    loud = _say(tiny, "-o", tmp_path / "a.wav", "--max-seconds", 0.002)
    quiet = CliRunner().invoke(main, ["-q", "say", "Speaker 1: Hi.", "--model", str(tiny["original"]),
                                      "--tokenizer", str(tiny["tokenizer"]), "-o", tmp_path / "b.wav",
                                      "--max-seconds", 0.002])
    assert loud.exit_code == quiet.exit_code == 0, (loud.output, quiet.output)
    assert "No voice given" in loud.output and "cut short" in loud.output
    assert "No voice given" not in quiet.output and "cut short" not in quiet.output
