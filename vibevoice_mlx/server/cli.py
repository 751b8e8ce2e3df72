"""The `serve` command: load the model once, then run the app under uvicorn.

Registered on the main CLI as `vibevoice-mlx serve`; `python -m vibevoice_mlx.server` runs the same command.
On SIGTERM or Ctrl-C the server stops accepting connections, refuses what is queued, gives running streams
`--grace` seconds to finish and then ends them cleanly (a complete file, or SSE's done event).
"""

import errno
import logging
import math
import os
import socket
from pathlib import Path

import click

from ..errors import CLIError, user_errors

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_voices_dir() -> Path:
    root = os.environ.get("VIBEVOICE_MLX_CACHE", Path.home() / ".cache" / "vibevoice-mlx")
    return Path(root) / "voices"


def force_frames(logits, token_ids):
    """A testing aid: always choose speech_diffusion (a random test model rarely does on its own)."""
    return token_ids[2]


def finite(ctx, param, value):
    """click's FloatRange lets nan and inf through; an option that sizes or times something needs a number."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number.")
    return value


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a port in use is said at once (uvicorn would
    say so only after the load). Bound as uvicorn binds: IPv6 for an address with ':', SO_REUSEADDR."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        fix = "stop what listens there or choose another --port" if e.errno == errno.EADDRINUSE else \
            "choose another --host or --port"
        raise CLIError(f"Cannot listen on {host}:{port} ({e.strerror or e}): {fix}.") from None
    return sock


def model_id(model: str) -> str:
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


@click.command()
@click.option("-m", "--model", "models", required=True, multiple=True,
              help="Converted MLX folder, PyTorch checkpoint folder or hub id; repeat it to serve several models "
                   "(a request picks one by 'model'; OpenAI's aliases mean the first).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; only this machine by default.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--voices-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of saved voices (default: ~/.cache/vibevoice-mlx/voices, or $VIBEVOICE_MLX_CACHE/voices).")
@click.option("--api-key", envvar="VIBEVOICE_MLX_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer <key>' on every route but /health and the page.")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(1),
              help="Requests that may wait; beyond, 503 with Retry-After.")
@click.option("--max-batch", default=4, show_default=True, type=click.IntRange(1),
              help="Requests in progress at once; those that arrive together share one batch.")
@click.option("--batch-invariant", is_flag=True,
              help="A request's audio equals its run alone, bit for bit on any BLAS (slower batches on the CPU).")
@click.option("--max-input-chars", default=4096, show_default=True, type=click.IntRange(1),
              help="Longest 'input' accepted (OpenAI's limit by default).")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(0, min_open=True),
              callback=finite, help="Largest voice upload.")
@click.option("--max-voice-seconds", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
              callback=finite, help="Longest voice upload (and at most half the model's context).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Compute dtype (default: float16 on a GPU, float32 on the CPU).")
@click.option("--tokenizer", "tokenizers", multiple=True,
              help="Tokenizer folder or repo id, when the model folder has none: once for every model, or once per "
                   "--model in their order ('' for one that has its own).")
@click.option("--grace", default=10.0, show_default=True, type=click.FloatRange(0), callback=finite,
              help="Seconds running streams get to finish on shutdown.")
@click.option("--ws-max-message-bytes", default=64 * 1024, show_default=True, type=click.IntRange(1024),
              help="Largest WebSocket message of /v1/audio/speech/stream.")
@click.option("--ws-max-session-chars", type=click.IntRange(1),
              help="Longest utterance of a live session (default: --max-input-chars).")
@click.option("--ws-idle-timeout", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True),
              callback=finite, help="Seconds a live session may send nothing while nothing is spoken.")
@click.option("--force-frames", is_flag=True, hidden=True,
              help="Testing aid: always generate speech frames (for random test models).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(models, host, port, voices_dir, api_key, max_queue, max_batch, batch_invariant, max_input_chars,
          max_upload_mb, max_voice_seconds, dtype, tokenizers, grace, ws_max_message_bytes, ws_max_session_chars,
          ws_idle_timeout, force_frames, log_level):
    """Serve the OpenAI speech API (POST /v1/audio/speech), saved voices and a playground page at /."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 - for voice uploads
        import uvicorn
    except ImportError as e:
        raise click.ClickException(f"The server needs its extra ({e.name} is missing): "
                                   "pip install 'vibevoice-mlx[server]'")
    import vibevoice_mlx as vv

    from .app import ServerConfig, create_app
    from .live import forced_eos
    from .voices import VoiceStore
    from .worker import Worker

    logging.getLogger("vibevoice_mlx").setLevel(log_level.upper())
    if host not in LOOPBACK and not api_key:
        logger.warning("Serving on %s without --api-key: anyone who can reach this address can use it.", host)
    # What can be checked without the model is checked before the minutes its load takes.
    ids = [model_id(m) for m in models]
    if len(set(ids)) < len(ids):
        raise click.BadParameter(f"two models are named {next(i for i in ids if ids.count(i) > 1)!r}: serve each "
                                 "once (a request picks a model by its folder name).", param_hint="'--model'")
    if len(tokenizers) not in (0, 1, len(models)):
        raise click.BadParameter(f"give one --tokenizer, or one per --model ({len(models)}), not {len(tokenizers)}.",
                                 param_hint="'--tokenizer'")
    tokenizers = [t or None for t in (list(tokenizers) * len(models) if len(tokenizers) == 1 else tokenizers)] \
        or [None] * len(models)  # "" for a model that has its own
    voices_dir = voices_dir or default_voices_dir()
    with user_errors():
        VoiceStore(voices_dir)
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    sampler = force_frames_sampler(force_frames)
    workers = {}  # one worker thread per model: the thread that owns that model's MLX work
    for name, model, tokenizer in zip(ids, models, tokenizers):
        worker = Worker(lambda model=model, tokenizer=tokenizer: vv.load(
            model, backend="mlx", dtype=dtype, tokenizer=tokenizer, batch_invariant=batch_invariant),
            max_queue=max_queue, max_batch=max_batch, sampler=sampler)
        try:
            workers[name] = worker.start()
        except (ValueError, OSError) as e:  # the loader's errors (LoadError is a ValueError) and missing files
            sock.close()
            for w in workers.values():
                w.stop()
            raise click.ClickException(str(e))
    worker = workers.pop(ids[0])
    config = ServerConfig(model_id=ids[0], model_ids=ids, voices_dir=voices_dir, api_key=api_key,
                          max_input_chars=max_input_chars, max_upload_bytes=int(max_upload_mb * 2**20),
                          max_voice_seconds=max_voice_seconds, grace=grace, ws_max_message_bytes=ws_max_message_bytes,
                          ws_max_session_chars=ws_max_session_chars, ws_idle_timeout=ws_idle_timeout,
                          live_eos_rule=forced_eos if force_frames else None)
    app = create_app(worker, config, workers)
    server = draining_server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=grace + 5), [worker, *workers.values()], grace,
                             app)
    logger.info("Voices in %s; playground at http://%s:%d/", config.voices_dir, host, port)
    server.run(sockets=[sock])


def force_frames_sampler(enabled: bool):
    if enabled:
        logger.warning("--force-frames: every step is a speech frame (a testing aid for random models).")
        return force_frames
    return None


def draining_server(config, workers, grace, app=None):
    """uvicorn's Server that, on the first signal, also drains the workers (one, or a list): uvicorn waits for open
    streams before it runs the app's shutdown, so the workers must be told at the signal for those streams to end.
    uvicorn closes WebSockets at once when it shuts down, so its shutdown waits (up to `grace` + 1 s) until the
    live sessions have finished their utterances and closed with 1001."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            for worker in workers if isinstance(workers, list) else [workers]:
                worker.drain(grace)
            sessions = getattr(getattr(app, "state", None), "sessions", None)
            if not sessions or self.should_exit:
                return super().handle_exit(sig, frame)
            for session in list(sessions):
                session.drain()
            asyncio.get_running_loop().create_task(self._exit_after_sessions(sig, frame, sessions))

        async def _exit_after_sessions(self, sig, frame, sessions):
            deadline = asyncio.get_running_loop().time() + grace + 1.0
            while sessions and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            super().handle_exit(sig, frame)

    return DrainingServer(config)
