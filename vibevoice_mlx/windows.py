"""The realtime model's generation loop: windows of 5 text ids and 6 speech frames (realtime.md §4), for B
utterances at once.

Each utterance (a `Row`) owns: its text ids as they become final (`TextIds`, so speech for a window starts as soon
as its ids are known, realtime.md §6), its noise, its stop rule, and three KV caches seeded from its voice preset:
the lower LM's, and the positive and negative TTS LM's. A `Batch` keeps every row's caches as one left-padded
mlx-lm `BatchKVCache` per layer (the TTS LM's as a `backbone.CFGCache`: row 2i positive, 2i+1 negative), so one
step reads each weight once for all rows. A step is: the text window of every row that starts a window (fed
together, shorter rows right-padded), then one frame for every row: the CFG diffusion sample, the streaming decode,
and the feedback of the latent to both TTS branches with the EOS check.

The stop is `eos_rule(frame_index, probability) -> bool`, by default `probability > 0.5` (strict, float32). The
frames after the stop in the same window are not computed: the reference computes and drops them, and nothing
returned depends on them (realtime.md §4.5). A row's frames are the same whatever rows share its batch.
"""

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

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
    started: bool = field(default=False, repr=False)  # has had a text window (h⁺ is defined)

    @property
    def done(self) -> bool:
        return self.stop is not None

    def window_ids(self) -> List[int]:
        need = TEXT_WINDOW * (self.windows + 1)
        while len(self.text.ids) < need and not self.text.closed:
            if self.wait is None:
                raise ValueError("the text source is not closed and no wait function was given")
            self.wait(self.text, need)
        return self.text.ids[TEXT_WINDOW * self.windows : need]


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


def _right_padded(caches, padding: Sequence[int], run):
    """Run `run()` on chunks whose shorter rows are right-padded by `padding`; the padding becomes left padding
    (masked from then on)."""
    for c in caches:
        c.prepare(right_padding=list(padding))
    out = run()
    for c in caches:
        c.finalize()
    return out


class Batch:
    """The state of every row in flight; `add` a row with its preset, `step` until `rows` is empty."""

    def __init__(self, model: RealtimeModel, cfg_scale: float = 1.5, steps: int = 5, dtype=mx.float32):
        self.model = model
        self.cfg_scale = float(cfg_scale)
        self.schedule = DPMSolver.from_config(model.config.scheduler).schedule(steps)
        self.dtype = dtype
        self.rows: List[Row] = []
        self.lower: Optional[List[BatchKVCache]] = None
        self.tts: Optional[CFGCache] = None
        self.h_pos = self.h_neg = None  # [B, H] float32
        self.decoder_state = None

    def add(self, row: Row, voice) -> None:
        """Join `row` with its preset (`presets.RealtimeVoice`); it begins at its first window."""
        lower = [BatchKVCache.merge([c]) for c in _caches(voice.caches["lm"], self.dtype)]
        pos, neg = _caches(voice.caches["tts_lm"], self.dtype), _caches(voice.caches["neg_tts_lm"], self.dtype)
        tts = CFGCache([BatchKVCache.merge([p, n]) for p, n in zip(pos, neg)])
        h_neg = voice.neg_hidden.reshape(1, -1).astype(mx.float32)
        state = self.model.model.acoustic_tokenizer.decoder.make_state(1)
        row.positions = voice.caches["tts_lm"][0].shape[2]
        if not self.rows:
            self.lower, self.tts, self.h_neg, self.decoder_state = lower, tts, h_neg, state
            self.h_pos = mx.zeros_like(h_neg)
        else:
            for c, o in zip(self.lower, lower):
                c.extend(o)
            self.tts.add(tts)
            self.h_neg = mx.concatenate([self.h_neg, h_neg])
            self.h_pos = mx.concatenate([self.h_pos, mx.zeros_like(h_neg)])
            self.decoder_state = [mx.concatenate([s, t]) for s, t in zip(self.decoder_state, state)]
        self.rows.append(row)

    def _keep(self, keep: List[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.lower = self.tts = self.h_pos = self.h_neg = self.decoder_state = None
            return
        idx = mx.array(keep)
        for c in self.lower:
            c.filter(idx)
        self.tts.keep(keep)
        self.h_pos, self.h_neg = self.h_pos[idx], self.h_neg[idx]
        self.decoder_state = [s[idx] for s in self.decoder_state]

    def _text(self) -> None:
        """The text windows of the rows that begin a window (realtime.md §4.3), fed as one right-padded chunk."""
        limit = self.model.config.max_positions
        ids = []
        for row in self.rows:
            window = []
            if row.frames % SPEECH_WINDOW == 0 and row.frames // SPEECH_WINDOW == row.windows:
                window = row.window_ids()
                row.windows += 1
                if window and row.positions + len(window) > limit:
                    row.stop, window = "context", []
                elif not window and not row.started:
                    raise ValueError("the first text window is empty: the processor always gives at least one id")
            ids.append(window)
        n = max(len(w) for w in ids)
        if n == 0:
            return
        pad = [n - len(w) for w in ids]
        tokens = mx.array([w + [0] * (n - len(w)) for w in ids])
        g = _right_padded(self.lower, pad, lambda: self.model.lower(tokens, self.lower))
        both = mx.stack([g, mx.zeros_like(g)], axis=1).reshape(-1, n, g.shape[-1])  # negative rows: no text
        h = _right_padded(self.tts, [p for q in pad for p in (q, n)],
                          lambda: self.model.tts(both, 1, self.tts))[0::2].astype(mx.float32)
        fed = [i for i, w in enumerate(ids) if w]
        last = mx.array([len(ids[i]) - 1 for i in fed])
        self.h_pos[mx.array(fed)] = h[mx.array(fed), last]
        for i in fed:
            self.rows[i].positions += len(ids[i])
            self.rows[i].started = True

    def step(self) -> List[tuple]:
        """One frame for every row (after the text windows due): [(row, audio [hop] float32)]; rows that stop
        leave the batch."""
        for row in self.rows:
            if row.should_stop is not None and row.should_stop():
                row.stop = "cancelled"
        self._keep([i for i, r in enumerate(self.rows) if not r.done])
        self._text()
        self._keep([i for i, r in enumerate(self.rows) if not r.done])
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
        self._keep(feeding)
        if self.rows:
            z = z[mx.array(feeding)] if len(feeding) != z.shape[0] else z
            e = m.acoustic_connector(z.astype(m.acoustic_connector.fc1.weight.dtype))[:, None]
            h = self.model.tts(mx.repeat(e, 2, axis=0), 0, self.tts)[:, -1].astype(mx.float32)
            self.h_pos, self.h_neg = h[0::2], h[1::2]
            p = self.model.eos_probability(self.h_pos).tolist()
            for row, prob in zip(self.rows, p):
                row.positions += 1
                if row.eos_rule(row.frames - 1, prob):
                    row.stop = "eos"
            self._keep([i for i, r in enumerate(self.rows) if not r.done])
        return out


def windows(model: RealtimeModel, voice, text: TextIds, noise: Callable[[int], mx.array],
            eos_rule: EOSRule = default_eos_rule, max_frames: Optional[int] = None, cfg_scale: float = 1.5,
            steps: int = 5, dtype=mx.float32, wait=None) -> Iterator[mx.array]:
    """One utterance through the schedule: the audio [hop] of every kept frame (realtime.md §4.11, §6.3)."""
    batch = Batch(model, cfg_scale, steps, dtype)
    batch.add(Row(text, noise, eos_rule, max_frames, wait), voice)
    while batch.rows:
        for _, audio in batch.step():
            yield audio
