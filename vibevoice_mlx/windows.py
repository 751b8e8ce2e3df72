"""The realtime model's generation loop: windows of 5 text ids and 6 speech frames (realtime.md §4), for B
utterances at once, which may join and leave at any step.

Each utterance (a `Row`) owns: its text ids as they become final (`TextIds`, so speech for a window starts as soon
as its ids are known, realtime.md §6), its noise, its stop rule, and three KV caches seeded from its voice preset:
the lower LM's, and the positive and negative TTS LM's. A `Batch` runs the speech frames of every row in flight
together: the TTS LM caches of all rows as one left-padded `backbone.CFGCache` (row 2i positive, 2i+1 negative),
so a frame reads each weight once for all rows. A text window is a row's own: the row steps out of the batch, its
ids go through the lower LM and the positive TTS LM alone, and it steps back in. A row whose next ids are not final
yet stays out (parked) without holding the others up, and rejoins when they are.

`batch_invariant=True` runs every product of a frame once per row (invariant.py, backbone.ScriptAttention): a row's
audio then equals its solo run bit for bit on any BLAS, whoever shares its batch and whenever it joined. Without it
the equality holds within float32 rounding only (it is exact on MLX's bundled BLAS).

The stop is `eos_rule(frame_index, probability) -> bool`, by default `probability > 0.5` (strict, float32). The
frames after the stop in the same window are not computed: the reference computes and drops them, and nothing
returned depends on them (realtime.md §4.5).
"""

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from . import backbone, invariant
from .backbone import CFGCache
from .models.realtime import SPEECH_WINDOW, TEXT_WINDOW, RealtimeModel
from .scheduler import DPMSolver, sample_latent

EOSRule = Callable[[int, float], bool]


def default_eos_rule(frame: int, probability: float) -> bool:
    return probability > 0.5


class TextIds:
    """Text ids as they become final: `extend` appends, `close` marks the end (a list given closed is the whole
    text). Window w reads ids 5w to 5w+5 once they are final or the text has ended."""

    def __init__(self, ids: Sequence[int] = (), closed: bool = False):
        self.ids = [int(i) for i in ids]
        self.closed = closed

    def extend(self, ids: Sequence[int]) -> None:
        self.ids.extend(int(i) for i in ids)

    def close(self) -> None:
        self.closed = True


@dataclass
class Row:
    """One utterance: its text, noise(f) -> frame f's initial latent [latent], stop rule and frame budget.
    `wait(text, needed)` is called when window w's ids are not final yet; it must extend or close `text`."""

    text: TextIds
    noise: Callable[[int], mx.array]
    eos_rule: EOSRule = default_eos_rule
    max_frames: Optional[int] = None
    wait: Optional[Callable[[TextIds, int], None]] = None
    should_stop: Optional[Callable[[], bool]] = None  # True: cancel before its next frame
    frames: int = 0  # frames made
    windows: int = 0  # windows begun
    positions: int = 0  # positions held by its positive TTS cache (the context limit counts the preset, §4.8)
    stop: Optional[str] = None  # why it ended: "eos", "max_frames", "context" or "cancelled"
    # Its state while out of the batch: lower, positive and negative caches, conditions, decoder state.
    state: dict = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.stop is not None

    @property
    def at_window(self) -> bool:
        """Its next frame begins a window: its text window (if any) comes first."""
        return self.frames == SPEECH_WINDOW * self.windows

    def ready(self) -> bool:
        """Its next window's ids are final (or its text has ended); with a `wait`, waits for them."""
        need = TEXT_WINDOW * (self.windows + 1)
        while len(self.text.ids) < need and not self.text.closed and self.wait is not None:
            self.wait(self.text, need)
        return len(self.text.ids) >= need or self.text.closed

    def window_ids(self) -> List[int]:
        return self.text.ids[TEXT_WINDOW * self.windows : TEXT_WINDOW * (self.windows + 1)]


def _caches(branch, dtype) -> List[KVCache]:
    """Per-layer KV caches holding a copy of a preset branch (keys, values) [layers, kv_heads, n, head_dim]:
    exact upcasts of its bfloat16 values, which the reference attends over (realtime.md §5.1)."""
    keys, values = branch
    out = []
    for i in range(keys.shape[0]):
        c = KVCache()
        c.state = (keys[i][None].astype(dtype), values[i][None].astype(dtype), keys.shape[2])
        out.append(c)
    return out


def invariant_model(model: RealtimeModel) -> None:
    """Make every product of a frame one per row (`invariant.py`): the TTS LM's rows come in CFG pairs, every
    other part's batch axis has one entry per row. The weights move to the decode layout that carries the per-row
    products (`backbone.DecodeLinear`): the same products, summed in another order (float32 rounding)."""
    m = model.model
    parts = (m.tts_language_model, m.prediction_head, m.acoustic_tokenizer.decoder, m.acoustic_connector,
             model.tts_eos_classifier)
    for part in parts:
        backbone.to_decode_layout(part)
    backbone.batch_invariant(m.tts_language_model)
    for part in parts:
        invariant.set_group(part, 2 if part is m.tts_language_model else 1)
    model.batch_invariant = True


class Batch:
    """The rows in flight; `add` a row with its preset, `step` until `rows` and `parked` are empty."""

    def __init__(self, model: RealtimeModel, cfg_scale: float = 1.5, steps: int = 5, dtype=mx.float32):
        self.model = model
        self.cfg_scale = float(cfg_scale)
        self.schedule = DPMSolver.from_config(model.config.scheduler).schedule(steps)
        self.dtype = dtype
        self.rows: List[Row] = []  # in the batch, in its order
        self.parked: List[Row] = []  # out of it: beginning a window (text first) or waiting for their text
        self.tts: Optional[CFGCache] = None
        self.h_pos = self.h_neg = None  # [B, H] float32
        self.decoder_state = None

    @property
    def active(self) -> bool:
        return bool(self.rows or self.parked)

    def add(self, row: Row, voice) -> None:
        """Join `row` with its preset (`presets.RealtimeVoice`); it begins with its first window."""
        row.positions = voice.caches["tts_lm"][0].shape[2]
        row.state = {"lower": _caches(voice.caches["lm"], self.dtype),
                     "pos": _caches(voice.caches["tts_lm"], self.dtype),
                     "neg": _caches(voice.caches["neg_tts_lm"], self.dtype),
                     "h_pos": None, "h_neg": voice.neg_hidden.reshape(1, -1).astype(mx.float32),
                     "decoder": self.model.model.acoustic_tokenizer.decoder.make_state(1)}
        self.parked.append(row)

    def _join(self, row: Row) -> None:
        st = row.state
        tts = CFGCache([BatchKVCache.merge([p, n]) for p, n in zip(st["pos"], st["neg"])])
        if not self.rows:
            self.tts, self.h_pos, self.h_neg, self.decoder_state = tts, st["h_pos"], st["h_neg"], st["decoder"]
        else:
            self.tts.add(tts)
            self.h_pos = mx.concatenate([self.h_pos, st["h_pos"]])
            self.h_neg = mx.concatenate([self.h_neg, st["h_neg"]])
            self.decoder_state = [mx.concatenate([a, b]) for a, b in zip(self.decoder_state, st["decoder"])]
        row.state = {"lower": st["lower"]}
        self.rows.append(row)

    def _leave(self, rows: Sequence[Row]) -> None:
        """Take these rows out of the batch, their state kept on them (parked) unless they are done."""
        if not rows:
            return
        out = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in out]
        for i, row in enumerate(self.rows):
            if id(row) in out and not row.done:
                row.state.update(pos=[c.extract(2 * i) for c in self.tts], neg=[c.extract(2 * i + 1) for c in self.tts],
                                 h_pos=self.h_pos[i:i + 1], h_neg=self.h_neg[i:i + 1],
                                 decoder=[s[i:i + 1] for s in self.decoder_state])
                self.parked.append(row)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.tts = self.h_pos = self.h_neg = self.decoder_state = None
            return
        idx = mx.array(keep)
        self.tts.keep(keep)
        self.h_pos, self.h_neg = self.h_pos[idx], self.h_neg[idx]
        self.decoder_state = [s[idx] for s in self.decoder_state]

    def _text(self, row: Row, ids: List[int]) -> None:
        """A row's text window, alone (realtime.md §4.3): its ids through the lower LM, then the positive TTS LM."""
        st = row.state
        g = self.model.lower(mx.array([ids]), st["lower"])
        st["h_pos"] = self.model.tts(g, 1, st["pos"])[:, -1].astype(mx.float32)
        row.positions += len(ids)

    def _windows(self) -> None:
        """Rows that begin a window step out; a parked row whose ids are final gets its text window and steps in."""
        for row in [r for r in self.rows if r.at_window]:
            if row.windows * TEXT_WINDOW < len(row.text.ids) or not row.text.closed:
                self._leave([row])  # text to feed, or to wait for
            else:
                row.windows += 1  # a speech-only window: it stays
        limit = self.model.config.max_positions
        for row in list(self.parked):
            if row.at_window:
                if not row.ready():
                    continue  # parked until its text is final; the others go on
                ids = row.window_ids()
                row.windows += 1
                if ids and row.positions + len(ids) > limit:
                    row.stop = "context"
                elif ids:
                    self._text(row, ids)
                elif row.state.get("h_pos") is None:
                    raise ValueError("the first text window is empty: the processor always gives at least one id")
            self.parked.remove(row)
            if not row.done:
                self._join(row)

    def step(self) -> List[tuple]:
        """One frame for every row that can make one: [(row, audio [hop] float32)]. Rows that stop leave; rows
        whose text is not final yet wait outside (no audio from them this step)."""
        for row in self.rows + self.parked:
            if row.should_stop is not None and not row.done and row.should_stop():
                row.stop = "cancelled"
        self.parked = [r for r in self.parked if not r.done]
        self._leave([r for r in self.rows if r.done])
        self._windows()
        if not self.rows:
            return []
        m = self.model.model
        noise = mx.concatenate([r.noise(r.frames).reshape(1, -1) for r in self.rows]).astype(mx.float32)
        z = sample_latent(m.prediction_head, self.h_pos, self.h_neg, noise, self.schedule, self.cfg_scale)
        audio, self.decoder_state = m.acoustic_tokenizer.decoder.stream(self.model.unscale_latents(z)[:, None],
                                                                       self.decoder_state)
        audio = audio.reshape(len(self.rows), -1).astype(mx.float32)
        out = []
        limit = self.model.config.max_positions
        for i, row in enumerate(self.rows):
            out.append((row, audio[i]))
            row.frames += 1
            if row.max_frames is not None and row.frames >= row.max_frames:
                row.stop = "max_frames"
            elif row.positions + 1 > limit:
                row.stop = "context"  # heard, never fed back (§4.8)
        feeding = [i for i, r in enumerate(self.rows) if not r.done]
        if len(feeding) < len(self.rows):
            z = z[mx.array(feeding)] if feeding else z
            self._leave([r for r in self.rows if r.done])
        if self.rows:
            e = m.acoustic_connector(z[:, None].astype(self.dtype))  # [B, 1, H]: one product per row
            h = self.model.tts(mx.repeat(e, 2, axis=0), 0, self.tts)[:, -1].astype(mx.float32)
            self.h_pos, self.h_neg = h[0::2], h[1::2]
            p = self.model.eos_probability(self.h_pos).tolist()
            for row, prob in zip(self.rows, p):
                row.positions += 1
                if row.eos_rule(row.frames - 1, prob):
                    row.stop = "eos"
            self._leave([r for r in self.rows if r.done])
        return out


def windows(model: RealtimeModel, voice, text: TextIds, noise: Callable[[int], mx.array],
            eos_rule: EOSRule = default_eos_rule, max_frames: Optional[int] = None, cfg_scale: float = 1.5,
            steps: int = 5, dtype=mx.float32, wait=None) -> Iterator[mx.array]:
    """One utterance through the schedule: the audio [hop] of every kept frame (realtime.md §4.11, §6.3)."""
    batch = Batch(model, cfg_scale, steps, dtype)
    batch.add(Row(text, noise, eos_rule, max_frames, wait), voice)
    while batch.active:
        made = batch.step()
        if not made and batch.parked and not batch.rows and all(not r.ready() for r in batch.parked):
            raise ValueError("the text source is not closed and no wait function was given")
        for _, audio in made:
            yield audio
