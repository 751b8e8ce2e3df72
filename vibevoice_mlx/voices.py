"""Voice inputs: files, arrays and saved voices to what a backend encodes, and saving voices for reuse.

A voice is an audio file (any format and rate), a float32 mono 24 kHz array, or a saved voice (`.safetensors`
of acoustic latents, made by `save_voice`). Audio is normalized to -25 dBFS as the original processor does
(architecture.md §5.3); saved latents are used as they are, without re-encoding.
"""

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .audio import (check_input_file, check_saved_voice_path, load_audio, load_voice, normalize_voice,
                    realtime_preset_error, save_voice as write_voice)
from .constants import SAMPLE_RATE
from .errors import UserError
from .notices import warn_once
from .preset_store import PRESET_NAMES

logger = logging.getLogger(__name__)


def prepare_voices(pipe, voices: Optional[Sequence], num_speakers: int) -> List[np.ndarray]:
    """Voices as float32 arrays: 1-D normalized 24 kHz audio, or 2-D saved latents [frames, vae_dim].

    As the original, voices are taken in order and cut to the number of speakers; extra ones are reported.
    """
    voices = list(voices or [])
    if len(voices) > num_speakers:
        logger.warning("%d voices for %d speaker(s): the last %d are not used.", len(voices), num_speakers,
                       len(voices) - num_speakers)
        voices = voices[:num_speakers]
    return [read_voice(v, i, pipe.config.acoustic_vae_dim, pipe.hop_length, _fingerprint(pipe))
            for i, v in enumerate(voices)]


def _fingerprint(pipe) -> Optional[str]:
    return getattr(pipe.backend, "encoder_fingerprint", None)


MIN_VOICE_SECONDS = 1.0  # shorter clips carry little of a voice: said, not refused


def read_voice(voice, index: int = 0, vae_dim: Optional[int] = None, hop: Optional[int] = None,
               fingerprint: Optional[str] = None, normalize: bool = True) -> np.ndarray:
    """One voice as a float32 array: 1-D 24 kHz audio (normalized to -25 dBFS unless `normalize=False`), or 2-D
    saved latents [frames, vae_dim].

    Refused in one line: unreadable files, non-finite samples, silence. Said: clips under a second.
    """
    name = f"voice {index + 1}" if isinstance(voice, np.ndarray) else str(voice)
    if not isinstance(voice, np.ndarray) and (str(voice) in PRESET_NAMES or str(voice).lower().endswith(".pt")):
        raise realtime_preset_error(voice)
    if not isinstance(voice, np.ndarray):
        check_input_file(voice, "Voice file")
    if isinstance(voice, np.ndarray):
        v = np.asarray(voice, np.float32)
        if v.ndim == 2:
            if vae_dim is not None and v.shape[1] != vae_dim:
                raise UserError(f"A 2-D voice array must be saved latents [frames, {vae_dim}]; got shape {v.shape}. "
                                "Pass audio as a 1-D float32 array at 24 kHz.")
            if not np.isfinite(v).all():
                raise UserError(f"{name}: the latents hold NaN or infinite values.")
            return v
        if v.ndim != 1 or v.size == 0:
            raise UserError(f"{name}: expected a non-empty 1-D float32 array of 24 kHz audio, got shape {v.shape}.")
        audio = v
    elif str(voice).endswith(".safetensors"):
        latents, _ = load_voice(voice, vae_dim=vae_dim, hop=hop, model=fingerprint)
        if not np.isfinite(latents).all():
            raise UserError(f"{name}: the saved latents hold NaN or infinite values; save the voice again.")
        return latents
    else:
        audio = load_audio(voice)
    if not np.isfinite(audio).all():
        raise UserError(f"{name} holds NaN or infinite samples: it is not usable as a voice; export it again.")
    if float(np.max(np.abs(audio))) < 1e-5:
        raise UserError(f"{name} is silent: a voice sample needs someone speaking (3 to 30 s clone best).")
    seconds = len(audio) / SAMPLE_RATE
    if seconds < MIN_VOICE_SECONDS:
        warn_once(logger, "%s is only %.2f s long; voices clone best from 3 to 30 s of clear speech.", name, seconds,
                  key=("short voice", len(audio)))  # read from its file, then as an array
    return normalize_voice(audio) if normalize else audio


def encode_voices(pipe, voices: Sequence) -> List[np.ndarray]:
    """The acoustic latents ([frames, vae_dim] float32, before the σ-VAE noise) of `voices`, encoded together as
    one zero-padded batch, exactly as a run with these voices encodes them. Passing the result as `voices=`
    gives the same audio as passing the clips, without encoding them again."""
    if pipe.backend.name != "mlx":
        raise UserError("Encoding and saving voices needs the MLX backend (backend='mlx').")
    return pipe.backend.voice_latents(prepare_voices(pipe, voices, len(voices)))


def save_voice(pipe, voice, path, force: bool = False, latents: Optional[np.ndarray] = None) -> Path:
    """Save one voice (an audio file path or a float32 mono 24 kHz array) as a reusable `.safetensors` voice.

    `latents` may be given when the voice was already encoded (with `encode_voices`, as part of a batch), so the
    file holds exactly what that run used. Returns the path.
    """
    check_saved_voice_path(path, force)
    if not isinstance(voice, np.ndarray) and str(voice).endswith(".safetensors"):
        raise UserError(f"{voice} is already a saved voice; give the audio file it was made from.")
    audio = read_voice(voice)
    if latents is None:
        latents = encode_voices(pipe, [audio])[0]
    meta = {"num_samples": len(audio), "model": pipe.folder.name, "hop": pipe.hop_length}
    if _fingerprint(pipe):
        meta["encoder"] = _fingerprint(pipe)
    return write_voice(path, latents, meta, force=force)
