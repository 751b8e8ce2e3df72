"""Which models the nodes offer, how a `model` entry becomes a loaded pipeline, and the one kept loaded.

Entries come from ComfyUI's `models/vibevoice/` folders (where the VibeVoice packs keep theirs), then our cache of
converted models, then hub ids. `quantize_llm` picks a converted 4/8-bit folder: `<name>-4bit` beside the chosen
one if it exists, else one converted once into `<cache>/models/<name>-4bit`.
"""

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..constants import COMFYUI_MODEL_FOLDER
from ..models import MODEL_TYPES, REALTIME, VIBEVOICE, family
from .management import register

logger = logging.getLogger(__name__)

FOLDER_KIND = COMFYUI_MODEL_FOLDER  # models/vibevoice/, the folder the PyTorch VibeVoice packs use
HUB_MODELS = ("microsoft/VibeVoice-1.5B",)
NO_REALTIME_MODEL = "no realtime model in models/vibevoice/"  # the realtime node's list when there is none
FAMILY_NAMES = {VIBEVOICE: "VibeVoice 1.5B/7B", REALTIME: "VibeVoice-Realtime-0.5B"}
QUANTIZE_BITS = {"full precision": None, "4bit": 4, "8bit": 8}
ATTENTION_TYPES = ("auto", "eager", "sdpa", "flash_attention_2", "sage")
# transformers' VibeVoice on this project's PyTorch path knows auto, sdpa and eager; the CUDA-only kernels of the
# packs fall back to auto.
TORCH_ATTENTION = {"auto": "auto", "eager": "eager", "sdpa": "sdpa", "flash_attention_2": "auto", "sage": "auto"}
BACKENDS = ("mlx", "torch")
BACKEND_ENV = "VIBEVOICE_MLX_COMFYUI_BACKEND"  # torch: the PyTorch reference path instead of MLX

_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.\-]*/[A-Za-z0-9_][\w.\-]*")


def _folder_paths():
    """ComfyUI's `folder_paths` module, or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def register_model_folder() -> None:
    """Inside ComfyUI, make `models/vibevoice/` a model folder kind (extra_model_paths.yaml may add more)."""
    fp = _folder_paths()
    if fp is not None:
        fp.add_model_folder_path(FOLDER_KIND, os.path.join(fp.models_dir, FOLDER_KIND))


def load_fast_blas() -> Optional[str]:
    """Inside ComfyUI on Linux, give MLX the system's fast BLAS as the `vibevoice-mlx` command does: this runs when
    ComfyUI imports the nodes, and MLX is imported only when a node first runs, so it is not loaded yet (unless
    another node pack imported it: then the log says how to start ComfyUI instead). Returns the library."""
    if _folder_paths() is None or sys.platform != "linux":
        return None
    from .. import blas

    if "mlx.core" in sys.modules:  # another node pack imported MLX: its BLAS can no longer change in this process
        system = blas.find_system_blas()
        if system and blas.is_reference(blas.active_blas()["name"]):
            logger.warning("VibeVoice MLX: another node pack imported MLX first, so MLX keeps its slow bundled BLAS; "
                           "start ComfyUI as `%s`", blas.python_command(system, "main.py"))
        return None
    library = blas.use_fast_blas()
    if library:
        logger.info("VibeVoice MLX: MLX's float32 matmuls run on %s", library)
    elif blas.find_system_blas() is None and blas.global_cblas_provider() is None and os.environ.get(blas.ENV) != "off":
        logger.warning("VibeVoice MLX: MLX runs on its slow bundled BLAS; install the system's BLIS (apt-get install "
                       "%s) and restart ComfyUI", blas.APT_PACKAGE)
    return library


def model_dirs() -> List[Path]:
    """ComfyUI's VibeVoice model folders; none outside ComfyUI."""
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        dirs = fp.get_folder_paths(FOLDER_KIND)
    except KeyError:  # not registered (register_model_folder did not run)
        dirs = [os.path.join(fp.models_dir, FOLDER_KIND)]
    return [Path(d) for d in dirs]


def cache_dir() -> Path:
    """The project's cache: converted hub models live in `<cache>/models/<name>`."""
    return Path(os.environ.get("VIBEVOICE_MLX_CACHE", Path.home() / ".cache" / "vibevoice-mlx"))


def voices_dir() -> Path:
    """Where the Save Voice node writes: `models/vibevoice/voices/` in ComfyUI, `<cache>/voices/` outside."""
    dirs = model_dirs()
    return (dirs[0] if dirs else cache_dir()) / "voices"


def default_backend() -> str:
    backend = os.environ.get(BACKEND_ENV, "mlx").strip().lower() or "mlx"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r}: set it to mlx or torch (or unset it) and restart ComfyUI.")
    return backend


def read_config(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def folder_family(folder: Path) -> Optional[str]:
    """The family (models.VIBEVOICE or REALTIME) of a VibeVoice folder, converted by us or a PyTorch checkpoint in
    safetensors; None for anything else."""
    config = read_config(folder)
    if config is None or not any(Path(folder).glob("model*.safetensors")):
        return None
    if "conversion" not in config and config.get("model_type") not in set(MODEL_TYPES) - {None}:
        return None  # a folder of some other model (a PyTorch VibeVoice folder names its model_type)
    try:
        return family(config)
    except KeyError:
        return None


def _subfolders(root: Path) -> List[Path]:
    try:
        return sorted(p for p in Path(root).iterdir() if p.is_dir())
    except OSError:
        return []


def available_models(kind: str = VIBEVOICE) -> Dict[str, str]:
    """Entry name -> local folder or hub id of the `kind` family, in the order the `model` input lists them (first
    name wins)."""
    entries: Dict[str, str] = {}
    for root in model_dirs():
        for sub in _subfolders(root):
            if folder_family(sub) == kind:
                entries.setdefault(sub.name, str(sub))
    for sub in _subfolders(cache_dir() / "models"):
        if "conversion" in (read_config(sub) or {}) and folder_family(sub) == kind:
            entries.setdefault(sub.name, str(sub))
    for repo in HUB_MODELS if kind == VIBEVOICE else ():
        entries.setdefault(repo, repo)
    return entries


def resolve_entry(name: str, kind: str = VIBEVOICE) -> str:
    """A `model` value as a local folder or hub id: a listed entry, or (from Python) a folder or repo id. A folder of
    the other family is refused (its node is another)."""
    entries = available_models(kind)
    if name in entries:
        return entries[name]
    folder = Path(name).expanduser()
    other = next((f for f in FAMILY_NAMES if f != kind and name in available_models(f)), None)
    if other is None and folder.is_dir():
        found = folder_family(folder)
        if found in (None, kind):
            return str(folder)
        other = found
    if other is not None:
        node = "VibeVoice Realtime (MLX)" if other == REALTIME else "VibeVoice Single Speaker or Multiple Speakers"
        raise ValueError(f"{name} is a {FAMILY_NAMES[other]} model: use it with the {node} node.")
    if kind == VIBEVOICE and _HUB_ID.fullmatch(name):
        return name
    where = ", ".join(str(d) for d in model_dirs()) or str(cache_dir() / "models")
    if kind == REALTIME:
        raise ValueError(f"Realtime model {name!r} not found: put a VibeVoice-Realtime-0.5B folder (its config.json, "
                         f"model.safetensors and the Qwen2.5 tokenizer files) into {where} and choose it.")
    raise ValueError(f"Model {name!r} not found: convert one into {where} (`vibevoice-mlx convert --model "
                     f"microsoft/VibeVoice-1.5B --mlx-path <there>/VibeVoice-1.5B`) or choose one from the list.")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()


def pytorch_source(source: str) -> str:
    """The PyTorch checkpoint behind `source`: itself, or the source a converted folder records."""
    folder = Path(source).expanduser()
    config = read_config(folder) if folder.is_dir() else None
    if config is None or "conversion" not in config:
        return source
    origin = str(config["conversion"].get("source") or "")
    if origin and (Path(origin).expanduser().is_dir() or _HUB_ID.fullmatch(origin)):
        return origin
    raise ValueError(f"{folder} was converted from {origin or 'an unrecorded source'}, which is not here: choose "
                     "the PyTorch checkpoint itself, or a converted 4/8-bit model from the list.")


def _convert():
    import vibevoice_mlx as vv

    # Once imported, the `vibevoice_mlx.convert` subpackage shadows the lazy `vv.convert` function; the package's
    # lazy-attribute hook still returns the function.
    fn = vv.convert
    return fn if callable(fn) else vv.__getattr__("convert")


def quantized_source(source: str, bits: Optional[int]) -> str:
    """The folder to load for `quantize_llm`: `source` itself (full precision, or already quantized), a converted
    `<name>-<bits>bit` folder beside it or in the cache, or one converted once into the cache."""
    if bits is None:
        return source
    folder = Path(source).expanduser()
    local = folder.is_dir()
    have = ((read_config(folder) or {}).get("quantization") or {}).get("bits") if local else None
    if have:
        if have != bits:
            logger.warning("%s already has a %d-bit language model: quantize_llm=%dbit is ignored.", folder, have, bits)
        return source
    name = f"{folder.name if local else source.replace('/', '--')}-{bits}bit"
    candidates = ([folder.parent / name] if local else []) + [cache_dir() / "models" / name]
    for candidate in candidates:
        if ((read_config(candidate) or {}).get("quantization") or {}).get("bits") == bits:
            return str(candidate)
    target = candidates[-1]
    origin = pytorch_source(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("Converting %s with a %d-bit language model, once, into %s", origin, bits, target)
    _convert()(origin, str(target), quantize=True, q_bits=bits,
               tokenizer=str(folder) if local and _has_tokenizer(folder) else None)
    return str(target)


def load_pipeline(model: str, quantize_llm: str = "full precision", backend: str = "mlx", attention: str = "auto"):
    """Load the pipeline a node's `model`, `quantize_llm`, `backend` and `attention_type` ask for."""
    import vibevoice_mlx as vv

    if quantize_llm not in QUANTIZE_BITS:
        raise ValueError(f"quantize_llm {quantize_llm!r} is not one of {', '.join(QUANTIZE_BITS)}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    if attention not in ATTENTION_TYPES:
        raise ValueError(f"attention_type {attention!r} is not one of {', '.join(ATTENTION_TYPES)}.")
    source = resolve_entry(model, VIBEVOICE)
    folder = Path(source).expanduser()
    if backend == "torch":
        if QUANTIZE_BITS[quantize_llm]:
            logger.warning("quantize_llm=%s is ignored on the PyTorch path (its quantizer, bitsandbytes, is CUDA-only "
                           "and not a dependency); unset %s for a quantized model on MLX.", quantize_llm, BACKEND_ENV)
        tokenizer = str(folder) if folder.is_dir() and _has_tokenizer(folder) else None
        return vv.load(pytorch_source(source), backend="torch", attention=TORCH_ATTENTION[attention],
                       tokenizer=tokenizer)
    if attention != "auto":
        logger.info("attention_type=%s is ignored on MLX, which always uses its fused attention kernel.", attention)
    bits = QUANTIZE_BITS[quantize_llm]
    if bits is None and folder.is_dir() and not _has_tokenizer(folder):
        raise ValueError(f"{folder} has no tokenizer files: convert it once with `vibevoice-mlx convert --model "
                         f"{folder} --mlx-path {folder}-mlx` (which bundles them) and choose that entry.")
    return vv.load(quantized_source(source, bits), backend="mlx")


def load_realtime(model: str):
    """Load the VibeVoice-Realtime-0.5B folder a realtime node's `model` names (MLX only; its tokenizer files beside
    config.json, as a converted folder has them)."""
    import vibevoice_mlx as vv

    if model == NO_REALTIME_MODEL:
        raise ValueError(f"No VibeVoice-Realtime-0.5B model in {', '.join(str(d) for d in model_dirs())}: put the "
                         "microsoft/VibeVoice-Realtime-0.5B folder there (with the Qwen2.5 tokenizer files) and "
                         "refresh.")
    folder = Path(resolve_entry(model, REALTIME)).expanduser()
    if not _has_tokenizer(folder):
        raise ValueError(f"{folder} has no tokenizer files: copy tokenizer.json and tokenizer_config.json (with "
                         "vocab.json and merges.txt) of Qwen/Qwen2.5-0.5B into it.")
    return vv.load(folder, backend="mlx")


def _active_memory() -> int:
    import mlx.core as mx

    return mx.get_active_memory()


class ModelCache:
    """The one pipeline kept loaded between runs; asking for another releases it first (two would not fit).

    Inside ComfyUI the kept pipeline is also one of ComfyUI's loaded models (management.py), so that "Unload
    Models" and ComfyUI's room-making for its own models release it."""

    def __init__(self):
        self.key = None
        self.pipe = None
        self.entry = None  # our entry in ComfyUI's model management, while one is there

    def get(self, model: str, quantize_llm: str = "full precision", backend: str = "mlx", attention: str = "auto"):
        # What the chosen backend ignores does not make another model.
        key = (model, "full precision" if backend == "torch" else quantize_llm, backend,
               TORCH_ATTENTION.get(attention, attention) if backend == "torch" else "auto")
        return self._get(key, lambda: load_pipeline(model, quantize_llm, backend, attention))

    def get_realtime(self, model: str):
        return self._get((REALTIME, model), lambda: load_realtime(model))

    def _get(self, key, load):
        if self.pipe is None or self.key != key:
            self.release()
            logger.info("Loading VibeVoice model %s", " ".join(map(str, key)))
            before = _active_memory()
            self.pipe = load()
            self.key = key
            self.entry = register(max(0, _active_memory() - before), self._unload)
        return self.pipe

    def release(self) -> bool:
        """Drop the pipeline and empty the MLX/torch caches; True if one was loaded. Our entry in ComfyUI's model
        management goes with it (ComfyUI's own finalizer removes it)."""
        self.entry = None
        return self._unload()

    def _unload(self) -> bool:
        loaded = self.pipe is not None
        before = _active_memory() if loaded else 0
        self.pipe = self.key = None
        if loaded:
            import vibevoice_mlx as vv

            vv.free_memory()
            logger.info("Released the VibeVoice model (MLX memory in use: %.1f -> %.1f MB)", before / 2**20,
                        _active_memory() / 2**20)
        return loaded


MODELS = ModelCache()
