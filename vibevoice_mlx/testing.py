"""Helpers shared by tests/ and parity_tests/: the cached tiny checkpoint and `assert_close`."""

import os
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

_BUILT: Dict[tuple, Dict[str, Path]] = {}
# The committed tiny fixture, where the tests of a source checkout find it.
COMMITTED_TINY = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny"
# The tiny realtime model, its tokenizer and preset, and what Microsoft's code computed on them
# (parity_tests/realtime_reference.py; tests/data/realtime_tiny/README.md).
REALTIME_TINY = COMMITTED_TINY.parent / "realtime_tiny"


def tiny_checkpoint(root: Path = None, seed: int = 0, dtype: str = "float32", tie: bool = None,
                    committed: Optional[Path] = None) -> Dict[str, Path]:
    """The tiny fixture in both layouts (once per process and arguments); returns {layout: folder}.

    The default one (seed 0, float32, tied) is copied from `committed` (tests/data/tiny: the original layout and
    the tokenizer, as `python -m vibevoice_mlx.fixtures` writes them) and its transformers layout derived without
    torch; other variants are built, which needs the torch extra.
    """
    from .fixtures import build, transformers_layout

    key = (seed, dtype, tie)
    if key not in _BUILT:
        root = Path(root or tempfile.mkdtemp(prefix="vv-tiny-"))
        out = root / f"seed{seed}-{dtype}-{tie}"
        if key == (0, "float32", None) and committed is not None and Path(committed).is_dir():
            import shutil

            folders = {name: Path(shutil.copytree(Path(committed) / name, out / name))
                       for name in ("original", "tokenizer")}
            folders["transformers"] = transformers_layout(folders["original"], out / "transformers",
                                                          folders["tokenizer"])
            _BUILT[key] = folders
        else:
            _BUILT[key] = build(out, "tiny", seed=seed, dtype=dtype, tie=tie)
    return _BUILT[key]


def realtime_tiny(tmp: Path, folder: Optional[Path] = None, dtype: str = "float32"):
    """The tiny realtime model (or `folder`, a conversion of it) in `dtype` as a pipeline, and its voice preset read
    from the reference's .pt through the restricted reader and the saved-voice format (as a user's preset goes):
    (pipe, voice)."""
    from .loader import load
    from .presets import PresetShape, convert_pt, load_preset

    tokenizer = None if folder is not None else REALTIME_TINY / "tokenizer"  # a converted folder bundles it
    pipe = load(folder or REALTIME_TINY / "model", dtype=dtype, tokenizer=tokenizer)
    path = Path(tmp) / "voice.safetensors"
    convert_pt(REALTIME_TINY / "voice.pt", path)
    return pipe, load_preset(path, shape=PresetShape.from_config(pipe.config.raw))


def realtime_golden_run(model, voice, name: str, dtype=None):
    """Golden run `name` of tests/data/realtime_tiny replayed on `model` (the reference's injected noise and forced
    stop; `dtype` the compute dtype, float32 unless given): (audio, reference audio, EOS probabilities the stop
    rule saw, the reference's), each over the kept frames."""
    import json

    import mlx.core as mx

    from .windows import TextIds, windows

    spec = json.loads((REALTIME_TINY / "golden.json").read_text())["runs"][name]
    run = {k: np.array(v) for k, v in mx.load(str(REALTIME_TINY / f"run_{name}.safetensors")).items()}
    stop, probs = spec["stop_frame"], []

    def rule(f, p):
        probs.append(p)
        return f >= stop

    noise = mx.array(run["noise"])
    audio = list(windows(model, voice, TextIds(run["text_ids"].tolist(), closed=True), lambda f: noise[f], rule,
                         cfg_scale=spec["cfg_scale"], steps=spec["steps"], dtype=dtype or mx.float32))
    assert len(audio) == spec["frames_kept"] == stop + 1, (len(audio), spec["frames_kept"], stop)
    got = np.concatenate([np.array(a.astype(mx.float32)) for a in audio])
    return got, run["audio_chunks"][: stop + 1].reshape(-1), np.array(probs), run["eos_prob"][: len(probs)]


REALTIME_RUNS = ("demo", "multiple5", "midwindow")  # the golden runs (tests/data/realtime_tiny/golden.json)


def to_numpy(x) -> np.ndarray:
    """float64 numpy copy of an MLX array, torch tensor or array-like (bf16 included)."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy().astype(np.float64)
    try:
        import mlx.core as mx

        if isinstance(x, mx.array):
            return np.array(x.astype(mx.float32)).astype(np.float64)
    except ImportError:
        pass
    return np.asarray(x, dtype=np.float64)


def assert_close(name: str, got, want, atol: float, rtol: float = 0.0) -> float:
    """Assert |got - want| <= atol + rtol * |want| everywhere; report max abs/rel error and where.

    Returns the max abs error so callers can record it. Prints one line per call (shown with `pytest -s` and in
    failure output), so observed errors can be copied into parity_tests/README.md.
    """
    g, w = to_numpy(got), to_numpy(want)
    assert g.shape == w.shape, f"{name}: shape {g.shape} != expected {w.shape}"
    assert np.all(np.isfinite(g)), f"{name}: non-finite values in result"
    diff = np.abs(g - w)
    err = float(diff.max()) if diff.size else 0.0
    where = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
    rel = float((diff / (np.abs(w) + 1e-12)).max()) if diff.size else 0.0
    scale = float(np.abs(w).max()) if w.size else 0.0
    line = (f"[parity] {name}: max_abs={err:.3e} at {tuple(int(i) for i in where)} max_rel={rel:.3e} "
            f"signal_max={scale:.3e} (atol={atol:g}, rtol={rtol:g})")
    print(line)
    if os.environ.get("VIBEVOICE_PARITY_LOG"):
        with open(os.environ["VIBEVOICE_PARITY_LOG"], "a") as f:
            f.write(line + "\n")
    bad = diff > atol + rtol * np.abs(w)
    assert not bad.any(), f"{line}: {int(bad.sum())} of {bad.size} values out of tolerance"
    return err


def snr_db(got, want) -> float:
    """Signal-to-noise ratio of `got` against reference `want`, in dB."""
    g, w = to_numpy(got), to_numpy(want)
    noise = np.sum((g - w) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(w**2) / noise))


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_hub(monkeypatch, cache: Path) -> None:
    """An empty (or fake) Hugging Face cache at `cache`, in offline mode: nothing may touch the network."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def cache_repo(cache: Path, repo: str, files_from: Path) -> Path:
    """Put a folder into the fake hub cache as `repo` at `HUB_COMMIT` (refs/main); returns the snapshot."""
    import shutil

    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / HUB_COMMIT
    shutil.copytree(files_from, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    return snapshot


# The BLAS libraries batch-invariance tests run under: the system ones the command loads, and the wheel's own.
BLAS_KINDS = ("blis", "openblas", "wheel")


def system_blas(kind: str):
    """(library path or None for the wheel's, its name as blas.active_blas reports it); a system library that is
    missing skips the test locally and fails it in CI, which installs both (.ci/run)."""
    import pytest

    from . import blas

    if kind == "wheel":
        return None, "reference BLAS (bundled with mlx[cpu])"
    name = {"blis": "BLIS", "openblas": "OpenBLAS"}[kind]
    library = blas.find_system_blas(kind)
    if library is None:
        if not os.environ.get("CI"):
            pytest.skip(f"no system {name} (apt-get install libblis4-pthread libopenblas0-pthread)")
        pytest.fail(f"no system {name}: CI must install it")
    return library, name


def run_under_blas(code: str, library: Optional[str]) -> dict:
    """Run `code` in a fresh interpreter that loads `library` as the command does (None: the wheel's BLAS), from
    the repository root; returns the JSON its last line prints."""
    import json
    import subprocess
    import sys

    from . import blas

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV, blas.GUARD_ENV)}
    if library is None:
        env[blas.ENV] = "off"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=COMMITTED_TINY.parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def fake_audio_device(monkeypatch) -> list:
    """A `sounddevice` whose output stream records the shape of every block written (and "stop"), for --play."""
    import sys
    import types

    played = []

    class Stream:
        def __init__(self, samplerate, channels, dtype):
            assert (samplerate, channels, dtype) == (24000, 1, "float32")

        def start(self):
            pass

        def write(self, block):
            played.append(block.shape)

        def stop(self):
            played.append("stop")

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(OutputStream=Stream))
    return played
