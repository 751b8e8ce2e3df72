"""The FastAPI app: routes, the API key, OpenAI-style errors, the playground page.

`create_app(worker, config)` takes a started `Worker` (which owns the model) so that the app can be built in
one process for tests and by `vibevoice-mlx serve` alike.
"""

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError, hide_paths
from .live import LiveBatch
from .models import Served
from .speech import speech
from .stream import speech_stream
from .voices import (VoiceExistsError, VoiceNameError, VoiceNotFoundError, VoiceStore, check_name, encode_voice,
                     read_upload)

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    model_id: str
    voices_dir: Path
    api_key: Optional[str] = None
    max_input_chars: int = 4096
    max_upload_bytes: int = 20 * 2**20
    max_voice_seconds: float = 60.0  # and at most half the model's context
    grace: float = 10.0  # seconds running streams get to finish on shutdown
    ws_max_message_bytes: int = 64 * 1024  # WS /v1/audio/speech/stream (server/stream.py)
    ws_max_session_chars: Optional[int] = None  # per utterance; None: max_input_chars
    ws_idle_timeout: float = 30.0
    live_eos_rule: Optional[object] = None  # the realtime stop rule (--force-frames: live.forced_eos)
    model_ids: List[str] = field(default_factory=list)  # every served model, the first is model_id

    def __post_init__(self):
        self.model_ids = self.model_ids or [self.model_id]
        if self.ws_max_session_chars is None:
            self.ws_max_session_chars = self.max_input_chars


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _check_key(request: Request):
    key = request.app.state.config.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def create_app(worker, config: ServerConfig, more: Optional[Dict[str, object]] = None) -> FastAPI:
    """The app over a started worker (the model `config.model_id`), and `more` {id: started worker} for the other
    models of `serve --model A --model B`. The workers are stopped when the app shuts down."""
    workers = {config.model_id: worker, **(more or {})}

    @asynccontextmanager
    async def lifespan(app):
        yield
        for w in workers.values():
            await asyncio.to_thread(w.stop, 0.0)

    app = FastAPI(title="vibevoice-mlx", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker, app.state.config = worker, config
    app.state.voices = VoiceStore(config.voices_dir)
    # Which acoustic encoder made a saved voice is checked against this one (see speech.foreign_voices).
    app.state.served = {}
    for name, w in workers.items():
        encoder = w.call(lambda pipe: getattr(getattr(pipe, "backend", None), "encoder_fingerprint", None)).result()
        app.state.served[name] = Served(name, w, LiveBatch(w.wake, config.live_eos_rule, w.past_grace), encoder)
        w.live.append(app.state.served[name].live)
    app.state.encoder = app.state.served[config.model_id].encoder
    app.state.live = app.state.served[config.model_id].live
    app.state.started = int(time.time())
    app.state.sessions = set()

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query")]
        return _error_response(APIError(400, f"Invalid {'.'.join(loc) or 'request'}: {err.get('msg')}.",
                                        param=loc[0] if loc else None, code="invalid_value"))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        logger.exception("Unexpected error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"Internal error ({type(exc).__name__}); the server log has the "
                                             "details.", code="internal_error"))

    auth = [Depends(_check_key)]

    @app.get("/health")
    async def health():
        snap = worker.snapshot()
        return {"status": "ok" if snap["accepting"] else "draining", "model": config.model_id,
                "models": list(workers), "auth": bool(config.api_key), "live_sessions": len(app.state.sessions),
                "live_rows": sum(s.live.active for s in app.state.served.values()), **snap}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": app.state.started,
                                            "owned_by": "vibevoice-mlx"} for name in workers]}

    app.post("/v1/audio/speech", dependencies=auth)(speech)
    app.websocket("/v1/audio/speech/stream")(speech_stream)  # checks the key itself (header or ?api_key=)

    @app.get("/v1/voices", dependencies=auth)
    async def list_voices():
        """Saved voices (1.5B/7B: cloned from uploads), and the realtime model's presets beside them."""
        return {"object": "list", "data": await asyncio.to_thread(app.state.voices.list),
                "presets": await asyncio.to_thread(_presets)}

    @app.post("/v1/voices", dependencies=auth, status_code=201)
    async def add_voice(request: Request):
        # A saved voice is encoded by a 1.5B/7B (the realtime model has no encoder): the first one served.
        encoder = next((s.worker for s in app.state.served.values() if not s.realtime), worker)
        return await _add_voice(request, encoder, config, app.state.voices)

    @app.delete("/v1/voices/{name}", dependencies=auth)
    async def delete_voice(name: str):
        try:
            app.state.voices.delete(name)
        except VoiceNameError as e:
            raise APIError(400, str(e), param="name", code="invalid_value")
        except VoiceNotFoundError as e:
            raise APIError(404, str(e), param="name", code="voice_not_found")
        return {"id": name, "object": "voice", "deleted": True}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # The page and its files are public (they hold no data); the API behind them asks for the key.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _add_voice(request: Request, worker, config: ServerConfig, store: VoiceStore):
    """multipart/form-data: `name`, `file` (any audio libsndfile reads), optional `overwrite=true`."""
    import vibevoice_mlx as vv

    length = request.headers.get("content-length")
    if length is None:
        raise APIError(411, "Send the upload with a Content-Length.", code="length_required")
    if not length.isdigit() or int(length) > config.max_upload_bytes:
        raise APIError(413, f"The upload is larger than this server's limit of "
                       f"{config.max_upload_bytes / 2**20:g} MB.", param="file", code="file_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(415, "Upload a voice as multipart/form-data with fields 'name' and 'file'.",
                       code="unsupported_media_type")
    form = await request.form(max_files=1, max_fields=4)
    try:
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str):
            raise APIError(400, "Missing the voice's 'name'.", param="name", code="missing_parameter")
        try:
            check_name(name)
        except VoiceNameError as e:
            raise APIError(400, str(e), param="name", code="invalid_value")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "Missing the audio 'file'.", param="file", code="missing_parameter")
        overwrite = str(form.get("overwrite", "")).lower() in ("1", "true", "yes")
        if store.exists(name) and not overwrite:
            raise APIError(409, f"A voice named {name!r} exists; delete it first or send overwrite=true.",
                           param="name", code="voice_exists")
        clip = store.temp_path(Path(upload.filename or "").suffix)
        try:
            await asyncio.to_thread(_copy, upload.file, clip)
            audio = await asyncio.to_thread(read_upload, worker.pipe, clip, config.max_voice_seconds)

            def save(pipe):  # on the worker thread, the only one that touches the model, a chunk per step
                latents = yield from encode_voice(pipe, audio)
                return store.add(name, lambda target: vv.save_voice(pipe, audio, str(target), force=True,
                                                                    latents=latents), overwrite)

            return await asyncio.wrap_future(worker.call(save))
        except VoiceExistsError as e:
            raise APIError(409, str(e), param="name", code="voice_exists")
        except ValueError as e:
            message = hide_paths(str(e).splitlines()[0], {str(clip): upload.filename or "the upload"})
            raise APIError(400, message, param="file", code="invalid_audio")
        finally:
            clip.unlink(missing_ok=True)
    finally:
        await form.close()


def _presets():
    """The realtime voice presets: known (Microsoft's) or found in the preset folder, and whether downloaded."""
    from ..preset_store import list_presets

    return [{"id": r["name"], "object": "voice.preset", "known": r["known"], "downloaded": bool(r["downloaded"])}
            for r in list_presets()]


def _copy(src, dst: Path):
    with open(dst, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
