"""Values every stage agrees on, in one place: audio rate, control tokens, generation defaults, dtypes."""

import math

from .errors import UserError

SAMPLE_RATE = 24000  # the σ-VAE's audio rate; every output and every resampled voice is at this rate

# role -> token string. Qwen2.5's vision tokens are reused as speech tokens (architecture.md §5.1); `pad` only
# left-pads batches in the original. `processor.SpecialTokens.from_tokenizer` is the one resolver to ids.
TOKEN_STRINGS = {
    "speech_start": "<|vision_start|>",
    "speech_end": "<|vision_end|>",
    "speech_diffusion": "<|vision_pad|>",
    "eos": "<|endoftext|>",
    "pad": "<|image_pad|>",
}
CONTROL_ROLES = ("speech_start", "speech_end", "speech_diffusion", "eos")  # what generation may choose
# Their ids in the real Qwen2.5 vocabulary, for a checkpoint that ships no tokenizer to look them up in.
QWEN_TOKEN_IDS = {"eos": 151643, "speech_start": 151652, "speech_end": 151653, "speech_diffusion": 151654}

# The original demos' settings (architecture.md §2.6); a converted folder's generation_config.json may override.
DEFAULT_STEPS = 10
DEFAULT_CFG_SCALE = 1.3
GENERATION_CONFIG = "generation_config.json"
# ComfyUI's models/vibevoice/: where the VibeVoice node packs (ours too) keep their models.
COMFYUI_MODEL_FOLDER = "vibevoice"

# option -> (low, high, whole number, low bound excluded): the one range of every way an option comes in (the API,
# say, a batch manifest, a model folder's generation_config.json).
OPTION_RANGES = {
    "steps": (1, 1000, True, False),
    "cfg_scale": (0, 100, False, False),
    "temperature": (0, 100, False, False),
    "top_p": (0, 1, False, True),
    "prefill_chunk": (1, 1 << 20, True, False),
    "seed": (0, 2**64 - 1, True, False),
    "max_seconds": (0, 24 * 3600, False, True),
}


def check_option(name: str, value) -> None:
    """A UserError naming the option and its range unless `value` is a finite number within it (no bool)."""
    low, high, whole, low_open = OPTION_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    else:  # an int is compared exactly, however large (float() of one past 1e308 would raise)
        ok = isinstance(value, int) or math.isfinite(value) and (not whole or value.is_integer())
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        kind = "a whole number" if whole else "a number"
        bound = f"above {low}" if low_open else f"from {low}"
        raise UserError(f"{name} must be {kind} {bound} to {high}; got {value!r}.")

DTYPE_NAMES = ("float16", "bfloat16", "float32")


def mlx_dtype(name):
    """The MLX dtype of a name in DTYPE_NAMES (an MLX dtype passes through)."""
    import mlx.core as mx

    if not isinstance(name, str):
        return name
    if name not in DTYPE_NAMES:
        raise UserError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}.")
    return getattr(mx, name)
