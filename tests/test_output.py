"""Nothing lost, nothing half-written: interrupted, concurrent and failing runs of `say`, and output paths checked
before any work."""

import errno
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

from vibevoice_mlx import generation, loader
from vibevoice_mlx.cli import main
from vibevoice_mlx.errors import Interrupted
from vibevoice_mlx.output import AudioWriter

RUN = textwrap.dedent(
    """
    import sys, time
    from vibevoice_mlx import generation, cli
    delay, sampling = float(sys.argv[4]), sys.argv[5]
    def choose(logits, ids):
        open(sampling, "w").close()  # the prompt is in: MLX's kernels for it are compiled
        time.sleep(delay)
        return ids[2]  # speech_diffusion, forever: only a signal ends this run
    generation.greedy = choose
    # --chunk off: one part that never ends (the tiny model's 16-sample hop would split a long script)
    sys.argv = ["vibevoice-mlx", "say", "Speaker 1: " + "la " * 400, "--model", sys.argv[1], "--tokenizer",
                sys.argv[2], "-o", sys.argv[3], "--chunk", "off"]
    cli.main()
    """
)


def _start(tiny, out, delay, sampling):
    return subprocess.Popen([sys.executable, "-c", RUN, str(tiny["original"]), str(tiny["tokenizer"]), str(out),
                             str(delay), str(sampling)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)


def _wait_for(path, size, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and (not path.exists() or path.stat().st_size < size):
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_keeps_what_was_made_under_the_final_name(tiny, tmp_path, sig):
    out = tmp_path / "talk.flac"
    proc = _start(tiny, out, 0.02, tmp_path / "sampling")
    _wait_for(tmp_path / "talk.flac.partial.wav", 44 + 4 * 16 * 10)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"Interrupted ({signal.Signals(sig).name})" in err and "Traceback" not in err
    info = sf.info(out)
    assert info.format == "FLAC" and info.frames >= 10 * 16 and info.frames % 16 == 0
    assert not (tmp_path / "talk.flac.partial.wav").exists()


def test_a_signal_before_the_first_frame_leaves_nothing(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    out, sampling = tmp_path / "out" / "nothing.wav", tmp_path / "sampling"
    proc = _start(tiny, out, 60, sampling)  # the first token choice never returns in time
    # Not while MLX compiles the prompt's kernels: on the CPU it runs the compiler through system(), which ignores
    # SIGINT while it runs (a Ctrl-C then is lost; a second one works). The README says so.
    _wait_for(sampling, 0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "nothing was written" in err, err
    assert list(out.parent.iterdir()) == []


def _say(tiny, *args):
    return CliRunner().invoke(main, ["say", "Speaker 1: Hello.", "--model", str(tiny["original"]), "--tokenizer",
                                     str(tiny["tokenizer"]), *map(str, args)])


def test_a_second_writer_of_the_same_path_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "greedy", lambda logits, ids: ids[2])
    out = tmp_path / "busy.wav"
    with AudioWriter(out) as w:  # another run, writing
        w.write(np.ones(16, np.float32))
        r = _say(tiny, "-o", out, "--force", "--max-seconds", 0.002)
        assert r.exit_code == 1 and "Another run is writing" in r.output, r.output
    assert sf.info(out).frames == 16  # the first writer's file, whole


def test_a_signal_while_loading_ends_with_its_status_and_no_traceback(tiny, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(loader, "load", interrupted)
    r = _say(tiny, "-o", tmp_path / "a.wav")
    assert r.exit_code == 143 and "Interrupted (SIGTERM) while loading the model" in r.output, r.output
    assert not isinstance(r.exception, Interrupted) and list(tmp_path.iterdir()) == []


def test_an_interruption_is_not_swallowed_by_except_exception():
    """The signal handler raises wherever the main thread is, inside any `except Exception` of a library."""
    try:
        try:
            raise Interrupted(signal.SIGINT)
        except Exception:  # noqa: BLE001
            pytest.fail("an `except Exception` caught the interruption")
    except Interrupted as e:
        assert e.status == 130


@pytest.fixture
def no_load(monkeypatch):
    """Checks must come before the model is loaded: loading is an error here."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loader, "load", refuse)
    monkeypatch.setattr(loader, "build_model", refuse)


@pytest.mark.parametrize("case", ["missing folder", "read-only folder", "folder as output", "save-voice wav",
                                  "save-voice missing folder", "save-voice from saved voice", "corrupt voice",
                                  "silent voice", "nan voice", "too few voices", "text and file", "bad seed",
                                  "huge pause", "nan cfg"])
def test_bad_input_is_refused_before_loading_and_leaves_nothing(tiny, tmp_path, no_load, case, monkeypatch):
    good = tmp_path / "voice.wav"
    sf.write(good, 0.2 * np.random.default_rng(0).standard_normal(24000).astype(np.float32), 24000)
    ro = tmp_path / "ro"
    ro.mkdir()
    args = {
        "missing folder": ["-o", tmp_path / "nope" / "a.wav"],
        "read-only folder": ["-o", ro / "a.wav"],
        "folder as output": ["-o", ro],
        "save-voice wav": ["--voice", good, "--save-voice", tmp_path / "v.wav", "-o", tmp_path / "a.wav"],
        "save-voice missing folder": ["--voice", good, "--save-voice", tmp_path / "no" / "v.safetensors"],
        "save-voice from saved voice": ["--voice", tmp_path / "x.safetensors", "--save-voice", tmp_path / "y.safetensors"],
        "corrupt voice": ["--voice", tmp_path / "corrupt.wav"],
        "silent voice": ["--voice", tmp_path / "silent.wav"],
        "nan voice": ["--voice", tmp_path / "nan.wav"],
        "too few voices": ["--voice", good],
        "text and file": ["--file", good],
        "bad seed": ["--seed", -1],
        "huge pause": [],
        "nan cfg": ["--cfg-scale", "nan"],
    }[case]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "x.safetensors").write_bytes(b"not a voice")
    sf.write(tmp_path / "silent.wav", np.zeros(24000, np.float32), 24000)
    sf.write(tmp_path / "nan.wav", np.full(24000, np.nan, np.float32), 24000, subtype="FLOAT")
    if case == "read-only folder":
        ro.chmod(0o500)
        real_access = os.access  # root ignores permission bits: answer as for anyone else
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    script = {"too few voices": "Speaker 1: Hi.\nSpeaker 2: Hello.",
              "huge pause": "Speaker 1: Hi [pause:99999s] there."}.get(case, "Speaker 1: Hello.")
    before = set(tmp_path.rglob("*"))
    r = CliRunner().invoke(main, ["say", script, "--model", str(tiny["original"]), "--tokenizer",
                                  str(tiny["tokenizer"]), *map(str, args)])
    assert r.exit_code in (1, 2) and isinstance(r.exception, SystemExit), (case, r.output, r.exception)
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert set(tmp_path.rglob("*")) == before, case
    os.write(1, f"[refused] {case}: {errors[0]}\n".encode())


def test_a_second_run_on_the_same_output_is_refused_before_loading(tiny, tmp_path, no_load):
    out = tmp_path / "busy.wav"
    with AudioWriter(out) as w:  # another run, writing
        w.write(np.ones(16, np.float32))
        r = _say(tiny, "-o", out, "--force")
        assert r.exit_code == 1 and "Another run is writing" in r.output, r.output
    assert sf.info(out).frames == 16


def _fill_disk(monkeypatch, after: int = 2):
    """Writes fail with ENOSPC after `after` chunks, as on a full disk (no root or tmpfs needed)."""
    real = sf.SoundFile.write
    calls = {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", write)


@pytest.mark.parametrize("ext", [".wav", ".mp3"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch, ext):
    monkeypatch.setattr(generation, "greedy", lambda logits, ids: ids[2])
    _fill_disk(monkeypatch)
    out = tmp_path / f"full{ext}"
    r = _say(tiny, "-o", out, "--max-seconds", 0.01)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"No space left on device while writing {out}; nothing was written." in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_a_failing_writer_never_puts_its_file_under_the_final_name(tmp_path):
    out = tmp_path / "bug.wav"
    with pytest.raises(ZeroDivisionError):
        with AudioWriter(out) as w:
            w.write(np.ones(16, np.float32))
            1 / 0  # a bug mid-run
    assert not out.exists() and sf.info(w.partial_path).frames == 16  # kept aside, valid, for a look
    with AudioWriter(out, force=True) as w:  # and replaced by the next run
        w.write(np.ones(8, np.float32))
    assert sf.info(out).frames == 8 and not w.partial_path.exists()


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_a_real_full_disk(tiny, tmp_path, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)]).returncode:
        pytest.skip("this container cannot mount a tmpfs")
    try:
        monkeypatch.setattr(generation, "greedy", lambda logits, ids: ids[2])
        for name in ("full.wav", "full.mp3"):  # about 800 frames of 16 samples: more than 16 KB
            r = CliRunner().invoke(main, ["say", "Speaker 1: " + "la " * 400, "--model", str(tiny["original"]),
                                          "--tokenizer", str(tiny["tokenizer"]), "-o", str(full / name),
                                          "--chunk", "off"])
            assert r.exit_code == 1 and "No space left on device" in r.output, r.output
            assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)])
