"""The conveniences and messages of `vibevoice-mlx say`: stdout and stdin, opus, options that do not apply, links
at the output path, -q, and warnings said once. On the tiny model with forced frames (see test_say.py)."""

import io
import logging

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from vibevoice_mlx import generation
from vibevoice_mlx.cli import main

K = 4  # frames per segment


@pytest.fixture
def forced(monkeypatch):
    """K speech frames, then speech_end and eos, in every segment."""
    n = {"i": 0}

    def choose(logits, ids):
        i, n["i"] = n["i"] % (K + 2), n["i"] + 1
        return ids[2] if i < K else ids[1] if i == K else ids[3]

    monkeypatch.setattr(generation, "greedy", choose)


@pytest.fixture(autouse=True)
def log_levels(monkeypatch):
    for name in ("vibevoice_mlx", None):  # main() sets them; later tests rely on the defaults
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)


def say(tiny, *args, flags=(), **kwargs):
    return CliRunner().invoke(main, [*flags, "say", "--model", str(tiny["original"]), "--tokenizer",
                                     str(tiny["tokenizer"]), *map(str, args)], **kwargs)


def test_opus_output(tiny, forced, tmp_path):
    out = tmp_path / "x.opus"
    r = say(tiny, "Speaker 1: Hello.", "-o", out, "--seed", 1)
    assert r.exit_code == 0, r.output
    info = sf.info(out)
    assert (info.format, info.subtype, info.samplerate) == ("OGG", "OPUS", 24000)
    assert not (tmp_path / "x.opus.partial.wav").exists()


def test_a_dangling_link_at_the_output_is_kept_without_force(tiny, forced, tmp_path):
    out = tmp_path / "link.wav"
    out.symlink_to(tmp_path / "nowhere.wav")
    r = say(tiny, "Speaker 1: Hello.", "-o", out)
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output, r.output
    assert out.is_symlink() and not (tmp_path / "nowhere.wav").exists()
    r = say(tiny, "Speaker 1: Hello.", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert not out.is_symlink() and sf.info(out).frames == K * 16


@pytest.mark.parametrize("option", [["--device", "cuda"], ["--attention", "eager"]])
def test_torch_only_options_are_refused_with_mlx(tiny, tmp_path, option):
    r = say(tiny, "Speaker 1: Hello.", "-o", tmp_path / "a.wav", *option)
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and " ".join(option) in errors[0] and "--backend torch" in errors[0], r.output
    assert list(tmp_path.iterdir()) == []


def test_quiet_prints_nothing_on_success(tiny, forced, tmp_path, voices):
    out, saved = tmp_path / "q.wav", tmp_path / "v.safetensors"
    r = say(tiny, "Speaker 1: Hello.", "-o", out, "--voice", voices[0], "--save-voice", saved, flags=["-q"])
    assert r.exit_code == 0 and out.exists() and saved.exists()
    assert r.output == ""


def test_an_existing_output_is_named_the_same_way_by_say_and_convert(tiny, tmp_path):
    out = tmp_path / "there.wav"
    out.write_bytes(b"keep")
    r = say(tiny, "Speaker 1: Hello.", "-o", out)
    assert f"Error: {out} already exists: choose another name or pass --force (force=True) to replace it." \
        in r.output.splitlines()
    folder = tmp_path / "converted"
    folder.mkdir()
    r = CliRunner().invoke(main, ["convert", "--model", str(tiny["original"]), "--mlx-path", str(folder)])
    assert f"Error: {folder} already exists: choose another --mlx-path or pass --force (force=True) to replace " \
        "it." in r.output.splitlines()


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    d = tmp_path_factory.mktemp("voices")
    rng = np.random.default_rng(5)
    short, long = d / "short.wav", d / "long.wav"
    sf.write(short, 0.2 * rng.standard_normal(12000).astype(np.float32), 24000)  # 0.5 s: warned about
    sf.write(long, 0.2 * rng.standard_normal(48000).astype(np.float32), 24000)
    return short, long


def test_stdin_script_to_stdout_wav(tiny, forced, tmp_path, monkeypatch):
    real = generation.greedy

    def chatty(logits, ids):
        print("a stray print")  # a library printing mid-run must not corrupt the audio on stdout
        return real(logits, ids)

    monkeypatch.setattr(generation, "greedy", chatty)
    r = say(tiny, "--file", "-", "-o", "-", "--seed", 3, input="Speaker 1: Hello.\n")
    assert r.exit_code == 0, r.stderr
    data = r.stdout_bytes
    assert data[:4] == b"RIFF" and len(data) == 44 + K * 16 * 2
    audio, sr = sf.read(io.BytesIO(data), dtype="int16")
    assert sr == 24000 and len(audio) == K * 16 and np.abs(audio).max() > 0
    assert "a stray print" in r.stderr and "Wrote stdout" in r.stderr
    monkeypatch.setattr(generation, "greedy", real)
    r = say(tiny, "Speaker 1: Hello.", "-o", tmp_path / "same.wav", "--seed", 3)
    assert r.exit_code == 0, r.output
    # the same audio as a file run; the server's encoder scales to int16 by 32767, libsndfile by 32768
    np.testing.assert_allclose(sf.read(tmp_path / "same.wav", dtype="int16")[0], audio, atol=2)


def test_stdin_script_is_decoded_as_a_file_is(tiny, forced):
    r = say(tiny, "--file", "-", "-o", "-", input="\ufeffSpeaker 1: Caf\u00e9.".encode("utf-16"))
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout_bytes) == 44 + K * 16 * 2
    r = say(tiny, "--file", "-", "-o", "-", input=b"Speaker 1: \x00\x00")
    assert r.exit_code == 1 and "Error: stdin holds NUL bytes" in r.stderr and r.stdout_bytes == b""


def test_stdout_gets_nothing_when_the_run_fails(tiny, monkeypatch):
    monkeypatch.setattr(generation, "greedy", lambda logits, ids: ids[3])  # eos at once: no audio
    r = say(tiny, "Speaker 1: Hello.", "-o", "-")
    assert r.exit_code == 1 and "no audio" in r.stderr and r.stdout_bytes == b""
    r = say(tiny, "Speaker 1: Hello. Bye now.", "-o", "-", "--chunk", "2w")
    assert r.exit_code == 1 and "stdout" in r.stderr and r.stdout_bytes == b""


def test_dry_run_to_stdout_prints_the_plan_there(tiny):
    r = say(tiny, "Speaker 1: Hello.", "-o", "-", "--dry-run")
    assert r.exit_code == 0 and "1 part(s)" in r.stdout, r.output


PIPE_RUN = """
import sys
from vibevoice_mlx import generation, cli
generation.greedy = lambda logits, ids: ids[2]  # speech frames until --max-seconds
sys.argv = ["vibevoice-mlx", "say", "--file", "-", "-o", "-", "--model", sys.argv[1], "--tokenizer", sys.argv[2],
            "--max-seconds", str(5 * 16 / 24000)]
cli.main()
"""


def test_a_real_pipe_carries_only_the_audio(tiny):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", PIPE_RUN, str(tiny["original"]), str(tiny["tokenizer"])],
                       input=b"Speaker 1: Hello.", capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    audio, sr = sf.read(io.BytesIO(p.stdout), dtype="float32")
    assert sr == 24000 and len(audio) == 5 * 16
    assert b"Wrote stdout" in p.stderr and b"No voice given" in p.stderr


FIVE = "Speaker 1: One.\nSpeaker1: not a label.\nSpeaker 2: Two.\nSpeaker 3: Three.\nSpeaker 4: Four.\nSpeaker 5: Five."
WARNINGS = ["looks like a speaker label", "The script has 5 speakers", "is only 0.50 s long", "No voice given"]


def _said(caplog):
    return {w: sum(w in m for m in caplog.messages) for w in WARNINGS}


def test_each_warning_is_said_once(tiny, forced, tmp_path, voices, caplog):
    five = [a for v in [voices[0]] + [voices[1]] * 4 for a in ("--voice", v)]
    r = say(tiny, FIVE, "-o", tmp_path / "one.wav", *five)
    assert r.exit_code == 0, r.output
    assert _said(caplog) == dict.fromkeys(WARNINGS[:3], 1) | {"No voice given": 0}
    caplog.clear()
    r = say(tiny, FIVE, "-o", tmp_path / "parts.wav", "--chunk", "8w")  # two parts or more, no voice
    assert r.exit_code == 0, r.output
    assert " parts, " in r.output  # split: each part a run of its own
    assert _said(caplog) == dict.fromkeys(WARNINGS, 1) | {"is only 0.50 s long": 0}


def test_the_library_warns_on_every_call_and_a_command_run_once(caplog):
    from vibevoice_mlx.notices import once_per_run
    from vibevoice_mlx.processor import parse_script

    parse_script(FIVE)
    parse_script(FIVE)
    assert sum("looks like a speaker label" in m for m in caplog.messages) == 2
    caplog.clear()
    with once_per_run():
        parse_script(FIVE)
        parse_script(FIVE)
    parse_script(FIVE)  # a new run (the block ended) is told again
    assert sum("looks like a speaker label" in m for m in caplog.messages) == 2
