"""The speech connector: acoustic (or semantic) latents into the language model's hidden space (architecture.md
§3.2). Both model families use it as it is."""

import mlx.core as mx
import mlx.nn as nn


class SpeechConnector(nn.Module):
    """fc1 -> RMSNorm -> fc2, no activation (architecture.md §3.2)."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, output_dim)
        self.norm = nn.RMSNorm(output_dim, eps=1e-6)
        self.fc2 = nn.Linear(output_dim, output_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.norm(self.fc1(x)))
