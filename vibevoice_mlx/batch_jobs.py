"""The manifest and the outputs of `vibevoice-mlx batch`: no model here, so a rerun decides what is left to do, and
a Ray driver what to send, without loading one.

A manifest is JSON Lines, one job per line:

    {"id": "ep1", "file": "ep1.txt", "voices": ["alice.wav", "bob.wav"], "seed": 7, "output": "ep1.mp3"}
    {"id": "intro", "script": "Speaker 1: Welcome!", "steps": 20}

`id` (letters, digits, `.`, `_`, `-`) and one of `script` (the text) or `file` (a script file) are required;
`voices`, `seed` (default: derived from the id, so a rerun makes the same audio), `output` (default `<id>.wav`,
any format `say` writes, under the output folder) and the generation options `steps`, `cfg_scale`,
`temperature`, `top_p`, `max_seconds` are optional. Relative paths are read from the manifest's folder.

For VibeVoice-Realtime-0.5B a job's script is plain text and `voices` holds at most one voice preset: a name
(`"en-Davis_man"`), a `.pt` or a `.safetensors` (default: `en-Carter_man`); `temperature` and `top_p` do not apply.

A finished job is its output plus a sidecar `<output>.json` whose settings (what decides the audio: the script,
the voices' bytes, the seed, the options, the model) match the job's; both are written atomically (a temporary
file, then `os.replace`), the audio first, so a job killed at any moment is either finished or not started.
"""

import hashlib
import json
import os
import re
import socket
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .constants import check_option
from .errors import UserError
from .hub import file_sha256
from .models import REALTIME

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

OPTIONS = ("steps", "cfg_scale", "temperature", "top_p", "max_seconds")  # checked as the API checks them
KEYS = ("id", "script", "file", "voices", "seed", "output", *OPTIONS)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
EVENT_LOG = "batch-log.jsonl"  # one line per job event, from every process writing to the folder
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def _check(key: str, value, where: str) -> None:
    try:
        check_option(key, value)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


@dataclass
class Job:
    """One manifest line, checked. `script` holds the text once `prepare` has read it; `settings` what decides
    its audio (compared with a finished output's sidecar)."""

    id: str
    line: int
    output: str
    seed: int
    script: Optional[str] = None
    file: Optional[str] = None
    voices: List[str] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls(**json.loads(text))


def default_seed(job_id: str) -> int:
    """A seed that depends only on the id, so a job without one makes the same audio on every run and machine."""
    return zlib.crc32(job_id.encode("utf-8")) & 0x7FFFFFFF


def _check_output(name, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: 'output' must be a file name such as \"ep1.wav\".")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise UserError(f"{where}: 'output' {name!r} must stay inside --out-dir (a relative path without '..').")
    if p.suffix.lower() not in AUDIO_EXTENSIONS:
        raise UserError(f"{where}: 'output' {name!r} needs an audio extension: {', '.join(AUDIO_EXTENSIONS)}.")
    return p.as_posix()


def _voice_path(voice: str, base: Path, realtime: bool) -> str:
    """A voice file relative to the manifest's folder; a realtime preset name stays a name."""
    path = base / voice
    if realtime and not Path(voice).suffix and not path.exists():
        return voice
    return str(path)


def parse_job(obj, line: int, where: str, base: Path, defaults: Dict[str, Any], realtime: bool = False) -> Job:
    """One manifest line's object -> Job; a mistake is a one-line UserError starting with `where`. `realtime`: the
    jobs are for VibeVoice-Realtime-0.5B (one preset voice, no token sampling)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a job must be a JSON object, got {type(obj).__name__}.")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; a job takes {', '.join(KEYS)}.")
    job_id = obj.get("id")
    if not isinstance(job_id, str) or not _ID_RE.match(job_id):
        raise UserError(f"{where}: 'id' must be a string of letters, digits, '.', '_' or '-' (got {job_id!r}).")
    if ("script" in obj) == ("file" in obj):
        raise UserError(f"{where}: give exactly one of 'script' (the text) or 'file' (a script file).")
    script, file = obj.get("script"), obj.get("file")
    if script is not None and (not isinstance(script, str) or not script.strip()):
        raise UserError(f"{where}: 'script' must be non-empty text.")
    if file is not None:
        if not isinstance(file, str) or not file:
            raise UserError(f"{where}: 'file' must be a path.")
        file = str(base / file)
    voices = obj.get("voices", [])
    if not isinstance(voices, list) or not all(isinstance(v, str) and v for v in voices):
        raise UserError(f"{where}: 'voices' must be a list of file paths, one per speaker.")
    seed = obj.get("seed", defaults.get("seed"))
    if seed is None:
        seed = default_seed(job_id)
    _check("seed", seed, where)
    options = {k: v for k, v in defaults.items() if k in OPTIONS and v is not None}
    for key in OPTIONS:
        if key in obj:
            _check(key, obj[key], where)
            options[key] = obj[key]
    if realtime:
        other = [k for k in ("temperature", "top_p") if k in options]
        if other:
            raise UserError(f"{where}: {', '.join(other)} only apply to VibeVoice 1.5B/7B, not to "
                            "VibeVoice-Realtime-0.5B (it chooses no tokens): leave it out.")
        if len(voices) > 1:
            raise UserError(f"{where}: VibeVoice-Realtime-0.5B speaks in one voice per script; got {len(voices)}: "
                            "give one preset name or file.")
    output = _check_output(obj.get("output", f"{job_id}.wav"), where)
    return Job(job_id, line, output, int(seed), script, file, [_voice_path(v, base, realtime) for v in voices],
               options)


def read_manifest(path, defaults: Optional[Dict[str, Any]] = None, realtime: bool = False) -> List[Job]:
    """All jobs of a JSON Lines manifest, checked before anything runs (blank lines are skipped); `realtime`: for
    VibeVoice-Realtime-0.5B."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UserError(f"Manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read the manifest {path}: {e}") from None
    for key in ("seed", *OPTIONS):  # the command's defaults (--cfg-scale ...), checked as a job's own values
        if (defaults or {}).get(key) is not None:
            _check(key, defaults[key], "--" + key.replace("_", "-"))
    base = path.parent.resolve()  # absolute, so that workers started elsewhere (Ray) find the files
    jobs: List[Job] = []
    ids: Dict[str, int] = {}
    outputs: Dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
        job = parse_job(obj, number, where, base, defaults or {}, realtime)
        if job.id in ids:
            raise UserError(f"{where}: id {job.id!r} is already used on line {ids[job.id]}.")
        if job.output.lower() in outputs:
            raise UserError(f"{where}: output {job.output!r} is already written by line {outputs[job.output.lower()]}.")
        ids[job.id], outputs[job.output.lower()] = number, number
        jobs.append(job)
    if not jobs:
        raise UserError(f"{path} has no jobs: write one JSON object per line.")
    return jobs


def parse_shard(text: str) -> Tuple[int, int]:
    """"i/n" -> (i, n), 0 <= i < n: this process runs jobs i, i + n, i + 2n, ... of the manifest."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard {text!r}: write i/n with 0 <= i < n, e.g. 0/4 ... 3/4.")
    return int(m.group(1)), int(m.group(2))


def prepare(job: Job, run: Dict[str, Any]) -> Job:
    """Read the job's script and hash its voices; `run` holds the settings shared by all jobs (model, dtype, ...;
    `family` for VibeVoice-Realtime-0.5B, whose voice is a preset: resolved here, audio refused). A missing or
    unreadable file, or a script the processor refuses, is a UserError for this job alone."""
    from .audio import check_input_file
    from .processor import parse_script, read_script_file

    if job.script is None:
        job.script = read_script_file(job.file)
    if run.get("family") == REALTIME:
        from .preset_store import resolve_voice

        job.voices = [str(resolve_voice(v)) for v in job.voices]  # a name is fetched and converted once, here
    else:
        parse_script(job.script)
    voices = []
    for v in job.voices:
        check_input_file(v, "Voice file", pipe_ok=False)  # read twice: hashed here, decoded when made
        voices.append(file_sha256(Path(v)))  # the bytes decide, not where the file lies
    job.settings = {"script_sha256": hashlib.sha256(job.script.encode("utf-8")).hexdigest(), "voices": voices,
                    "seed": job.seed, **{k: job.options.get(k) for k in OPTIONS}, **run}
    return job


def sidecar_path(out_dir: Path, output: str) -> Path:
    return Path(out_dir) / (output + ".json")


def is_finished(out_dir: Path, job: Job) -> bool:
    """The output and its sidecar exist and the sidecar's settings are this job's."""
    out, side = Path(out_dir) / job.output, sidecar_path(out_dir, job.output)
    if not (out.is_file() and side.is_file()):
        return False
    try:
        recorded = json.loads(side.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == json.loads(json.dumps(job.settings))  # compared as JSON, as it was written


def claim(out_dir: Path, job: Job) -> Optional[int]:
    """Take `job` for this process before making it, as `say` locks its output: an exclusive `flock` on a hidden
    claim file beside the output, held until `release`. None when another run holds it (a second process on the
    same folder then leaves the job to it); the kernel drops the lock of a killed run, so a rerun can take it."""
    final = Path(out_dir) / job.output
    final.parent.mkdir(parents=True, exist_ok=True)
    path = _claim_path(final)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # Windows: no claims, everything else works
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the holder may have released and removed the file between our open and our lock: open it again
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release(out_dir: Path, job: Job, fd: int) -> None:
    """Give a claim back: the file is removed while still locked, so no run can lock a file that is gone."""
    _claim_path(Path(out_dir) / job.output).unlink(missing_ok=True)
    os.close(fd)


def _claim_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.claim")


def _temp_name(final: Path) -> Path:
    # Same folder (os.replace is atomic only within a file system), same extension (it picks the format).
    return final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.partial{final.suffix}")


def write_outputs(out_dir: Path, job: Job, audio, sample_rate: int, record: Dict[str, Any]) -> Path:
    """Write the audio and the sidecar, each atomically, both written before either is renamed into place (a full
    disk leaves neither); returns the output path."""
    from . import __version__
    from .audio import write_audio
    from .output import writing

    final = Path(out_dir) / job.output
    final.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar_path(out_dir, job.output)
    payload = {"id": job.id, "output": job.output, "settings": job.settings, "voices": job.voices, **record,
               "worker": worker_info(), "version": __version__}
    temp, side_temp = _temp_name(final), side.with_name(f".{side.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with writing(final):
            write_audio(temp, audio, sample_rate, force=True)
            side_temp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        os.replace(temp, final)
        os.replace(side_temp, side)
    finally:
        temp.unlink(missing_ok=True)
        side_temp.unlink(missing_ok=True)
    return final


def worker_info() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def log_event(out_dir: Path, event: str, **fields) -> None:
    """Append one line to the folder's event log: one write of one short line, so lines from several processes
    (shards, Ray workers) do not interleave on a local file system."""
    line = json.dumps({"time": round(time.time(), 3), "event": event, **worker_info(), **fields}) + "\n"
    fd = os.open(Path(out_dir) / EVENT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_events(out_dir: Path) -> List[Dict[str, Any]]:
    path = Path(out_dir) / EVENT_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
