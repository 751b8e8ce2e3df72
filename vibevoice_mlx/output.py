"""Output files that are never half-written: audio written as it is produced, finalized atomically.

The audio goes to `<file>.partial.wav`, a WAV whose header libsndfile rewrites after every chunk, so it is valid
at every moment, even after a hard kill. Only when the writer closes is it moved (WAV) or encoded (FLAC, OGG,
MP3) into place under the final name with `os.replace`: the final name only ever holds a complete file, and an
existing one (--force) stays intact until its replacement is ready. The partial file is also the writer's lock
(`flock`), so a second run writing the same path is refused instead of splicing the file; a partial left by a
killed run is replaced with a message. A writer that wrote nothing leaves nothing behind; one that fails (a full
disk, a bug) never puts its file under the final name.
"""

import errno
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
import soundfile as sf

from .constants import SAMPLE_RATE
from .errors import Interrupted, MissingPathError, OutputExistsError, UserError, exists_message

try:
    import fcntl
except ImportError:  # not on Windows: no lock, everything else works
    fcntl = None

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# extension -> (libsndfile major format, subtype). 16-bit PCM is what the original writes.
FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".opus": ("OGG", "OPUS"),  # what the server sends as opus; Ogg Opus at 24 kHz
}

# sndfile.h: rewrite the header after every write, so the sizes always match the data written.
_SFC_SET_UPDATE_HEADER_AUTO = 0x1061
PARTIAL_SUFFIX = ".partial.wav"
# libsndfile and MLX report a failed write without its errno: with less free space than this left, it was a full
# disk.
_FULL_BYTES = 1 << 20


class DiskFullError(UserError):
    """A write failed for lack of space (or quota); what was being written is not left under its name."""


@contextmanager
def writing(path: PathLike):
    """Writes to `path` inside this block that fail for lack of space raise a one-line `DiskFullError` naming the
    file (the outermost block's: a temporary name means nothing to a user); any other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise DiskFullError(f"No space left on device while writing {path}") from None
    except (OSError, RuntimeError) as e:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and (not isinstance(e, OSError) or e.errno is None):
            try:
                full = shutil.disk_usage(Path(path).parent).free < _FULL_BYTES
            except OSError:
                pass
        if not full:
            raise
        raise DiskFullError(f"No space left on device while writing {path}") from None


def output_format(path: Path) -> Tuple[str, str]:
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise UserError(f"Cannot write {path}: unknown audio format {ext or '(no extension)'!r}; "
                        f"use one of {', '.join(FORMATS)}.")
    major, subtype = FORMATS[ext]
    if subtype not in sf.available_subtypes(major):
        raise UserError(f"Cannot write {path}: this machine's libsndfile has no {ext[1:]} encoder; use .wav or "
                        ".flac, or a newer libsndfile.")
    return major, subtype


def check_output_path(path: PathLike, force: bool = False, what: str = "output") -> Path:
    """Everything about an output path that can be checked before any work: not a folder, its folder exists and
    is writable, and an existing file is only replaced with `force`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"The {what} {path} is a folder: give a file name.")
    if (path.exists() or path.is_symlink()) and not force:  # a dangling link is still something there
        raise OutputExistsError(exists_message(path))
    folder = path.parent
    if not folder.is_dir():
        raise MissingPathError(f"Cannot write {path}: folder {folder} does not exist.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"Cannot write {path}: folder {folder} is not writable.")
    _check_not_busy(path)
    return path


def _busy(path: Path) -> UserError:
    return UserError(f"Another run is writing {path} right now (it holds {path.name + PARTIAL_SUFFIX}): wait for it "
                     "or choose another output.")


def _check_not_busy(path: Path) -> None:
    """Refuse a path another run is writing now (it holds the partial file's lock): said before any work, not
    after the model loaded. AudioWriter takes the lock itself; this only looks."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if fcntl is None or not partial.is_file():
        return
    try:
        fd = os.open(partial, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(path) from None
    finally:
        os.close(fd)  # and with it the lock, if it was taken


def _mono(audio) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim > 1:
        x = x.squeeze()
    if x.ndim > 1:
        raise ValueError(f"Expected mono audio ([T], [1, T] or [T, 1]); got shape {np.shape(audio)}")
    return x.reshape(-1)


def _seconds_in(path: Path) -> float:
    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except Exception:  # a leftover too damaged to read: it is replaced all the same
        return 0.0


class AudioWriter:
    """Write mono float32 audio chunk by chunk; `close()` (also on an exception or Ctrl-C in a `with` block)
    finalizes what was written under `path`. After a hard kill, `partial_path` holds every chunk written."""

    def __init__(self, path: PathLike, sample_rate: int = SAMPLE_RATE, force: bool = False,
                 subtype: Optional[str] = None):
        self.path = check_output_path(path, force)
        self.sample_rate = int(sample_rate)
        self.format, self.subtype = output_format(self.path)
        self.subtype = subtype or self.subtype
        self.frames = 0
        self.partial_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        leftover = self.partial_path.exists()
        self._lock = os.open(self.partial_path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock)
                self._file = None
                raise _busy(self.path) from None
        if leftover:
            logger.warning("Replacing %s, left by an interrupted run (%.1f s of audio).", self.partial_path,
                           _seconds_in(self.partial_path))
        # A WAV partial is the final file already; compressed formats are encoded from a float WAV on close.
        partial_subtype = self.subtype if self.format == "WAV" else "FLOAT"
        try:
            with writing(self.path):
                self._file = sf.SoundFile(str(self.partial_path), "w", self.sample_rate, 1, partial_subtype,
                                          format="WAV")
        except BaseException:
            self._file = None
            self.partial_path.unlink(missing_ok=True)
            os.close(self._lock)
            raise
        self._auto_header()

    def _auto_header(self):
        try:
            # soundfile does not expose this command; its cffi handle does (sf_command is part of libsndfile's ABI).
            ok = sf._snd.sf_command(self._file._file, _SFC_SET_UPDATE_HEADER_AUTO, sf._ffi.NULL, sf._snd.SF_TRUE)
        except AttributeError:
            ok = 0
        if not ok:
            logger.warning("Could not make libsndfile update the WAV header as it writes; an interrupted run "
                           "leaves a header that only libsndfile-based readers accept.")

    @property
    def seconds(self) -> float:
        """Seconds of audio written so far."""
        return self.frames / self.sample_rate

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, chunk) -> None:
        """Append a chunk of mono audio (numpy, MLX or anything `np.asarray` takes; [T], [1, T] or [T, 1])."""
        if self._file is None:
            raise ValueError(f"{self.path} is already closed.")
        x = _mono(chunk)
        if x.size:
            with writing(self.path):
                self._file.write(x)
            self.frames += x.size

    def close(self) -> None:
        """Finalize: move (WAV) or encode (other formats) what was written into place; nothing written, nothing
        left."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        try:
            if self.frames == 0:
                self.partial_path.unlink(missing_ok=True)
            elif self.format == "WAV":
                os.replace(self.partial_path, self.path)
            else:
                def encode(tmp: Path):
                    with sf.SoundFile(str(self.partial_path)) as src, \
                            sf.SoundFile(str(tmp), "w", self.sample_rate, 1, self.subtype, format=self.format) as dst:
                        for block in src.blocks(blocksize=1 << 16, dtype="float32"):
                            dst.write(block)

                write_atomically(self.path, encode)
                self.partial_path.unlink()
        except DiskFullError:
            self.partial_path.unlink(missing_ok=True)  # the space it takes is what is missing
            raise
        finally:
            os.close(self._lock)

    def abandon(self, remove: bool = False) -> None:
        """Stop without finalizing: the partial file stays (valid, for a later run to use or replace) unless
        `remove`; the final name is not touched."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if remove:
            self.partial_path.unlink(missing_ok=True)
        os.close(self._lock)

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # Done, or stopped by the user: what was made is the output. Failed: the final name is not touched.
        if exc is None or isinstance(exc, (Interrupted, KeyboardInterrupt)):
            self.close()
        else:
            self.abandon(remove=isinstance(exc, DiskFullError))

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()


def write_atomically(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place; on any error nothing is
    left. The file gets the permissions a plain `open` would give (not mkstemp's private 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with writing(path):
            write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_audio(path: PathLike, audio, sample_rate: int = SAMPLE_RATE, force: bool = False,
                subtype: Optional[str] = None) -> Path:
    """Write a whole mono clip atomically; the format follows the extension (.wav, .flac, .ogg, .mp3)."""
    path = check_output_path(path, force)
    fmt, default_subtype = output_format(path)
    x = _mono(audio)
    return write_atomically(path, lambda tmp: sf.write(str(tmp), x, int(sample_rate),
                                                       subtype=subtype or default_subtype, format=fmt))
