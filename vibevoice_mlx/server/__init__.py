"""`vibevoice-mlx serve`: an OpenAI-compatible speech server (`POST /v1/audio/speech`) with saved voices and a
playground page. Needs the `server` extra: `pip install 'vibevoice-mlx[server]'`.

    from vibevoice_mlx.server import ServerConfig, Worker, create_app
"""

__all__ = ["create_app", "ServerConfig", "Worker", "Job"]


def __getattr__(name):
    # Imported on first use: the main CLI imports `server.cli` for `serve`, which must work without FastAPI.
    if name in ("create_app", "ServerConfig"):
        from . import app

        return getattr(app, name)
    if name in ("Worker", "Job"):
        from . import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'vibevoice_mlx.server' has no attribute {name!r}")
