"""What a backend is: the small protocol the MLX engine and the PyTorch path both implement.

The orchestration in `generation.py` (script -> segments -> frames -> responses) is written once against it. A
backend turns *segment jobs* (one prompt of one script, with that script's voices, sampler and noise) into events:
the token chosen at each step and, on speech frames, the 3200 samples made. `run` takes several job sources at
once; the MLX engine generates them together in one batch, the PyTorch path one after another.
"""

from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from .processor import PromptInputs

# sampler(logits, token_ids) -> chosen token id; `logits` are float32 over the allowed control tokens only.
Sampler = Callable[[Any, Sequence[int]], int]


def greedy(logits, token_ids: Sequence[int]) -> int:
    """The original's token choice: the most likely control token."""
    import mlx.core as mx

    return int(token_ids[int(mx.argmax(logits).item())])

# Event kinds besides a token id: the segment stopped before eos (length rule or max_seconds), or the backend
# has asked the source for its next job (so the orchestrator can hand out what it has queued, e.g. pauses).
TRUNCATED = "truncated"
NEXT = "next"

# (source index, token id | TRUNCATED | NEXT, audio of a speech frame or None)
Event = Tuple[int, Union[int, str], Optional[np.ndarray]]


@dataclass
class FrameSettings:
    """What every row of one batch shares: the diffusion steps, the guidance scale, compilation, prefill chunk."""

    steps: int
    cfg_scale: float
    compile: bool = True
    prefill_chunk: int = 512


@dataclass
class SegmentJob:
    """One prompt segment of one script, ready for a backend.

    voices: what the backend's `encode_voices` returned for this script (its prompt's voice section). noise: a
    callable returning the next frame's initial diffusion noise [1, latent] (float32 numpy or MLX).
    max_frames: frames left in the script's `max_seconds` budget, None for no limit.
    """

    prompt: PromptInputs
    voices: Any
    sampler: Sampler
    noise: Callable[[], Any]
    max_frames: Optional[int] = None
    should_stop: Optional[Callable[[], bool]] = None
    seed: Optional[int] = None  # for a backend that draws its own randomness (the PyTorch path)


class JobSource(Protocol):
    def next_job(self) -> Optional[SegmentJob]:
        """The script's next segment, or None when it is done."""


class Backend(Protocol):
    name: str  # "mlx" or "torch"
    max_batch: int  # how many sources `run` advances together (1: one after another)

    @property
    def dtype_name(self) -> str:
        """The compute dtype of the weights, e.g. "float32"."""

    def encode_voices(self, voices: List[np.ndarray], voice_noise: bool, seed: int) -> Any:
        """Voice clips (1-D normalized 24 kHz audio) or saved latents (2-D [frames, vae_dim]) -> what a
        `SegmentJob` carries for them. Fresh clips are encoded as one zero-padded batch, as the original does."""

    def voice_latents(self, voices: List[np.ndarray]) -> List[np.ndarray]:
        """The acoustic means ([frames, vae_dim] float32) of voice clips, encoded as one batch: what a saved
        voice holds, and exactly what a run with these voices uses before its σ-VAE noise."""

    def run(self, sources: Sequence[JobSource], settings: FrameSettings) -> Iterator[Event]:
        """Generate every source's jobs until each returns None, yielding events tagged by source index."""

    def free(self) -> None:
        """Release cached memory (the backend stays usable)."""
