"""Streaming encoders, one per `response_format`: float32 chunks in, the bytes of one continuous file out.

Each response is one file sent as it is made, never a file per chunk. wav and pcm are 16-bit PCM, written
directly (the WAV header gives its sizes as 0xFFFFFFFF, "unknown", the usual header of a streamed WAV). mp3 and
opus go through libsndfile (LAME, libopus) writing into `_Sink`; flac too, but libFLAC only writes the stream's
length and MD5 into its header when it closes, and libsndfile-based readers refuse a FLAC without them, so flac
is sent in one piece when the audio is complete. With `stream=False` every format is held until the end, so its
header carries the true length (a WAV's sizes, LAME's header of an mp3).
"""

import logging
import struct
from typing import Dict, Optional

import numpy as np
import soundfile as sf

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000

MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

# response_format -> (libsndfile major format, subtype); what the installed libsndfile can write is checked.
_SNDFILE = {"mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS"), "flac": ("FLAC", "PCM_16")}


def available_formats() -> Dict[str, bool]:
    """Every OpenAI response_format, and whether this machine can encode it (aac never: libsndfile has no AAC)."""
    out = {"wav": True, "pcm": True, "aac": False}
    for name, (major, subtype) in _SNDFILE.items():
        out[name] = major in sf.available_formats() and subtype in sf.available_subtypes(major)
    return out


def to_pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> 16-bit signed little-endian PCM (clipped, rounded)."""
    x = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def wav_header(sample_rate: int = SAMPLE_RATE, num_samples: Optional[int] = None) -> bytes:
    """A mono 16-bit WAV header for `num_samples` samples, or, without it, for a stream of unknown length (RIFF
    and data sizes 0xFFFFFFFF)."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    data = 0xFFFFFFFF if num_samples is None else 2 * num_samples
    riff = 0xFFFFFFFF if num_samples is None else 4 + 8 + len(fmt) + 8 + data
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + \
        b"data" + struct.pack("<I", data)


class Encoder:
    """write(chunk) -> the bytes ready to send now; close() -> the rest. Raw 16-bit PCM by default."""

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        self.sample_rate = sample_rate
        self.samples = 0

    def write(self, audio: np.ndarray) -> bytes:
        self.samples += len(audio)
        return to_pcm16(audio)

    def close(self) -> bytes:
        return b""


class WavEncoder(Encoder):
    """`stream=False` holds the samples back until close, to write the header with their true sizes."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, stream: bool = True):
        super().__init__(sample_rate)
        self._header: Optional[bytes] = wav_header(sample_rate) if stream else None
        self._held: Optional[bytearray] = None if stream else bytearray()

    def _take_header(self) -> bytes:
        header, self._header = self._header or b"", None
        return header

    def write(self, audio: np.ndarray) -> bytes:
        if self._held is not None:
            self._held += super().write(audio)
            return b""
        return self._take_header() + super().write(audio)

    def close(self) -> bytes:
        if self._held is not None:
            data, self._held = bytes(self._held), None
            return wav_header(self.sample_rate, self.samples) + data
        return self._take_header()  # an empty stream is still a valid (empty) file


class _Sink:
    """A file object for libsndfile that hands bytes out as soon as they are written.

    Bytes already sent cannot change: an encoder that seeks back on close to patch its header (LAME's first
    frame, FLAC's STREAMINFO) patches only what has not been sent yet. Only unsent bytes are kept.
    """

    def __init__(self):
        self.buf = bytearray()  # the file's bytes from offset `sent` on
        self.pos = 0
        self.sent = 0

    def write(self, data) -> int:
        data = bytes(data)
        end = self.pos + len(data)
        if end > self.sent:
            start = max(self.pos, self.sent)
            if end - self.sent > len(self.buf):
                self.buf.extend(b"\0" * (end - self.sent - len(self.buf)))
            self.buf[start - self.sent:end - self.sent] = data[start - self.pos:]
        if self.pos < self.sent:
            logger.debug("encoder rewrote bytes at %d that were already sent", self.pos)
        self.pos = end
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.sent + len(self.buf)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:  # libsndfile only writes here, but its virtual IO needs a reader
        return b""

    def take(self) -> bytes:
        """The bytes written since the last take; from now on they are final."""
        out = bytes(self.buf)
        self.sent += len(out)
        self.buf = bytearray()
        return out


class SndfileEncoder(Encoder):
    """mp3, opus or flac through libsndfile. `stream=False` (always for flac) holds every byte back until close."""

    def __init__(self, response_format: str, sample_rate: int = SAMPLE_RATE, stream: bool = True):
        super().__init__(sample_rate)
        major, subtype = _SNDFILE[response_format]
        self.progressive = stream and response_format != "flac"
        self._sink = _Sink()
        extra = {}
        if response_format == "mp3":
            # Constant bitrate: without the header LAME patches on close (already sent), readers estimate the
            # length from the first frame's bitrate, which is only right when every frame has it.
            extra = dict(bitrate_mode="CONSTANT", compression_level=0.5)
        self._file = sf.SoundFile(self._sink, "w", sample_rate, 1, subtype, format=major, **extra)

    def write(self, audio: np.ndarray) -> bytes:
        self.samples += len(audio)
        self._file.write(np.asarray(audio, np.float32))
        return self._sink.take() if self.progressive else b""

    def close(self) -> bytes:
        if not self._file.closed:
            self._file.close()
        return self._sink.take()


def make_encoder(response_format: str, sample_rate: int = SAMPLE_RATE, stream: bool = True) -> Encoder:
    """The encoder of a response; `stream=False`: the whole file comes from close(), with its true length."""
    if response_format == "pcm":
        return Encoder(sample_rate)  # no header: the same bytes either way
    if response_format == "wav":
        return WavEncoder(sample_rate, stream)
    if response_format in _SNDFILE:
        return SndfileEncoder(response_format, sample_rate, stream)
    raise ValueError(f"No encoder for response_format {response_format!r}")
