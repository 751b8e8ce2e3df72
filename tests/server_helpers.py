"""Helpers for the server tests: the tiny model as a served folder, a server subprocess on a free loopback port,
and a small HTTP client (the standard library's, so that a test controls the socket: reads part of a stream,
then drops it).

Every server here binds 127.0.0.1 and runs with `--force-frames` (the tiny random model rarely chooses speech
frames by itself). Waits are bounded; a server that does not come up fails with the tail of its log.
"""

import atexit
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Optional

import numpy as np

API_KEY = "test-key"
HOP = 16  # the tiny model's samples per frame (pipe.hop_length); tests check it against the loaded model
_CACHE: Dict[str, object] = {}


def force_frames(logits, token_ids):
    return token_ids[2]


def model_folder(tiny, root: Path) -> Path:
    """The tiny checkpoint converted once into a self-contained folder (weights and tokenizer): what serve takes."""
    if "model" not in _CACHE:
        from vibevoice_mlx.convert.convert import convert

        out = Path(root) / "tiny-served"
        convert(str(tiny["original"]), str(out), tokenizer=str(tiny["tokenizer"]))
        _CACHE["model"] = out
    return _CACHE["model"]


def pipe(tiny, root: Path):
    """The same model loaded in the test process, for reference audio."""
    if "pipe" not in _CACHE:
        import vibevoice_mlx as vv

        _CACHE["pipe"] = vv.load(str(model_folder(tiny, root)))
    return _CACHE["pipe"]


def reference_pcm(pipe, script: str, seed: int, frames: int) -> np.ndarray:
    """What the server must send for (script, seed) with forced frames: int16 samples."""
    import vibevoice_mlx as vv

    audio = vv.generate(pipe, script, seed=seed, sampler=force_frames, max_seconds=frames * HOP / 24000).audio
    return np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)


def seconds_for(frames: int) -> float:
    return frames * HOP / 24000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, {k.lower(): v for k, v in headers}, body

    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        return self.json()["error"]


class ServerProcess:
    """`python -m vibevoice_mlx.server` on a free port of 127.0.0.1, with its log in a file."""

    def __init__(self, model: Path, voices_dir: Path, log_dir: Path, *args: str, api_key: Optional[str] = API_KEY,
                 env: Optional[Dict[str, str]] = None):
        self.port = free_port()
        self.api_key = api_key
        self.voices_dir = Path(voices_dir)
        self.log_path = Path(log_dir) / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "vibevoice_mlx.server", "--model", str(model), "--port", str(self.port),
               "--voices-dir", str(voices_dir), "--force-frames", *args]
        env = {**{k: v for k, v in os.environ.items() if k != "VIBEVOICE_MLX_API_KEY"}, **(env or {})}
        if api_key:
            env["VIBEVOICE_MLX_API_KEY"] = api_key
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.request("GET", "/health", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def auth(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def connect(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 30.0,
                auth: bool = True) -> Response:
        headers = dict(headers or {})
        if auth:
            headers = {**self.auth(), **headers}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return Response(r.status, r.getheaders(), r.read())
        finally:
            conn.close()

    def speech(self, timeout: float = 30.0, **body) -> Response:
        return self.request("POST", "/v1/audio/speech", {"model": "tts-1", **body}, timeout=timeout)

    def upload_voice(self, name: str, data: bytes, filename: str = "clip.wav", **fields) -> Response:
        boundary = uuid.uuid4().hex
        parts = [(k, None, str(v).encode()) for k, v in {"name": name, **fields}.items()]
        parts.append(("file", filename, data))
        body = b""
        for field, fname, value in parts:
            disposition = f'form-data; name="{field}"' + (f'; filename="{fname}"' if fname else "")
            body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        return self.request("POST", "/v1/voices", body,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def health(self) -> dict:
        return self.request("GET", "/health", auth=False).json()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def wait_idle(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if h["queued"] == 0 and h["active"] == 0:
                return h
            time.sleep(0.05)
        raise AssertionError(f"server still busy after {timeout} s: {self.health()}")

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


REALTIME = Path(__file__).parent / "data" / "realtime_tiny"


def realtime_server(root: Path, *args: str, model: Optional[Path] = None) -> ServerProcess:
    """A server of the tiny realtime model (and `args`) whose preset `test_voice` is the tiny model's voice.pt, in a
    preset cache of its own under `root` (offline)."""
    import shutil

    presets = Path(root) / "cache" / "realtime-voices"
    presets.mkdir(parents=True, exist_ok=True)
    shutil.copy(REALTIME / "voice.pt", presets / "test_voice.pt")
    return ServerProcess(REALTIME / "model", Path(root) / "voices", root, "--tokenizer", str(REALTIME / "tokenizer"),
                         *args, env={"VIBEVOICE_MLX_CACHE": str(Path(root) / "cache"), "VIBEVOICE_MLX_OFFLINE": "1"})


def shared_server(tiny, tmp_path_factory) -> ServerProcess:
    """One server for the API, load and browser tests (started once, stopped when the test process ends)."""
    if "server" not in _CACHE:
        root = tmp_path_factory.mktemp("server")
        model = model_folder(tiny, root)
        server = ServerProcess(model, root / "voices", root, "--max-queue", "8", "--max-batch", "4",
                               "--max-upload-mb", "1", "--max-input-chars", "2000", "--grace", "2")
        atexit.register(server.stop)
        _CACHE["server"] = server.wait_ready()
    return _CACHE["server"]


def wav_bytes(audio: np.ndarray, sample_rate: int = 24000, fmt: str = "WAV") -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format=fmt)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    import io

    import soundfile as sf

    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == 24000
    return audio


def sse_events(body: bytes):
    """The JSON events of an SSE body; every block must be one `data:` line."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        events.append(json.loads(block[len("data: "):]))
    return events
