"""The models one server serves (`serve --model A --model B`): each with its own worker (the thread that owns that
model's MLX work) and its live batch; a request picks one by `model`, and OpenAI's aliases mean the first."""

from dataclasses import dataclass
from typing import Optional

from .schemas import OPENAI_MODELS


@dataclass
class Served:
    id: str
    worker: object  # worker.Worker
    live: object  # live.LiveBatch
    encoder: Optional[str]  # the acoustic encoder's fingerprint (1.5B/7B), for saved voices

    @property
    def realtime(self) -> bool:
        return getattr(self.worker.pipe, "family", None) == "realtime"


def served_model(state, name: Optional[str]) -> Optional[Served]:
    """The served model `name` names (None or an OpenAI alias: the first), or None if it is not served here."""
    if name is None or name in OPENAI_MODELS:
        return next(iter(state.served.values()))
    return state.served.get(name)
