"""VibeVoice-Realtime-0.5B behind the package's front doors: the pipeline `load` returns for it, and generation.

The public functions (`vv.load`, `vv.generate`, `vv.stream_generate`, `vv.generate_batch`) decide the family from
`config.json` (`models.family_of`) and come here for this one. Text goes through the realtime processor (the
whole text, or pieces as they arrive: `text_stream`), the voice is a preset (`presets`), and `windows` runs the
schedule. Responses and results are the 1.5B's types, so callers handle both families alike.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .checkpoint import MLX, load_config, read_weights
from .constants import SAMPLE_RATE, mlx_dtype
from .models.realtime import RealtimeConfig, RealtimeModel

logger = logging.getLogger(__name__)

# The demos' settings (realtime.md §4.10): the model's own config says 20 steps and generate() cfg 1.0.
DEFAULT_STEPS = 5
DEFAULT_CFG_SCALE = 1.5


@dataclass
class RealtimePipeline:
    """A loaded realtime model ready for `generate`: the model, its tokenizer and the generation defaults."""

    model: RealtimeModel
    tokenizer: Any
    folder: Path
    config: RealtimeConfig
    defaults: Dict[str, Any] = field(default_factory=lambda: {"steps": DEFAULT_STEPS,
                                                              "cfg_scale": DEFAULT_CFG_SCALE})
    sample_rate: int = SAMPLE_RATE
    family: str = "realtime"

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.model.tts_language_model.layers[0].input_layernorm.weight.dtype

    @property
    def pad_id(self) -> int:
        """`<|image_pad|>`, the negative pseudo id (realtime.md §2.4); never embedded, kept for bookkeeping."""
        return int(self.tokenizer.convert_tokens_to_ids("<|image_pad|>"))


def build_model(folder: Path, raw: Dict[str, Any], dtype: Optional[Union[str, mx.Dtype]] = None) -> RealtimeModel:
    """The MLX realtime model of a folder (original layout or converted), its weights loaded strictly."""
    from .loader import cast_weights, check_weights, default_dtype

    config = RealtimeConfig.from_dict({k: v for k, v in raw.items() if k not in ("quantization", "conversion")},
                                      raw.get("quantization"))
    weights, fmt = read_weights(folder)
    model = RealtimeModel(config)
    if config.quantization:
        q = config.quantization
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=model.quant_predicate)
    weights = model.sanitize(weights, MLX if fmt == MLX else "original")
    check_weights(model, weights)
    dtype = mlx_dtype(dtype) if dtype is not None else default_dtype()
    model.load_weights(list(cast_weights(model, weights, dtype).items()), strict=True)
    model.eval()
    logger.info("Loaded %s (realtime, %s) as %s", folder, "converted" if fmt == MLX else "original", dtype)
    return model


def load(folder: Path, dtype: Optional[Union[str, mx.Dtype]] = None,
         tokenizer: Optional[Union[str, Path]] = None) -> RealtimePipeline:
    from .loader import load_tokenizer

    raw = load_config(folder)
    config = RealtimeConfig.from_dict({k: v for k, v in raw.items() if k not in ("quantization", "conversion")})
    tok = load_tokenizer(folder, tokenizer)
    return RealtimePipeline(build_model(folder, raw, dtype), tok, folder, config)


def stream_generate(pipe: RealtimePipeline, text, voice, config=None, noise=None,
                    eos_rule=None, key: Optional[mx.array] = None) -> Iterator:
    """Speak `text` (a string, or an iterable of text pieces as they arrive) in the preset `voice`; yields a
    `GenerationResponse` per frame as soon as it is decoded, then an empty one flagged `finished`. `noise` and
    `eos_rule` are the test hooks."""
    from .generation import GenerationConfig, GenerationResponse, NoiseSource, _peak_gb
    from .preset_store import load_voice_preset
    from .presets import PresetShape
    from .windows import Session, TextIds, default_eos_rule, windows

    config = config or GenerationConfig(steps=pipe.defaults["steps"], cfg_scale=pipe.defaults["cfg_scale"])
    preset = load_voice_preset(voice, shape=PresetShape.from_config(pipe.config.raw))
    session = Session(pipe.model, preset, cfg_scale=config.cfg_scale, steps=config.steps, dtype=pipe.dtype)
    key = key if key is not None else mx.random.key(config.seed if config.seed is not None else 0)
    latent = pipe.config.acoustic_vae_dim
    source = NoiseSource(noise, key, latent)
    ids = TextIds(pipe.tokenizer.encode(text.strip() + "\n", add_special_tokens=False), closed=True)
    max_frames = None
    if config.max_seconds is not None:
        max_frames = max(1, int(config.max_seconds * pipe.sample_rate // pipe.hop_length))
    start, frames = time.perf_counter(), 0

    def response(audio, **flags):
        elapsed = time.perf_counter() - start
        seconds = frames * pipe.hop_length / pipe.sample_rate
        return GenerationResponse(audio, pipe.sample_rate, None, frames, seconds, elapsed, frames / elapsed,
                                  seconds / elapsed, _peak_gb(), **flags)

    # Each frame goes out as soon as it is decoded (holding one back to flag the last would delay all audio by a
    # frame); the end is an empty `finished` response, as for the 1.5B.
    for audio in windows(session, ids, lambda f: source()[0], eos_rule or default_eos_rule, max_frames):
        frames += 1
        yield response(np.asarray(audio))
    yield response(np.zeros(0, np.float32), finished=True)
