"""The request body of `POST /v1/audio/speech`: OpenAI's fields, then VibeVoice's own, validated in one place."""

import math
from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import vibevoice_mlx as vv

from .errors import APIError

_DEFAULTS = vv.GenerationConfig()

# OpenAI's built-in voices: apps often send one of them and cannot be told otherwise. Unless a saved voice has
# that name, it means "no voice sample": the model picks the voice.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
                           "verse", "marin", "cedar"})
# OpenAI's speech model names, accepted for the one model this server runs.
OPENAI_MODELS = frozenset({"tts-1", "tts-1-hd", "gpt-4o-mini-tts"})


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's speech request; `voices`, `steps`, `cfg_scale`, `seed`, `temperature`, `top_p` and
    `max_seconds` are VibeVoice's (the `say` options of the same names), and `stream` (False: the whole file at
    the end, its header with the true length). Unknown fields are refused. Defaults are the library's
    (`vv.GenerationConfig`)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str
    voice: Union[str, VoiceRef, None] = None
    voices: Optional[List[str]] = Field(None, max_length=16)
    instructions: Optional[str] = None
    response_format: str = "mp3"
    speed: Optional[float] = None
    stream_format: Literal["audio", "sse"] = "audio"
    stream: bool = True
    # None: the model's own defaults (its generation_config.json, else the library's).
    steps: Optional[int] = Field(None, ge=1, le=100)
    cfg_scale: Optional[float] = Field(None, ge=0, le=100)
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1)
    temperature: float = Field(_DEFAULTS.temperature, ge=0, le=100)
    top_p: float = Field(_DEFAULTS.top_p, gt=0, le=1)
    max_seconds: Optional[float] = Field(None, gt=0)

    @field_validator("cfg_scale", "temperature", "top_p", "max_seconds", "speed")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    def voice_names(self) -> List[str]:
        """The voice names in speaker order: `voices` if given, else `voice` for speaker 1."""
        if self.voices is not None:
            return list(self.voices)
        if self.voice is None:
            return []
        return [self.voice.id if isinstance(self.voice, VoiceRef) else self.voice]


def parse_speech_request(data) -> SpeechRequest:
    """The body as a SpeechRequest, or a 400 APIError naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return SpeechRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        if err.get("type") == "extra_forbidden":
            raise APIError(400, f"Unknown parameter {where!r}.", param=param, code="unknown_parameter")
        if err.get("type") == "missing":
            raise APIError(400, f"Missing required parameter {where!r}.", param=param, code="missing_parameter")
        raise APIError(400, f"Invalid {where!r}: {err.get('msg')}.", param=param, code="invalid_value")
