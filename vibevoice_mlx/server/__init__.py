"""`vibevoice-mlx serve`: an OpenAI-compatible speech server (`POST /v1/audio/speech`) with saved voices and a
playground page. Needs the `server` extra: `pip install 'vibevoice-mlx[server]'`."""

from .app import ServerConfig, create_app
from .worker import Job, Worker

__all__ = ["create_app", "ServerConfig", "Worker", "Job"]
