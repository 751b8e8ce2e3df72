"""Hub checkpoints converted once for the command line: `say --model microsoft/VibeVoice-1.5B` converts the
PyTorch checkpoint into `~/.cache/vibevoice-mlx` (or `$VIBEVOICE_MLX_CACHE`) on first use and loads the MLX
folder from then on. The library's `load` reads raw checkpoints directly; this is the conversion stage's service
to the commands (say, serve, the ComfyUI nodes), so the runtime never imports it."""

import logging
from pathlib import Path
from typing import Optional

from ..checkpoint import MLX, weight_format
from ..hub import cache_root

logger = logging.getLogger(__name__)


def cached_conversion(repo: str, revision: Optional[str], dtype: str) -> Path:
    """Where a hub PyTorch checkpoint converted for the commands lives: keyed by the resolved revision (the
    snapshot's commit), so a repo that moved on is converted again instead of served stale."""
    name = repo.replace("/", "--") + (f"--{revision}" if revision else "") + f"--{dtype}"
    return cache_root() / "models" / name


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def model_folder(model: str, revision: Optional[str] = None, dtype: Optional[str] = None,
                 tokenizer: Optional[str] = None) -> str:
    """What to load for `model`: a local folder as given; a hub repo that is already MLX as resolved; a hub
    PyTorch checkpoint converted once into the cache (float16 unless `dtype` says otherwise)."""
    if Path(model).expanduser().is_dir():
        return model
    from .. import hub
    from .convert import convert

    source = hub.resolve(model, revision)
    if weight_format(source) == MLX:
        return str(source)
    commit = hub.snapshot_commit(source)
    target = cached_conversion(model, commit[:12] if commit else revision, dtype or "float16")
    if _offline() and commit:
        logger.info("Offline: using %s at revision %s from the cache; a newer revision can only be seen online.",
                    model, commit[:12])
    older = sorted(p.name for p in target.parent.glob(model.replace("/", "--") + "--*")
                   if p != target and p.name.endswith(f"--{dtype or 'float16'}")) if target.parent.is_dir() else []
    if older:
        logger.info("Earlier conversions of %s in %s: %s (delete them to free space).", model, target.parent,
                    ", ".join(older))
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.warning("Converting %s to MLX once, into %s", model, target)
        convert(model, target, dtype=dtype or "float16", revision=revision, tokenizer=tokenizer)
    return str(target)
