"""What the README tells a newcomer to run or use works: the try-it-without-the-weights commands, run as written,
and every option of `say` is named."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from vibevoice_mlx.say import say

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> str:
    """The fenced code block that follows `<!-- marker -->`."""
    m = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)\n```", README, re.S)
    assert m, f"no code block after <!-- {marker} --> in README.md"
    return m.group(1)


def test_try_without_the_weights_runs_as_written(tmp_path):
    # In a folder laid out as the clone is, with this Python's vibevoice-mlx and python first on PATH.
    shutil.copytree(ROOT / "tests" / "data" / "tiny", tmp_path / "tests" / "data" / "tiny")
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run(["bash", "-e", "-c", _block_after("try-without-weights")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    audio, rate = sf.read(tmp_path / "tiny.wav")
    assert rate == 24000 and audio.shape == (60 * 16,)  # 60 forced frames of the tiny model's 16 samples
    assert "960 samples at 24000 Hz in tiny.wav" in r.stdout and "40 ms of noise" in README


def test_every_option_of_say_is_named():
    for param in say.params:
        if getattr(param, "hidden", False) or not getattr(param, "opts", None):
            continue
        named = [o for o in param.opts if re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", README)]
        assert named, f"README.md names none of {param.opts}"


def test_try_the_tiny_realtime_model_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "tests" / "data" / "realtime_tiny", tmp_path / "tests" / "data" / "realtime_tiny")
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               VIBEVOICE_MLX_CACHE=str(tmp_path / "cache"))  # the .pt is converted into a cache of the test's own
    r = subprocess.run(["bash", "-e", "-c", _block_after("try-realtime-tiny")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("tiny-rt.wav", "tiny-pipe.wav"):
        info = sf.info(tmp_path / name)
        assert info.samplerate == 24000 and 0 < info.frames <= 2 * 24000 and info.frames % 3200 == 0
    assert "10 frames, 1.33 s" in r.stdout
    assert "is a different model and is not" not in README
