"""vibevoice-mlx: Microsoft VibeVoice text-to-speech with MLX, checked against PyTorch.

    import vibevoice_mlx as vv
    pipe = vv.load("microsoft/VibeVoice-1.5B")
    result = vv.generate(pipe, "Speaker 1: Hello there.", voices=["alice.wav"])
"""

__version__ = "0.1.0"

__all__ = ["load", "generate", "stream_generate", "generate_batch", "stream_generate_batch", "encode_voices",
           "save_voice", "convert", "free_memory", "GenerationConfig"]


def __getattr__(name):
    # Imported on first use, so `vibevoice-mlx --help` and `doctor` start fast and work without a full install.
    if name == "load":
        from .loader import load

        return load
    if name in ("generate", "stream_generate", "generate_batch", "stream_generate_batch", "GenerationConfig"):
        from . import generation as _generation

        return getattr(_generation, name)
    if name in ("encode_voices", "save_voice"):
        from . import voices as _voices

        return getattr(_voices, name)
    if name == "convert":
        from .convert.convert import convert

        return convert
    if name == "free_memory":
        from .memory import free_memory

        return free_memory
    raise AttributeError(f"module 'vibevoice_mlx' has no attribute {name!r}")
