"""Audio in and out: voice clips, output files written while audio is produced, saved voices.

Voices are read with soundfile (libsndfile: WAV, FLAC, OGG, MP3, ...), mixed to mono, resampled to 24 kHz with
libsoxr and normalized to -25 dBFS as the original processor does (architecture.md §5.3).
"""

import logging
import math
import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import soundfile as sf

from .constants import SAMPLE_RATE
from .errors import MissingPathError, OutputExistsError, UserError

logger = logging.getLogger(__name__)

HOP = 3200  # samples per latent frame: product of the acoustic encoder's ratios (7.5 frames/s)

PathLike = Union[str, os.PathLike]

# extension -> (libsndfile major format, subtype). 16-bit PCM is what the original writes.
FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}

# sndfile.h: rewrite the header after every write, so the sizes always match the data written.
_SFC_SET_UPDATE_HEADER_AUTO = 0x1061


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read any file soundfile can read as float32 mono at `sample_rate` (channels averaged, soxr resampling)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"Audio file not found: {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
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


def output_format(path: Path) -> Tuple[str, str]:
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise UserError(f"Cannot write {path}: unknown audio format {ext or '(no extension)'!r}; "
                         f"use one of {', '.join(FORMATS)}.")
    return FORMATS[ext]


def _mono(audio) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim > 1:
        x = x.squeeze()
    if x.ndim > 1:
        raise ValueError(f"Expected mono audio ([T], [1, T] or [T, 1]); got shape {np.shape(audio)}")
    return x.reshape(-1)


def _refuse_overwrite(path: Path, force: bool):
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force (force=True) to overwrite it.")
    if not path.parent.is_dir():
        raise MissingPathError(f"Cannot write {path}: folder {path.parent} does not exist.")


class AudioWriter:
    """Write mono float32 audio chunk by chunk, so that an interrupted run leaves a valid file.

    The format follows the extension (.wav, .flac, .ogg, .mp3). What survives a hard kill (SIGKILL, power cut of
    the process) depends on the format, because libsndfile finalizes compressed files only on close:

    - .wav is written in place, and libsndfile rewrites the RIFF header after every chunk: the file is valid at
      all times and holds every chunk written.
    - .flac, .ogg and .mp3 cannot stay valid that way (FLAC's stream header gets its length only on close; the
      Vorbis and LAME encoders hold back up to seconds of audio). They are streamed to `<path>.partial.wav`
      (float32 WAV, valid at all times as above) and encoded to `path` on `close()`, which also runs when the
      `with` block exits on an exception or Ctrl-C. After a kill, `partial_path` holds everything written.
    """

    def __init__(self, path: PathLike, sample_rate: int = SAMPLE_RATE, force: bool = False,
                 subtype: Optional[str] = None):
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self.format, self.subtype = output_format(self.path)
        self.subtype = subtype or self.subtype
        self.frames = 0
        _refuse_overwrite(self.path, force)
        if self.format == "WAV":
            self.partial_path = None
            stream_path, stream_subtype = self.path, self.subtype
        else:
            self.partial_path = self.path.with_name(self.path.name + ".partial.wav")
            if self.partial_path.exists() and not force:
                raise OutputExistsError(f"{self.partial_path} already exists (left by an interrupted run?); move it "
                                      "away or pass --force (force=True).")
            stream_path, stream_subtype = self.partial_path, "FLOAT"
            logger.info("Writing %s through %s (encoded on close)", self.path, self.partial_path)
        self._file = sf.SoundFile(str(stream_path), "w", self.sample_rate, 1, stream_subtype, format="WAV")
        self._auto_header()

    def _auto_header(self):
        try:
            # soundfile does not expose this command; its cffi handle does (sf_command is part of libsndfile's ABI).
            ok = sf._snd.sf_command(self._file._file, _SFC_SET_UPDATE_HEADER_AUTO, sf._ffi.NULL, sf._snd.SF_TRUE)
        except AttributeError:
            ok = 0
        if not ok:
            logger.warning("Could not make libsndfile update the WAV header as it writes; an interrupted run "
                           "leaves a header that only libsndfile-based readers accept.")

    @property
    def seconds(self) -> float:
        """Seconds of audio written so far."""
        return self.frames / self.sample_rate

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, chunk) -> None:
        """Append a chunk of mono audio (numpy, MLX or anything `np.asarray` takes; [T], [1, T] or [T, 1])."""
        if self._file is None:
            raise ValueError(f"{self.path} is already closed.")
        x = _mono(chunk)
        if x.size:
            self._file.write(x)
            self.frames += x.size

    def close(self) -> None:
        """Finish the file: close the stream and, for compressed formats, encode the partial WAV to `path`."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self.partial_path is not None:
            with sf.SoundFile(str(self.partial_path)) as src, \
                    sf.SoundFile(str(self.path), "w", self.sample_rate, 1, self.subtype, format=self.format) as dst:
                for block in src.blocks(blocksize=1 << 16, dtype="float32"):
                    dst.write(block)
            self.partial_path.unlink()

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()


def write_audio(path: PathLike, audio, sample_rate: int = SAMPLE_RATE, force: bool = False,
                subtype: Optional[str] = None) -> Path:
    """Write a whole mono clip; the format follows the extension (.wav, .flac, .ogg, .mp3)."""
    path = Path(path)
    fmt, default_subtype = output_format(path)
    _refuse_overwrite(path, force)
    x = _mono(audio)
    sf.write(str(path), x, int(sample_rate), subtype=subtype or default_subtype, format=fmt)
    return path


# --- saved voices ---

VOICE_FORMAT = "vibevoice-mlx-voice"
VOICE_FORMAT_VERSION = 1
_VOICE_INT_KEYS = ("format_version", "sample_rate", "hop", "vae_dim", "num_samples")


def save_voice(path: PathLike, latents: np.ndarray, meta: Dict, force: bool = False) -> Path:
    """Save a voice's acoustic latents [T, D] (float32) as a small safetensors file, to reuse without re-encoding.

    meta: "num_samples" (length of the normalized 24 kHz clip) and "model" (an identifier of the model that encoded
    it) are required; "sample_rate" and "hop" default to SAMPLE_RATE and HOP; other str-able entries are kept.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    _refuse_overwrite(path, force)
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
    save_file({"latents": latents}, str(path), metadata=info)
    return path


def load_voice(path: PathLike, vae_dim: Optional[int] = None, hop: Optional[int] = None,
               sample_rate: Optional[int] = None, model: Optional[str] = None) -> Tuple[np.ndarray, Dict]:
    """Load a voice saved by `save_voice` -> (latents [T, D] float32, meta).

    Given expectations (the loaded model's vae_dim, hop, sample rate) must match the file; a different `model`
    identifier only warns: every size has the same acoustic tokenizer configuration, though not necessarily the
    same weights.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"Saved voice not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            info = dict(f.metadata() or {})
            latents = f.get_tensor("latents") if "latents" in f.keys() else None
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise UserError(f"{path} is not a saved voice (cannot read it as safetensors: {e}).") from e
    if info.get("format") != VOICE_FORMAT or latents is None:
        raise UserError(f"{path} is not a saved voice (format {info.get('format')!r}, expected {VOICE_FORMAT!r}).")
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
    if model is not None and meta.get("model") != model:
        logger.warning("%s was saved with model %r; using it with %r.", path, meta.get("model"), model)
    return latents.astype(np.float32, copy=False), meta
