"""The MLX engine: the per-frame loop of architecture.md §6, for B scripts at once.

One loop step = one LM token for every live script. Each script owns two rows of one `CFGCache` (its positive
and negative branch), so a step is one batched forward of 2B rows and the weights are read once however many
scripts run. A row that chose `speech_diffusion` produces a latent frame through the diffusion head, decoded to
3200 samples by the streaming σ-VAE decoder and fed back through the streaming semantic encoder; every row keeps
its own stopping, negative-branch restarts and tokenizer stream state, and a script that finishes a segment is
replaced by its next segment (or leaves the batch) without disturbing the others. A script's rows never mix with
another's, but a BLAS rounds a row by the shape of the product it is in, so its audio equals that script generated
alone only within float32 rounding, which later frames can amplify. `batch_invariant=True` runs every product once
per script (invariant.py, `backbone.ScriptAttention`): then it is equal bit for bit (tests/test_batch_invariance.py).
"""

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import backbone, invariant
from .backend import NEXT, TRUNCATED, Event, FrameSettings, JobSource, SegmentJob
from .errors import NumericsError
from .models.vibevoice import Model
from .processor import SpecialTokens
from .scheduler import DPMSolver, guided_step, sample_latent

logger = logging.getLogger(__name__)


class FrameStep:
    """Everything a speech frame does after the LM step (compiled unless `compile=False`), for any step count and
    guidance scale: both are inputs of the compiled functions, not constants of a trace.

    (pos_h, neg_h, noise, decoder state, semantic state, steps, cfg_scale) -> (latent z, audio, next input
    embedding, states) for N rows: the CFG diffusion sampling (§6.5), the streaming σ-VAE decode and semantic
    re-encode (§3.3.4) and the connectors (§6.3 step 7f). The sampler's loop runs in Python around one compiled
    solver step (`scheduler.guided_step`), traced once however many steps a run takes: unrolled, a 100-step graph
    took minutes to compile on the CPU. The decode, re-encode and connectors are fused into one compiled call.
    `profile` runs the same stages one at a time, for the stage timings of `bench`.
    """

    def __init__(self, model: Model, solver: DPMSolver, dtype, compile: bool = True):
        m = model.model
        head = m.prediction_head
        dec, sem = m.acoustic_tokenizer.decoder, m.semantic_tokenizer.encoder
        self.solver, self.head, self.dtype = solver, head, dtype
        self._schedules: Dict[int, tuple] = {}

        def decode(z, dec_state):
            return dec.stream(model.unscale_latents(z)[:, None, :].astype(dtype), dec_state)

        def encode(audio, sem_state):
            return sem.stream(audio, sem_state)

        def connect(z, s):
            return m.acoustic_connector(z[:, None, :].astype(dtype)) + m.semantic_connector(s.astype(dtype))

        def finish(z, dec_state, sem_state):
            audio, dec_state = decode(z, dec_state)
            s, sem_state = encode(audio, sem_state)
            return audio, connect(z, s), dec_state, sem_state

        def step(x, prev_x0, modulations, coefficients, cfg_scale):
            return guided_step(head, x, prev_x0, modulations, coefficients, cfg_scale)

        wrap = mx.compile if compile else (lambda f: f)
        self._step, self._finish = wrap(step), wrap(finish)
        self._stages = (decode, encode, connect)
        self._compile = compile
        self._profiled = None

    def schedule(self, steps: int):
        """(schedule, its timestep embeddings): computed once per step count, then only read."""
        if steps not in self._schedules:
            schedule = self.solver.schedule(steps)
            t_emb = self.head.t_embedder(schedule.timesteps)
            mx.eval(t_emb)
            self._schedules[steps] = (schedule, t_emb)
        return self._schedules[steps]

    def diffuse(self, pos_h, neg_h, noise, steps: int, cfg_scale: float) -> mx.array:
        schedule, t_emb = self.schedule(steps)
        return sample_latent(self.head, pos_h, neg_h, noise, schedule, mx.array(cfg_scale, mx.float32),
                             t_embeddings=t_emb, step=self._step)

    def __call__(self, pos_h, neg_h, noise, dec_state, sem_state, steps: int, cfg_scale: float):
        z = self.diffuse(pos_h, neg_h, noise, steps, cfg_scale)
        return (z, *self._finish(z, dec_state, sem_state))

    def profile(self, pos_h, neg_h, noise, dec_state, sem_state, steps: int, cfg_scale: float):
        """A call's outputs, computed stage by stage (each compiled on its own, evaluated before the next starts),
        and the seconds each stage took. The barriers cost a little: a plain call is the speed a run gets."""
        if self._profiled is None:
            self._profiled = [mx.compile(f) if self._compile else f for f in self._stages]
        decode, encode, connect = self._profiled
        seconds = {}

        def timed(name, f, *args):
            start = time.perf_counter()
            out = f(*args)
            mx.eval(out)
            seconds[name] = time.perf_counter() - start
            return out

        z = timed("diffusion head", self.diffuse, pos_h, neg_h, noise, steps, cfg_scale)
        audio, dec_state = timed("decoder", decode, z, dec_state)
        s, sem_state = timed("semantic encoder", encode, audio, sem_state)
        x = timed("connectors", connect, z, s)
        return (z, audio, x, dec_state, sem_state), seconds


@dataclass
class _Row:
    """One live script in the batch: its source, current segment job and per-segment counters."""

    source: int
    job: SegmentJob
    x: mx.array  # the next input embedding [1, 1, H]
    max_steps: int
    step: int = 0
    frames: int = 0


class _Float32Frame:
    """Float32 copies of what a frame step uses (head, decoder, semantic encoder, connectors), shaped like the
    model for `FrameStep`; made only when a half-precision run needs them (about 3 GB for the real sizes)."""

    def __init__(self, model: Model):
        import copy
        from types import SimpleNamespace

        m = model.model
        parts = {}
        for name in ("prediction_head", "acoustic_connector", "semantic_connector"):
            parts[name] = copy.deepcopy(getattr(m, name))
        parts["acoustic_tokenizer"] = SimpleNamespace(decoder=copy.deepcopy(m.acoustic_tokenizer.decoder))
        parts["semantic_tokenizer"] = SimpleNamespace(encoder=copy.deepcopy(m.semantic_tokenizer.encoder))
        for module in (parts["prediction_head"], parts["acoustic_connector"], parts["semantic_connector"],
                       parts["acoustic_tokenizer"].decoder, parts["semantic_tokenizer"].encoder):
            module.set_dtype(mx.float32)
        self.model = SimpleNamespace(**parts)
        self.config = model.config
        self.unscale_latents = model.unscale_latents  # float32 already


def _take(state: List[mx.array], rows: mx.array) -> List[mx.array]:
    return [s[rows] for s in state]


class MLXBackend:
    """The MLX implementation of `backend.Backend`; holds the model, its 4 scored head rows and compiled steps."""

    name = "mlx"

    def __init__(self, model: Model, tokens: SpecialTokens, max_batch: int = 8, decode_layout: Optional[bool] = None,
                 queue_ahead: Optional[bool] = None, batch_invariant: bool = False):
        self.model = model
        self.batch_invariant = batch_invariant
        self.tokens = tokens
        self.max_batch = max_batch
        # Queue the next LM step behind a frame before reading the frame's audio (default: on a GPU). On MLX's
        # CPU backend `async_eval` of a graph of more than a few ops returns only when most of it has run
        # (measured on the 1.5B: a frame step's async_eval took 1.07 s of its 1.07 s), so there nothing would
        # overlap and every chunk of audio would reach the caller one LM step (0.7 s) late.
        self.queue_ahead = mx.default_device() != mx.cpu if queue_ahead is None else queue_ahead
        self.solver = DPMSolver.from_config(model.config.scheduler)
        self.control_ids = tokens.control_ids
        self.head_rows = model.head_rows(self.control_ids)
        mx.eval(self.head_rows)
        if not model.config.tie_word_embeddings and "lm_head" in model:
            # Only the control tokens are ever scored: the rest of an untied head is dead weight (7B: 1.1 GB).
            del model.lm_head
        m = model.model
        parts = (m.language_model, m.prediction_head, m.acoustic_tokenizer.decoder, m.semantic_tokenizer.encoder,
                 m.acoustic_connector, m.semantic_connector)
        if batch_invariant or (mx.default_device() == mx.cpu if decode_layout is None else decode_layout):
            # The weights a frame reads, in the layout the CPU's sgemm reads fastest (backbone.DecodeLinear, which
            # also carries the per-script products of `batch_invariant`).
            for part in parts:
                backbone.to_decode_layout(part)
        if batch_invariant:
            # One product per script (invariant.py): the language model's rows come in CFG pairs, every other
            # part's batch axis has one entry per script.
            backbone.batch_invariant(m.language_model)
            for part in parts:
                invariant.set_group(part, 2 if part is m.language_model else 1)
        self._frame_steps: Dict[tuple, FrameStep] = {}  # (dtype, compile): steps and cfg scale are its inputs

    @property
    def encoder_fingerprint(self) -> str:
        """Identifies the acoustic encoder's weights (whatever the dtype they were loaded in), so a saved voice
        used with another model is noticed."""
        import hashlib

        enc = self.model.model.acoustic_tokenizer.encoder
        h = hashlib.sha1()
        for w in (enc.downsample_layers[0][0].conv.conv.weight, enc.head.conv.conv.weight):
            h.update(np.array(w.astype(mx.float16)).tobytes())
        return h.hexdigest()[:16]

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.model.language_model.embed_tokens.weight.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("mlx.core.", "")

    def free(self) -> None:
        mx.clear_cache()

    # --- voices -----------------------------------------------------------------------------------------------

    def voice_latents(self, voices: List[np.ndarray]) -> List[np.ndarray]:
        """σ-VAE means of the voices, fresh clips encoded as one batch zero-padded to the longest, as the
        original does (the last partial frame of a shorter clip depends on it); saved latents pass through."""
        tok = self.model.model.acoustic_tokenizer
        hop = self.model.config.hop_length
        out: List[Optional[np.ndarray]] = [v if v.ndim == 2 else None for v in voices]
        fresh = [i for i, v in enumerate(voices) if v.ndim == 1]
        if fresh:
            longest = max(len(voices[i]) for i in fresh)
            batch = np.zeros((len(fresh), longest, 1), np.float32)
            for row, i in enumerate(fresh):
                batch[row, : len(voices[i]), 0] = voices[i]
            mean = tok.encoder(mx.array(batch), compile=True).astype(mx.float32)
            for row, i in enumerate(fresh):
                out[i] = np.array(mean[row, : math.ceil(len(voices[i]) / hop)])
        return [np.asarray(z, np.float32) for z in out]

    def encode_voices(self, voices: List[np.ndarray], voice_noise: bool, key: mx.array) -> List[mx.array]:
        """Voice-prompt latents, one [frames, vae_dim] array per voice, normalized for the LM."""
        tok = self.model.model.acoustic_tokenizer
        latents = []
        for z in self.voice_latents(voices):
            z = mx.array(z)
            if voice_noise and tok.vae_std > 0:
                # σ-VAE sampling: one noise scale per clip, then per-value Gaussian noise.
                key, k1, k2 = mx.random.split(key, 3)
                z = tok.sample(z[None], mx.random.normal((1,), key=k1), mx.random.normal((1, *z.shape), key=k2))[0]
            latents.append(self.model.scale_latents(z))
        return latents

    # --- the frame loop ---------------------------------------------------------------------------------------

    def frame_step(self, settings: FrameSettings, dtype: Optional[mx.Dtype] = None) -> FrameStep:
        """The compiled frame step for these settings; `dtype=float32` runs the frame stages on float32 copies
        (the numerical recovery of a half-precision run)."""
        dtype = dtype or self.dtype
        key = (dtype, settings.compile)
        if key not in self._frame_steps:
            model = self.model if dtype == self.dtype else _Float32Frame(self.model)
            self._frame_steps[key] = FrameStep(model, self.solver, dtype, settings.compile)
        return self._frame_steps[key]

    def _lm_step(self, rows: List[_Row], cache: backbone.CFGCache):
        """Queue one batched LM step of every row's two branches -> (pos_h, neg_h, control logits, finite)."""
        x = mx.concatenate([r.x for r in rows])
        h = backbone.forward(self.model.language_model, mx.repeat(x, 2, axis=0).astype(self.dtype), cache)
        pos_h, neg_h = h[0::2, -1], h[1::2, -1]
        logits = invariant.matmul(pos_h.astype(mx.float32)[:, None], self.head_rows.T, int(self.batch_invariant))[:, 0]
        finite = mx.all(mx.isfinite(logits), axis=-1)
        mx.async_eval(neg_h, logits, finite)
        return pos_h, neg_h, logits, finite

    @staticmethod
    def _frame(frame_step, settings, rows, pos_h, neg_h, noise, dec_state, sem_state):
        """Queue the frame step -> (float32 audio [N, hop], next embeddings, states, whether `rows` are finite)."""
        _, audio, x, new_dec, new_sem = frame_step(pos_h, neg_h, noise, dec_state, sem_state, settings.steps,
                                                   settings.cfg_scale)
        audio = audio[..., 0].astype(mx.float32)
        finite = mx.all(mx.isfinite(x[mx.array(rows)]))
        mx.async_eval(audio, x, new_dec, new_sem, finite)
        return audio, x, new_dec, new_sem, finite

    def _read(self, audio, finite, rows, recover: bool) -> Optional[np.ndarray]:
        """Wait for a queued frame (only for it) and read its audio back. With `recover` in a half-precision run,
        a non-finite result of the rows that made a frame gives None, for the caller to redo the frame."""
        chunks = np.array(audio)
        if recover and self.dtype != mx.float32 and not (finite.item() and np.isfinite(chunks[rows]).all()):
            return None
        return chunks

    def _prefill(self, source: int, job: SegmentJob, chunk: int):
        """A segment's prompt through the positive branch alone -> (its row, its one-slot CFG cache)."""
        lm = self.model.language_model
        prompt = job.prompt
        embeds = self.model.prompt_embeddings(prompt.input_ids, prompt.speech_input_mask, job.voices)
        cache = backbone.make_cache(lm)
        if embeds.shape[1] > 1:
            backbone.prefill(lm, embeds[:, :-1], cache, chunk)
        # The prompt ends with speech_start: the positive branch's last prompt token and the negative branch's
        # first input are the same embedding, so both start with one batched step.
        n = len(prompt.input_ids)
        max_steps = min(self.model.config.max_positions - n, 2 * n)  # the original's length rule (§6.6)
        return _Row(source, job, embeds[:, -1:], max_steps), backbone.CFGCache.from_prompt(cache)

    def profile(self, job: SegmentJob, settings: FrameSettings, frames: int) -> Dict[str, List[float]]:
        """Seconds per stage of `frames` speech frames of one segment run alone, every stage evaluated before the
        next: "prefill" (the prompt through the positive branch) once, then per frame "language model" (`_lm_step`:
        one batched step of both branches and the 4 control logits), "token choice" (their argmax) and the
        `FrameStep` stages. The same work as `run` with every step a frame; only the barriers are added."""
        frame_step = self.frame_step(settings)
        dec, sem = self.model.model.acoustic_tokenizer.decoder, self.model.model.semantic_tokenizer.encoder
        start = time.perf_counter()
        row, cache = self._prefill(0, job, settings.prefill_chunk)
        mx.eval(row.x, [c.state[:2] for c in cache])
        out: Dict[str, List[float]] = {"prefill": [time.perf_counter() - start]}
        dec_state, sem_state = dec.make_state(1), sem.make_state(1)
        for _ in range(frames):
            start = time.perf_counter()
            pos_h, neg_h, logits, _ = self._lm_step([row], cache)
            mx.eval(pos_h, neg_h, logits)
            lm_done = time.perf_counter()
            mx.argmax(logits, axis=-1).item()
            chose = time.perf_counter()
            (_, _, row.x, dec_state, sem_state), seconds = frame_step.profile(
                pos_h, neg_h, mx.array(job.noise()), dec_state, sem_state, settings.steps, settings.cfg_scale)
            seconds.update({"language model": lm_done - start, "token choice": chose - lm_done})
            for name, value in seconds.items():
                out.setdefault(name, []).append(value)
        return out

    def run(self, sources: Sequence[JobSource], settings: FrameSettings) -> Iterator[Event]:
        """The events of every source's jobs; a source appended to `sources` while this runs joins the batch at
        the next step. Ends when no row runs and no source waits."""
        m = self.model.model
        dec, sem = m.acoustic_tokenizer.decoder, m.semantic_tokenizer.encoder
        t = self.tokens
        allowed = self.control_ids
        frame_step = self.frame_step(settings)
        latent_dim = self.model.config.acoustic_vae_dim

        waiting: deque = deque()
        seen = 0  # sources may be appended while this runs (generation.LiveBatch): each joins at the next step
        rows: List[_Row] = []
        cache: Optional[backbone.CFGCache] = None
        dec_state: List[mx.array] = []
        sem_state: List[mx.array] = []
        queued = None  # the next LM step, queued behind the frame that feeds it (the rows did not change)
        while True:
            waiting.extend(range(seen, len(sources)))
            seen = len(sources)
            # A queued LM step is for the rows as they are: a newcomer then enters one step later.
            while waiting and len(rows) < self.max_batch and queued is None:
                i = waiting.popleft()
                job = sources[i].next_job()
                yield i, NEXT, None
                if job is None:
                    continue
                row, row_cache = self._prefill(i, job, settings.prefill_chunk)
                rows.append(row)
                if cache is None:
                    cache, dec_state, sem_state = row_cache, dec.make_state(1), sem.make_state(1)
                else:
                    cache.add(row_cache)
                    dec_state = [mx.concatenate([a, b]) for a, b in zip(dec_state, dec.make_state(1))]
                    sem_state = [mx.concatenate([a, b]) for a, b in zip(sem_state, sem.make_state(1))]
            if not rows and not waiting and seen == len(sources):
                break
            if not rows:
                continue

            pos_h, neg_h, logits, finite = queued or self._lm_step(rows, cache)
            queued = None
            finite = np.array(finite)  # the one wait for the LM: the token choice needs its logits
            events, diffuse, ended, restart, fresh_streams = [], [], [], [], []
            for k, r in enumerate(rows):
                if not finite[k]:
                    raise NumericsError(f"non-finite language-model output at step {r.step} ({self.dtype_name})",
                                        self.dtype_name)
                token = r.job.sampler(logits[k], allowed)
                if token not in allowed:
                    raise ValueError(f"sampler returned token {token}, not one of the control tokens {allowed}")
                stop = r.job.should_stop is not None and r.job.should_stop()
                over = r.job.max_frames is not None and r.frames >= r.job.max_frames
                if r.step == r.max_steps or stop or (over and token == t.speech_diffusion):
                    events.append((r.source, TRUNCATED, None))
                    ended.append(k)
                elif token == t.eos:
                    events.append((r.source, token, None))
                    ended.append(k)
                elif token == t.speech_diffusion:
                    diffuse.append(k)
                else:
                    events.append((r.source, token, None))
                    if token == t.speech_end:
                        fresh_streams.append(k)  # the original zeroes the tokenizers' streaming caches
                    elif token == t.speech_start:
                        restart.append(k)
                    r.x = self.model.embed_tokens(mx.array([[token]]))
                r.step += 1

            # This step's cache and stream bookkeeping does not depend on its frame, so it comes first: the next
            # LM step can then be queued behind the frame (`queue_ahead`) and run while its audio is handed out.
            idle = [k for k in range(len(rows)) if k not in diffuse]
            if idle:
                cache.drop_negative(idle)  # on a step without a frame the negative branch would not have run
            if restart:
                cache.reset_negative(restart)
            if fresh_streams:
                reset = np.zeros(len(rows), bool)
                reset[fresh_streams] = True
                dec_state = dec.reset_rows(dec_state, mx.array(reset))
                sem_state = sem.reset_rows(sem_state, mx.array(reset))
            if diffuse:
                noise = [mx.zeros((1, latent_dim))] * len(rows)
                for k in diffuse:
                    noise[k] = mx.array(rows[k].job.noise(), mx.float32).reshape(1, latent_dim)
                noise = mx.concatenate(noise)
                keep = None
                if len(diffuse) < len(rows):  # rows without a frame this step keep their streams as they were
                    keep = np.zeros(len(rows), bool)
                    keep[diffuse] = True
                    keep = mx.array(keep)[:, None, None]
                while True:
                    audio, xn, new_dec, new_sem, ok = self._frame(frame_step, settings, diffuse, pos_h, neg_h,
                                                                  noise, dec_state, sem_state)
                    for k in diffuse:
                        rows[k].x = xn[k:k + 1]
                    if self.queue_ahead and not ended and not (waiting and len(rows) < self.max_batch):
                        queued = self._lm_step(rows, cache)
                    chunks = self._read(audio, ok, diffuse, recover=frame_step.dtype != mx.float32)
                    if chunks is not None:
                        break
                    # An activation overflowed in a half-precision dtype: this frame again, with the diffusion
                    # head, decoder, semantic encoder and connectors in float32, and so on for the rest of the run.
                    logger.warning("Non-finite values in frame %d (%s); recomputed it with the frame stages in "
                                   "float32, which the rest of this run keeps.", rows[diffuse[0]].frames + 1,
                                   self.dtype_name)
                    if queued is not None:
                        cache.drop_last()  # the queued LM step read the overflowed frame
                        queued = None
                    frame_step = self.frame_step(settings, mx.float32)
                    pos_h, neg_h = pos_h.astype(mx.float32), neg_h.astype(mx.float32)
                    dec_state = [a.astype(mx.float32) for a in dec_state]
                    sem_state = [a.astype(mx.float32) for a in sem_state]
                if keep is None:
                    dec_state, sem_state = new_dec, new_sem
                else:
                    dec_state = [mx.where(keep, n, o) for n, o in zip(new_dec, dec_state)]
                    sem_state = [mx.where(keep, n, o) for n, o in zip(new_sem, sem_state)]
                for k in diffuse:
                    r = rows[k]
                    if not np.isfinite(chunks[k]).all():
                        raise NumericsError(f"non-finite audio in frame {r.frames + 1} ({self.dtype_name})",
                                            "float32" if frame_step.dtype == mx.float32 else self.dtype_name)
                    r.frames += 1
                    events.append((r.source, t.speech_diffusion, chunks[k]))
            yield from events

            if ended:
                kept = [k for k in range(len(rows)) if k not in ended]
                waiting.extendleft(reversed([rows[k].source for k in ended]))  # their next segment, first
                rows = [rows[k] for k in kept]
                if rows:
                    cache.keep(kept)
                    idx = mx.array(kept)
                    dec_state, sem_state = _take(dec_state, idx), _take(sem_state, idx)
                else:
                    cache, dec_state, sem_state = None, [], []
