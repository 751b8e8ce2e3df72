"""The one key table between the two checkpoint layouts, and the MLX transposes.

The MLX model mirrors the original Microsoft names, so the original layout needs no renaming and the
transformers 5.x layout is mapped onto it here (architecture.md §4.3). The PyTorch path uses the same table in
the other direction to load an original checkpoint into transformers' VibeVoice.
"""

import re
from typing import Callable, Dict, List, Tuple

ORIGINAL = "original"
TRANSFORMERS = "transformers"

_ENCODERS = [
    ("model.acoustic_tokenizer.encoder.", "model.audio_tower.encoder."),
    ("model.semantic_tokenizer.encoder.", "model.semantic_tokenizer_encoder."),
]
_DECODER = ("model.acoustic_tokenizer.decoder.", "model.audio_tower.decoder.")

# (original, transformers) prefix pairs. `{n}` is a stage index that transformers counts from 0 after
# splitting stage 0 off as the "stem", so original index = transformers index + 1. `{i}` is copied as is.
_PREFIX_RULES: List[Tuple[str, str]] = []
for _o, _t in _ENCODERS:
    _PREFIX_RULES += [
        (_o + "downsample_layers.0.0.conv.conv.", _t + "stem.conv.conv."),
        (_o + "stages.0.", _t + "stem.stage."),
        (_o + "downsample_layers.{n}.0.conv.conv.", _t + "conv_layers.{n}.conv.conv."),
        (_o + "stages.{n}.", _t + "conv_layers.{n}.stage."),
        (_o + "head.conv.conv.", _t + "head.conv."),
    ]
_o, _t = _DECODER
_PREFIX_RULES += [
    (_o + "upsample_layers.0.0.conv.conv.", _t + "stem.conv.conv."),
    (_o + "stages.0.", _t + "stem.stage."),
    (_o + "upsample_layers.{n}.0.convtr.convtr.", _t + "conv_layers.{n}.convtr.convtr."),
    (_o + "stages.{n}.", _t + "conv_layers.{n}.stage."),
    (_o + "head.conv.conv.", _t + "head.conv."),
]
_o, _t = "model.prediction_head.", "model.diffusion_head."
_PREFIX_RULES += [
    (_o + "t_embedder.mlp.0.", _t + "timestep_proj.fc1."),
    (_o + "t_embedder.mlp.2.", _t + "timestep_proj.fc2."),
    (_o + "layers.{i}.adaLN_modulation.1.", _t + "layers.{i}.linear."),
    (_o + "final_layer.adaLN_modulation.1.", _t + "final_layer.linear_1."),
    (_o + "final_layer.linear.", _t + "final_layer.linear_2."),
    (_o, _t),
]
for _o, _t in [("acoustic_connector", "multi_modal_projector"), ("semantic_connector", "semantic_connector")]:
    _PREFIX_RULES += [
        (f"model.{_o}.fc1.", f"model.{_t}.linear_1."),
        (f"model.{_o}.norm.", f"model.{_t}.act."),
        (f"model.{_o}.fc2.", f"model.{_t}.linear_2."),
    ]
_PREFIX_RULES += [
    ("model.speech_scaling_factor", "model.latent_scaling_factor"),
    ("model.speech_bias_factor", "model.latent_bias_factor"),
]
# Inside a ConvNeXt block only the depthwise mixer is renamed.
_MIXER = (".mixer.conv.conv.conv.", ".mixer.conv.")


def _compile(pattern: str):
    regex = re.escape(pattern).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^" + regex)


_COMPILED = [(_compile(o), _compile(t), o, t) for o, t in _PREFIX_RULES]


def _fill(template: str, match, shift: int) -> str:
    out = template
    if "n" in match.groupdict():
        out = out.replace("{n}", str(int(match.group("n")) + shift))
    if "i" in match.groupdict():
        out = out.replace("{i}", match.group("i"))
    return out


def original_to_transformers(key: str) -> str:
    """Map one original (Microsoft) key to its transformers 5.x name."""
    for src, _, _, dst in _COMPILED:
        m = src.match(key)
        if m and not (m.groupdict().get("n") == "0"):
            key = _fill(dst, m, -1) + key[m.end():]
            break
    return key.replace(*_MIXER)


def transformers_to_original(key: str) -> str:
    """Map one transformers 5.x key to its original (Microsoft) name."""
    for _, src, dst, _ in _COMPILED:
        m = src.match(key)
        if m:
            key = _fill(dst, m, +1) + key[m.end():]
            break
    return key.replace(_MIXER[1], _MIXER[0])


def to_original(weights: Dict, layout: str) -> Dict:
    """Rename a state dict of the given layout to original names (the MLX model's names)."""
    if layout == ORIGINAL:
        return dict(weights)
    if layout != TRANSFORMERS:
        raise ValueError(f"Unknown checkpoint layout {layout!r}: expected 'original' or 'transformers'.")
    return {transformers_to_original(k): v for k, v in weights.items()}


def mlx_transpose(key: str):
    """The axes permutation a tensor (original name) needs for MLX, or None. Decided by name, never by shape."""
    if not key.endswith(".weight"):
        return None
    if key.endswith(".convtr.convtr.weight"):
        return (1, 2, 0)  # ConvTranspose1d [in, out, k] -> [out, k, in]
    if key.endswith(".conv.conv.weight"):
        return (0, 2, 1)  # Conv1d [out, in/groups, k] -> [out, k, in/groups]
    return None


def to_mlx_layout(weights: Dict, layout: str, drop: Callable[[str], bool] = lambda key: False) -> Dict:
    """Original-named weights in MLX's layout, for either model family: conv weights transposed by name (never by
    shape), the keys `drop` names left out. `layout` "mlx": a converted folder, already in MLX's layout."""
    out = {}
    for k, v in weights.items():
        if drop(k):
            continue
        perm = mlx_transpose(k) if layout != "mlx" else None
        if perm is not None:
            if v.ndim != 3:
                raise ValueError(f"{k}: expected a 3-D conv weight, got shape {tuple(v.shape)}")
            v = v.transpose(perm)
        out[k] = v
    return out


def stays_float32(key: str) -> bool:
    """The tensors of either family that stay float32 whatever the model dtype (architecture.md §8, realtime.md
    §5.2): the latent scaling scalars and the σ-VAE layer scales (init 1e-6, at risk of float16 underflow)."""
    leaf = key.rsplit(".", 1)[-1]
    return key.startswith("model.speech_") or leaf in ("gamma", "ffn_gamma")


def torch_transpose(key: str):
    """The inverse of `mlx_transpose`: MLX layout back to PyTorch."""
    perm = mlx_transpose(key)
    if perm is None:
        return None
    return tuple(perm.index(i) for i in range(3))
