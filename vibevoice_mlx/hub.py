"""Model arguments to local folders: a folder as is, a Hugging Face repo id through the hub cache.

Only the files a VibeVoice folder needs are fetched (no pickles, no training leftovers). Offline
(`HF_HUB_OFFLINE=1`) a repo that is not fully cached is a one-line error that says how to fix it, never a
traceback from deep inside huggingface_hub.
"""

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import List, Optional

from .errors import UserError

logger = logging.getLogger(__name__)

TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
]
MODEL_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "preprocessor_config.json",
    "generation_config.json",
] + TOKENIZER_PATTERNS
# Only fetched when the caller accepts pickled checkpoints (convert --allow-pickle).
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt"]

# owner/name or a legacy single name: letters, digits, '-', '_', '.'; no leading '.' (that is a path).
_REPO_ID = re.compile(r"^[A-Za-z0-9_][\w.\-]*(/[A-Za-z0-9_][\w.\-]*)?$")


class HubError(UserError):
    """A model argument that is neither a local folder nor an available hub repo; the message says the fix."""


def cache_root() -> Path:
    """This package's own cache (converted models, voice presets): `$VIBEVOICE_MLX_CACHE` or ~/.cache/vibevoice-mlx."""
    return Path(os.environ.get("VIBEVOICE_MLX_CACHE", Path.home() / ".cache" / "vibevoice-mlx"))


def is_repo_id(name: str) -> bool:
    """True if `name` could be a Hugging Face repo id (and is not an existing local path)."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists() and not name.endswith(".")


def snapshot_commit(folder: Path) -> Optional[str]:
    """The commit hash of a hub-cache snapshot folder (…/snapshots/<hash>), else None."""
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" else None


def resolve(model: str, revision: Optional[str] = None, allow_patterns: Optional[List[str]] = None) -> Path:
    """A local folder for `model`: the folder itself, or a snapshot of the hub repo `model` at `revision`.

    Downloads only `allow_patterns` (default: config, safetensors and index, tokenizer, preprocessor and
    generation configs). Honours `HF_HUB_OFFLINE`: then only the cache is used.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HubError(f"{model} is a file: pass the folder that holds config.json and the weights.")
        return path
    if not is_repo_id(model):
        raise HubError(f"No such folder: {model} (and it is not a Hugging Face repo id like 'owner/name').")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.is_offline_mode()
    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(
            model, revision=revision, allow_patterns=allow_patterns or MODEL_PATTERNS, local_files_only=offline
        )
    except LocalEntryNotFoundError as e:
        # Also IncompleteSnapshotError: the snapshot exists but misses files we asked for.
        how = ("HF_HUB_OFFLINE is set: run once with network access (unset HF_HUB_OFFLINE) to download it"
               if offline else "the Hub could not be reached: check the network connection")
        partly = "not fully in the local Hugging Face cache" if "incomplete" in str(e).lower() else \
            "not in the local Hugging Face cache"
        raise HubError(f"'{model}'{at} is not a local folder and is {partly}; {how}, or pass a local folder.") from None
    except RevisionNotFoundError:
        raise HubError(f"The Hugging Face repo '{model}' has no revision {revision!r}.") from None
    except GatedRepoError:
        raise HubError(f"'{model}' is a gated repo: accept its terms on huggingface.co and log in "
                       "(`hf auth login`), or pass a local folder.") from None
    except RepositoryNotFoundError:
        raise HubError(f"'{model}' is neither a local folder nor a Hugging Face repo you can access "
                       "(check the spelling, or log in for a private repo).") from None
    except HFValidationError:
        raise HubError(f"No such folder: {model} (and it is not a valid Hugging Face repo id).") from None
    except HfHubHTTPError as e:
        raise HubError(f"Downloading '{model}'{at} failed: {str(e).splitlines()[0]}") from None
    logger.debug("Resolved %s%s to %s", model, at, folder)
    return Path(folder)


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read a MiB at a time (what identifies a voice or preset file, wherever it lies)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
