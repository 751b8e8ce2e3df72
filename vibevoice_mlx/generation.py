"""Speech generation for any backend: script -> segments -> frames -> responses, and the public API.

`stream_generate_batch` is the one orchestration: every script is parsed into segments and pauses, its voices
prepared and encoded, its seed split into voice, noise and sampling keys, and its segments handed to the
backend as jobs (`backend.SegmentJob`). The backend (the MLX engine, several scripts per forward pass; or the
PyTorch path) turns jobs into token and frame events; a `ScriptRun` turns those into `GenerationResponse`s with
the running figures, the length rule warnings and the `max_seconds` budget. `stream_generate`, `generate` and
`generate_batch` are views of it; on the 1.5B/7B it runs a `LiveBatch`, which also takes scripts that arrive
while it runs (the server's continuous batching).
"""

import logging
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .backend import NEXT, TRUNCATED, FrameSettings, Sampler, SegmentJob, greedy
from .constants import DEFAULT_CFG_SCALE, DEFAULT_STEPS, OPTION_RANGES, SAMPLE_RATE, check_option
from .errors import UserError
from .models import REALTIME
from .notices import warn_once
from .preflight import check_context
from .processor import Pause, build_prompt, parse_script, script_speakers
from .voices import prepare_voices

logger = logging.getLogger(__name__)

# noise(frame_index, shape) -> initial diffusion noise for that frame, or an array [frames, latent].
Noise = Union[Callable[[int, tuple], mx.array], np.ndarray, mx.array, None]


@dataclass
class GenerationConfig:
    """Generation settings in one place. steps and cfg_scale default to the model folder's generation config
    (`pipe.defaults`), else to the original demos' 10 steps and 1.3."""

    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    temperature: float = 0.0  # 0: greedy, as the original; >0 samples among the control tokens
    top_p: float = 1.0
    seed: Optional[int] = None
    max_seconds: Optional[float] = None
    voice_noise: bool = True  # σ-VAE noise on voice-prompt latents (architecture.md §3.3.5); off for parity
    prefill_chunk: int = 512
    free_memory_after_generate: bool = False  # release MLX/torch caches when the scripts are done
    compile: bool = True  # fuse each frame's diffusion, decode and re-encode with mx.compile (same results)

    def __post_init__(self):
        """Every option is checked before any work starts; a bad one is a one-line error naming it."""
        for name in OPTION_RANGES:
            value = getattr(self, name)
            if value is not None or name not in ("seed", "max_seconds"):  # those two may be left unset
                check_option(name, value)
        self.steps = int(self.steps)


@dataclass
class GenerationResponse:
    """One chunk of audio as it is produced, with running figures."""

    audio: np.ndarray  # float32 samples of this step: 3200 per frame, empty for a control token
    sample_rate: int
    token: Optional[int]
    frames: int
    audio_seconds: float
    elapsed: float
    frames_per_second: float
    real_time_factor: float  # audio seconds per wall second
    peak_memory_gb: float
    segment: int = 0
    is_pause: bool = False
    finished: bool = False
    truncated: bool = False
    seed: Optional[int] = None  # the script's seed, the one drawn when none was given: pass it to make this again


@dataclass
class GenerationResult:
    audio: np.ndarray
    sample_rate: int
    frames: int
    audio_seconds: float
    elapsed: float
    real_time_factor: float
    peak_memory_gb: float
    truncated: bool
    tokens: List[List[int]] = field(default_factory=list)
    seed: Optional[int] = None  # the seed used (drawn when none was given): pass it again for the same audio


def make_sampler(temperature: float, top_p: float, key: mx.array) -> Sampler:
    """Greedy at temperature 0, else temperature + top-p sampling among the allowed tokens, seeded by `key`."""
    if temperature <= 0:
        return greedy
    state = {"key": key}

    def sample(logits: mx.array, token_ids: Sequence[int]) -> int:
        probs = mx.softmax(logits / temperature, axis=-1)
        order = mx.argsort(-probs)
        sorted_p = probs[order]
        keep = (mx.cumsum(sorted_p) - sorted_p) < top_p  # always keeps the most likely token
        masked = mx.where(keep, sorted_p, 0.0)
        state["key"], sub = mx.random.split(state["key"])
        i = mx.random.categorical(mx.log(masked), key=sub)
        return int(token_ids[int(order[i].item())])

    return sample


def _peak_gb() -> float:
    try:
        return mx.get_peak_memory() / 1e9
    except Exception:  # not every backend reports memory
        return 0.0


def make_response(audio, token, frames: int, samples: int, start: float, seed: int, **flags) -> GenerationResponse:
    """A response with the running figures of a script that has made `frames` frames (`samples` samples of
    audio) since `start`."""
    elapsed = time.perf_counter() - start
    seconds = samples / SAMPLE_RATE
    return GenerationResponse(
        audio=audio, sample_rate=SAMPLE_RATE, token=token, frames=frames, audio_seconds=seconds, elapsed=elapsed,
        frames_per_second=frames / elapsed if elapsed else 0.0, real_time_factor=seconds / elapsed if elapsed else 0.0,
        peak_memory_gb=_peak_gb(), seed=seed, **flags)


def script_seed(config: GenerationConfig) -> int:
    """The seed a script runs with: the one given, else one drawn from the clock (reported, so it can be reused)."""
    return config.seed if config.seed is not None else int(time.time() * 1e6) % (2**31)


class NoiseSource:
    """Initial diffusion noise per frame: injected (callable or array) or drawn from a seeded MLX key."""

    def __init__(self, noise: Noise, key: mx.array, latent: int):
        self.noise, self.key, self.latent, self.index = noise, key, latent, 0

    @property
    def injected(self) -> bool:
        return self.noise is not None

    def __call__(self) -> mx.array:
        i, self.index = self.index, self.index + 1
        shape = (1, self.latent)
        if self.noise is None:
            self.key, sub = mx.random.split(self.key)
            return mx.random.normal(shape, key=sub)
        if callable(self.noise):
            x = self.noise(i, shape)
        else:
            if i >= len(self.noise):
                raise UserError(f"injected noise has {len(self.noise)} frames; frame {i} needs one more")
            x = self.noise[i]
        return mx.array(np.asarray(x, dtype=np.float32)).reshape(shape)


class ScriptRun:
    """One script's way through a run: its segments and pauses, voices, keys and budget, and its responses.

    The backend pulls jobs with `next_job` and reports what each step chose; `on_event` turns that into
    responses (pauses queued by `next_job` come out in order with them).
    """

    def __init__(self, pipe, script: str, voices, config: GenerationConfig, sampler: Optional[Sampler],
                 noise: Noise, stop: Optional[Callable[[], bool]], start: float):
        self.pipe, self.config, self.stop, self.start = pipe, config, stop, start
        self.items = parse_script(script)
        self.speakers = script_speakers(self.items)
        voice_arrays = prepare_voices(pipe, voices, len(self.speakers))
        if not voice_arrays:
            warn_once(logger, "No voice given: the model picks the voices itself.")  # once, not once a part
        self.seed = script_seed(config)
        key, voice_key, noise_key, sample_key = mx.random.split(mx.random.key(self.seed), 4)
        self.voices = pipe.backend.encode_voices(voice_arrays, config.voice_noise, voice_key)
        self.frames_per_voice = [int(v.shape[0]) if v.ndim == 2 else math.ceil(len(v) / pipe.hop_length)
                                 for v in voice_arrays]
        self.user_sampler = sampler
        self.sampler = sampler or make_sampler(config.temperature, config.top_p, sample_key)
        self.noise = NoiseSource(noise, noise_key, pipe.config.acoustic_vae_dim)
        hop = pipe.hop_length
        self.max_frames = None if config.max_seconds is None else math.ceil(config.max_seconds * SAMPLE_RATE / hop)
        self.index = -1  # the item being generated
        self.frames = self.samples = 0
        self.pending: List[GenerationResponse] = []
        self.done = False
        self.tokens: List[List[int]] = []

    def response(self, audio, token, **flags) -> GenerationResponse:
        return make_response(audio, token, self.frames, self.samples, self.start, self.seed,
                             segment=max(self.index, 0), **flags)

    def next_job(self) -> Optional[SegmentJob]:
        while not self.done:
            self.index += 1
            if self.index >= len(self.items) or (self.stop is not None and self.stop()):
                break
            item = self.items[self.index]
            if isinstance(item, Pause):
                silence = np.zeros(item.num_samples(SAMPLE_RATE), np.float32)
                self.samples += len(silence)
                self.pending.append(self.response(silence, None, is_pause=True))
                continue
            prompt = build_prompt(self.pipe.tokenizer, item.lines, self.frames_per_voice, self.pipe.tokens,
                                  num_speakers=len(self.speakers))
            check_context([len(prompt.input_ids)], self.pipe.config.max_positions, self.pipe.hop_length,
                          voices=bool(self.frames_per_voice))
            budget = None if self.max_frames is None else self.max_frames - self.frames
            return SegmentJob(prompt, self.voices, self.sampler, self.noise, budget, self.stop, self.seed)
        self.finish()
        return None

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.index = max(min(self.index, len(self.items) - 1), 0)
            self.pending.append(self.response(np.zeros(0, np.float32), None, finished=True))

    def on_event(self, token, audio) -> List[GenerationResponse]:
        out, self.pending = self.pending, []
        if token == NEXT:
            return out
        if token == TRUNCATED:
            at_limit = self.max_frames is not None and self.frames >= self.max_frames
            stopped = self.stop is not None and self.stop()
            if not stopped:
                logger.warning(
                    "Output cut short after %.1f s: %s.", self.samples / SAMPLE_RATE,
                    "the max_seconds limit; raise it to hear more" if at_limit else
                    f"part {self.index + 1} reached the model's length rule (2x its prompt, within the context); "
                    "split that part with [pause] tags",
                )
            out.append(self.response(np.zeros(0, np.float32), None, truncated=True, finished=at_limit or stopped))
            if at_limit or stopped:
                self.done = True
            return out
        while len(self.tokens) <= self.index:
            self.tokens.append([])
        self.tokens[self.index].append(int(token))
        if audio is not None:
            self.frames += 1
            self.samples += len(audio)
            out.append(self.response(audio, token))
        else:
            out.append(self.response(np.zeros(0, np.float32), token))
        return out


_PER_SCRIPT = ("seed", "max_seconds", "temperature", "top_p", "voice_noise")
_VOICE = (str, os.PathLike, np.ndarray)


def _voice_list(voices, i: int) -> Optional[list]:
    """One script's voices as a list; a single path or array is a one-voice list (a str is not read as letters)."""
    if voices is None or isinstance(voices, _VOICE):
        return None if voices is None else [voices]
    if isinstance(voices, (list, tuple)) and all(isinstance(v, _VOICE) for v in voices):
        return list(voices)
    raise UserError(f"voices of script {i + 1}: give a list of audio file paths, saved voices or float32 arrays, "
                    f"one per speaker (got {type(voices).__name__}).")


def _realtime(pipe) -> bool:
    return getattr(pipe, "family", None) == REALTIME


def check_call(pipe, scripts, voices, kwargs) -> List[Optional[list]]:
    """The one check of the public generation calls, before any work: a loaded pipeline, text scripts, voices
    (returned as one list per script) and option names (their values: `GenerationConfig`)."""
    realtime = _realtime(pipe)
    if not (hasattr(pipe, "backend") or realtime) or not hasattr(pipe, "tokenizer"):
        raise UserError(f"The first argument must be what vibevoice_mlx.load() returns, not a "
                        f"{type(pipe).__name__}: pipe = vv.load(model); vv.generate(pipe, script).")
    for i, script in enumerate(scripts):
        pieces = realtime and not isinstance(script, (str, bytes)) and hasattr(script, "__iter__")
        if not (isinstance(script, str) or pieces):
            fix = " (decode it first: script.decode('utf-8'))" if isinstance(script, bytes) else ""
            what = "text (str) or an iterable of text pieces" if realtime else "text (str)"
            raise UserError(f"script {i + 1} must be {what}, not {type(script).__name__}{fix}.")
    known = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        hooks = "eos_rule, noise and stop" if realtime else "sampler, noise and stop"
        raise UserError(f"Unknown keyword {unknown[0]!r}: generation takes {', '.join(sorted(known))}, {hooks}.")
    if voices is None:
        return [None] * len(scripts)
    if not isinstance(voices, (list, tuple)):
        raise UserError("voices of a batch: give one list (or None) per script.")
    if len(voices) != len(scripts):
        raise UserError(f"{len(voices)} voice lists for {len(scripts)} scripts: give one (or None) per script.")
    return [_voice_list(v, i) for i, v in enumerate(voices)]


def _pick(value, i: int, n: int, name: str):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"{name} has {len(value)} values for {n} scripts: give one per script.")
        return value[i]
    return value


def stream_generate_batch(
    pipe,
    scripts: Sequence[str],
    voices: Optional[Sequence[Optional[Sequence]]] = None,
    config: Optional[GenerationConfig] = None,
    sampler=None,
    noise=None,
    stop=None,
    eos_rule=None,
    **kwargs,
) -> Iterator[Tuple[int, GenerationResponse]]:
    """Generate several scripts together; yields (script index, response) as audio is produced.

    On the MLX backend the scripts run as one batch (two rows each through the language model per step, every
    row with its own stopping); a script's audio does not depend on its batch-mates. voices: one list per script
    (or None). Keyword arguments override fields of `config`; `seed`, `max_seconds`, `temperature`, `top_p`,
    `voice_noise`, `sampler`, `noise` and `stop` (a callable returning True to cancel that script at its next
    step) may be lists with one value per script; `steps` and `cfg_scale` are shared by the batch.
    For VibeVoice-Realtime-0.5B a script may also be an iterable of text pieces, its voices one preset, and
    `eos_rule(frame_index, probability) -> bool` decides its stop (default: probability > 0.5); `sampler` has no
    meaning there.
    """
    if isinstance(scripts, (str, bytes)):
        raise UserError("scripts must be a list of scripts; for one script call generate or stream_generate.")
    scripts = list(scripts)
    voices = check_call(pipe, scripts, voices, kwargs)  # misuse is refused now, not at the first step
    return _stream_batch(pipe, scripts, voices, config, sampler, noise, stop, eos_rule, kwargs)


def _stream_batch(pipe, scripts, voices, config, sampler, noise, stop, eos_rule, kwargs):
    n = len(scripts)
    if n == 0:
        return
    shared = {k: v for k, v in kwargs.items() if k not in _PER_SCRIPT}
    per_script = [{k: _pick(v, i, n, k) for k, v in kwargs.items() if k in _PER_SCRIPT} for i in range(n)]
    if _realtime(pipe):
        base = replace(config or GenerationConfig(**getattr(pipe, "defaults", {})), **shared)
        configs = [replace(base, **options) for options in per_script]
        yield from _stream_realtime(pipe, scripts, voices, configs, [_pick(noise, i, n, "noise") for i in range(n)],
                                    [_pick(stop, i, n, "stop") for i in range(n)],
                                    [_pick(eos_rule, i, n, "eos_rule") for i in range(n)], time.perf_counter())
    else:
        live = LiveBatch(pipe, config, **shared)
        base = live.config
        for i, script in enumerate(scripts):
            live.add(script, voices[i], sampler=_pick(sampler, i, n, "sampler"), noise=_pick(noise, i, n, "noise"),
                     stop=_pick(stop, i, n, "stop"), **per_script[i])
        for handle, r in live:
            yield handle.index, r
    if base.free_memory_after_generate:
        from .memory import free_memory

        free_memory()


class LiveHandle:
    """One script of a `LiveBatch`: `index` is its place in the order of `add`; `cancel()` ends it at the next
    step, which frees its rows; `done` once its last response (`finished`) is out."""

    def __init__(self, index: int):
        self.index, self.cancelled, self.done = index, False, False

    def cancel(self) -> None:
        self.cancelled = True


class LiveBatch:
    """A batch that takes new scripts while it runs (continuous batching, VibeVoice 1.5B/7B).

    `add(script, voices, **options)` returns a `LiveHandle`; iterating yields (handle, response) as audio is made.
    A script added while the batch runs is prefilled and joins at the next step; one that ends or is cancelled
    leaves at the next step. Iteration ends when every script added so far is done; scripts added after that
    start a new run on the next iteration. `steps`, `cfg_scale` (and `compile`, `prefill_chunk`) are shared by
    the batch; `seed`, `max_seconds`, `temperature`, `top_p`, `voice_noise`, `sampler`, `noise` and `stop` go
    per script. With `load(batch_invariant=True)` a script's audio equals its solo run bit for bit, whenever it
    joined and whoever shared the batch (tests/test_live_batch.py); add and iterate from one thread.
    """

    def __init__(self, pipe, config: Optional[GenerationConfig] = None, sampler: Optional[Sampler] = None,
                 **kwargs):
        check_call(pipe, [], None, kwargs)
        if _realtime(pipe):
            raise UserError("LiveBatch serves VibeVoice 1.5B and 7B; for the realtime model use "
                            "stream_generate_batch.")
        self.pipe, self.sampler = pipe, sampler
        self.config = replace(config or GenerationConfig(**getattr(pipe, "defaults", {})), **kwargs)
        c = self.config
        self.settings = FrameSettings(c.steps, c.cfg_scale, c.compile, c.prefill_chunk)
        self._runs: List[ScriptRun] = []  # the sources of the backend's current run (it sees them grow)
        self._handles: List[LiveHandle] = []
        self._added = 0

    def add(self, script: str, voices=None, sampler: Optional[Sampler] = None, noise: Noise = None,
            stop: Optional[Callable[[], bool]] = None, **options) -> LiveHandle:
        """Queue a script; it joins the batch at the next step. Its voices and options are checked now."""
        voices = check_call(self.pipe, [script], [voices], options)[0]
        shared = sorted(set(options) - set(_PER_SCRIPT))
        if shared:
            raise UserError(f"{shared[0]} is shared by a live batch: give it to LiveBatch(...), not to add().")
        handle = LiveHandle(self._added)
        stopped = (lambda: handle.cancelled) if stop is None else (lambda: handle.cancelled or stop())
        run = ScriptRun(self.pipe, script, voices, replace(self.config, **options), sampler or self.sampler, noise,
                        stopped, time.perf_counter())
        self._added += 1
        self._runs.append(run)
        self._handles.append(handle)
        return handle

    def __iter__(self) -> Iterator[Tuple[LiveHandle, GenerationResponse]]:
        while self._runs:
            runs, handles = self._runs, self._handles
            for i, token, audio in self.pipe.backend.run(runs, self.settings):
                yield from self._out(handles[i], runs[i].on_event(token, audio))
            seen = len(runs)  # scripts added while the last responses go out start the next run
            for i in range(seen):
                runs[i].finish()
                yield from self._out(handles[i], runs[i].on_event(NEXT, None))
            self._runs, self._handles = runs[seen:], handles[seen:]

    @staticmethod
    def _out(handle: LiveHandle, responses: List[GenerationResponse]):
        for r in responses:
            handle.done |= r.finished
            yield handle, r


def _stream_realtime(pipe, scripts, voices, configs, noises, stops, eos_rules, start):
    """The realtime family's events (realtime_api.events) as responses: one per frame, then an empty `finished`
    one per script (`truncated` unless its EOS rule stopped it)."""
    from .realtime_api import events

    seeds = [script_seed(c) for c in configs]
    sources = [NoiseSource(noises[i], mx.random.key(seeds[i]), pipe.config.acoustic_vae_dim)
               for i in range(len(scripts))]
    frames = [0] * len(scripts)
    for i, audio, stop in events(pipe, scripts, voices, configs, [lambda f, s=s: s()[0] for s in sources], stops,
                                 eos_rules):
        if audio is not None:
            frames[i] += 1
            yield i, make_response(audio, None, frames[i], frames[i] * pipe.hop_length, start, seeds[i])
        else:
            yield i, make_response(np.zeros(0, np.float32), None, frames[i], frames[i] * pipe.hop_length, start,
                                   seeds[i], finished=True, truncated=stop != "eos")


def stream_generate(pipe, script: str, voices: Optional[Sequence] = None, config: Optional[GenerationConfig] = None,
                    sampler: Optional[Sampler] = None, noise: Noise = None, eos_rule=None,
                    **kwargs) -> Iterator[GenerationResponse]:
    """Generate speech for `script`, yielding audio chunks (3200 samples per frame) as they are produced.

    pipe: what `vibevoice_mlx.load` returned. voices: one per speaker, in speaker order: audio file paths, float32
    arrays at 24 kHz, or saved voices (.safetensors from `save_voice`); a single one may be given as it is. Keyword arguments override fields of
    `config` (steps, cfg_scale, temperature, top_p, seed, max_seconds, voice_noise). `sampler(logits, token_ids)`
    chooses the next token among the control tokens; `noise` supplies each frame's initial diffusion noise;
    `stop()` returning True ends the script at its next step.
    """
    return (r for _, r in stream_generate_batch(pipe, [script], [voices], config, [sampler], [noise],
                                                eos_rule=[eos_rule], **kwargs))


def _result(responses: List[GenerationResponse], tokens: List[List[int]]) -> GenerationResult:
    audio = np.concatenate([r.audio for r in responses]) if responses else np.zeros(0, np.float32)
    last = responses[-1] if responses else None
    seconds = len(audio) / SAMPLE_RATE
    return GenerationResult(
        audio=audio.astype(np.float32), sample_rate=SAMPLE_RATE, frames=last.frames if last else 0,
        audio_seconds=seconds, elapsed=last.elapsed if last else 0.0,
        real_time_factor=seconds / last.elapsed if last and last.elapsed else 0.0,
        peak_memory_gb=last.peak_memory_gb if last else 0.0, truncated=any(r.truncated for r in responses),
        tokens=tokens, seed=last.seed if last else None,
    )


def _tokens(responses: List[GenerationResponse]) -> List[List[int]]:
    tokens: List[List[int]] = []
    for r in responses:
        if r.token is not None:
            while len(tokens) <= r.segment:
                tokens.append([])
            tokens[r.segment].append(r.token)
    return tokens


def generate_batch(pipe, scripts: Sequence[str], voices=None, **kwargs) -> List[GenerationResult]:
    """Generate several scripts together (see `stream_generate_batch`); one `GenerationResult` per script, in
    order."""
    responses: List[List[GenerationResponse]] = [[] for _ in scripts]
    for i, r in stream_generate_batch(pipe, scripts, voices, **kwargs):
        responses[i].append(r)
    return [_result(rs, _tokens(rs)) for rs in responses]


def generate(pipe, script: str, voices: Optional[Sequence] = None, **kwargs) -> GenerationResult:
    """Generate the whole script; returns the audio (float32, mono, 24 kHz) with timing figures.

    Takes the arguments of `stream_generate`. `tokens` lists the chosen control tokens of each segment.
    """
    responses = list(stream_generate(pipe, script, voices, **kwargs))
    return _result(responses, _tokens(responses))
