"""Saved voices of the server: one `<name>.safetensors` (what `vv.save_voice` writes) per name in one folder.

Names are plain words (letters, digits, `_` and `-`, up to 64), so a name can never reach outside the folder.
A voice is written to a hidden temporary file and renamed into place: the folder only ever holds whole voices.
"""

import logging
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..errors import UserError

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
            info["error"] = str(e)
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
