"""Speech generation: the per-frame loop (architecture.md §6), `stream_generate` and `generate`.

One loop step = one LM token. The positive and negative (CFG) branches run as one batch of two over a
`CFGCache`; a `speech_diffusion` token produces one latent frame through the diffusion head, which is decoded
to 3200 samples by the streaming σ-VAE decoder and fed back through the streaming semantic encoder.
"""

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import backbone
from .scheduler import DPMSolver, sample_latent

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000

# sampler(logits, token_ids) -> chosen token id; `logits` are float32 over the allowed control tokens only.
Sampler = Callable[[mx.array, Sequence[int]], int]
# noise(frame_index, shape) -> initial diffusion noise for that frame, or an array [frames, latent].
Noise = Union[Callable[[int, tuple], mx.array], np.ndarray, mx.array, None]


class NumericsError(ValueError):
    """Inf or NaN during generation: in float16, an activation overflowed (architecture.md §8)."""

    def __init__(self, what: str):
        super().__init__(f"{what}: a float16 overflow is the likely cause; run again with --dtype bfloat16 "
                         "(dtype='bfloat16') or float32.")


@dataclass
class GenerationConfig:
    """Generation defaults in one place (the original demos: 10 steps, cfg 1.3, greedy)."""

    steps: int = 10
    cfg_scale: float = 1.3
    temperature: float = 0.0  # 0: greedy, as the original; >0 samples among the control tokens
    top_p: float = 1.0
    seed: Optional[int] = None
    max_seconds: Optional[float] = None
    voice_noise: bool = True  # σ-VAE noise on voice-prompt latents (architecture.md §3.3.5); off for parity
    prefill_chunk: int = 512
    free_memory_after_generate: bool = False  # release MLX/torch caches when the script is done
    compile: bool = True  # fuse each frame's diffusion, decode and re-encode with mx.compile (same results)


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


def greedy(logits: mx.array, token_ids: Sequence[int]) -> int:
    return int(token_ids[int(mx.argmax(logits).item())])


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


class NoiseSource:
    """Initial diffusion noise per frame: injected (callable or array) or drawn from a seeded MLX key."""

    def __init__(self, noise: Noise, key: mx.array, latent: int):
        self.noise, self.key, self.latent, self.index = noise, key, latent, 0

    def next(self) -> mx.array:
        i, self.index = self.index, self.index + 1
        shape = (1, self.latent)
        if self.noise is None:
            self.key, sub = mx.random.split(self.key)
            return mx.random.normal(shape, key=sub)
        if callable(self.noise):
            x = self.noise(i, shape)
        else:
            if i >= len(self.noise):
                raise ValueError(f"injected noise has {len(self.noise)} frames; frame {i} needs one more")
            x = self.noise[i]
        return mx.array(np.asarray(x, dtype=np.float32)).reshape(shape)


def encode_voices(model, voices: List[np.ndarray], voice_noise: bool, key: mx.array) -> List[mx.array]:
    """Voice-prompt acoustic latents, one [frames, vae_dim] array per voice, normalized for the LM.

    Fresh clips are encoded as one batch zero-padded to the longest, as the original does (the last partial frame
    of a shorter clip depends on it); saved voices (already encoded means) are used as they are.
    """
    tok = model.model.acoustic_tokenizer
    hop = model.config.hop_length
    out: List[Optional[mx.array]] = [None] * len(voices)
    fresh = [i for i, v in enumerate(voices) if v.ndim == 1]
    if fresh:
        longest = max(len(voices[i]) for i in fresh)
        batch = np.zeros((len(fresh), longest, 1), np.float32)
        for row, i in enumerate(fresh):
            batch[row, : len(voices[i]), 0] = voices[i]
        mean = tok.encoder(mx.array(batch))
        for row, i in enumerate(fresh):
            out[i] = mean[row, : math.ceil(len(voices[i]) / hop)]
    for i, v in enumerate(voices):
        if v.ndim == 2:
            out[i] = mx.array(v.astype(np.float32))
    latents = []
    for z in out:
        if voice_noise and tok.vae_std > 0:
            # σ-VAE sampling: one noise scale per clip, then per-value Gaussian noise.
            key, k1, k2 = mx.random.split(key, 3)
            z = tok.sample(z[None], mx.random.normal((1,), key=k1), mx.random.normal((1, *z.shape), key=k2))[0]
        latents.append(model.scale_latents(z))
    return latents


def _prompt_embeddings(model, input_ids: List[int], speech_mask: List[bool], voice_latents: List[mx.array]):
    embeds = model.embed_tokens(mx.array(input_ids)[None])
    if voice_latents:
        feats = mx.concatenate(voice_latents, axis=0).astype(embeds.dtype)
        voice_embeds = model.model.acoustic_connector(feats)
        positions = np.flatnonzero(np.asarray(speech_mask))
        if len(positions) != voice_embeds.shape[0]:
            raise ValueError(f"prompt has {len(positions)} voice slots but the voices give {voice_embeds.shape[0]}")
        embeds[0, mx.array(positions)] = voice_embeds
    return embeds


class FrameStep:
    """Everything a speech frame does after the LM step, as one function (compiled unless `compile=False`).

    (pos_h, neg_h, noise, decoder state, semantic state) -> (latent z, audio, next input embedding, states):
    the CFG diffusion sampling (§6.5), the streaming σ-VAE decode and semantic re-encode (§3.3.4) and the
    connectors (§6.3 step 7f). mx.compile fuses its hundreds of small ops; tests check it equals the eager path.
    """

    def __init__(self, model, steps: int, cfg_scale: float, dtype, compile: bool = True):
        m = model.model
        solver = DPMSolver()
        # Computed on the host once, so that the traced function only reads the cached array.
        m.prediction_head.timestep_embeddings(solver.timesteps(steps))

        def step(pos_h, neg_h, noise, dec_state, sem_state):
            z = sample_latent(m.prediction_head, pos_h, neg_h, noise, steps, cfg_scale, solver)
            latent = model.unscale_latents(z)[:, None, :].astype(dtype)
            audio, dec_state = m.acoustic_tokenizer.decoder.stream(latent, dec_state)
            sem, sem_state = m.semantic_tokenizer.encoder.stream(audio, sem_state)
            x = m.acoustic_connector(z[:, None, :].astype(dtype)) + m.semantic_connector(sem.astype(dtype))
            return z, audio, x, dec_state, sem_state

        self.key = (id(model), steps, cfg_scale, dtype, compile)
        self.fn = mx.compile(step) if compile else step

    @classmethod
    def for_model(cls, model, steps, cfg_scale, dtype, compile=True) -> "FrameStep":
        """One per model and settings, kept on the model so that compilation happens once."""
        cache = model.__dict__.setdefault("_frame_steps", {})
        key = (steps, cfg_scale, dtype, compile)
        if key not in cache:
            cache[key] = cls(model, steps, cfg_scale, dtype, compile)
        return cache[key]

    def __call__(self, *args):
        return self.fn(*args)


def generate_segment(
    model,
    input_ids: List[int],
    speech_mask: List[bool],
    voice_latents: List[mx.array],
    tokens,
    config: GenerationConfig,
    sampler: Sampler,
    noise: NoiseSource,
    max_frames: Optional[int] = None,
) -> Iterator[tuple]:
    """The frame loop for one prompt. Yields (token, audio chunk or None); the last item may be ("truncated", None)
    when the length rule or `max_frames` stops the prompt before eos."""
    m = model.model
    lm = m.language_model
    allowed = tokens.control_ids
    head_rows = model.head_rows(allowed)
    dtype = lm.embed_tokens.weight.dtype
    frame_step = FrameStep.for_model(model, config.steps, config.cfg_scale, dtype, config.compile)

    prompt_len = len(input_ids)
    max_pos = model.config.decoder_config.get("max_position_embeddings", 32768)
    if prompt_len >= max_pos:
        raise ValueError(f"The prompt has {prompt_len} tokens, more than the model's context of {max_pos}: use "
                         "shorter voice samples (each second costs 7.5 tokens) or split the script.")
    embeds = _prompt_embeddings(model, input_ids, speech_mask, voice_latents)
    cache = backbone.make_cache(lm)
    if embeds.shape[1] > 1:
        backbone.prefill(lm, embeds[:, :-1], cache, config.prefill_chunk)
    cfg = backbone.CFGCache(cache)
    # The prompt ends with speech_start: the positive branch's last prompt token and the negative branch's
    # first input are the same embedding, so both start with one batched step.
    x = embeds[:, -1:]

    max_steps = min(max_pos - prompt_len, 2 * prompt_len)  # the original's length rule (§6.6)
    dec_state = m.acoustic_tokenizer.decoder.make_state(1)
    sem_state = m.semantic_tokenizer.encoder.make_state(1)
    frames = 0
    for step in range(max_steps + 1):
        h = backbone.forward(lm, mx.concatenate([x, x]).astype(dtype), cfg)
        pos_h, neg_h = h[0:1, -1], h[1:2, -1]
        logits = pos_h.astype(mx.float32) @ head_rows.T
        if not mx.all(mx.isfinite(logits)).item():
            raise NumericsError(f"non-finite language-model output at step {step} ({dtype})")
        token = sampler(logits[0], allowed)
        if token not in allowed:
            raise ValueError(f"sampler returned token {token}, not one of the control tokens {allowed}")
        if step == max_steps or (max_frames is not None and frames >= max_frames and token == tokens.speech_diffusion):
            yield "truncated", None
            return
        if token == tokens.eos:
            yield token, None
            return
        if token == tokens.speech_diffusion:
            _, audio, x, dec_state, sem_state = frame_step(pos_h, neg_h, noise.next(), dec_state, sem_state)
            frames += 1
            mx.eval(x, audio)
            chunk = np.array(audio[0, :, 0].astype(mx.float32))
            if not np.isfinite(chunk).all():
                raise NumericsError(f"non-finite audio in frame {frames} ({dtype})")
            yield token, chunk
            continue
        # No frame on this step: the negative branch would not have run.
        cfg.drop_negative()
        if token == tokens.speech_end:
            # The original zeroes the tokenizers' streaming caches: a fresh stream.
            dec_state = m.acoustic_tokenizer.decoder.make_state(1)
            sem_state = m.semantic_tokenizer.encoder.make_state(1)
        elif token == tokens.speech_start:
            cfg.reset_negative()
        x = model.embed_tokens(mx.array([[token]]))
        yield token, None


# --- the public API over a loaded pipeline -----------------------------------------------------------------


def _prepare_voices(pipe, voices, num_speakers: int) -> List[np.ndarray]:
    """Voices as float32 arrays: 1-D normalized 24 kHz audio, or 2-D saved latents [frames, vae_dim].

    As the original, voices are taken in order and cut to the number of speakers; extra ones are reported.
    """
    from .audio import load_audio, load_voice, normalize_voice

    voices = list(voices or [])
    if len(voices) > num_speakers:
        logger.warning("%d voices for %d speaker(s): the last %d are not used.", len(voices), num_speakers,
                       len(voices) - num_speakers)
        voices = voices[:num_speakers]
    out = []
    for v in voices:
        if isinstance(v, np.ndarray):
            out.append(normalize_voice(v.astype(np.float32)) if v.ndim == 1 else v.astype(np.float32))
        elif str(v).endswith(".safetensors"):
            latents, _ = load_voice(v, vae_dim=pipe.config.acoustic_vae_dim, hop=pipe.hop_length)
            out.append(latents)
        else:
            out.append(normalize_voice(load_audio(v)))
    return out


def stream_generate(
    pipe,
    script: str,
    voices: Optional[Sequence] = None,
    config: Optional[GenerationConfig] = None,
    sampler: Optional[Sampler] = None,
    noise: Noise = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Generate speech for `script`, yielding audio chunks (3200 samples per frame) as they are produced.

    pipe: what `vibevoice_mlx.load` returned. voices: one per speaker, in speaker order: audio file paths, float32
    arrays at 24 kHz, or saved voices (.safetensors from `save_voice`). Keyword arguments override fields of
    `config` (steps, cfg_scale, temperature, top_p, seed, max_seconds, voice_noise). `sampler(logits, token_ids)`
    chooses the next token among the control tokens; `noise` supplies each frame's initial diffusion noise.
    """
    from dataclasses import replace

    from .processor import Pause, build_prompt, parse_script, script_speakers

    config = replace(config or GenerationConfig(), **kwargs)
    if pipe.backend == "torch":
        yield from _stream_torch(pipe, script, voices, config, sampler, noise)
        return
    items = parse_script(script)
    speakers = script_speakers(items)
    voice_arrays = _prepare_voices(pipe, voices, len(speakers))
    if not voice_arrays:
        logger.warning("No voice given: the model picks the voices itself.")
    seed = config.seed if config.seed is not None else int(time.time() * 1e6) % (2**31)
    key = mx.random.key(seed)
    key, voice_key, noise_key, sample_key = mx.random.split(key, 4)
    model = pipe.model
    latents = encode_voices(model, voice_arrays, config.voice_noise, voice_key)
    frames_per_voice = [int(z.shape[0]) for z in latents]
    sampler = sampler or make_sampler(config.temperature, config.top_p, sample_key)
    noise_src = NoiseSource(noise, noise_key, model.config.acoustic_vae_dim)
    hop = pipe.hop_length
    max_frames = None if config.max_seconds is None else math.ceil(config.max_seconds * SAMPLE_RATE / hop)

    start = time.perf_counter()
    frames, samples = 0, 0

    def response(audio, token, segment, **flags):
        elapsed = time.perf_counter() - start
        seconds = samples / SAMPLE_RATE
        return GenerationResponse(
            audio=audio, sample_rate=SAMPLE_RATE, token=token, frames=frames, audio_seconds=seconds,
            elapsed=elapsed, frames_per_second=frames / elapsed if elapsed else 0.0,
            real_time_factor=seconds / elapsed if elapsed else 0.0, peak_memory_gb=_peak_gb(), segment=segment,
            **flags,
        )

    for index, item in enumerate(items):
        if isinstance(item, Pause):
            silence = np.zeros(item.num_samples(SAMPLE_RATE), np.float32)
            samples += len(silence)
            yield response(silence, None, index, is_pause=True)
            continue
        prompt = build_prompt(pipe.tokenizer, item.lines, frames_per_voice, pipe.tokens, num_speakers=len(speakers))
        budget = None if max_frames is None else max_frames - frames
        for token, audio in generate_segment(model, prompt.input_ids, prompt.speech_input_mask, latents,
                                             pipe.tokens, config, sampler, noise_src, budget):
            if token == "truncated":
                at_limit = max_frames is not None and frames >= max_frames
                logger.warning(
                    "Output cut short after %.1f s: %s.", samples / SAMPLE_RATE,
                    "the max_seconds limit; raise it to hear more" if at_limit else
                    f"part {index + 1} reached the model's length rule (2x its prompt, within the context); "
                    "split that part with [pause] tags",
                )
                yield response(np.zeros(0, np.float32), None, index, truncated=True, finished=at_limit)
                if at_limit:
                    return
                break  # the length rule is per prompt: the next part of the script gets its own
            if audio is not None:
                frames += 1
                samples += len(audio)
                yield response(audio, token, index)
            else:
                yield response(np.zeros(0, np.float32), token, index)
                if token == pipe.tokens.eos:
                    break
    if config.free_memory_after_generate:
        from .memory import free_memory

        free_memory()
    yield response(np.zeros(0, np.float32), None, len(items) - 1, finished=True)


def generate(pipe, script: str, voices: Optional[Sequence] = None, **kwargs) -> GenerationResult:
    """Generate the whole script; returns the audio (float32, mono, 24 kHz) with timing figures.

    Takes the arguments of `stream_generate`. `tokens` lists the chosen control tokens of each segment.
    """
    chunks, last, truncated = [], None, False
    tokens: List[List[int]] = []
    for r in stream_generate(pipe, script, voices, **kwargs):
        chunks.append(r.audio)
        truncated |= r.truncated
        if r.token is not None:
            while len(tokens) <= r.segment:
                tokens.append([])
            tokens[r.segment].append(r.token)
        last = r
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return GenerationResult(
        audio=audio.astype(np.float32), sample_rate=SAMPLE_RATE, frames=last.frames if last else 0,
        audio_seconds=len(audio) / SAMPLE_RATE, elapsed=last.elapsed if last else 0.0,
        real_time_factor=(len(audio) / SAMPLE_RATE) / last.elapsed if last and last.elapsed else 0.0,
        peak_memory_gb=last.peak_memory_gb if last else 0.0, truncated=truncated, tokens=tokens,
    )


def _stream_torch(pipe, script, voices, config, sampler, noise):
    """The PyTorch reference path: transformers' generate per segment, one chunk per segment."""
    from .processor import Pause, build_prompt, parse_script, script_speakers
    from .torch_backend import torch_generate

    items = parse_script(script)
    speakers = script_speakers(items)
    voice_arrays = _prepare_voices(pipe, voices, len(speakers))
    if any(v.ndim != 1 for v in voice_arrays):
        raise ValueError("Saved voices (.safetensors) need the MLX backend; give the audio file with --backend torch.")
    frames_per_voice = [math.ceil(len(v) / pipe.hop_length) for v in voice_arrays]
    latent = pipe.config.acoustic_vae_dim
    allowed = pipe.tokens.control_ids
    # transformers hands the sampler full-vocabulary logits; ours see the control tokens only
    torch_sampler = None if sampler is None else (
        lambda logits: sampler(mx.array(np.asarray(logits)[list(allowed)]), allowed))

    frame = [0]

    def torch_noise(i):  # one counter across segments, as the MLX path has
        src = NoiseSource(noise, mx.random.key(0), latent)
        src.index = frame[0]
        frame[0] += 1
        return np.array(src.next()).reshape(-1)

    start, samples, total_frames = time.perf_counter(), 0, 0
    for index, item in enumerate(items):
        if isinstance(item, Pause):
            audio, tokens = np.zeros(item.num_samples(SAMPLE_RATE), np.float32), []
        else:
            prompt = build_prompt(pipe.tokenizer, item.lines, frames_per_voice, pipe.tokens,
                                  num_speakers=len(speakers))
            max_new = None
            if config.max_seconds is not None:
                max_new = math.ceil(config.max_seconds * SAMPLE_RATE / pipe.hop_length) + 4
            out = torch_generate(pipe.model, prompt.input_ids, voice_arrays or None, prompt.speech_input_mask,
                                 steps=config.steps, cfg_scale=config.cfg_scale,
                                 noise=torch_noise if noise is not None else None, token_sampler=torch_sampler,
                                 max_new_tokens=max_new, sample_voice_noise=config.voice_noise, seed=config.seed,
                                 free_memory_after_generate=config.free_memory_after_generate)
            audio, tokens = out.audio, [int(t) for t in out.tokens]
            total_frames += len(audio) // pipe.hop_length
        samples += len(audio)
        elapsed = time.perf_counter() - start
        for t in tokens:  # the token list first, so `generate` records it; then the segment's audio
            yield GenerationResponse(np.zeros(0, np.float32), SAMPLE_RATE, t, total_frames, samples / SAMPLE_RATE,
                                     elapsed, 0.0, 0.0, 0.0, segment=index)
        yield GenerationResponse(audio, SAMPLE_RATE, None, total_frames, samples / SAMPLE_RATE, elapsed,
                                 total_frames / elapsed if elapsed else 0.0,
                                 (samples / SAMPLE_RATE) / elapsed if elapsed else 0.0, 0.0, segment=index,
                                 is_pause=isinstance(item, Pause))


def voice_latents(pipe, audio: np.ndarray) -> np.ndarray:
    """The acoustic latents (σ-VAE mean, before the sampling noise) of one normalized 24 kHz clip, [frames, dim].

    This is what a saved voice holds; generation adds the σ-VAE noise to it as it does for a fresh clip.
    """
    if pipe.backend != "mlx":
        raise ValueError("Saving voices needs the MLX backend (backend='mlx').")
    mean = pipe.model.model.acoustic_tokenizer.encoder(mx.array(audio.astype(np.float32))[None, :, None])
    return np.array(mean[0])
