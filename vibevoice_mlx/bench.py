"""Speed benchmark: time per generated frame, x real time, prefill and peak memory, per backend, in one run.

    vibevoice-mlx bench --model vv-1.5b --frames 32 --runs 3
    vibevoice-mlx bench --model ckpt-folder --backends mlx,torch --force-frames

A frame's time is the gap between two consecutive token choices (one LM step, the diffusion sampling, the
streaming decode and semantic encode), the median over the frames of every run after the warm-up frames.
`--force-frames` makes every step a speech frame (what a random-weight checkpoint needs to produce frames at
all); the work per frame is the same. Numbers drift with what else runs on the machine: compare backends
measured in the same run, as this command does.
"""

import gc
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from . import generation
from .backend import greedy
from .constants import SAMPLE_RATE

logger = logging.getLogger(__name__)

DEFAULT_SCRIPT = "Speaker 1: The quick brown fox jumps over the lazy dog, and then it runs away into the woods."


@dataclass
class BenchResult:
    backend: str
    dtype: str
    frame_ms: float
    frames_timed: int
    real_time: float  # audio seconds per wall second, from the frame time
    prefill_s: float
    peak_gb: float


class _Clock:
    """A sampler that stamps every token choice (and forces frames on request); the same for both backends."""

    def __init__(self, force_frames: bool):
        self.stamps: List[float] = []
        self.force = force_frames

    def __call__(self, logits, token_ids):
        token = greedy(logits, token_ids)  # same work and sync as an ordinary run
        self.stamps.append(time.perf_counter())
        return token_ids[2] if self.force else token


def _voice(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    return (0.1 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def run_backend(model: str, backend: str, dtype: Optional[str], script: str, voice_seconds: float, frames: int,
                runs: int, warmup: int, steps: int, cfg_scale: float, force_frames: bool,
                tokenizer: Optional[str] = None) -> BenchResult:
    """Time `generate` on `backend` as a user runs it: the same orchestration, only the sampler stamps time."""
    from .loader import load
    from .memory import free_memory

    pipe = load(model, backend=backend, dtype=dtype, tokenizer=tokenizer)
    voices = [_voice(voice_seconds)] if voice_seconds > 0 else None
    gaps, prefills = [], []
    try:
        import mlx.core as mx

        mx.reset_peak_memory()
    except Exception:
        pass
    quiet = logging.getLogger(generation.__name__)
    for _ in range(runs):
        clock = _Clock(force_frames)
        start = time.perf_counter()
        max_seconds = (frames + warmup) * pipe.hop_length / SAMPLE_RATE
        level, quiet.level = quiet.level, logging.ERROR  # the frame limit below is ours, not news
        try:
            generation.generate(pipe, script, voices, sampler=clock, steps=steps, cfg_scale=cfg_scale, seed=0,
                                max_seconds=max_seconds)
        finally:
            quiet.setLevel(level)
        if clock.stamps:
            prefills.append(clock.stamps[0] - start)
            gaps += list(np.diff(clock.stamps[warmup:]))
    dtype_name = pipe.backend.dtype_name
    peak = _peak_gb(backend)
    frame_seconds = pipe.hop_length / pipe.sample_rate
    del pipe
    free_memory()
    gc.collect()
    frame = statistics.median(gaps) if gaps else float("nan")
    return BenchResult(backend, dtype_name, frame * 1000, len(gaps), frame_seconds / frame if gaps else 0.0,
                       statistics.median(prefills) if prefills else float("nan"), peak)


def _peak_gb(backend: str) -> float:
    if backend == "mlx":
        import mlx.core as mx

        return mx.get_peak_memory() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kB; the process high-water mark


def machine() -> str:
    import mlx.core as mx

    device = "GPU" if mx.default_device() == mx.gpu else "CPU"
    return f"{platform.platform()}, {platform.processor() or platform.machine()}, MLX default device {device}"


def format_results(results: List[BenchResult]) -> str:
    """One line per backend, then the speed ratio of each backend to the last one (the baseline)."""
    lines = []
    for r in results:
        lines.append(f"{r.backend:5s} {r.dtype:8s}: {r.frame_ms:8.1f} ms/frame (median of {r.frames_timed}), "
                     f"{r.real_time:5.2f}x real time, prefill {r.prefill_s:5.2f} s, peak {r.peak_gb:5.2f} GB")
    base = results[-1]
    for r in results[:-1]:
        lines.append(f"{r.backend} / {base.backend} speed per frame: {base.frame_ms / r.frame_ms:.2f}x")
    return "\n".join(lines)
