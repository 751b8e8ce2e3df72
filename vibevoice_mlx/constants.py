"""Values every stage agrees on, in one place: audio rate, control tokens, generation defaults, dtypes."""

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

DTYPE_NAMES = ("float16", "bfloat16", "float32")


def mlx_dtype(name):
    """The MLX dtype of a name in DTYPE_NAMES (an MLX dtype passes through)."""
    import mlx.core as mx

    if not isinstance(name, str):
        return name
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}.")
    return getattr(mx, name)
