"""`POST /v1/audio/speech`: a validated request becomes a worker job whose audio is streamed as it is made.

The response starts only when the job's first audio exists, so that every error the library raises before any
audio (a malformed script, more speakers than voices, a prompt over the context) is a proper 400. While a job
waits in the queue, the client's connection is watched: a client that leaves is dropped from the queue, and
one that leaves mid-stream stops its job at the next frame.
"""

import asyncio
import base64
import json
import logging
import secrets
from contextlib import aclosing
from pathlib import Path
from typing import Optional

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .encode import MEDIA_TYPES, available_formats, make_encoder
from .errors import APIError
from .models import served_model
from .schemas import OPENAI_MODELS, OPENAI_VOICES, SpeechRequest, parse_speech_request
from .voices import VoiceNotFoundError, check_name
from .worker import Job, ShuttingDownError

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2
MAX_BODY_BYTES = 1 << 20  # a speech request is text and options: far below this


class StreamAborted(Exception):
    """Generation failed after the audio had started: the connection is cut, so the client sees a short read."""


def resolve_voices(req: SpeechRequest, store):
    """Saved-voice files in speaker order, or [] when the model is to pick (no voice, or OpenAI's names)."""
    names = req.voice_names()
    saved = [n for n in names if store.exists(n)]
    builtin = [n for n in names if n not in saved and n in OPENAI_VOICES]
    if builtin and (saved or len(builtin) != len(names)):
        raise APIError(400, f"{builtin[0]!r} is not a saved voice here: give a saved voice for every speaker, "
                       "or none (the model then picks them).", param="voice", code="voice_not_found")
    if builtin:
        return []
    paths = []
    for name in names:
        try:
            check_name(name)
            paths.append(store.resolve(name))
        except ValueError as e:
            raise APIError(400, str(e), param="voices" if req.voices is not None else "voice",
                           code="voice_not_found" if isinstance(e, VoiceNotFoundError) else "invalid_value")
    return paths


def realtime_voice(req: SpeechRequest) -> Path:
    """The realtime model's voice: one preset name (OpenAI's names, or none: the default preset)."""
    from ..preset_store import DEFAULT_PRESET, resolve_voice

    names = req.voice_names()
    if len(names) > 1:
        raise APIError(400, f"VibeVoice-Realtime-0.5B speaks in one voice; got {len(names)}.", param="voices",
                       code="invalid_value")
    name = names[0] if names and names[0] not in OPENAI_VOICES else DEFAULT_PRESET
    try:
        return resolve_voice(name)
    except (ValueError, OSError) as e:
        raise APIError(400, str(e).splitlines()[0], param="voice", code="voice_not_found")


def foreign_voices(paths, encoder: Optional[str]) -> Optional[str]:
    """A warning for the client (the library only logs it) when a saved voice was encoded by another model's
    acoustic encoder (`encoder`: this model's fingerprint): its latents do not mean the same to this model."""
    from ..audio import load_voice

    warnings = []
    for path in paths:
        try:
            _, meta = load_voice(path)
        except ValueError:  # a broken file: generation refuses it with a 400
            continue
        if encoder is not None and meta.get("encoder") not in (None, encoder):
            model = str(meta.get("model")).encode("ascii", "backslashreplace").decode()  # a header is latin-1
            warnings.append(f"voice {Path(path).stem!r} was saved by another model ({model}): its latents do not "
                            "mean the same to this one; upload its audio again")
    return "; ".join(warnings) or None


def check_request(req: SpeechRequest, config) -> None:
    if req.model not in OPENAI_MODELS | set(config.model_ids):
        raise APIError(404, f"The model {req.model!r} is not served here; this server runs "
                       f"{', '.join(map(repr, config.model_ids))} (GET /v1/models).", param="model",
                       code="model_not_found")
    if not req.input.strip():
        raise APIError(400, "'input' is empty: give the text (or a Speaker N: script) to speak.", param="input",
                       code="empty_input")
    try:
        req.input.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can carry lone surrogates; no tokenizer takes them
        raise APIError(400, f"'input' is not valid Unicode (character {e.start} is a lone surrogate).",
                       param="input", code="invalid_value")
    if len(req.input) > config.max_input_chars:
        raise APIError(400, f"'input' has {len(req.input)} characters; this server takes up to "
                       f"{config.max_input_chars}.", param="input", code="string_above_max_length")
    formats = available_formats()
    if req.response_format not in MEDIA_TYPES:
        raise APIError(400, f"Unknown response_format {req.response_format!r}: use one of "
                       f"{', '.join(f for f, ok in formats.items() if ok)}.", param="response_format",
                       code="invalid_value")
    if not formats[req.response_format]:
        raise APIError(400, f"response_format {req.response_format!r} has no encoder on this server: use one of "
                       f"{', '.join(f for f, ok in formats.items() if ok)}.", param="response_format",
                       code="unsupported_value")
    if not req.stream and req.stream_format == "sse":
        raise APIError(400, "stream false sends one file at the end; SSE is a stream: drop one of them.",
                       param="stream", code="unsupported_value")
    if req.speed is not None and req.speed != 1.0:
        raise APIError(400, "VibeVoice has no speed control: omit 'speed' or send 1.0.", param="speed",
                       code="unsupported_value")
    if req.instructions:
        raise APIError(400, "VibeVoice takes no instructions: omit 'instructions' (speakers, voices, steps, "
                       "cfg_scale and seed are its options).", param="instructions", code="unsupported_value")


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def _next_event(request: Request, events: asyncio.Queue, job: Job, worker) -> Optional[tuple]:
    """The job's next event; None if the client disconnected meanwhile (the job is then cancelled)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                worker.cancel(job)
                return None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (declared or streamed)."""
    too_large = APIError(413, f"The request body is larger than {limit // 1024} KB.", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def speech(request: Request):
    state = request.app.state
    config = state.config
    raw = await _read_body(request, MAX_BODY_BYTES)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise APIError(400, "We could not parse the JSON body of your request.", code="invalid_json")
    req = parse_speech_request(body)
    check_request(req, config)
    served = served_model(state, req.model)
    worker, realtime = served.worker, served.realtime
    if realtime:  # a preset (downloaded once, in a thread): no saved voices, no encoder to compare
        voices, warning = [await asyncio.to_thread(realtime_voice, req)], None
    else:
        voices = resolve_voices(req, state.voices)
        warning = await asyncio.to_thread(foreign_voices, voices, served.encoder)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(kind, payload):  # worker thread -> this request's event loop
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    tokenizer = getattr(worker.pipe, "tokenizer", None)  # for SSE's usage figures only
    input_tokens = len(tokenizer.encode(req.input)) if tokenizer is not None and req.stream_format == "sse" else 0
    job = Job(script=req.input, emit=emit, voices=voices, steps=req.steps, cfg_scale=req.cfg_scale, seed=seed,
              temperature=req.temperature, top_p=req.top_p, max_seconds=req.max_seconds)
    if not realtime:
        worker.submit(job)
    elif not worker.snapshot()["accepting"]:
        raise ShuttingDownError()
    else:  # the realtime model's rows share the live sessions' batch on the worker thread
        served.live.submit_job(job, worker.pipe)
    try:
        first = await _next_event(request, events, job, worker)
    except BaseException:  # cancelled (the server is being forced down): the job must not run on
        worker.cancel(job)
        raise
    if first is None:
        logger.info("Client left before its audio started.")
        return Response(status_code=499)
    kind, payload = first
    if kind == "error":
        raise payload
    if kind == "end":
        if payload["stopped"]:
            raise ShuttingDownError()
        raise APIError(400, "The model produced no audio for this script. Try another seed, a voice sample, or "
                       "rephrase the script.", param="input", code="no_audio")

    sample_rate = getattr(worker.pipe, "sample_rate", 24000)
    encoder = make_encoder(req.response_format, sample_rate, stream=req.stream)
    headers = {"X-VibeVoice-Seed": str(seed), "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    if req.response_format == "pcm":
        headers["X-Sample-Rate"] = str(sample_rate)
    if warning:
        headers["X-VibeVoice-Warning"] = warning
    if not req.stream:
        return await _whole_file(request, first, events, job, worker, encoder, MEDIA_TYPES[req.response_format],
                                 headers)
    if req.stream_format == "sse":
        body_iter = _sse_stream(request, first, events, job, worker, encoder, input_tokens)
        media_type = "text/event-stream"
    else:
        body_iter = _audio_stream(request, first, events, job, worker, encoder)
        media_type = MEDIA_TYPES[req.response_format]
    return StreamingResponse(body_iter, media_type=media_type, headers=headers)


async def _events(request, first, events, job, worker):
    """The job's events from `first` on, until its end; cancels the job if the stream stops early."""
    ended = False
    try:
        event = first
        while event is not None:
            yield event
            if event[0] in ("end", "error"):
                ended = True
                return
            event = await _next_event(request, events, job, worker)
    finally:
        if not ended:
            logger.info("Client left mid-stream: stopping its job.")
            worker.cancel(job)


async def _whole_file(request, first, events, job, worker, encoder, media_type, headers):
    """The complete file in one response, with its Content-Length: nothing is sent before the end, so a failure
    on the way is still an error status."""
    parts, ended = [], False
    async with aclosing(_events(request, first, events, job, worker)) as stream:
        async for kind, payload in stream:
            if kind == "error":
                raise payload
            parts.append(encoder.write(payload) if kind == "audio" else encoder.close())
            ended = kind == "end"
    if not ended:
        logger.info("Client left before its file was complete.")
        return Response(status_code=499)
    return Response(b"".join(parts), media_type=media_type, headers=headers)


async def _audio_stream(request, first, events, job, worker, encoder):
    async with aclosing(_events(request, first, events, job, worker)) as stream:
        async for kind, payload in stream:
            if kind == "audio":
                data = encoder.write(payload)
            elif kind == "end":
                data = encoder.close()
            else:
                logger.error("Stream cut after %.2f s of audio: %s", job.audio_seconds, payload.message)
                raise StreamAborted(payload.message)
            if data:
                yield data


async def _sse_stream(request, first, events, job, worker, encoder, input_tokens):
    async with aclosing(_events(request, first, events, job, worker)) as stream:
        async for kind, payload in stream:
            if kind == "error":
                yield _sse({"type": "error", "error": payload.body()["error"]})
                return
            data = encoder.write(payload) if kind == "audio" else encoder.close()
            if data:
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
            if kind == "end":
                frames = payload["frames"]  # a speech frame is one output token (speech_diffusion)
                yield _sse({"type": "speech.audio.done",
                            "usage": {"input_tokens": input_tokens, "output_tokens": frames,
                                      "total_tokens": input_tokens + frames},
                            "audio_seconds": round(encoder.samples / encoder.sample_rate, 3),
                            "truncated": payload["truncated"], "seed": job.seed})
