"""vibevoice-mlx: Microsoft VibeVoice text-to-speech with MLX."""

__version__ = "0.1.0"
