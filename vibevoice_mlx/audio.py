"""Audio in and out: voice clips, output files written while audio is produced, saved voices.

Voices are read with soundfile (libsndfile: WAV, FLAC, OGG, MP3, ...), mixed to mono, resampled to 24 kHz with
libsoxr and normalized to -25 dBFS as the original processor does (architecture.md §5.3).
"""

import io
import logging
import math
import os
import stat
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import soundfile as sf

from .constants import SAMPLE_RATE
from .errors import MissingPathError, UserError
from .output import FORMATS, AudioWriter, check_output_path, output_format, write_atomically, write_audio  # noqa: F401

logger = logging.getLogger(__name__)

HOP = 3200  # samples per latent frame: product of the acoustic encoder's ratios (7.5 frames/s)

PathLike = Union[str, os.PathLike]

MAX_PIPE_BYTES = 256 << 20  # a voice read from a pipe is held in memory: minutes of audio, not a stream


def check_input_file(path: PathLike, what: str = "Audio file", pipe_ok: bool = True) -> bool:
    """One line unless `path` is a regular file or, with `pipe_ok`, a pipe (a FIFO, or `<(...)` process
    substitution); returns True for a pipe. A device such as /dev/zero is refused without reading from it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingPathError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror or e}.") from None
    if stat.S_ISREG(mode):
        return False
    if stat.S_ISFIFO(mode) and pipe_ok:
        return True
    kind = "a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
        "a pipe, which can be read only once" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
        "a special file"
    raise UserError(f"{what} {path} is {kind}, not a regular file: give an audio file (.wav, .flac, .mp3, ...).")


def _read_pipe(path: Path) -> io.BytesIO:
    """All of a pipe, once, into memory (it cannot be read again), up to MAX_PIPE_BYTES."""
    with open(path, "rb") as f:
        data = f.read(MAX_PIPE_BYTES + 1)
    if len(data) > MAX_PIPE_BYTES:
        raise UserError(f"{path} streams more than {MAX_PIPE_BYTES >> 20} MiB: a voice sample is seconds long; "
                        "save a clip of it to a file.")
    return io.BytesIO(data)


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read any file soundfile can read as float32 mono at `sample_rate` (channels averaged, soxr resampling).
    A pipe (`--voice <(...)`) is read once, whole, into memory."""
    path = Path(path)
    source = _read_pipe(path) if check_input_file(path) else str(path)
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise UserError(f"Cannot read {path} as audio ({e}); formats: {', '.join(sorted(sf.available_formats()))}")
    if data.shape[0] == 0:
        raise UserError(f"{path} contains no audio samples.")
    audio = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return resample(audio, sr, sample_rate)


def resample(audio: np.ndarray, orig_rate: int, new_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of mono float audio (libsoxr "HQ", what librosa's default `soxr_hq` uses)."""
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if orig_rate == new_rate:
        return audio
    import soxr

    return soxr.resample(audio, orig_rate, new_rate, quality="HQ").astype(np.float32, copy=False)


def normalize_voice(audio: np.ndarray, target_db: float = -25.0, eps: float = 1e-6) -> np.ndarray:
    """Scale to `target_db` dBFS RMS, then, if a sample exceeds 1, divide by the peak (architecture.md §5.3)."""
    x = np.asarray(audio, dtype=np.float64)
    rms = math.sqrt(float(np.mean(x * x))) if x.size else 0.0
    x = x * (10.0 ** (target_db / 20.0) / (rms + eps))
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 1.0:
        x = x / (peak + eps)
    return x.astype(np.float32)


def voice_frames(num_samples: int, hop: int = HOP) -> int:
    """Latent frames (speech placeholders in the prompt) for a clip: ceil(num_samples / hop)."""
    return -(-int(num_samples) // hop)


# --- saved voices ---

VOICE_FORMAT = "vibevoice-mlx-voice"
VOICE_FORMAT_VERSION = 1
# The format name of VibeVoice-Realtime-0.5B voice presets (presets.py): named here so that both readers refuse the
# other's files.
REALTIME_VOICE_FORMAT = "vibevoice-mlx-realtime-voice"
_VOICE_INT_KEYS = ("format_version", "sample_rate", "hop", "vae_dim", "num_samples")


def save_voice(path: PathLike, latents: np.ndarray, meta: Dict, force: bool = False) -> Path:
    """Save a voice's acoustic latents [T, D] (float32) as a small safetensors file, to reuse without re-encoding.

    meta: "num_samples" (length of the normalized 24 kHz clip) and "model" (an identifier of the model that encoded
    it) are required; "sample_rate" and "hop" default to SAMPLE_RATE and HOP; other str-able entries are kept.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    check_saved_voice_path(path, force)
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    if latents.ndim != 2:
        raise ValueError(f"Voice latents must be [frames, dim]; got shape {latents.shape}")
    missing = [k for k in ("num_samples", "model") if k not in meta]
    if missing:
        raise ValueError(f"save_voice needs meta entries {missing}")
    info = {k: str(v) for k, v in meta.items()}
    info.update(format=VOICE_FORMAT, format_version=str(VOICE_FORMAT_VERSION),
                sample_rate=str(meta.get("sample_rate", SAMPLE_RATE)), hop=str(meta.get("hop", HOP)),
                vae_dim=str(latents.shape[1]), num_samples=str(int(meta["num_samples"])), model=str(meta["model"]))
    expected = voice_frames(int(info["num_samples"]), int(info["hop"]))
    if latents.shape[0] != expected:
        raise ValueError(f"{latents.shape[0]} latent frames do not match {info['num_samples']} samples "
                         f"(expected {expected} with hop {info['hop']}).")
    return write_atomically(path, lambda tmp: save_file({"latents": latents}, str(tmp), metadata=info))


def realtime_preset_error(voice) -> UserError:
    """The refusal of a VibeVoice-Realtime-0.5B preset (a name, a .pt or its .safetensors) given to 1.5B/7B."""
    return UserError(f"{voice} is a VibeVoice-Realtime-0.5B voice preset, which VibeVoice 1.5B/7B cannot use: give an "
                     "audio clip of the voice, or a voice saved with --save-voice.")


def check_saved_voice_path(path: PathLike, force: bool = False) -> Path:
    """Where a saved voice may be written: a `.safetensors` name in a writable folder, not over a file without
    `force`."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"A saved voice is a .safetensors file: name it {path.with_suffix('.safetensors').name} "
                        f"instead of {path.name}.")
    return check_output_path(path, force, what="saved voice")


def load_voice(path: PathLike, vae_dim: Optional[int] = None, hop: Optional[int] = None,
               sample_rate: Optional[int] = None, model: Optional[str] = None) -> Tuple[np.ndarray, Dict]:
    """Load a voice saved by `save_voice` -> (latents [T, D] float32, meta).

    Given expectations (the loaded model's vae_dim, hop, sample rate) must match the file. `model` is the
    fingerprint of the loaded model's acoustic encoder (`meta["encoder"]` of voices it saves): a voice encoded by
    another model's encoder warns, since its latents do not mean the same to this one.
    """
    from safetensors import safe_open

    path = Path(path)
    check_input_file(path, "Saved voice", pipe_ok=False)
    try:
        with safe_open(str(path), framework="numpy") as f:
            info = dict(f.metadata() or {})
            latents = f.get_tensor("latents") if "latents" in f.keys() else None
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise UserError(f"{path} is not a saved voice (cannot read it as safetensors: {e}).") from e
    if info.get("format") == REALTIME_VOICE_FORMAT:
        raise realtime_preset_error(path)
    if info.get("format") != VOICE_FORMAT:
        raise UserError(f"{path} is not a saved voice (format {info.get('format')!r}, expected {VOICE_FORMAT!r}).")
    if latents is None:
        raise UserError(f"{path} is a saved voice without its 'latents' tensor: the file is damaged; save the voice "
                        "again from its audio.")
    try:
        meta: Dict = {**info, **{k: int(info[k]) for k in _VOICE_INT_KEYS}}
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: saved voice metadata is incomplete or invalid ({e}).") from e
    if meta["format_version"] > VOICE_FORMAT_VERSION:
        raise UserError(f"{path} uses saved-voice format version {meta['format_version']}; this vibevoice-mlx "
                         f"reads up to {VOICE_FORMAT_VERSION}. Upgrade vibevoice-mlx or re-save the voice.")
    if latents.ndim != 2 or latents.shape[1] != meta["vae_dim"] or \
            latents.shape[0] != voice_frames(meta["num_samples"], meta["hop"]):
        raise UserError(f"{path}: latents of shape {latents.shape} do not match the metadata "
                         f"(vae_dim {meta['vae_dim']}, {meta['num_samples']} samples, hop {meta['hop']}).")
    for key, want in (("vae_dim", vae_dim), ("hop", hop), ("sample_rate", sample_rate)):
        if want is not None and meta[key] != int(want):
            raise UserError(f"{path} was saved with {key} {meta[key]} but the model needs {want}; re-save the "
                             "voice with this model.")
    if model is not None and meta.get("encoder") not in (None, model):
        logger.warning("%s was encoded by another model (%r) than the one loaded: its latents do not mean the same "
                       "to this model's; re-save it from the audio with this model.", path, meta.get("model"))
    return latents.astype(np.float32, copy=False), meta
