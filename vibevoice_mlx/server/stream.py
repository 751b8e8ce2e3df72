"""`WS /v1/audio/speech/stream`: text in as it is written, audio out as it is made (the live-speech protocol).

A session: `session.config` first, then `input.text` deltas, `input.done` (speak what is pending, keep the
connection) and `session.close` (finish, then close 1000). Utterances of a session are spoken one after another;
each ends with `speech.audio.done` and its usage. The realtime model takes the deltas as they come (`live.py`: all
sessions in one batch on the worker thread); the 1.5B/7B speaks each complete sentence as one worker job in the
session's saved voice. Errors are `{"type": "error", "code", "message"}`; fatal ones close the connection.

Bounds: a message over `ws_max_message_bytes`, an utterance over `ws_max_session_chars`, no message for
`ws_idle_timeout` seconds while nothing is being spoken, a reader more than `MAX_BEHIND_FRAMES` frames behind (its
utterance is stopped: the queue of audio waiting for it never grows past that).
"""

import asyncio
import base64
import json
import logging
import re
import secrets
import time
from typing import Optional

from starlette.websockets import WebSocket, WebSocketDisconnect

from .encode import to_pcm16
from .errors import APIError
from .live import Utterance
from .models import served_model
from .voices import check_name
from .worker import Job

logger = logging.getLogger(__name__)

MAX_BEHIND_FRAMES = 256  # audio frames queued for a slow reader before its utterance is stopped
SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f](?=\s)|\n")  # not ':' (a "Speaker 1:" label)


class SessionError(Exception):
    def __init__(self, code: str, message: str, close: Optional[int] = 1008):
        super().__init__(message)
        self.code, self.message, self.close = code, message, close


def _key_ok(ws: WebSocket, key: Optional[str]) -> bool:
    if not key:
        return True
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ws.query_params.get("api_key", "")
    return secrets.compare_digest(given.encode(), key.encode())


def split_sentences(text: str):
    """(complete sentences, the rest): a sentence ends at . ! ? followed by a space, or at a newline."""
    sentences, start = [], 0
    for m in SENTENCE_END.finditer(text):
        if text[start:m.end()].strip():
            sentences.append(text[start:m.end()].strip())
        start = m.end()
    return sentences, text[start:]


class Session:
    def __init__(self, ws: WebSocket):
        self.ws, state = ws, ws.app.state
        self.config, self.worker, self.store, self.state = state.config, state.worker, state.voices, state
        self.loop = asyncio.get_running_loop()
        self.utterances: asyncio.Queue = asyncio.Queue()
        self.current: Optional[dict] = None  # the utterance text is being added to
        self.speaking = 0  # utterances flushed and not yet done
        self.open: list = []  # utterances begun and not yet done (cancelled if the session ends)
        self.options: dict = {}
        self.draining = False

    # --- messages in --------------------------------------------------------------------------------------------

    async def run(self):
        if not _key_ok(self.ws, self.config.api_key):
            raise SessionError("invalid_api_key", "Invalid or missing API key: send 'Authorization: Bearer <key>' "
                               "or ?api_key=<key>.")
        if not self.worker.snapshot()["accepting"]:
            raise SessionError("shutting_down", "The server is shutting down.", close=1001)
        self.configure(await self.receive())
        await self.send_json({"type": "session.created", "model": self.model, "voice": self.voice,
                              "sample_rate": 24000, "format": "pcm", "seed": self.options["seed"]})
        sender = asyncio.create_task(self.send_all())
        try:
            while True:
                receive = asyncio.create_task(self.receive())
                done, _ = await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
                if sender in done:
                    receive.cancel()
                    sender.result()  # its error, if any
                    raise SessionError("shutting_down", "The server is shutting down.", close=1001)
                msg = receive.result()
                kind = msg.get("type")
                if kind == "input.text":
                    self.text(msg.get("text"))
                elif kind == "input.done":
                    self.flush()
                elif kind == "session.close":
                    self.flush()
                    self.utterances.put_nowait(None)
                    await sender
                    await self.ws.close(1000)
                    return
                elif kind == "session.config":
                    await self.error("invalid_message", "session.config may come only once, first.")
                else:
                    await self.error("invalid_message", f"Unknown message type {kind!r}: use input.text, "
                                     "input.done or session.close.")
        finally:
            if not sender.done():
                sender.cancel()
            self.cancel_all()

    async def receive(self) -> dict:
        """The next client message. The session is idle while it sends nothing and nothing of it is being spoken:
        the idle clock runs from the later of the last message and the end of the last utterance."""
        timeout, last = self.config.ws_idle_timeout, time.monotonic()
        pending = asyncio.ensure_future(self.ws.receive())
        try:
            while not pending.done():
                await asyncio.wait({pending}, timeout=min(0.25, timeout))
                if self.speaking:  # utterances flushed and still being spoken
                    last = time.monotonic()
                elif not pending.done() and time.monotonic() - last > timeout:
                    raise SessionError("idle_timeout", f"No message for {timeout:g} s: the session is closed.",
                                       close=1000)
            msg = pending.result()
        finally:
            if not pending.done():
                pending.cancel()
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        data = msg.get("text")
        if data is None:
            raise SessionError("invalid_message", "Send JSON text messages, not binary ones.")
        if len(data.encode()) > self.config.ws_max_message_bytes:
            raise SessionError("message_too_large", f"A message is larger than this server's limit of "
                               f"{self.config.ws_max_message_bytes} bytes.", close=1009)
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError):
            raise SessionError("invalid_message", "A message is not valid JSON.")
        if not isinstance(msg, dict):
            raise SessionError("invalid_message", "A message must be a JSON object with a 'type'.")
        return msg

    def configure(self, msg: dict) -> None:
        from ..preset_store import resolve_voice

        if msg.get("type") != "session.config":
            raise SessionError("invalid_message", "The first message must be session.config.")
        served = served_model(self.state, msg.get("model"))
        if served is None:
            raise SessionError("unknown_model", f"The model {msg.get('model')!r} is not served here; this server "
                               f"runs {', '.join(map(repr, self.config.model_ids))}.")
        self.worker, self.live, self.model = served.worker, served.live, served.id
        self.realtime = served.realtime
        if msg.get("response_format", "pcm") != "pcm":
            raise SessionError("invalid_config", "response_format must be 'pcm' (16-bit mono 24 kHz).")
        transport = msg.get("audio_transport", "binary")
        if transport not in ("binary", "base64"):
            raise SessionError("invalid_config", "audio_transport must be 'binary' or 'base64'.")
        defaults = getattr(self.worker.pipe, "defaults", {})
        options = {k: msg.get(k) for k in ("steps", "cfg_scale", "seed", "max_seconds")}
        for name, kind in (("steps", int), ("cfg_scale", (int, float)), ("seed", int), ("max_seconds", (int, float))):
            value = options[name]
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or value < 0):
                raise SessionError("invalid_config", f"{name} must be a non-negative number.")
        if options["seed"] is None:
            options["seed"] = secrets.randbelow(2**31)
        voice = msg.get("voice")
        try:
            if self.realtime:
                from ..preset_store import DEFAULT_PRESET

                options["steps"] = options["steps"] or defaults.get("steps")
                options["cfg_scale"] = float(options["cfg_scale"] if options["cfg_scale"] is not None
                                             else defaults.get("cfg_scale"))
                voice = voice or DEFAULT_PRESET
                self.voice_file = resolve_voice(voice)
            elif voice is not None:
                check_name(voice)
                self.voice_file = self.store.resolve(voice)
            else:
                self.voice_file = None
        except (ValueError, OSError) as e:
            raise SessionError("unknown_voice", str(e).splitlines()[0])
        self.options, self.transport = options, transport
        self.voice = voice

    def text(self, delta) -> None:
        if not isinstance(delta, str):
            raise SessionError("invalid_message", "input.text needs a 'text' string.")
        if self.current is None:
            self.current = self.begin()
        utt = self.current
        utt["chars"] += len(delta)
        if utt["chars"] > self.config.ws_max_session_chars:
            raise SessionError("session_too_long", f"An utterance is longer than this server's limit of "
                               f"{self.config.ws_max_session_chars} characters: send input.done sooner.")
        if self.realtime:
            utt["live"].feed(delta)
            self.worker.wake()
        else:
            sentences, utt["rest"] = split_sentences(utt["rest"] + delta)
            for s in sentences:
                utt["sentences"].put_nowait(s)

    def begin(self) -> dict:
        utt = {"chars": 0, "start": time.monotonic(), "events": asyncio.Queue(), "queued": 0, "rest": "",
               "sentences": asyncio.Queue(), "jobs": []}
        if self.realtime:
            seconds, hop = self.options["max_seconds"], self.worker.pipe.hop_length
            utt["live"] = Utterance(self.voice_file, self.options["seed"], self.options["steps"],
                                    self.options["cfg_scale"], self.emitter(utt),
                                    None if seconds is None else max(1, int(seconds * 24000 // hop)))
        self.utterances.put_nowait(utt)
        self.open.append(utt)
        return utt

    def flush(self) -> None:
        utt, self.current = self.current, None
        if utt is None or utt.get("ended"):  # nothing pending, or spoken and done already
            return
        self.speaking += 1
        if self.realtime:
            utt["live"].finish()
            self.worker.wake()
        else:
            if utt["rest"].strip():
                utt["sentences"].put_nowait(utt["rest"].strip())
            utt["sentences"].put_nowait(None)

    def emitter(self, utt: dict):
        def emit(kind, payload):  # worker thread -> this session's loop
            def put():
                if utt.get("behind"):  # stopped for a slow reader: nothing more is queued for it
                    return
                if kind == "audio":
                    utt["queued"] += 1
                    if utt["queued"] > MAX_BEHIND_FRAMES:
                        utt["behind"] = True
                        self.cancel(utt)
                        utt["events"].put_nowait(("error", SessionError(
                            "server_busy", "The client reads audio too slowly: its utterance was stopped.")))
                        return
                utt["events"].put_nowait((kind, payload))
            try:
                self.loop.call_soon_threadsafe(put)
            except RuntimeError:  # the loop is closed
                pass
        return emit

    def drain(self) -> None:
        """SIGTERM: speak what is pending (within the worker's grace), then close with 1001."""
        self.draining = True
        self.flush()
        self.utterances.put_nowait(None)

    def cancel(self, utt: dict) -> None:
        if "live" in utt:
            utt["live"].cancel()
            self.worker.wake()
        for job in utt["jobs"]:
            self.worker.cancel(job)

    def cancel_all(self) -> None:
        for utt in self.open:
            self.cancel(utt)

    # --- audio out ----------------------------------------------------------------------------------------------

    async def send_all(self):
        while True:
            utt = await self.utterances.get()
            if utt is None:
                return
            first, frames = None, 0
            if self.realtime:
                self.live.add(utt["live"])
                first, frames = await self.forward(utt)
            else:
                while (sentence := await utt["sentences"].get()) is not None:
                    job = Job(script=sentence, emit=self.emitter(utt), voices=[self.voice_file] if self.voice_file
                              else [], steps=self.options["steps"], cfg_scale=self.options["cfg_scale"],
                              seed=self.options["seed"], max_seconds=self.options["max_seconds"])
                    utt["jobs"].append(job)
                    try:
                        self.worker.submit(job)
                    except APIError as e:
                        code = "shutting_down" if e.code == "shutting_down" else "server_busy"
                        raise SessionError(code, e.message, close=1001 if code == "shutting_down" else 1008)
                    got, n = await self.forward(utt)
                    first, frames = first or got, frames + n
            hop = getattr(self.worker.pipe, "hop_length", 3200)
            await self.send_json({"type": "speech.audio.done", "usage": {
                "characters": utt["chars"], "audio_seconds": round(frames * hop / 24000, 4),
                "time_to_first_audio_s": None if first is None else round(first - utt["start"], 4)}})
            if utt is self.current:  # it ended on its own (the model's stop, max_seconds) before input.done: the
                utt["ended"] = True  # rest of its text is not spoken, as in the whole-text run; input.done closes it
            else:
                self.speaking -= 1
            self.open.remove(utt)

    async def forward(self, utt: dict):
        """An utterance's (or sentence job's) events to the client until its end: (time of first audio, frames)."""
        first, frames = None, 0
        while True:
            kind, payload = await utt["events"].get()
            if kind == "audio":
                utt["queued"] -= 1
                data = to_pcm16(payload)
                if self.transport == "binary":
                    await self.ws.send_bytes(data)
                else:
                    await self.send_json({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
                first, frames = first or time.monotonic(), frames + 1
            elif kind == "end":
                stopped = payload == "cancelled" or (isinstance(payload, dict) and payload.get("stopped"))
                if stopped and not self.worker.snapshot()["accepting"]:
                    raise SessionError("shutting_down", "The server is shutting down.", close=1001)
                return first, frames
            else:
                if isinstance(payload, SessionError):
                    raise payload
                message = getattr(payload, "message", None) or str(payload).splitlines()[0]
                if getattr(payload, "code", None) == "shutting_down":
                    raise SessionError("shutting_down", message, close=1001)
                if getattr(payload, "status", 500) < 500:  # the library refused the text (a 400 on POST)
                    raise SessionError("invalid_message", message)
                raise SessionError("internal_error", message, close=1011)

    async def send_json(self, obj: dict):
        await self.ws.send_text(json.dumps(obj, separators=(",", ":")))

    async def error(self, code: str, message: str):
        await self.send_json({"type": "error", "code": code, "message": message})


async def speech_stream(ws: WebSocket):
    await ws.accept()
    session = Session(ws)
    sessions = ws.app.state.sessions
    sessions.add(session)
    try:
        await session.run()
    except SessionError as e:
        try:
            await session.error(e.code, e.message)
            await ws.close(e.close)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
    except WebSocketDisconnect:
        logger.info("A live session's client left.")
    except Exception:  # noqa: BLE001 - one session must not take the server down
        logger.exception("Live session failed")
        try:
            await session.error("internal_error", "Internal error; the server log has the details.")
            await ws.close(1011)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
    finally:
        sessions.discard(session)
