"""A stand-in for the server's live endpoint (`WS /v1/audio/speech/stream`), as the protocol describes it, with the
playground page and the lists it reads: tests of the page's and the example's client logic run against it without
a model. It answers each `input.text` delta with one frame of PCM16 (3200 samples, its value the delta's length)
and records every message it got, so a test can check what the client sent. `realtime_server` starts the real
server on the tiny realtime model. Both bind 127.0.0.1 only.
"""

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path
from typing import List

import numpy as np

import server_helpers as sh

FRAME = 3200
IDLE_TIMEOUT = 10.0  # seconds without a client message: idle_timeout, then a close
PRESETS = ["en-Carter_man", "en-Emma_woman"]


def frame(delta: str) -> bytes:
    return np.full(FRAME, len(delta), np.int16).tobytes()


def create_app(api_key: str = sh.API_KEY):
    from fastapi import FastAPI, WebSocket, WebSocketDisconnect
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    from vibevoice_mlx.server.app import STATIC

    app = FastAPI()
    app.state.received: List[dict] = []

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": "realtime-tiny", "auth": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "realtime-tiny", "object": "model"}]}

    @app.get("/v1/voices")
    async def voices():
        return {"object": "list", "data": [], "presets": [{"id": n, "object": "voice.preset", "known": True,
                                                           "downloaded": True} for n in PRESETS]}

    @app.websocket("/v1/audio/speech/stream")
    async def stream(ws: WebSocket):
        await ws.accept()
        key = ws.query_params.get("api_key") or ws.headers.get("authorization", "").removeprefix("Bearer ")
        if key != api_key:
            await ws.send_json({"type": "error", "code": "invalid_api_key", "message": "bad key"})
            await ws.close(1008)
            return
        chars, frames, first_text, ttfa = 0, 0, None, None
        try:
            while True:
                try:
                    msg = json.loads(await asyncio.wait_for(ws.receive_text(), IDLE_TIMEOUT))
                except asyncio.TimeoutError:
                    await ws.send_json({"type": "error", "code": "idle_timeout", "message": "quiet"})
                    await ws.close(1000)
                    return
                app.state.received.append(msg)
                kind = msg.get("type")
                if kind == "session.config":
                    await ws.send_json({"type": "session.created", "model": msg.get("model") or "realtime-tiny",
                                        "voice": msg.get("voice") or PRESETS[0], "sample_rate": 24000,
                                        "format": "pcm"})
                elif kind == "input.text":
                    first_text = first_text or time.monotonic()
                    chars += len(msg["text"])
                    await ws.send_bytes(frame(msg["text"]))
                    frames += 1
                    ttfa = ttfa or time.monotonic() - first_text
                elif kind in ("input.done", "session.close"):
                    await ws.send_json({"type": "speech.audio.done", "usage": {
                        "characters": chars, "audio_seconds": frames * FRAME / 24000,
                        "time_to_first_audio_s": ttfa or 0.0}})
                    chars, frames, first_text, ttfa = 0, 0, None, None
                    if kind == "session.close":
                        await ws.close(1000)
                        return
                else:
                    await ws.send_json({"type": "error", "code": "invalid_message", "message": f"unknown {kind}"})
        except WebSocketDisconnect:
            pass

    return app


class StandIn:
    """The stand-in app served by uvicorn in a thread of the test process."""

    def __init__(self):
        import uvicorn

        self.app = create_app()
        self.port = sh.free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the stand-in did not start"
            time.sleep(0.05)
        self.api_key = sh.API_KEY

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> List[dict]:
        return self.app.state.received

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


REALTIME = Path(__file__).parent / "data" / "realtime_tiny"
PRESET = "test_voice"  # the tiny model's voice.pt, installed as a preset in the server's cache


def realtime_server(root: Path, monkeypatch, *args: str) -> sh.ServerProcess:
    """The real server on the tiny realtime model with forced frames (each utterance stops after a fixed number of
    frames), its voice.pt as the preset `test_voice`; not ready yet (call wait_ready)."""
    (root / "cache" / "realtime-voices").mkdir(parents=True)
    shutil.copy(REALTIME / "voice.pt", root / "cache" / "realtime-voices" / f"{PRESET}.pt")
    monkeypatch.setenv("VIBEVOICE_MLX_CACHE", str(root / "cache"))
    monkeypatch.setenv("VIBEVOICE_MLX_OFFLINE", "1")
    return sh.ServerProcess(REALTIME / "model", root / "voices", root, "--tokenizer", str(REALTIME / "tokenizer"),
                            *args)
