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
