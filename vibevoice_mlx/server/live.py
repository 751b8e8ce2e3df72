"""Realtime live sessions on the worker thread: every utterance of the realtime model in one `windows.Batch`.

An utterance (`Utterance`) is text that arrives in deltas from a WebSocket session (`server/stream.py`). The
session's event loop only appends deltas and flags; the worker thread (the only one that touches MLX) calls
`LiveBatch.step` once per turn: it adds the utterances that began, turns their deltas into final ids
(`text_stream.TextStream`), steps the batch by one frame (a row whose next window's ids are not final yet stays
parked outside it, holding no one up, until its next delta or `input.done`), and hands each row's audio to its
session. An utterance joins at the next step and leaves at once (cancelled: at its next step).

Each utterance draws its noise as `vv.generate` does (a `NoiseSource` on `mx.random.key(seed)`) and its ids equal
the whole text's, so its audio equals `vv.generate(pipe, whole_text, voices=[preset], seed=seed)`.
"""

import logging
import threading
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

FORCED_FRAMES = 12  # --force-frames: a realtime utterance stops after two windows (a test model rarely does)


def forced_eos(frame: int, probability: float) -> bool:
    """The stop rule of `--force-frames` for the realtime model: a fixed length, whatever the test model says."""
    return frame + 1 >= FORCED_FRAMES


class Utterance:
    """One utterance of a session. Written by the session (`feed`, `finish`, `cancel`), read by the worker.
    `emit(kind, payload)` is called on the worker thread: ("audio", float32 [hop]) per frame, then ("end", why)
    or ("error", exception), once."""

    def __init__(self, voice, seed: int, steps: int, cfg_scale: float, emit: Callable[[str, object], None],
                 max_frames: Optional[int] = None, cancelled: Optional[threading.Event] = None):
        self.voice, self.seed, self.steps, self.cfg_scale = voice, seed, steps, cfg_scale
        self.emit, self.max_frames = emit, max_frames
        self.deltas: deque = deque()
        self.finished = False  # input.done: the text is complete once the deltas are read
        self.cancelled = cancelled or threading.Event()
        self.frames = 0
        self.row = None
        self.stream = None

    def feed(self, text: str) -> None:
        self.deltas.append(text)

    def finish(self) -> None:
        self.finished = True

    def cancel(self) -> None:
        self.cancelled.set()


class LiveBatch:
    """The realtime utterances in flight, one `windows.Batch` per (steps, cfg_scale). `wake` tells the worker
    that something changed (a new utterance, text, a cancel)."""

    def __init__(self, wake: Callable[[], None], eos_rule=None, past_grace: Callable[[], bool] = lambda: False):
        self.wake, self.eos_rule, self.past_grace = wake, eos_rule, past_grace
        self._lock = threading.Lock()
        self._incoming: List[Utterance] = []
        self._batches: Dict[Tuple[int, float], object] = {}
        self._rows: Dict[int, Utterance] = {}  # id(row) -> utterance
        self._presets: Dict[str, object] = {}

    def add(self, utt: Utterance) -> None:
        with self._lock:
            self._incoming.append(utt)
        self.wake()

    def submit_job(self, job, pipe) -> None:
        """POST /v1/audio/speech with the realtime model: a worker `Job` (its whole script, voices [one preset
        file]) as a finished utterance of this batch, with the Job's events: audio, then ("end", summary) or
        ("error", e). `worker.cancel(job)` stops it at its next step."""
        defaults = pipe.defaults
        seconds = job.max_seconds
        max_frames = None if seconds is None else max(1, int(seconds * pipe.sample_rate // pipe.hop_length))

        def emit(kind, payload):
            if kind == "audio":
                job.frames += 1
                job.audio_seconds = job.frames * pipe.hop_length / pipe.sample_rate
                job.emitted = True
                return job.emit(kind, payload)
            job.done = True
            if kind == "end":
                stopped = payload == "cancelled"
                payload = {"frames": job.frames, "audio_seconds": job.audio_seconds, "truncated": payload != "eos",
                           "stopped": stopped}
            job.emit(kind, payload)

        utt = Utterance(job.voices[0], job.seed, job.steps or defaults["steps"],
                        float(job.cfg_scale if job.cfg_scale is not None else defaults["cfg_scale"]), emit,
                        max_frames, cancelled=job.cancelled)
        utt.feed(job.script)
        utt.finish()
        self.add(utt)

    @property
    def active(self) -> int:
        return len(self._rows) + len(self._incoming)

    def busy(self) -> bool:
        """Work the worker can do now (it sleeps otherwise until `wake`): a new utterance, a row in a batch, or a
        parked row with new text, its end, or a cancel."""
        if self._incoming or any(b.rows for b in self._batches.values()):
            return True
        return any(u.deltas or u.cancelled.is_set() or self.past_grace() or (u.finished and not u.row.text.closed)
                   for u in self._rows.values())

    def step(self, pipe) -> None:
        """On the worker thread: join new utterances, read text, one frame of every batch (rows whose next window's
        ids are not final yet stay parked and hold no one up)."""
        with self._lock:
            new, self._incoming = self._incoming, []
        for utt in new:
            try:
                self._join(pipe, utt)
            except Exception as e:  # noqa: BLE001 - a bad voice file fails its session, not the worker
                logger.exception("A live utterance failed to start")
                utt.emit("error", e)
        for key, batch in list(self._batches.items()):
            members = [self._rows[id(r)] for r in batch.rows + batch.parked]
            for utt in members:
                self._read(utt)
            try:
                out = batch.step()
            except Exception as e:  # noqa: BLE001 - fail the batch's sessions, keep serving
                logger.exception("A live batch failed")
                for utt in members:
                    del self._rows[id(utt.row)]
                    utt.emit("error", e)
                del self._batches[key]
                continue
            for row, audio in out:
                utt = self._rows[id(row)]
                utt.frames += 1
                utt.emit("audio", np.asarray(audio))
            for utt in members:
                if utt.row.done:
                    del self._rows[id(utt.row)]
                    utt.emit("end", utt.row.stop)
            if not batch.active:
                del self._batches[key]

    def _join(self, pipe, utt: Utterance) -> None:
        import mlx.core as mx

        from ..generation import NoiseSource
        from ..preset_store import load_voice_preset
        from ..presets import PresetShape
        from ..text_stream import TextStream
        from ..windows import Batch, Row, TextIds, default_eos_rule

        if utt.cancelled.is_set():
            utt.emit("end", "cancelled")
            return
        if str(utt.voice) not in self._presets:
            self._presets[str(utt.voice)] = load_voice_preset(utt.voice, shape=PresetShape.from_config(pipe.config.raw))
        key = (utt.steps, utt.cfg_scale)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = Batch(pipe.model, utt.cfg_scale, utt.steps, pipe.dtype)
        source = NoiseSource(None, mx.random.key(utt.seed), pipe.config.acoustic_vae_dim)
        utt.stream = TextStream(pipe.tokenizer)
        utt.row = Row(TextIds(), lambda f: source()[0], self.eos_rule or default_eos_rule, utt.max_frames,
                      should_stop=lambda: utt.cancelled.is_set() or self.past_grace())
        self._read(utt)
        batch.add(utt.row, self._presets[str(utt.voice)])
        self._rows[id(utt.row)] = utt

    @staticmethod
    def _read(utt: Utterance) -> None:
        """The deltas received so far into final ids; the whole text's last ids once `input.done` came."""
        ids = utt.row.text
        if ids.closed:
            return
        while utt.deltas:
            ids.extend(utt.stream.feed(utt.deltas.popleft()))
        if utt.finished:
            ids.extend(utt.stream.close())
            ids.close()
