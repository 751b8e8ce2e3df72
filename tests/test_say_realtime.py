"""`vibevoice-mlx say` with VibeVoice-Realtime-0.5B: plain text in one voice preset, the demo's defaults, the
refusals (each one line, exit 1, nothing written), and `--stdin` spoken as it arrives. On the tiny realtime model
(tests/data/realtime_tiny) with its stop forced through `windows.default_eos_rule`, as test_say.py forces the
1.5B's frames through `generation.greedy`."""

import logging
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import vibevoice_mlx as vv
from vibevoice_mlx import windows
from vibevoice_mlx.cli import main
from vibevoice_mlx.errors import UserError
from vibevoice_mlx.presets import PresetShape
from vibevoice_mlx.testing import REALTIME_TINY, fake_audio_device
from vibevoice_mlx.audio import save_voice

FRAMES = 4  # frames per run: the forced stop comes after the fourth
MODEL = ["--model", str(REALTIME_TINY / "model"), "--tokenizer", str(REALTIME_TINY / "tokenizer")]
VOICE = str(REALTIME_TINY / "voice.pt")
TEXT = "Hello there, how are you today?"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Converted presets go to a cache of this test's own; nothing may reach the network; main()'s log levels are
    put back."""
    monkeypatch.setenv("VIBEVOICE_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VIBEVOICE_MLX_OFFLINE", "1")
    for name in ("vibevoice_mlx", None):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(windows, "default_eos_rule", lambda frame, probability: frame >= FRAMES - 1)


def say(*args, flags=()):
    return CliRunner().invoke(main, [*flags, "say", *MODEL, *map(str, args)])


@pytest.fixture(scope="module")
def pipe():
    return vv.load(REALTIME_TINY / "model", tokenizer=REALTIME_TINY / "tokenizer")


def test_say_speaks_plain_text_in_a_preset_with_the_demo_defaults(forced, pipe, tmp_path):
    out = tmp_path / "a.wav"
    r = say(TEXT, "--voice", VOICE, "-o", out, "--seed", 7)
    assert r.exit_code == 0, r.output
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and len(audio) == FRAMES * 3200
    assert "seed 7" in r.stderr
    want = vv.generate(pipe, TEXT, VOICE, seed=7, eos_rule=lambda f, p: f >= FRAMES - 1)  # defaults: 5 steps, 1.5
    np.testing.assert_allclose(audio, np.clip(want.audio, -1, 1), atol=2 / 32768)  # 16-bit, clipped
    other = vv.generate(pipe, TEXT, VOICE, seed=7, steps=5, cfg_scale=1.3, eos_rule=lambda f, p: f >= FRAMES - 1)
    assert np.abs(other.audio - want.audio).max() > 1e-3  # cfg 1.5, not the 1.5B's 1.3, is what say used
    again = tmp_path / "b.wav"
    assert say(TEXT, "--voice", VOICE, "-o", again, "--seed", 7, "--steps", 5, "--cfg-scale", 1.5).exit_code == 0
    np.testing.assert_array_equal(sf.read(again, dtype="float32")[0], audio)


def test_max_seconds_stdout_and_dry_run(forced, tmp_path, caplog):
    r = say(TEXT, "--voice", VOICE, "-o", tmp_path / "short.wav", "--max-seconds", 2 * 3200 / 24000)
    assert r.exit_code == 0 and sf.info(tmp_path / "short.wav").frames == 2 * 3200
    assert "Cut short at --max-seconds." in caplog.messages
    r = CliRunner().invoke(main, ["say", *MODEL, TEXT, "--voice", VOICE, "-o", "-"])
    assert r.exit_code == 0 and r.stdout_bytes[:4] == b"RIFF" and len(r.stdout_bytes) == 44 + FRAMES * 3200 * 2
    r = say(TEXT, "--voice", VOICE, "-o", tmp_path / "plan.wav", "--dry-run")
    assert r.exit_code == 0 and "text tokens in voice" in r.stdout and not (tmp_path / "plan.wav").exists()


def test_a_speaker_script_is_warned_about_once(forced, tmp_path, caplog):
    r = say("Speaker 1: Hi.\nSpeaker 2: Hello.\nSpeaker 1: Bye.", "--voice", VOICE, "-o", tmp_path / "s.wav")
    assert r.exit_code == 0
    assert sum("looks like a speaker script" in m for m in caplog.messages) == 1


def test_the_default_voice_needs_the_preset_named(tmp_path):
    """No --voice: the demo's en-Carter_man, which offline and not downloaded is one line naming its URL."""
    r = say(TEXT, "-o", tmp_path / "a.wav")
    assert r.exit_code == 1 and "en-Carter_man" in r.stderr and "https://" in r.stderr
    assert r.stderr.count("\n") == 1 and not list(tmp_path.glob("a.wav*"))


def _wav(tmp_path):
    path = tmp_path / "me.wav"
    sf.write(path, np.zeros(24000, np.float32), 24000)
    return path


def _other_size(tmp_path):
    """The tiny preset re-labelled for a model one layer deeper: what a preset of another size looks like."""
    from test_presets import make_preset

    shape = PresetShape.from_config(vv.load(REALTIME_TINY / "model", tokenizer=REALTIME_TINY / "tokenizer")
                                    .config.raw)
    src = tmp_path / "big.pt"
    make_preset(src, shape=PresetShape(shape.hidden_size, shape.lm_layers + 1, shape.tts_layers, shape.kv_heads,
                                       shape.head_dim))
    return src


def _saved_1_5b(tmp_path):
    return save_voice(tmp_path / "alice.safetensors", np.zeros((1, 8), np.float32), {"num_samples": 3000,
                                                                                       "model": "tiny"})


BAD_VOICES = {
    "wav": (_wav, "cannot take a voice from audio, by design"),
    "other size": (_other_size, "for another model size"),
    "1.5B voice": (_saved_1_5b, "saved for VibeVoice 1.5B/7B"),
}


@pytest.mark.parametrize("kind", BAD_VOICES)
def test_bad_voices_are_refused_in_one_line_with_nothing_written(kind, tmp_path, monkeypatch):
    make, match = BAD_VOICES[kind]
    voice = make(tmp_path)
    loaded = []
    monkeypatch.setattr("vibevoice_mlx.loader.build_model", lambda *a, **k: loaded.append(1))
    out = tmp_path / "out" / "a.wav"
    out.parent.mkdir()
    r = say(TEXT, "--voice", voice, "-o", out)
    assert r.exit_code == 1 and match in r.stderr, r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.output
    assert not loaded and not list(out.parent.iterdir())
    if kind == "wav":
        assert "en-Davis_man" in r.stderr  # the presets are listed


@pytest.mark.parametrize("kind", BAD_VOICES)
def test_bad_voices_are_refused_by_the_api(kind, pipe, tmp_path):
    make, match = BAD_VOICES[kind]
    voice = make(tmp_path)
    with pytest.raises(UserError, match=match) as e:
        vv.generate(pipe, TEXT, [str(voice)])
    assert "\n" not in str(e.value)


def test_the_1_5b_refuses_the_realtime_preset(tiny, tmp_path):
    out = tmp_path / "a.wav"
    r = CliRunner().invoke(main, ["say", "--model", str(tiny["original"]), "--tokenizer", str(tiny["tokenizer"]),
                                  "Speaker 1: Hi.", "--voice", VOICE, "-o", str(out)])
    assert r.exit_code == 1 and "is a VibeVoice-Realtime-0.5B voice preset" in r.stderr
    assert r.stderr.count("\n") == 1 and not list(tmp_path.glob("a.wav*"))


@pytest.mark.parametrize("args, match", [
    (["--voice", VOICE, "--voice", VOICE], "one voice per script"),
    (["--voice", VOICE, "--temperature", "0.7"], "--temperature: only VibeVoice 1.5B/7B"),
    (["--voice", VOICE, "--top-p", "0.9", "--chunk", "off"], "--top-p, --chunk: only VibeVoice 1.5B/7B"),
    (["--voice", VOICE, "--save-voice", "x.safetensors"], "--save-voice: only VibeVoice 1.5B/7B"),
    (["--voice", VOICE, "--backend", "torch"], "no PyTorch implementation"),
    (["--voice", VOICE, "--stdin"], "one of them"),
])
def test_options_that_do_not_apply_are_refused_in_one_line(args, match, tmp_path):
    out = tmp_path / "a.wav"
    r = say(TEXT, *args, "-o", out)
    assert r.exit_code != 0 and match in r.stderr, r.output
    assert "Traceback" not in r.output and not list(tmp_path.glob("a.wav*"))
    assert not (tmp_path / "x.safetensors").exists()


# --- --stdin: the text spoken as it arrives ---

STDIN_RUN = textwrap.dedent(
    """
    import sys
    from vibevoice_mlx import windows, cli
    windows.default_eos_rule = lambda frame, probability: frame >= 23
    sys.argv = ["vibevoice-mlx", "say", "--stdin", "--model", sys.argv[1], "--tokenizer", sys.argv[2], "--voice",
                sys.argv[3], "-o", sys.argv[4], "--seed", "3"]
    cli.main()
    """
)
PIECES = ["Once upon a time, ", "in a land far away, ", "there lived a small ", "robot who loved to sing ",
          "songs about the sea. ", "Every night it sang."]


def test_stdin_is_spoken_as_it_arrives_and_equals_the_whole_text(pipe, tmp_path):
    out = tmp_path / "piped.wav"
    partial = tmp_path / "piped.wav.partial.wav"
    proc = subprocess.Popen([sys.executable, "-c", STDIN_RUN, str(REALTIME_TINY / "model"),
                             str(REALTIME_TINY / "tokenizer"), VOICE, str(out)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        for piece in PIECES[:2]:  # about ten tokens: two windows of text, then it waits
            proc.stdin.write(piece.encode())
            proc.stdin.flush()
            time.sleep(0.2)
        deadline = time.time() + 120  # audio before stdin closes: the partial file holds frames already
        while time.time() < deadline and (not partial.exists() or sf.info(partial).frames == 0):
            time.sleep(0.2)
        assert partial.exists() and sf.info(partial).frames > 0 and proc.poll() is None
        for piece in PIECES[2:]:
            proc.stdin.write(piece.encode())
        proc.stdin.close()
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
    piped, _ = sf.read(out, dtype="float32")
    whole = vv.generate(pipe, "".join(PIECES), VOICE, seed=3, eos_rule=lambda f, p: f >= 23)
    assert len(piped) == 24 * 3200
    np.testing.assert_allclose(piped, np.clip(whole.audio, -1, 1), atol=2 / 32768)  # 16-bit, clipped


def test_stdin_with_the_1_5b_reads_the_whole_script(tiny, tmp_path, monkeypatch):
    from vibevoice_mlx import generation
    from vibevoice_mlx.batch_run import forced_frames

    monkeypatch.setattr(generation, "greedy", forced_frames(2))
    out = tmp_path / "a.wav"
    r = CliRunner().invoke(main, ["say", "--model", str(tiny["original"]), "--tokenizer", str(tiny["tokenizer"]),
                                  "--stdin", "-o", str(out)], input=b"Speaker 1: Hello.")
    assert r.exit_code == 0, r.output
    assert sf.info(out).frames > 0


def test_a_text_past_the_context_is_cut_with_a_warning(tmp_path, monkeypatch, caplog):
    from vibevoice_mlx.models.realtime import RealtimeConfig
    from vibevoice_mlx.testing import realtime_tiny

    _, voice = realtime_tiny(tmp_path)
    limit = voice.tts_length + 40  # a few windows past the preset
    monkeypatch.setattr(RealtimeConfig, "max_positions", property(lambda self: limit))
    monkeypatch.setattr(windows, "default_eos_rule", lambda frame, probability: False)  # only the context stops it
    out = tmp_path / "long.wav"
    r = say("la " * 200, "--voice", VOICE, "-o", out)
    assert r.exit_code == 0, r.output
    assert 0 < sf.info(out).frames < 40 * 3200
    assert any("longer than VibeVoice-Realtime-0.5B's context" in m for m in caplog.messages)


def test_a_run_that_would_not_fit_in_memory_is_refused_before_loading(tmp_path, monkeypatch):
    from vibevoice_mlx import preflight

    monkeypatch.setattr(preflight, "available_bytes", lambda: 100 << 20)  # 100 MB free
    out = tmp_path / "a.wav"
    r = say(TEXT, "--voice", VOICE, "-o", out)
    assert r.exit_code == 1 and "it would swap" in r.stderr and r.stderr.count("\n") == 1
    assert not list(tmp_path.glob("a.wav*"))


def test_play_streams_each_frame_and_formats_follow_the_extension(forced, tmp_path, monkeypatch):
    played = fake_audio_device(monkeypatch)
    r = say(TEXT, "--voice", VOICE, "-o", tmp_path / "p.flac", "--play")
    assert r.exit_code == 0, r.output
    assert played == [(3200, 1)] * FRAMES + ["stop"]
    assert sf.info(tmp_path / "p.flac").format == "FLAC" and sf.info(tmp_path / "p.flac").frames == FRAMES * 3200


def test_stdin_bytes_are_decoded_as_they_come(forced, pipe, tmp_path):
    """A byte-order mark is dropped, as from a file; bytes that are not UTF-8 are one line, and no output."""
    r = CliRunner().invoke(main, ["say", *MODEL, "--stdin", "--voice", VOICE, "-o", str(tmp_path / "bom.wav"),
                                  "--seed", "1"], input="\ufeff".encode() + TEXT.encode())
    assert r.exit_code == 0, r.output
    want = vv.generate(pipe, TEXT, VOICE, seed=1, eos_rule=lambda f, p: f >= FRAMES - 1)
    np.testing.assert_allclose(sf.read(tmp_path / "bom.wav", dtype="float32")[0], np.clip(want.audio, -1, 1),
                               atol=2 / 32768)
    r = CliRunner().invoke(main, ["say", *MODEL, "--stdin", "--voice", VOICE, "-o", str(tmp_path / "bad.wav")],
                           input=b"caf\xe9 " * 3)
    assert r.exit_code == 1 and "stdin is not UTF-8 text" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "bad.wav").exists()  # a failed run leaves the final name alone (output.AudioWriter)
