"""The conversion stage: PyTorch VibeVoice checkpoints (original or transformers layout) to MLX folders."""
