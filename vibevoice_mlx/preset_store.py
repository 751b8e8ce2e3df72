"""Where VibeVoice-Realtime-0.5B voices come from: the preset names Microsoft publishes, the cache folder they are
fetched and converted into, and `--voice` resolution for the realtime model (realtime.md §3.4, §3.5).

A known name is downloaded once from github `microsoft/VibeVoice` at a pinned commit (files at a commit never change,
so each download is checked against its git blob id) into `<cache>/realtime-voices/`, then converted to a
`.safetensors` voice beside it. That folder is also where a preset can be dropped by hand (offline, or the
experimental voices of `demo/download_experimental_voices.sh`). The model has no acoustic encoder: audio is refused.
"""

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .errors import MissingPathError
from .hub import cache_root, file_sha256
from .output import write_atomically
from .presets import MAX_ARCHIVE_BYTES, PresetError, PresetShape, RealtimeVoice, convert_pt, \
    load_preset, read_meta

logger = logging.getLogger(__name__)

REPO = "microsoft/VibeVoice"
COMMIT = "e73d1e17c3754f046352014856a922f8208fb5d3"  # 2026-04-24; holds all 25 presets below
PRESETS_URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/demo/voices/streaming_model"
URL_ENV = "VIBEVOICE_MLX_PRESETS_URL"  # another base URL (a mirror, a file:// folder): files must be identical
OFFLINE_ENV = "VIBEVOICE_MLX_OFFLINE"
EXPERIMENTAL_SCRIPT = f"https://github.com/{REPO}/blob/{COMMIT}/demo/download_experimental_voices.sh"

# name -> git blob id of demo/voices/streaming_model/<name>.pt at COMMIT (`git ls-tree`): the download's checksum.
PRESET_BLOBS = {
    "de-Spk0_man": "740731426768eb1902ede9276c9e1f33fb8bd37f",
    "de-Spk1_woman": "c67e669e718639e1d7e451330e3122eb8a0ac071",
    "en-Carter_man": "1d795ef667e6641eecb8b22452bb853b089bfdbe",
    "en-Davis_man": "a259516c4d777016dbdc6ed925389cb35f2a6e4b",
    "en-Emma_woman": "9876ca31f3fad23cea06ea4b73bfea799c3c747b",
    "en-Frank_man": "2c37e82fc01855700bcf1f9389cc6ac11f54d789",
    "en-Grace_woman": "366bda87ee88da801999dd649d95f1f685cd63b5",
    "en-Mike_man": "f02ef03fb2c325c2be20c4c3e83b41e0a423b5a4",
    "fr-Spk0_man": "dcc72ffd49bf63b21ad49f895ea5fd8d46327b83",
    "fr-Spk1_woman": "48756ff630f80e29949489a46c8cb415249b24d8",
    "in-Samuel_man": "9338cb669b22a80f0c0a7ba5f15e7713ce4cf9c9",
    "it-Spk0_woman": "c57fc61f6cec310ca4ad9bd303d8a50e1872d13f",
    "it-Spk1_man": "68b658e5a4f9b0010f9b634e041a97dc787e2577",
    "jp-Spk0_man": "bf710af211e9df24bb05f39ab96e7b21a8fc151c",
    "jp-Spk1_woman": "4ea2def0b30b5cc61f2179be7fd29cafe85485dd",
    "kr-Spk0_woman": "42646663e0d9df5cc0fea69d2fc1e2004b933d1b",
    "kr-Spk1_man": "c0eaafaeccac4d446a32dc2a12acf7bbb43c95d9",
    "nl-Spk0_man": "edeb893336d1dc23e94ce6143350d5f0d0fec951",
    "nl-Spk1_woman": "5014702b1a9c0a6c87060c66b160dacff65b69f4",
    "pl-Spk0_man": "f81b24ddd8d4bb00d71615fda399a1e2cf9e6356",
    "pl-Spk1_woman": "a55ed5a5bdcb1b05ca2bc13c35ae226430b1025c",
    "pt-Spk0_woman": "0316c77f05f2bdadfb271acc4d8432f99e5b6eea",
    "pt-Spk1_man": "db7ca1b664a5fe8a24c500c5128627853339ac35",
    "sp-Spk0_woman": "4b84fa25f8529a93b8486326413ec91e619ad651",
    "sp-Spk1_man": "ec5698ae498246e1fdfc61d3b24bdecadbfb8149",
}
PRESET_NAMES = tuple(PRESET_BLOBS)
DEFAULT_PRESET = "en-Carter_man"  # the web demo's default (demo/web/app.py:145)
_NAME = re.compile(r"[A-Za-z0-9][\w\-]*")


def preset_dir() -> Path:
    """The folder presets are downloaded to, converted in, and may be dropped into by hand."""
    return cache_root() / "realtime-voices"


def preset_url(name: str) -> str:
    return f"{os.environ.get(URL_ENV, PRESETS_URL).rstrip('/')}/{name}.pt"


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's contents (sha1 of 'blob <size>\\0' + data)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _offline() -> Optional[str]:
    """The variable that puts us offline, if one does."""
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return OFFLINE_ENV
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE" if constants.is_offline_mode() else None


def _local_pt(name: str) -> Optional[Path]:
    """`<name>.pt` in the preset folder, or in a folder below it (where the experimental archives extract)."""
    folder = preset_dir()
    found = [folder / f"{name}.pt"] + sorted(folder.glob(f"**/{name}.pt"))
    return next((p for p in found if p.is_file()), None)


def fetch_preset(name: str) -> Path:
    """The `.pt` of a known preset: from the preset folder, else downloaded once (checked, written atomically)."""
    local = _local_pt(name)
    if local is not None:
        return local
    folder, url = preset_dir(), preset_url(name)
    if name not in PRESET_BLOBS:
        raise PresetError(f"Unknown voice preset {name!r}: use one of {', '.join(PRESET_NAMES)}, or put {name}.pt "
                          f"into {folder}/.")
    offline = _offline()
    if offline:
        raise PresetError(f"Voice preset {name!r} is not downloaded and {offline} is set: download {url} into "
                          f"{folder}/ (or run once online).")
    logger.info("Downloading voice preset %s from %s", name, url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read(MAX_ARCHIVE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise PresetError(f"Downloading voice preset {name!r} from {url} failed ({reason}): download it by hand "
                          f"into {folder}/.") from None
    if len(data) > MAX_ARCHIVE_BYTES or git_blob_id(data) != PRESET_BLOBS[name]:
        raise PresetError(f"{url} did not return the {name} preset of {REPO}@{COMMIT[:7]} (checksum mismatch): "
                          f"download it by hand into {folder}/.")
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomically(folder / f"{name}.pt", lambda tmp: tmp.write_bytes(data))


def _converted(source: Path, target: Path) -> Path:
    """`target`, converted from `source` unless it already was from these exact bytes."""
    sha = file_sha256(source)
    if target.is_file():
        try:
            if read_meta(target).get("source_sha256") == sha:
                return target
        except PresetError:
            pass
        logger.info("%s changed since it was converted; converting it again.", source)
    convert_pt(source, target, sha256=sha)
    return target


def _audio_refusal(what) -> PresetError:
    return PresetError(f"{what}: VibeVoice-Realtime-0.5B cannot take a voice from audio, by design: Microsoft "
                       "released it without an acoustic encoder to limit voice cloning; use one of its voice "
                       f"presets: {', '.join(PRESET_NAMES)}.")


def resolve_voice(voice) -> Path:
    """The `.safetensors` realtime voice for `voice`: a preset name (fetched and converted once), a `.pt` preset
    (converted into the cache, keyed by its sha256) or a `.safetensors` voice. Audio is refused in one line."""
    if isinstance(voice, np.ndarray):
        raise _audio_refusal("An audio array was given as the voice")
    text = str(voice)
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".safetensors") and (suffix or path.is_file()):
        raise _audio_refusal(f"{text} is not a voice preset (.pt or .safetensors)")
    if suffix:
        if not path.is_file():
            raise MissingPathError(f"Voice preset not found: {text}")
        if suffix == ".safetensors":
            return path
        return _converted(path, preset_dir() / "converted" / f"{file_sha256(path)}.safetensors")
    if not _NAME.fullmatch(text):
        raise PresetError(f"Voice {text!r} is neither a file nor a preset name; presets: {', '.join(PRESET_NAMES)}.")
    local = preset_dir() / f"{text}.safetensors"
    source = _local_pt(text)
    if source is None and local.is_file():
        return local
    return _converted(source or fetch_preset(text), local)


def load_voice_preset(voice, shape: Optional[PresetShape] = None, dtype=None) -> RealtimeVoice:
    """A realtime voice ready for generation; `shape` (the loaded model's) refuses presets of another model size."""
    return load_preset(resolve_voice(voice), shape=shape, dtype=dtype, known=PRESET_NAMES)


def list_presets() -> List[Dict]:
    """Every known preset and every one found in the preset folder: its URL, and whether it is downloaded and
    converted (paths, or None)."""
    folder = preset_dir()
    local = {p.stem for pattern in ("**/*.pt", "*.safetensors") for p in folder.glob(pattern)
             if p.parent.name != "converted"} if folder.is_dir() else set()
    rows = []
    for name in list(PRESET_NAMES) + sorted(local - set(PRESET_NAMES)):
        pt, st = _local_pt(name), folder / f"{name}.safetensors"
        rows.append({"name": name, "known": name in PRESET_BLOBS,
                     "url": preset_url(name) if name in PRESET_BLOBS else None,
                     "downloaded": str(pt) if pt else None, "converted": str(st) if st.is_file() else None})
    return rows


def format_presets(rows: List[Dict]) -> str:
    """The `voices` command's table."""
    width = max(len(r["name"]) for r in rows) + 2
    lines = [f"VibeVoice-Realtime-0.5B voice presets in {preset_dir()}", f"{'name':<{width}}downloaded  converted"]
    for r in rows:
        mark = "" if r["known"] else "  (local)"
        lines.append(f"{r['name']:<{width}}{'yes' if r['downloaded'] else '-':<12}"
                     f"{'yes' if r['converted'] else '-'}{mark}")
    lines.append(f"{len(rows)} presets, {sum(bool(r['downloaded']) for r in rows)} downloaded, "
                 f"{sum(bool(r['converted']) for r in rows)} converted. A known name is downloaded from {REPO} on "
                 f"first use; experimental voices ({EXPERIMENTAL_SCRIPT}) can be extracted into the folder.")
    return "\n".join(lines)
