"""The format layer: what is in a model folder, read once.

Detects the layout of a folder (Microsoft's original, transformers 5.x, or a converted MLX folder), normalizes
either config to the original field names (architecture.md §2, §7) and reads it into the typed `ModelConfig`,
reads the safetensors and checks them strictly against the model. The key table is `keys.py`. Conversion
(`vibevoice_mlx.convert`) and both backends build on this module; it imports neither.
"""

import copy
import glob
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .constants import GENERATION_CONFIG, check_option
from .errors import UserError
from .keys import ORIGINAL, TRANSFORMERS
from .models import REALTIME as REALTIME_FAMILY, family

logger = logging.getLogger(__name__)

MLX = "mlx"  # the layout of a converted folder: original names, MLX tensor layouts
REALTIME = "realtime"  # VibeVoice-Realtime-0.5B's config (original names; no transformers layout exists)


class LayoutError(UserError):
    """A config or checkpoint that matches neither supported layout."""


class LoadError(UserError):
    """A model folder that cannot be loaded as it is; the message says what to do."""


_QWEN2_FIELDS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "tie_word_embeddings",
    "hidden_act",
]


def detect_layout(config: Dict[str, Any]) -> str:
    """'original' for Microsoft's config (decoder_config), 'transformers' for the 5.x one (text_config), 'realtime'
    for VibeVoice-Realtime-0.5B's (model_type vibevoice_streaming; there is one layout of it)."""
    try:
        if family(config) == REALTIME_FAMILY:
            return REALTIME
    except KeyError:
        raise LayoutError(
            f"model_type is {config.get('model_type')!r}: this is not a VibeVoice checkpoint (1.5B, 7B: 'vibevoice'; "
            "Realtime-0.5B: 'vibevoice_streaming')."
        ) from None
    if "decoder_config" in config and "acoustic_tokenizer_config" in config:
        return ORIGINAL
    if "text_config" in config and "audio_config" in config:
        return TRANSFORMERS
    raise LayoutError(
        "config.json has neither 'decoder_config' (original layout) nor 'text_config' (transformers layout): "
        "point --model at a VibeVoice checkpoint folder."
    )


def _depths_str(depths) -> str:
    return "-".join(str(int(d)) for d in depths)


def _parse_depths(depths) -> list:
    if isinstance(depths, str):
        return [int(d) for d in depths.split("-")]
    return [int(d) for d in depths]


def _qwen2(cfg: Dict[str, Any]) -> Dict[str, Any]:
    out = {"model_type": "qwen2"}
    rope = cfg.get("rope_parameters") or {}
    for k in _QWEN2_FIELDS:
        if k in cfg and cfg[k] is not None:
            out[k] = cfg[k]
    if "rope_theta" not in out:
        out["rope_theta"] = rope.get("rope_theta", 1000000.0)
    out.setdefault("max_position_embeddings", 32768)
    out.setdefault("hidden_act", "silu")
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise LayoutError("rope scaling is not used by VibeVoice checkpoints and is not supported.")
    return out


def _tokenizer_from_original(cfg: Dict[str, Any], semantic: bool) -> Dict[str, Any]:
    enc_depths = _parse_depths(cfg.get("encoder_depths", "3-3-3-3-3-3-8"))
    dec_depths = cfg.get("decoder_depths")
    dec_depths = _parse_depths(dec_depths) if dec_depths else list(reversed(enc_depths))
    ratios = list(cfg.get("encoder_ratios", [8, 5, 5, 4, 2, 2]))
    dec_ratios = list(cfg.get("decoder_ratios") or ratios)
    for k, v in [("causal", True), ("conv_norm", "none"), ("pad_mode", "constant"), ("layernorm", "RMSNorm"),
                 ("mixer_layer", "depthwise_conv"), ("conv_bias", True), ("disable_last_norm", True)]:
        if cfg.get(k, v) != v:
            raise LayoutError(f"tokenizer setting {k}={cfg[k]!r} is not supported (VibeVoice uses {v!r}).")
    return {
        "channels": int(cfg.get("channels", 1)),
        "vae_dim": int(cfg["vae_dim"]),
        "encoder_n_filters": int(cfg.get("encoder_n_filters", 32)),
        "decoder_n_filters": int(cfg.get("decoder_n_filters", cfg.get("encoder_n_filters", 32))),
        "encoder_ratios": ratios,
        "decoder_ratios": dec_ratios,
        "encoder_depths": _depths_str(enc_depths),
        "decoder_depths": _depths_str(dec_depths),
        "kernel_size": int(cfg.get("kernel_size", 7)),
        "last_kernel_size": int(cfg.get("last_kernel_size", 7)),
        "ffn_expansion": int(cfg.get("ffn_expansion", 4)),
        "layernorm_eps": float(cfg.get("layernorm_eps", 1e-5)),
        "fix_std": float(cfg.get("fix_std", 0.0 if semantic else 0.5)),
        "std_dist_type": cfg.get("std_dist_type", "none" if semantic else "gaussian"),
    }


def _tokenizer_from_transformers(cfg: Dict[str, Any], semantic: bool) -> Dict[str, Any]:
    depths = _parse_depths(cfg.get("depths", [3, 3, 3, 3, 3, 3, 8]))
    ratios = list(reversed(cfg.get("downsampling_ratios", [2, 2, 4, 5, 5, 8])))
    return {
        "channels": int(cfg.get("channels", 1)),
        "vae_dim": int(cfg["hidden_size"]),
        "encoder_n_filters": int(cfg.get("num_filters", 32)),
        "decoder_n_filters": int(cfg.get("num_filters", 32)),
        "encoder_ratios": ratios,
        "decoder_ratios": ratios,
        "encoder_depths": _depths_str(depths),
        "decoder_depths": _depths_str(reversed(depths)),
        "kernel_size": int(cfg.get("kernel_size", 7)),
        "last_kernel_size": int(cfg.get("kernel_size", 7)),
        "ffn_expansion": int(cfg.get("ffn_expansion", 4)),
        "layernorm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
        "fix_std": 0.0 if semantic else float(cfg.get("vae_std", 0.625)) * 0.8,
        "std_dist_type": "none" if semantic else "gaussian",
    }


def _head_from_original(cfg: Dict[str, Any], hidden: int, latent: int) -> Dict[str, Any]:
    return {
        "hidden_size": hidden,
        "latent_size": latent,
        "head_layers": int(cfg.get("head_layers", 4)),
        "head_ffn_ratio": float(cfg.get("head_ffn_ratio", 3.0)),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
        "frequency_embedding_size": int(cfg.get("frequency_embedding_size", 256)),
        "ddpm_num_steps": int(cfg.get("ddpm_num_steps", 1000)),
        "ddpm_beta_schedule": cfg.get("ddpm_beta_schedule", "cosine"),
        "prediction_type": cfg.get("prediction_type", "v_prediction"),
    }


def normalize_config(config: Dict[str, Any], layout: Optional[str] = None) -> Dict[str, Any]:
    """A config of either layout in the original field names, with derived values made explicit."""
    layout = layout or detect_layout(config)
    if layout == ORIGINAL:
        dec = _qwen2(config["decoder_config"])
        # The original ties lm_head when the top-level flag is truthy; absent means true (architecture.md §4.4).
        tie = bool(config.get("tie_word_embeddings", dec.get("tie_word_embeddings", True)))
        acoustic = _tokenizer_from_original(config["acoustic_tokenizer_config"], semantic=False)
        semantic = _tokenizer_from_original(config["semantic_tokenizer_config"], semantic=True)
        head = _head_from_original(config.get("diffusion_head_config", {}), dec["hidden_size"], acoustic["vae_dim"])
        # Microsoft's config names no token ids (they come from the tokenizer); a normalized config may carry them.
        token_ids = dict(config.get("token_ids") or {})
    elif layout == TRANSFORMERS:
        dec = _qwen2(config["text_config"])
        tie = bool(config["text_config"].get("tie_word_embeddings", False))
        acoustic = _tokenizer_from_transformers(config["audio_config"], semantic=False)
        semantic = _tokenizer_from_transformers(config.get("semantic_model_config") or {"hidden_size": 128},
                                                semantic=True)
        h = config.get("diffusion_head_config", {})
        head = _head_from_original(
            {
                "head_layers": h.get("num_hidden_layers", 4),
                "head_ffn_ratio": h.get("intermediate_size", 3 * dec["hidden_size"]) / dec["hidden_size"],
                "rms_norm_eps": h.get("rms_norm_eps", 1e-5),
                "frequency_embedding_size": h.get("frequency_embedding_size", 256),
            },
            dec["hidden_size"],
            acoustic["vae_dim"],
        )
        token_ids = {
            "speech_start": config.get("audio_bos_token_id", 151652),
            "speech_end": config.get("audio_eos_token_id", 151653),
            "speech_diffusion": config.get("audio_token_id", 151654),
            "eos": config.get("eos_token_id", 151643),
        }
    else:
        raise LayoutError(f"Unknown layout {layout!r}.")
    dec["tie_word_embeddings"] = tie
    out = {
        "model_type": "vibevoice",
        "decoder_config": dec,
        "acoustic_tokenizer_config": acoustic,
        "semantic_tokenizer_config": semantic,
        "diffusion_head_config": head,
        "acoustic_vae_dim": acoustic["vae_dim"],
        "semantic_vae_dim": semantic["vae_dim"],
        "tie_word_embeddings": tie,
    }
    if token_ids:
        out["token_ids"] = token_ids
    _validate(out)
    return out


def _validate(cfg: Dict[str, Any]) -> None:
    a, s = cfg["acoustic_tokenizer_config"], cfg["semantic_tokenizer_config"]
    for name, t in [("acoustic", a), ("semantic", s)]:
        if len(_parse_depths(t["encoder_depths"])) != len(t["encoder_ratios"]) + 1:
            raise LayoutError(f"{name} tokenizer: encoder_depths needs one entry more than encoder_ratios.")
    if math.prod(a["encoder_ratios"]) != math.prod(s["encoder_ratios"]):
        raise LayoutError("acoustic and semantic tokenizers must share one hop length.")
    if list(reversed(_parse_depths(a["encoder_depths"]))) != _parse_depths(a["decoder_depths"]):
        raise LayoutError("decoder_depths other than the reversed encoder depths are not supported.")
    if a["decoder_ratios"] != a["encoder_ratios"]:
        raise LayoutError("decoder_ratios other than encoder_ratios are not supported.")


def hop_length(normalized: Dict[str, Any]) -> int:
    return int(math.prod(normalized["acoustic_tokenizer_config"]["encoder_ratios"]))


def to_transformers_config(normalized: Dict[str, Any]) -> Dict[str, Any]:
    """The transformers 5.x `VibeVoiceConfig` kwargs for a normalized config."""
    cfg = copy.deepcopy(normalized)
    dec = cfg["decoder_config"]
    text = {k: v for k, v in dec.items() if k not in ("rope_theta",)}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": dec["rope_theta"]}
    text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    text["use_sliding_window"] = False

    def tok(t, semantic):
        out = {
            "channels": t["channels"],
            "hidden_size": t["vae_dim"],
            "kernel_size": t["kernel_size"],
            "rms_norm_eps": t["layernorm_eps"],
            "num_filters": t["encoder_n_filters"],
            "downsampling_ratios": list(reversed(t["encoder_ratios"])),
            "depths": _parse_depths(t["encoder_depths"]),
            "ffn_expansion": t["ffn_expansion"],
        }
        if semantic:
            out["model_type"] = "vibevoice_acoustic_tokenizer_encoder"
        else:
            out["vae_std"] = t["fix_std"] / 0.8
        return out

    head = cfg["diffusion_head_config"]
    out = {
        "text_config": text,
        "audio_config": tok(cfg["acoustic_tokenizer_config"], False),
        "semantic_model_config": tok(cfg["semantic_tokenizer_config"], True),
        "diffusion_head_config": {
            "hidden_size": head["hidden_size"],
            "latent_size": head["latent_size"],
            "num_hidden_layers": head["head_layers"],
            "intermediate_size": int(round(head["head_ffn_ratio"] * head["hidden_size"])),
            "rms_norm_eps": head["rms_norm_eps"],
            "frequency_embedding_size": head["frequency_embedding_size"],
        },
    }
    ids = cfg.get("token_ids") or {}
    for ours, theirs in [("speech_start", "audio_bos_token_id"), ("speech_end", "audio_eos_token_id"),
                         ("speech_diffusion", "audio_token_id"), ("eos", "eos_token_id")]:
        if ours in ids:
            out[theirs] = ids[ours]
    if "eos" in ids:
        out["pad_token_id"] = ids["eos"]
    return out


# --- reading a folder -----------------------------------------------------------------------------------------


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON file, or a LoadError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"Cannot read {path} ({e}): the file is damaged; download or convert the model again.") \
            from None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
    """A finite number >= 0 (no bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _depths(v) -> bool:
    if isinstance(v, str):
        return all(d.isdigit() and int(d) > 0 for d in v.split("-"))
    return isinstance(v, list) and all(_positive_int(d) for d in v)


# A field name -> (its check, what it must be): the same names in every section and either layout.
_FIELD_TYPES = {
    **{k: (_positive_int, "a positive integer") for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "max_position_embeddings", "vae_dim", "channels", "encoder_n_filters", "decoder_n_filters",
        "num_filters", "kernel_size", "last_kernel_size", "ffn_expansion", "head_layers", "latent_size",
        "frequency_embedding_size", "ddpm_num_steps", "acoustic_vae_dim", "semantic_vae_dim",
        "tts_backbone_num_hidden_layers")},
    **{k: (lambda v: _number(v) and v > 0, "a positive number") for k in (
        "rms_norm_eps", "layernorm_eps", "rope_theta", "head_ffn_ratio")},
    **{k: (_number, "a number >= 0") for k in ("fix_std", "vae_std")},
    **{k: (lambda v: isinstance(v, list) and all(_positive_int(r) for r in v), "a list of positive integers")
       for k in ("encoder_ratios", "decoder_ratios", "downsampling_ratios")},
    **{k: (_depths, 'a list of positive integers or a string like "3-3-8"') for k in (
        "encoder_depths", "decoder_depths", "depths")},
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
}
_NULLABLE = {"decoder_depths", "decoder_ratios", "vae_std", "max_position_embeddings"}  # null: the default
_REQUIRED = {  # layout -> section -> fields without a default
    ORIGINAL: {"decoder_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "rms_norm_eps", "vocab_size"),
               "acoustic_tokenizer_config": ("vae_dim",), "semantic_tokenizer_config": ("vae_dim",)},
    TRANSFORMERS: {"text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "rms_norm_eps", "vocab_size"),
                   "audio_config": ("hidden_size",)},
    REALTIME: {"decoder_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "rms_norm_eps", "vocab_size"),
               "acoustic_tokenizer_config": ("vae_dim",)},
}


def check_config(raw, path: Path) -> str:
    """config.json checked field by field before anything is built from it: its layout, or a LoadError naming
    the file and the field."""
    fix = "fix the file, or download or convert the model again."
    if not isinstance(raw, dict):
        raise LoadError(f"{path} holds a JSON {type(raw).__name__}, not an object: {fix}")
    try:
        layout = detect_layout(raw)
    except LayoutError as e:
        raise LayoutError(f"{path}: {e}") from None
    sections = [(None, raw)] + [(k, v) for k, v in raw.items() if isinstance(v, dict)]
    for name, required in _REQUIRED[layout].items():
        if not isinstance(raw.get(name), dict):
            raise LoadError(f"{path}: '{name}' must be an object of settings; {fix}")
        missing = [k for k in required if raw[name].get(k) is None]
        if missing:
            raise LoadError(f"{path}: {name}.{missing[0]} is missing; {fix}")
    for name, section in sections:
        for key, value in section.items():
            if key in _FIELD_TYPES and not (value is None and key in _NULLABLE):
                ok, what = _FIELD_TYPES[key]
                if not ok(value):
                    where = f"{name}.{key}" if name else key
                    raise LoadError(f"{path}: {where} must be {what}, not {value!r}; {fix}")
    return layout


def load_config(folder: Path) -> Dict[str, Any]:
    """config.json of a model folder, read and checked (`check_config`)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise LoadError(f"No config.json in {folder}: point --model at a VibeVoice model folder.")
    raw = read_json(path)
    check_config(raw, path)
    return raw


def weight_format(folder: Path) -> Optional[str]:
    """"mlx" for a converted folder, "pt" for PyTorch safetensors, None when there are none (metadata only)."""
    files = sorted(glob.glob(str(Path(folder) / "*.safetensors")))
    if not files:
        return None
    from safetensors import safe_open

    try:
        with safe_open(files[0], framework="numpy") as f:
            return (f.metadata() or {}).get("format", "pt")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise LoadError(f"Cannot read {files[0]}: {e}. The file is damaged or truncated: download or convert "
                        "again.") from None


def model_identity(model) -> Dict[str, str]:
    """What identifies a model for resuming a run (split `say` parts, finished `batch` jobs): the resolved folder,
    so `m`, `./m/` and `/abs/m` agree, and a fingerprint of its files (names, sizes, modification times, config
    bytes, safetensors headers), which changes when it is converted or downloaded again. Reads no weight data. A
    hub repo id that is not a local folder is identified by its name."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return {"repo": str(model)}
    folder = folder.resolve()
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if path.name == "config.json":
            h.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            with open(path, "rb") as f:  # 8 bytes of header length, then the JSON header (names, dtypes, shapes)
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 1 << 26)))
    return {"folder": str(folder), "fingerprint": h.hexdigest()[:16]}


@dataclass
class Checkpoint:
    """A model folder, read once: its layout, its normalized config and the generation defaults it ships."""

    folder: Path
    layout: str  # "original", "transformers", "realtime" or "mlx"
    raw: Dict[str, Any]  # config.json as stored
    normalized: Dict[str, Any]  # original field names, derived values explicit
    generation: Dict[str, Any] = field(default_factory=dict)  # {"steps", "cfg_scale"} where the folder has them

    @property
    def quantization(self) -> Optional[Dict[str, int]]:
        return self.raw.get("quantization")

    @property
    def family(self) -> str:
        """models.VIBEVOICE (1.5B, 7B) or models.REALTIME (Realtime-0.5B)."""
        return family(self.raw)


def read_checkpoint(folder: Path) -> Checkpoint:
    """Read config.json (and generation_config.json) of a local folder of any layout."""
    folder = Path(folder)
    raw = load_config(folder)
    fmt = weight_format(folder)
    layout = MLX if fmt == MLX else detect_layout(raw)
    plain = {k: v for k, v in raw.items() if k not in ("quantization", "conversion")}
    if family(raw) == REALTIME_FAMILY:
        normalized = copy.deepcopy(plain)  # RealtimeConfig reads the original fields as they are
    else:
        normalized = normalize_config(plain, ORIGINAL if layout == MLX else layout)
    generation = {}
    gen_path = folder / GENERATION_CONFIG
    if gen_path.is_file():
        gen = read_json(gen_path)
        # ours: steps / cfg_scale; transformers': num_diffusion_steps / guidance_scale
        for ours, theirs in (("steps", "num_diffusion_steps"), ("cfg_scale", "guidance_scale")):
            key = ours if ours in gen else theirs
            if gen.get(key) is not None:
                try:
                    check_option(ours, gen[key])
                except UserError as e:
                    raise LoadError(f"{gen_path}: '{key}': {e} Fix the file or delete the field.") from None
                generation[ours] = gen[key]
        sched = gen.get("noise_scheduler_config") or {}
        head = normalized["diffusion_head_config"]
        if sched.get("beta_schedule"):
            head["ddpm_beta_schedule"] = sched["beta_schedule"]
        if sched.get("prediction_type"):
            head["prediction_type"] = sched["prediction_type"]
        if sched.get("num_train_timesteps"):
            head["ddpm_num_steps"] = int(sched["num_train_timesteps"])
    return Checkpoint(folder, layout, raw, normalized, generation)


def read_weights(folder: Path) -> Tuple[Dict[str, Any], str]:
    """All safetensors of a folder as lazy MLX arrays, and their format ("mlx" for converted folders, else "pt")."""
    import mlx.core as mx

    folder = Path(folder)
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
            raise LoadError(f"Cannot read {f}: {e}. The file is damaged or truncated: download or convert "
                            "again.") from None
        fmt = fmt or (meta or {}).get("format", "pt")
        weights.update(w)
    return weights, fmt


def check_weights(model, weights: Dict[str, Any]) -> None:
    """Strict: every parameter present with its shape, nothing extra. Errors name the tensors."""
    from mlx.utils import tree_flatten

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
