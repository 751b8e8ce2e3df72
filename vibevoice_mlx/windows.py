"""The realtime model's generation loop: windows of 5 text ids and 6 speech frames (realtime.md §4).

A `Session` holds one utterance's state: the three KV caches seeded from a voice preset (the lower LM, the
positive TTS LM and the negative, unconditional TTS LM), the two conditions, and the streaming decoder. `windows`
runs the schedule over a text-id source that may still be growing (`TextIds`), so speech for a window starts as soon
as its ids are final (realtime.md §6), and yields each kept frame's audio.

The stop is the EOS classifier's: `eos_rule(frame_index, probability) -> bool`, by default `probability > 0.5`
(strict, in float32). The frames after the stop in the same window are not computed: the reference computes and
drops them, and nothing returned depends on them (realtime.md §4.5).
"""

from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .models.realtime import SPEECH_WINDOW, TEXT_WINDOW, RealtimeModel
from .presets import RealtimeVoice
from .scheduler import DPMSolver, Schedule, sample_latent

EOSRule = Callable[[int, float], bool]


def default_eos_rule(frame: int, probability: float) -> bool:
    return probability > 0.5


def _cache(caches, dtype) -> List[KVCache]:
    """Fresh per-layer KV caches holding a copy of a preset branch, (keys, values) [layers, kv_heads, n, head_dim]:
    exact upcasts of its bfloat16 values, which the reference attends over (realtime.md §5.1)."""
    keys, values = caches
    out = []
    for i in range(keys.shape[0]):
        c = KVCache()
        c.state = (keys[i][None].astype(dtype), values[i][None].astype(dtype), keys.shape[2])
        out.append(c)
    return out


class Session:
    """One utterance's state; the preset is copied, never extended in place (realtime.md pitfall 21)."""

    def __init__(self, model: RealtimeModel, voice: RealtimeVoice, cfg_scale: float = 1.5, steps: int = 5,
                 dtype=mx.float32):
        self.model = model
        self.cfg_scale = float(cfg_scale)
        self.schedule: Schedule = DPMSolver.from_config(model.config.scheduler).schedule(steps)
        self.lower_cache = _cache(voice.caches["lm"], dtype)
        self.pos_cache = _cache(voice.caches["tts_lm"], dtype)
        self.neg_cache = _cache(voice.caches["neg_tts_lm"], dtype)
        self.h_neg = voice.neg_hidden.reshape(1, -1).astype(mx.float32)
        self.h_pos: Optional[mx.array] = None
        self.decoder_state = model.model.acoustic_tokenizer.decoder.make_state(1)
        self.frames = 0  # frames computed so far

    @property
    def positions(self) -> int:
        """Positions held by the positive TTS LM (the context limit counts the preset, §4.8)."""
        return self.pos_cache[0].offset

    def text(self, ids: Sequence[int]) -> None:
        """A text window: ids through the lower LM, then the TTS LM (type 1); h⁺ = the last row (§4.3)."""
        g = self.model.lower(mx.array([list(ids)]), self.lower_cache)
        self.h_pos = self.model.tts(g, 1, self.pos_cache)[:, -1].astype(mx.float32)

    def frame(self, noise: mx.array):
        """Sample, decode and return frame audio [hop] float32 and its latent z [1, latent] (§4.4 steps 1-3)."""
        z = self.sample(noise)
        return self.decode(z), z

    def sample(self, noise: mx.array) -> mx.array:
        """The diffusion head's latent z [1, latent] for the current conditions (§4.4 steps 1-2)."""
        return sample_latent(self.model.model.prediction_head, self.h_pos, self.h_neg, noise.reshape(1, -1),
                             self.schedule, self.cfg_scale)

    def decode(self, z: mx.array) -> mx.array:
        """The streaming decoder's audio [hop] float32 for latent z (§4.4 step 3); counts the frame."""
        audio, self.decoder_state = self.model.model.acoustic_tokenizer.decoder.stream(
            self.model.unscale_latents(z)[:, None], self.decoder_state)
        self.frames += 1
        return audio.reshape(-1).astype(mx.float32)

    def feed(self, z: mx.array) -> mx.array:
        """Feed frame z back to both TTS LM branches (type 0); returns the EOS probability of the new h⁺ (§4.4
        steps 4-5)."""
        m = self.model.model
        e = m.acoustic_connector(z.astype(m.acoustic_connector.fc1.weight.dtype))[:, None]
        self.h_pos = self.model.tts(e, 0, self.pos_cache)[:, -1].astype(mx.float32)
        self.h_neg = self.model.tts(e, 0, self.neg_cache)[:, -1].astype(mx.float32)
        return self.model.eos_probability(self.h_pos)[0]


class TextIds:
    """Text ids as they become final: `extend` appends, `close` marks the end. A plain list works too (a closed
    source). `windows` asks for window w's ids only once 5(w+1) of them are final or the text has ended."""

    def __init__(self, ids: Sequence[int] = (), closed: bool = False):
        self.ids = list(ids)
        self.closed = closed

    def extend(self, ids: Sequence[int]) -> None:
        self.ids.extend(int(i) for i in ids)

    def close(self) -> None:
        self.closed = True


def windows(session: Session, text: TextIds, noise: Callable[[int], mx.array],
            eos_rule: EOSRule = default_eos_rule, max_frames: Optional[int] = None,
            wait: Optional[Callable[[TextIds, int], None]] = None) -> Iterator[mx.array]:
    """Run the window schedule and yield the audio [hop] of every kept frame (realtime.md §4.11, §6.3).

    noise(f) gives frame f's initial latent [latent]. wait(text, needed) is called when window w's ids are not yet
    final; it must extend or close `text` (the default raises: a plain source must be closed).
    max_frames stops after that many frames (an external stop, at frame granularity).
    """
    limit = session.model.config.max_positions
    w = 0
    while True:
        need = TEXT_WINDOW * (w + 1)
        while len(text.ids) < need and not text.closed:
            if wait is None:
                raise ValueError("the text source is not closed and no wait function was given")
            wait(text, need)
        ids = text.ids[TEXT_WINDOW * w : need]
        w += 1
        if ids:
            if session.positions + len(ids) > limit:
                return
            session.text(ids)
        elif session.h_pos is None:
            raise ValueError("the first text window is empty: the processor always gives at least one id")
        for _ in range(SPEECH_WINDOW):
            f = session.frames
            audio, z = session.frame(noise(f))
            yield audio
            if max_frames is not None and session.frames >= max_frames:
                return
            if session.positions + 1 > limit:  # heard, never fed back (§4.8)
                return
            p = session.feed(z)
            if eos_rule(f, float(p.item())):
                return
