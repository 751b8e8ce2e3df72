"""ComfyUI's AUDIO values, progress bar and interrupt around `vibevoice_mlx.stream_generate`.

AUDIO is `{"waveform": torch float32 [batch, channels, samples], "sample_rate": int}`. torch is imported only
where a tensor is made (ComfyUI always has it), and ComfyUI's own modules only when they are importable, so the
nodes also run as plain Python.
"""

import importlib
import logging
import math
import re
from typing import Callable, List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Speech runs at about 150 words a minute: enough to size the progress bar, which grows if speech runs longer.
WORDS_PER_SECOND = 2.5


def comfy_module(module: str):
    """A ComfyUI module (`comfy.utils`, `comfy.model_management`), or None outside ComfyUI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def voice_from_audio(audio, name: str = "voice") -> np.ndarray:
    """An AUDIO value as float32 mono at 24 kHz: the first clip of the batch, channels averaged, resampled."""
    from ..audio import resample

    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError(f"{name} is not an AUDIO value (a dict with 'waveform' and 'sample_rate'): connect a "
                         "Load Audio node to it.")
    wave = audio["waveform"]
    if hasattr(wave, "detach"):  # a torch tensor, possibly on the GPU or in half precision
        wave = wave.detach().cpu().float().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim < 3:  # [samples] or [channels, samples] from plain Python callers
        wave = wave.reshape((1,) * (3 - wave.ndim) + wave.shape)
    if wave.ndim != 3 or wave.shape[-1] == 0:
        raise ValueError(f"{name} has a waveform of shape {tuple(wave.shape)}; expected [batch, channels, samples] "
                         "with at least one sample.")
    if wave.shape[0] > 1:
        logger.warning("%s holds %d clips: the first one is used.", name, wave.shape[0])
    mono = wave[0].mean(axis=0, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise ValueError(f"{name} contains NaN or infinite samples.")
    return resample(mono, int(audio["sample_rate"]))  # to the model's rate, resample's default


def audio_from_samples(samples: np.ndarray, sample_rate: int) -> dict:
    """Mono float32 samples as an AUDIO value of one clip and one channel."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("ComfyUI's AUDIO values hold torch tensors: install torch (ComfyUI always has it).") \
            from None
    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).reshape(1, 1, -1)
    return {"waveform": wave, "sample_rate": int(sample_rate)}


def estimate_frames(script: str, hop: int, sample_rate: int, max_seconds: Optional[float] = None) -> int:
    """Frames the script is likely to need, for the progress bar's total."""
    seconds = len(re.findall(r"\w+", script)) / WORDS_PER_SECOND
    if max_seconds is not None:
        seconds = min(seconds, max_seconds)
    return max(1, math.ceil(seconds * sample_rate / hop))


class Progress:
    """ComfyUI's progress bar over frames, when ComfyUI is there. The total is an estimate: it grows when speech
    runs longer, and the bar is filled when generation ends early."""

    def __init__(self, total: int):
        utils = comfy_module("comfy.utils")
        self.total = max(1, int(total))
        self.bar = utils.ProgressBar(self.total) if utils is not None else None

    def frame(self, frames: int) -> None:
        if frames >= self.total:
            self.total = frames + 1
        if self.bar is not None:
            self.bar.update_absolute(frames, self.total)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update_absolute(self.total, self.total)


def interrupt_check() -> Callable[[], None]:
    """ComfyUI's check that raises when the user pressed cancel; a no-op outside ComfyUI."""
    mm = comfy_module("comfy.model_management")
    check = getattr(mm, "throw_exception_if_processing_interrupted", None) if mm is not None else None
    return check or (lambda: None)


def synthesize(pipe, script: str, voices: Sequence, max_seconds: Optional[float] = None, **options) -> np.ndarray:
    """Generate `script` as float32 mono audio, with ComfyUI's progress bar and interrupt; `options` go to
    `stream_generate` (steps, cfg_scale, seed, ...; `sampler` or `eos_rule` from Python callers and tests).

    The interrupt is checked on every language-model step, so a cancel stops generation at the next frame; closing
    the stream ends the frame loop there.
    """
    import vibevoice_mlx as vv

    check = interrupt_check()
    progress = Progress(estimate_frames(script, pipe.hop_length, pipe.sample_rate, max_seconds))
    chunks: List[np.ndarray] = []
    stream = vv.stream_generate(pipe, script, voices=list(voices) or None, max_seconds=max_seconds, **options)
    try:
        for response in stream:
            check()
            if response.audio.size:
                chunks.append(response.audio)
                progress.frame(response.frames)
    finally:
        stream.close()
    progress.done()
    audio = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if not audio.size:
        raise RuntimeError("The model produced no audio for this text: try another seed (or, on the 1.5B nodes, "
                           "turn on use_sampling).")
    return audio
