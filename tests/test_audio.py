"""Voice loading (resampling, mono, -25 dBFS), streaming output files that survive a kill, saved voices."""

import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap
import wave

import numpy as np
import pytest
import soundfile as sf

from vibevoice_mlx.audio import (AudioWriter, load_audio, load_voice, normalize_voice, save_voice, voice_frames,
                                 write_audio)

SR = 24000


def sine(freq, seconds, sr, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()]


# --- loading voices ---


@pytest.mark.parametrize("sr", [16000, 44100])
def test_resample_to_24k_keeps_length_and_pitch(tmp_path, sr):
    path = tmp_path / f"in{sr}.wav"
    sf.write(path, sine(1000, 1.0, sr), sr, subtype="FLOAT")
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert len(x) == SR  # 1 s in, 1 s out
    assert abs(peak_hz(x, SR) - 1000) <= 1.0


def test_resampler_is_band_limited(tmp_path):
    # 15 kHz is above the 12 kHz Nyquist of 24 kHz: a proper resampler removes it instead of aliasing it to 9 kHz.
    path = tmp_path / "hf.wav"
    sf.write(path, sine(15000, 1.0, 44100) + sine(3000, 1.0, 44100), 44100, subtype="FLOAT")
    x = load_audio(path)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    alias = spec[np.abs(freqs - 9000) < 50].max()
    tone = spec[np.abs(freqs - 3000) < 50].max()
    assert alias < 1e-3 * tone, (alias, tone)


def test_stereo_is_averaged(tmp_path):
    rng = np.random.default_rng(0)
    left, right = (rng.uniform(-0.5, 0.5, 4800).astype(np.float32) for _ in range(2))
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-7)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(ValueError, match="bad.wav"):
        load_audio(bad)


def test_normalize_to_minus_25_dbfs():
    x = np.random.default_rng(1).normal(0, 0.01, 48000).astype(np.float32)
    y = normalize_voice(x)
    assert y.dtype == np.float32
    rms_db = 20 * np.log10(np.sqrt(np.mean(y.astype(np.float64) ** 2)))
    assert abs(rms_db + 25) < 1e-3, rms_db
    np.testing.assert_allclose(y / x, y[0] / x[0], rtol=1e-5)  # a pure gain


def test_normalize_peak_rule():
    # A lone spike: the -25 dBFS gain pushes it above 1, so the clip is divided by (peak + 1e-6).
    x = np.full(24000, 1e-3, dtype=np.float32)
    x[100] = 0.9
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
    scaled = x * 10 ** (-25 / 20) / (rms + 1e-6)
    assert np.abs(scaled).max() > 1
    want = scaled / (np.abs(scaled).max() + 1e-6)
    y = normalize_voice(x)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    assert 1 - 2e-6 < np.abs(y).max() < 1


def test_voice_frames():
    assert [voice_frames(n) for n in (0, 1, 3200, 3201, 79200, 120000)] == [0, 1, 1, 2, 25, 38]
    assert voice_frames(33, hop=16) == 3


# --- writing ---


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_writer_round_trip(tmp_path, ext):
    x = sine(440, 1.0, SR)
    path = tmp_path / f"out.{ext}"
    with AudioWriter(path) as w:
        for i in range(0, len(x), 3200):
            w.write(x[i:i + 3200])
        assert w.seconds == pytest.approx(1.0)
    assert not (tmp_path / f"out.{ext}.partial.wav").exists()
    y, sr = sf.read(path, dtype="float32")
    assert sr == SR and y.ndim == 1 and len(y) == len(x)
    if ext in ("wav", "flac"):  # 16-bit PCM: error within one quantization step
        assert np.abs(y - x).max() <= 1 / 32768
    else:  # lossy: same tone, nearly the same waveform
        assert abs(peak_hz(y, SR) - 440) <= 1.0
        assert np.corrcoef(x, y)[0, 1] > 0.99


def test_writer_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"\.aiff.*\.wav, \.flac, \.ogg, \.mp3"):
        AudioWriter(tmp_path / "out.aiff")
    with pytest.raises(ValueError, match="no extension"):
        write_audio(tmp_path / "out", np.zeros(10))


@pytest.mark.parametrize("ext", ["wav", "mp3"])
def test_overwrite_refused(tmp_path, ext):
    path = tmp_path / f"old.{ext}"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=rf"old\.{ext}.*--force"):
        AudioWriter(path)
    with pytest.raises(FileExistsError, match="--force"):
        write_audio(path, np.zeros(100))
    assert path.read_bytes() == b"precious"
    with AudioWriter(path, force=True) as w:
        w.write(np.zeros(2400))
    assert sf.info(path).frames == 2400
    write_audio(path, np.zeros(4800), force=True)
    assert sf.info(path).frames == 4800


def test_compressed_output_finished_on_exception(tmp_path):
    path = tmp_path / "out.ogg"
    with pytest.raises(KeyboardInterrupt):
        with AudioWriter(path) as w:
            w.write(sine(440, 0.5, SR))
            raise KeyboardInterrupt
    assert sf.info(path).frames == SR // 2 and not w.partial_path.exists()


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from vibevoice_mlx.audio import AudioWriter
    w = AudioWriter(sys.argv[1])
    for k in range(int(sys.argv[2])):
        w.write(np.full(3200, (k + 1) / 16, dtype=np.float32))
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_killed_writer_leaves_valid_file(tmp_path, ext):
    path = tmp_path / f"killed.{ext}"
    chunks = 5
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(chunks)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    # Every format streams to a WAV beside the output, moved or encoded into place only on close (AudioWriter):
    # after a kill the final name holds nothing, the partial file everything written.
    valid = tmp_path / f"killed.{ext}.partial.wav"
    assert not path.exists()
    want = np.repeat(np.arange(1, chunks + 1) / 16, 3200).astype(np.float32)
    y, sr = sf.read(valid, dtype="float32")
    assert sr == SR and len(y) == len(want)
    assert np.abs(y - want).max() <= 1 / 32768
    # The RIFF header itself holds the right sizes, not just what libsndfile tolerates.
    riff_size = int.from_bytes(Path(valid).read_bytes()[4:8], "little")
    assert os.path.getsize(valid) == riff_size + 8
    if ext == "wav":  # the partial of a WAV is the final file's format already
        with wave.open(str(valid)) as wf:
            assert wf.getnframes() == len(want)


# --- saved voices ---


def test_saved_voice_round_trip(tmp_path):
    latents = np.random.default_rng(2).normal(size=(38, 8)).astype(np.float32)
    path = save_voice(tmp_path / "alice.safetensors", latents, {"num_samples": 120000, "model": "tiny-test",
                                                                "source": "alice.wav"})
    got, meta = load_voice(path, vae_dim=8, hop=3200, sample_rate=24000, model="tiny-test")
    np.testing.assert_array_equal(got, latents)
    assert got.dtype == np.float32
    assert {k: meta[k] for k in ("format_version", "sample_rate", "hop", "vae_dim", "num_samples", "model",
                                 "source")} == {"format_version": 1, "sample_rate": 24000, "hop": 3200, "vae_dim": 8,
                                                "num_samples": 120000, "model": "tiny-test", "source": "alice.wav"}
    with pytest.raises(FileExistsError, match="--force"):
        save_voice(path, latents, {"num_samples": 120000, "model": "x"})
    save_voice(path, latents[:1], {"num_samples": 3000, "model": "x"}, force=True)
    assert load_voice(path)[0].shape == (1, 8)


def test_saved_voice_mismatch(tmp_path):
    from safetensors.numpy import save_file

    latents = np.zeros((25, 8), dtype=np.float32)
    path = save_voice(tmp_path / "v.safetensors", latents, {"num_samples": 79200, "model": "m"})
    with pytest.raises(ValueError, match="vae_dim 8 but the model needs 64"):
        load_voice(path, vae_dim=64)
    with pytest.raises(ValueError, match="hop 3200 but the model needs 16"):
        load_voice(path, hop=16)
    with pytest.raises(ValueError, match="do not match 81000 samples"):
        save_voice(tmp_path / "w.safetensors", latents, {"num_samples": 81000, "model": "m"})

    other = tmp_path / "other.safetensors"
    save_file({"latents": latents}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a saved voice"):
        load_voice(other)
    future = tmp_path / "future.safetensors"
    save_file({"latents": latents}, str(future), metadata={
        "format": "vibevoice-mlx-voice", "format_version": "2", "sample_rate": "24000", "hop": "3200",
        "vae_dim": "8", "num_samples": "79200", "model": "m"})
    with pytest.raises(ValueError, match="format version 2"):
        load_voice(future)
    wav = tmp_path / "voice.wav"
    sf.write(wav, np.zeros(100), SR)
    with pytest.raises(ValueError, match="not a saved voice"):
        load_voice(wav)


def test_a_saved_voice_without_latents_says_so(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "v.safetensors"
    save_file({"other": np.zeros((2, 8), np.float32)}, str(path), metadata={"format": "vibevoice-mlx-voice"})
    with pytest.raises(ValueError, match="saved voice without its 'latents' tensor") as e:
        load_voice(path)
    assert "expected" not in str(e.value)


@pytest.mark.parametrize("case, message", [("folder", "is a folder, not a regular file"),
                                           ("/dev/zero", "is a device, not a regular file"),
                                           ("missing", "Voice file not found")])
def test_a_voice_that_is_not_a_file_says_what_it_is(tmp_path, case, message):
    from vibevoice_mlx.errors import UserError
    from vibevoice_mlx.voices import read_voice

    path = {"folder": tmp_path, "/dev/zero": Path("/dev/zero"), "missing": tmp_path / "nothing.wav"}[case]
    with pytest.raises(UserError, match=message):
        read_voice(str(path))  # /dev/zero: refused without reading from it (it would never end)


@pytest.mark.parametrize("ext", [".wav", ".flac"])
def test_a_voice_from_a_pipe_is_read_once_into_memory(tmp_path, ext):
    """`--voice <(sox ...)` hands over a pipe: it is read whole, once, as the file it carries."""
    import threading

    from vibevoice_mlx.voices import read_voice

    clip = tmp_path / ("clip" + ext)
    sf.write(clip, sine(220, 0.5, 16000), 16000)
    fifo = tmp_path / "voice.pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(clip.read_bytes()), daemon=True)
    writer.start()
    got = read_voice(str(fifo))
    writer.join(timeout=10)
    np.testing.assert_array_equal(got, read_voice(str(clip)))


def test_a_pipe_longer_than_a_voice_is_refused(tmp_path, monkeypatch):
    import threading

    from vibevoice_mlx import audio

    monkeypatch.setattr(audio, "MAX_PIPE_BYTES", 1000)
    fifo = tmp_path / "voice.pipe"
    os.mkfifo(fifo)

    def feed():
        try:
            with open(fifo, "wb") as f:
                f.write(b"\0" * 5000)
        except BrokenPipeError:  # the reader stopped at its limit: expected
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with pytest.raises(ValueError, match="streams more than"):
        load_audio(fifo)
    writer.join(timeout=10)


def test_say_takes_a_voice_from_process_substitution(tiny, tmp_path):
    import threading

    from click.testing import CliRunner

    from vibevoice_mlx.cli import main

    clip = tmp_path / "clip.wav"
    sf.write(clip, sine(220, 1.0, SR), SR)
    fifo = tmp_path / "voice.pipe"  # what `--voice <(cat clip.wav)` hands over
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(clip.read_bytes()), daemon=True)
    writer.start()
    r = CliRunner().invoke(main, ["say", "Speaker 1: Hi.", "--voice", str(fifo), "--model", str(tiny["original"]),
                                  "--tokenizer", str(tiny["tokenizer"]), "--dry-run"])
    writer.join(timeout=10)
    assert r.exit_code == 0 and "Error" not in r.output, r.output
