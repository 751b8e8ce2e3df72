"""`vibevoice-mlx say` on the tiny model, as a new user would run it.

Random weights rarely choose the speech-diffusion token, so these tests make the greedy choice emit K frames,
then speech_end, then eos in each segment (the generation loop itself is what is under test).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from vibevoice_mlx import generation
from vibevoice_mlx.testing import fake_audio_device
from vibevoice_mlx.cli import main
from vibevoice_mlx.engine import MLXBackend

K = 6


def forcing_sampler(frames=K):
    calls = {"n": 0}

    def choose(logits, ids):
        speech_start, speech_end, speech_diffusion, eos = ids
        i = calls["n"] % (frames + 2)
        calls["n"] += 1
        return speech_diffusion if i < frames else (speech_end if i == frames else eos)

    return choose


@pytest.fixture
def forced(monkeypatch):
    sampler = forcing_sampler()
    monkeypatch.setattr(generation, "greedy", lambda logits, ids: sampler(logits, ids))


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    d = tmp_path_factory.mktemp("voices")
    rng = np.random.default_rng(3)
    a, b = d / "alice.wav", d / "bob.flac"
    sf.write(a, 0.2 * rng.standard_normal(16000).astype(np.float32), 16000)  # resampled to 24 kHz
    sf.write(b, 0.2 * rng.standard_normal((30000, 2)).astype(np.float32), 48000)  # stereo, mixed to mono
    return a, b


def _say(tiny, *args):
    runner = CliRunner()
    return runner.invoke(main, ["say", "--model", str(tiny["original"]), "--tokenizer", str(tiny["tokenizer"]),
                                *map(str, args)], catch_exceptions=False)


def test_two_speakers_two_voices_and_pauses(tiny, voices, forced, tmp_path):
    out = tmp_path / "dialogue.wav"
    script = "Speaker 1: Hi Bob. [pause:250ms]\nSpeaker 2: Hello Alice! [pause]\nSpeaker 1: Bye."
    r = _say(tiny, script, "--voice", voices[0], "--voice", voices[1], "-o", out, "--seed", 1)
    assert r.exit_code == 0, r.output
    audio, sr = sf.read(out)
    hop = 16
    # three segments of K frames each, a 250 ms and a 1 s pause between them
    assert sr == 24000 and len(audio) == 3 * K * hop + 6000 + 24000
    assert np.all(audio[K * hop : K * hop + 6000] == 0) and np.abs(audio[: K * hop]).max() > 0
    assert "real time" in r.output


def test_saved_voice_is_reused_without_reencoding(tiny, voices, forced, tmp_path, monkeypatch):
    saved = tmp_path / "alice.safetensors"
    r = _say(tiny, "Speaker 1: Hello.", "--voice", voices[0], "--save-voice", saved, "-o", tmp_path / "a.wav",
             "--seed", 4)
    assert r.exit_code == 0, r.output and saved.exists()
    calls = []
    real_voice_latents = MLXBackend.voice_latents

    def counting(self, voices_, *a, **k):
        calls.append([v.ndim for v in voices_])
        return real_voice_latents(self, voices_, *a, **k)

    monkeypatch.setattr(MLXBackend, "voice_latents", counting)
    monkeypatch.setattr(generation, "greedy", forcing_sampler())
    r = _say(tiny, "Speaker 1: Hello.", "--voice", saved, "-o", tmp_path / "b.wav", "--seed", 4)
    assert r.exit_code == 0, r.output
    assert calls == [[2]]  # latents, not audio: nothing re-encoded
    a, _ = sf.read(tmp_path / "a.wav")
    b, _ = sf.read(tmp_path / "b.wav")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ext", ["flac", "ogg", "mp3"])
def test_output_format_follows_extension(tiny, forced, tmp_path, ext):
    out = tmp_path / f"out.{ext}"
    r = _say(tiny, "Speaker 1: Hello.", "-o", out, "--seed", 2)
    assert r.exit_code == 0, r.output
    info = sf.info(out)
    assert info.samplerate == 24000 and info.format == {"flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}[ext]
    assert not (tmp_path / f"out.{ext}.partial.wav").exists()


def test_the_drawn_seed_is_printed_and_makes_the_same_audio(tiny, forced, tmp_path):
    r = _say(tiny, "Speaker 1: Hello.", "-o", tmp_path / "a.wav", "--max-seconds", 0.01)
    assert r.exit_code == 0, r.output
    seed = r.output.split(", seed ")[1].split(")")[0]
    r = _say(tiny, "Speaker 1: Hello.", "-o", tmp_path / "b.wav", "--max-seconds", 0.01, "--seed", seed)
    assert r.exit_code == 0 and f"seed {seed})" in r.output, r.output
    np.testing.assert_array_equal(sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "b.wav")[0])


def test_existing_output_is_not_overwritten(tiny, forced, tmp_path):
    out = tmp_path / "keep.wav"
    out.write_bytes(b"precious")
    r = _say(tiny, "Speaker 1: Hello.", "-o", out)
    assert r.exit_code != 0 and "--force" in r.output and "Traceback" not in r.output
    assert out.read_bytes() == b"precious"
    r = _say(tiny, "Speaker 1: Hello.", "-o", out, "--force")
    assert r.exit_code == 0 and sf.info(out).frames == K * 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["Speaker 1: Hi", "--voice", "missing.wav"], "Voice file not found"),
        ([], "No script"),
        (["Speaker 1: Hi [pause:fast]"], "pause"),
        (["Speaker 1: Hi", "-o", "out.xyz"], "xyz"),
    ],
)
def test_bad_input_is_one_line_error(tiny, tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _say(tiny, *args)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert not any(p.suffix in (".wav", ".xyz") for p in tmp_path.iterdir())


def test_max_seconds_cuts_and_warns(tiny, forced, tmp_path, caplog):
    out = tmp_path / "short.wav"
    r = _say(tiny, "Speaker 1: Hello.", "-o", out, "--max-seconds", 3 * 16 / 24000)
    assert r.exit_code == 0
    assert sf.info(out).frames == 3 * 16
    assert any("cut short" in m for m in caplog.messages)


KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    from vibevoice_mlx import generation, cli
    n = {"i": 0}
    def choose(logits, ids):
        n["i"] += 1
        time.sleep(0.02)  # slow enough that the kill lands mid-run
        return ids[2]  # speech_diffusion, forever: only the kill ends this run
    generation.greedy = choose
    sys.argv = ["vibevoice-mlx", "say", "Speaker 1: " + "la " * 400, "--model", sys.argv[1], "--tokenizer",
                sys.argv[2], "-o", sys.argv[3], "--chunk", "off"]
    cli.main()
    """
)


def test_killed_run_leaves_a_valid_partial_and_the_next_run_replaces_it(tiny, tmp_path, caplog, forced):
    out = tmp_path / "killed.wav"
    partial = tmp_path / "killed.wav.partial.wav"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tiny["original"]), str(tiny["tokenizer"]),
                             str(out)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not partial.exists() or partial.stat().st_size < 44 + 4 * 16 * 2 * 20):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the final name never holds a half-made file
    audio, sr = sf.read(partial)
    assert sr == 24000 and len(audio) >= 20 * 16 and len(audio) % 16 == 0
    assert np.abs(audio).max() > 0
    r = _say(tiny, "Speaker 1: Hello.", "-o", out)
    assert r.exit_code == 0, r.output
    assert any("left by an interrupted run" in m for m in caplog.messages)
    assert sf.info(out).frames == K * 16 and not partial.exists()


@pytest.mark.needs_torch
def test_torch_backend_from_the_command_line(tiny, tmp_path, monkeypatch):
    """--backend torch runs transformers' generate (its token choice forced to 4 frames, then stop)."""
    from vibevoice_mlx import torch_backend

    real = torch_backend.torch_generate
    monkeypatch.setattr(torch_backend, "torch_generate",
                        lambda *a, **k: real(*a, **dict(k, forced_tokens=[259] * 4 + [258, 256])))
    out = tmp_path / "torch.wav"
    r = CliRunner().invoke(main, ["say", "Speaker 1: Hello.", "--model", str(tiny["transformers"]), "--backend",
                                  "torch", "--device", "cpu", "--attention", "eager", "-o", str(out), "--seed", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    audio, sr = sf.read(out)
    assert sr == 24000 and len(audio) == 4 * 16 and np.abs(audio).max() > 0


def test_play_without_the_extra_says_how_to_install(tiny, tmp_path, monkeypatch, forced):
    import builtins

    real_import = builtins.__import__

    def no_sounddevice(name, *a, **k):
        if name == "sounddevice":
            raise ImportError("No module named 'sounddevice'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_sounddevice)
    out = tmp_path / "play.wav"
    r = _say(tiny, "Speaker 1: Hello.", "-o", out, "--play")
    assert r.exit_code != 0 and "vibevoice-mlx[play]" in r.output
    assert not out.exists()


def test_play_streams_each_chunk_to_the_audio_device(tiny, tmp_path, monkeypatch, forced):
    played = fake_audio_device(monkeypatch)
    r = _say(tiny, "Speaker 1: Hello.", "-o", tmp_path / "p.wav", "--play")
    assert r.exit_code == 0, r.output
    assert played == [(16, 1)] * K + ["stop"]


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_no_audio_at_all_is_an_error_and_leaves_no_file(tiny, tmp_path, monkeypatch, ext):
    monkeypatch.setattr(generation, "greedy", lambda logits, ids: ids[3])  # eos at once: no frame
    out = tmp_path / f"empty.{ext}"
    r = _say(tiny, "Speaker 1: Hello.", "-o", out)
    assert r.exit_code != 0 and "no audio" in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []
