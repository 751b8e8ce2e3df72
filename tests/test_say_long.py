"""Long-form `say`: a script beyond the model's context is spoken in parts; a killed run resumes to the same audio.

The model: a tiny one with the real hop (3200 samples, 7.5 frames/s) and the tiny context (4096), saved as a
converted folder, so the length estimates are those of the real models while every step stays cheap.
"""

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from mlx.utils import tree_flatten

from vibevoice_mlx import generation, loader
from vibevoice_mlx.cli import main
from vibevoice_mlx.fixtures import tiny_config
from vibevoice_mlx.models.vibevoice import Model, ModelConfig

K = 3  # frames forced per part
TURN = ("This is a long turn of the first kind, with words that keep going for a while. It has sentences. "
        "More sentences follow, each one ending cleanly. ")
SCRIPT = "\n".join(f"Speaker {1 + i % 2}: " + TURN * 9 for i in range(6))  # about 5,000 tokens in all


@pytest.fixture(scope="module")
def model_folder(tiny, tmp_path_factory):
    cfg = copy.deepcopy(tiny_config())
    for name in ("acoustic_tokenizer_config", "semantic_tokenizer_config"):
        cfg[name].update(encoder_n_filters=1, decoder_n_filters=1, encoder_ratios=[8, 5, 5, 4, 2, 2],
                         decoder_ratios=[8, 5, 5, 4, 2, 2], encoder_depths="1-1-1-1-1-1-1",
                         decoder_depths="1-1-1-1-1-1-1")
    mx.random.seed(1)
    model = Model(ModelConfig.from_normalized(cfg))
    folder = tmp_path_factory.mktemp("hop3200") / "model"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(dict(cfg, conversion={"dtype": "float32"}), indent=2))
    for f in tiny["tokenizer"].iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def cycling(logits, ids):
    """K frames, speech_end, eos: the same in every part, whoever calls it (a counter of calls)."""
    cycling.n += 1
    i = cycling.n % (K + 2)
    return ids[2] if i < K else ids[1] if i == K else ids[3]


cycling.n = -1


def _say(folder, out, *args):
    return CliRunner().invoke(main, ["say", SCRIPT, "--model", str(folder), "-o", str(out), "--seed", "5",
                                     *map(str, args)])


def test_dry_run_prints_the_parts_without_loading_weights(model_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "build_model", lambda *a, **k: pytest.fail("weights were loaded"))
    r = _say(model_folder, tmp_path / "a.wav", "--dry-run")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("part ")]
    assert len(lines) >= 2 and all("prompt tokens" in line and "ends at:" in line for line in lines)
    assert "speaker turn" in r.output and "min) at an everyday pace" in r.output
    assert list(tmp_path.iterdir()) == []


def test_chunk_off_refuses_a_script_that_does_not_fit(model_folder, tmp_path):
    r = _say(model_folder, tmp_path / "a.wav", "--chunk", "off")
    assert r.exit_code == 1 and "more than the model's context" in r.output, r.output


def test_a_long_script_is_spoken_in_parts(model_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(generation, "greedy", cycling)
    cycling.n = -1
    out = tmp_path / "long.wav"
    r = _say(model_folder, out)
    assert r.exit_code == 0, r.output
    n = int(next(m for m in caplog.messages if "spoken in" in m).split("spoken in ")[1].split()[0])
    assert n >= 2 and sf.info(out).frames == n * K * 3200
    assert not (tmp_path / "long.wav.parts").exists() and not (tmp_path / "long.wav.partial.wav").exists()


RUN = textwrap.dedent(
    """
    import sys, time
    from vibevoice_mlx import generation, cli
    K = 3
    delay, sampling = float(sys.argv[4]), sys.argv[5]
    n = {"i": -1}
    def choose(logits, ids):
        n["i"] += 1
        open(sampling, "w").close()  # the prompt is in: MLX's kernels for it are compiled
        time.sleep(delay)
        i = n["i"] % (K + 2)
        return ids[2] if i < K else ids[1] if i == K else ids[3]
    generation.greedy = choose
    sys.argv = ["vibevoice-mlx", "say", open(sys.argv[1]).read(), "--model", sys.argv[2], "-o", sys.argv[3],
                "--seed", "5"]
    cli.main()
    """
)


def test_a_killed_run_resumes_to_the_same_audio(model_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(generation, "greedy", cycling)
    cycling.n = -1
    straight = tmp_path / "straight.wav"
    assert _say(model_folder, straight).exit_code == 0
    out = tmp_path / "resumed.wav"
    (tmp_path / "script.txt").write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / "script.txt"), str(model_folder), str(out),
                             "0.05", str(tmp_path / "sampling")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "resumed.wav.parts"
    deadline = time.time() + 120
    while time.time() < deadline and not (parts / "part-0002.wav").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (parts / "part-0001.wav").exists() and not out.exists()
    cycling.n = -1
    r = _say(model_folder, out)
    assert r.exit_code == 0, r.output
    assert any("kept from the interrupted run" in m for m in caplog.messages)
    a, _ = sf.read(straight, dtype="float32")
    b, _ = sf.read(out, dtype="float32")
    np.testing.assert_array_equal(a, b)
    assert not parts.exists()


def test_no_resume_starts_over(model_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(generation, "greedy", cycling)
    out = tmp_path / "again.wav"
    parts = tmp_path / "again.wav.parts"
    parts.mkdir()
    (parts / "run.json").write_text("{}")
    (parts / "part-0001.wav").write_bytes(b"stale")
    cycling.n = -1
    r = _say(model_folder, out, "--no-resume")
    assert r.exit_code == 0, r.output
    assert not any("kept from the interrupted run" in m for m in caplog.messages)
    assert sf.info(out).frames % (K * 3200) == 0


def test_interrupted_before_any_audio_leaves_nothing(model_folder, tmp_path):
    (tmp_path / "script.txt").write_text(SCRIPT)
    out = tmp_path / "out" / "never.wav"
    out.parent.mkdir()
    sampling = tmp_path / "sampling"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / "script.txt"), str(model_folder), str(out),
                             "60", str(sampling)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # Not while MLX compiles the prompt's kernels: its system() ignores SIGINT meanwhile (see test_output.py)
    while time.time() < deadline and not sampling.exists():
        time.sleep(0.05)
    assert (out.parent / "never.wav.parts").exists()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "nothing was written" in err, err
    assert list(out.parent.iterdir()) == []


def _full_disk_at(monkeypatch, part: str):
    """Writing `part` (a part file's name) fails as a full disk does."""
    real = sf.SoundFile.write

    def write(self, data):
        if part in str(self.name):  # its partial file, part-0003.wav.partial.wav
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", write)


def test_a_full_disk_keeps_the_parts_and_another_spelling_of_the_model_resumes(model_folder, tmp_path, monkeypatch,
                                                                                 caplog):
    monkeypatch.setattr(generation, "greedy", cycling)
    cycling.n = -1
    out = tmp_path / "full.wav"
    parts = tmp_path / "full.wav.parts"
    with monkeypatch.context() as m:
        _full_disk_at(m, "part-0003.wav")
        r = _say(model_folder, out)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "No space left on device while writing" in r.output and "kept 2 of" in r.output, r.output
    assert not out.exists() and not (tmp_path / "full.wav.partial.wav").exists()
    assert sorted(p.name for p in parts.glob("*.wav")) == ["part-0001.wav", "part-0002.wav"]
    # The same model as ./name/ from its parent folder: the same run, so the finished parts are kept.
    monkeypatch.chdir(model_folder.parent)
    cycling.n = -1
    caplog.clear()
    r = _say(f"./{model_folder.name}/", out)
    assert r.exit_code == 0, r.output
    assert sum("kept from the interrupted run" in m for m in caplog.messages) == 2, caplog.messages
    assert "seed 5)" in r.output and not parts.exists()
    n = int(r.output.split(" parts,")[0].split()[-1])
    assert sf.info(out).frames == n * K * 3200


def test_a_changed_seed_on_resume_is_said(tmp_path, caplog):
    from vibevoice_mlx.longrun import PartStore

    out = tmp_path / "a.wav"
    key = {"script": "s", "voices": [], "model": {"folder": "m"}, "seed": 5, "options": {}, "parts": ["x", "y"]}
    store = PartStore(out, dict(key), resume=True)
    store.path(0).write_bytes(b"done")
    assert PartStore(out, dict(key, seed=None), resume=True).key["seed"] == 5 and store.done(0)  # kept
    assert not caplog.messages
    PartStore(out, dict(key, seed=6), resume=True)
    assert not store.done(0)
    assert any("made with --seed 5, this run has --seed 6" in m and "--seed 5 to continue" in m
               for m in caplog.messages), caplog.messages
    store = PartStore(out, dict(key, seed=6), resume=True)
    store.path(0).write_bytes(b"done")
    caplog.clear()
    PartStore(out, dict(key, seed=6, model={"folder": "other"}), resume=True)
    assert any("different run (other model)" in m for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_piece_too_long_for_the_context_is_refused_before_loading(model_folder, tmp_path, monkeypatch, dry_run):
    """Under the default --chunk auto, a word that cannot be cut and fills the context was called runnable by
    --dry-run and failed only after the weights loaded, telling a user with no voice to shorten the voices."""
    monkeypatch.setattr(loader, "build_model", lambda *a, **k: pytest.fail("weights were loaded"))
    r = CliRunner().invoke(main, ["say", "Speaker 1: Hello. " + "ab1" * 3000, "--model", str(model_folder), "-o",
                                  str(tmp_path / "a.wav"), *(["--dry-run"] if dry_run else [])])
    assert r.exit_code == 1 and "more than the model's context of 4096" in r.output, r.output
    assert "longest word" in r.output and "voice samples" not in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_the_context_error_names_voices_only_when_there_are_some():
    from vibevoice_mlx.errors import UserError
    from vibevoice_mlx.preflight import check_context

    with pytest.raises(UserError, match="use shorter voice samples .* or split the script"):
        check_context([10], 8, 3200, voices=True)
    with pytest.raises(UserError, match="context of 8: split the script.$"):
        check_context([10], 8, 3200, voices=False)
    check_context([7], 8, 3200, voices=False)
