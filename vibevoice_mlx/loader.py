"""One loader for raw PyTorch folders (either layout), converted MLX folders and quantized ones."""

import glob
import json
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .convert.keys import to_original
from .convert.layouts import detect_layout
from .model import Model, ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


class LoadError(ValueError):
    """A model folder that cannot be loaded as it is; the message says what to do."""


def default_dtype() -> mx.Dtype:
    """float16 on a GPU (Metal, CUDA), float32 on the CPU, where MLX's float16 matmuls are slow."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


def read_weights(folder: Path) -> Tuple[Dict[str, mx.array], str]:
    """All safetensors of a folder, and their format ("mlx" for converted folders, else "pt")."""
    files = sorted(glob.glob(str(folder / "*.safetensors")))
    if not files:
        if glob.glob(str(folder / "*.bin")) or glob.glob(str(folder / "*.pt")):
            raise LoadError(
                f"{folder} holds pickled PyTorch weights only: convert them first with "
                f"`vibevoice-mlx convert --model {folder} --mlx-path <out> --allow-pickle`."
            )
        raise LoadError(f"No *.safetensors files in {folder}.")
    weights, fmt = {}, None
    for f in files:
        try:
            w, meta = mx.load(f, return_metadata=True)
        except Exception as e:  # mlx raises plain RuntimeError/ValueError on a damaged file
            raise LoadError(f"Cannot read {f}: {e}. The file is damaged or truncated: download or convert again.")
        fmt = fmt or (meta or {}).get("format", "pt")
        weights.update(w)
    return weights, fmt


def load_config(folder: Path) -> Dict:
    path = folder / "config.json"
    if not path.exists():
        raise LoadError(f"No config.json in {folder}: point --model at a VibeVoice model folder.")
    return json.loads(path.read_text())


def check_weights(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """Strict: every parameter present with its shape, nothing extra. Errors name the tensors."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    shapes = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:5])}")
    if shapes:
        problems.append(f"wrong shape: {', '.join(shapes[:5])}")
    if problems:
        raise LoadError("Checkpoint does not match the model config: " + "; ".join(problems) + ".")


def cast_weights(model: Model, weights: Dict[str, mx.array], dtype: mx.Dtype) -> Dict[str, mx.array]:
    out = {}
    for k, v in weights.items():
        floating = mx.issubdtype(v.dtype, mx.floating)
        if floating and not model.cast_predicate(k):
            v = v.astype(mx.float32)
        elif floating and not (k.endswith(".scales") or k.endswith(".biases")):
            v = v.astype(dtype)
        out[k] = v
    return out


def load_model(
    path: Union[str, Path], dtype: Optional[Union[str, mx.Dtype]] = None, revision: Optional[str] = None
) -> Tuple[Model, Path]:
    """Load a VibeVoice model from a converted MLX folder, a raw PyTorch folder (either layout) or a hub id.

    `dtype` (float16 / bfloat16 / float32) defaults to float16 on a GPU and float32 on the CPU; the tensors that
    architecture.md §8 keeps in float32 stay float32 whatever it is. Returns (model, local folder).
    """
    folder = resolve_folder(path, revision)
    raw_config = load_config(folder)
    config = ModelConfig.from_dict(raw_config)  # an unsupported config fails here, before reading weights
    weights, fmt = read_weights(folder)
    layout = "mlx" if fmt == "mlx" else detect_layout(raw_config)
    model = Model(config)
    if config.quantization:
        q = config.quantization
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=model.quant_predicate)
        if mx.default_device() != mx.gpu:
            # Measured here: a 4-bit 3584x18944 layer over 150 tokens takes 9.1 s on the CPU backend (float32:
            # 0.12 s); quantization pays off on Apple GPUs, not on MLX's CPU backend.
            logger.warning("%s has a %d-bit language model; MLX's CPU backend runs quantized matmuls very slowly. "
                           "On a CPU, convert without -q instead.", folder, q["bits"])
    if layout != "mlx":
        weights = to_original(weights, layout)
    weights = model.sanitize(weights, layout)
    check_weights(model, weights)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    weights = cast_weights(model, weights, dtype or default_dtype())
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    logger.info("Loaded %s (%s layout) as %s", folder, layout, dtype or default_dtype())
    return model, folder


def resolve_folder(path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder as is, else a hub repo id through the cache (see hub.py)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    from .hub import resolve

    return Path(resolve(str(path), revision=revision))


# --- the pipeline: model + tokenizer + control tokens ---------------------------------------------------------


@dataclass
class VibeVoice:
    """A loaded model ready for `generate`: the model (MLX or PyTorch), its tokenizer and control tokens."""

    model: object
    tokenizer: object
    tokens: object
    backend: str
    folder: Path
    config: ModelConfig
    sample_rate: int = 24000

    @property
    def hop_length(self) -> int:
        return self.config.hop_length


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(folder: Path, tokenizer: Optional[Union[str, Path]] = None):
    """The text tokenizer: `tokenizer` (folder or hub id) if given, else the model folder's own files."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        if not all((folder / f).exists() for f in TOKENIZER_FILES):
            raise LoadError(
                f"{folder} has no tokenizer files: pass tokenizer=<Qwen2.5 tokenizer folder or repo id> "
                "(--tokenizer), or convert the model with `vibevoice-mlx convert`, which bundles them."
            )
        source = folder
    else:
        source = resolve_folder(tokenizer)
    return AutoTokenizer.from_pretrained(str(source))


def cached_conversion(repo: str, revision: Optional[str], dtype: str) -> Path:
    """Where a hub PyTorch checkpoint converted for `say` lives (converted once, then reused)."""
    import os

    root = Path(os.environ.get("VIBEVOICE_MLX_CACHE", Path.home() / ".cache" / "vibevoice-mlx"))
    name = repo.replace("/", "--") + (f"--{revision}" if revision else "") + f"--{dtype}"
    return root / "models" / name


def load(
    path_or_repo: Union[str, Path],
    backend: str = "mlx",
    device: str = "auto",
    dtype: Optional[str] = None,
    tokenizer: Optional[Union[str, Path]] = None,
    revision: Optional[str] = None,
    attention: str = "auto",
) -> VibeVoice:
    """Load a VibeVoice model for generation.

    path_or_repo: a converted MLX folder, a PyTorch checkpoint folder (original or transformers layout) or a hub
    repo id. With backend="mlx", a hub PyTorch checkpoint is converted once into ~/.cache/vibevoice-mlx (or
    $VIBEVOICE_MLX_CACHE) and reused. backend="torch" runs transformers' VibeVoice (MPS, CUDA or CPU; `device`).
    dtype: float16 / bfloat16 / float32; default float16 on a GPU, float32 on the CPU (torch: float16 on MPS,
    bfloat16 on CUDA). attention (torch backend): auto, sdpa or eager.
    """
    from .processor import SpecialTokens

    if backend not in ("mlx", "torch"):
        raise LoadError(f"Unknown backend {backend!r}: choose 'mlx' or 'torch'.")
    folder = resolve_folder(path_or_repo, revision)
    raw_config = load_config(folder)
    config = ModelConfig.from_dict(raw_config)
    if backend == "torch":
        from .torch_backend import load_torch_model

        model = load_torch_model(folder, device=device, dtype=dtype or "auto", attention=attention,
                                 tokenizer_path=resolve_folder(tokenizer) if tokenizer else None)
    else:
        is_raw = not _is_converted(folder)
        if is_raw and not Path(path_or_repo).expanduser().is_dir():
            from .convert.convert import convert

            target = cached_conversion(str(path_or_repo), revision, dtype or "float16")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                logger.warning("Converting %s to MLX once, into %s", path_or_repo, target)
                convert(str(path_or_repo), target, dtype=dtype or "float16", revision=revision,
                        tokenizer=tokenizer)
            folder = target
        model, folder = load_model(folder, dtype=dtype)
    tok = load_tokenizer(folder, tokenizer)
    tokens = SpecialTokens.from_tokenizer(tok, config.token_ids)
    if backend == "mlx":
        model.keep_head_rows(tokens.control_ids)
    return VibeVoice(model=model, tokenizer=tok, tokens=tokens, backend=backend, folder=folder, config=config)


def _is_converted(folder: Path) -> bool:
    files = sorted(glob.glob(str(folder / "*.safetensors")))
    if not files:
        return False
    from safetensors import safe_open

    with safe_open(files[0], framework="numpy") as f:
        return (f.metadata() or {}).get("format") == "mlx"
