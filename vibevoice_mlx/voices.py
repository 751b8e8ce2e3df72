"""Voice inputs: files, arrays and saved voices to what a backend encodes, and saving voices for reuse.

A voice is an audio file (any format and rate), a float32 mono 24 kHz array, or a saved voice (`.safetensors`
of acoustic latents, made by `save_voice`). Audio is normalized to -25 dBFS as the original processor does
(architecture.md §5.3); saved latents are used as they are, without re-encoding.
"""

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .audio import load_audio, load_voice, normalize_voice, save_voice as write_voice
from .errors import UserError

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
    out = []
    for v in voices:
        if isinstance(v, np.ndarray):
            if v.ndim == 2 and v.shape[1] != pipe.config.acoustic_vae_dim:
                raise UserError(f"A 2-D voice array must be saved latents [frames, {pipe.config.acoustic_vae_dim}]; "
                                f"got shape {v.shape}. Pass audio as a 1-D float32 array at 24 kHz.")
            out.append(normalize_voice(v.astype(np.float32)) if v.ndim == 1 else v.astype(np.float32))
        elif str(v).endswith(".safetensors"):
            latents, _ = load_voice(v, vae_dim=pipe.config.acoustic_vae_dim, hop=pipe.hop_length)
            out.append(latents)
        else:
            out.append(normalize_voice(load_audio(v)))
    return out


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
    if isinstance(voice, np.ndarray):
        audio = normalize_voice(np.asarray(voice, np.float32))
    elif str(voice).endswith(".safetensors"):
        raise UserError(f"{voice} is already a saved voice; give the audio file it was made from.")
    else:
        audio = normalize_voice(load_audio(voice))
    if latents is None:
        latents = encode_voices(pipe, [audio])[0]
    return write_voice(path, latents, {"num_samples": len(audio), "model": pipe.folder.name,
                                       "hop": pipe.hop_length}, force=force)
