"""Saved voices of the server: one `<name>.safetensors` (what `vv.save_voice` writes) per name in one folder.

Names are plain words (letters, digits, `_` and `-`, up to 64), so a name can never reach outside the folder.
A voice is written to a hidden temporary file and renamed into place: the folder only ever holds whole voices.
An upload is refused when it is longer than the server takes, and encoded in steps that the worker runs between
the frames of the speech in progress.
"""

import logging
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Dict, Generator, List, Optional, Tuple

import numpy as np

from ..audio import voice_frames
from ..constants import SAMPLE_RATE
from ..errors import UserError
from .errors import APIError, hide_paths

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SUFFIX = ".safetensors"


class VoiceNameError(ValueError):
    """A voice name that is not a plain word."""


class VoiceExistsError(ValueError):
    pass


class VoiceNotFoundError(ValueError):
    pass


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise VoiceNameError(f"Invalid voice name {str(name)[:80]!r}: use 1 to 64 letters, digits, '_' or '-', "
                             "starting with a letter or digit.")
    return name


class VoiceStore:
    """The saved voices in `folder` (created if missing); they outlive the server."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # A real write: mode bits tell nothing about a read-only mount, nor to root, which ignores them.
            fd, probe = tempfile.mkstemp(prefix=".upload-", dir=self.folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"Cannot write saved voices in {self.folder} ({e.strerror or e}): give --voices-dir a "
                            "folder this server can write to.") from None
        for stale in self.folder.glob(".upload-*"):  # left by a server killed in the middle of an upload
            stale.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{SUFFIX}"

    def exists(self, name: str) -> bool:
        return NAME.fullmatch(name or "") is not None and self.path(name).is_file()

    def resolve(self, name: str) -> str:
        """The saved voice's file, for `voices=[...]`; an unknown name is a VoiceNotFoundError."""
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(self.names()[:20]) or "none yet"
            raise VoiceNotFoundError(f"No saved voice named {name!r} (saved: {known}); upload one with "
                                     "POST /v1/voices.")
        return str(path)

    def names(self) -> List[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}")
                      if NAME.fullmatch(p.name[: -len(SUFFIX)]))

    def describe(self, name: str) -> Dict:
        from ..audio import load_voice

        path = self.path(name)
        info = {"id": name, "object": "voice", "created_at": int(path.stat().st_mtime)}
        try:
            _, meta = load_voice(path)
            info["seconds"] = round(meta["num_samples"] / meta["sample_rate"], 3)
        except (ValueError, OSError) as e:  # a broken file is listed, so that it can be deleted
            info["error"] = hide_paths(str(e))
        return info

    def list(self) -> List[Dict]:
        return [self.describe(n) for n in self.names()]

    def temp_path(self, suffix: str = "") -> Path:
        """A hidden file in the folder for an upload in progress (cleaned up on the next start if left)."""
        suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,16}", suffix or "") else ""
        return self.folder / f".upload-{uuid.uuid4().hex}{suffix}"

    def add(self, name: str, write: Callable[[Path], None], overwrite: bool = False) -> Dict:
        """Save a voice under `name`: `write(tmp_path)` writes the .safetensors file, which is then renamed."""
        target = self.path(name)
        if target.exists() and not overwrite:
            raise VoiceExistsError(f"A voice named {name!r} exists; delete it first or pass overwrite=true.")
        tmp = self.temp_path(SUFFIX)
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("Saved voice %r in %s", name, target)
        return self.describe(name)

    def delete(self, name: str) -> Optional[Path]:
        path = self.path(name)
        if not path.is_file():
            raise VoiceNotFoundError(f"No saved voice named {name!r}.")
        path.unlink()
        logger.info("Deleted voice %r", name)
        return path


def max_voice_frames(pipe, max_seconds: float) -> Tuple[int, str]:
    """The longest voice saved here, in latent frames, and what sets it: `max_seconds`, or half the model's context
    (a one-line prompt with the voice may take half, so that a request with it keeps the rest for its speech)."""
    from ..processor import build_prompt

    prompt = build_prompt(pipe.tokenizer, [(0, " Hello.")], [1], pipe.tokens, num_speakers=1)
    by_context = pipe.config.max_positions // 2 - (len(prompt.input_ids) - 1)
    by_option = int(max_seconds * SAMPLE_RATE / pipe.hop_length)
    if by_option <= by_context:
        return by_option, "--max-voice-seconds"
    return max(by_context, 0), (f"half of the model's context of {pipe.config.max_positions} tokens, at "
                                f"{SAMPLE_RATE / pipe.hop_length:g} tokens a second of voice")


def read_upload(pipe, path: Path, max_seconds: float) -> np.ndarray:
    """An uploaded clip as `say` reads a voice; 413 if it is longer than this server takes (a long file is
    refused from its header, before it is decoded)."""
    import soundfile as sf

    from ..voices import read_voice

    limit, why = max_voice_frames(pipe, max_seconds)

    def too_long(seconds: float) -> APIError:
        return APIError(413, f"The voice is {seconds:.1f} s long; this server saves voices of up to "
                        f"{limit * pipe.hop_length / SAMPLE_RATE:g} s ({why}): upload a shorter clip (3 to 30 s "
                        "clone best).", param="file", code="voice_too_long")

    try:
        seconds = sf.info(str(path)).duration
    except RuntimeError:  # not audio libsndfile knows: read_voice says so
        seconds = 0.0
    if seconds * SAMPLE_RATE / pipe.hop_length > limit + 1:
        raise too_long(seconds)
    audio = read_voice(str(path))
    if voice_frames(len(audio), pipe.hop_length) > limit:
        raise too_long(len(audio) / SAMPLE_RATE)
    return audio


def encode_voice(pipe, audio: np.ndarray) -> Generator[None, None, np.ndarray]:
    """Steps that end with the latents `vv.encode_voices(pipe, [audio])` gives (the same input, the same compiled
    encoder and chunks, as the engine encodes one clip), one chunk of the acoustic encoder per step."""
    import mlx.core as mx

    from ..voices import prepare_voices

    (x,) = prepare_voices(pipe, [audio], 1)
    encoder = pipe.backend.model.model.acoustic_tokenizer.encoder
    parts = []
    for part in encoder.chunks(mx.array(x)[None, :, None], compile=True):
        parts.append(part)
        yield
    mean = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    return np.array(mean[0].astype(mx.float32))
