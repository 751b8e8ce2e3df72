"""VibeVoice-Realtime-0.5B behind the package's front doors: the pipeline `load` returns for it, and generation.

The public functions (`vv.load`, `vv.generate`, `vv.stream_generate`, `vv.generate_batch`) decide the family from
`config.json` (`models.family`) and come here for this one. Text goes through the realtime processor (the
whole text, or pieces as they arrive: `text_stream`), the voice is a preset (`presets`), and `windows` runs the
schedule. Responses and results are the 1.5B's types, so callers handle both families alike.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import mlx.core as mx
import numpy as np

from .constants import SAMPLE_RATE
from .errors import UserError
from .models import REALTIME
from .models.realtime import RealtimeConfig, RealtimeModel

logger = logging.getLogger(__name__)

# The demos' settings (realtime.md §4.10): the model's own config says 20 steps and generate() cfg 1.0.
DEFAULT_STEPS = 5
DEFAULT_CFG_SCALE = 1.5


@dataclass
class RealtimePipeline:
    """A loaded realtime model ready for `generate` (what `vv.load` returns for this family): the model, its
    tokenizer and the generation defaults (the demos', under the folder's generation_config.json)."""

    model: RealtimeModel
    tokenizer: Any
    folder: Path
    config: RealtimeConfig
    max_batch: int = 8
    generation: Dict[str, Any] = field(default_factory=dict)
    sample_rate: int = SAMPLE_RATE
    family: str = REALTIME

    @property
    def defaults(self) -> Dict[str, Any]:
        return {"steps": DEFAULT_STEPS, "cfg_scale": DEFAULT_CFG_SCALE, **self.generation}

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.model.tts_language_model.layers[0].input_layernorm.weight.dtype


DEFAULT_VOICE = "en-Carter_man"  # the web demo's default (demo/web/app.py)


def events(pipe: RealtimePipeline, scripts, voices, configs, noises, stops, eos_rules
           ) -> Iterator[Tuple[int, Optional[np.ndarray], Optional[str]]]:
    """Speak each script (a string, or an iterable of text pieces as they arrive) in its preset voice, up to
    `pipe.max_batch` at once (the others join as rows finish). Yields (script index, audio [hop], None) per frame,
    then (script index, None, why it stopped: "eos", "max_frames", "context" or "cancelled") once.

    noises[i](f) gives frame f's initial latent. Steps and cfg scale are the first config's (shared by a batch);
    max_seconds, stop and eos_rule are per script. Every voice is read before any work starts."""
    from .preset_store import load_voice_preset
    from .presets import PresetShape
    from .text_stream import text_source
    from .windows import Batch, Row, default_eos_rule

    shape = PresetShape.from_config(pipe.config.raw)
    presets = [load_voice_preset(_one_voice(v), shape=shape) for v in voices]
    batch = Batch(pipe.model, configs[0].cfg_scale, configs[0].steps, pipe.dtype)
    pending, rows = list(range(len(scripts))), {}
    while pending or batch.active:
        while pending and len(batch.rows) + len(batch.parked) < pipe.max_batch:
            i = pending.pop(0)
            seconds = configs[i].max_seconds
            max_frames = None if seconds is None else max(1, int(seconds * pipe.sample_rate // pipe.hop_length))
            ids, wait = text_source(pipe.tokenizer, scripts[i])
            rows[i] = Row(ids, noises[i], eos_rules[i] or default_eos_rule, max_frames, wait, should_stop=stops[i])
            batch.add(rows[i], presets[i])
        for row, audio in batch.step():
            yield next(k for k, r in rows.items() if r is row), np.asarray(audio), None
        for i in [k for k, r in rows.items() if r.done]:
            yield i, None, rows.pop(i).stop


def _one_voice(voices):
    """A realtime script speaks in one preset: its name or file (the web demo's default when none is given)."""
    if voices is None or len(voices) == 0:
        return DEFAULT_VOICE
    if len(voices) > 1:
        raise UserError(f"VibeVoice-Realtime-0.5B speaks in one voice per script; got {len(voices)}: give one "
                        "preset name or file.")
    return voices[0]
