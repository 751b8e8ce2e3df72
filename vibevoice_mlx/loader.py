"""Loading: one loader for raw PyTorch folders (either layout), converted MLX folders and quantized ones, and the
pipeline `load` returns (a backend, the tokenizer and its control tokens, the config, the generation defaults)."""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import MLX, REALTIME, Checkpoint, LoadError, check_weights, read_checkpoint, read_json, read_weights
from .constants import SAMPLE_RATE, mlx_dtype
from .keys import to_original
from .models import REALTIME as REALTIME_FAMILY
from .models.realtime import MODEL_TYPE as REALTIME_MODEL_TYPE, RealtimeConfig, RealtimeModel
from .models.vibevoice import Model, ModelConfig
from .processor import SpecialTokens

logger = logging.getLogger(__name__)

BACKENDS = ("mlx", "torch")


def default_dtype() -> mx.Dtype:
    """float16 on a GPU (Metal, CUDA), float32 on the CPU, where MLX's float16 matmuls are slow."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


def cast_weights(model: Model, weights: Dict[str, mx.array], dtype: mx.Dtype) -> Dict[str, mx.array]:
    """The dtype policy at load: `model.cast_predicate` says what stays float32, the rest takes `dtype`.

    Consumes `weights`: each tensor is cast and evaluated on its own and its source dropped before the next, so
    a bfloat16 checkpoint loaded as float32 never holds both copies (the peak is the model plus one tensor, not
    the model plus the whole checkpoint: measured on 1.5B, 10.85 GB instead of 16.2 GB)."""
    out = {}
    for k in list(weights):
        v = weights.pop(k)
        floating = mx.issubdtype(v.dtype, mx.floating)
        if floating and not model.cast_predicate(k):
            v = v.astype(mx.float32)
        elif floating and not (k.endswith(".scales") or k.endswith(".biases")):
            v = v.astype(dtype)
        mx.eval(v)
        out[k] = v
    return out


def model_config(ckpt: Checkpoint) -> Union[ModelConfig, RealtimeConfig]:
    """The typed config of a checkpoint's family (fails before any weight is read)."""
    if ckpt.family == REALTIME_FAMILY:
        return RealtimeConfig.from_dict(ckpt.normalized, ckpt.quantization)
    return ModelConfig.from_normalized(ckpt.normalized, ckpt.quantization)


def build_model(ckpt: Checkpoint, config: Union[ModelConfig, RealtimeConfig],
                dtype: Optional[Union[str, mx.Dtype]] = None) -> Union[Model, RealtimeModel]:
    """The MLX model of a checkpoint already read (either family), with its weights loaded strictly."""
    weights, _ = read_weights(ckpt.folder)
    model = RealtimeModel(config) if isinstance(config, RealtimeConfig) else Model(config)
    if config.quantization:
        q = config.quantization
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=model.quant_predicate)
        if mx.default_device() != mx.gpu:
            # Measured here: a 4-bit 3584x18944 layer over 150 tokens takes 9.1 s on the CPU backend (float32:
            # 0.12 s); quantization pays off on Apple GPUs, not on MLX's CPU backend.
            logger.warning("%s has a %d-bit language model; MLX's CPU backend runs quantized matmuls very slowly. "
                           "On a CPU, convert without -q instead.", ckpt.folder, q["bits"])
    if ckpt.layout not in (MLX, REALTIME):
        weights = to_original(weights, ckpt.layout)
    weights = model.sanitize(weights, ckpt.layout)
    check_weights(model, weights)
    dtype = mlx_dtype(dtype) if dtype is not None else default_dtype()
    model.load_weights(list(cast_weights(model, weights, dtype).items()), strict=True)
    model.eval()
    logger.info("Loaded %s (%s layout) as %s", ckpt.folder, ckpt.layout, dtype)
    return model


def load_model(path: Union[str, Path], dtype: Optional[Union[str, mx.Dtype]] = None,
               revision: Optional[str] = None) -> Tuple[Model, Path]:
    """Load a VibeVoice model from a converted MLX folder, a raw PyTorch folder (either layout) or a hub id.

    `dtype` (float16 / bfloat16 / float32) defaults to float16 on a GPU and float32 on the CPU; the tensors that
    architecture.md §8 keeps in float32 stay float32 whatever it is. Returns (model, local folder).
    """
    ckpt = read_checkpoint(resolve_folder(path, revision))
    return build_model(ckpt, model_config(ckpt), dtype), ckpt.folder


def resolve_folder(path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder as is, else a hub repo id through the cache (see hub.py)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    from .hub import resolve

    return Path(resolve(str(path), revision=revision))


# --- the pipeline: backend + tokenizer + control tokens ---------------------------------------------------------


@dataclass
class VibeVoice:
    """A loaded model ready for `generate`: the backend that runs it, its tokenizer and control tokens."""

    backend: Any  # backend.Backend: engine.MLXBackend or torch_backend.TorchBackend
    tokenizer: Any
    tokens: SpecialTokens
    folder: Path
    config: ModelConfig
    defaults: Dict[str, Any] = field(default_factory=dict)  # steps / cfg_scale from generation_config.json
    sample_rate: int = SAMPLE_RATE

    @property
    def model(self):
        """The backend's model (MLX `Model` or transformers' PyTorch model)."""
        return self.backend.model

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
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(source) / name).is_file():
            read_json(Path(source) / name)  # a damaged file is named, not a traceback from the tokenizers library
    extra = {}
    config_path = Path(source) / "config.json"
    if config_path.is_file() and read_json(config_path).get("model_type") == REALTIME_MODEL_TYPE:
        from transformers import PretrainedConfig

        # A converted realtime folder: transformers knows no vibevoice_streaming and would fall back to this
        # empty config anyway, with a warning about the model type on every load.
        extra["config"] = PretrainedConfig()
    try:
        return AutoTokenizer.from_pretrained(str(source), **extra)
    except (OSError, ValueError) as e:  # a damaged tokenizer.json surfaces as either
        raise LoadError(f"Cannot load the tokenizer in {source} ({str(e).splitlines()[0]}): download or convert "
                        "the model again, or pass --tokenizer.") from None


def inspect(path_or_repo: Union[str, Path], tokenizer: Optional[Union[str, Path]] = None,
            revision: Optional[str] = None) -> Tuple[Checkpoint, ModelConfig, Any, SpecialTokens]:
    """Everything about a model but its weights: the checkpoint read once, its typed config, the tokenizer and
    the control tokens (what `load` builds on, and what `say` checks a script against before loading)."""
    ckpt = read_checkpoint(resolve_folder(path_or_repo, revision))
    config = model_config(ckpt)
    tok = load_tokenizer(ckpt.folder, tokenizer)
    if ckpt.family == REALTIME_FAMILY:
        return ckpt, config, tok, None  # no control tokens: the realtime model decides nothing but its stop
    return ckpt, config, tok, SpecialTokens.from_tokenizer(tok, config.token_ids)


def load(
    path_or_repo: Union[str, Path],
    backend: str = "mlx",
    device: str = "auto",
    dtype: Optional[str] = None,
    tokenizer: Optional[Union[str, Path]] = None,
    revision: Optional[str] = None,
    attention: str = "auto",
    max_batch: int = 8,
    batch_invariant: bool = False,
) -> VibeVoice:
    """Load a VibeVoice model for generation.

    path_or_repo: a converted MLX folder, a PyTorch checkpoint folder (original or transformers layout) or a hub
    repo id. backend="torch" runs transformers' VibeVoice (MPS, CUDA or CPU; `device`). dtype: float16 /
    bfloat16 / float32; default float16 on a GPU, float32 on the CPU (torch: float16 on MPS, bfloat16 on CUDA).
    attention (torch backend): auto, sdpa or eager. max_batch (MLX): scripts generated together at most.
    batch_invariant (MLX): every product runs once per script, so a script's audio in a batch equals its solo run
    bit for bit on any BLAS (engine: invariant.py); slower for batches on the CPU, no change for one script.
    """
    _check_load_args(backend, dtype, max_batch)
    ckpt, config, tok, tokens = inspect(path_or_repo, tokenizer, revision)
    if ckpt.family == REALTIME_FAMILY:
        from .realtime_api import RealtimePipeline

        if backend == "torch":
            raise LoadError(f"{ckpt.folder} is VibeVoice-Realtime-0.5B, which has no PyTorch implementation to run "
                            "(transformers has none yet): use the MLX backend (drop --backend torch).")
        model = build_model(ckpt, config, dtype)
        if batch_invariant:
            from .windows import invariant_model

            invariant_model(model)
        return RealtimePipeline(model, tok, ckpt.folder, config, max_batch=max_batch,
                                generation=dict(ckpt.generation))
    if backend == "torch":
        from .torch_engine import TorchBackend

        engine = TorchBackend.load(ckpt, config, tokens, device=device, dtype=dtype or "auto", attention=attention)
    else:
        from .engine import MLXBackend

        engine = MLXBackend(build_model(ckpt, config, dtype), tokens, max_batch=max_batch,
                             batch_invariant=batch_invariant)
    return VibeVoice(backend=engine, tokenizer=tok, tokens=tokens, folder=ckpt.folder, config=config,
                     defaults=dict(ckpt.generation))


def _check_load_args(backend, dtype, max_batch) -> None:
    """`load`'s own arguments, checked before anything is read (max_batch 0 would run nothing, silently)."""
    if backend not in BACKENDS:
        raise LoadError(f"Unknown backend {backend!r}: choose 'mlx' or 'torch'.")
    if backend == "mlx" and not (dtype is None or isinstance(dtype, mx.Dtype)):  # torch: its own names, checked there
        mlx_dtype(dtype if isinstance(dtype, str) else repr(dtype))  # a UserError naming the dtypes
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise LoadError(f"max_batch must be a whole number from 1 (scripts generated together); got {max_batch!r}.")
